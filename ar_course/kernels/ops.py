"""Torch-facing entry points that pick a kernel for the tensors' device and fall back to torch.

Backends (``backend=`` forces one; ``"auto"`` picks):

* ``"triton"``: the Triton kernels, on CUDA tensors (or CPU tensors in Triton's interpreter);
* ``"numba"``: the numba.cuda kernels, on CUDA tensors (or CPU tensors in numba's CUDA simulator);
* ``"numba_cpu"``: the numba CPU nearest-code search (``vq_nearest`` only);
* ``"torch"``: plain torch (``cdist`` + ``argmin``, ``scaled_dot_product_attention``, ``softmax``).

``"auto"`` on a CUDA tensor takes Triton when it is installed, else numba.cuda, else torch. On a CPU tensor
the simulator and interpreter are teaching tools, far slower than torch, so ``"auto"`` takes torch, except
for ``vq_nearest`` on large inputs, where the numba CPU search is faster and needs no N x K buffer. If a
kernel picked by ``"auto"`` fails (say numba cannot find the CUDA toolkit to compile), a warning says so,
torch answers, and that backend is skipped from then on; a forced backend raises instead.
"""

from __future__ import annotations

import importlib
import math
import warnings
from functools import lru_cache
from types import ModuleType
from typing import Callable, Collection

import torch
import torch.nn.functional as F

from . import env
from .masks import MaskSpec, dense_mask, prefix_lengths
from .reference import vq_nearest_reference

BACKENDS = ("auto", "torch", "numba", "numba_cpu", "triton")
CPU_VQ_MIN_PAIRS = 1 << 16
"""``vq_nearest`` on CPU uses numba from this many (vector, code) pairs on; torch below."""
_FAILED: set[str] = set()  # backends that failed under "auto" in this process


@lru_cache(maxsize=None)
def _triton() -> ModuleType | None:
    """The Triton kernels module, or None when Triton is not installed or cannot import."""
    if not env.TRITON_INSTALLED:
        return None
    try:
        return importlib.import_module("ar_course.kernels.triton_kernels")
    except Exception:  # noqa: BLE001 - a broken Triton install means "not available"
        return None


def _usable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device`` here, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "numba_cpu":
        return None if device.type == "cpu" else "numba_cpu runs on CPU tensors only"
    if backend == "numba":
        if not env.NUMBA_CUDA_USABLE:
            return "numba.cuda cannot run here (no GPU and the CUDA simulator is off)"
        if env.CUDA_SIMULATOR and device.type != "cpu":
            return "numba's CUDA simulator runs on CPU tensors only"
        if not env.CUDA_SIMULATOR and device.type != "cuda":
            return "numba.cuda kernels need CUDA tensors on a GPU machine"
        return None
    if _triton() is None:  # backend == "triton"
        return "Triton is not installed (pip install -e '.[triton]' on Linux)"
    if env.triton_interpreted() != (device.type == "cpu"):
        return ("Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors only" if env.triton_interpreted()
                else "compiled Triton kernels need CUDA tensors")
    return None


def select_backend(op: str, device: torch.device, backend: str = "auto", large: bool = False) -> str:
    """The backend ``op`` (``"vq_nearest"``, ``"flash_attention"``, ``"decode_attention"``, ``"softmax"``) uses.

    A forced backend that cannot run raises ``RuntimeError`` with the reason; ``"auto"`` never fails.
    """
    return backend_rule(op, device.type, lambda b: _usable(b, device), backend, large, skip=_FAILED)


