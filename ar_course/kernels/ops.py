"""Torch-facing entry points that pick a kernel for the tensors' device and fall back to torch.

Backends (``backend=`` forces one; ``"auto"`` picks):

* ``"triton"``: the Triton kernels, on CUDA tensors (or CPU tensors in Triton's interpreter);
* ``"numba"``: the numba.cuda kernels, on CUDA tensors (or CPU tensors in numba's CUDA simulator);
* ``"numba_cpu"``: the numba CPU nearest-code search (``vq_nearest`` only);
* ``"torch"``: plain torch (``cdist`` + ``argmin``, ``scaled_dot_product_attention``, ``softmax``).

``"auto"`` takes a kernel only where it is faster. On a CUDA tensor the candidate is Triton when it is
installed, else numba.cuda; the first call of each kind (op, device, a bucket of sizes and dtypes) times
the candidate against torch on that call's inputs and keeps whichever won (:mod:`.calibrate`; decisions
persist in a cache file). On a CPU tensor the simulator and interpreter are teaching tools, far slower
than torch, so ``"auto"`` takes torch, except for ``vq_nearest`` on large inputs, where the numba CPU search
is faster and needs no N x K buffer (``benchmarks/bench_kernels.py`` measures it). Without numba and Triton
(optional extras) ``"auto"`` quietly takes torch everywhere. Kernels have no
backward pass, so ``"auto"`` takes torch when a gradient is needed, and a forced kernel backend raises
``ValueError`` then (its output would silently carry no gradient). If a kernel that ``"auto"`` tries fails
(say it cannot compile), a warning says so, torch answers, and that kind of call stays on torch in this
process; a forced backend raises instead.

What ran is recorded: inside ``with record_dispatch() as rec:`` every call notes the back-end that
actually executed and any fallback with its reason (``rec.summary()``), which is how
:class:`~ar_course.system.Generator` reports its back-ends.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import math
import numbers
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ar_course.cli import exception_line
from ar_course.project import install_command
from ar_course.utils import check_number, is_integer_tensor

from . import env
from .calibrate import Calibrator, default_cache_path
from .launch import pow2_at_least
from .masks import MaskSpec, PrefixMask, dense_mask, prefix_mask, values_readable
from .precision import compute_dtype
from .reference import _nearest_rows

BACKENDS = ("auto", "torch", "numba", "numba_cpu", "triton")
OPS = ("vq_nearest", "flash_attention", "decode_attention", "softmax")
"""The entry points whose back-end :func:`select_backend` chooses."""
CPU_VQ_MIN_PAIRS = 1 << 16
"""``vq_nearest`` on CPU uses numba (when installed) from this many (vector, code) pairs on; torch below."""
CALIBRATOR = Calibrator(path=default_cache_path())
"""Decides kernel or torch for ``"auto"`` on a GPU (replace it to change the timer, the file or the margin)."""
_FAILED: dict[str, str] = {}  # kind of call -> why its kernel failed under "auto" (it stays on torch)


# -- what ran ----------------------------------------------------------------------------------------------


@dataclass
class DispatchRecord:
    """The back-ends that executed inside one :func:`record_dispatch` block, and the fallbacks."""

    calls: dict[str, Counter] = field(default_factory=dict)  # op -> Counter({backend: calls})
    fallbacks: list[str] = field(default_factory=list)  # "triton flash_attention: <error> (used torch)", once each

    def backend(self, op: str) -> str:
        """What ran ``op``: one name (``"triton"``), several with their call counts (``"triton x30, torch x6"``,
        most calls first) or ``"none"`` when ``op`` was never called."""
        counts = self.calls.get(op)
        if not counts:
            return "none"
        if len(counts) == 1:
            return next(iter(counts))
        return ", ".join(f"{name} x{n}" for name, n in counts.most_common())

    def summary(self, *ops: str) -> dict[str, str | list[str]]:
        """``{op: self.backend(op), ..., "fallbacks": [...]}`` for ``ops`` (default: every op called)."""
        return {**{op: self.backend(op) for op in ops or tuple(self.calls)}, "fallbacks": list(self.fallbacks)}


_RECORD: contextvars.ContextVar[DispatchRecord | None] = contextvars.ContextVar("ar_course_dispatch", default=None)


@contextlib.contextmanager
def record_dispatch() -> Iterator[DispatchRecord]:
    """Collect what every kernel entry point runs inside the block (this thread / task only; an inner block
    collects for itself)."""
    record = DispatchRecord()
    token = _RECORD.set(record)
    try:
        yield record
    finally:
        _RECORD.reset(token)


def note_dispatch(record: DispatchRecord) -> None:
    """Add what ``record`` collected to the enclosing :func:`record_dispatch` block, if any: a CUDA-graph replay
    runs the kernels its capture recorded without running their Python entry points, so the graph step reports
    the capture's record at every replay."""
    current = _RECORD.get()
    if current is None:
        return
    for op, counts in record.calls.items():
        current.calls.setdefault(op, Counter()).update(counts)
    current.fallbacks.extend(f for f in record.fallbacks if f not in current.fallbacks)


