"""The plain pieces of a masked (absorbing-state) diffusion language model, as in MDLM.

Forward process: at time ``t`` in ``[0, 1]`` each token is kept with probability ``alpha(t)`` and replaced by the
mask token otherwise (``alpha(0) = 1``: clean text, ``alpha(1) = 0``: all masks). The continuous-time ELBO of the
reverse model is a weighted masked cross-entropy,

    -log p(x) <= integral_0^1  w(t) * E[ sum over masked i of -log p_theta(x_i | x_t) ] dt,
    w(t) = -alpha'(t) / (1 - alpha(t)),

(``w(t) = 1/t`` for the linear schedule). One reverse step from ``t`` to ``s < t`` unmasks each masked token with
probability ``(alpha(s) - alpha(t)) / (1 - alpha(t))``, drawing its value from the model; unmasked tokens never
change. Block-wise (semi-autoregressive) diffusion splits the sequence into blocks denoised left to right, each
conditioned on the clean blocks before it: :func:`block_spans` and :func:`block_attention_mask`.
"""

from __future__ import annotations

import math

import torch

from ar_course.sampling import check_generator
from ar_course.utils import check_fits, check_ids, check_int, check_number, is_integer_tensor

SCHEDULES = ("linear", "cosine")


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def _time(t: torch.Tensor | float, lo_open: bool = False) -> torch.Tensor | float:
    """``t`` as it is when a floating-point tensor (its values are not read: no host sync), else as a float in
    ``[0, 1]`` (``(0, 1]`` with ``lo_open``): ``TypeError`` for a non-number, ``ValueError`` for one out of range or
    a tensor of another dtype (a bool or integer ``t`` is a mistake: times are fractions)."""
    if isinstance(t, torch.Tensor):
        if not t.is_floating_point():
            raise ValueError(f"t must be a floating-point tensor of times in [0, 1], got {t.dtype}")
        return t
    return check_number("t", t, lo=0, hi=1, lo_open=lo_open)


def alpha(t: torch.Tensor | float, schedule: str = "linear") -> torch.Tensor | float:
    """The probability that a token is still unmasked at time ``t`` (a tensor of any shape, values in ``[0, 1]``,
    or a number in ``[0, 1]``), same shape (a float for a number): ``1 - t`` (linear) or ``cos(pi t / 2)``
    (cosine)."""
    _check_schedule(schedule)
    t = _time(t)
    if schedule == "linear":
        return 1.0 - t
    return torch.cos(0.5 * math.pi * t) if isinstance(t, torch.Tensor) else math.cos(0.5 * math.pi * t)


def loss_weight(t: torch.Tensor | float, schedule: str = "linear") -> torch.Tensor | float:
    """The ELBO weight ``w(t) = -alpha'(t) / (1 - alpha(t))`` of the masked cross-entropy at time ``t`` in
    ``(0, 1]`` (a tensor of any shape, or a number), same shape (a float for a number): ``1 / t`` (linear),
    ``(pi/2) sin(pi t/2) / (1 - cos(pi t/2))`` (cosine), computed as ``(pi/2) / tan(pi t/4)``, the same by the
    half-angle identity: ``1 - cos`` cancels to 0 in float32 below ``t`` = 1.5e-4 (an infinite weight) and loses
    digits above it (7% off at 3e-4)."""
    _check_schedule(schedule)
    t = _time(t, lo_open=True)
    if schedule == "linear":
        return 1.0 / t
    if not isinstance(t, torch.Tensor):
        return 0.5 * math.pi / math.tan(0.25 * math.pi * t)
    return 0.5 * math.pi / torch.tan(0.25 * math.pi * t)


