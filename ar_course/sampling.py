"""Turning logits into tokens: greedy, temperature, top-k, top-p (nucleus), their composition, and
classifier-free guidance.

One sampling convention for every sampler of tokens from logits: a :class:`SamplingConfig` ``(temperature,
top_k, top_p)``, passed keyword-only as ``sampling=`` (continuous tokens, drawn by a flow-matching head rather
than from logits, take only a ``temperature``: top-k and top-p have no meaning there). One guidance convention
everywhere: a strength ``w`` (``cfg=`` in the samplers), neutral at 0, mixing the logits as
``(1 + w) * cond - w * uncond`` (:func:`cfg_mix`).

Every function works on batched logits ``(..., V)`` (usually ``(B, V)``). Filters return logits with
``-inf`` at excluded tokens, so they compose and a softmax afterwards gives the renormalised distribution.
The processing order is fixed: temperature, then top-k, then top-p (on the tempered distribution).

:func:`probs` returns the exact distribution :func:`sample` draws from; speculative decoding uses it to get
the target's ``p`` and the draft's ``q`` after identical processing.

Input rules (checked; see :mod:`ar_course.utils` for which error is raised when):

* ``logits``: a real tensor ``(..., V)`` with ``V >= 1``; leading dimensions may be empty (``(0, V)`` gives
  ``(0,)`` tokens). A logit is a real number, or ``-inf`` for a token that must never be drawn. NaN and
  ``+inf`` are refused, and so is a row with no token above ``-inf`` (nothing could be drawn from it). These
  checks read the values: one host sync per call on CUDA (per token in the decoding loops). Integer logits
  are accepted everywhere: the filters (:func:`top_k_filter`, :func:`top_p_filter`) promote them to the
  default float dtype (they must hold ``-inf``), floating-point logits keep their dtype.
* ``temperature``: a finite number ``>= 0`` (``0`` is greedy); ``top_k``: ``None`` or an integer ``>= 1``;
  ``top_p``: ``None`` or a number in ``(0, 1]``; all checked when a :class:`SamplingConfig` is made, even
  where greedy ignores them. Every such config works on every valid row: a temperature so small that
  ``logits / temperature`` overflows float32 (``1e-40``) gives the greedy token (ties shared), and a tiny
  ``top_p`` (``1e-46``) keeps the most likely token. A temperature too large for the logits' dtype (``1e39``
  overflows float32 to inf) flattens the distribution over the tokens above ``-inf``, which stay excluded.
* float64 logits are tempered in float64, each row moved so that its largest value is 0 (the same softmax),
  and then made float32: finite float64 logits work, values beyond float32's range (``1e300``) and a common
  offset too large for float32 to keep the differences (``1e8 + [0, 0.5, 1]``) included.
* So the sampler never returns an id outside ``[0, V)``, and its distributions never hold NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ar_course.utils import check_int, check_number

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingConfig:
    """How logits become a token: divide by ``temperature`` (``0``: greedy, the argmax), keep the ``top_k``
    most likely tokens (``None``: all), then the nucleus of probability ``top_p`` (``None``: all).

    Checked and normalised when made (``float``, ``int``/``None``, ``float``/``None``).

    Raises:
        TypeError: a non-number, a bool, or a non-integer ``top_k`` (``2.0`` included).
        ValueError: ``temperature`` not finite or ``< 0``, ``top_k < 1``, ``top_p`` outside ``(0, 1]``.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", check_number("temperature", self.temperature, lo=0))
        if self.top_k is not None:
            object.__setattr__(self, "top_k", check_int("top_k", self.top_k, lo=1))
        if self.top_p is not None:
            object.__setattr__(self, "top_p", check_number("top_p", self.top_p, lo=0, hi=1, lo_open=True))

    @property
    def greedy(self) -> bool:
        """``temperature == 0``: the most likely token, no random numbers drawn."""
        return self.temperature == 0


GREEDY = SamplingConfig(temperature=0.0)
"""Greedy decoding: always the most likely token."""


def check_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """``sampling`` itself, after checking that it is a :class:`SamplingConfig` (whose values were checked when
    it was made); ``TypeError`` otherwise (``sampling must be a SamplingConfig(temperature, top_k, top_p)``)."""
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig(temperature, top_k, top_p), got {sampling!r}")
    return sampling


