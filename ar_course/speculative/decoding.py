"""Speculative sampling with a draft model, and Speculative Jacobi Decoding (optionally relaxed) without one.

Both work on :class:`ar_course.transformer.GPT` models with their KV caches, one sequence at a time
(class-conditional models with guidance run it beside its null-class twin). The caches
always hold every position of the sequence but the last one (the "pending" token, fed at the next call);
after each round :func:`~.functional.rollback_caches` cuts away what was computed for rejected drafts. With
``cache="static"`` the caches are :class:`~ar_course.transformer.model.StaticKVCache` s: each verification pass
is :meth:`~ar_course.transformer.GPT.decode_step` (after the forward pass's checks, which read the cache's
length back; the step itself has no host sync, so a CUDA graph per number of drafts can capture it) and the
rollback only moves the cache's position tensor.

* :func:`speculative_generate` -- Leviathan et al. / Chen et al.: a draft proposes ``gamma`` tokens, one
  target pass verifies them. Greedy (``temperature=0``) gives exactly the target's greedy tokens.
* :func:`sjd_generate` -- Speculative Jacobi Decoding: a window of draft tokens, refined by the target
  itself pass after pass, accepted with the same test; ``delta > 0`` adds LANTERN-style relaxation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ar_course.sampling import (
    SamplingConfig, cfg_mix, check_cfg, check_sampling, greedy, probs, sample_from_probs,
)
from ar_course.speculative.functional import _jacobi, _relax, _round, check_neighbors, rollback_caches
from ar_course.transformer.model import GPT, KVCache, StaticKVCache, check_cache, check_causal
from ar_course.utils import check_ids, check_int, check_number


@dataclass
class SpecStats:
    """Counters of one generation. ``accepted_hist[k]``: rounds in which ``k`` drafts were accepted."""

    target_calls: int = 0
    draft_calls: int = 0
    new_tokens: int = 0
    proposed: int = 0  # draft tokens proposed (window tokens, for SJD)
    accepted: int = 0  # draft tokens accepted
    rejected: int = 0  # rounds that ended in a rejection (drafts after it are never tested)
    accepted_hist: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """The estimate of alpha: accepted / tested draft tokens, ``accepted / (accepted + rejected)``.

        (Dividing by ``proposed`` would count the drafts after a rejection, which are never tested.)"""
        tested = self.accepted + self.rejected
        return self.accepted / tested if tested else float("nan")

    @property
    def tokens_per_call(self) -> float:
        """New tokens per target forward pass."""
        return self.new_tokens / self.target_calls if self.target_calls else float("nan")

    def record(self, n_accepted: int, n_new: int, n_proposed: int) -> None:
        """Count one round: one target call that tested ``n_proposed`` drafts, accepted the first ``n_accepted``
        of them and added ``n_new`` tokens (a rejection when ``n_accepted < n_proposed``)."""
        self.target_calls += 1
        self.new_tokens += n_new
        self.proposed += n_proposed
        self.accepted += n_accepted
        self.rejected += int(n_accepted < n_proposed)
        if len(self.accepted_hist) <= n_accepted:
            self.accepted_hist.extend([0] * (n_accepted + 1 - len(self.accepted_hist)))
        self.accepted_hist[n_accepted] += 1

    def merge(self, other: "SpecStats") -> None:
        """Add another run's counters to these (for statistics over many generations)."""
        self.target_calls += other.target_calls
        self.draft_calls += other.draft_calls
        self.new_tokens += other.new_tokens
        self.proposed += other.proposed
        self.accepted += other.accepted
        self.rejected += other.rejected
        for k, n in enumerate(other.accepted_hist):
            if len(self.accepted_hist) <= k:
                self.accepted_hist.append(0)
            self.accepted_hist[k] += n


def _feed(model: GPT, cache: KVCache | StaticKVCache, seq: torch.Tensor, classes: torch.Tensor | None
          ) -> torch.Tensor:
    """Run ``model`` on the positions of ``seq`` ``(B, n)`` its cache does not hold yet; logits ``(B, T, V)``.

    Cache positions count the class token (if any): position ``j`` holds token ``j - n_prefix``."""
    start = cache.length - model.config.n_prefix
    new = seq[:, max(start, 0):]  # (B, T_new)
    logits, _ = model(new, classes=classes if cache.length == 0 else None, cache=cache)
    return logits