def mask_tokens(ids: torch.Tensor, t: torch.Tensor, mask_id: int, schedule: str = "linear",
                generator: torch.Generator | None = None, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward process: ``ids`` ``(B, L)`` long, ``t`` broadcastable to ``(B, L)`` (one time per row, per block
    or per token). Each token becomes ``mask_id`` with probability ``1 - alpha(t)``: where a uniform number, drawn
    from ``generator`` or given as ``noise`` ``(B, L)`` in ``[0, 1)``, is at least ``alpha(t)``.

    ``t`` may also be one number in ``[0, 1]`` for every token. Returns ``(x_t (B, L) long, masked (B, L) bool)``.

    Raises:
        TypeError: ``ids`` is not a tensor, ``t`` neither a tensor nor a number, ``noise`` neither a tensor nor
            None, ``mask_id`` not an integer, ``generator`` not a ``torch.Generator`` or None.
        ValueError: ``ids`` not a ``(B, L)`` integer tensor, a tensor ``t`` that is not floating-point or does not
            broadcast to ``(B, L)``, a number ``t`` outside ``[0, 1]``, an unknown ``schedule``, a ``mask_id < 0``
            or one that ``ids``' dtype cannot hold (256 in uint8), or a ``noise`` of another shape or not
            floating-point."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a (B, L) integer tensor, got {type(ids).__name__}")
    if ids.ndim != 2 or not is_integer_tensor(ids):
        raise ValueError(f"ids must be a (B, L) integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    mask_id = check_fits("mask_id", check_int("mask_id", mask_id, lo=0), "ids", ids)
    check_generator(generator)
    keep = alpha(t, schedule)
    keep = keep if isinstance(keep, torch.Tensor) else torch.tensor(keep, device=ids.device)
    try:
        fits = torch.broadcast_shapes(keep.shape, ids.shape) == ids.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"t must broadcast to ids' shape {tuple(ids.shape)} (one time per row is (B, 1)), got "
                         f"{tuple(keep.shape)}")
    keep = keep.expand(ids.shape)  # (B, L)
    if noise is None:
        noise = torch.rand(ids.shape, generator=generator, device=ids.device, dtype=torch.float32)  # (B, L)
    elif not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a tensor or None, got {type(noise).__name__}")
    elif noise.shape != ids.shape or not noise.is_floating_point():
        raise ValueError(f"noise must be a float tensor of the shape of ids {tuple(ids.shape)} (uniform numbers in "
                         f"[0, 1)), got {tuple(noise.shape)} {noise.dtype}")
    masked = noise >= keep
    return torch.where(masked, torch.full_like(ids, mask_id), ids), masked


def masked_nll(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor
               ) -> torch.Tensor:
    """The weighted masked cross-entropy of every row: ``sum_i masked_i * weight_i * -log softmax(logits_i)[x_i]``.

    ``logits`` ``(B, L, V)``, ``targets`` ``(B, L)`` long, ``masked`` ``(B, L)`` bool, ``weight`` broadcastable to
    ``(B, L)``. Returns ``(B,)`` (divide by ``L`` for nats per token).

    Raises:
        TypeError: an argument that is not a tensor.
        ValueError: ``logits`` not float ``(B, L, V)``, ``masked`` not ``(B, L)`` bool, or ``targets`` not a
            ``(B, L)`` long tensor in ``[0, V)`` (one host sync).
    """
    for name, a in (("logits", logits), ("targets", targets), ("masked", masked), ("weight", weight)):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(a).__name__}")
    if logits.ndim != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float (B, L, V) tensor, got {tuple(logits.shape)} {logits.dtype}")
    B, L, V = logits.shape
    if masked.dtype != torch.bool or masked.shape != (B, L):
        raise ValueError(f"masked must be a ({B}, {L}) bool tensor, got {tuple(masked.shape)} {masked.dtype}")
    check_ids("targets", targets, V, (B, L), allow_empty=True)
    return _masked_nll(logits, targets, masked, weight)


def _masked_nll(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor
                ) -> torch.Tensor:
    """:func:`masked_nll` without the argument checks (the model's passes, whose ids are checked once)."""
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, L)
    # the weights of unmasked tokens are dropped, not multiplied by 0: an infinite one would make inf * 0 = nan,
    # in the value and in the gradient
    return (nll * torch.where(masked, weight, 0.0)).sum(dim=1)  # (B,)


