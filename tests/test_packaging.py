"""Set-up files agree with each other: environment.yml lists pyproject's dependencies, CI runs the README's
test command, and the Makefile provides both README commands (installing every extra); the library's core
dependencies are the four it needs, ``doctor`` catches a numpy that numba-cuda cannot compile with, and the sdist
holds the package without a partial test suite."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the dev extra brings tomli before Python 3.11
    import tomli as tomllib

import pytest
import torch

from ar_course import doctor

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace('"', "'")


def _pyproject_requirements() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        reqs += extra
    return {_norm(r) for r in reqs}


def _environment_requirements() -> set[str]:
    lines = (ROOT / "environment.yml").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = set()
    for line in lines[start + 1 :]:
        m = re.match(r"^\s+- (.+)$", line)
        if m:
            reqs.add(_norm(m.group(1)))
    return reqs


def test_environment_yml_matches_pyproject():
    py, env = _pyproject_requirements(), _environment_requirements()
    assert py == env, f"only in pyproject: {sorted(py - env)}; only in environment.yml: {sorted(env - py)}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make test" in readme and "make lab" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_makefile_has_both_commands():
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^lab:", make, re.M) and re.search(r"^test:", make, re.M)


def test_core_dependencies_and_extras():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = lambda reqs: {re.split(r"[<>=;\s]", r, maxsplit=1)[0].lower() for r in reqs}  # noqa: E731
    assert names(meta["dependencies"]) == {"torch", "numpy", "safetensors", "tqdm"}
    extras = meta["optional-dependencies"]
    assert names(extras["kernels"]) == {"numba", "numba-cuda", "numpy"} and "numpy<2.5" in extras["kernels"]
    assert names(extras["course"]) == {"jupyterlab", "ipykernel", "ipywidgets", "nbclient", "nbformat", "matplotlib",
                                       "scipy"}
    assert names(extras["triton"]) == {"triton"}
    assert '".[$(EXTRAS)]"' in (ROOT / "Makefile").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^EXTRAS \?= course,kernels,triton,serve,dev$", makefile, re.M)


@pytest.mark.parametrize("numpy_version, status", [("2.4.3", "OK"), ("2.5.0", "WARN"), ("3.0.1", "WARN"), (None, None)])
def test_doctor_reports_the_numpy_numba_cuda_combination(monkeypatch, numpy_version, status):
    versions = {"numba-cuda": "0.30.4", "numpy": numpy_version}
    monkeypatch.setattr(doctor, "_distribution_version", versions.get)
    finding = doctor.numpy_numba_cuda()
    assert (finding and finding.status) == status
    if status == "WARN":
        assert "pip install 'numpy<2.5'" in finding.detail and "row_stack" in finding.detail
        assert "importing ar_course.kernels puts it back" in finding.detail


def test_the_kernels_put_numpy_row_stack_back_before_numba_cuda_needs_it():
    """numba-cuda 0.30.4 fails at its first CUDA compile on numpy 2.5 (no numpy.row_stack): every path into the
    course's kernels (pytest -m gpu, the benchmarks, the CLI, a notebook) imports ar_course.kernels first."""
    from ar_course.kernels.env import NUMBA_INSTALLED, restore_numpy_row_stack  # numba.cuda only after it

    if not NUMBA_INSTALLED:
        pytest.skip("needs numba-cuda (the kernels extra)")

    def load_cuda_target(first: str) -> subprocess.CompletedProcess:
        """numba-cuda's real CUDA target (not the simulator) loads its numpy overloads, as its first compile does:
        with numpy 2.5's missing row_stack, after ``first``."""
        code = ("import numpy\nif hasattr(numpy, 'row_stack'): del numpy.row_stack\n" + first + "\n"
                "from numba.cuda.descriptor import cuda_target\n"
                "cuda_target.typing_context.refresh(); cuda_target.target_context.refresh(); print('ok')")
        env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)

    assert "no attribute 'row_stack'" in load_cuda_target("import numba.cuda").stderr  # the failure, shown here
    done = load_cuda_target("import ar_course.kernels")
    assert done.returncode == 0 and done.stdout.endswith("ok\n"), done.stderr

    assert restore_numpy_row_stack() is False  # present: left alone


