"""Seeding, device selection, argument checks and small helpers shared by every chapter.

Argument checks: every public function of the library checks its input with the ``check_*`` functions below,
so that bad input fails at once with one line naming the argument and the value
(``ValueError: temperature must be a finite number >= 0, got nan``), never deep inside with an ``IndexError``.
The rule they follow:

* ``TypeError``: an argument that must be a Python number or bool is something else (a string, ``None``, a
  bool where a number is expected, a float where an integer is expected -- ``top_k=5.0`` is refused).
* ``ValueError``: everything else -- a number out of range or not finite, a tensor of the wrong shape, dtype
  or device type, empty, holding NaN, or holding ids out of range.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import numbers
import operator
import os
import random
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import tqdm.std


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block (dropout off), given back in the mode it came in even when the block
    raises (a reward that fails its check, Ctrl-C in an evaluation)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def kept_random_state() -> Iterator[None]:
    """Give back the global random generators as they were once the block ends: Python's, NumPy's, torch's on the
    CPU and on every CUDA device already in use. A block that seeds them (a trainer's :func:`seed_everything`) or
    draws from them (a model's random initialisation) leaves the caller's random numbers where they were. Also a
    decorator: ``@kept_random_state()``."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def progress_bar_class(widgets: bool | None = None) -> type:
    """The progress bar every long loop of the package uses: tqdm's notebook widget bar in Jupyter when
    ipywidgets is installed (``widgets``: None to look), else its text bar. ``tqdm.auto`` alone warns "IProgress
    not found" in a kernel without ipywidgets, as a library-only install is."""
    if widgets is None:
        try:
            widgets = importlib.util.find_spec("ipywidgets") is not None
        except (ImportError, ValueError):  # a module entry of None (blocked) or a broken package
            widgets = False
    if not widgets:
        return tqdm.std.tqdm
    from tqdm.auto import tqdm as auto  # imported only here: importing tqdm.auto is what warns without ipywidgets

    return auto


progress_bar = progress_bar_class()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU ``torch.Generator`` seeded the same.

    ``seed`` is any integer a ``torch.Generator`` takes (:data:`SEED_RANGE`); NumPy, which takes
    ``[0, 2**32)``, gets ``seed % 2**32``.

    Raises:
        TypeError, ValueError: as :func:`check_seed` (``seed=1.5``, ``seed="3"``, ``seed=2**64``).
    """
    seed = check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


DEVICE_ENV = "AR_COURSE_DEVICE"


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """The device ``prefer`` names (a name or a ``torch.device``). Without one (``None`` or ``"auto"``): the
    device the environment variable ``AR_COURSE_DEVICE`` names when it is set (and not ``auto``), else ``cuda``
    when a CUDA GPU is present, else ``cpu``.

    Raises:
        TypeError: ``prefer`` is neither a str, a ``torch.device`` nor None (``0``: write ``"cuda:0"``).
        ValueError: ``prefer`` (or ``AR_COURSE_DEVICE``) is not a device torch knows (``"gpu"``...).
        RuntimeError: a CUDA or MPS device is asked for on a machine without one, or ``cuda:N`` past the
            machine's GPUs (``"meta"``, torch's device without data, is always allowed); the message names
            ``AR_COURSE_DEVICE`` when the choice came from it.
    """
    if prefer is not None and not isinstance(prefer, (str, torch.device)):
        raise TypeError(f"device must be a name such as 'cpu' or 'cuda:0', a torch.device or None, got "
                        f"{type(prefer).__name__} {prefer!r}")
    from_env = prefer is None or prefer == "auto"
    choice = os.environ.get(DEVICE_ENV, "auto") if from_env else prefer
    if choice == "auto" or (from_env and not choice):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    asked = f"device {choice!r} requested{f' by {DEVICE_ENV}' if from_env else ''}"
    try:
        dev = torch.device(choice)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {choice!r}{f' in {DEVICE_ENV}' if from_env else ''}: use 'cpu', "
                         "'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{asked} but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise RuntimeError(f"{asked} but this machine has {count} CUDA device{'' if count == 1 else 's'} "
                           f"(cuda:0..cuda:{count - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"{asked} but MPS (Apple GPU) is not available")
    return dev


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def generate_in_batches(
    generate_fn: Callable[[torch.Tensor], torch.Tensor],
    classes: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Call ``generate_fn`` on consecutive chunks of ``classes`` ``(B,)``, ``batch_size`` classes each (the
    last chunk may be shorter), in order, and concatenate what it returns, ``(b, ...)`` per chunk: ``(B, ...)``.

    Every generator of the package splits a request this way: a chunk is one batched sampling loop, whose
    memory (the KV caches) grows with it. When one random generator runs through all chunks, the samples
    depend on ``batch_size``.

    Raises:
        TypeError: ``classes`` is not a tensor, or ``batch_size`` is not an integer.
        ValueError: ``classes`` is 0-d or empty, or ``batch_size < 1``.
    """
    if not isinstance(classes, torch.Tensor):
        raise TypeError(f"classes must be a (B,) tensor, got {type(classes).__name__}")
    if classes.ndim == 0 or classes.shape[0] == 0:
        raise ValueError(f"classes must be a non-empty (B,) tensor, got shape {tuple(classes.shape)}")
    batch_size = check_int("batch_size", batch_size, lo=1)
    return torch.cat([generate_fn(chunk) for chunk in classes.split(batch_size)])  # (B, ...)


# -- argument checks ---------------------------------------------------------------------------------------


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    """``">= 0"``, ``"in (0, 1]"``... (empty when unbounded)."""
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def _outside(x: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    below = lo is not None and (x <= lo if lo_open else x < lo)
    above = hi is not None and (x >= hi if hi_open else x > hi)
    return below or above


def _is_bool(value: object) -> bool:
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def check_number(
    name: str, value: object, lo: float | None = None, hi: float | None = None, *,
    lo_open: bool = False, hi_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` within the bounds (``lo_open``/``hi_open``: the bound itself excluded).

    Accepts Python and NumPy ints and floats and 0-d real tensors (read with one host sync on CUDA).

    Raises:
        TypeError: ``value`` is not a real number (a bool, string, ``None``, complex, a tensor of several values).
        ValueError: it is NaN, infinite, too large for a float (``10**400``) or out of bounds:
            ``temperature must be a finite number >= 0, got nan``.
    """
    what = f"{name} must be a finite number{_interval(lo, hi, lo_open, hi_open)}"
    is_scalar_tensor = isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_complex()
    if _is_bool(value) or not (isinstance(value, numbers.Real) or is_scalar_tensor):
        raise TypeError(f"{what}, got {value!r} ({type(value).__name__})")
    try:
        x = float(value)
    except OverflowError:  # an int (or Fraction) beyond float's range; str() of a huge int may itself fail
        size = f"about 2**{abs(value).bit_length() - 1}" if isinstance(value, int) else type(value).__name__
        raise ValueError(f"{what}, got a number too large for a float ({size})") from None
    if not math.isfinite(x) or _outside(x, lo, hi, lo_open, hi_open):
        raise ValueError(f"{what}, got {x}")
    return x


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an ``int`` in ``[lo, hi]``. Accepts Python and NumPy integers (and 0-d integer tensors).

    Raises:
        TypeError: ``value`` is not an integer (a float, even ``5.0``; a bool; a string; ``None``; a tensor or
            array that is not 0-d, even of one element).
        ValueError: it lies outside ``[lo, hi]``: ``top_k must be an integer >= 1, got 0``.
    """
    what = f"{name} must be an integer{_interval(lo, hi, False, False)}"
    if _is_bool(value):
        raise TypeError(f"{what}, got {value!r} (bool)")
    if isinstance(value, torch.Tensor) and value.ndim != 0:  # operator.index reads a one-element tensor
        raise TypeError(f"{what}, got a tensor of shape {tuple(value.shape)} (pass a 0-d tensor or an int)")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{what}, got {value!r} ({type(value).__name__})") from None
    if _outside(n, lo, hi, False, False):
        raise ValueError(f"{what}, got {n}")
    return n


SEED_RANGE = (-(2**63), 2**64 - 1)
"""The seeds a ``torch.Generator`` accepts: signed or unsigned 64-bit integers."""


def check_seed(seed: object) -> int:
    """``seed`` as an ``int`` that ``torch.Generator.manual_seed`` accepts (in :data:`SEED_RANGE`); raises as
    :func:`check_int` (``seed must be an integer in [-9223372036854775808, 18446744073709551615], got ...``)."""
    return check_int("seed", seed, *SEED_RANGE)


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool (Python or NumPy); else ``TypeError`` (``"yes"`` or ``1`` are refused)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_grid(name: str, grid: object) -> tuple[int, int]:
    """``grid`` (a ``(rows, cols)`` tuple or list, as JSON gives it back) as two ints ``>= 1``.

    Raises:
        TypeError: a side that is not an integer (``grid rows must be an integer >= 1, got 8.0``).
        ValueError: not a pair (``grid must be (rows, cols), got (2, 2, 2)``) or a side ``< 1``.
    """
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"{name} must be (rows, cols), got {grid!r}")
    return check_int(f"{name} rows", grid[0], lo=1), check_int(f"{name} cols", grid[1], lo=1)


def _shape_text(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def is_integer_tensor(x: torch.Tensor) -> bool:
    """Whether ``x`` holds integers: an integer dtype (``uint8`` to ``int64``), not bool, float or complex."""
    return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is in half precision (or an integer tensor), else as it is: float32 stays (no
    copy) and float64 keeps its precision. Where a sum, a softmax or a cancellation needs more than 8 bits."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_same_device(name: str, x: torch.Tensor | torch.nn.Module, model: torch.nn.Module,
                      model_name: str = "the model") -> None:
    """``ValueError`` unless ``x`` (a tensor, or a module's parameters) is on ``model``'s device, which torch would
    otherwise refuse deep inside a layer: ``classes are on cpu, the model on cuda:0: move them with
    .to('cuda:0')``. A module without parameters, or anything else (for the caller's own checks), passes."""
    def device_of(m: object) -> torch.device | None:
        if isinstance(m, torch.Tensor):
            return m.device
        p = next(m.parameters(), None) if isinstance(m, torch.nn.Module) else None
        return None if p is None else p.device

    here, there = device_of(x), device_of(model)
    if here is not None and there is not None and here != there:
        raise ValueError(f"{name} {'are' if name.endswith('s') else 'is'} on {here}, {model_name} on {there}: move "
                         f"{'them' if name.endswith('s') else 'it'} with .to({str(there)!r})")


def check_fits(name: str, value: int, tensor_name: str, x: torch.Tensor) -> int:
    """``value`` if the integer tensor ``x`` can hold it, else ``ValueError`` (torch would wrap it into ``x``'s
    dtype: 256 compares equal to a uint8 0): ``mask_id=256 does not fit the dtype of ids, torch.uint8 (0..255):
    pass ids.long()``."""
    info = torch.iinfo(x.dtype)
    if not info.min <= value <= info.max:
        raise ValueError(f"{name}={value} does not fit the dtype of {tensor_name}, {x.dtype} ({info.min}.."
                         f"{info.max}): pass {tensor_name}.long()")
    return value


def check_ids(
    name: str, x: object, high: int, shape: Sequence[int | str], *, dtype: torch.dtype | None = torch.long,
    allow_empty: bool = False, ignore: int | None = None,
) -> torch.Tensor:
    """Check a tensor of ids (tokens, codes, classes): its shape, integer dtype and values in ``[0, high)``.

    Args:
        shape: the expected shape, an int where the size is fixed and a name where it is free, e.g.
            ``("B", "T")`` or ``(3,)``; the message prints it.
        dtype: the dtype required (``None``: any integer dtype but bool).
        allow_empty: accept a tensor with no elements (else ``ValueError``).
        ignore: one more value allowed outside the range (``-100``, the ignored target of cross-entropy).

    Reading the values costs one host sync on CUDA. Returns ``x``.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: wrong shape or dtype, empty, or an id outside ``[0, high)``:
            ``idx must lie in [0, 255], got 256``.
    """
    kind = "long" if dtype == torch.long else "integer" if dtype is None else str(dtype)
    what = f"{name} must be a {_shape_text(shape)} {kind} tensor"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}, got {type(x).__name__}")
    wrong_dtype = x.dtype != dtype if dtype is not None else not is_integer_tensor(x)
    wrong_shape = x.ndim != len(shape) or any(isinstance(d, int) and n != d for n, d in zip(x.shape, shape))
    if wrong_dtype or wrong_shape:
        raise ValueError(f"{what}, got {tuple(x.shape)} {x.dtype}")
    if x.numel() == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    wide = x if x.dtype == torch.int64 else x.long()  # a narrower type wraps `high` (uint8: 256 is 0)
    bad = (wide < 0) | (wide >= high)
    if ignore is not None:
        bad &= wide != ignore
    if bool(bad.any()):
        allowed = f" (or {ignore})" if ignore is not None else ""
        raise ValueError(f"{name} must lie in [0, {high - 1}]{allowed}, got {int(wide[bad][0])}")
    return x


def check_image_values(name: str, x: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """``x`` if its values are finite and look like images in ``[0, data_range]``: values up to half a
    ``data_range`` outside it pass (decoder outputs overshoot a little), a range like 0..255 (for
    ``data_range = 1``) or [-1, 1] does not. One min/max read (one host sync on CUDA).

    An empty ``x`` passes (callers that need images refuse an empty batch themselves).

    Raises ``ValueError``: ``images must be finite, got nan`` (as :func:`check_finite`) or ``images must be in
    [0, 1], got values in [0.00, 254.95] (divide 0..255 images by 255)``."""
    if x.numel() == 0:
        return x
    lo, hi = torch.stack([x.amin(), x.amax()]).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        check_finite(name, x)  # raises, naming the first bad value
    if lo < -0.5 * data_range or hi > 1.5 * data_range:
        hint = ("divide 0..255 images by 255" if hi > 1.5 * data_range
                else "map [-1, 1] images with (x + 1) / 2 first")
        raise ValueError(f"{name} must be in [0, {data_range:g}], got values in [{lo:.2f}, {hi:.2f}] ({hint})")
    return x


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` if every element is finite, else ``ValueError: z must be finite, got nan`` (the first bad value).
    One host sync on CUDA."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        raise ValueError(f"{name} must be finite, got {float(x.detach()[~finite][0])}")
    return x


def content_digest(*parts: torch.Tensor | torch.nn.Module) -> str:
    """A short SHA-256 (12 hex digits) of ``parts``' dtypes, shapes and values, to record in a run's ``settings``
    which data or which model (its ``state_dict`` in order) a run used: a resume on other data is then refused.

    Raises:
        TypeError: a part is neither a tensor nor a module.
    """
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.nn.Module):
            tensors = list(part.state_dict().values())
        elif isinstance(part, torch.Tensor):
            tensors = [part]
        else:
            raise TypeError(f"content_digest takes tensors and modules, got {type(part).__name__}")
        for t in tensors:
            t = t.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())  # (numel * itemsize,) raw bytes, not copied
    return digest.hexdigest()[:12]