class _Guided:
    """A model with its KV cache over one sequence, and, with guidance ``cfg = w != 0``, the null-class copy of
    the sequence beside it in the same batch (rows: conditional, unconditional)."""

    def __init__(self, model: GPT, classes: torch.Tensor | None, cfg: float, length: int, cache: str) -> None:
        self.model, self.cfg = model, cfg
        self.classes = classes if cfg == 0 else torch.cat([classes, torch.full_like(classes, model.null_class)])
        self.cache = model.make_cache(1 if cfg == 0 else 2, length, static=cache == "static")

    def logits(self, seq: torch.Tensor) -> torch.Tensor:
        """Guided logits ``(T_new, V)`` of the positions of ``seq`` ``(1, n)`` that the cache does not hold yet."""
        out = _feed(self.model, self.cache, seq.expand(self.cache.batch_size, -1), self.classes)  # (1 or 2, T_new, V)
        return out[0] if self.cfg == 0 else cfg_mix(out[:1], out[1:], self.cfg)[0]


def _check_models(**models: object) -> None:
    """``TypeError`` naming the first of ``models`` that is not a :class:`~ar_course.transformer.GPT` (a
    checkpoint name, a VAR...), ``ValueError`` for the first that is bidirectional (``causal=False``)."""
    for name, m in models.items():
        if not isinstance(m, GPT):
            raise TypeError(f"{name} must be a GPT (ar_course.transformer.GPT), got {type(m).__name__}")
        check_causal(m, f"speculative decoding's {name}")


def _check_inputs(models: tuple[GPT, ...], prefix: torch.Tensor, classes: torch.Tensor | None, cfg: float,
                  new_tokens: int, cache: str) -> float:
    """Checks shared by both decoders: the models (target first, then the draft if any) model the same
    vocabulary and classes, ``prefix`` is a ``(1, T)`` long tensor of their ids (``T >= 1`` unless
    class-conditional), ``classes`` ``(1,)`` in ``[0, n_classes]`` exactly when class-conditional, ``cfg``
    finite and ``!= 0`` only with classes, ``T + new_tokens`` positions fit every model, and ``cache`` is
    ``"dynamic"`` or ``"static"``. Returns ``cfg``."""
    if isinstance(cache, StaticKVCache):
        raise ValueError("cache must be 'dynamic' or 'static' (the decoders make their own caches)")
    check_cache(cache, 1, 1)
    model = models[0]
    if any((m.config.vocab_size, m.config.n_classes) != (model.config.vocab_size, model.config.n_classes)
           for m in models):
        raise ValueError("target and draft must model the same vocabulary and classes")
    conditional = model.config.n_classes > 0
    check_ids("prefix", prefix, model.config.vocab_size, (1, "T"), allow_empty=True)
    if conditional != (classes is not None):
        raise ValueError("pass classes of shape (1,) exactly when the models are class-conditional")
    if classes is not None:
        check_ids("classes", classes, model.config.n_classes + 1, (1,))
    cfg = check_cfg(cfg)
    if cfg != 0 and not conditional:
        raise ValueError("classifier-free guidance (cfg != 0) needs class-conditional models")
    for name, m in zip(("target", "draft"), models):
        try:
            m.check_room(prefix.shape[1], new_tokens)
        except ValueError as exc:  # with two models, say whose context is too short
            raise ValueError(f"{name}: {exc}" if len(models) > 1 else str(exc)) from None
    return cfg


