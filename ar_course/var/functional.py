"""Plain reference functions of next-scale prediction (VAR); chapter 04's exercises are checked against them.

A token pyramid is a list of ``S`` index maps ``(B, s_k, s_k)``, coarse to fine. VAR reads it as one
sequence of ``L = sum_k s_k^2`` tokens, scale by scale and row-major inside a scale. Position ``p`` of the
*input* sequence predicts token ``p`` of the *target* sequence: the inputs of scale ``k`` are the start token
(``k = 0``) or the tokenizer's cumulative feature map after scale ``k - 1`` area-downsampled to side ``s_k``,
so the whole of scale ``k`` is predicted in one forward pass.

* :func:`scale_bounds`, :func:`level_ids`, :func:`block_causal_mask` -- the sequence layout;
  :func:`flatten_pyramids`, :func:`unflatten_pyramids` -- a pyramid as one ``(B, L)`` row per image and back.
* :func:`embed_levels_positions` -- add level (scale) and position embeddings.
* :func:`scale_step`, :func:`teacher_forcing_sequence` -- the canvas update and the training inputs.
* :func:`var_loss` -- cross-entropy over all tokens, and per scale.
* :func:`guidance_strength` -- VAR's linear ramp of the guidance strength over the scales (the mix itself is
  :func:`ar_course.sampling.cfg_mix`).
* :func:`scale_masks` -- a known-region mask at every scale (zero-shot inpainting).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ar_course.tokenizers import VQVAE, MultiScaleVQ
from ar_course.tokenizers import functional as Fq
from ar_course.utils import at_least_float32, check_bool, check_ids, check_int, check_number


def _check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """``scales`` as a tuple of ints (``TypeError`` for a side that is not an integer, e.g. ``2.5``)."""
    if isinstance(scales, (str, bytes)) or not hasattr(scales, "__iter__"):
        raise TypeError(f"scales must be a sequence of integer sides, got {scales!r}")
    scales = tuple(check_int(f"scales[{i}]", s) for i, s in enumerate(scales))
    if not scales or any(s < 1 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of sides >= 1, got {scales}")
    return scales


def scale_bounds(scales: Sequence[int]) -> list[tuple[int, int]]:
    """``[(begin_k, end_k)]``: scale ``k`` occupies sequence positions ``begin_k .. end_k - 1``."""
    bounds, begin = [], 0
    for s in _check_scales(scales):
        bounds.append((begin, begin + s * s))
        begin += s * s
    return bounds


def check_vq(vq: MultiScaleVQ) -> MultiScaleVQ:
    """``vq`` if it is a :class:`MultiScaleVQ`; else ``TypeError`` (with a hint for a whole :class:`VQVAE`:
    pass its ``.quantizer``). No values read."""
    if not isinstance(vq, MultiScaleVQ):
        hint = " (pass tokenizer.quantizer)" if isinstance(vq, VQVAE) else ""
        raise TypeError(f"vq must be a MultiScaleVQ, got {type(vq).__name__}{hint}")
    return vq


def flatten_pyramids(pyramids: list[torch.Tensor]) -> torch.Tensor:
    """``(N, L)`` long: the pyramids' tokens scale by scale (so a batch can be drawn with one index).

    ``pyramids``: one ``(N, s_k, s_k)`` map per scale.

    Raises:
        TypeError: ``pyramids`` is not a list of tensors.
        ValueError: it is empty.
    """
    if not isinstance(pyramids, (list, tuple)):
        raise TypeError(f"pyramids must be a list of (N, s, s) maps, one per scale, got {type(pyramids).__name__}")
    if not pyramids:
        raise ValueError("pyramids must hold at least one (N, s, s) map, got an empty list")
    for k, p in enumerate(pyramids):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"pyramids[{k}] must be a (N, s, s) tensor, got {type(p).__name__}")
    return torch.cat([p.flatten(1) for p in pyramids], dim=1)  # (N, L)


def unflatten_pyramids(tokens: torch.Tensor, scales: tuple[int, ...]) -> list[torch.Tensor]:
    """Inverse of :func:`flatten_pyramids`: ``(B, L)`` -> one ``(B, s_k, s_k)`` map per scale.

    Raises:
        TypeError: ``tokens`` is not a tensor, or a scale not an integer.
        ValueError: ``tokens`` not ``(B, L)`` with exactly ``L = sum_k s_k^2`` tokens per row.
    """
    scales = _check_scales(scales)
    L = sum(s * s for s in scales)
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a (B, {L}) tensor for scales {scales}, got {type(tokens).__name__}")
    if tokens.ndim != 2 or tokens.shape[1] != L:
        raise ValueError(f"tokens must be (B, {L}) for scales {scales} (sum of s^2), got {tuple(tokens.shape)}")
    out, begin = [], 0
    for s in scales:
        out.append(tokens[:, begin:begin + s * s].reshape(-1, s, s))  # (B, s, s)
        begin += s * s
    return out


def level_ids(scales: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """The scale index of every sequence position: ``(L,)`` long, e.g. ``[0, 1, 1, 1, 1, 2, ...]``.

    The scale of position ``p`` is how many later scales begin at or before ``p``; built from comparisons on
    the device, with no host-to-device copy or host sync, so a CUDA graph can capture it."""
    bounds = scale_bounds(scales)
    positions = torch.arange(bounds[-1][1], device=device)  # (L,)
    levels = torch.zeros_like(positions)
    for begin, _ in bounds[1:]:
        levels += positions >= begin
    return levels  # (L,)


def block_causal_mask(scales: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """VAR's attention mask ``(L, L)`` bool, ``True`` = may attend.

    A query of scale ``i`` sees every key of scales ``<= i`` (its own scale in both directions) and
    nothing of later scales."""
    lvl = level_ids(scales, device)  # (L,)
    return lvl[:, None] >= lvl[None, :]  # (L, L)


def embed_levels_positions(
    x: torch.Tensor, level_table: torch.Tensor, pos_table: torch.Tensor, scales: Sequence[int], start: int = 0,
) -> torch.Tensor:
    """``x + level_table[level of each position] + pos_table[position]`` for positions ``start .. start+T-1``.

    ``x``: ``(B, T, C)``; ``level_table``: ``(S, C)``, one row per scale; ``pos_table``: ``(L, C)``, one row per
    sequence position. Returns ``(B, T, C)``. ``start`` lets a generation step embed one scale of a longer
    sequence.

    Raises ``TypeError`` when ``x``, ``level_table`` or ``pos_table`` is not a torch.Tensor, ``ValueError`` for
    shapes that do not fit."""
    for name, t in (("x", x), ("level_table", level_table), ("pos_table", pos_table)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.ndim != 3:
        raise ValueError(f"x must be (B, T, C), got {tuple(x.shape)}")
    lvl = level_ids(scales, x.device)  # (L,)
    T = x.shape[1]
    if not 0 <= start <= start + T <= lvl.numel():
        raise ValueError(f"positions {start}..{start + T - 1} do not fit a sequence of {lvl.numel()} tokens")
    if level_table.shape[0] != len(tuple(scales)) or pos_table.shape[0] != lvl.numel():
        raise ValueError(f"need a level table of {len(tuple(scales))} rows and a position table of {lvl.numel()} "
                         f"rows, got {tuple(level_table.shape)} and {tuple(pos_table.shape)}")
    return x + level_table[lvl[start:start + T]] + pos_table[start:start + T]  # (B, T, C)


def scale_step(
    vq: MultiScaleVQ, f_hat: torch.Tensor | None, k: int, tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Add the tokens of scale ``k`` to the canvas and compute what the transformer reads next.

    ``tokens``: ``(B, s_k * s_k)`` long, row-major; ``f_hat``: the canvas ``(B, D, H, H)`` after scales
    ``0 .. k-1`` (``None`` before the first scale). Returns the new canvas ``(B, D, H, H)`` and the input of
    scale ``k + 1``: the new canvas area-downsampled to ``s_{k+1}`` and flattened row-major to
    ``(B, s_{k+1}^2, D)`` (``None`` after the last scale).

    Raises:
        TypeError: ``vq`` is not a :class:`MultiScaleVQ` (a whole VQVAE: pass ``tokenizer.quantizer``), ``k`` not
            an integer, ``tokens`` not a tensor.
        ValueError: ``k`` outside ``[0, S)`` or ``tokens`` not ``(B, s_k^2)``.
    """
    check_vq(vq)
    k = check_int("k", k, 0, len(vq.scales) - 1)
    s = vq.scales[k]
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a (B, {s * s}) long tensor for scale {k}, got {type(tokens).__name__}")
    if tokens.ndim != 2 or tokens.shape[1] != s * s:
        raise ValueError(f"scale {k} needs tokens (B, {s * s}), got {tuple(tokens.shape)}")
    f_hat = vq.accumulate(f_hat, k, tokens.view(tokens.shape[0], s, s))  # (B, D, H, H)
    if k == len(vq.scales) - 1:
        return f_hat, None
    nxt = vq.next_input(f_hat, k)  # (B, D, s', s')
    return f_hat, nxt.flatten(2).transpose(1, 2)  # (B, s'^2, D)


