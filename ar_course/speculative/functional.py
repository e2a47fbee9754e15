"""The small pieces of speculative decoding that :mod:`.decoding` is built from, one function each; chapter 05's
exercises are checked against them.

Notation: ``p`` is the target's next-token distribution, ``q`` the draft's, both ``(..., V)`` and both
produced by :func:`ar_course.sampling.probs` with the same temperature / top-k / top-p. A round proposes
``L`` draft tokens ``draft`` ``(L,)`` drawn from the rows of ``q`` ``(L, V)``; one target pass gives
``p`` ``(L + 1, V)``: row ``i`` is the target's distribution for the position of ``draft[i]`` and row ``L``
the one after the last draft token.

* :func:`acceptance_probability` -- ``min(1, p(x) / q(x))``.
* :func:`accepted_prefix` -- how many drafts of each round pass the accept test before the first rejection.
* :func:`residual_distribution` -- ``normalize(max(0, p - q))``, where a rejected token is redrawn from.
* :func:`speculative_round` -- verify a block of drafts: accepted prefix + one corrected or bonus token.
* :func:`rollback_caches` -- cut KV caches back to what the accepted sequence needs.
* :func:`jacobi_verify` -- the same verification for Speculative Jacobi Decoding, plus the samples that the
  unaccepted positions carry into the next pass.
* :func:`codebook_neighbors`, :func:`relaxed_target` -- the LANTERN-style relaxation: a drafted image token
  may borrow up to ``delta`` probability from its nearest codebook neighbours before the accept test.
"""

from __future__ import annotations

import torch

from ar_course import sampling
from ar_course.transformer.model import KVCache
from ar_course.utils import check_finite, check_ids, check_int, check_number

# The public functions check their arguments, then call a private twin that does the work; the decoding loops
# (:mod:`.decoding`) call the twins, having checked their inputs once at entry (no extra host sync per round).


def _check_tensors(**tensors: object) -> None:
    """``TypeError`` naming the first argument that is not a tensor (``p must be a torch.Tensor, got list``)."""
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_dist(name: str, x: torch.Tensor) -> None:
    _check_tensors(**{name: x})
    if not torch.is_floating_point(x) or x.dim() < 1:
        raise ValueError(f"{name} must be a floating-point tensor (..., V), got {x.dtype} {tuple(x.shape)}")


def _check_verification(p: torch.Tensor, q: torch.Tensor, u: torch.Tensor) -> None:
    """The values a verification reads (one host sync on CUDA; the loops check theirs once at entry): ``p`` and
    ``q`` floating-point and finite (a NaN ratio would reject every draft), ``u`` uniform numbers: floating-point,
    in ``[0, 1)`` (a NaN or a 2.0 would reject silently)."""
    _check_dist("q", q)
    check_finite("p", p), check_finite("q", q)
    if not u.is_floating_point():
        raise ValueError(f"u must be a floating-point tensor of uniform numbers in [0, 1), got {u.dtype}")
    outside = ~((u >= 0) & (u < 1))  # NaN too
    if bool(outside.any()):
        raise ValueError(f"u must hold uniform numbers in [0, 1), got {float(u[outside][0])}")


def _check_token_ids(name: str, x: torch.Tensor, V: int) -> None:
    """``x``: a long tensor (any shape, maybe empty) of ids in ``[0, V)`` (one host sync on CUDA)."""
    check_ids(name, x, V, tuple(x.shape), allow_empty=True)


