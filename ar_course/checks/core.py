"""The exercise/check framework every chapter uses.

A chapter module creates one :class:`Chapter` and registers one check per exercise::

    chapter = Chapter(1, "Vector quantization")

    @chapter.exercise("1.1", reference=ref.vq_lookup,
                      hints=("what does 'nearest' mean for two vectors?", "...", "the key line"))
    def vq_lookup(fn, ref):
        compare_cases(fn, ref, cases(), mistakes=[Mistake(dot_product_argmax, "that is the largest dot product")])

Calling the registered check with the learner's function prints exactly one line:

* ``Exercise 1.1 passed``
* ``Exercise 1.1 failed: <what differed, on which input>[; <diagnosis>]. Hint: <hint>``
* ``Exercise 1.1 not attempted yet`` (the function is still a ``raise NotImplementedError`` stub);
* ``Exercise 1.2 not checked yet: your function calls `vq_lookup` (Exercise 1.1), which is not written yet: ...``
  (the function runs into another exercise's stub).

**Run All.** By default a check only prints its line and records its verdict (``chapter.results``; it returns
nothing, so a check cell shows just its line), so a learner notebook runs to its end: ``chapter.use(fn)`` hands
the cells after a check the learner's function once its check has passed, else the reference with a one-line
note. With the environment variable
``AR_COURSE_STRICT_CHECKS=1`` (:data:`STRICT_ENV`) a check also raises: :class:`CheckFailure` (an
``AssertionError``) on a wrong answer and :class:`NotAttempted` on a stub. Every pytest run of the repository
is strict (its ``conftest.py``), so a solution notebook whose check fails fails under nbval, and the checks'
own tests see the exceptions. The grader needs neither: it reads the verdicts from the report below.

**Hints** come in levels, from a nudge to the key line. A failure prints the first level; a repeated failure
of the same exercise prints the next one, up to the last but one; ``chapter.hint("1.2")`` (in a notebook,
``checks.ch01.hint("1.2")``) prints the next level not shown yet, the last included. So the answer never
comes first and never unasked.

**Diagnoses.** A check may list :class:`Mistake` s, plausible wrong answers with the reference's signature.
When the learner's output differs from the reference but matches a mistake's on the failing input (values,
and gradients when they are compared), the failure line says which mistake it is.

When the environment variable ``AR_COURSE_GRADE_REPORT`` names a file, each result is also appended to it
as one JSON line; the grader (:mod:`ar_course.grade`) reads that file.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import os
import re
import sys
import sysconfig
import traceback
from pathlib import Path
from dataclasses import dataclass, field
from types import CodeType
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ar_course.utils import kept_random_state

REPORT_ENV = "AR_COURSE_GRADE_REPORT"
STRICT_ENV = "AR_COURSE_STRICT_CHECKS"

PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not attempted"


class CheckFailure(AssertionError):
    """Raised by a check when the learner's answer is wrong. The message is the one-line reason."""


class NotAttempted(NotImplementedError):
    """Re-raised by a check whose learner function is still a stub."""


@dataclass
class Case:
    """One input for a check: a readable name, positional and keyword arguments, and, where this input leaves
    accurate answers further apart than the check's tolerance (ill-conditioned data), its own ``atol``."""

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    atol: float | None = None


# --------------------------------------------------------------------------------------------------------
# describing and comparing values


def describe(x: Any) -> str:
    """A short description of a value for messages: ``Tensor(4, 3) float32 cpu``."""
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} {x.device.type}"
    if isinstance(x, np.ndarray):
        return f"ndarray{x.shape} {x.dtype}"
    if isinstance(x, (list, tuple)):
        inner = ", ".join(describe(v) for v in list(x)[:4]) + (", ..." if len(x) > 4 else "")
        return f"{type(x).__name__}[{inner}]"
    if isinstance(x, float):
        return f"{x:.6g}"
    if type(x).__repr__ is object.__repr__:  # "<... object at 0x...>": an address that changes every run
        return type(x).__name__
    return repr(x) if len(repr(x)) < 60 else type(x).__name__