def unmask_probability(t: torch.Tensor, s: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """Probability that a token masked at time ``t`` is unmasked by time ``s <= t``:
    ``(alpha(s) - alpha(t)) / (1 - alpha(t))``, and 1 when ``s = 0`` (even at ``t = 0``, where the ratio is 0/0).
    ``t``, ``s``: tensors of shapes that broadcast (their values are not checked), or numbers in ``[0, 1]`` (taken
    as float64 tensors). Returns a tensor of the broadcast shape."""
    t, s = (x if isinstance(x, torch.Tensor) else torch.tensor(_time(x), dtype=torch.float64) for x in (t, s))
    a_t, a_s = alpha(t, schedule), alpha(s, schedule)
    p = ((a_s - a_t) / (1.0 - a_t)).clamp(0.0, 1.0)
    return torch.where(s == 0, torch.ones_like(p), p)  # at s = 0 the ratio is exactly 1 wherever it is defined


def denoise_step(x: torch.Tensor, proposal: torch.Tensor, t: float, s: float, mask_id: int,
                 schedule: str = "linear", generator: torch.Generator | None = None,
                 u: torch.Tensor | None = None) -> torch.Tensor:
    """One reverse step from time ``t`` to ``s < t``: each masked token of ``x`` ``(B, L)`` independently takes its
    ``proposal`` ``(B, L)`` (the model's sampled tokens) when its uniform draw ``u`` ``(B, L)`` (default: drawn
    from ``generator``) is below :func:`unmask_probability` ``(t, s)``; unmasked tokens never change. Returns the
    new ``(B, L)`` long.

    Raises:
        TypeError: ``x``, ``proposal`` or ``u`` not a tensor, ``t`` or ``s`` not a number, ``mask_id`` not an int.
        ValueError: ``x`` not an integer ``(B, L)`` tensor, a ``mask_id`` its dtype cannot hold (256 in uint8),
            ``proposal`` or ``u`` of another shape, an unknown ``schedule``, or times not ``0 <= s < t <= 1`` (a
            step that reveals nothing, or goes backwards).
    """
    _check_schedule(schedule)
    t = check_number("t", t, lo=0, hi=1)
    s = check_number("s", s, lo=0, hi=1)
    if not s < t:
        raise ValueError(f"s must be < t (a reverse step goes from time t down to s), got t={t}, s={s}")
    check_generator(generator)
    check_int("mask_id", mask_id)
    for name, a in (("x", x), ("proposal", proposal), ("u", u)):
        if not isinstance(a, torch.Tensor) and not (name == "u" and a is None):  # only u may be None
            raise TypeError(f"{name} must be a tensor, got {type(a).__name__}")
    if x.ndim != 2 or not is_integer_tensor(x):
        raise ValueError(f"x must be an integer (B, L) tensor, got {tuple(x.shape)} {x.dtype}")
    check_fits("mask_id", mask_id, "x", x)
    for name, a in (("proposal", proposal), ("u", u)):
        if a is not None and a.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(a.shape)}")
    p = unmask_probability(torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64), schedule)
    if u is None:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)  # (B, L)
    reveal = (x == mask_id) & (u < p.to(x.device))
    return torch.where(reveal, proposal, x)


def block_spans(length: int, block_size: int) -> list[tuple[int, int]]:
    """The blocks ``[(start, end), ...]`` that cover ``0 .. length-1`` left to right (``block_size`` divides
    ``length``).

    Raises:
        TypeError: ``length`` or ``block_size`` not an integer.
        ValueError: either below 1, or a ``block_size`` that does not divide ``length``.
    """
    length, block_size = check_int("length", length, lo=1), check_int("block_size", block_size, lo=1)
    if length % block_size:
        raise ValueError(f"block_size ({block_size}) must be a positive divisor of length ({length})")
    return [(s, s + block_size) for s in range(0, length, block_size)]


def block_attention_mask(length: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``(2L, 2L)`` attention mask (True: may attend) over ``[x_t, x_0]`` (the noisy copy, then the clean one),
    as block diffusion trains: a noisy token sees the noisy tokens of its block and the clean tokens of earlier
    blocks; a clean token sees the clean tokens of its block and of earlier blocks (never a noisy one).
    ``TypeError`` / ``ValueError`` for a ``length`` or ``block_size`` that is not an integer ``>= 1``."""
    length, block_size = check_int("length", length, lo=1), check_int("block_size", block_size, lo=1)
    blk = torch.arange(length, device=device) // block_size  # (L,)
    same = blk[:, None] == blk[None, :]  # (L, L)
    earlier = blk[:, None] > blk[None, :]  # (L, L): key block before query block
    top = torch.cat([same, earlier], dim=1)  # (L, 2L) noisy queries
    bottom = torch.cat([torch.zeros_like(same), same | earlier], dim=1)  # (L, 2L) clean queries
    return torch.cat([top, bottom], dim=0)  # (2L, 2L)


def block_schedule(length: int, block_size: int, steps: int) -> list[tuple[int, int, float, float]]:
    """The passes of block-wise generation, in order: ``(start, end, t, s)`` = denoise positions ``start .. end-1``
    from time ``t`` to ``s``. The blocks of :func:`block_spans` go left to right, each taking ``steps // n_blocks``
    passes whose times fall evenly from 1 to 0 (:func:`time_grid`), so every block ends fully unmasked;
    ``steps`` must be a multiple of the number of blocks (``TypeError`` / ``ValueError`` otherwise, and as
    :func:`block_spans`)."""
    spans = block_spans(length, block_size)
    steps = check_int("steps", steps, lo=1)
    if steps % len(spans):
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks ({len(spans)} blocks of "
                         f"{block_size}): every block gets steps // n_blocks passes")
    grid = time_grid(steps // len(spans)).tolist()
    return [(start, end, grid[i], grid[i + 1]) for start, end in spans for i in range(len(grid) - 1)]


def time_grid(steps: int) -> torch.Tensor:
    """``steps + 1`` times from 1 down to 0, evenly spaced: step ``k`` goes from ``grid[k]`` to ``grid[k+1]``.
    ``TypeError`` / ``ValueError`` for ``steps`` that is not an integer ``>= 1``."""
    steps = check_int("steps", steps, lo=1)
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
