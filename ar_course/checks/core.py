"""The exercise/check framework every chapter uses.

A chapter module creates one :class:`Chapter` and registers one check per exercise::

    chapter = Chapter(1, "Vector quantization")

    @chapter.exercise("1.1", reference=ref.vq_lookup, hint="ties go to the lowest index")
    def vq_lookup(fn, ref):
        for case in cases():
            compare(call(fn, *case.args, where=case.name), ref(*case.args), where=case.name)

Calling the registered check with the learner's function prints exactly one line:

* ``Exercise 1.1 passed``
* ``Exercise 1.1 failed: <what differed, on which input> Hint: <hint>`` and raises ``AssertionError``
* ``Exercise 1.1 not attempted yet`` and re-raises ``NotImplementedError`` (a stub).

``chapter.use(fn)`` returns the learner's function once its check has passed, else the reference with a
one-line note, so later experiments run either way.

When the environment variable ``AR_COURSE_GRADE_REPORT`` names a file, each result is also appended to it
as one JSON line; the grader (:mod:`ar_course.grade`) reads that file.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

REPORT_ENV = "AR_COURSE_GRADE_REPORT"

PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not attempted"


class CheckFailure(AssertionError):
    """Raised by a check when the learner's answer is wrong. The message is the one-line reason."""


class NotAttempted(NotImplementedError):
    """Re-raised by a check whose learner function is still a stub."""


@dataclass
class Case:
    """One input for a check: a readable name, positional and keyword arguments."""

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


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
    return repr(x) if len(repr(x)) < 60 else type(x).__name__


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
    on = f" on input {where!r}" if where else ""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise CheckFailure(f"{name}{on} should be a torch.Tensor, got {type(got).__name__}")
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckFailure(
                f"{name}{on} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
            )
        if check_dtype and got.dtype != expected.dtype:
            raise CheckFailure(f"{name}{on} has dtype {got.dtype}, expected {expected.dtype}")
        if check_device and got.device.type != expected.device.type:
            raise CheckFailure(f"{name}{on} is on {got.device.type}, expected {expected.device.type}")
        g = got.detach().cpu()
        e = expected.detach().cpu()
        if e.is_floating_point() or e.is_complex():
            g64, e64 = g.to(torch.float64), e.to(torch.float64)
            close = torch.isclose(g64, e64, atol=atol, rtol=rtol, equal_nan=True)
        else:
            close = g == e.to(g.dtype) if g.dtype != e.dtype else g == e
        if not bool(close.all()):
            bad = (~close).nonzero()[0].tolist()
            n_bad = int((~close).sum())
            idx = tuple(bad)
            raise CheckFailure(
                f"{name}{on} differs at {n_bad} of {close.numel()} positions; first at index {idx}: "
                f"got {_fmt(g[idx].item())}, expected {_fmt(e[idx].item())}"
            )
        return
    if isinstance(expected, np.ndarray):
        compare(
            torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got,
            torch.as_tensor(expected),
            where=where,
            atol=atol,
            rtol=rtol,
            check_dtype=check_dtype,
            check_device=False,
            name=name,
        )
        return
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)):
            raise CheckFailure(f"{name}{on} should be a {type(expected).__name__}, got {type(got).__name__}")
        if len(got) != len(expected):
            raise CheckFailure(f"{name}{on} has {len(got)} items, expected {len(expected)}")
        for i, (g, e) in enumerate(zip(got, expected)):
            compare(g, e, where=where, atol=atol, rtol=rtol, check_dtype=check_dtype,
                    check_device=check_device, name=f"{name}[{i}]")
        return
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            raise CheckFailure(f"{name}{on} should be a dict, got {type(got).__name__}")
        missing = set(expected) - set(got)
        if missing:
            raise CheckFailure(f"{name}{on} is missing keys {sorted(missing)}")
        for k in expected:
            compare(got[k], expected[k], where=where, atol=atol, rtol=rtol, check_dtype=check_dtype,
                    check_device=check_device, name=f"{name}[{k!r}]")
        return
    if isinstance(expected, (bool, np.bool_)):
        if bool(got) != bool(expected):
            raise CheckFailure(f"{name}{on} is {got}, expected {expected}")
        return
    if isinstance(expected, (int, float, np.number)):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, float, np.number)):
            raise CheckFailure(f"{name}{on} should be a number, got {type(got).__name__}")
        if isinstance(expected, (int, np.integer)) and not isinstance(expected, bool):
            if isinstance(got, float) and not float(got).is_integer():
                raise CheckFailure(f"{name}{on} is {_fmt(got)}, expected {expected}")
        if not math.isclose(float(got), float(expected), rel_tol=rtol, abs_tol=atol) and not (
            math.isnan(float(got)) and math.isnan(float(expected))
        ):
            raise CheckFailure(f"{name}{on} is {_fmt(float(got))}, expected {_fmt(float(expected))}")
        return
    if got != expected:
        raise CheckFailure(f"{name}{on} is {describe(got)}, expected {describe(expected)}")