def test_doctor_names_a_triton_interpreter_that_cannot_run_the_kernels(monkeypatch):
    """triton 3.6's interpreter with numpy >= 2.4 fails on every loop over a runtime scalar, which each course
    kernel has; the probe had none and said OK (audit 23). Its kernel now loops, and the failure names the fix."""
    assert "range(0, n, BLOCK)" in doctor._TRITON_PROBE
    monkeypatch.setattr(doctor, "_version", lambda module: {"numba": None, "triton": "3.6.0", "numpy": "2.4.6"}.get(
        module))
    monkeypatch.setattr(doctor, "_distribution_version", lambda name: None)
    monkeypatch.setattr(doctor, "_probe", lambda code, timeout=120: (False, "triton.runtime.errors.InterpreterError: "
                        "TypeError('only 0-dimensional arrays can be converted to Python scalars')"))
    triton = next(f for f in doctor._kernel_checks() if f.name == "triton")
    assert triton.status == doctor.WARN and triton.detail.endswith(
        "(triton 3.6.0's interpreter with numpy 2.4.6: pip install 'triton>=3.7')")


@pytest.mark.parametrize("missing, detail", [
    ("jupyter_client", "not installed (pip install -e '.[course]' in the course's folder)"),
    ("zmq", "jupyter_client unusable: No module named 'zmq'"),  # a broken dependency is named, not "not installed"
])
def test_doctor_says_whether_jupyter_is_missing_or_broken(monkeypatch, missing, detail):
    import builtins

    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name.startswith("jupyter_client"):
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(doctor, "_kernel_checks", lambda: [])
    monkeypatch.setattr(builtins, "__import__", without)
    jupyter = next(f for f in doctor.course_checks() if f.name == "jupyter")
    assert (jupyter.status, jupyter.detail) == (doctor.FAIL, detail)


def test_doctor_exits_1_only_when_a_requirement_fails(monkeypatch, capsys):
    """A FAIL finding makes `doctor` exit 1 and count it; WARN findings alone still exit 0."""
    findings = [doctor.Finding(doctor.OK, "python", "3.11"), doctor.Finding(doctor.WARN, "triton", "not installed")]
    monkeypatch.setattr(doctor, "run_checks", lambda library_only=False: list(findings))
    assert doctor.main([]) == 0 and capsys.readouterr().out.rstrip().endswith("all requirements met")
    findings.append(doctor.Finding(doctor.FAIL, "numba", "not installed", part="course"))
    assert doctor.main([]) == 1 and capsys.readouterr().out.rstrip().endswith(
        "1 blocking problem(s) for the course; the library alone has what it needs (doctor --library checks only that)")
    findings.append(doctor.Finding(doctor.FAIL, "torch", "not installed"))
    assert doctor.main([]) == 1 and capsys.readouterr().out.rstrip().endswith("\n2 blocking problem(s)")