def _kind(x: Any) -> str:
    """The type of ``x`` for a "should be ..." message; None also asks whether a ``return`` is missing."""
    return "None (does your function end without a return?)" if x is None else type(x).__name__


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def compare(
    got: Any,
    expected: Any,
    *,
    where: str = "",
    atol: float = 1e-5,
    rtol: float = 1e-4,
    check_dtype: bool = True,
    check_device: bool = True,
    name: str = "output",
) -> None:
    """Raise :class:`CheckFailure` naming the first difference between ``got`` and ``expected``.

    Tensors are compared by type, shape, dtype, device, then values (``allclose`` for floating point,
    exact otherwise, NaN equal to NaN). Tuples/lists are compared element by element, dicts key by key,
    numbers with the same tolerances.
    """
    opts = dict(where=where, atol=atol, rtol=rtol, check_dtype=check_dtype, check_device=check_device)
    on = f" on input {where!r}" if where else ""
    if isinstance(expected, np.ndarray):
        got = got if isinstance(got, torch.Tensor) else torch.as_tensor(np.asarray(got))
        _compare_tensor(got, torch.as_tensor(expected), name, on, atol, rtol, check_dtype, False)
    elif isinstance(expected, torch.Tensor):
        _compare_tensor(got, expected, name, on, atol, rtol, check_dtype, check_device)
    elif isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)):
            raise CheckFailure(f"{name}{on} should be a {type(expected).__name__}, got {_kind(got)}")
        if len(got) != len(expected):
            raise CheckFailure(f"{name}{on} has {len(got)} items, expected {len(expected)}")
        parts = name[1:-1].split(", ") if name.startswith("(") and name.endswith(")") else []
        for i, (g, e) in enumerate(zip(got, expected)):  # a name "(gamma, speedup)" names each item
            item = f"{parts[i]} (item {i} of the returned tuple)" if len(parts) == len(expected) else f"{name}[{i}]"
            compare(g, e, name=item, **opts)
    elif isinstance(expected, dict):
        if not isinstance(got, dict):
            raise CheckFailure(f"{name}{on} should be a dict, got {_kind(got)}")
        missing = set(expected) - set(got)
        if missing:
            raise CheckFailure(f"{name}{on} is missing keys {sorted(missing)}")
        for k in expected:
            compare(got[k], expected[k], name=f"{name}[{k!r}]", **opts)
    elif isinstance(expected, (bool, np.bool_)):
        if bool(got) != bool(expected):
            raise CheckFailure(f"{name}{on} is {got}, expected {expected}")
    elif isinstance(expected, (int, float, np.number)):
        _compare_number(got, expected, name, on, atol, rtol)
    elif got != expected:
        raise CheckFailure(f"{name}{on} is {describe(got)}, expected {describe(expected)}")