def clone_args(args: Sequence[Any]) -> tuple:
    """Deep-ish copy of arguments so a learner function that mutates its inputs cannot affect the reference."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a.detach().clone().requires_grad_(a.requires_grad))
        elif isinstance(a, np.ndarray):
            out.append(a.copy())
        elif isinstance(a, (list, tuple)):
            out.append(type(a)(clone_args(a)))
        else:
            out.append(a)
    return tuple(out)


def call(fn: Callable, *args: Any, where: str = "", **kwargs: Any) -> Any:
    """Call the learner's function; turn an unexpected exception into a one-line :class:`CheckFailure`.

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
        ) from None


def compare_cases(
    fn: Callable,
    ref: Callable,
    cases: Iterable[Case],
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    check_dtype: bool = True,
    grad_wrt: Sequence[int] = (),
) -> None:
    """Run ``fn`` and ``ref`` on every case and :func:`compare` their outputs.

    ``grad_wrt`` lists positional-argument indices whose gradients must also agree: the outputs are
    reduced with a fixed random weighting, back-propagated through both functions, and the gradients
    compared (this catches e.g. a missing straight-through estimator).
    """
    for case in cases:
        a_ref = clone_args(case.args)
        a_fn = clone_args(case.args)
        for i in grad_wrt:
            a_ref[i].requires_grad_(True)
            a_fn[i].requires_grad_(True)
        expected = ref(*a_ref, **case.kwargs)
        got = call(fn, *a_fn, where=case.name, **case.kwargs)
        compare(got, expected, where=case.name, atol=atol, rtol=rtol, check_dtype=check_dtype)
        if grad_wrt:
            _compare_grads(got, expected, a_fn, a_ref, grad_wrt, case.name, atol, rtol)


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    raise CheckFailure("expected a tensor output to take gradients through")


def _compare_grads(got, expected, a_fn, a_ref, grad_wrt, where, atol, rtol) -> None:
    g_out, e_out = _first_tensor(got), _first_tensor(expected)
    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(e_out.shape, generator=gen, dtype=torch.float64).to(e_out.dtype)
    (e_out * w).sum().backward()
    if not g_out.requires_grad:
        raise CheckFailure(
            f"no gradient flows through your output on input {where!r} (was it detached, or built from "
            "integer indices only?)"
        )
    (g_out * w.to(g_out.dtype)).sum().backward()
    for i in grad_wrt:
        if a_fn[i].grad is None:
            raise CheckFailure(f"argument {i} receives no gradient on input {where!r}")
        compare(a_fn[i].grad, a_ref[i].grad, where=where, atol=atol, rtol=rtol, name=f"gradient of argument {i}")


# --------------------------------------------------------------------------------------------------------
# chapters, exercises, reporting


def _report(exercise: str, status: str, message: str) -> None:
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"exercise": exercise, "status": status, "message": message}) + "\n")


@dataclass
class Exercise:
    number: str
    name: str
    reference: Callable
    hint: str
    check: Callable[[Callable, Callable], None]


class Chapter:
    """Registry of a chapter's exercises, their checks and references."""

    def __init__(self, number: int, title: str):
        self.number = number
        self.title = title
        self.exercises: dict[str, Exercise] = {}
        self._passed: dict[str, Callable] = {}
        self.results: dict[str, str] = {}

    def exercise(self, number: str, reference: Callable, hint: str = "", name: str | None = None):
        """Register ``body(fn, ref)`` as the check of exercise ``number``.

        The body raises :class:`CheckFailure` with a one-line reason when ``fn`` is wrong. The returned
        callable takes the learner's function, prints one line and raises on failure."""

        def decorator(body: Callable[[Callable, Callable], None]) -> Callable[[Callable], bool]:
            ex_name = name or body.__name__
            ex = Exercise(number, ex_name, reference, hint, body)
            self.exercises[ex_name] = ex

            @functools.wraps(body)
            def run_check(fn: Callable) -> bool:
                return self._run(ex, fn)

            run_check.exercise = ex  # type: ignore[attr-defined]
            return run_check

        return decorator

    def _run(self, ex: Exercise, fn: Callable) -> bool:
        label = f"Exercise {ex.number}"
        if not callable(fn):
            msg = f"expected a function, got {type(fn).__name__}"
            self._record(ex, FAILED, msg)
            print(f"{label} failed: {msg}")
            raise CheckFailure(f"{label} failed: {msg}")
        try:
            ex.check(fn, ex.reference)
        except NotImplementedError:
            self._record(ex, NOT_ATTEMPTED, "")
            print(f"{label} not attempted yet")
            raise NotAttempted(
                f"{label} not attempted yet: replace the `raise NotImplementedError` in its cell") from None
        except CheckFailure as exc:
            reason = str(exc)
            if ex.hint:
                reason = f"{reason}. Hint: {ex.hint}"
            self._record(ex, FAILED, reason)
            print(f"{label} failed: {reason}")
            raise CheckFailure(f"{label} failed: {reason}") from None
        self._record(ex, PASSED, "")
        self._passed[ex.name] = fn
        print(f"{label} passed")
        return True

    def _record(self, ex: Exercise, status: str, message: str) -> None:
        self.results[ex.number] = status
        if status != PASSED:
            self._passed.pop(ex.name, None)
        _report(ex.number, status, message)

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