@torch.no_grad()
def speculative_generate(
    target: GPT,
    draft: GPT,
    prefix: torch.Tensor,
    max_new_tokens: int,
    *,
    gamma: int = 4,
    sampling: SamplingConfig = SamplingConfig(),
    cfg: float = 0.0,
    classes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    cache: str = "dynamic",
) -> tuple[torch.Tensor, SpecStats]:
    """Sample ``max_new_tokens`` tokens after ``prefix`` ``(1, T)`` from ``target``, with ``draft`` proposing.

    Each round: the draft samples ``gamma`` tokens from ``q`` (one draft call each); one target call over
    the pending token and the drafts gives ``p``; :func:`~.functional.speculative_round` keeps the
    accepted drafts and adds one corrected or bonus token; both caches roll back. ``p`` and ``q`` come from
    :func:`ar_course.sampling.probs` with the same ``sampling``, so the output has exactly the target's sampling
    distribution. Near the end ``gamma`` shrinks so that no position past ``T + max_new_tokens - 1`` is ever fed.

    Greedy (temperature 0): ``p`` and ``q`` would be one-hot, and the round reduces to "keep drafts while
    they equal the target's argmax, then add the target's argmax"; that is computed directly from the
    logits (no distributions, no random numbers), and reproduces ``target.generate(..., sampling=GREEDY)``.

    Class-conditional models (both with ``n_classes > 0``, e.g. chapter 03's image models): pass ``classes``
    ``(1,)``; ``prefix`` may then be empty ``(1, 0)``. Guidance ``cfg = w != 0`` runs the null class beside it in
    a batch of 2 in both models and uses guided logits ``(1 + w) cond - w uncond`` for ``p`` and ``q`` (as
    ``GPT.generate`` does), so the output follows the target's guided distribution exactly.

    ``cache``: ``"dynamic"`` (:class:`~ar_course.transformer.model.KVCache`) or ``"static"``
    (:class:`~ar_course.transformer.model.StaticKVCache`; same tokens up to float rounding).

    Returns ``(tokens (1, T + max_new_tokens), stats)``.

    Raises:
        TypeError: ``target`` or ``draft`` not a GPT, a number of the wrong type (``gamma=2.5``...),
            ``sampling`` not a ``SamplingConfig``, or a non-tensor ``prefix`` or ``classes``.
        ValueError: a bidirectional model (``causal=False``), ``prefix``/``classes`` of the wrong shape, dtype or
            range, ``gamma`` or ``max_new_tokens`` ``< 0``, a non-finite ``cfg``, models of different vocabularies
            or classes, more positions than a ``block_size``, or an unknown ``cache``.
    """
    _check_models(target=target, draft=draft)
    max_new_tokens, gamma = check_int("max_new_tokens", max_new_tokens, lo=0), check_int("gamma", gamma, lo=0)
    sampling = check_sampling(sampling)
    cfg = _check_inputs((target, draft), prefix, classes, cfg, max_new_tokens, cache)
    n, total = prefix.shape[1], prefix.shape[1] + max_new_tokens
    length = max(target.config.n_prefix + total - 1, 1)
    t, d = _Guided(target, classes, cfg, length, cache), _Guided(draft, classes, cfg, length, cache)
    seq = prefix.new_empty(1, total)  # seq[:, :n]: the sequence so far; drafts go after it, accepted ones stay
    seq[:, :n] = prefix
    stats = SpecStats()
    while n < total:
        g = min(gamma, total - n - 1)
        q_rows = _propose(d, seq, n, g, sampling, generator)  # drafts written to seq[0, n : n + g]
        stats.draft_calls += g
        logits = t.logits(seq[:, : n + g])[-(g + 1):]  # (g + 1, V)
        m, nxt = _verify(logits, q_rows, seq[0, n : n + g], sampling, generator)
        seq[0, n + m] = nxt  # the accepted drafts are in place already
        n += m + 1
        stats.record(m, m + 1, g)
        rollback_caches([t.cache, d.cache], target.config.n_prefix + n)
    return seq, stats


def _propose(draft: _Guided, seq: torch.Tensor, n: int, g: int, sampling: SamplingConfig,
             generator: torch.Generator | None) -> list[torch.Tensor]:
    """The draft's ``g`` tokens after ``seq[:, :n]``, written into ``seq[0, n : n + g]``, one draft pass each.
    Returns the ``g`` distributions ``(V,)`` they were drawn from (none when greedy)."""
    q_rows = []
    for i in range(g):
        logits = draft.logits(seq[:, : n + i])[-1]  # (V,)
        if sampling.greedy:
            seq[0, n + i] = greedy(logits)
        else:
            q_rows.append(probs(logits, sampling=sampling))
            seq[0, n + i] = sample_from_probs(q_rows[-1], generator)
    return q_rows


def _verify(logits: torch.Tensor, q_rows: list[torch.Tensor], drafts: torch.Tensor, sampling: SamplingConfig,
            generator: torch.Generator | None) -> tuple[int, torch.Tensor]:
    """One round's verdict on ``drafts`` ``(g,)`` from the target's logits ``(g + 1, V)``: how many drafts are
    accepted, ``m``, and the token after them (a corrected or bonus token; greedy: the target's argmax)."""
    g = drafts.shape[0]
    if sampling.greedy:
        best = greedy(logits)  # (g + 1,)
        m = int((drafts == best[:g]).cumprod(0).sum())  # accepted drafts: the leading matches
        return m, best[m]
    p = probs(logits, sampling=sampling)  # (g + 1, V)
    q = torch.stack(q_rows) if q_rows else p[:0]  # (g, V)
    u = torch.rand(g, generator=generator, device=p.device, dtype=torch.float32)
    new = _round(p, q, drafts, u, generator)  # (m + 1,): m accepted drafts + 1 (speculative_round, unchecked)
    return new.shape[0] - 1, new[-1]


