"""Smaller KV caches and what they cost in quality: quantized keys and values (KIVI), attention sinks with a
sliding window (StreamingLLM), and cross-layer merging (MiniCache).

Each method is an :data:`~ar_course.transformer.AttentionFn` (:class:`CompressedAttention`) that attends exactly
as a decoder reading the compressed cache would, so a full teacher-forced pass under
``use_attention(CompressedAttention(...))`` gives the held-out NLL of decoding with that cache
(:func:`heldout_nll`); :func:`kv_bytes_per_token` gives the matching memory.

* ``int8`` / ``int4`` / ``int2`` (KIVI): asymmetric min-max quantization, keys **per channel** over groups of ``group``
  tokens (key outliers live in a few channels), values **per token**. As in KIVI, the newest tokens of an
  unfinished group stay in full precision: a key/value is seen quantized only by queries after its group ends.
* ``int8_pool`` / ``int4_pool``: what :class:`~ar_course.serving.PagedKVCache` ``(kv_bits=8 / 4)`` stores, so
  what the engine computes with: keys and values per token and head, quantized when written (the new token's
  own included), their ``(scale, minimum)`` kept in float16 (int4: two codes packed in a byte).
* ``sink_window`` (StreamingLLM): keep the first ``sinks`` tokens (the attention sinks) and the last
  ``window - sinks`` ones; a query sees nothing else.
* ``h2o`` (H2O, "Heavy-Hitter Oracle for Efficient Generative Inference"): a cache of ``window`` entries per
  head, the ``recent`` newest tokens plus the *heavy hitters*, the older tokens with the largest attention
  accumulated so far; when the cache is full, the older token with the least accumulated attention is evicted
  for good. Simulated query by query, as a decoder would run it.
* ``minicache`` (MiniCache): from layer ``merge_from`` on, the cache of each pair of layers ``(l, l+1)`` holds one
  key/value *direction* per token (the normalised sum of the two layers' unit vectors: SLERP at ``t = 1/2``) and
  each layer's own norm, so a pair stores one vector and two norms instead of two vectors. As in MiniCache, the
  cache is merged after it is computed: :func:`heldout_nll` first runs an exact pass that records every layer's
  keys and values (:meth:`CompressedAttention.record`), merges them, then runs the pass it scores, where a
  query reads the merged keys and values of the earlier positions and its own new ones exactly (a decoder
  merges a token's entries once both layers have computed them). MiniCache's retention of outlier tokens is
  left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ar_course.transformer.model import GPT, GPTConfig, use_attention
from ar_course.utils import check_int, is_integer_tensor

METHODS = ("none", "int8", "int4", "int2", "int8_pool", "int4_pool", "sink_window", "h2o", "minicache")
QUANT_BITS = {"int8": 8, "int4": 4, "int2": 2}
POOL_BITS = {"int8_pool": 8, "int4_pool": 4}


def _check_tensor(name: str, x: object, shape: str = "", ndim: int | None = None, *, kind: str = "real",
                  min_ndim: int = 0) -> torch.Tensor:
    """``x`` if it is a tensor of ``ndim`` dimensions (None: any, at least ``min_ndim``) of ``kind`` numbers:
    ``"floating"`` (floating-point), ``"integer"`` (not bool) or ``"real"`` (either; bool and complex are refused).
    ``shape`` is for the message.

    Raises:
        TypeError: ``x`` is not a tensor (``k must be a (B, H, T, D) ... tensor, got NoneType``).
        ValueError: its dtype or number of dimensions is wrong (``..., got (2, 8) torch.bool``)."""
    kinds = {"floating": "floating-point", "integer": "integer", "real": "real (integer or floating-point)"}
    what = f"{name} must be a {shape + ' ' if shape else ''}{kinds[kind]} tensor"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}, got {type(x).__name__}")
    integer = is_integer_tensor(x)
    wrong_dtype = {"floating": not x.is_floating_point(), "integer": not integer,
                   "real": not (integer or x.is_floating_point())}[kind]
    if wrong_dtype or (ndim is not None and x.ndim != ndim) or x.ndim < min_ndim:
        raise ValueError(f"{what}, got {tuple(x.shape)} {x.dtype}")
    return x


def _check_sinks_window(sinks: object, window: object) -> None:
    """``sinks``, ``window``: integers with ``0 <= sinks < window`` (``TypeError`` / ``ValueError``)."""
    check_int("sinks", sinks)
    check_int("window", window)
    if not 0 <= sinks < window:
        raise ValueError(f"need 0 <= sinks < window, got sinks={sinks}, window={window}")


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization of ``x`` with one ``(scale, minimum)`` per slice along ``dim``
    (the statistics are taken over ``dim``). Returns ``(codes uint8 like x, scale, minimum)``, the last two
    with ``dim`` kept as size 1; codes are in ``[0, 2**bits - 1]``. ``bits``: an integer in ``[1, 8]``.

    Raises:
        TypeError: ``x`` is not a tensor, or ``bits`` / ``dim`` is not an integer.
        ValueError: ``x`` is a bool or complex tensor, ``bits`` is outside ``[1, 8]``, or ``dim`` is not one of
            ``x``'s dimensions (``dim must be an integer in [-2, 1], got 5``)."""
    _check_tensor("x", x)
    bits = check_int("bits", bits, lo=1, hi=8)
    check_int("dim", dim, lo=-max(x.ndim, 1), hi=max(x.ndim, 1) - 1)
    x = x if x.is_floating_point() else x.float()  # int8's hi - lo would wrap
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
    codes = ((x - lo) / scale).round().clamp(0, 2 ** bits - 1).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Back to floats: ``codes * scale + lo``."""
    return codes.to(scale.dtype) * scale + lo


def fake_quantize_kv(k: torch.Tensor, v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KIVI's layout on ``k, v`` ``(B, H, T, D)``: keys per channel over groups of ``group`` tokens, values per
    token, both quantized and dequantized. A last, unfinished group is returned quantized too (callers decide
    who may see it). Returns ``(k_hat, v_hat)`` ``(B, H, T, D)``. ``group``: an integer ``>= 1``.

    Raises:
        TypeError: ``k`` or ``v`` is not a tensor, or ``bits`` / ``group`` is not an integer.
        ValueError: ``k`` or ``v`` is not a 4-D real (integer or floating-point) tensor, ``bits`` is outside
            ``[1, 8]`` or ``group < 1``."""
    _check_tensor("k", k, "(B, H, T, D)", 4)
    _check_tensor("v", v, "(B, H, T, D)", 4)
    check_int("bits", bits, lo=1, hi=8)
    group = check_int("group", group, lo=1)
    B, H, T, D = k.shape
    pad = -T % group
    kp = F.pad(k, (0, 0, 0, pad), mode="replicate").view(B, H, (T + pad) // group, group, D)  # (B, H, G, g, D)
    k_hat = dequantize(*quantize(kp, bits, dim=3)).view(B, H, T + pad, D)[:, :, :T]  # (B, H, T, D)
    v_hat = dequantize(*quantize(v, bits, dim=3))  # (B, H, T, D)
    return k_hat, v_hat


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: ``codes`` ``(..., D)`` uint8 in ``[0, 15]``, ``D`` even -> ``(..., D // 2)``
    uint8 (even index in the low nibble)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``(..., D // 2)`` uint8 -> ``(..., D)`` uint8 codes."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)  # (..., D // 2, 2) -> (..., D)


def pool_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(..., D)`` as the paged pool stores it: ``bits``-bit codes per row over ``D`` (int4: packed by
    :func:`pack_int4`) and the row's ``(scale, minimum)`` in float16 ``(..., 2)`` (int4: ``D`` even).

    Raises:
        TypeError: ``x`` is not a tensor or ``bits`` is not an integer.
        ValueError: ``x`` is a 0-d, bool or complex tensor, ``bits`` is not 4 or 8, or ``D`` is odd with 4 bits."""
    _check_tensor("x", x, "(..., D)", min_ndim=1)
    bits = check_int("bits", bits)
    if bits not in (4, 8):
        raise ValueError(f"the pool stores 8- or 4-bit codes, got bits={bits!r}")
    if bits == 4 and x.shape[-1] % 2:
        raise ValueError(f"bits=4 packs two codes per byte: the last dimension must be even, got {x.shape[-1]}")
    codes, scale, lo = quantize(x.float(), bits, dim=-1)  # scale, lo: (..., 1)
    return (pack_int4(codes) if bits == 4 else codes), torch.cat([scale, lo], -1).half()


def pool_dequantize(codes: torch.Tensor, stats: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Back from :func:`pool_quantize`: ``(..., D)`` in ``dtype``.

    Raises:
        TypeError: ``codes`` or ``stats`` is not a tensor, ``bits`` is not an integer or ``dtype`` not a
            ``torch.dtype``.
        ValueError: ``codes`` is not an integer tensor of at least one dimension, ``stats`` is not a floating-point
            tensor of shape ``codes.shape[:-1] + (2,)``, or ``bits`` is not 4 or 8."""
    _check_tensor("codes", codes, "(..., D or D // 2)", kind="integer", min_ndim=1)
    _check_tensor("stats", stats, "(..., 2)", kind="floating")
    if stats.shape != (*codes.shape[:-1], 2):
        raise ValueError(f"stats must be a (..., 2) tensor with codes' leading dimensions {tuple(codes.shape[:-1])}, "
                         f"got shape {tuple(stats.shape)}")
    bits = check_int("bits", bits)
    if bits not in (4, 8):
        raise ValueError(f"the pool stores 8- or 4-bit codes, got bits={bits!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r} ({type(dtype).__name__})")
    s = stats.to(dtype)  # (..., 2)
    return dequantize(unpack_int4(codes) if bits == 4 else codes, s[..., :1], s[..., 1:])


def pool_fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` ``(..., D)`` as the ``bits``-bit paged pool returns it (quantized, dequantized)."""
    return pool_dequantize(*pool_quantize(x, bits), bits, x.dtype)


def sink_window_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Which keys a sinks + window cache keeps for a query: key position ``j`` is visible to query position
    ``i`` when it is a sink (``j < sinks``) or among the last ``window - sinks`` positions up to ``i``
    (``j > i - (window - sinks)``); causality is the caller's. Broadcasts ``q_pos``, ``k_pos`` (long).
    ``ValueError`` unless ``0 <= sinks < window``. Unlike StreamingLLM, which renumbers positions within the
    cache, keys keep their original positions: the cache's memory is bounded, the sequence's length is not
    extended past the model's context. ``TypeError`` when ``sinks`` or ``window`` is not an integer."""
    _check_sinks_window(sinks, window)
    q_pos, k_pos = q_pos.long(), k_pos.long()  # uint8 positions would wrap below 0
    return (k_pos < sinks) | (k_pos > q_pos - (window - sinks))


def sink_window_evictable(length: int, sinks: int, window: int, block_size: int) -> range:
    """Block indices of a sequence of ``length`` positions that no later query (position ``>= length``) can see
    under :func:`sink_window_visible`: every position of the block is past the sinks and before
    ``length - window + sinks + 1``. The engine frees them.

    Raises:
        TypeError: an argument that is not an integer.
        ValueError: ``length < 0``, ``block_size < 1``, or not ``0 <= sinks < window``."""
    check_int("length", length, lo=0)
    check_int("block_size", block_size, lo=1)
    _check_sinks_window(sinks, window)
    first = -(-sinks // block_size)  # the first block without a sink
    end = max(length - window + sinks + 1, 0) // block_size  # blocks wholly before the first visible position
    return range(first, max(first, end))


def sink_window_mask(T: int, sinks: int, window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``(T, T)``: query ``i`` may see key ``j <= i`` kept by :func:`sink_window_visible`: a cache of
    ``window`` entries.

    Raises:
        TypeError: ``T``, ``sinks`` or ``window`` is not an integer.
        ValueError: ``T < 0``, or not ``0 <= sinks < window``."""
    T = check_int("T", T, lo=0)
    _check_sinks_window(sinks, window)
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & sink_window_visible(i, j, sinks, window)


def h2o_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """Causal attention of ``q, k, v`` ``(B, H, T, D)`` through an H2O cache of ``budget`` entries per head:
    query ``i`` sees the keys still cached after the earlier steps, plus its own; then, if the cache holds more
    than ``budget``, the key outside the ``recent`` newest with the least accumulated attention is evicted.
    Returns ``(B, H, T, D)``.

    Raises:
        TypeError: ``q``, ``k`` or ``v`` is not a tensor, or ``budget`` / ``recent`` is not an integer.
        ValueError: ``q`` is not a 4-D floating-point tensor, ``k`` or ``v`` is not of ``q``'s shape and dtype, or
            not ``0 <= recent < budget``."""
    _check_tensor("q", q, "(B, H, T, D)", 4, kind="floating")
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a (B, H, T, D) tensor like q, got {type(x).__name__}")
        if x.shape != q.shape or x.dtype != q.dtype:
            raise ValueError(f"{name} must be a (B, H, T, D) tensor like q {tuple(q.shape)} {q.dtype}, got "
                             f"{tuple(x.shape)} {x.dtype}")
    check_int("budget", budget)
    check_int("recent", recent)
    if not 0 <= recent < budget:
        raise ValueError(f"need 0 <= recent < budget, got recent={recent}, budget={budget}")
    B, H, T, D = q.shape
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, T, T)
    kept = torch.zeros(B, H, T, dtype=torch.bool, device=q.device)
    acc = torch.zeros(B, H, T, dtype=q.dtype, device=q.device)
    out = torch.empty_like(q)
    j = torch.arange(T, device=q.device)
    for i in range(T):
        kept[..., i] = True
        p = scores[:, :, i].masked_fill(~kept, float("-inf")).softmax(-1)  # (B, H, T)
        out[:, :, i] = (p[..., None] * v).sum(2)
        acc += p
        if i + 1 > budget:
            old = kept & (j <= i - recent)  # (B, H, T): evictable
            victim = acc.masked_fill(~old, float("inf")).argmin(-1, keepdim=True)  # (B, H, 1)
            kept.scatter_(-1, victim, False)
    return out


@dataclass
class CompressedAttention:
    """:data:`~ar_course.transformer.AttentionFn` of a causal full pass as seen through a compressed cache.

    ``method`` in :data:`METHODS`; ``group`` for quantization (the bits come from the method's name);
    ``sinks``/``window`` for ``sink_window`` (``0 <= sinks < window``); ``window``/``recent`` for ``h2o``
    (``0 <= recent < window``), all checked when made; ``merge_from`` for
    ``minicache``, which also needs the merged cache of an exact pass first (:meth:`record`, as
    :func:`heldout_nll` does). The layers are counted as the function is called, so one instance serves one
    forward pass at a time (:meth:`reset` between passes)."""

    method: str = "none"
    group: int = 32
    sinks: int = 4
    window: int = 96
    merge_from: int = 6
    recent: int = 48
    _layer: int = field(default=0, repr=False)
    _exact: list | None = field(default=None, repr=False)  # minicache: (k, v) of each layer while recording
    _merged: dict | None = field(default=None, repr=False)  # minicache: layer -> merged (k, v)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        check_int("group", self.group, lo=1)
        window = check_int("window", self.window, lo=1)
        # the methods that use them need 0 <= sinks < window (sink_window), 0 <= recent < window (h2o's budget)
        check_int("sinks", self.sinks, lo=0, hi=window - 1 if self.method == "sink_window" else None)
        check_int("recent", self.recent, lo=0, hi=window - 1 if self.method == "h2o" else None)
        check_int("merge_from", self.merge_from, lo=0)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                 dropout_p: float = 0.0) -> torch.Tensor:
        """Attention of ``q`` ``(B, H, T, D)`` over ``k``, ``v`` ``(B, H, T, D)`` (a full causal pass without dropout:
        ``mask`` None, ``causal`` True, ``dropout_p`` 0) with this compression applied; returns ``(B, H, T, D)``."""
        T = q.shape[2]
        if mask is not None or q.shape[2] != k.shape[2] or not causal or dropout_p:
            raise ValueError("CompressedAttention evaluates full causal passes only (no cache, no extra mask, no "
                             f"dropout), got mask={None if mask is None else 'a tensor'}, {T} queries over "
                             f"{k.shape[2]} keys, causal={causal}, dropout_p={dropout_p}")
        keep = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T)
        if self.method in QUANT_BITS:
            return self._quantized(q, k, v, QUANT_BITS[self.method])
        if self.method in POOL_BITS:
            k, v = pool_fake_quantize(k, POOL_BITS[self.method]), pool_fake_quantize(v, POOL_BITS[self.method])
        if self.method == "h2o":
            return h2o_attention(q, k, v, self.window, self.recent)
        if self.method == "sink_window":
            keep = sink_window_mask(T, self.sinks, self.window, q.device)
        elif self.method == "minicache":
            return self._minicache(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    def _quantized(self, q, k, v, bits):
        """Attention where key/value ``j`` is quantized for the queries after its group of ``group`` ends."""
        T, D = q.shape[2], q.shape[3]
        k_hat, v_hat = fake_quantize_kv(k, v, bits, self.group)
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(T, device=q.device)[None, :]
        done = (j // self.group + 1) * self.group <= i  # (T, T): j's group ended before query i
        scores = torch.where(done, q @ k_hat.transpose(-2, -1), q @ k.transpose(-2, -1)) / math.sqrt(D)
        p = scores.masked_fill(j > i, float("-inf")).softmax(-1)  # (B, H, T, T)
        return (p * done) @ v_hat + (p * ~done) @ v  # (B, H, T, D)

    def record(self) -> None:
        """Start an exact pass that records every layer's keys and values; the next :meth:`reset` merges them
        into the cache the following pass reads (``minicache`` only)."""
        if self.method != "minicache":
            raise ValueError(f"only the minicache method records an exact pass, not {self.method!r}")
        self._layer, self._exact, self._merged = 0, [], None

    def _minicache(self, q, k, v):
        """Layer ``l``'s attention: exact while recording; then, in a merged pair, the earlier positions' keys
        and values from the merged cache and the query's own exactly."""
        layer, self._layer = self._layer, self._layer + 1
        if self._exact is not None:
            self._exact.append((k, v))
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self._merged is None:
            raise RuntimeError("minicache reads a merged cache: call record() and run an exact pass first "
                               "(heldout_nll does both)")
        if layer not in self._merged:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        k_hat, v_hat = self._merged[layer]  # (B, H, T, D) each
        T, D = q.shape[2], q.shape[3]
        own = torch.eye(T, dtype=torch.bool, device=q.device)  # (T, T): the query's own position
        scores = torch.where(own, (q * k).sum(-1, keepdim=True), q @ k_hat.transpose(-2, -1)) / math.sqrt(D)
        p = scores.masked_fill(~torch.ones_like(own).tril(), float("-inf")).softmax(-1)  # (B, H, T, T)
        return p.masked_fill(own, 0.0) @ v_hat + p.diagonal(dim1=-2, dim2=-1)[..., None] * v  # (B, H, T, D)

    def reset(self) -> None:
        """Back to the first layer; after a recorded pass, merge what it recorded (``minicache``)."""
        self._layer = 0
        if self._exact is not None:
            self._merged, self._exact = merge_layer_pairs(self._exact, self.merge_from), None


def merge_pair(xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MiniCache's merge of two layers' vectors ``xa, xb`` ``(..., D)`` (keys or values of the same tokens and
    heads): the shared direction ``normalize(normalize(xa) + normalize(xb))`` ``(..., D)`` and each layer's own
    norm ``(...)``; ``direction * norm_a[..., None]`` stands for ``xa``. Returns ``(direction, norm_a, norm_b)``.

    Raises:
        TypeError: ``xa`` or ``xb`` is not a tensor.
        ValueError: either is a 0-d or not a floating-point tensor, or their shapes differ."""
    for name, x in (("xa", xa), ("xb", xb)):
        _check_tensor(name, x, "(..., D)", kind="floating", min_ndim=1)
    if xa.shape != xb.shape:
        raise ValueError(f"xa and xb must have the same shape, got {tuple(xa.shape)} and {tuple(xb.shape)}")
    direction = F.normalize(F.normalize(xa, dim=-1) + F.normalize(xb, dim=-1), dim=-1)  # (..., D)
    return direction, xa.norm(dim=-1), xb.norm(dim=-1)


def merged_pairs(n_layer: int, merge_from: int) -> list[int]:
    """The first layer ``a`` of each merged pair ``(a, a + 1)``: ``merge_from, merge_from + 2, ...`` while
    ``a + 1 < n_layer`` (an unpaired last layer stays exact)."""
    return list(range(merge_from, n_layer - 1, 2))


def merge_layer_pairs(kv: list[tuple[torch.Tensor, torch.Tensor]], merge_from: int
                      ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """MiniCache's merge of the keys and values ``kv`` (one ``(k, v)`` pair of ``(B, H, T, D)`` per layer): each
    pair of layers ``(l, l+1)`` of :func:`merged_pairs` shares one direction per token and head, scaled back by
    each layer's own norm (:func:`merge_pair`). Returns ``{layer: (k, v)}`` for the merged layers."""
    merged = {}
    for a in merged_pairs(len(kv), merge_from):
        pair = []
        for xa, xb in zip(kv[a], kv[a + 1]):  # keys, then values
            direction, norm_a, norm_b = merge_pair(xa, xb)  # (B, H, T, D), (B, H, T), (B, H, T)
            pair.append((direction * norm_a[..., None], direction * norm_b[..., None]))
        (ka, kb), (va, vb) = pair
        merged[a], merged[a + 1] = (ka, va), (kb, vb)
    return merged


def kv_bytes_per_token(config: GPTConfig, method: str, context: int, *, bits_float: int = 16, group: int = 32,
                       window: int = 96, merge_from: int = 6, recent: int = 0) -> float:
    """KV-cache bytes per token of a ``context``-token sequence, all layers, keys and values, stored in
    ``bits_float``-bit floats (scales and minima included for the quantized methods; ``recent`` is ignored).
    ``method``: one of :data:`METHODS` or ``"h2o_blocks"``, the engine's block-wise H2O with a budget of
    ``window`` positions (:mod:`ar_course.serving.h2o`). ``window``: the cache size of ``sink_window``, ``h2o``
    and ``h2o_blocks``; ``merge_from``: the first merged layer of ``minicache``. ``context`` and ``group``:
    integers ``>= 1``; an unknown ``method`` is a ``ValueError``."""
    context, group = check_int("context", context, lo=1), check_int("group", group, lo=1)
    L, H, D, f = config.n_layer, config.n_head, config.head_dim, bits_float / 8
    full = 2 * L * H * D * f
    if method == "none":
        return full
    if method in QUANT_BITS:
        b = QUANT_BITS[method]
        keys = H * D * b / 8 + 2 * H * D * f / group  # codes + a (scale, min) per channel per group
        values = H * D * b / 8 + 2 * H * f  # codes + a (scale, min) per token per head
        return L * (keys + values)
    if method in POOL_BITS:  # bits per number, a float16 (scale, min) per token and head
        return 2 * L * H * (D * POOL_BITS[method] / 8 + 2 * 2)
    if method == "sink_window":
        return full * min(window, context) / context
    if method == "h2o":  # plus one fp32 accumulated score per cached token, head and layer
        return (full + L * H * 4) * min(window, context) / context
    if method == "h2o_blocks":  # the engine's (serving.h2o): one float64 score per cached position
        return (full + 8) * min(window, context) / context
    if method == "minicache":
        pairs = len(merged_pairs(L, merge_from))
        # a merged pair stores one direction per token and head plus two norms, instead of two vectors
        return full - pairs * 2 * H * (D - 2) * f
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@torch.no_grad()
def heldout_nll(model: GPT, windows: torch.Tensor, attention: CompressedAttention | None = None
                ) -> float:
    """Mean next-token NLL (nats/token) of ``model`` on ``windows`` ``(N, T+1)`` long, every layer attending
    through ``attention`` (None: the model's own attention). ``TypeError`` unless ``model`` is a GPT and ``windows``
    a tensor; ``ValueError`` for a class-conditional or bidirectional model (as the engine) and unless ``windows`` is
    a non-empty ``(N, T+1)`` tensor with ``T >= 1``."""
    from ar_course.serving.paged import check_text_model  # paged imports this module

    check_text_model(getattr(model, "_orig_mod", model))  # a torch.compile'd GPT is checked as its model
    if not isinstance(windows, torch.Tensor):
        raise TypeError(f"windows must be a (N, T+1) tensor of token ids, got {type(windows).__name__}")
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a non-empty (N, T+1) tensor of token ids with T >= 1, got shape "
                         f"{tuple(windows.shape)}")
    if attention is not None:  # a compiled model's trace does not see use_attention: run its eager module
        model = getattr(model, "_orig_mod", model)
    losses = []
    for row in windows:
        if attention is None:
            losses.append(float(model(row[None, :-1], targets=row[None, 1:])[1]))
            continue
        attention.reset()
        if attention.method == "minicache":  # the exact pass whose cache is merged
            attention.record()
            with use_attention(attention):
                model(row[None, :-1])
            attention.reset()
        with use_attention(attention):
            losses.append(float(model(row[None, :-1], targets=row[None, 1:])[1]))
    return sum(losses) / len(losses)
