"""A small GPT in the style of nanoGPT's ``model.py``, with the pieces later chapters reuse.

Modules in dependency order: :class:`GPTConfig`, :class:`KVCache`, :class:`RMSNorm`, :class:`Rotary`,
:class:`SelfAttention`, :class:`MLP`, :class:`SwiGLU`, :class:`Block`, :class:`GPT`.

* Attention is a function each :class:`SelfAttention` layer holds (:data:`AttentionFn`): the fused path
  :func:`sdpa_attention` (``F.scaled_dot_product_attention``), the plain path :func:`plain_attention` of
  :mod:`.functional` beside it (``GPTConfig.attn = "plain"``; tests check that they agree), or the chapter 06
  kernels, :class:`KernelAttention`. ``with use_attention(fn):`` overrides it for every layer run in that
  block, in that thread only (the models are not touched).
* Masks are boolean, ``True`` = may attend. A block takes ``causal`` (the usual GPT mask, shifted for the
  tokens already in a KV cache) and/or an explicit ``mask`` (e.g. VAR's block-causal mask); both are
  combined with AND. The kernels get the causal mask as ``"causal"``, never as a matrix.
* :class:`KVCache` is preallocated per layer and indexed by position; ``rollback(n)`` forgets everything
  after position ``n`` (speculative decoding rejects drafted tokens that way).
* ``GPTConfig.causal = False`` turns the causal mask off: a bidirectional encoder over the same blocks (the
  masked models of chapter 08). With a KV cache the new tokens then attend to every cached position and to
  each other, while the cached ones never see the new ones (block-wise decoding); :meth:`GPT.generate`, which
  samples one token after another, needs a causal model.
* Optional class conditioning: a class token is prepended to the sequence; class ``n_classes`` is the null
  class used for classifier-free guidance.
* :class:`Block` optionally takes a conditioning vector for adaptive normalisation (``cond_dim > 0``), the
  way VAR conditions on the class.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from dataclasses import asdict, dataclass, is_dataclass, replace
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ar_course.checkpoint import config_from_dict
from ar_course.sampling import SamplingConfig, cfg_mix, check_cfg, check_generator, check_sampling, sample
from ar_course.transformer import functional as ref
from ar_course.utils import (check_bool, check_grid, check_ids, check_int, check_number, check_same_device,
                              get_device)

ATTENTION_IMPLS = ("sdpa", "plain", "kernels")
CACHE_KINDS = ("dynamic", "static")
"""KV caches a sampling loop can decode with: :class:`KVCache` (lengths are Python ints; the plain path) or
:class:`StaticKVCache` (lengths are device tensors; steps that CUDA graphs can capture)."""


@dataclass
class GPTConfig:
    """Hyper-parameters of :class:`GPT` (and of :class:`Block` when used on its own).

    Checked when made.

    Raises:
        TypeError: a size that is not an integer (``n_head=2.0``), a number that is not a number, or a flag
            (``bias``, ``tie_weights``, ``causal``) that is not a bool.
        ValueError: a size ``< 1`` (``vocab_size``, ``block_size``, ``n_layer``, ``n_head``, ``n_embd``, the
            ``grid`` sides), ``mlp_hidden`` or ``n_classes < 0``, ``n_embd`` not divisible by ``n_head``, a head
            size the rotary embedding cannot split (odd for ``"rope"``, not a multiple of 4 for ``"rope2d"``),
            ``grid`` not a pair, ``dropout`` outside ``[0, 1)``, ``norm_eps`` or ``rope_base <= 0``, an unknown
            ``mlp``, ``pos`` or ``attn``, or ``pos="rope2d"`` without ``grid``.
    """

    vocab_size: int = 128
    block_size: int = 256  # longest sequence, the class token included
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp: str = "swiglu"  # "swiglu" (Llama-style gated) or "gelu" (GPT-2 style)
    mlp_hidden: int = 0  # 0: 4 * n_embd for gelu, about 8/3 * n_embd (multiple of 16) for swiglu
    pos: str = "rope"  # "rope" (1D rotary), "rope2d" (rotary over a token map), "learned", "none"
    grid: tuple[int, int] | None = None  # (rows, cols) of the token map, for pos="rope2d"
    rope_base: float = 10000.0
    n_classes: int = 0  # > 0: a class token starts every sequence; class n_classes is the null class
    dropout: float = 0.0
    bias: bool = False
    norm_eps: float = 1e-6
    tie_weights: bool = True
    attn: str = "sdpa"  # "sdpa" (fused), "plain" (the reference path) or "kernels" (chapter 06 kernels)
    causal: bool = True  # False: bidirectional, every position attends to every other (masked models, ch. 08)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            setattr(self, name, check_int(name, getattr(self, name), lo=1))
        self.mlp_hidden = check_int("mlp_hidden", self.mlp_hidden, lo=0)
        self.n_classes = check_int("n_classes", self.n_classes, lo=0)
        if self.grid is not None:  # JSON gives a list back
            self.grid = check_grid("grid", self.grid)
        self.rope_base = check_number("rope_base", self.rope_base, lo=0, lo_open=True)
        self.dropout = check_number("dropout", self.dropout, lo=0, hi=1, hi_open=True)
        self.norm_eps = check_number("norm_eps", self.norm_eps, lo=0, lo_open=True)
        self.bias, self.tie_weights = check_bool("bias", self.bias), check_bool("tie_weights", self.tie_weights)
        self.causal = check_bool("causal", self.causal)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if self.pos not in ("rope", "rope2d", "learned", "none"):
            raise ValueError(f"pos must be 'rope', 'rope2d', 'learned' or 'none', got {self.pos!r}")
        if self.pos == "rope2d" and self.grid is None:
            raise ValueError("pos='rope2d' needs grid=(rows, cols)")
        split = {"rope": 2, "rope2d": 4}.get(self.pos, 1)
        if self.head_dim % split:
            raise ValueError(f"pos={self.pos!r} needs a head size n_embd / n_head divisible by {split}, got "
                             f"{self.head_dim}")
        if self.attn not in ATTENTION_IMPLS:
            raise ValueError(f"attn must be one of {ATTENTION_IMPLS}, got {self.attn!r}")

    @property
    def head_dim(self) -> int:
        """Channels per attention head, ``n_embd // n_head``."""
        return self.n_embd // self.n_head

    @property
    def n_prefix(self) -> int:
        """Tokens before the first predicted token: 1 (the class token) when class-conditional, else 0."""
        return 1 if self.n_classes > 0 else 0

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Build from a dict (e.g. a checkpoint's JSON config): :func:`~ar_course.checkpoint.config_from_dict`
        (missing keys take their defaults, an unknown key is a ``ValueError``)."""
        return config_from_dict(cls, d)

    def to_dict(self) -> dict:
        """The fields as a plain dict (what a checkpoint stores; :meth:`from_dict` reads it back)."""
        return asdict(self)


def _kv_buffers(n_layer: int, shape: tuple[int, int, int, int], device: torch.device | str | None,
                dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.device]:
    """Zeroed key and value buffers of ``shape`` ``(B, H, max_len, D)``, one of each per layer, and their device
    (every size an integer >= 1: ``TypeError`` / ``ValueError`` naming it otherwise; a device name is read as
    :func:`~ar_course.utils.get_device` reads it: ``ValueError`` for ``"gpu"``, ``RuntimeError`` for ``"cuda"``
    without a GPU; ``ValueError`` before any allocation for buffers larger than the memory of the CPU or GPU
    they would live on, e.g. ``n_layer=10**12``, which would otherwise allocate small buffers for ever)."""
    for name, n in zip(("n_layer", "batch_size", "n_head", "max_len", "head_dim"), (n_layer, *shape)):
        check_int(name, n, lo=1)
    if isinstance(device, str):
        device = get_device(device)
    if isinstance(dtype, torch.dtype):  # else torch.zeros names the bad dtype itself
        _check_kv_memory(2 * n_layer * math.prod(shape) * dtype.itemsize, f"n_layer={n_layer} x {tuple(shape)} "
                         f"{dtype}", torch.device(device or torch.get_default_device()))
    k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
    return k, [torch.zeros_like(b) for b in k], k[0].device


def _check_kv_memory(needed: int, what: str, device: torch.device) -> None:
    """``ValueError`` when a cache of ``needed`` bytes cannot fit in the memory of ``device`` (the machine's RAM
    for the CPU, the GPU's for CUDA; other devices are not checked)."""
    if device.type == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    elif device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = None
    if total is not None and needed > total:
        raise ValueError(f"a KV cache of {what} needs {needed / 2**30:.3g} GiB, more than the {total / 2**30:.3g} "
                         f"GiB of memory of {device}")


class KVCache:
    """Keys and values of every layer, preallocated: ``k[layer]`` is ``(B, H, max_len, D)``.

    ``length`` positions are valid. A forward pass over ``T`` new tokens calls :meth:`append` once per layer
    (writing positions ``length .. length+T-1``) and then :meth:`advance` ``(T)`` once. :meth:`rollback`
    sets ``length`` back; later appends overwrite the forgotten positions. ``model.make_cache(B)`` builds the
    cache a :class:`GPT` takes (:meth:`GPT.forward` checks the layers, heads, head size, dtype and device).

    Raises:
        TypeError: a size that is not an integer (also ``n`` of :meth:`advance`, ``length`` of :meth:`rollback`).
        ValueError: a size ``< 1``; :meth:`append` or :meth:`advance` past ``max_len`` (:meth:`advance` also by
            ``n < 0``); :meth:`rollback` to a length outside ``[0, length]``; a device name that is not one
            (``"gpu"``; read as :func:`~ar_course.utils.get_device` reads it); buffers larger than the memory
            of the CPU or GPU they would live on (checked before allocating: ``n_layer=10**12``).
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.k, self.v, _ = _kv_buffers(n_layer, (batch_size, n_head, max_len, head_dim), device, dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        """Positions the cache can hold."""
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        """Rows (sequences) of the cache."""
        return self.k[0].shape[0]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ``(B, H, T, D)`` at positions ``length .. length+T-1`` of ``layer``.

        Returns the keys and values of positions ``0 .. length+T-1``, each ``(B, H, length+T, D)``."""
        start, T = self.length, k.shape[2]
        if start + T > self.max_len:
            raise ValueError(f"KV cache is full: {start} + {T} new positions > max_len {self.max_len}")
        self.k[layer][:, :, start : start + T] = k
        self.v[layer][:, :, start : start + T] = v
        return self.k[layer][:, :, : start + T], self.v[layer][:, :, : start + T]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions valid (after every layer has appended them): an integer ``>= 0`` with
        ``length + n <= max_len``."""
        if not torch.compiler.is_compiling():  # a size torch.compile traces stays symbolic (check_int would fix it)
            n = check_int("advance n", n, lo=0)
        if self.length + n > self.max_len:
            raise ValueError(f"cannot advance past max_len {self.max_len}: {self.length} + {n} positions")
        self.length += n

    def rollback(self, length: int) -> None:
        """Keep only the first ``length`` positions: an integer with ``0 <= length <= self.length``."""
        self.length = check_int("rollback length", length, lo=0, hi=self.length)

    def reset(self) -> None:
        """Forget every position (``length = 0``); the buffers are kept."""
        self.length = 0


class StaticKVCache:
    """A :class:`KVCache` whose state lives on the device, for steps that never wait for the host (CUDA graphs).

    Keys and values are preallocated like :class:`KVCache`'s (``k[layer]``: ``(B, H, max_len, D)``); the number
    of valid positions is ``pos``, a 0-d long tensor on the same device, never a Python int. :meth:`append`
    writes at positions ``pos .. pos+T-1`` with ``index_copy_`` and returns the whole buffers, so every pass
    has the same shapes; attention then masks the positions past the current length with
    :meth:`visible` (``arange`` compared with ``pos``). :meth:`advance` and :meth:`rollback` change ``pos`` in
    place, so a captured graph that reads it sees the new value at its next replay. Positions past ``pos``
    hold stale values that no query can see.

    Raises:
        TypeError: a size that is not an integer (also ``n`` of :meth:`advance`, a Python ``length`` of
            :meth:`rollback`).
        ValueError: a size ``< 1``; :meth:`advance` by ``n`` outside ``[0, max_len]``; :meth:`rollback` to a
            Python ``length`` outside ``[0, max_len]``. Neither compares with ``pos`` (that would read the device:
            :meth:`GPT.forward` checks that the new positions fit). A device name, and buffers larger than the
            device's memory, as :class:`KVCache`.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.k, self.v, device = _kv_buffers(n_layer, (batch_size, n_head, max_len, head_dim), device, dtype)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.key_positions = torch.arange(max_len, device=device)  # (max_len,)

    @property
    def max_len(self) -> int:
        """Positions the cache can hold."""
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        """Rows (sequences) of the cache."""
        return self.k[0].shape[0]

    @property
    def length(self) -> int:
        """The valid positions as a Python int: a host sync, for argument checks only (never inside a step)."""
        return int(self.pos)

    def positions(self, T: int) -> torch.Tensor:
        """Absolute positions ``pos .. pos+T-1`` of ``T`` new tokens, ``(T,)`` long on the cache's device."""
        return self.pos + self.key_positions[:T]  # (T,)

    def visible(self, positions: torch.Tensor, causal: bool) -> torch.Tensor:
        """Bool ``(T, max_len)``: which cached positions the queries at ``positions`` ``(T,)`` may attend to.

        Every position written so far (``< pos + T`` once the ``T`` new ones are appended) and, when
        ``causal``, none after the query's own position."""
        keys = self.key_positions[None, :]  # (1, max_len)
        if causal:
            return keys <= positions[:, None]  # (T, max_len)
        return (keys < self.pos + positions.shape[0]).expand(positions.shape[0], -1)  # (T, max_len)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ``(B, H, T, D)`` at positions ``pos .. pos+T-1`` of ``layer`` (no bounds check: that
        would need the host; :meth:`advance` callers check). Returns the whole buffers ``(B, H, max_len, D)``."""
        index = self.positions(k.shape[2])  # (T,)
        self.k[layer].index_copy_(2, index, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, index, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions valid, on the device (after every layer has appended them): an integer in
        ``[0, max_len]`` (``pos + n <= max_len`` is not checked here: that would read ``pos`` from the device)."""
        if not torch.compiler.is_compiling():  # a size torch.compile traces stays symbolic (check_int would fix it)
            n = check_int("advance n", n, lo=0, hi=self.max_len)
        self.pos.add_(n)

    def rollback(self, length: int | torch.Tensor) -> None:
        """Keep only the first ``length`` positions: a Python int in ``[0, max_len]`` (``ValueError`` otherwise)
        or a 0-d long tensor on the cache's device (copied, not checked: no host sync)."""
        if isinstance(length, torch.Tensor):
            self.pos.copy_(length)
            return
        self.pos.fill_(check_int("rollback length", length, lo=0, hi=self.max_len))

    def reset(self) -> None:
        """Forget every position (``pos`` set to 0 in place, on the device); the buffers are kept."""
        self.pos.zero_()


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the channel dim; ``affine=False`` for adaptive conditioning.

    ``dim``: an integer ``>= 1``; ``eps``: a finite number ``> 0`` (``TypeError`` / ``ValueError`` when made
    otherwise)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        dim = check_int("dim", dim, lo=1)
        self.eps = check_number("eps", eps, lo=0, lo_open=True)
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., C)`` -> ``(..., C)`` (the plain formula: on CPU it beats ``F.rms_norm``)."""
        return ref.rms_norm(x, self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary-embedding tables for sequence positions ``0 .. max_len-1`` (not saved in checkpoints).

    1D: position ``s`` rotates by ``s``. 2D (``grid=(rows, cols)``): the ``n_prefix`` leading tokens (the
    class token) get angle 0; token ``p = s - n_prefix`` of the map sits at ``(p // cols, p % cols)``.

    ``max_len``: an integer ``>= 1`` (``TypeError`` / ``ValueError: max_len must be an integer >= 1, got -1``
    when made otherwise)."""

    def __init__(
        self, head_dim: int, max_len: int, base: float = 10000.0,
        grid: tuple[int, int] | None = None, n_prefix: int = 0,
    ):
        super().__init__()
        s = torch.arange(check_int("max_len", max_len, lo=1))
        if grid is None:
            cos, sin = ref.rope_angles(s, head_dim, base)
        else:
            p = (s - n_prefix).clamp(min=0)
            cos, sin = ref.rope_2d_angles(p // grid[1], p % grid[1], head_dim, base)
        self.register_buffer("cos", cos, persistent=False)  # (max_len, D/2)
        self.register_buffer("sin", sin, persistent=False)  # (max_len, D/2)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of ``positions`` ``(T,)`` long, each ``(T, D/2)`` (indexed by a tensor: no host sync)."""
        return self.cos[positions], self.sin[positions]


AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", bool, float], torch.Tensor]
"""``attend(q, k, v, mask, causal, dropout_p) -> y``: queries ``(B, H, T, D)`` over keys and values
``(B, H, T_k, D)`` (the queries are the last ``T`` of the ``T_k`` positions); ``mask`` None or bool ``(T, T_k)``
/ ``(B, H, T, T_k)``, ``True`` = may attend; ``causal``: also apply the causal mask (shifted by the ``T_k - T``
cached positions); ``dropout_p`` on the attention weights. Returns ``y`` ``(B, H, T, D)``."""


def _with_causal(mask: torch.Tensor | None, causal: bool, t_q: int, t_k: int, device: torch.device
                 ) -> torch.Tensor | None:
    """``mask`` AND the causal mask of the last ``t_q`` of ``t_k`` positions when ``causal``."""
    if not causal:
        return mask
    cm = ref.causal_mask(t_q, t_k, device=device)  # (T, T_k)
    return cm if mask is None else mask & cm


def _check_attend(q: object, k: object, v: object, mask: object, causal: object, dropout_p: object) -> None:
    """The entry checks of :func:`plain_attention`: types, dtypes and ranks only (no tensor value is read: no host
    sync), and none inside a ``torch.compile`` trace (where the model's own checks already ran)."""
    if torch.compiler.is_compiling():
        return
    for name, x in (("q", q), ("k", k), ("v", v)):
        what = f"{name} must be a floating-point (B, H, T, D) torch.Tensor"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what}, got {type(x).__name__}")
        if not x.is_floating_point() or x.ndim != 4:
            raise ValueError(f"{what}, got shape {tuple(x.shape)} {x.dtype}")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be None or a bool torch.Tensor (True = may attend), got {type(mask).__name__}")
    check_bool("causal", causal)
    check_number("dropout_p", dropout_p, 0, 1)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """:data:`AttentionFn` on torch's fused ``F.scaled_dot_product_attention``. A causal pass without cached
    positions uses its ``is_causal`` flag (no mask built); a causal pass after cached ones builds the shifted
    mask (SDPA's flag assumes the queries start at position 0).

    The fast path: it runs in every layer of every forward pass, so it checks nothing (about 5 us a call, 5% of a
    batch-1 CPU decoding step); :func:`plain_attention` takes the same arguments and names a bad one.
    """
    T, T_k = q.shape[2], k.shape[2]
    if mask is None and (not causal or T == T_k):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    mask = _with_causal(mask, causal, T, T_k, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """:data:`AttentionFn` written out: ``softmax(q k^T / sqrt(D))`` under the mask, dropout on the weights (as
    SDPA does), times ``v``. The reference the fused paths are tested against.

    Raises:
        TypeError: ``q``, ``k`` or ``v`` is not a torch.Tensor, ``mask`` neither None nor a tensor, ``causal``
            not a bool, ``dropout_p`` not a number.
        ValueError: ``q``, ``k`` or ``v`` is not a floating-point 4-D tensor, or ``dropout_p`` lies outside
            ``[0, 1]`` (NaN included). Only types, dtypes and ranks are checked: no tensor value is read.
    """
    _check_attend(q, k, v, mask, causal, dropout_p)
    mask = _with_causal(mask, causal, q.shape[2], k.shape[2], q.device)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T_k)
    return F.dropout(ref.masked_softmax(scores, mask), dropout_p) @ v


