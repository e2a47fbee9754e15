"""Plain functions of raster-order generation that :mod:`.model` (and VAR's training) call; chapter 03's
training-loss exercise is checked against their composition (``ar_course.checks.reference.ch03``).

* :func:`to_raster` / :func:`from_raster` -- a token map ``(B, h, w)`` as a sequence ``(B, h*w)`` and back.
* :func:`make_training_pairs` -- next-token inputs and targets when the class embedding fills position 0.
* :func:`condition_dropout` -- replace a random fraction of the classes by the null class.
"""

from __future__ import annotations

import torch

from ar_course.sampling import check_generator
from ar_course.utils import check_ids, check_int, check_number


def _check_long(x: torch.Tensor, ndim: int, name: str, shape: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != ndim or x.dtype != torch.long:
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a long tensor of shape {shape}, got {got}")


def to_raster(token_map: torch.Tensor) -> torch.Tensor:
    """Flatten a token map ``(B, h, w)`` into raster order ``(B, h*w)``: row 0 left to right, then row 1...

    Token ``(i, j)`` lands at position ``i * w + j``."""
    _check_long(token_map, 3, "token_map", "(B, h, w)")
    B, h, w = token_map.shape
    return token_map.reshape(B, h * w)  # (B, h*w)


def from_raster(seq: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_raster`: a raster sequence ``(B, h*w)`` back to a token map ``(B, h, w)``."""
    _check_long(seq, 2, "seq", "(B, h*w)")
    if seq.shape[1] != h * w:
        raise ValueError(f"a {h}x{w} map has {h * w} tokens, the sequence has {seq.shape[1]}")
    return seq.reshape(seq.shape[0], h, w)  # (B, h, w)


def make_training_pairs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token inputs and targets of raster sequences ``tokens`` ``(B, L)`` for a class-conditional GPT.

    The GPT's class embedding fills position 0 of every sequence, so the model reads ``1 + (L - 1)`` positions
    and predicts one token at each: ``inputs`` ``(B, L - 1)`` are ``tokens[:, :-1]`` (the last token is never
    read) and ``targets`` ``(B, L)`` are all of ``tokens`` (the class predicts the first one). Pass them as
    ``model(inputs, targets=targets, classes=classes)``."""
    _check_long(tokens, 2, "tokens", "(B, L)")
    if tokens.shape[1] == 0:
        raise ValueError("tokens has no positions: a sequence needs at least one token to predict")
    return tokens[:, :-1], tokens  # (B, L - 1), (B, L)


def condition_dropout(
    classes: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each class by ``null_class`` with probability ``p`` (training for classifier-free guidance).

    One uniform number per example, ``torch.rand(B, generator=generator)``, drawn on the CPU; example ``b``
    is dropped when its number is ``< p``. Returns a new ``(B,)`` long tensor; ``classes`` is unchanged.
    Checking the classes costs one host sync on CUDA.

    Raises:
        TypeError: ``classes`` is not a tensor, ``p`` not a number, ``null_class`` not an integer.
        ValueError: ``classes`` not a non-empty ``(B,)`` long tensor in ``[0, null_class]``, ``p`` outside
            ``[0, 1]``, or ``null_class < 0``.
    """
    null_class = check_int("null_class", null_class, lo=0)
    check_ids("classes", classes, null_class + 1, ("B",))
    p = check_number("p", p, 0, 1)
    check_generator(generator)
    drop = torch.rand(classes.shape[0], generator=generator, dtype=torch.float32) < p  # (B,)
    return torch.where(drop.to(classes.device), torch.full_like(classes, null_class), classes)