def check_cfg(cfg: float) -> float:
    """The guidance strength ``w`` as a float: any finite number (``0``: no guidance, ``-1``: the unconditional
    model). Raises ``TypeError`` for a non-number or a bool, ``ValueError`` for NaN or an infinity."""
    return check_number("cfg", cfg)


def check_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """``generator`` itself when it is a ``torch.Generator`` or ``None``; ``TypeError`` otherwise (a seed passed
    where the generator goes: ``generator must be a torch.Generator or None, got int (make one with
    torch.Generator().manual_seed(0))``). Reads nothing from the device."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__} (make one with "
                        "torch.Generator().manual_seed(0))")
    return generator


def _check_shape(logits: torch.Tensor, name: str = "logits") -> None:
    """A real tensor ``(..., V)`` with ``V >= 1`` (no values read)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (..., V), got {type(logits).__name__}")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1 tokens, got {tuple(logits.shape)}")
    if logits.dtype == torch.bool or logits.is_complex():
        raise ValueError(f"{name} must hold real numbers, got {logits.dtype}")


def _promote(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` itself when floating point, else (an integer tensor) converted to the default float dtype so
    that ``-inf`` can be written into it."""
    return logits if logits.is_floating_point() else logits.to(torch.get_default_dtype())


def _rows_ok(x: torch.Tensor) -> bool:
    """Whether every row of ``x`` ``(..., V)`` has no NaN, no ``+inf`` and a token above ``-inf``.

    One host sync (on CUDA: per call, so per token in the decoding loops)."""
    row_max = x.amax(dim=-1)  # (...): NaN if the row holds one, +inf if it holds one, -inf if nothing is above
    if row_max.numel() == 0:
        return True
    lowest, highest = torch.stack(torch.aminmax(row_max)).tolist()
    return lowest > NEG_INF and highest < float("inf")  # False for NaN as well


def _check_rows(logits: torch.Tensor) -> None:
    """Every row of ``logits`` ``(..., V)`` has no NaN, no ``+inf`` and a token above ``-inf``; otherwise a
    ``ValueError`` saying what is wrong with the first bad row. One host sync (on CUDA) when all rows are valid."""
    if _rows_ok(logits):
        return
    row_max = logits.amax(dim=-1)  # (...)
    bad = torch.isnan(row_max) | torch.isinf(row_max)
    row = int(bad.flatten().nonzero()[0])
    raw = logits.reshape(-1, logits.shape[-1])[row]  # (V,)
    where = f"logits row {row} (of {bad.numel()})"
    # float16 holds nothing above 65504: a model run in it that overflows gives inf, then NaN
    hint = " (float16 logits: the model may have overflowed float16; run it in float32 or bfloat16)" \
        if logits.dtype == torch.float16 else ""
    if bool(torch.isnan(raw).any()):
        raise ValueError(f"{where} contains NaN{hint}")
    if bool(torch.isposinf(raw).any()):
        raise ValueError(f"{where} contains +inf (a logit must be a real number, or -inf for an excluded token){hint}")
    raise ValueError(f"{where} is all -inf: no token can be drawn")


def _divide(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` (a number ``> 0``) with ``-inf`` kept at ``-inf``: a finite temperature above the
    largest number of the logits' dtype (``1e39`` for float32, ``1e5`` for float16) rounds to inf in the division,
    and ``-inf / inf`` would be NaN; the finite logits then become 0 (a flat distribution over them)."""
    out = logits / temperature
    if logits.is_floating_point() and temperature > torch.finfo(logits.dtype).max:
        out = torch.where(torch.isneginf(logits), logits, out)  # (..., V)
    return out


def _temper_shifted(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` up to a constant per row (the same softmax) for valid float32 or float64 rows
    where a tiny ``temperature`` overflows the plain division: each row's largest logit is moved to 0 first, so it
    stays 0 and the others fall towards ``-inf``, never NaN or ``+inf``. A temperature below the dtype's smallest
    normal number (which it would round towards 0) divides as that number: both are far below any gap between
    logits."""
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # (..., V), row max exactly 0
    return _divide(shifted, max(temperature, torch.finfo(logits.dtype).tiny))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Index of the largest logit: ``(..., V)`` -> ``(...)`` long (the first one on ties).

    Raises ``ValueError`` for logits breaking the module's input rules (NaN, ``+inf``, an all ``-inf`` row)."""
    _check_shape(logits)
    _check_rows(logits)
    return logits.argmax(dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` (a finite ``temperature > 0``); below 1 sharpens, above 1 flattens. ``-inf``
    stays ``-inf`` even where the temperature is too large for the logits' dtype (``1e39`` in float32: the finite
    logits become 0).

    Values are not checked here (:func:`process_logits` checks the result)."""
    _check_shape(logits)
    temperature = check_number("temperature", temperature, lo=0, lo_open=True)
    return _divide(logits, temperature)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to ``-inf``. ``(..., V)`` -> ``(..., V)``.

    Ties with the k-th largest value are all kept (so a row can keep more than ``k`` tokens when values
    tie): the result depends only on the values, never on the order of tied entries. ``k >= V`` keeps all.
    ``k``: an integer ``>= 1``. Integer logits come back in the default float dtype, floating-point ones in
    their own. Values are not checked here (:func:`process_logits` checks them)."""
    _check_shape(logits)
    k = check_int("top_k", k, lo=1)
    logits = _promote(logits)
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sum reaches ``p``.

    Tokens are sorted by probability; a token is kept when the mass of the tokens before it is ``< p``, so
    the token that crosses the threshold is kept (the top token always is). Tokens tied with the least
    likely kept token are kept too. ``p = 1`` keeps every token. ``(..., V)`` -> ``(..., V)``.
    ``p``: a number in ``(0, 1]``. Integer logits come back in the default float dtype, floating-point ones in
    their own. Values are not checked here (:func:`process_logits` checks them)."""
    _check_shape(logits)
    p = check_number("top_p", p, lo=0, hi=1, lo_open=True)
    logits = _promote(logits)
    if p == 1:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # exclusive cumulative sum
    keep_sorted = mass_before < p
    keep_sorted[..., 0] = True  # the top token, even when p rounds to 0 in float32 (p = 1e-46)
    # smallest kept probability per row; every token at least that likely stays
    threshold = torch.where(keep_sorted, sorted_probs, torch.ones_like(sorted_probs)).amin(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, NEG_INF)


def process_logits(logits: torch.Tensor, *, sampling: SamplingConfig = SamplingConfig()) -> torch.Tensor:
    """Temperature, then top-k, then top-p. Greedy (``temperature == 0``): every logit but the argmax becomes
    ``-inf``. ``(..., V)`` real -> ``(..., V)`` float32 (float64 logits are tempered in float64 first, and each row
    moved to a largest value of 0 before it becomes float32: the same softmax).

    Raises ``TypeError``/``ValueError`` for input breaking the module's rules (see its docstring)."""
    sampling = check_sampling(sampling)
    _check_shape(logits)
    if sampling.greedy:
        best = greedy(logits)[..., None]  # (..., 1), on the logits' own values (1e300 in float64 is fine)
        return torch.full(logits.shape, NEG_INF, dtype=torch.float32, device=logits.device).scatter(-1, best, 0.0)
    given, logits = logits, logits if logits.dtype == torch.float64 else logits.float()
    tempered = apply_temperature(logits, sampling.temperature)
    if not _rows_ok(tempered):  # bad logits, or a temperature so small that the division overflowed
        _check_rows(given)
        tempered = _temper_shifted(logits, sampling.temperature)
    if tempered.dtype == torch.float64:  # valid rows: move each max to 0, then narrow (1e300 fits; an offset
        tempered = (tempered - tempered.amax(dim=-1, keepdim=True)).float()  # of 1e8 keeps its differences)
    logits = tempered  # valid rows: the filters below keep at least one token of each
    if sampling.top_k is not None:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p is not None:
        logits = top_p_filter(logits, sampling.top_p)
    return logits


def probs(logits: torch.Tensor, *, sampling: SamplingConfig = SamplingConfig()) -> torch.Tensor:
    """The distribution :func:`sample` draws from: ``softmax(process_logits(logits, sampling=sampling))``,
    ``(..., V)`` float32. Raises as :func:`process_logits`."""
    return torch.softmax(process_logits(logits, sampling=sampling), dim=-1)


def sample_from_probs(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of the (not necessarily normalised) distribution ``p`` ``(..., V)`` -> ``(...)`` long.

    Inverse-CDF sampling: one uniform number per row, scaled by the row's total, located in the running sum
    of ``p`` (``torch.multinomial`` draws ``V`` exponentials per row instead, ~30x slower on CPU for
    ``V = 256``). Zero-probability tokens are never drawn.

    The draw is made in float32; float64 rows are first divided by their largest entry, so weights of any
    scale (1e-50 or 1e300) are taken. Raises ``ValueError`` unless every row holds finite numbers ``>= 0`` with a
    positive, finite total (one host sync on CUDA); ``TypeError`` for a ``generator`` that is not a
    ``torch.Generator`` or ``None``."""
    check_generator(generator)
    _check_shape(p, "p")
    flat = p.reshape(-1, p.shape[-1])  # (N, V)
    if flat.dtype == torch.float64:  # rows like 1e-50 or 1e300 leave float32's range: each scaled by its largest
        flat = flat / flat.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    flat = flat.float()
    cdf = flat.cumsum(dim=-1)  # (N, V)
    _check_distributions(flat, cdf[:, -1])
    return _draw(cdf, generator).view(p.shape[:-1])  # (...)


def _check_distributions(flat: torch.Tensor, total: torch.Tensor) -> None:
    """Rows of ``flat`` ``(N, V)`` hold finite numbers ``>= 0`` and their ``total`` ``(N,)`` is positive and finite;
    otherwise ``ValueError`` naming the first bad row. One host sync (on CUDA)."""
    if flat.shape[0] == 0:
        return
    least, low_total, high_total = torch.stack([flat.amin(), *torch.aminmax(total)]).tolist()  # NaN propagates
    if least >= 0 and low_total > 0 and high_total < float("inf"):  # False for NaN as well
        return
    bad = (torch.isnan(flat) | (flat < 0)).any(dim=-1) | ~torch.isfinite(total) | (total <= 0)  # (N,)
    row = int(bad.nonzero()[0])
    shown = f"{flat[row].tolist()[:8]}{' ...' if flat.shape[1] > 8 else ''}"
    raise ValueError(f"p row {row} (of {flat.shape[0]}) is not a distribution: it needs finite values >= 0 with a "
                     f"positive total, got {shown}")


def _draw(cdf: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Inverse-CDF draws from the running sums ``cdf`` ``(N, V)`` of valid float32 distributions -> ``(N,)`` long."""
    total = cdf[:, -1:]  # (N, 1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=torch.float32) * total  # (N, 1)
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total even after rounding
    # the first token whose running sum exceeds u; a zero-probability token never raises the running sum
    return torch.searchsorted(cdf, u, right=True)[:, 0]  # (N,)


def sample(
    logits: torch.Tensor,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits`` ``(..., V)`` -> ``(...)`` long.

    Greedy (``temperature == 0``) draws no random numbers; otherwise the distribution is
    :func:`probs` ``(logits, sampling=sampling)``. ``generator`` makes draws reproducible.
    Every id lies in ``[0, V)``: input breaking the module's rules raises ``TypeError``/``ValueError`` (so does a
    ``generator`` that is not a ``torch.Generator`` or ``None``, greedy or not)."""
    check_generator(generator)
    if check_sampling(sampling).greedy:
        return greedy(logits)
    dist = probs(logits, sampling=sampling)  # (..., V), checked by process_logits
    return _draw(dist.reshape(-1, dist.shape[-1]).cumsum(dim=-1), generator).view(dist.shape[:-1])  # (...)


def cfg_mix(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance of strength ``w``: ``(1 + w) * cond - w * uncond``.

    ``w = 0`` gives the conditional logits exactly, ``w > 0`` moves away from the unconditional prediction
    (``cond + w * (cond - uncond)``), ``w = -1`` gives the unconditional logits. This ``w`` is the one of the
    classifier-free guidance paper; in the "guidance scale" convention of LlamaGen and later AR image models,
    ``uncond + s * (cond - uncond)``, it is ``s = 1 + w``. Shapes ``(..., V)``; ``w``: a finite number.
    Half-precision logits (a model under autocast) are mixed and returned in float32: bfloat16 keeps 8 bits, and
    ``(1 + w) * cond`` less ``w * uncond`` would lose most of them. Values are not checked here (the sampler
    checks what it is given)."""
    _check_shape(cond_logits, "cond_logits")
    _check_shape(uncond_logits, "uncond_logits")
    w = check_number("w", w)
    if cond_logits.shape != uncond_logits.shape:
        raise ValueError(f"cond_logits and uncond_logits must have one shape, got {tuple(cond_logits.shape)} and "
                         f"{tuple(uncond_logits.shape)}")
    dtype = torch.promote_types(torch.promote_types(cond_logits.dtype, uncond_logits.dtype), torch.float32)
    return (1 + w) * cond_logits.to(dtype) - w * uncond_logits.to(dtype)