def _ran(op: str, backend: str, out: torch.Tensor, fallback: str | None = None) -> torch.Tensor:
    """Note that ``backend`` computed ``op`` (and why a kernel did not, if one was meant to); returns ``out``.
    Inside a ``torch.compile`` trace nothing is noted (dynamo cannot read the ContextVar: a graph break per call)."""
    if torch.compiler.is_compiling():
        return out
    record = _RECORD.get()
    if record is not None:
        record.calls.setdefault(op, Counter())[backend] += 1
        if fallback is not None and fallback not in record.fallbacks:
            record.fallbacks.append(fallback)
    return out


# -- choosing ----------------------------------------------------------------------------------------------


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
    """None if ``backend`` can run on ``device`` here, else the reason it cannot (a missing package first)."""
    if backend == "torch":
        return None
    if backend in ("numba", "numba_cpu") and not env.NUMBA_CPU_INSTALLED:
        return f"numba is not installed ({install_command('kernels')})"
    if backend == "numba_cpu":
        return None if device.type == "cpu" else "numba_cpu runs on CPU tensors only"
    if backend == "numba":
        if not env.NUMBA_INSTALLED:
            return f"numba-cuda is not installed ({install_command('kernels')})"
        if not env.NUMBA_CUDA_USABLE:
            return "numba.cuda cannot run here (no GPU and the CUDA simulator is off)"
        if env.CUDA_SIMULATOR and device.type != "cpu":
            return "numba's CUDA simulator runs on CPU tensors only"
        if not env.CUDA_SIMULATOR and device.type != "cuda":
            return "numba.cuda kernels need CUDA tensors on a GPU machine"
        return None
    if _triton() is None:  # backend == "triton"
        return f"Triton is not installed ({install_command('triton')}, on Linux)"
    if env.triton_interpreted() != (device.type == "cpu"):
        return ("Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors only" if env.triton_interpreted()
                else "compiled Triton kernels need CUDA tensors")
    return None


def select_backend(op: str, device: torch.device | str, backend: str = "auto", large: bool = False) -> str:
    """The backend ``op`` (``"vq_nearest"``, ``"flash_attention"``, ``"decode_attention"``, ``"softmax"``) uses.

    A forced backend is returned if it can run here and raises ``RuntimeError`` with the reason if not;
    ``"auto"`` never fails on good arguments: it returns the kernel it may use on this device, or ``"torch"``.
    On a GPU that kernel still has to win its measurement for each kind of call (the calls record what really
    ran). ``device`` may be a ``torch.device`` or a str (``"cpu"``, ``"cuda:0"``).

    Raises:
        TypeError: ``device`` is neither a ``torch.device`` nor a str.
        ValueError: an unknown ``op`` (not in :data:`OPS`), device string or backend.
    """
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    elif not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device or a str such as 'cpu', got {device!r} "
                        f"({type(device).__name__})")
    return backend_rule(op, device.type, lambda b: _usable(b, device), backend, large)