def check_neighbors(neighbors: object, V: int) -> torch.Tensor:
    """``neighbors`` if it is a ``(V, k)`` long tensor of ids in ``[0, V)`` where no token is its own neighbour
    (as :func:`codebook_neighbors` gives it); one host sync on CUDA.

    Raises:
        TypeError: not a tensor.
        ValueError: the wrong shape or dtype, an id outside ``[0, V)``, or a row ``x`` that lists ``x``."""
    check_ids("neighbors", neighbors, V, (V, "k"), allow_empty=True)
    own = neighbors == torch.arange(V, device=neighbors.device)[:, None]  # (V, k)
    if bool(own.any()):
        raise ValueError(f"neighbors row {int(own.any(dim=1).nonzero()[0])} lists the token itself: a token cannot "
                         f"be its own neighbour")
    return neighbors


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Probability of accepting each drafted token: ``min(1, p[x] / q[x])``.

    Args:
        p: ``(..., V)`` target distributions. q: ``(..., V)`` draft distributions (``q[x] > 0`` for the
            drafted token, since it was drawn from ``q``). tokens: ``(...)`` long, the drafted tokens.

    Returns:
        ``(...)`` in ``[0, 1]``, dtype of ``p``.

    Raises:
        TypeError: an argument that is not a tensor.
        ValueError: ``p`` not floating point, shapes that do not match, ``tokens`` not long or outside ``[0, V)``.
    """
    _check_acceptance(p, q, tokens, "tokens")
    return _acceptance(p, q, tokens)


def _check_acceptance(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor, name: str) -> None:
    """The checks of :func:`acceptance_probability` (and :func:`accepted_prefix`, whose tokens are ``name``)."""
    _check_dist("p", p)
    _check_tensors(q=q, **{name: tokens})
    if p.shape != q.shape or tokens.shape != p.shape[:-1]:
        raise ValueError(f"shapes do not match: p {tuple(p.shape)}, q {tuple(q.shape)}, {name} {tuple(tokens.shape)}")
    _check_token_ids(name, tokens, p.shape[-1])


def _acceptance(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """:func:`acceptance_probability` on checked input."""
    p_x = p.gather(-1, tokens[..., None]).squeeze(-1)  # (...)
    q_x = q.gather(-1, tokens[..., None]).squeeze(-1)  # (...)
    return torch.clamp(p_x / q_x, max=1.0)


def accepted_prefix(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Number of leading drafts each round accepts: ``(B,)`` long in ``0 .. L``.

    Draft ``i`` of a round passes when ``u[i] < min(1, p[i, x_i] / q[i, x_i])``; a round keeps its drafts up
    to its first failure, so a draft after a rejected one never counts.

    Args:
        p: ``(B, L, V)`` target distributions at the drafts' positions. q: ``(B, L, V)`` draft distributions.
        drafts: ``(B, L)`` long. u: ``(B, L)`` uniform numbers in ``[0, 1)``.

    Raises:
        TypeError, ValueError: as :func:`acceptance_probability`, or shapes other than the above; ``p`` or ``q``
            holding NaN or inf, ``q`` not floating point, ``u`` not floating point or outside ``[0, 1)``.
    """
    _check_tensors(p=p, q=q, drafts=drafts, u=u)
    if p.dim() != 3 or drafts.shape != p.shape[:2] or u.shape != drafts.shape:
        raise ValueError(f"expected p and q (B, L, V), drafts and u (B, L); got p {tuple(p.shape)}, "
                         f"drafts {tuple(drafts.shape)}, u {tuple(u.shape)}")
    _check_acceptance(p, q, drafts, "drafts")
    _check_verification(p, q, u)
    return _accepted(p, q, drafts, u)