def _compare_tensor(got: Any, expected: torch.Tensor, name: str, on: str, atol: float, rtol: float,
                    check_dtype: bool, check_device: bool) -> None:
    """:func:`compare` for an expected tensor: type, shape, dtype, device, then values."""
    if not isinstance(got, torch.Tensor):
        raise CheckFailure(f"{name}{on} should be a torch.Tensor, got {_kind(got)}")
    if tuple(got.shape) != tuple(expected.shape):
        raise CheckFailure(f"{name}{on} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if check_dtype and got.dtype != expected.dtype:
        raise CheckFailure(f"{name}{on} has dtype {got.dtype}, expected {expected.dtype}")
    if check_device and got.device.type != expected.device.type:
        raise CheckFailure(f"{name}{on} is on {got.device.type}, expected {expected.device.type}")
    g, e = got.detach().cpu(), expected.detach().cpu()
    if e.is_floating_point() or e.is_complex():
        close = torch.isclose(g.to(torch.float64), e.to(torch.float64), atol=atol, rtol=rtol, equal_nan=True)
    else:
        close = g == e.to(g.dtype) if g.dtype != e.dtype else g == e
    if not bool(close.all()):
        if close.ndim == 0:  # a scalar (a loss): its value, not a position
            raise CheckFailure(f"{name}{on} is {_fmt(g.item())}, expected {_fmt(e.item())}")
        idx = tuple((~close).nonzero()[0].tolist())
        raise CheckFailure(
            f"{name}{on} differs at {int((~close).sum())} of {close.numel()} positions; first at index {idx}: "
            f"got {_fmt(g[idx].item())}, expected {_fmt(e[idx].item())}"
        )


def _compare_number(got: Any, expected: int | float | np.number, name: str, on: str, atol: float,
                    rtol: float) -> None:
    """:func:`compare` for an expected number: a one-element tensor counts; an expected int must be matched
    exactly (a whole float counts), a float within the tolerances."""
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if not isinstance(got, (int, float, np.number)):
        raise CheckFailure(f"{name}{on} should be a number, got {_kind(got)}")
    if isinstance(expected, (int, np.integer)) and not isinstance(expected, bool):
        # ints are exact (a count, an index, a hash): compared as Python ints, printed in full
        if isinstance(got, (float, np.floating)) and not float(got).is_integer():
            raise CheckFailure(f"{name}{on} is {_fmt(float(got))}, expected {int(expected)}")
        if int(got) != int(expected):
            raise CheckFailure(f"{name}{on} is {int(got)}, expected {int(expected)}")
        return
    both_nan = math.isnan(float(got)) and math.isnan(float(expected))
    if not both_nan and not math.isclose(float(got), float(expected), rel_tol=rtol, abs_tol=atol):
        raise CheckFailure(f"{name}{on} is {_fmt(float(got))}, expected {_fmt(float(expected))}")


def clone_args(args: Sequence[Any]) -> tuple:
    """Deep-ish copy of arguments (tensors, arrays, and lists, tuples, dicts and sets of them) so a learner function
    that mutates its inputs cannot affect the reference, and :func:`check_unchanged` can see what it changed."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a.detach().clone().requires_grad_(a.requires_grad))
        elif isinstance(a, np.ndarray):
            out.append(a.copy())
        elif isinstance(a, (list, tuple)):
            out.append(type(a)(clone_args(a)))
        elif isinstance(a, dict):
            out.append(dict(zip(a, clone_args(list(a.values())))))
        elif isinstance(a, (set, frozenset)):
            out.append(type(a)(a))
        else:
            out.append(a)
    return tuple(out)


def _same(a: Any, b: Any) -> bool:
    """Whether ``a`` (a value after a call) still equals ``b`` (a copy from before it): tensors and arrays
    element by element (NaN equal to NaN), lists, tuples and dicts item by item, anything else by ``==``."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype):
            return False
        return torch.allclose(a, b, rtol=0, atol=0, equal_nan=True) if a.is_floating_point() else torch.equal(a, b)
    if isinstance(a, np.ndarray):
        nan_ok = a.dtype.kind in "fc"  # equal_nan only works for float and complex arrays
        return isinstance(b, np.ndarray) and a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=nan_ok))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def check_unchanged(names: Sequence[str | None], before: Sequence[Any], after: Sequence[Any], where: str,
                    why: str = "") -> None:
    """Fail when a learner's function changed one of its arguments in place: ``after`` are the arguments it was
    called with, ``before`` a :func:`clone_args` copy taken before the call, ``names`` their names (``None``: an
    argument the function is meant to change, e.g. a cache). ``why`` adds what the caller needs the value for.
    """
    for name, then, now in zip(names, before, after):
        if name is not None and not _same(now, then):
            raise CheckFailure(f"your function changed its argument `{name}` in place on input {where!r}; the "
                               f"caller still uses it{', ' + why if why else ''}: build new values (`x = x + ...`, "
                               "not `x += ...`, `x.add_(...)` or `x[i] = ...`)")