@dataclass(frozen=True)
class KernelAttention:
    """:data:`AttentionFn` on the chapter 06 kernel entry points with ``backend`` (``"auto"``, ``"torch"``,
    ``"triton"``, ``"numba"``): split-K decode attention for one new query over the cache (its length a Python
    int: no host sync), else FlashAttention. The causal mask goes as ``"causal"``, which the kernels evaluate
    without reading a mask; only an explicit 2-D mask (VAR's teacher forcing) is read. Dropout and masks per
    batch or head (4-D) take :func:`plain_attention`.

    Raises:
        ValueError: ``backend`` is not one the attention kernels have (checked when made, by
            :func:`ar_course.kernels.ops.backend_rule`; whether it can run here is decided at the first call).
    """

    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.backend != "auto":  # "auto" needs no check and no import (importing the kernels sets their defaults)
            from ar_course.kernels.ops import backend_rule

            for op in ("flash_attention", "decode_attention"):
                backend_rule(op, "cpu", lambda _: None, self.backend)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                 dropout_p: float = 0.0) -> torch.Tensor:
        """Attention as :data:`AttentionFn` says, on the kernels where the rules above allow."""
        if dropout_p > 0 or (mask is not None and mask.ndim != 2):
            return plain_attention(q, k, v, mask, causal, dropout_p)
        from ar_course import kernels  # imported on first use: it picks the simulator/interpreter defaults

        T, T_k = q.shape[2], k.shape[2]
        if T == 1 and mask is None:
            out = kernels.decode_attention(q[:, :, 0], k, v, T_k, backend=self.backend)  # (B, H, D)
            return out[:, :, None]  # (B, H, 1, D)
        if mask is None:
            return kernels.flash_attention(q, k, v, "causal" if causal else None, backend=self.backend)
        return kernels.flash_attention(q, k, v, _with_causal(mask, causal, T, T_k, q.device), backend=self.backend)