def backend_rule(op: str, device_type: str, why_not: Callable[[str], str | None], backend: str = "auto",
                 large: bool = False) -> str:
    """:func:`select_backend`'s choice, given what can run: ``why_not(b)`` is None when backend ``b`` can run on
    a ``device_type`` device here, else the reason it cannot.

    A forced backend is returned when it can run (``RuntimeError`` with the reason when not); ``"auto"`` takes,
    on ``"cuda"``, Triton, else numba, else torch, and on any other device torch (``"numba_cpu"`` for a
    ``large`` ``vq_nearest`` when it can run): the candidate, which on a GPU must still win its measurement per
    kind of call.
    An unknown ``op`` (not in :data:`OPS`) or backend, or a backend ``op`` does not have, raises ``ValueError``.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the ops are {OPS}")
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
        return next(b for b in ("triton", "numba", "torch") if why_not(b) is None)
    return "numba_cpu" if op == "vq_nearest" and large and why_not("numba_cpu") is None else "torch"


@lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class KernelError(RuntimeError):
    """A kernel raised while it was being measured (the original exception is the ``__cause__``)."""


def auto_choice(key: str, kernel: str, run_kernel: Callable[[], object], run_torch: Callable[[], object],
                calibrator: Calibrator) -> str:
    """``kernel`` or ``"torch"`` for the kind of call ``key``: remembered, or measured now by ``calibrator``
    (torch first). Raises :class:`KernelError` if ``run_kernel`` raises; an error of ``run_torch`` is the
    caller's own."""
    decided = calibrator.lookup(key)
    if decided is not None:
        return decided
    torch_seconds = calibrator.timer(run_torch)
    try:
        kernel_seconds = calibrator.timer(run_kernel)
    except Exception as exc:  # noqa: BLE001 - whatever the kernel raised, the caller falls back
        raise KernelError(f"the {kernel} kernel failed while being measured") from exc
    return calibrator.decide(key, kernel, kernel_seconds, torch_seconds)


def _dispatch(op: str, backend: str, chosen: str, device: torch.device, kernels: dict[str, Callable[[], torch.Tensor]],
              plain: Callable[[], torch.Tensor], bucket: tuple) -> torch.Tensor:
    """Run ``op`` on ``chosen`` (from :func:`select_backend`) or torch, and record what ran.

    Forced back-ends run or raise. Under ``"auto"`` a measured device runs the kernel only where it won its
    measurement (inside a ``torch.compile`` trace or a CUDA-graph capture nothing is timed: an earlier
    decision holds, else torch); a kernel that raises is reported once as a warning, answered by torch and
    remembered, so that kind of call stays on torch in this process."""
    if chosen not in kernels:
        return _ran(op, "torch", plain())
    if backend != "auto":
        with _one_at_a_time(chosen):
            return _ran(op, chosen, kernels[chosen]())
    key = "|".join(map(str, (op, chosen, _device_name(device), *bucket)))
    if key in _FAILED:
        return _ran(op, "torch", plain(), _FAILED[key])
    decided = chosen
    if CALIBRATOR.measures(device):
        if not values_readable(device):  # inside a torch.compile trace or a CUDA-graph capture: nothing timed
            decided = CALIBRATOR.lookup(key) or "torch"
        else:
            try:
                decided = auto_choice(key, chosen, kernels[chosen], plain, CALIBRATOR)
            except KernelError as exc:
                return _fall_back(op, chosen, key, exc.__cause__, plain)
    if decided == "torch":
        return _ran(op, "torch", plain())
    try:
        with _one_at_a_time(chosen):
            out = kernels[chosen]()
    except Exception as exc:  # noqa: BLE001 - any kernel failure: torch still gives the answer
        return _fall_back(op, chosen, key, exc, plain)
    return _ran(op, chosen, out)


_SIMULATED = threading.RLock()
"""Held while a kernel runs in numba's CUDA simulator or Triton's interpreter: both keep process-wide state
(the simulated thread's block index, the interpreter's current program), so two threads launching kernels at
once would fail. Compiled kernels (a GPU, numba's CPU kernel) run side by side."""


def _one_at_a_time(backend: str) -> contextlib.AbstractContextManager:
    """The lock of simulated launches for ``backend`` where it is simulated, else nothing to hold."""
    simulated = (backend == "numba" and env.CUDA_SIMULATOR) or (backend == "triton" and env.triton_interpreted())
    return _SIMULATED if simulated else contextlib.nullcontext()


def _fall_back(op: str, kernel: str, key: str, exc: BaseException, plain: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Answer with torch after ``kernel`` raised ``exc``; warn once and keep ``key`` on torch from now on."""
    what = exception_line(exc)
    _FAILED[key] = f"{kernel} {op}: {what} (used torch)"
    warnings.warn(f"{op}: the {kernel} kernel failed ({what}); torch answers this kind of call from now on",
                  RuntimeWarning, stacklevel=4)
    return _ran(op, "torch", plain(), _FAILED[key])


def _module(name: str) -> ModuleType:
    """A kernel module of this package, imported on first use."""
    return importlib.import_module(f"{__package__}.{name}")


# -- the entry points --------------------------------------------------------------------------------------


def _check_float(name: str, x: torch.Tensor) -> None:
    """``TypeError`` when ``x`` is not a torch.Tensor (a NumPy array, a list), ``ValueError`` when its dtype is
    not floating-point."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {x.dtype}")