def _parameter_names(fn: Callable, n: int) -> list[str]:
    """The names of ``fn``'s first ``n`` positional parameters (``argument i`` where it has no signature)."""
    try:
        names = [p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    return (names + [f"argument {i + 1}" for i in range(len(names), n)])[:n]


_DEVICE_ERRORS = ("is not on the expected device", "same device")


def _tensors_in(x: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``x``, inside lists, tuples and dicts too."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _tensors_in(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from _tensors_in(item)


class _MetaAsGPU(torch.overrides.TorchFunctionMode):
    """Makes the meta device behave like a GPU for :func:`check_off_cpu`. The meta device alone lets a few
    operations mix in CPU tensors (``F.embedding`` of CPU ids, ``index_select``, ``gather``, a matrix product with
    a CPU operand) that a GPU refuses: here any operation whose tensors mix the meta device with a CPU tensor of
    one dimension or more fails as on a GPU, but for what a GPU allows: indexing a meta tensor with CPU indices,
    copies between devices, and reading another tensor's dtype or shape (``type_as``, ``view_as``...). A 0-d
    CPU tensor mixes in anywhere, as on a GPU (``masked_fill``'s value too, which the meta device alone refuses).
    An input copied back to the host (``.cpu()``, ``.to("cpu")``, ``.tolist()``, ``.item()``, ``.numpy()``)
    gives its real values, which the meta device does not hold."""

    FILLS = (torch.Tensor.masked_fill, torch.Tensor.masked_fill_, torch.masked_fill)
    COPIES_OUT = (torch.Tensor.cpu, torch.Tensor.to, torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.numpy,
                  torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__bool__)
    INDEXING = (torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put)
    # a GPU takes these with a CPU tensor too: copies, a dtype or shape read from the other tensor
    MIX_ALLOWED = (*COPIES_OUT, torch.Tensor.copy_, torch.Tensor.type_as, torch.Tensor.new_tensor,
                   torch.Tensor.view_as, torch.Tensor.expand_as, torch.Tensor.reshape_as)

    def __init__(self, values: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.values = values  # id of an input moved to meta -> its CPU tensor

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})

        def cpu_scalar(value: object) -> bool:
            return isinstance(value, torch.Tensor) and value.ndim == 0 and value.device.type == "cpu"

        on_meta = bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta"
        if func in self.FILLS and on_meta:
            if len(args) > 2 and cpu_scalar(args[2]):
                args = (*args[:2], args[2].to("meta"), *args[3:])
            elif cpu_scalar(kwargs.get("value")):
                kwargs["value"] = kwargs["value"].to("meta")
        if func not in self.MIX_ALLOWED and not (func in self.INDEXING and on_meta):
            devices = {t.device.type for t in _tensors_in((args, kwargs)) if t.ndim > 0 or t.device.type != "cpu"}
            if {"meta", "cpu"} <= devices:
                name = getattr(func, "__name__", str(func))
                raise RuntimeError(f"Expected all tensors to be on the same device, but {name} got tensors on meta "
                                   "and cpu")
        try:
            return func(*args, **kwargs)
        except (NotImplementedError, RuntimeError, TypeError):  # no data on meta; a known input has, as on a GPU
            if func in self.COPIES_OUT and args and id(args[0]) in self.values:
                return func(self.values[id(args[0])], *args[1:], **kwargs)
            raise


def _on_meta(arg: Any, values: dict[int, torch.Tensor]) -> Any:
    """``arg`` moved to the meta device (a module is copied first; lists and tuples item by item), each moved
    tensor's CPU values recorded in ``values`` by its id; anything else as it is."""
    if isinstance(arg, torch.Tensor):
        moved = arg.detach().to("meta")
        values[id(moved)] = arg.detach()
        return moved
    if isinstance(arg, torch.nn.Module):
        return copy.deepcopy(arg).to("meta")
    if type(arg) in (list, tuple):
        return type(arg)(_on_meta(a, values) for a in arg)
    if isinstance(arg, functools.partial):  # a function with tensors bound to it (a refinement conv's weights)
        return functools.partial(arg.func, *(_on_meta(a, values) for a in arg.args),
                                 **{k: _on_meta(v, values) for k, v in arg.keywords.items()})
    return arg


def check_off_cpu(fn: Callable, case: Case, result_follows: bool = False) -> None:
    """Run ``fn`` on ``case`` with its tensors and modules on the meta device, which stands in for a GPU (tensors
    with shapes and a device but no values; an input copied back with ``.cpu()`` or ``.tolist()`` gives its
    values): fail when ``fn`` mixes in a tensor it made on the CPU, or, with ``result_follows``, when a tensor it
    returns (alone or in a tuple/list) is not on its inputs' device. Any other error is ignored, since the meta
    device lacks a few operations (``.item()`` of a computed tensor, ``bincount``...); a check calls it once its
    values have passed."""
    values: dict[int, torch.Tensor] = {}
    args = tuple(_on_meta(a, values) for a in case.args)
    kwargs = {k: _on_meta(v, values) for k, v in case.kwargs.items()}
    try:
        with torch.no_grad(), _MetaAsGPU(values):
            out = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - only a device mismatch is the learner's
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if any(marker in text for marker in _DEVICE_ERRORS):
            raise CheckFailure(
                f"on input {case.name!r} moved off the CPU (to the meta device, which stands in for a GPU) your "
                f"function mixed devices ({text}): a tensor it creates (torch.arange, torch.zeros, a mask...) "
                "stays on the CPU while its inputs are elsewhere, so it would fail on a GPU: create it with "
                "device=<an input>.device") from None
        return
    outs = out if isinstance(out, (tuple, list)) else (out,)
    stray = [o for o in outs if isinstance(o, torch.Tensor) and o.device.type != "meta"]
    if result_follows and stray:
        raise CheckFailure(
            f"on input {case.name!r} moved off the CPU (to the meta device, which stands in for a GPU) your function "
            f"returned a tensor on the {stray[0].device.type} device: the result must be on its inputs' device, or "
            "the caller's next step mixes devices on a GPU; move it there at the end, e.g. .to(<an input>.device)")


def check_draws_follow_generator(failure: CheckFailure, got: Any, again: Any) -> None:
    """After ``failure``, ``again`` is the learner's sampler run once more with an identically seeded generator:
    when its tokens (a tensor, or a list or tuple of them) differ from ``got``, the draws did not all come from the
    generator, and the failure says so."""
    def tensors(x: Any) -> list:
        return [x] if isinstance(x, torch.Tensor) else list(x) if isinstance(x, (list, tuple)) else []

    a, b = tensors(got), tensors(again)
    if len(a) == len(b) and any(isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and not torch.equal(x, y)
                                for x, y in zip(a, b)):
        raise CheckFailure(f"{failure}; two runs with identically seeded generators gave different tokens: draw with "
                           "sample(..., generator=generator), not from the global random state") from None


def running(code: CodeType) -> bool:
    """Whether a frame of the current call stack runs ``code`` (a function's ``__code__``): from inside a forward
    hook, a check tells whether the learner's function handed its work to the library's version of the loop."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame is not None


_LIBRARIES = tuple(str(Path(p).resolve()) for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
                                                   sysconfig.get_paths()["platlib"], Path(__file__).parents[1]})
"""Folders of code that is not the learner's: Python's own, installed packages, this package."""


def _learner_line(tb: Any) -> str:
    """``" (line N: code)"`` of the deepest frame of the traceback ``tb`` in the learner's own code (a notebook
    cell numbers its lines from 1), or ``""`` when every frame is library code."""
    frames = [f for f in traceback.extract_tb(tb) if not str(Path(f.filename).resolve()).startswith(_LIBRARIES)]
    if not frames:
        return ""
    code = (frames[-1].line or "").strip()
    return f" (line {frames[-1].lineno}{': ' + code if code else ''})"


def call(fn: Callable, *args: Any, where: str = "", **kwargs: Any) -> Any:
    """Call the learner's function; turn an unexpected exception into a one-line :class:`CheckFailure` that names
    the line of the learner's code it came from.

    ``NotImplementedError`` passes through (the exercise is not attempted yet)."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except CheckFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - any learner error becomes a readable message
        on = f" on input {where!r}" if where else ""
        arg_desc = ", ".join(describe(a) for a in args)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckFailure(
            f"your function raised {type(exc).__name__}{on} (arguments: {arg_desc}): {msg}"
            f"{_learner_line(exc.__traceback__.tb_next)}"
        ) from None