def backend_rule(op: str, device_type: str, why_not: Callable[[str], str | None], backend: str = "auto",
                 large: bool = False, skip: Collection[str] = frozenset()) -> str:
    """:func:`select_backend`'s choice, given what can run: ``why_not(b)`` is None when backend ``b`` can run on
    a ``device_type`` device here, else the reason it cannot; ``"auto"`` passes over the backends in ``skip``.

    A forced backend is returned when it can run (``RuntimeError`` with the reason when not); ``"auto"`` takes,
    on ``"cuda"``, Triton, else numba, else torch, and on any other device torch (``"numba_cpu"`` for a
    ``large`` ``vq_nearest``). An unknown backend, or one ``op`` does not have, raises ``ValueError``.
    """
    allowed = ("torch", "numba", "triton") + (("numba_cpu",) if op == "vq_nearest" else ())
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend != "auto":
        if backend not in allowed:
            raise ValueError(f"{op} has no backend {backend!r}; choose from {('auto',) + allowed}")
        reason = why_not(backend)
        if reason:
            raise RuntimeError(f"{op}: backend {backend!r} is not available: {reason}")
        return backend
    if device_type == "cuda":
        return next(b for b in ("triton", "numba", "torch") if b not in skip and why_not(b) is None)
    return "numba_cpu" if op == "vq_nearest" and large and "numba_cpu" not in skip else "torch"


