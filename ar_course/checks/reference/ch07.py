"""Chapter 07 references that the library does not call: the system's pieces as plain functions, small
enough to read in one sitting. (Exercise 7.4's reference is the library's own
:func:`ar_course.utils.generate_in_batches`.)

* :func:`var_pipeline` -- classes -> VAR token pyramid -> tokenizer decoder -> images, in one batch (what
  :func:`ar_course.var.generate_images` does per chunk);
* :func:`guidance_weights` -- the package's one guidance convention, ``(1 + t) cond - t uncond``, per step;
* :func:`choose_backend` -- which attention implementation a device gets: the library's rule
  (:func:`ar_course.kernels.ops.backend_rule`) on a plain set of what can run;
* :func:`generation_accounting` -- forward passes per image and images per second from per-chunk counts;
* :func:`pareto_front` and :func:`fastest_meeting` -- reading a speed/quality table.
"""

from __future__ import annotations

import math
from typing import Collection, Mapping, Sequence

import torch

from ar_course.tokenizers import VQVAE
from ar_course.var.functional import guidance_strength
from ar_course.var.model import VAR, sample_pyramid

GUIDANCE_METHODS = ("var", "ar")


@torch.no_grad()
def var_pipeline(
    model: VAR,
    tokenizer: VQVAE,
    classes: torch.Tensor,
    *,
    cfg: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Images of ``classes`` ``(B,)`` by next-scale prediction: one batched call of
    :func:`~ar_course.var.sample_pyramid` (guidance ``cfg`` = w with VAR's ramp, tokens drawn from
    ``generator``) on the tokenizer's quantizer, then the tokenizer's decoder.

    Returns float32 images ``(B, C, H, W)`` in [0, 1] on the CPU."""
    device = next(model.parameters()).device
    pyramid = sample_pyramid(model, tokenizer.quantizer, classes.to(device), cfg=cfg, generator=generator)
    return tokenizer.decode_from_indices(pyramid).float().cpu()  # (B, C, H, W)


def guidance_weights(w: float, method: str, num_steps: int, ramp: bool = True) -> list[tuple[float, float]]:
    """The coefficients ``(a_cond, a_uncond)`` of each sampling step's logits ``a_cond * cond + a_uncond *
    uncond`` under the system's convention: strength ``t`` gives ``(1 + t, -t)``.

    ``method="ar"`` (raster order, ``num_steps`` tokens): ``t = w`` at every step.
    ``method="var"`` (``num_steps`` scales): VAR's ramp ``t_k = w * k / (S - 1)``
    (``t = w`` throughout when ``ramp=False`` or ``S = 1``), :func:`~ar_course.var.functional.guidance_strength`.

    Returns a list of ``num_steps`` pairs of floats."""
    if method not in GUIDANCE_METHODS:
        raise ValueError(f"method must be one of {GUIDANCE_METHODS}, got {method!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    out = []
    for k in range(num_steps):
        t = guidance_strength(w, k, num_steps, ramp=ramp) if method == "var" else float(w)
        out.append((1.0 + t, -t))
    return out


def choose_backend(device_type: str, available: Collection[str], requested: str = "auto") -> str:
    """The attention implementation for a device: ``"torch"``, ``"triton"`` or ``"numba"``.

    ``available`` holds the kernel families that can run on this device here (``"triton"``, ``"numba"``; on a
    CPU these are the interpreter and the simulator). ``requested="auto"``: on ``"cuda"``, Triton if
    available, else numba, else torch; on any other device torch (the CPU stand-ins are teaching tools, far
    slower than torch). ``"torch"`` is always possible; a forced ``"triton"`` / ``"numba"`` is returned
    when available and raises ``RuntimeError`` when not. Any other request raises ``ValueError``.

    This is the library's own rule (:func:`ar_course.kernels.ops.backend_rule`, which
    :func:`~ar_course.kernels.select_backend` applies to what this machine can run) for attention, on a
    plain set of what can run."""
    from ar_course.kernels.ops import backend_rule  # on use: importing the kernels sets the simulator defaults

    def why_not(backend: str) -> str | None:
        return None if backend == "torch" or backend in available else f"not in available {set(available)}"

    return backend_rule("flash_attention", device_type, why_not, requested)


def generation_accounting(
    chunk_images: Sequence[int],
    chunk_passes: Sequence[int],
    chunk_seconds: Sequence[float],
) -> dict[str, float]:
    """Totals of a generation run in chunks: chunk ``i`` made ``chunk_images[i]`` images together in
    ``chunk_passes[i]`` forward passes (a batched pass counts once for the whole chunk) and
    ``chunk_seconds[i]`` seconds.

    Returns ``images`` (total), ``forward_passes`` (total), ``passes_per_image`` (the passes each image
    waited for, averaged over images: ``sum(p_i * n_i) / sum(n_i)``) and ``images_per_second`` (total
    images over total seconds)."""
    if not (len(chunk_images) == len(chunk_passes) == len(chunk_seconds)) or not chunk_images:
        raise ValueError("need the same positive number of chunk_images, chunk_passes and chunk_seconds")
    images = sum(int(n) for n in chunk_images)
    waited = sum(int(p) * int(n) for p, n in zip(chunk_passes, chunk_images))
    seconds = float(sum(chunk_seconds))
    return {
        "images": images,
        "forward_passes": sum(int(p) for p in chunk_passes),
        "passes_per_image": waited / images,
        "images_per_second": images / seconds if seconds > 0 else math.inf,
    }


def _at_least_as_good(a: Mapping, b: Mapping, objectives: Mapping[str, str]) -> tuple[bool, bool]:
    """(a is at least as good as b on every objective, a is strictly better on at least one)."""
    all_ok, any_better = True, False
    for key, sense in objectives.items():
        x, y = (a[key], b[key]) if sense == "max" else (-a[key], -b[key])
        all_ok &= x >= y
        any_better |= x > y
    return all_ok, any_better


def pareto_front(rows: Sequence[Mapping], objectives: Mapping[str, str]) -> list:
    """The rows no other row dominates, in their input order.

    ``objectives`` maps a key of the rows to ``"max"`` (higher is better, e.g. images per second, accuracy)
    or ``"min"`` (lower is better, e.g. passes per image, Frechet distance). Row ``a`` dominates row ``b``
    when it is at least as good on every objective and strictly better on at least one; rows equal on every
    objective do not dominate each other, so both stay."""
    for key, sense in objectives.items():
        if sense not in ("max", "min"):
            raise ValueError(f"objective {key!r} must be 'max' or 'min', got {sense!r}")
    front = []
    for b in rows:
        dominated = False
        for a in rows:
            ok, better = _at_least_as_good(a, b, objectives)
            if ok and better:
                dominated = True
                break
        if not dominated:
            front.append(b)
    return front


def fastest_meeting(
    rows: Sequence[Mapping],
    speed: str,
    quality: str,
    floor: float,
    higher_is_better: bool = True,
) -> Mapping | None:
    """The row with the largest ``speed`` among those whose ``quality`` meets ``floor`` (``>= floor`` when
    ``higher_is_better``, else ``<= floor``); the earliest such row on a tie; ``None`` when no row meets it."""
    best = None
    for row in rows:
        q = row[quality]
        meets = q >= floor if higher_is_better else q <= floor
        if meets and (best is None or row[speed] > best[speed]):
            best = row
    return best