@dataclass(frozen=True)
class Mistake:
    """A plausible wrong answer and what to tell a learner whose function behaves like it.

    ``fn`` takes the reference's arguments; ``says`` completes the failure line after a semicolon, naming the
    mistake and why it is one (not the fix: that is what the hints are for)."""

    fn: Callable
    says: str


def _output_weights(expected: torch.Tensor) -> torch.Tensor:
    """The fixed random weighting whose sum is back-propagated to compare gradients."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(expected.shape, generator=gen, dtype=torch.float64).to(expected.dtype)


def _backward(out: Any, weights: torch.Tensor) -> bool:
    """Back-propagate ``sum(out * weights)``; False when ``out`` carries no gradient."""
    out = _first_tensor(out)
    if not out.requires_grad:
        return False
    (out * weights.to(out.dtype)).sum().backward()
    return True


def _prepared(args: Sequence[Any], grad_wrt: Sequence[int]) -> tuple:
    """A fresh copy of ``args`` with gradients required at ``grad_wrt``."""
    copy = clone_args(args)
    for i in grad_wrt:
        copy[i].requires_grad_(True)
    return copy


def _behaves_like(mistake: Mistake, case: Case, got: Any, got_args: tuple, grad_wrt: Sequence[int],
                  weights: torch.Tensor | None, atol: float, rtol: float, check_dtype: bool) -> bool:
    """Whether ``mistake`` gives ``got`` on ``case`` and, when ``weights`` is given (the values agreed with the
    reference and the gradients did not), the same gradients as the learner's ``got_args``."""
    args = _prepared(case.args, grad_wrt if weights is not None else ())
    try:
        out = mistake.fn(*args, **case.kwargs)
        compare(got, out, atol=atol, rtol=rtol, check_dtype=check_dtype)
        if weights is None:
            return True
        if not _backward(out, weights):
            return all(got_args[i].grad is None or not bool(got_args[i].grad.any()) for i in grad_wrt)
        for i in grad_wrt:
            if (got_args[i].grad is None) != (args[i].grad is None):
                return False
            if args[i].grad is not None:
                compare(got_args[i].grad, args[i].grad, atol=atol, rtol=rtol)
    except Exception:  # noqa: BLE001 - a mistake that does not apply to this input is simply not the one
        return False
    return True