def test_doctor_library_checks_only_what_the_library_needs(monkeypatch, capsys):
    """A library-only install (no course or kernels extra) passes ``doctor --library``: the notebooks' modules,
    numba's simulator and Jupyter are not checked; the full check still fails for them, naming the extra."""
    real = doctor._version
    course_modules = ("matplotlib", "scipy", "ipywidgets", "nbclient", "numba", "triton", "jupyter_client")
    monkeypatch.setattr(doctor, "_version", lambda m: None if m in course_modules else real(m))
    monkeypatch.setattr(doctor, "_distribution_version", lambda name: None)
    assert doctor.main(["--library"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("all library requirements met")
    assert {line.split()[1] for line in out.splitlines()[:-2]} == {"python", "numpy", "torch", "safetensors", "tqdm",
                                                                  "CUDA", "C++", "data"}
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "FAIL  matplotlib" in out and "pip install -e '.[course]'" in out
    assert out.rstrip().endswith("the library alone has what it needs (doctor --library checks only that)")


def test_doctor_fails_without_numba_or_a_working_simulator_and_only_warns_for_optional_parts(monkeypatch):
    """numba and its CUDA simulator block chapter 06 (FAIL); a missing ipywidgets only warns; the C++ compiler
    named by $CXX is the one reported."""
    real = doctor._version
    monkeypatch.setattr(doctor, "_distribution_version", lambda name: None)
    monkeypatch.setattr(doctor, "_version", lambda m: None if m in ("numba", "triton") else real(m))
    numba = next(f for f in doctor._kernel_checks() if f.name == "numba")
    assert numba.status == doctor.FAIL and "pip install -e '.[kernels]'" in numba.detail
    monkeypatch.setattr(doctor, "_version", lambda m: "0.61" if m == "numba" else None if m == "triton" else real(m))
    monkeypatch.setattr(doctor, "_probe", lambda code, timeout=120: (False, "AssertionError"))
    sim = next(f for f in doctor._kernel_checks() if f.name == "numba CUDA simulator")
    assert (sim.status, sim.detail) == (doctor.FAIL, "numba 0.61: AssertionError")

    monkeypatch.setattr(doctor, "_version", lambda m: None if m == "ipywidgets" else real(m))
    monkeypatch.setattr(doctor, "_kernel_checks", lambda: [])
    monkeypatch.setenv("CXX", sys.executable)  # an executable, as a compiler named by $CXX would be
    found = {f.name: f for f in doctor.run_checks()}
    assert found["ipywidgets"].status == doctor.WARN and "pip install -e '.[course]'" in found["ipywidgets"].detail
    assert found["C++ compiler"].status == doctor.OK and found["C++ compiler"].detail.startswith(sys.executable)


def test_the_sdist_has_the_package_and_no_half_test_suite(tmp_path):
    """setuptools puts ``tests/test_*.py`` into an sdist by default, without ``conftest.py``, the helpers or the
    fixtures they need: ``MANIFEST.in`` leaves the tests out (they run from a checkout), the package stays whole."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "ar_course", src / "ar_course", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", src / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with tarfile.open(tmp_path / "dist" / res.stdout.split()[-1]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert not [n for n in names if n.startswith("tests")]
    package = {p.relative_to(src).as_posix() for p in (src / "ar_course").rglob("*")
               if p.is_file() and p.suffix in (".py", ".safetensors", ".npz")}
    assert package and package <= names, sorted(package - names)


def test_install_hints_fit_a_checkout_and_an_installed_package(monkeypatch):
    """In the checkout the extra is installed editable from there; in an installed package ``pip install -e
    '.[kernels]'`` run in a user's own project names that project's extras (pip warns and installs the project),
    so the hint lists the extra's own requirements from the package's metadata."""
    from ar_course import project
    from ar_course.kernels import ops

    assert project.install_command("kernels") == "pip install -e '.[kernels]' in the course's folder"
    monkeypatch.setattr(project, "is_source_checkout", lambda: False)
    declared = importlib.metadata.requires("ar-course")
    kernels = [r.split(";")[0] for r in declared if 'extra == "kernels"' in r]
    assert kernels and project.install_command("kernels") == "pip install " + " ".join(f"'{r}'" for r in kernels)
    assert "'numba==0.68.1'" in project.install_command("kernels") and "-e" not in project.install_command("kernels")
    assert project.install_command("triton").startswith("pip install 'triton==")  # its platform marker dropped
    assert project.install_command("course,kernels").count("'") == 2 * sum(
        1 for r in declared if re.search(r'extra == "(course|kernels)"', r))
    monkeypatch.setattr(ops.env, "NUMBA_CPU_INSTALLED", False)
    hint = project.install_command("kernels")
    assert ops._usable("numba_cpu", torch.device("cpu")) == f"numba is not installed ({hint})"
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: (_ for _ in ()).throw(
        importlib.metadata.PackageNotFoundError(name)))
    assert project.install_command("serve") == "pip install 'ar-course[serve]'"  # no metadata: the extra's name


def test_the_server_refuses_pydantic_1(monkeypatch):
    """pydantic 1 ignores the request model's strict, no-extra-fields config: "5" and 5.7 and true were taken as
    max_tokens and unknown fields passed, with HTTP 200. The serve extra needs pydantic 2; the server says so."""
    pydantic = pytest.importorskip("pydantic")
    pytest.importorskip("fastapi")
    from ar_course.serving import server

    serve = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert "pydantic>=2" in serve["serve"]
    monkeypatch.setattr(pydantic, "VERSION", "1.10.27")
    with pytest.raises(RuntimeError, match=r"^serving over HTTP needs pydantic 2 \(its strict request checks\), "
                                           r"found 1\.10\.27: pip install"):
        server._fastapi()
