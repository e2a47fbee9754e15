"""The plain pieces of masked generation (MaskGIT) and of the next-neighbour order; the chapter 08 exercises are
checked against them.

* :func:`mask_ratio`: the schedule ``gamma(r)``, the fraction of tokens still masked at progress ``r`` in [0, 1]
  (cosine by default, linear and square as options); training draws ``r`` uniformly, decoding walks it.
* :func:`random_mask`: which positions a training example hides (``ceil(gamma(r) * N)`` of them, at least one).
* :func:`masked_cross_entropy`: the loss, on the masked positions only (:func:`masked_cross_entropy_unchecked`
  is the same without re-reading the targets' range, for a caller that has checked them).
* :func:`masked_after`: how many tokens stay masked after each of ``K`` decoding steps (ends at 0, one fewer at
  least per step, so ``K`` steps reveal everything).
* :func:`confidence_step`: one MaskGIT decoding step: sample every masked token, score each sample by its
  log-probability plus annealed Gumbel noise, keep the most confident, re-mask the rest.
* :func:`neighbour_steps`: the next-neighbour (NAR) order as boolean masks, one anti-diagonal per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ar_course.raster import orders
from ar_course.sampling import check_generator
from ar_course.utils import check_ids, check_int, check_number, is_integer_tensor

SCHEDULES = ("cosine", "linear", "square")


def _check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return schedule


def mask_ratio(r: torch.Tensor | float, schedule: str = "cosine") -> torch.Tensor:
    """``gamma(r)``: the fraction of tokens masked at progress ``r`` (any shape, values in [0, 1]).

    ``"cosine"``: ``cos(pi r / 2)`` (MaskGIT's choice: few tokens revealed early, many late); ``"linear"``:
    ``1 - r``; ``"square"``: ``1 - r^2``. Every schedule falls from ``gamma(0) = 1`` (all masked) to
    ``gamma(1) = 0``. Returns a float tensor of ``r``'s shape."""
    _check_schedule(schedule)
    r = torch.as_tensor(r, dtype=torch.float32)
    if r.numel() and (not torch.isfinite(r).all() or r.min() < 0 or r.max() > 1):
        raise ValueError("r must lie in [0, 1]")
    return _gamma(r, schedule)


def _gamma(r: torch.Tensor, schedule: str) -> torch.Tensor:
    """:func:`mask_ratio` on checked ``r``, in ``r``'s dtype."""
    if schedule == "cosine":
        return torch.cos(0.5 * math.pi * r).clamp(0.0, 1.0)  # cos(pi/2) is 6e-17, not 0: clamp keeps it in range
    if schedule == "linear":
        return 1.0 - r
    return 1.0 - r * r


def random_mask(batch: int, n: int, schedule: str = "cosine", generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Training masks ``(batch, n)`` bool (``True`` = masked): per row, ``r ~ U(0, 1)`` and
    ``ceil(gamma(r) * n)`` positions (at least 1) chosen uniformly at random (:func:`training_mask`). Random
    numbers are drawn on the CPU from ``generator`` (``batch`` for ``r``, then ``batch * n`` for the positions)
    and moved to ``device``."""
    batch, n = check_int("batch", batch, lo=1), check_int("n", n, lo=1)
    check_generator(generator)
    r = torch.rand(batch, generator=generator, dtype=torch.float32)  # (B,)
    return training_mask(r, n, schedule, generator).to(device)  # (B, N)


def training_mask(r: torch.Tensor, n: int, schedule: str = "cosine", generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Training masks ``(B, n)`` bool (``True`` = hidden) for the progresses ``r`` ``(B,)``: row ``b`` hides
    ``ceil(gamma(r_b) * n)`` positions, at least one, chosen uniformly at random (one uniform score per position
    from ``generator``, drawn on the CPU; a row hides its ``count`` lowest scores), on ``r``'s device.

    Raises:
        TypeError: ``r`` is not a tensor (one progress ``p`` is ``torch.tensor([p])``), or ``n`` not an integer.
        ValueError: ``r`` not ``(B,)`` or outside [0, 1], ``n < 1``, or an unknown ``schedule``.
    """
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"r must be a (B,) tensor of progresses in [0, 1], got {type(r).__name__}")
    if r.ndim != 1:
        raise ValueError(f"r must be a (B,) tensor of progresses in [0, 1], got shape {tuple(r.shape)}")
    n = check_int("n", n, lo=1)
    check_generator(generator)
    count = torch.ceil(mask_ratio(r.cpu(), schedule) * n).long().clamp(1, n)  # (B,)
    scores = torch.rand(r.shape[0], n, generator=generator, dtype=torch.float32)  # (B, n)
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, n): the rank of each position's score in its row
    return (rank < count[:, None]).to(r.device)  # (B, n)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) over the masked positions only.

    ``logits`` ``(B, N, V)`` float, ``targets`` ``(B, N)`` long in ``[0, V)``, ``mask`` ``(B, N)`` bool (``True`` =
    masked, the positions the model must predict). Visible positions contribute nothing (predicting a token the
    model can see is trivial). Returns a 0-d tensor.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: shapes that do not fit, ``logits`` not float, ``mask`` not bool, ``targets`` not long or
            outside ``[0, V)`` (one host sync), or nothing masked.
    """
    if not all(isinstance(a, torch.Tensor) for a in (logits, targets, mask)):
        raise TypeError("logits, targets and mask must be tensors")
    if logits.ndim != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(f"need logits (B, N, V), targets (B, N), mask (B, N); got {tuple(logits.shape)}, "
                         f"{tuple(targets.shape)}, {tuple(mask.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be float, got {logits.dtype}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    check_ids("targets", targets, logits.shape[-1], tuple(targets.shape), allow_empty=True)
    return masked_cross_entropy_unchecked(logits, targets, mask)


def masked_cross_entropy_unchecked(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`masked_cross_entropy` for a caller that has already validated its arguments (one host sync fewer:
    the targets' range is not read again). Still raises ValueError when ``mask`` masks nothing."""
    if not mask.any():
        raise ValueError("mask has no masked position: the loss is undefined")
    return F.cross_entropy(logits[mask], targets[mask])  # (M, V) vs (M,)