def _accepted(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:func:`accepted_prefix` on checked input."""
    passed = u < _acceptance(p, q, drafts)  # (B, L)
    return passed.long().cumprod(dim=1).sum(dim=1)  # (B,): ones up to the first failure


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``normalize(max(0, p - q))`` row by row, ``(..., V)`` -> ``(..., V)``.

    A row where ``p <= q`` everywhere (only when ``p == q``, in which case no draft is ever rejected) has
    nothing left; it falls back to ``p``.

    Raises:
        TypeError: ``p`` or ``q`` is not a tensor.
        ValueError: ``p`` not a floating-point ``(..., V)`` tensor, or ``q`` of another shape.
    """
    _check_dist("p", p)
    _check_tensors(q=q)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    r = (p - q).clamp(min=0)  # (..., V)
    mass = r.sum(-1, keepdim=True)  # (..., 1)
    return torch.where(mass > 0, r / mass.clamp(min=torch.finfo(r.dtype).tiny), p)


def speculative_round(
    p: torch.Tensor,
    q: torch.Tensor,
    draft: torch.Tensor,
    u: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Verify ``L`` drafted tokens against the target; returns the tokens this round adds, ``(n + 1,)`` for ``n``
    accepted drafts (``0 <= n <= L``).

    Draft ``i`` is accepted while ``u[i] < min(1, p[i, x_i] / q[i, x_i])``. At the first rejection ``i`` the
    round returns ``draft[:i]`` plus one token drawn from ``residual_distribution(p[i], q[i])``; when all
    ``L`` are accepted it returns ``draft`` plus a bonus token drawn from ``p[L]``. Exactly one draw is
    made, ``sampling.sample_from_probs(dist, generator)``.

    Args:
        p: ``(L + 1, V)`` target distributions. q: ``(L, V)`` draft distributions. draft: ``(L,)`` long.
        u: ``(L,)`` uniform numbers in ``[0, 1)``. generator: for the one draw.

    Raises:
        TypeError: an argument that is not a tensor.
        ValueError: shapes other than the above, ``p`` or ``q`` not floating point or holding NaN or inf,
            ``draft`` not long or outside ``[0, V)``, ``u`` not floating point or outside ``[0, 1)``; rows of
            ``p`` that are not distributions (:func:`ar_course.sampling.sample_from_probs`).
    """
    _check_round(p, q, draft, u)
    return _round(p, q, draft, u, generator)


def _check_round(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u: torch.Tensor) -> None:
    """The checks of :func:`speculative_round` (and :func:`jacobi_verify`)."""
    _check_tensors(p=p, q=q, draft=draft, u=u)
    L = draft.shape[0] if draft.dim() == 1 else None
    if L is None or p.dim() != 2 or p.shape[0] != L + 1 or q.shape != (L, p.shape[1]) or u.shape != (L,):
        raise ValueError(f"expected p (L+1, V), q (L, V), draft (L,), u (L,); got p {tuple(p.shape)}, "
                         f"q {tuple(q.shape)}, draft {tuple(draft.shape)}, u {tuple(u.shape)}")
    _check_dist("p", p)
    _check_token_ids("draft", draft, p.shape[1])
    _check_verification(p, q, u)


def _round(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u: torch.Tensor,
           generator: torch.Generator | None) -> torch.Tensor:
    """:func:`speculative_round` on checked input."""
    L = draft.shape[0]
    i = int(_accepted(p[None, :L], q[None], draft[None], u[None])[0])  # drafts kept
    if i == L:
        extra = sampling.sample_from_probs(p[L], generator)  # bonus token
        return torch.cat([draft, extra.view(1)])
    extra = sampling.sample_from_probs(residual_distribution(p[i], q[i]), generator)
    return torch.cat([draft[:i], extra.view(1)])


def rollback_caches(caches: list[KVCache], seq_len: int) -> None:
    """After a round the sequence has ``seq_len`` positions and its last one has not been fed to any model.

    Each cache keeps at most ``seq_len - 1`` positions (what it computed for rejected drafts goes); a cache
    that holds fewer stays as it is (it gets the missing tokens at its next call)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    for cache in caches:
        cache.rollback(min(cache.length, seq_len - 1))


def jacobi_verify(
    p: torch.Tensor,
    q: torch.Tensor,
    draft: torch.Tensor,
    u: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One verification of Speculative Jacobi Decoding over a window of ``L`` draft tokens.

    First exactly :func:`speculative_round` (same arguments, same single draw): ``accepted`` ``(m,)``,
    ``1 <= m <= L + 1``. Then, when ``m <= L``, the positions after the new token get new drafts for the
    next pass: one draw ``sampling.sample_from_probs(p[m:], generator)`` ``(L + 1 - m,)`` with ``p[m:]`` as
    the distributions they were drawn from.

    Returns:
        ``(accepted (m,), carry (L + 1 - m,) long, carry_q (L + 1 - m, V))`` (carry empty when m = L + 1).

    Raises:
        TypeError, ValueError: as :func:`speculative_round`.
    """
    _check_round(p, q, draft, u)
    return _jacobi(p, q, draft, u, generator)


def _jacobi(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u: torch.Tensor,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`jacobi_verify` on checked input."""
    accepted = _round(p, q, draft, u, generator)
    m = accepted.shape[0]
    carry_q = p[m:]  # (L + 1 - m, V)
    if carry_q.shape[0] == 0:
        return accepted, draft.new_empty(0), carry_q
    return accepted, sampling.sample_from_probs(carry_q, generator), carry_q


def codebook_neighbors(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` nearest other codes of every code by L2 distance: ``(V, D)`` -> ``(V, k)`` long,
    nearest first (the code itself excluded; ties to the lower index).

    Raises:
        TypeError: ``codebook`` is not a tensor, ``k`` not an integer (``2.5``, ``True``).
        ValueError: ``codebook`` not ``(V, D)``, not real, or holding NaN/inf; ``k`` outside ``[0, V - 1]``."""
    _check_tensors(codebook=codebook)
    if codebook.dim() != 2 or codebook.dtype == torch.bool or codebook.is_complex():
        raise ValueError(f"codebook must be a real (V, D) tensor, got {tuple(codebook.shape)} {codebook.dtype}")
    V = codebook.shape[0]
    k = check_int("k", k, lo=0, hi=V - 1)
    check_finite("codebook", codebook)
    d = torch.cdist(codebook.double(), codebook.double())  # (V, V)
    d.fill_diagonal_(float("inf"))
    return torch.sort(d, dim=1, stable=True).indices[:, :k]  # (V, k)


def relaxed_target(p: torch.Tensor, tokens: torch.Tensor, neighbors: torch.Tensor, delta: float) -> torch.Tensor:
    """Move up to ``delta`` probability from each drafted token's neighbours onto the token itself.

    For row ``x = tokens[...]`` with neighbour set ``N = neighbors[x]`` and neighbour mass ``S = p[N].sum()``
    the moved mass is ``m = min(delta, S)``: ``p[x] += m`` and every neighbour is scaled by ``1 - m / S``.
    The result is a distribution at total-variation distance ``m <= delta`` from ``p``; ``delta = 0``
    returns ``p``. The bound is per relaxed target: the target depends on the drafted token, so the tokens a
    relaxed round outputs can be further than ``delta`` from ``p``.

    Args:
        p: ``(..., V)``. tokens: ``(...)`` long. neighbors: ``(V, k)`` long (no token its own neighbour).
        delta: the budget, a finite number ``>= 0``.

    Raises:
        TypeError: ``p``, ``tokens`` or ``neighbors`` not a tensor, ``delta`` not a number.
        ValueError: ``delta`` NaN, infinite or ``< 0``; shapes other than the above; ``p`` not floating point;
            ``tokens`` or ``neighbors`` not long or outside ``[0, V)``; a token listed as its own neighbour
            (:func:`check_neighbors`).
    """
    _check_dist("p", p)
    delta = check_number("delta", delta, lo=0)
    _check_tensors(tokens=tokens, neighbors=neighbors)
    if tokens.shape != p.shape[:-1] or neighbors.dim() != 2 or neighbors.shape[0] != p.shape[-1]:
        raise ValueError(f"expected p (..., V), tokens (...), neighbors (V, k); got {tuple(p.shape)}, "
                         f"{tuple(tokens.shape)}, {tuple(neighbors.shape)}")
    _check_token_ids("tokens", tokens, p.shape[-1])
    check_neighbors(neighbors, p.shape[-1])
    return _relax(p, tokens, neighbors, delta)


def _relax(p: torch.Tensor, tokens: torch.Tensor, neighbors: torch.Tensor, delta: float) -> torch.Tensor:
    """:func:`relaxed_target` on checked input."""
    nb = neighbors[tokens]  # (..., k)
    S = p.gather(-1, nb).sum(-1, keepdim=True)  # (..., 1)
    m = S.clamp(max=delta)  # (..., 1)
    scale = torch.where(S > 0, 1 - m / S.clamp(min=torch.finfo(p.dtype).tiny), torch.ones_like(S))
    out = p.scatter(-1, nb, p.gather(-1, nb) * scale)  # neighbours give ...
    return out.scatter_add(-1, tokens[..., None], m)  # ... the token takes