def _run(op: str, chosen: str, backend: str, kernels: dict[str, Callable[[], torch.Tensor]],
         plain: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run the chosen kernel, or ``plain`` (torch); under ``"auto"`` a failing kernel falls back to torch."""
    if chosen == "torch":
        return plain()
    try:
        return kernels[chosen]()
    except Exception as exc:  # noqa: BLE001 - any kernel failure: torch still gives the answer
        if backend != "auto":
            raise
        _FAILED.add(chosen)
        warnings.warn(f"{op}: the {chosen} kernel failed ({type(exc).__name__}: {exc}); using torch instead "
                      "from now on", RuntimeWarning, stacklevel=3)
        return plain()


def _module(name: str) -> ModuleType:
    """A kernel module of this package, imported on first use."""
    return importlib.import_module(f"{__package__}.{name}")


def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x))}")


def vq_nearest(z: torch.Tensor, codebook: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Index of the nearest code (squared Euclidean distance) for every vector; ties go to the lowest index.

    z (..., D), codebook (K, D) on the same device -> int64 indices of shape z.shape[:-1].
    """
    _check_float("z", z)
    _check_float("codebook", codebook)
    if codebook.ndim != 2 or codebook.shape[0] == 0:
        raise ValueError(f"codebook must be (K, D) with K >= 1, got shape {tuple(codebook.shape)}")
    if z.ndim < 1 or z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"z must end in D={codebook.shape[1]} (the codebook's width), got shape {tuple(z.shape)}")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but the codebook is on {codebook.device}")
    flat = z.reshape(-1, z.shape[-1])  # (N, D)
    large = flat.shape[0] * codebook.shape[0] >= CPU_VQ_MIN_PAIRS
    chosen = select_backend("vq_nearest", z.device, backend, large)
    idx = _run("vq_nearest", chosen, backend, {
        "numba_cpu": lambda: _module("cpu_vq").vq_nearest_cpu(flat, codebook),
        "numba": lambda: _module("cuda_vq").vq_nearest_numba(flat, codebook),
        "triton": lambda: _triton().vq_nearest_triton(flat, codebook),
    }, lambda: vq_nearest_reference(flat.float(), codebook.float()))
    return idx.reshape(z.shape[:-1])


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(name, x)
        if x.ndim != 4:
            raise ValueError(f"{name} must be (B, H, T, D), got shape {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"need q (B, H, T_q, D) and k, v (B, H, T_k, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskSpec = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention without the T_q x T_k matrix (on the kernel backends).

    q (B, H, T_q, D), k and v (B, H, T_k, D) -> (B, H, T_q, D) in q's dtype. ``mask``: None, ``"causal"``,
    a :class:`~ar_course.kernels.masks.BlockCausal` (VAR), or a (T_q, T_k) bool tensor (True = may attend).
    Kernels handle masks whose rows are prefixes (all of the above but an arbitrary bool tensor); with
    ``backend="auto"`` any other mask runs on torch. ``scale`` defaults to 1/sqrt(D).
    """
    _check_attention(q, k, v)
    t_q, t_k = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    chosen = select_backend("flash_attention", q.device, backend)
    if chosen != "torch":
        try:
            kv_len = prefix_lengths(mask, t_q, t_k, q.device)
        except ValueError:
            if backend != "auto":
                raise
            chosen = "torch"  # not a prefix mask (or a bad one: torch's path names the problem)

    def plain() -> torch.Tensor:
        if isinstance(mask, str):
            prefix_lengths(mask, t_q, t_k, q.device)  # validates the name and the shape
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(mask, t_q, t_k, q.device), scale=scale)

    return _run("flash_attention", chosen, backend, {
        "numba": lambda: _module("cuda_attention").flash_attention_numba(q, k, v, kv_len, scale).to(q.dtype),
        "triton": lambda: _triton().flash_attention_triton(q, k, v, kv_len, scale),
    }, plain)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: int | torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of one new query per head over the first ``length`` entries of a KV cache.

    q (B, H, D); k_cache, v_cache (B, H, T_max, D); ``length`` an int or a (B,) integer tensor with
    1 <= length <= T_max. Returns (B, H, D) in q's dtype. The kernels split the keys into chunks, summarise
    each chunk in parallel and combine the summaries (split-K / flash decoding).
    """
    _check_float("q", q)
    if q.ndim != 3:
        raise ValueError(f"q must be (B, H, D), got shape {tuple(q.shape)}")
    _check_attention(q[:, :, None, :], k_cache, v_cache)
    b, _, t_max, _ = k_cache.shape
    lengths = torch.as_tensor(length, device=q.device)
    if lengths.is_floating_point() or lengths.ndim > 1 or (lengths.ndim == 1 and lengths.shape[0] != b):
        raise ValueError(f"length must be an int or a (B,) = ({b},) integer tensor, got {length!r}")
    lengths = lengths.expand(b)  # (B,)
    if int(lengths.min()) < 1 or int(lengths.max()) > t_max:
        raise ValueError(f"every length must be in 1..T_max={t_max}, got {lengths.tolist()}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    chosen = select_backend("decode_attention", q.device, backend)

    def plain() -> torch.Tensor:
        t_used = int(lengths.max())
        k_used, v_used = k_cache[:, :, :t_used], v_cache[:, :, :t_used]  # (B, H, T_used, D)
        visible = (torch.arange(t_used, device=q.device)[None, :] < lengths[:, None])[:, None, :, None]  # (B,1,T,1)
        if not bool(visible.all()):  # ragged batch: never let unwritten cache entries (maybe NaN) in
            k_used, v_used = torch.where(visible, k_used, 0.0), torch.where(visible, v_used, 0.0)
        out = F.scaled_dot_product_attention(q[:, :, None, :], k_used, v_used,
                                             attn_mask=visible.transpose(-2, -1), scale=scale)  # (B, H, 1, D)
        return out.squeeze(2)

    return _run("decode_attention", chosen, backend, {
        "numba": lambda: _module("cuda_attention").decode_attention_numba(
            q, k_cache, v_cache, lengths, scale).to(q.dtype),
        "triton": lambda: _triton().decode_attention_triton(q, k_cache, v_cache, lengths, scale),
    }, plain)


def softmax(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Softmax over the last axis of x (..., C), same shape and dtype, with the online-softmax kernels."""
    _check_float("x", x)
    if x.ndim < 1:
        raise ValueError("x must have at least one axis")
    rows = x.reshape(-1, x.shape[-1])  # (R, C)
    chosen = select_backend("softmax", x.device, backend)
    out = _run("softmax", chosen, backend, {
        "numba": lambda: _module("cuda_softmax").softmax(rows).to(x.dtype),
        "triton": lambda: _triton().softmax_triton(rows),
    }, lambda: torch.softmax(rows, dim=-1))
    return out.reshape(x.shape)