def _check_vq(z: torch.Tensor, codebook: torch.Tensor) -> None:
    """The input checks of :func:`vq_nearest` and its reference: float tensors on one device, ``codebook``
    ``(K, D)`` with ``K, D >= 1``, ``z`` ``(..., D)``."""
    _check_float("z", z)
    _check_float("codebook", codebook)
    if codebook.ndim != 2 or codebook.shape[0] == 0 or codebook.shape[1] == 0:
        raise ValueError(f"codebook must be (K, D) with K >= 1 and D >= 1, got shape {tuple(codebook.shape)}")
    if z.ndim < 1 or z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"z must end in D={codebook.shape[1]} (the codebook's width), got shape {tuple(z.shape)}")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but the codebook is on {codebook.device}")


def vq_nearest(z: torch.Tensor, codebook: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Index of the nearest code (squared Euclidean distance) for every vector; ties go to the lowest index.

    z (..., D), codebook (K, D) on the same device -> int64 indices of shape z.shape[:-1]. Every back-end, torch's
    included, computes the distances in float32 so that they agree: float64 input is rounded first, and codes
    closer together than float32 resolves may be told apart differently from a float64 ``torch.cdist``
    (:func:`ar_course.tokenizers.functional.vq_lookup` keeps the input's dtype).

    Like ``torch.cdist(z, codebook).argmin(-1)``, which it replaces, it does not scan its inputs for NaN or
    infinity (that would cost a pass over ``z`` and a host sync): the index of a non-finite vector, or next to
    a non-finite code, is unspecified and differs between back-ends (the numba CPU kernel is compiled with
    fast-math). Check with :func:`ar_course.utils.check_finite` first where input may be bad, as the
    quantizers do.

    Raises ``TypeError`` for inputs that are not torch tensors, ``ValueError`` for bad dtypes, shapes or
    devices, and ``RuntimeError`` for a forced ``backend`` that cannot run here (:func:`select_backend`).
    """
    _check_vq(z, codebook)
    flat = z.reshape(-1, z.shape[-1])  # (N, D)
    large = flat.shape[0] * codebook.shape[0] >= CPU_VQ_MIN_PAIRS
    chosen = select_backend("vq_nearest", z.device, backend, large)
    idx = _dispatch("vq_nearest", backend, chosen, z.device, {
        "numba_cpu": lambda: _module("cpu_vq").vq_nearest_cpu(flat, codebook),
        "numba": lambda: _module("cuda_vq").vq_nearest_numba(flat, codebook),
        "triton": lambda: _triton().vq_nearest_triton(flat, codebook),
    }, lambda: _nearest_rows(flat.float(), codebook.float()),
        (pow2_at_least(flat.shape[0]), pow2_at_least(codebook.shape[0]), codebook.shape[1]))
    return idx.reshape(z.shape[:-1])


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     kv_names: tuple[str, str] = ("k", "v")) -> None:
    """q (B, H, T_q, D) and k, v (B, H, T_k, D) on q's device; ``kv_names`` name k and v in the messages."""
    for name, x in (("q", q), *zip(kv_names, (k, v))):
        _check_float(name, x)
        if x.ndim != 4:
            raise ValueError(f"{name} must be (B, H, T, D), got shape {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"need q (B, H, T_q, D) and k, v (B, H, T_k, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] == 0 or q.shape[3] == 0:  # no key to attend to / nothing to scale by 1/sqrt(D)
        raise ValueError(f"need T_k >= 1 keys and a head size D >= 1; got q {tuple(q.shape)}, k, v "
                         f"{tuple(k.shape)}")


def _scale(scale: float | None, dim: int) -> float:
    return 1.0 / math.sqrt(dim) if scale is None else check_number("scale", scale, lo=0, lo_open=True)


def _needs_grad(*xs: torch.Tensor) -> bool:
    """True when autograd would need a backward pass through these inputs (the kernels have none)."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _select_forward_only(op: str, device: torch.device, backend: str, *inputs: torch.Tensor) -> str:
    """:func:`select_backend`, except that ``"auto"`` takes torch when a gradient must flow back through
    ``inputs``: the kernels have no backward pass.

    Raises:
        ValueError: a kernel backend is forced while a gradient must flow back through ``inputs`` (its output
            would silently carry none: the weights before this call would never learn).
    """
    chosen = select_backend(op, device, backend)
    if not _needs_grad(*inputs):
        return chosen
    if backend == "auto":
        return "torch"
    if chosen != "torch":
        raise ValueError(f"{op}: the {chosen} kernels have no backward pass, and an input requires grad; use "
                         f"backend='auto' or 'torch' to train, or call it under torch.no_grad()")
    return chosen


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """torch's fused attention, also on inputs of mixed dtypes (cast to :func:`~.precision.compute_dtype`;
    under autocast torch casts them itself), returned in q's dtype."""
    q_in = q
    if not q.dtype == k.dtype == v.dtype and not torch.is_autocast_enabled(q.device.type):
        dtype = compute_dtype(q, k, v)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return out if out.dtype == q_in.dtype else out.to(q_in.dtype)


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

    q (B, H, T_q, D), k and v (B, H, T_k, D), in any mix of float32 / float16 / bfloat16 -> (B, H, T_q, D) in
    q's dtype, the products in :func:`~.precision.compute_dtype` (the numba kernels compute in float32).
    ``mask``: None, ``"causal"`` (the queries are the last T_q of T_k positions), a
    :class:`~ar_course.kernels.masks.BlockCausal` (VAR), or a (T_q, T_k) bool tensor (True = may attend).
    Kernels handle masks whose rows are prefixes (all of the above but an arbitrary bool tensor); with
    ``backend="auto"`` any other mask runs on torch. ``scale`` defaults to 1/sqrt(D). Raises ``ValueError``
    for bad shapes, dtypes, masks or scale, or a forced kernel ``backend`` while q, k or v requires grad (the
    kernels have no backward pass), ``TypeError`` for q, k, v that are not torch tensors or a scale that is not
    a number, and ``RuntimeError`` for a forced ``backend`` that cannot run here (:func:`select_backend`).
    """
    _check_attention(q, k, v)
    t_q, t_k = q.shape[2], k.shape[2]
    scale = _scale(scale, q.shape[-1])
    chosen = _select_forward_only("flash_attention", q.device, backend, q, k, v)
    plan: PrefixMask | None = None
    if chosen != "torch":
        try:
            plan = prefix_mask(mask, t_q, t_k, q.device)
        except ValueError:
            if backend != "auto":
                raise  # not a prefix mask, or a bad one: auto's torch path names the problem

    def plain() -> torch.Tensor:
        if mask is None or (isinstance(mask, str) and mask == "causal" and t_q == t_k):
            return _sdpa(q, k, v, is_causal=mask is not None, scale=scale)
        return _sdpa(q, k, v, attn_mask=dense_mask(mask, t_q, t_k, q.device), scale=scale)

    dtype = compute_dtype(q, k, v)
    kernels = {} if plan is None else {
        "numba": lambda: _module("cuda_attention").flash_attention_numba(
            q, k, v, plan.kv_len(q.device), scale).to(q.dtype),
        "triton": lambda: _triton().flash_attention_triton(q, k, v, plan, scale, compute_dtype=dtype),
    }
    bucket = (dtype, q.shape[-1], "none" if plan is None else plan.kind, pow2_at_least(t_q), pow2_at_least(t_k),
              pow2_at_least(q.shape[0] * q.shape[1]))
    return _dispatch("flash_attention", backend, chosen, q.device, kernels, plain, bucket)


def _check_length(length: int | torch.Tensor, b: int, t_max: int, device: torch.device) -> int | torch.Tensor:
    """``length`` as an int in 1..T_max, or a (B,) integer tensor on ``device`` whose values are checked
    with one host sync (pass an int to avoid it)."""
    if isinstance(length, numbers.Integral) and not isinstance(length, bool):
        if not 1 <= int(length) <= t_max:
            raise ValueError(f"every length must be in 1..T_max={t_max}, got {int(length)}")
        return int(length)
    what = f"length must be an int or a (B,) = ({b},) integer tensor"
    if not isinstance(length, torch.Tensor):
        raise TypeError(f"{what}, got {type(length).__name__}")
    if (not is_integer_tensor(length)
            or length.ndim > 1 or (length.ndim == 1 and length.shape[0] != b)):
        raise ValueError(f"{what}, got {length!r}")
    lengths = length.to(device).expand(b)  # (B,)
    low, high = lengths.aminmax()
    if int(low) < 1 or int(high) > t_max:
        raise ValueError(f"every length must be in 1..T_max={t_max}, got {lengths.tolist()}")
    return lengths


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

    q (B, H, D); k_cache, v_cache (B, H, T_max, D), any mix of float32 / float16 / bfloat16; ``length`` an
    int or a (B,) integer tensor with 1 <= length <= T_max (an int costs no host sync). Returns (B, H, D) in
    q's dtype. The kernels split the keys into chunks, summarise each chunk in parallel and combine the
    summaries (split-K / flash decoding). Raises ``ValueError`` for bad shapes, dtypes, lengths or scale, or a
    forced kernel ``backend`` while an input requires grad (``TypeError`` for inputs that are not torch
    tensors, a ``length`` neither an int nor a tensor, or a scale that is not a number), and ``RuntimeError``
    for a forced ``backend`` that cannot run here (:func:`select_backend`).
    """
    _check_float("q", q)
    if q.ndim != 3:
        raise ValueError(f"q must be (B, H, D), got shape {tuple(q.shape)}")
    _check_attention(q[:, :, None, :], k_cache, v_cache, ("k_cache", "v_cache"))
    b, _, t_max, _ = k_cache.shape
    length = _check_length(length, b, t_max, q.device)
    scale = _scale(scale, q.shape[-1])
    chosen = _select_forward_only("decode_attention", q.device, backend, q, k_cache, v_cache)

    def plain() -> torch.Tensor:
        if isinstance(length, int):
            out = _sdpa(q[:, :, None, :], k_cache[:, :, :length], v_cache[:, :, :length], scale=scale)
            return out.squeeze(2)
        visible = (torch.arange(t_max, device=q.device)[None, :] < length[:, None])[:, None, :, None]  # (B,1,T,1)
        # entries past a row's length may be unwritten (even NaN): zero them so that none can reach the output
        k_used, v_used = torch.where(visible, k_cache, 0.0), torch.where(visible, v_cache, 0.0)
        out = _sdpa(q[:, :, None, :], k_used, v_used, attn_mask=visible.transpose(-2, -1), scale=scale)  # (B,H,1,D)
        return out.squeeze(2)

    def numba() -> torch.Tensor:
        lengths = length if isinstance(length, torch.Tensor) else torch.full((b,), length, device=q.device)
        return _module("cuda_attention").decode_attention_numba(q, k_cache, v_cache, lengths, scale).to(q.dtype)

    bucket = (k_cache.dtype, q.dtype, q.shape[-1], pow2_at_least(length if isinstance(length, int) else t_max),
              pow2_at_least(b * q.shape[1]), "ragged" if isinstance(length, torch.Tensor) else "even")
    return _dispatch("decode_attention", backend, chosen, q.device, {
        "numba": numba,
        "triton": lambda: _triton().decode_attention_triton(q, k_cache, v_cache, length, scale),
    }, plain, bucket)


def softmax(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Softmax over the last axis of x (..., C), same shape and dtype, with the online-softmax kernels.
    Raises ``TypeError`` for an ``x`` that is not a torch.Tensor, ``ValueError`` for a non-float ``x``, a 0-d
    one, one with ``C = 0``, or a forced kernel ``backend`` while ``x`` requires grad."""
    _check_float("x", x)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be (..., C) with C >= 1, got shape {tuple(x.shape)}")
    rows = x.reshape(-1, x.shape[-1])  # (R, C)
    chosen = _select_forward_only("softmax", x.device, backend, x)
    out = _dispatch("softmax", backend, chosen, x.device, {
        "numba": lambda: _module("cuda_softmax").softmax(rows).to(x.dtype),
        "triton": lambda: _triton().softmax_triton(rows),
    }, lambda: torch.softmax(rows, dim=-1), (x.dtype, pow2_at_least(rows.shape[0]), pow2_at_least(rows.shape[1])))
    return out.reshape(x.shape)