def attention_function(impl: str, backend: str = "auto") -> AttentionFn:
    """The :data:`AttentionFn` of ``impl`` (one of :data:`ATTENTION_IMPLS`): :func:`sdpa_attention`,
    :func:`plain_attention`, or :class:`KernelAttention` ``(backend)`` for ``"kernels"``.

    Raises:
        ValueError: an unknown ``impl``, or (with ``"kernels"``) a ``backend`` the attention kernels do not have.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    return {"sdpa": sdpa_attention, "plain": plain_attention}.get(impl) or KernelAttention(backend)


_ATTENTION: contextvars.ContextVar[AttentionFn | None] = contextvars.ContextVar("ar_course_attention", default=None)


@contextlib.contextmanager
def use_attention(attend: AttentionFn) -> Iterator[None]:
    """Inside the block, every :class:`SelfAttention` run in this thread (or task) computes attention with
    ``attend`` instead of its own function; other threads, and the models themselves, are unaffected. An inner
    block overrides an outer one. A ``torch.compile``d model does not see it (the trace cannot read the context
    variable): compiled layers run their own function (:func:`set_attention` changes that).

    Raises:
        TypeError: ``attend`` is not callable (a name such as ``"plain"``: pass ``attention_function("plain")``),
            when the block is entered.
    """
    if not callable(attend):
        hint = f"; for a name use attention_function({attend!r})" if isinstance(attend, str) else ""
        raise TypeError(f"attend must be an attention function (q, k, v, mask, causal, dropout_p) -> y, got "
                        f"{attend!r}{hint}")
    token = _ATTENTION.set(attend)
    try:
        yield
    finally:
        _ATTENTION.reset(token)


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional rotary embedding, masks and a KV cache.

    ``attention`` is the layer's :data:`AttentionFn` (from ``config.attn``; :func:`set_attention` changes it,
    :func:`use_attention` overrides it for a call)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.attention: AttentionFn = attention_function(config.attn)
        self.qkv = nn.Linear(C, 3 * C, bias=config.bias)
        self.proj = nn.Linear(C, C, bias=config.bias)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = True,
        cache: KVCache | StaticKVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """``x``: ``(B, T, C)`` -> ``(B, T, C)``.

        ``rope``: ``(cos, sin)`` of the ``T`` new positions. ``mask``: bool ``(T, T_k)`` or
        ``(B, H, T, T_k)`` with ``T_k`` = cached positions + ``T`` (a :class:`StaticKVCache`: its ``max_len``,
        the mask hiding the positions past its length). ``causal``: also apply the causal mask (offset by what
        the cache holds). ``cache``/``layer``: append this layer's keys and values."""
        q, k, v = self.heads(x, rope)  # 3 x (B, H, T, D)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, H, past+T, D); a StaticKVCache: (B, H, max_len, D)
        if mask is not None:
            ref.check_mask(mask, q.shape[2], k.shape[2])
        # a torch.compile trace cannot read a ContextVar (a graph break in every layer, a recompile per layer):
        # it runs the layer's own function
        attend = self.attention if torch.compiler.is_compiling() else _ATTENTION.get() or self.attention
        # one new token attends to everything before it: the causal mask is all True
        y = attend(q, k, v, mask, causal and q.shape[2] > 1, self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.proj(ref.merge_heads(y))  # (B, T, C)

    def heads(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of ``x`` ``(B, T, C)``, split into heads, each ``(B, H, T, D)``.

        Same layout as :func:`~ar_course.transformer.functional.split_heads` (head ``h`` owns channels
        ``h*D .. (h+1)*D-1``); queries and keys are rotated together, which saves operations at decode time."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, H, D)
        if rope is not None:
            cos, sin = rope[0][:, None, None, :], rope[1][:, None, None, :]  # (T, 1, 1, D/2)
            qk = ref.apply_rope(qkv[:, :, :2], cos, sin)  # (B, T, 2, H, D)
            qkv = torch.cat([qk, qkv[:, :, 2:]], dim=2)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)
        return q, k, v


class MLP(nn.Module):
    """GPT-2 feed-forward: ``Linear -> GELU -> Linear``. ``(..., C) -> (..., C)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden or 4 * config.n_embd
        self.fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., C)`` -> ``(..., C)``."""
        return self.proj(F.gelu(self.fc(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward of Llama: ``proj(silu(gate(x)) * up(x))``. ``(..., C) -> (..., C)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden or 16 * math.ceil(8 * config.n_embd / 3 / 16)
        self.gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., C)`` -> ``(..., C)``."""
        return self.proj(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``+ mlp(norm(.))``.

    With ``cond_dim > 0`` the norms lose their weights and a conditioning vector ``cond`` ``(B, cond_dim)``
    produces a shift, scale and gate per sublayer (adaptive normalisation as in VAR/DiT). The projection
    starts at zero, so a new conditioned block is the identity."""

    def __init__(self, config: GPTConfig, cond_dim: int = 0):
        super().__init__()
        C = config.n_embd
        self.norm1 = RMSNorm(C, config.norm_eps, affine=cond_dim == 0)
        self.attn = SelfAttention(config)
        self.norm2 = RMSNorm(C, config.norm_eps, affine=cond_dim == 0)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)
        self.drop = nn.Dropout(config.dropout)
        self.ada = nn.Linear(cond_dim, 6 * C) if cond_dim else None
        if self.ada is not None:
            nn.init.zeros_(self.ada.weight)
            nn.init.zeros_(self.ada.bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = True,
        cache: KVCache | StaticKVCache | None = None,
        layer: int = 0,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x``: ``(B, T, C)`` -> ``(B, T, C)``; the other arguments as in :meth:`SelfAttention.forward`."""
        attn = lambda h: self.attn(h, rope, mask, causal, cache, layer)  # noqa: E731
        if self.ada is None:
            if cond is not None:
                raise ValueError("this Block was built without cond_dim; it takes no cond")
            x = x + self.drop(attn(self.norm1(x)))
            return x + self.drop(self.mlp(self.norm2(x)))
        if cond is None:
            raise ValueError("this Block was built with cond_dim > 0; pass cond of shape (B, cond_dim)")
        mod = self.ada(F.silu(cond))[:, None, :]  # (B, 1, 6C)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)  # 6 x (B, 1, C)
        x = x + gate1 * self.drop(attn(self.norm1(x) * (1 + scale1) + shift1))
        return x + gate2 * self.drop(self.mlp(self.norm2(x) * (1 + scale2) + shift2))


def check_causal(model: "GPT", what: str) -> None:
    """``ValueError`` unless ``model`` (a :class:`GPT`) is causal: ``what`` (``"serving"``...) predicts each token
    from those before it, which a bidirectional model (``config.causal`` False: MaskGIT, a diffusion LM) does not."""
    if not model.config.causal:
        raise ValueError(f"{what} needs a causal model (each token predicted from those before it); this one has "
                         "causal=False (decode a bidirectional model with ar_course.masked)")


def check_cache(cache: object, batch_size: int, max_len: int) -> None:
    """``ValueError`` unless ``cache`` is one of :data:`CACHE_KINDS` or a :class:`StaticKVCache` of
    ``batch_size`` rows and ``max_len`` positions (one a sampling loop can reset and reuse)."""
    if isinstance(cache, StaticKVCache):
        if (cache.batch_size, cache.max_len) != (batch_size, max_len):
            raise ValueError(f"the StaticKVCache holds {cache.batch_size} rows of {cache.max_len} positions; this "
                             f"call needs {batch_size} rows of {max_len}")
    elif not isinstance(cache, str) or cache not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {CACHE_KINDS} or a StaticKVCache, got {cache!r}")


def check_cache_layout(cache: KVCache | StaticKVCache, config: GPTConfig, like: torch.Tensor) -> None:
    """``ValueError`` unless ``cache`` holds ``config.n_layer`` layers of ``config.n_head`` heads of
    ``config.head_dim`` channels in the dtype and on the device of ``like`` (a parameter of the model): the cache
    ``model.make_cache`` builds. Reads shapes only (no host sync)."""
    k = cache.k[0]  # (B, H, max_len, D)
    got = (len(cache.k), k.shape[1], k.shape[3], k.dtype, k.device)
    if got != (config.n_layer, config.n_head, config.head_dim, like.dtype, like.device):
        raise ValueError(f"cache holds {got[0]} layers of {got[1]} heads of size {got[2]} ({got[3]}, {got[4]}); this "
                         f"model needs {config.n_layer} layers of {config.n_head} heads of size {config.head_dim} "
                         f"({like.dtype}, {like.device}): build it with model.make_cache(batch_size)")


def set_attention(model: nn.Module, impl: str, backend: str = "auto") -> None:
    """Switch every attention layer of ``model`` (a GPT, a VAR, ...) to ``impl`` (one of
    :data:`ATTENTION_IMPLS`) for good; with ``"kernels"``, ``backend`` picks the :mod:`ar_course.kernels` backend
    (``"auto"``, ``"torch"``, ``"triton"``, ``"numba"``). The weights are untouched; ``model.config.attn`` (when
    the model has a config with that field) becomes ``impl`` too, so a saved checkpoint records the setting; the
    model gets a changed copy of its config, leaving other models built from the same config as they are.
    To change attention for one call only, without touching a model that others may be using, use
    :func:`use_attention`.

    Raises:
        ValueError: as :func:`attention_function` (the model is then left untouched).
    """
    attend = attention_function(impl, backend)
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.attention = attend
    config = getattr(model, "config", None)
    if hasattr(config, "attn") and is_dataclass(config):
        model.config = replace(config, attn=impl)  # a copy: other models built from the same config keep theirs


class GPT(nn.Module):
    """Decoder-only transformer over token ids, optionally conditioned on a class token.

    Unconditional: ``forward(idx)`` with ``idx`` ``(B, T)`` gives logits ``(B, T, V)`` where position ``t``
    predicts token ``t + 1``. Class-conditional (``n_classes > 0``): the class token is prepended when a
    sequence starts, so ``forward(idx, classes=y)`` gives ``(B, 1 + T, V)`` and position 0 predicts the
    first token: train with ``forward(x[:, :-1], targets=x, classes=y)``.

    Raises:
        TypeError: ``config`` is not a :class:`GPTConfig`.
    """

    def __init__(self, config: GPTConfig):
        if not isinstance(config, GPTConfig):
            raise TypeError("config must be a GPTConfig (GPTConfig(**d) or GPTConfig.from_dict(d) makes one), got "
                            f"{type(config).__name__}")
        super().__init__()
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        self.wce = nn.Embedding(config.n_classes + 1, C) if config.n_classes else None
        self.wpe = nn.Embedding(config.block_size, C) if config.pos == "learned" else None
        self.rotary = None
        if config.pos in ("rope", "rope2d"):
            grid = config.grid if config.pos == "rope2d" else None
            self.rotary = Rotary(config.head_dim, config.block_size, config.rope_base, grid, config.n_prefix)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(C, config.norm_eps)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def null_class(self) -> int:
        """Class index meaning "no class" (classifier-free guidance)."""
        return self.config.n_classes

    def num_params(self) -> int:
        """Number of parameters (the tied embedding and output weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def make_cache(self, batch_size: int, max_len: int | None = None, static: bool = False
                   ) -> KVCache | StaticKVCache:
        """An empty :class:`KVCache` (``static=True``: :class:`StaticKVCache`) of ``batch_size`` rows and
        ``max_len`` positions (``None``: ``block_size``) for this model on its device and dtype.

        Raises:
            TypeError: ``batch_size`` or ``max_len`` is not an integer, or ``static`` not a bool.
            ValueError: ``batch_size < 1``, or ``max_len`` outside ``[1, block_size]``.
        """
        c = self.config
        p = self.wte.weight
        max_len = c.block_size if max_len is None else check_int("max_len", max_len, lo=1, hi=c.block_size)
        kind = StaticKVCache if check_bool("static", static) else KVCache
        return kind(c.n_layer, batch_size, c.n_head, max_len, c.head_dim, p.device, p.dtype)

    def _check_idx(self, idx: torch.Tensor) -> None:
        """``idx`` is a ``(B, T)`` long tensor of ids in ``[0, vocab_size)`` with ``B >= 1`` (``T`` may be 0)."""
        check_same_device("idx", idx, self)  # before check_ids reads the values
        check_ids("idx", idx, self.config.vocab_size, ("B", "T"), allow_empty=True)
        if idx.shape[0] == 0:
            raise ValueError(f"idx is an empty batch {tuple(idx.shape)}: pass at least one sequence")

    def _check_classes(self, classes: torch.Tensor | None, B: int) -> None:
        """``classes`` is a ``(B,)`` long tensor in ``[0, n_classes]`` (``n_classes`` = the null class)."""
        if classes is None:
            raise ValueError(f"this model is class-conditional: pass classes of shape ({B},)")
        check_same_device("classes", classes, self)
        check_ids("classes", classes, self.config.n_classes + 1, (B,))

    def check_room(self, T: int, max_new_tokens: int) -> None:
        """``ValueError`` unless a prompt of ``T`` tokens (the class token aside) can start a sequence, and it and
        ``max_new_tokens`` new ones fit in ``block_size`` (the last new token is never fed). ``T`` and
        ``max_new_tokens`` are integers ``>= 0`` (``TypeError`` / ``ValueError`` naming them otherwise)."""
        T = check_int("T", T, lo=0)
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, lo=0)
        n_prefix = self.config.n_prefix
        if n_prefix + T == 0:
            raise ValueError("the prompt has no tokens: an unconditional model needs at least one")
        needed = n_prefix + T + max(max_new_tokens - 1, 0)
        if needed > self.config.block_size:
            raise ValueError(f"{T} prompt token{'s' * (T != 1)} and {max_new_tokens} new token"
                             f"{'s' * (max_new_tokens != 1)} need {needed} positions, more than the model's context "
                             f"of {self.config.block_size} (config.block_size)")

    def _check_forward(self, idx: torch.Tensor, targets: torch.Tensor | None, classes: torch.Tensor | None,
                       cache: KVCache | StaticKVCache | None) -> None:
        """The checks :meth:`forward` documents (one host sync per tensor of ids on CUDA)."""
        self._check_idx(idx)
        B, T = idx.shape
        caches = (KVCache, StaticKVCache)
        if cache is not None and (not isinstance(cache, caches) or cache.batch_size != B):
            raise ValueError(f"cache must be a KVCache or StaticKVCache of batch size {B}, got "
                             f"{cache.batch_size if isinstance(cache, caches) else type(cache).__name__}")
        if cache is not None:
            check_cache_layout(cache, self.config, self.wte.weight)
        if isinstance(cache, StaticKVCache) and targets is not None:
            raise ValueError("targets are not taken with a StaticKVCache (a decoding cache)")
        start = cache.length if cache is not None else 0
        class_token = self.wce is not None and start == 0
        if class_token:
            self._check_classes(classes, B)
        elif classes is not None:
            raise ValueError("classes are only taken when a class-conditional sequence starts")
        T_out = T + int(class_token)
        if T_out == 0:
            raise ValueError("idx has no tokens and no class token starts the sequence: nothing to run")
        if start + T_out > self.config.block_size:
            raise ValueError(f"sequence of {start + T_out} positions exceeds block_size {self.config.block_size}")
        if isinstance(cache, StaticKVCache) and start + T_out > cache.max_len:
            raise ValueError(f"KV cache is full: {start} + {T_out} new positions > max_len {cache.max_len}")
        if targets is not None:
            self._check_targets(targets, (B, T_out))

    def _check_targets(self, targets: torch.Tensor, shape: tuple[int, int]) -> None:
        """``targets`` ``shape`` long ids in ``[0, vocab_size)`` or -100 (as :func:`check_ids`, whose message a bad
        one gets), at least one of them not -100 (else the mean loss is 0 / 0 = NaN). One host sync on CUDA for
        both checks, as :func:`check_ids` alone takes."""
        V = self.config.vocab_size
        if isinstance(targets, torch.Tensor) and targets.dtype == torch.long and tuple(targets.shape) == shape:
            kept = targets != -100
            out_of_range = kept & ((targets < 0) | (targets >= V))  # (B, T_out)
            any_out, any_kept = torch.stack([out_of_range.any(), kept.any()]).tolist()
            if not any_out:
                if not any_kept:
                    raise ValueError("every target is ignored (-100): no loss to compute")
                return
        check_ids("targets", targets, V, shape, ignore=-100)  # raises: a wrong type, shape or dtype, or a bad id

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        classes: torch.Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position and, given ``targets``, the mean cross-entropy.

        Args:
            idx: ``(B, T)`` long token ids (``T`` may be 0 when a class token starts the sequence).
            targets: ``(B, T_out)`` long, ``T_out = T + 1`` with a class token else ``T``; -100 is ignored.
            classes: ``(B,)`` long class ids (``n_classes`` = null); required exactly when a
                class-conditional sequence starts (no cache, or an empty one).
            cache: a :class:`KVCache` or :class:`StaticKVCache` (then after these checks, which read its length
                back from the device, the pass is :meth:`decode_step`); the new positions are appended and the
                cache advanced.

        Returns:
            ``(logits (B, T_out, V), loss or None)``.

        Raises:
            TypeError: ``idx``, ``targets`` or ``classes`` is not a tensor.
            ValueError: a wrong shape or dtype, ids or classes on another device than the model, an empty batch,
                ids outside ``[0, vocab_size)`` (targets: or -100, and not all of them -100: the mean loss would be
                NaN), classes outside ``[0, n_classes]``,
                classes where none are taken, nothing to run (no token and no class token), a cache that is not a
                :class:`KVCache` or :class:`StaticKVCache`, or is of another batch size, or of other layers, heads,
                head size, dtype or device than ``make_cache`` gives, more positions than ``block_size`` (or than a
                static cache holds), or ``targets`` with a static cache.
        """
        if not torch.compiler.is_compiling():  # a compiled step (Generator(compile=True)) was checked by its caller
            self._check_forward(idx, targets, classes, cache)
        if isinstance(cache, StaticKVCache):  # before reading its length: int(cache.pos) is a host read
            return self.decode_step(idx, classes, cache)  # checked: classes come exactly with the class token
        start = cache.length if cache is not None else 0
        class_token = self.wce is not None and start == 0
        x = self._embed(idx, classes if class_token else None)  # (B, T, C)
        T = x.shape[1]
        # causal, shifted by the cached positions: no mask is built here
        x = self._blocks(x, torch.arange(start, start + T, device=x.device), None, cache)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def decode_step(self, idx: torch.Tensor, classes: torch.Tensor | None = None,
                    cache: StaticKVCache | None = None) -> tuple[torch.Tensor, None]:
        """:meth:`forward` over a :class:`StaticKVCache` with no argument check and no host synchronisation, so
        it can be captured in a CUDA graph: ``(logits (B, T_out, V), None)``, called like :meth:`forward` with
        keywords (``classes=``, ``cache=``; it takes no ``targets``).

        ``idx`` ``(B, T)`` goes at positions ``cache.pos ..``; the class token of ``classes`` ``(B,)`` is
        prepended exactly when ``classes`` is given (the caller knows that the sequence starts; :meth:`forward`
        checks it). Positions, rotary angles and the mask of the positions past the cache's length are all
        computed from ``cache.pos`` on the device; the cache is advanced by ``T_out``.

        Raises:
            TypeError: no ``cache`` (its default None keeps :meth:`forward`'s signature; a step needs one).
        """
        if cache is None:  # a host-side test: no synchronisation, nothing for a graph to capture
            raise TypeError("decode_step needs a StaticKVCache: cache=model.make_cache(batch, static=True)")
        x = self._embed(idx, classes)  # (B, T_out, C)
        positions = cache.positions(x.shape[1])  # (T_out,)
        x = self._blocks(x, positions, cache.visible(positions, causal=self.config.causal), cache)
        cache.advance(x.shape[1])
        return self.lm_head(self.norm_f(x)), None  # (B, T_out, V)

    def forward_at(self, idx: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                   cache: object | None = None) -> torch.Tensor:
        """The tokens ``idx`` ``(B, T)`` at absolute ``positions`` ``(T,)`` long (no class token), attending under
        ``mask`` ``(T, T_k)`` bool (True: may attend; it holds the causal rule) to the keys ``cache`` returns: any
        object whose ``append(layer, k, v)`` takes the new keys and values ``(B, H, T, D)`` and returns the keys
        and values ``(B, H, T_k, D)`` the mask's columns name (None: the tokens themselves, ``T_k = T``). The
        cache is not advanced. No argument checks (a serving engine's packed pass calls it).

        Returns the final hidden states after the last norm ``(B, T, C)``: ``lm_head`` of a row is its logits."""
        x = self._blocks(self._embed(idx, None), positions, mask, cache)  # (B, T, C)
        return self.norm_f(x)

    def _embed(self, idx: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings of ``idx`` ``(B, T)``, after the class token of ``classes`` ``(B,)`` when given:
        ``(B, T_out, C)``."""
        x = self.wte(idx)  # (B, T, C)
        if classes is not None:
            x = torch.cat([self.wce(classes)[:, None, :], x], dim=1)  # (B, 1+T, C)
        return x

    def _blocks(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | StaticKVCache | None) -> torch.Tensor:
        """The blocks over ``x`` ``(B, T, C)`` at absolute ``positions`` ``(T,)``: causal (bidirectional when
        ``config.causal`` is False), or under ``mask`` ``(T, T_k)`` (which then holds the causal rule) when given.
        Returns ``(B, T, C)``."""
        if self.wpe is not None:
            x = x + self.wpe(positions)
        rope = self.rotary(positions) if self.rotary is not None else None
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope=rope, mask=mask, causal=self.config.causal and mask is None, cache=cache, layer=i)
        return x

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor, classes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Attention probabilities of every layer for a pass over ``idx`` ``(B, T)`` (causal unless
        ``config.causal`` is False).

        Returns one ``(B, H, T_out, T_out)`` tensor per layer (rows sum to 1; zeros above the diagonal when
        causal), recomputed with the plain path from each attention layer's input."""
        maps: list[torch.Tensor] = []

        def capture(attn: SelfAttention, args: tuple) -> None:
            x, rope = args[0], args[1]  # the block calls attn(h, rope, mask, causal, cache, layer)
            q, k, _ = attn.heads(x, rope)  # (B, H, T, D)
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
            mask = ref.causal_mask(x.shape[1], device=x.device) if self.config.causal else None  # (T, T)
            maps.append(ref.masked_softmax(scores, mask))

        handles = [block.attn.register_forward_pre_hook(capture) for block in self.blocks]
        try:
            self(idx, classes=classes)
        finally:
            for h in handles:
                h.remove()
        return maps

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        sampling: SamplingConfig = SamplingConfig(),
        cfg: float = 0.0,
        classes: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        cache: str | StaticKVCache = "dynamic",
        forward: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` ``(B, T)``; returns ``(B, T + max_new_tokens)``.

        ``sampling``: temperature / top-k / top-p (:class:`~ar_course.sampling.SamplingConfig`; temperature 0 is
        greedy). With a class-conditional model pass ``classes`` ``(B,)``; guidance ``cfg = w != 0`` runs the
        conditional and null-class sequences in one doubled batch and samples from ``(1 + w) * cond - w * uncond``
        (:func:`~ar_course.sampling.cfg_mix`; ``w = 0`` is plain conditional sampling). ``use_cache=False``
        recomputes the whole prefix at every step (the slow reference path; same tokens). ``cache``: one of
        :data:`CACHE_KINDS`, ``"dynamic"`` (:class:`KVCache`) or ``"static"`` (:class:`StaticKVCache`, steps by
        :meth:`decode_step`, with no host sync; same tokens up to float rounding), or a :class:`StaticKVCache` of
        ``block_size`` positions and ``B`` rows (``2B`` when guided) to reset and reuse, so that a CUDA graph
        captured over its buffers replays (:class:`~ar_course.transformer.graphs.CUDAGraphStep`). ``forward``:
        what computes each step's logits, called like :meth:`forward` (default: the model itself, or
        :meth:`decode_step` with the static cache; e.g. a ``torch.compile``d forward, a CUDA-graph replay, or a
        wrapper that counts the passes).

        Raises:
            TypeError: a number or flag of the wrong type (``max_new_tokens=2.0``, ``use_cache="yes"``...),
                ``sampling`` that is not a ``SamplingConfig``, or ``generator`` that is not a ``torch.Generator``
                or ``None`` (a seed: make one with ``torch.Generator().manual_seed(seed)``).
            ValueError: a bidirectional model (``config.causal`` False: its tokens cannot be sampled one after
                another), bad ``idx``/``classes`` (as :meth:`forward`), ``max_new_tokens < 0``, a prompt and new
                tokens needing more than ``block_size`` positions, a non-finite ``cfg``, guidance without
                classes, an unknown ``cache`` (or a StaticKVCache of another size, or not as ``make_cache`` builds
                it: see :meth:`forward`), or a static cache with ``use_cache=False``.
        """
        check_causal(self, "generate")
        sampling, cfg = check_sampling(sampling), check_cfg(cfg)
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, lo=0)
        use_cache = check_bool("use_cache", use_cache)
        check_generator(generator)
        self._check_idx(idx)
        check_cache(cache, idx.shape[0] * (1 + (cfg != 0)), self.config.block_size)
        if isinstance(cache, StaticKVCache):
            check_cache_layout(cache, self.config, self.wte.weight)
        static = cache != "dynamic"
        if static and not use_cache:
            raise ValueError("a static cache needs use_cache=True")
        B, T = idx.shape
        if cfg != 0 and classes is None:
            raise ValueError("classifier-free guidance (cfg != 0) needs a class-conditional model and classes")
        if self.wce is not None:
            self._check_classes(classes, B)
        elif classes is not None:
            raise ValueError("classes are only taken by a class-conditional model (n_classes > 0)")
        self.check_room(T, max_new_tokens)
        # `is not None`, not `or`: a torch.compile'd module has no truth value ("GPT does not support len()")
        forward = forward if forward is not None else (self.decode_step if static else self)
        return self._decode(idx, max_new_tokens, sampling, cfg, classes, generator, cache if use_cache else None,
                            forward)

    def _decode(self, idx: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig, cfg: float,
                classes: torch.Tensor | None, generator: torch.Generator | None,
                cache: str | StaticKVCache | None,
                forward: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """The sampling loop of :meth:`generate` (arguments checked; ``cache`` as there, None: no cache):
        ``(B, T)`` -> ``(B, T + max_new_tokens)``."""
        B, guided = idx.shape[0], cfg != 0
        seq, cls = idx, classes
        if guided:
            seq = torch.cat([idx, idx])  # (2B, T)
            cls = torch.cat([classes, torch.full_like(classes, self.null_class)])  # (2B,)
        if isinstance(cache, StaticKVCache):
            cache.reset()
        elif cache is not None:
            cache = self.make_cache(seq.shape[0], static=cache == "static")
        step_input = seq
        for step in range(max_new_tokens):
            if cache is None:
                logits, _ = forward(seq, classes=cls)
            else:  # the first step starts the sequence: the class token (if any) goes in with the prompt
                logits, _ = forward(step_input, classes=cls if step == 0 else None, cache=cache)
            logits = logits[:, -1, :]  # (2B or B, V)
            if guided:
                logits = cfg_mix(logits[:B], logits[B:], cfg)  # (B, V)
            nxt = sample(logits, sampling=sampling, generator=generator)[:, None]  # (B, 1)
            if guided:
                nxt = torch.cat([nxt, nxt])  # (2B, 1)
            seq = torch.cat([seq, nxt], dim=1)
            step_input = nxt
        return seq[:B]