def masked_after(steps: int, n: int, schedule: str = "cosine") -> list[int]:
    """Tokens still masked after each of ``steps`` decoding steps over ``n`` tokens: a list of ``steps`` ints.

    Step ``t`` (0-based) leaves ``floor(n * gamma((t + 1) / steps))`` masked, but at least one fewer than before
    (every step reveals at least one token) and at least ``steps - 1 - t`` (one for each step still to come),
    and 0 after the last step. ``1 <= steps <= n``. Where ``n * gamma`` is a whole number (``64 cos(pi / 3)``
    is 32) the floor is that number, not one below it as rounding error would make it."""
    n = check_int("n", n, lo=1)
    steps = check_int("steps", steps, lo=1, hi=n)
    _check_schedule(schedule)
    gammas = _gamma(torch.arange(1, steps + 1, dtype=torch.float64) / steps, schedule).tolist()  # K floats
    out, left = [], n
    for t in range(steps):  # float64 puts n * gamma within ~1e-16 n of its value: 1e-9 lifts 31.999...9 to 32
        target = 0 if t == steps - 1 else math.floor(n * gammas[t] + 1e-9)
        left = min(target, left - 1)  # reveal at least one; the budget keeps every later step one to reveal
        left = max(left, steps - 1 - t)
        out.append(left)
    return out


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` of ``shape``, ``u`` uniform drawn from ``generator`` on ``device``."""
    check_generator(generator)
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32).clamp(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def confidence_step(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    log_probs: torch.Tensor,
    sampled: torch.Tensor,
    n_masked: int,
    noise: torch.Tensor | None = None,
    noise_scale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MaskGIT decoding step: keep the most confident sampled tokens, re-mask the rest.

    Args:
        tokens: ``(B, N)`` long, the current tokens (values at masked positions are ignored).
        mask: ``(B, N)`` bool, ``True`` where still masked.
        log_probs: ``(B, N, V)`` log-probabilities the model gives every position.
        sampled: ``(B, N)`` long, a token sampled for every position.
        n_masked: how many positions stay masked after this step, in every row (an int, ``>= 0`` and at most the
            masked count of every row; MaskGIT takes fewer, so that every step reveals a token).
        noise: ``(B, N)`` Gumbel noise (None: no noise); ``noise_scale``: its weight, annealed to 0 by the caller.

    Confidence of a masked position = ``log_probs`` of its sampled token ``+ noise_scale * noise``; known
    positions have confidence ``+inf``, so they are never re-masked. The ``n_masked`` least confident positions
    of each row are masked again; every other masked position takes its sampled token.

    Returns ``(tokens (B, N), mask (B, N))``, new tensors: ``tokens`` holds the sampled token at every position
    revealed now and the input's value everywhere else (the known tokens, and ``[MASK]`` where still masked).

    Raises:
        TypeError: an argument that is not a tensor, ``n_masked`` not an integer or ``noise_scale`` not a number.
        ValueError: shapes that do not fit, ``tokens`` not integer, ``mask`` not bool, ``log_probs`` not float,
            ``sampled`` not long or outside ``[0, V)``, ``noise_scale < 0``, or ``n_masked`` outside ``[0, fewest
            masked positions of a row]`` (a larger one would re-mask known tokens). The values are read in one host
            sync.
    """
    _check_step(tokens, mask, log_probs, sampled, n_masked, noise, noise_scale)
    conf = log_probs.gather(-1, sampled[..., None])[..., 0]  # (B, N)
    if noise is not None and noise_scale > 0:
        conf = conf + noise_scale * noise
    conf = conf.masked_fill(~mask, float("inf"))  # known tokens stay known
    lowest = conf.topk(n_masked, dim=-1, largest=False).indices  # (B, n_masked)
    new_mask = torch.zeros_like(mask).scatter_(1, lowest, True)  # (B, N)
    return torch.where(mask & ~new_mask, sampled, tokens), new_mask  # (B, N), (B, N)


def _check_step(tokens: torch.Tensor, mask: torch.Tensor, log_probs: torch.Tensor, sampled: torch.Tensor,
                n_masked: int, noise: torch.Tensor | None, noise_scale: float) -> None:
    """The checks :func:`confidence_step` documents: shapes and dtypes first, then the values (the fewest masked
    positions of a row, the range of ``sampled``) in one host sync."""
    named = {"tokens": tokens, "mask": mask, "log_probs": log_probs, "sampled": sampled}
    if noise is not None:
        named["noise"] = noise
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    n_masked = check_int("n_masked", n_masked, lo=0)
    check_number("noise_scale", noise_scale, lo=0)
    if log_probs.ndim != 3 or not log_probs.is_floating_point():
        raise ValueError(f"log_probs must be a float (B, N, V) tensor, got {tuple(log_probs.shape)} {log_probs.dtype}")
    B, N, V = log_probs.shape
    for name, x in named.items():
        if name != "log_probs" and x.shape != (B, N):
            raise ValueError(f"{name} must be ({B}, {N}) like log_probs (B, N, V), got {tuple(x.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    if not is_integer_tensor(tokens):
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if sampled.dtype != torch.long:
        raise ValueError(f"sampled must be a long tensor, got {sampled.dtype}")
    if B * N:
        fewest, out_of_range = torch.stack([mask.sum(-1).min(), ((sampled < 0) | (sampled >= V)).sum()]).tolist()
    else:  # no rows (at most N may stay masked), or rows of no position
        fewest, out_of_range = (N if B == 0 else 0), 0
    if n_masked > fewest:
        raise ValueError(f"n_masked must be an integer in [0, {fewest}] (the fewest masked positions of a row: more "
                         f"would re-mask known tokens), got {n_masked}")
    if out_of_range:
        check_ids("sampled", sampled, V, (B, N))  # names the first id out of range


def neighbour_steps(h: int, w: int) -> list[torch.Tensor]:
    """The next-neighbour (NAR) order over an ``h x w`` map as ``h + w - 1`` bool maps ``(h * w,)`` in raster
    order: step ``k`` generates the anti-diagonal ``i + j = k``, whose upper and left neighbours are all known
    (the schedule of :func:`ar_course.raster.orders.schedule` ``("neighbour")``)."""
    out = []
    for positions in orders.schedule("neighbour", h, w):  # each (k, 2) of (row, col)
        step = torch.zeros(h * w, dtype=torch.bool)
        step[positions[:, 0] * w + positions[:, 1]] = True
        out.append(step)
    return out


def annealed_noise_scale(noise: float, step: int, steps: int) -> float:
    """The Gumbel-noise weight at decoding step ``step`` of ``steps``: ``noise * (1 - (step + 1) / steps)``
    (MaskGIT's annealing: strong exploration early, none at the last step)."""
    noise = check_number("noise", noise, lo=0)
    return noise * (1.0 - (step + 1) / steps)
