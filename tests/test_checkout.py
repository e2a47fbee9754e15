"""The course tools that work on a checkout (build_notebooks, bench) find it upward from the current folder or
take --root, and say in one line when there is none (as from an installed copy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ar_course import bench
from ar_course import checkout
from ar_course.checkout import CheckoutNotFound, checkout_file, find_root

ROOT = Path(__file__).resolve().parents[1]


def _tool(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env)


def test_find_root_searches_upward_and_checks_an_explicit_root(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT / "ar_course" / "data")
    assert find_root("solutions") == ROOT and find_root("benchmarks") == ROOT
    assert find_root("solutions", ROOT) == ROOT
    with pytest.raises(CheckoutNotFound, match=f"--root {tmp_path} is not an ar-course checkout"):
        find_root("solutions", tmp_path)
    (tmp_path / "solutions").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "another-project"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckoutNotFound) as exc:
        find_root("solutions")
    assert str(exc.value) == (f"no ar-course checkout found from {tmp_path.resolve()} upward (looked for "
                              "pyproject.toml with solutions/); pass --root")


def test_checkout_file_finds_the_checkout_above_or_the_one_installed_from(tmp_path, monkeypatch):
    """A notebook copied out of the repository still reads the benchmark results of the checkout the package was
    installed from (editable); without one, one line says what is missing."""
    monkeypatch.chdir(ROOT / "notebooks")
    assert checkout_file("benchmarks", "results", "var.json") == ROOT / "benchmarks" / "results" / "var.json"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkout, "SOURCE", ROOT)
    assert checkout_file("benchmarks", "results", "var.json") == ROOT / "benchmarks" / "results" / "var.json"
    monkeypatch.setattr(checkout, "SOURCE", tmp_path / "site-packages")  # a plain install: no checkout anywhere
    with pytest.raises(CheckoutNotFound) as exc:
        checkout_file("benchmarks", "results", "var.json")
    assert str(exc.value) == (f"benchmarks/results/var.json is part of the ar-course repository, which is neither "
                              f"above {tmp_path.resolve()} nor where this package is installed from "
                              f"({tmp_path / 'site-packages'}): open the notebook inside a checkout of the repository")


@pytest.mark.parametrize("args, marker", [(["ar_course.build_notebooks", "--check"], "solutions"),
                                          (["ar_course", "bench", "--table"], "benchmarks")])
def test_tools_outside_a_checkout_fail_in_one_line_and_work_with_root(tmp_path, args, marker):
    res = _tool(args, tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == (
        f"error: no ar-course checkout found from {tmp_path.resolve()} upward (looked for pyproject.toml with "
        f"{marker}/); pass --root")
    res = _tool([*args, "--root", str(ROOT)], tmp_path)
    assert res.returncode == 0, res.stderr


def test_bench_lists_the_checkouts_benchmarks():
    assert {"kernels", "var", "system"} <= set(bench.available(ROOT))


def test_a_project_folder_without_the_needed_folder_is_not_taken_for_the_checkout(tmp_path, monkeypatch):
    """A folder with the ar-course pyproject.toml but without solutions/ (or benchmarks/) is not the checkout a
    tool needs: --root there is refused, and the search for a benchmark file goes on to the checkout that has it."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "solutions").mkdir()
    assert find_root("solutions", tmp_path) == tmp_path.resolve()
    with pytest.raises(CheckoutNotFound, match="looked for pyproject.toml with benchmarks/"):
        find_root("benchmarks", tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkout, "SOURCE", ROOT)
    assert checkout_file("benchmarks", "results", "var.json") == ROOT / "benchmarks" / "results" / "var.json"