def explain(failure: CheckFailure, mistakes: Sequence[Mistake], case: Case, got: Any, *, atol: float = 1e-5,
            rtol: float = 1e-4, check_dtype: bool = True, got_args: tuple = (), grad_wrt: Sequence[int] = (),
            weights: torch.Tensor | None = None) -> CheckFailure:
    """``failure`` completed with the diagnosis of the first of ``mistakes`` that gives ``got`` on ``case``, or
    ``failure`` itself when none does. With ``weights`` (the values agreed with the reference and the gradients
    did not) the mistake must also give the gradients the learner's arguments ``got_args`` hold at ``grad_wrt``.
    :func:`compare_cases` calls it; a check that compares by hand calls it with the values only."""
    for mistake in mistakes:
        if _behaves_like(mistake, case, got, got_args, grad_wrt, weights, atol, rtol, check_dtype):
            return CheckFailure(f"{failure}; {mistake.says}")
    return failure


def compare_explained(got: Any, expected: Any, mistakes: Sequence[Mistake], case: Case, *, name: str = "output",
                      atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """:func:`compare` ``got`` with ``expected`` on ``case`` (``where=case.name``); a difference raises its failure
    completed by :func:`explain`, at the same tolerances. For a check that runs the functions itself."""
    try:
        compare(got, expected, where=case.name, name=name, atol=atol, rtol=rtol)
    except CheckFailure as exc:
        raise explain(exc, mistakes, case, got, atol=atol, rtol=rtol) from None


def compare_cases(
    fn: Callable,
    ref: Callable,
    cases: Iterable[Case],
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    check_dtype: bool = True,
    grad_wrt: Sequence[int] = (),
    mistakes: Sequence[Mistake] = (),
    keep: Sequence[str | None] | None = None,
    off_cpu: bool = False,
) -> None:
    """Run ``fn`` and ``ref`` on every case and :func:`compare` their outputs; with ``off_cpu``, once they all
    agree, run ``fn`` on the first case off the CPU (:func:`check_off_cpu`; its result must follow its inputs).

    ``fn`` must leave its arguments as they were (:func:`check_unchanged` runs after each call, before the
    outputs are compared): ``keep`` names the positional arguments, ``None`` for one the function is meant to
    change (a cache); by default every one, under the names of ``ref``'s parameters.

    ``grad_wrt`` lists positional-argument indices whose gradients must also agree: the outputs are
    reduced with a fixed random weighting, back-propagated through both functions, and the gradients
    compared (this catches e.g. a missing straight-through estimator). When the learner's output (or its
    gradients) differs and matches one of ``mistakes`` on that case, the failure names the mistake. A case with
    its own ``atol`` is compared (and its mistakes matched) at that tolerance instead of ``atol``.
    """
    first = None
    for case in cases:
        first = case if first is None else first
        tol = atol if case.atol is None else case.atol
        a_ref, a_fn = _prepared(case.args, grad_wrt), _prepared(case.args, grad_wrt)
        expected = ref(*a_ref, **case.kwargs)
        kept = clone_args(a_fn)
        got = call(fn, *a_fn, where=case.name, **case.kwargs)
        check_unchanged(_parameter_names(ref, len(a_fn)) if keep is None else keep, kept, a_fn, case.name)
        weights = None
        try:
            compare(got, expected, where=case.name, atol=tol, rtol=rtol, check_dtype=check_dtype)
            if grad_wrt:
                weights = _output_weights(_first_tensor(expected))
                _compare_grads(got, expected, a_fn, a_ref, grad_wrt, weights, case.name, tol, rtol)
        except CheckFailure as exc:
            raise explain(exc, mistakes, case, got, atol=tol, rtol=rtol, check_dtype=check_dtype, got_args=a_fn,
                          grad_wrt=grad_wrt, weights=weights) from None
    if off_cpu and first is not None:
        check_off_cpu(fn, first, result_follows=True)


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    raise CheckFailure("expected a tensor output to take gradients through")


def _compare_grads(got, expected, a_fn, a_ref, grad_wrt, weights, where, atol, rtol) -> None:
    _backward(expected, weights)
    if not _backward(got, weights):
        raise CheckFailure(
            f"no gradient flows through your output on input {where!r} (was it detached, or built from "
            "integer indices only?)"
        )
    for i in grad_wrt:
        if a_fn[i].grad is None:
            raise CheckFailure(f"argument {i} receives no gradient on input {where!r}")
        compare(a_fn[i].grad, a_ref[i].grad, where=where, atol=atol, rtol=rtol, name=f"gradient of argument {i}")


# --------------------------------------------------------------------------------------------------------
# chapters, exercises, reporting


def strict_checks() -> bool:
    """Whether checks raise on a failure or a stub (``AR_COURSE_STRICT_CHECKS=1``) instead of only printing."""
    return os.environ.get(STRICT_ENV, "").strip() not in ("", "0")


def _report(exercise: str, status: str, message: str) -> None:
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"exercise": exercise, "status": status, "message": message}) + "\n")