@torch.no_grad()
def sjd_generate(
    model: GPT,
    n_tokens: int,
    *,
    prefix: torch.Tensor | None = None,
    classes: torch.Tensor | None = None,
    window: int = 8,
    sampling: SamplingConfig = SamplingConfig(),
    cfg: float = 0.0,
    generator: torch.Generator | None = None,
    delta: float = 0.0,
    neighbors: torch.Tensor | None = None,
    cache: str = "dynamic",
) -> tuple[torch.Tensor, SpecStats]:
    """Speculative Jacobi Decoding: ``n_tokens`` new tokens from ``model`` with no draft model.

    A window of ``window`` draft tokens follows the accepted sequence, each with the distribution ``q`` it
    was drawn from (one-hot for fresh, uniformly random tokens). One forward pass over the pending token
    and the window gives ``p`` for every window position (and the one after); :func:`~.functional.
    jacobi_verify` accepts a prefix of the window, adds one token, and re-samples the positions after it
    from this pass's ``p``, which become the next pass's drafts. Greedy (temperature 0) is plain greedy
    decoding. ``delta > 0`` (with ``neighbors`` ``(V, k)`` from :func:`~.functional.codebook_neighbors`)
    verifies against :func:`~.functional.relaxed_target` instead of ``p`` (LANTERN-style, not exact).

    ``prefix``: ``(1, T)`` long (``T >= 1`` for an unconditional model; may be ``None`` / empty with a
    class-conditional one, which takes ``classes`` ``(1,)``). ``sampling``, ``cfg``: as :meth:`GPT.generate`;
    ``cache``: as :func:`speculative_generate`.
    Returns ``(tokens (1, T + n_tokens), stats)`` with ``stats.target_calls`` the forward passes made.

    Raises:
        TypeError: ``model`` not a GPT, a number of the wrong type (``window=2.5``, ``delta="0.1"``...),
            ``sampling`` not a ``SamplingConfig``, or a non-tensor ``prefix`` or ``classes``.
        ValueError: a bidirectional ``model`` (``causal=False``), ``prefix``/``classes``/``neighbors`` of the
            wrong shape, dtype or range (or ``neighbors`` listing a token as its own neighbour), ``n_tokens`` or
            ``window`` ``< 0``, ``delta`` not finite or ``< 0`` (or ``> 0`` without ``neighbors``), a non-finite
            ``cfg``, more positions than ``block_size``, or an unknown ``cache``.
    """
    _check_models(model=model)
    if prefix is None:
        prefix = torch.zeros(1, 0, dtype=torch.long, device=model.wte.weight.device)
    n_tokens, window = check_int("n_tokens", n_tokens, lo=0), check_int("window", window, lo=0)
    sampling, delta = check_sampling(sampling), check_number("delta", delta, lo=0)
    cfg = _check_inputs((model,), prefix, classes, cfg, n_tokens, cache)
    _check_relaxation(model, delta, neighbors)
    total = prefix.shape[1] + n_tokens
    guided = _Guided(model, classes, cfg, max(model.config.n_prefix + total - 1, 1), cache)
    seq, stats = prefix, SpecStats()
    carry = prefix.new_empty(0)  # drafts for the positions after seq, with their distributions
    carry_q = torch.empty(0, model.config.vocab_size, device=prefix.device)
    while seq.shape[1] < total:
        L = min(window, total - seq.shape[1] - 1)
        draft, q = _jacobi_window(carry, carry_q, L, generator)  # (L,), (L, V)
        logits = guided.logits(torch.cat([seq, draft[None]], dim=1))[-(L + 1):]  # (L + 1, V)
        p = probs(logits, sampling=sampling)  # (L + 1, V)
        if delta > 0:
            p = torch.cat([_relax(p[:L], draft, neighbors, delta), p[L:]])  # relaxed_target, unchecked
        u = torch.rand(L, generator=generator, device=p.device, dtype=torch.float32)
        new, carry, carry_q = _jacobi(p, q, draft, u, generator)  # jacobi_verify, unchecked
        seq = torch.cat([seq, new[None]], dim=1)
        stats.record(new.shape[0] - 1, new.shape[0], L)
        rollback_caches([guided.cache], model.config.n_prefix + seq.shape[1])
    return seq, stats


def _check_relaxation(model: GPT, delta: float, neighbors: torch.Tensor | None) -> None:
    """Relaxed acceptance (``delta > 0``) needs ``neighbors``: a ``(V, k)`` tensor of the model's ids."""
    if delta > 0:
        if neighbors is None:
            raise ValueError("relaxed acceptance (delta > 0) needs neighbors (V, k)")
        check_neighbors(neighbors, model.config.vocab_size)


def _jacobi_window(carry: torch.Tensor, carry_q: torch.Tensor, L: int, generator: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``L`` drafts of the next pass ``(L,)`` and their distributions ``(L, V)``: the tokens carried over
    from the last pass, then fresh uniformly random ones (one-hot ``q``)."""
    V = carry_q.shape[1]
    fresh = torch.randint(V, (max(L - carry.shape[0], 0),), generator=generator, device=carry.device)
    draft = torch.cat([carry, fresh])[:L]  # (L,)
    q = torch.cat([carry_q, torch.nn.functional.one_hot(fresh, V).to(carry_q.dtype)])[:L]  # (L, V)
    return draft, q
