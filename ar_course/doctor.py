"""``python -m ar_course doctor``: check that this machine can run the course.

Prints one line per requirement, ``OK``, ``WARN`` (optional, the course still runs) or ``FAIL`` (blocks the
course), and exits 1 when any FAIL is found. The library alone needs torch, numpy, safetensors and tqdm
(``doctor --library`` checks only those); the course also needs the ``course`` and ``kernels`` extras
(``pip install -e '.[course,kernels]'``, which ``make lab`` installs), and Triton (``triton`` extra) is optional.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace

from ar_course.project import install_command

OK, WARN, FAIL = "OK", "WARN", "FAIL"

_SIM_PROBE = """
import os
os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
import numpy as np
from numba import cuda
@cuda.jit
def add(a, b, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a[i] + b[i]
a = np.arange(37, dtype=np.float32); out = np.zeros_like(a)
add[2, 32](a, a, out)
assert np.allclose(out, 2 * a)
print("ok")
"""

_TRITON_PROBE = """
import os
import torch
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
import triton, triton.language as tl
@triton.jit
def add(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    for start in range(0, n, BLOCK):  # a loop over a runtime scalar, as the course's kernels have
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) * 2, mask=m)
dev = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.arange(37, dtype=torch.float32, device=dev); out = torch.empty_like(x)
add[(1,)](x, out, 37, BLOCK=32)
assert torch.allclose(out, 2 * x)
print("ok", triton.__version__)
"""


@dataclass
class Finding:
    """One line of the report: ``status`` (``OK``, ``WARN`` or ``FAIL``), what was checked, what was found, and
    whether the library needs it or only the course (``part``: ``"library"`` or ``"course"``)."""

    status: str
    name: str
    detail: str
    part: str = "library"


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None
    return str(getattr(mod, "__version__", "installed"))


def _probe(code: str, timeout: float = 120) -> tuple[bool, str]:
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    if res.returncode == 0:
        return True, res.stdout.strip()
    lines = (res.stderr or res.stdout).strip().splitlines()
    return False, lines[-1] if lines else f"exit code {res.returncode}"


NUMPY_MAX_FOR_NUMBA_CUDA = (2, 5)
"""numba-cuda 0.30 calls ``numpy.row_stack``, removed in numpy 2.5: the ``kernels`` extra pins ``numpy<2.5``, and
:func:`ar_course.kernels.env.restore_numpy_row_stack` puts it back where numpy is newer."""


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _major_minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


OLDEST = {"torch": (2, 4)}
"""The oldest version of a module the library works with (pyproject.toml's bound): torch 2.4 brought
``torch.is_autocast_enabled(device_type)``, which the kernels read."""


def module_finding(module: str, version: str | None, blocking: bool, extra: str) -> Finding:
    """OK for an installed ``module`` of ``version``; FAIL (WARN when not ``blocking``) when it is missing (None)
    or older than :data:`OLDEST` allows, with what to install (the ``extra`` that brings it, if any)."""
    if version is None:
        missing = "not installed" + (f" ({install_command(extra)})" if extra else "")
        return Finding(FAIL if blocking else WARN, module, missing)
    oldest = OLDEST.get(module)
    if oldest is not None and version != "installed" and _major_minor(version) < oldest:
        need = ".".join(map(str, oldest))
        return Finding(FAIL if blocking else WARN, module, f"{version} (need {need}+: pip install '{module}>={need}')")
    return Finding(OK, module, version)


def numpy_numba_cuda() -> Finding | None:
    """WARN when numba-cuda is installed with a numpy that lacks what it calls (the course's kernels still work:
    :mod:`ar_course.kernels` puts it back); None without numba-cuda."""
    numba_cuda, numpy_v = _distribution_version("numba-cuda"), _distribution_version("numpy")
    if numba_cuda is None or numpy_v is None:
        return None
    if _major_minor(numpy_v) >= NUMPY_MAX_FOR_NUMBA_CUDA:
        limit = ".".join(map(str, NUMPY_MAX_FOR_NUMBA_CUDA))
        return Finding(WARN, "numpy + numba-cuda", f"numba-cuda {numba_cuda} calls numpy.row_stack, removed in numpy "
                       f"{limit} (this is {numpy_v}): importing ar_course.kernels puts it back for the course's "
                       f"kernels; numba-cuda code of your own needs that import first, or pip install "
                       f"'numpy<{limit}'")
    return Finding(OK, "numpy + numba-cuda", f"numpy {numpy_v} with numba-cuda {numba_cuda}")


def _kernel_checks() -> list[Finding]:
    """numba's CUDA simulator, the numpy it runs with, and Triton (chapter 06)."""
    found = []
    numba_v = _version("numba")
    if numba_v:
        ok, detail = _probe(_SIM_PROBE)
        found.append(Finding(OK if ok else FAIL, "numba CUDA simulator",
                             f"numba {numba_v}: " + ("works" if ok else detail)))
    else:
        found.append(Finding(FAIL, "numba", f"not installed (chapter 06 needs it: {install_command('kernels')})"))
    if _version("triton"):
        ok, detail = _probe(_TRITON_PROBE)
        if not ok and "0-dimensional arrays" in detail:  # triton < 3.7's interpreter reads a scalar numpy can't
            detail += f" (triton {_version('triton')}'s interpreter with numpy {_version('numpy')}: pip install " \
                      "'triton>=3.7')"
        found.append(Finding(OK if ok else WARN, "triton",
                             detail if ok else f"installed but the probe failed: {detail}"))
    else:
        found.append(Finding(WARN, "triton", f"not installed (optional: {install_command('triton')}, on Linux)"))
    return found


def library_checks() -> list[Finding]:
    """What the library needs: Python, its four dependencies, the device, a C++ compiler for ``torch.compile``,
    numpy with numba-cuda where that is installed, and the shipped data."""
    found: list[Finding] = []
    py = sys.version_info
    py_ok = py >= (3, 10)
    found.append(Finding(OK if py_ok else FAIL, "python",
                         platform.python_version() + ("" if py_ok else " (need 3.10+)")))
    for mod in ("numpy", "torch", "safetensors", "tqdm"):
        found.append(module_finding(mod, _version(mod), True, ""))
    if _version("torch"):
        import torch

        if torch.cuda.is_available():
            found.append(Finding(OK, "CUDA", f"{torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})"))
        else:
            found.append(Finding(OK, "CUDA", "not available: the course runs on CPU; GPU kernels run in simulators"))
        compiler = next((c for c in (os.environ.get("CXX"), "g++", "clang++", "c++") if c and shutil.which(c)), None)
        if compiler:
            found.append(Finding(OK, "C++ compiler", f"{compiler} (torch.compile on CPU: `generate --compile`)"))
        else:
            found.append(Finding(WARN, "C++ compiler", "none found: `generate --compile` needs one on CPU "
                                 "(everything else runs without)"))
    combination = numpy_numba_cuda()
    if combination is not None:
        found.append(combination)
    try:
        from ar_course.data import load_mnist

        imgs, _ = load_mnist("test")
        found.append(Finding(OK, "data", f"MNIST subset loads ({imgs.shape[0]} test images)"))
    except Exception as exc:  # noqa: BLE001
        found.append(Finding(FAIL, "data", f"MNIST subset does not load: {exc}"))
    return found


def course_checks() -> list[Finding]:
    """What the notebooks need beyond the library: the ``course`` extra's modules, the chapter 06 kernels' numba
    simulator (and Triton, optional), and a Jupyter kernel."""
    found = [module_finding(mod, _version(mod), blocking, "course")
             for mod, blocking in [("matplotlib", True), ("scipy", True), ("ipywidgets", False), ("nbclient", True)]]
    found += _kernel_checks()
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        specs = KernelSpecManager().find_kernel_specs()  # the notebooks use the default python3 kernel
        if "python3" in specs:
            found.append(Finding(OK, "jupyter kernel", f"python3 at {specs['python3']}"))
        else:
            found.append(Finding(WARN, "jupyter kernel",
                                 f"no python3 kernel: install ipykernel ({install_command('course')})"))
    except ModuleNotFoundError as exc:
        missing = exc.name == "jupyter_client"  # else a dependency of it is broken: say which
        found.append(Finding(FAIL, "jupyter", f"not installed ({install_command('course')})" if missing
                             else f"jupyter_client unusable: {exc}"))
    except Exception as exc:  # noqa: BLE001
        found.append(Finding(FAIL, "jupyter", f"jupyter_client unusable: {exc}"))
    return [replace(f, part="course") for f in found]


def run_checks(library_only: bool = False) -> list[Finding]:
    """Every requirement of the course, checked in order: the library's, then (unless ``library_only``) the
    course's."""
    return library_checks() + ([] if library_only else course_checks())


def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course doctor [--library]``: print every finding and a summary line; exit status 1 when any
    is ``FAIL``, else 0. With ``--library``, only what the library needs is checked."""
    from ar_course.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m ar_course doctor",
                            description="Check that this machine can run the course: one line per requirement, OK, "
                                        "WARN (optional, the course still runs) or FAIL (blocks the course); exit "
                                        "status 1 when any FAIL is found.")
    parser.add_argument("--library", action="store_true",
                        help="check only what the ar_course library needs (no notebooks, Jupyter or chapter 06 "
                             "simulators)")
    args = parser.parse_args(argv)
    findings = run_checks(library_only=args.library)
    width = max(len(f.name) for f in findings)
    for f in findings:
        print(f"{f.status:<4}  {f.name:<{width}}  {f.detail}")
    n_fail = sum(f.status == FAIL for f in findings)
    if not n_fail:
        print(f"\nall {'library ' if args.library else ''}requirements met")
    elif not any(f.status == FAIL and f.part == "library" for f in findings):
        print(f"\n{n_fail} blocking problem(s) for the course; the library alone has what it needs "
              f"(doctor --library checks only that)")
    else:
        print(f"\n{n_fail} blocking problem(s)")
    return 1 if n_fail else 0