def teacher_forcing_sequence(vq: MultiScaleVQ, indices: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training inputs and targets of a token pyramid (one ``(B, s_k, s_k)`` map per scale).

    Returns ``inputs`` ``(B, L - 1, D)``: for ``k = 1 .. S-1`` the canvas after scales ``0 .. k-1``
    area-downsampled to ``s_k``, row-major (the start token, position 0, comes from the class and is not
    here); and ``targets`` ``(B, L)`` long: every scale's tokens, row-major, coarse to fine.

    Raises:
        TypeError: ``vq`` is not a :class:`MultiScaleVQ` (pass ``tokenizer.quantizer``), ``indices`` not a list of
            tensors.
        ValueError: another number of maps than scales, or as :func:`scale_step`.
    """
    check_vq(vq)
    if not isinstance(indices, (list, tuple)):
        raise TypeError(f"indices must be a list of (B, s, s) maps, one per scale, got {type(indices).__name__}")
    if len(indices) != len(vq.scales):
        raise ValueError(f"expected {len(vq.scales)} index maps, got {len(indices)}")
    f_hat, inputs = None, []
    for k, idx in enumerate(indices):
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"indices[{k}] must be a (B, s, s) long tensor, got {type(idx).__name__}")
        f_hat, nxt = scale_step(vq, f_hat, k, idx.flatten(1))
        if nxt is not None:
            inputs.append(nxt)
    B = indices[0].shape[0]
    inputs_t = torch.cat(inputs, dim=1) if inputs else f_hat.new_zeros(B, 0, vq.dim)  # (B, L - 1, D)
    targets = torch.cat([idx.flatten(1) for idx in indices], dim=1)  # (B, L)
    return inputs_t, targets


def var_loss(logits: torch.Tensor, targets: torch.Tensor, scales: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of VAR's predictions.

    ``logits``: ``(B, L, V)``, ``targets``: ``(B, L)`` long. Returns the mean over all ``B * L`` tokens (every
    token counts once, as in VAR's training, so the fine scales dominate) and the mean per scale ``(S,)``, in
    float32 at least (float64 logits keep their precision). Checking the targets costs one host sync on CUDA.

    Raises:
        TypeError: ``logits`` or ``targets`` is not a tensor.
        ValueError: ``logits`` not a float ``(B, L, V)`` tensor for ``L`` tokens of ``scales``, or ``targets``
            not a ``(B, L)`` long tensor of ids in ``[0, V)``.
    """
    bounds = scale_bounds(scales)
    L = bounds[-1][1]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a (B, {L}, V) tensor, got {type(logits).__name__}")
    if logits.ndim != 3 or logits.shape[1] != L or not logits.is_floating_point():
        raise ValueError(f"logits must be a float (B, {L}, V) tensor, got {tuple(logits.shape)} {logits.dtype}")
    check_ids("targets", targets, logits.shape[2], (logits.shape[0], L))
    nll = torch.nn.functional.cross_entropy(at_least_float32(logits.flatten(0, 1)), targets.flatten(),
                                            reduction="none")
    nll = nll.view(targets.shape)  # (B, L)
    per_scale = torch.stack([nll[:, b:e].mean() for b, e in bounds])  # (S,)
    return nll.mean(), per_scale


def guidance_strength(w: float, k: int, num_scales: int, *, ramp: bool = True) -> float:
    """Guidance strength ``t`` at scale ``k`` for the strength ``w`` (the convention of
    :func:`ar_course.sampling.cfg_mix`: logits ``(1 + t) * cond - t * uncond``): ``w * k / (S - 1)`` with VAR's
    linear ramp (no guidance on the first scale, full guidance on the last), else ``w`` at every scale.

    Raises:
        TypeError: ``w`` not a number, ``k`` or ``num_scales`` not an integer, ``ramp`` not a bool.
        ValueError: ``w`` not finite, ``num_scales < 1`` or ``k`` outside ``[0, num_scales)``.
    """
    w = check_number("w", w)
    num_scales = check_int("num_scales", num_scales, lo=1)
    k = check_int("k", k, lo=0, hi=num_scales - 1)
    if not check_bool("ramp", ramp) or num_scales == 1:
        return w
    return w * k / (num_scales - 1)


def scale_masks(mask: torch.Tensor, scales: Sequence[int]) -> list[torch.Tensor]:
    """A known-region mask at every scale from one at the finest scale.

    ``mask``: ``(B, H, H)`` bool, ``True`` = known, ``H = scales[-1]``. A coarse token is known when at least
    half of the finest-scale area it covers is known. Returns one ``(B, s_k, s_k)`` bool map per scale.

    Raises ``TypeError`` when ``mask`` is not a torch.Tensor, ``ValueError`` when it is not ``(B, H, H)`` bool
    (and as ``_check_scales`` for bad ``scales``)."""
    scales = _check_scales(scales)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a (B, {scales[-1]}, {scales[-1]}) bool torch.Tensor, got {type(mask).__name__}")
    if mask.ndim != 3 or mask.dtype != torch.bool or tuple(mask.shape[1:]) != (scales[-1], scales[-1]):
        raise ValueError(f"mask must be (B, {scales[-1]}, {scales[-1]}) bool, got {tuple(mask.shape)} {mask.dtype}")
    m = mask[:, None].float()  # (B, 1, H, H)
    return [(Fq.downsample_area(m, s) >= 0.5)[:, 0] for s in scales]  # (B, s, s) each