@dataclass
class Exercise:
    """One registered exercise: its number, function name, reference answer, hint levels and check body."""

    number: str
    name: str
    reference: Callable
    hints: tuple[str, ...]
    check: Callable[[Callable, Callable], None]


class Chapter:
    """Registry of a chapter's exercises, their checks and references, and what this session has shown."""

    def __init__(self, number: int, title: str):
        self.number = number
        self.title = title
        self.exercises: dict[str, Exercise] = {}
        self._passed: dict[str, Callable] = {}
        self.results: dict[str, str] = {}
        self._failures: dict[str, int] = {}  # exercise number -> failed runs so far
        self._hints_shown: dict[str, int] = {}  # exercise number -> hint levels shown so far

    @property
    def module(self) -> str:
        """How a notebook reaches this chapter's checks: ``checks.ch01``."""
        return f"checks.ch{self.number:02d}"

    def exercise(self, number: str, reference: Callable, hints: Sequence[str], name: str | None = None):
        """Register ``body(fn, ref)`` as the check of exercise ``number``.

        ``hints`` go from a nudge to the key line (at least one; see the module docstring for when each is
        shown). The body raises :class:`CheckFailure` with a one-line reason when ``fn`` is wrong. The returned
        callable takes the learner's function, prints one line, records the verdict in :attr:`results` and
        returns None (raising in strict mode)."""
        if isinstance(hints, str) or not hints or not all(isinstance(h, str) and h for h in hints):
            raise ValueError(f"exercise {number}: hints must be a non-empty sequence of non-empty strings")

        def decorator(body: Callable[[Callable, Callable], None]) -> Callable[[Callable], None]:
            ex_name = name or body.__name__
            ex = Exercise(number, ex_name, reference, tuple(hints), body)
            self.exercises[ex_name] = ex

            @functools.wraps(body)
            def run_check(fn: Callable) -> None:
                self._run(ex, fn)

            run_check.exercise = ex  # type: ignore[attr-defined]
            return run_check

        return decorator

    def _find(self, exercise: str | Callable) -> Exercise:
        """The exercise with this number (``"1.2"``) or of this function (by name)."""
        if isinstance(exercise, (int, float)) and not isinstance(exercise, bool):  # hint(5.1): quotes forgotten
            raise KeyError(f"{exercise!r} is a number: name the exercise as a string, {self.module}.hint('{exercise}')")
        key = exercise if isinstance(exercise, str) else getattr(exercise, "__name__", None)
        for ex in self.exercises.values():
            if key in (ex.number, ex.name):
                return ex
        known = ", ".join(f"{ex.number} ({ex.name})" for ex in self.exercises.values())
        raise KeyError(f"{key!r} is not an exercise of chapter {self.number}; known: {known}")

    def _next_hint(self, ex: Exercise, limit: int) -> str:
        """Show one more hint level, at most ``limit`` levels in all; return its text with its place."""
        shown = min(self._hints_shown.get(ex.number, 0) + 1, limit, len(ex.hints))
        self._hints_shown[ex.number] = max(shown, self._hints_shown.get(ex.number, 0))
        text = ex.hints[shown - 1]
        if shown < len(ex.hints):
            return f"{text} (more: {self.module}.hint({ex.number!r}))"
        return text

    def hint(self, exercise: str | Callable) -> None:
        """Print the next hint level of ``exercise`` (``"1.2"`` or the function) not shown yet; the last level,
        the key line, once every other one has been shown. An exercise this chapter does not have gets one line
        naming those it has."""
        try:
            ex = self._find(exercise)
        except KeyError as exc:
            print(exc.args[0])
            return
        level = min(self._hints_shown.get(ex.number, 0) + 1, len(ex.hints))
        text = self._next_hint(ex, len(ex.hints))
        print(f"Exercise {ex.number}, hint {level} of {len(ex.hints)}: {text}")

    def _run(self, ex: Exercise, fn: Callable) -> None:
        label = f"Exercise {ex.number}"
        if not callable(fn):
            self._fail(ex, f"expected a function, got {type(fn).__name__}")
            return
        try:
            with kept_random_state():  # a check's seeds and draws leave the learner's random numbers alone
                ex.check(fn, ex.reference)
        except NotImplementedError as exc:
            stub = re.fullmatch(r"Exercise (\d+\.\d+): (\w+)", str(exc))  # the text of a learner notebook's stub
            why = ""
            if stub and stub[1] != ex.number:  # attempted, but it calls an exercise not written yet
                why = (f"your function calls `{stub[2]}` (Exercise {stub[1]}), which is not written yet: write it "
                       f"first, or call {self.module}.use({stub[2]}) instead (the package's until its check passes)")
            self._record(ex, NOT_ATTEMPTED, why)
            print(f"{label} not checked yet: {why}" if why else f"{label} not attempted yet")
            if strict_checks():
                raise NotAttempted(f"{label} not checked yet: {why}" if why else
                                   f"{label} not attempted yet: replace the `raise NotImplementedError` in its cell"
                                   ) from None
            return
        except CheckFailure as exc:
            self._failures[ex.number] = self._failures.get(ex.number, 0) + 1
            limit = min(self._failures[ex.number], max(1, len(ex.hints) - 1))  # never the key line unasked
            self._fail(ex, f"{exc}. Hint: {self._next_hint(ex, limit)}")
            return
        self._record(ex, PASSED, "")
        self._passed[ex.name] = fn
        print(f"{label} passed")

    def _fail(self, ex: Exercise, reason: str) -> None:
        """Record, print and (in strict mode) raise the failure ``reason``."""
        self._record(ex, FAILED, reason)
        print(f"Exercise {ex.number} failed: {reason}")
        if strict_checks():
            raise CheckFailure(f"Exercise {ex.number} failed: {reason}")

    def _record(self, ex: Exercise, status: str, message: str) -> None:
        self.results[ex.number] = status
        if status != PASSED:
            self._passed.pop(ex.name, None)
        _report(ex.number, status, message)

    def reset(self) -> None:
        """Forget this session's results, passed functions and hints shown (a fresh kernel's state)."""
        self._passed.clear()
        self.results.clear()
        self._failures.clear()
        self._hints_shown.clear()

    def passed(self, name: str) -> Callable:
        """The function that passed the check of exercise ``name`` (a function name) in this session, else the
        exercise's reference, silently (for a later check that builds on an earlier exercise)."""
        return self._passed.get(name, self.exercises[name].reference)

    def use(self, fn: Callable) -> Callable:
        """Return ``fn`` if its exercise's check passed with this very function, else the reference."""
        name = getattr(fn, "__name__", None)
        ex = self.exercises.get(name) if name else None
        if ex is None:
            raise KeyError(
                f"{name!r} is not an exercise of chapter {self.number}; known: {sorted(self.exercises)}"
            )
        if self._passed.get(ex.name) is fn:
            return fn
        print(f"Note: Exercise {ex.number} has not passed its check yet; using the reference `{ex.name}`.")
        return ex.reference
