"""The grader executes tagged cells in a real kernel and reports each exercise's state."""

import subprocess
import sys

import nbformat
import pytest

from ar_course import build_notebooks as bn
from ar_course.checks.core import STRICT_ENV
from ar_course.grade import GradeResult, Row, format_table, grade_notebook
from fixtures.make_fixtures import solution_notebook

pytestmark = pytest.mark.timeout(300)


def _write(tmp_path, nb, name="nb.ipynb"):
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("strict", ["0", "1"], ids=["learner", "strict"])
def test_grader_reports_each_state(tmp_path, monkeypatch, strict):
    """The grader reads the verdicts the checks report, whether or not a failing check raises."""
    monkeypatch.setenv(STRICT_ENV, strict)
    nb = bn.learner_notebook(solution_notebook())
    # exercise 90.1 right, 90.2 wrong, 90.3 left as the stub
    nb.cells[2].source = "# Exercise 90.1: double\ndef double(x):\n    return 2 * x"
    nb.cells[5].source = "# Exercise 90.2: increment\ndef increment(x):\n    return x + 2"
    res = grade_notebook(_write(tmp_path, nb))
    states = {r.exercise: r.status for r in res.rows}
    assert states == {"90.1": "passed", "90.2": "failed", "90.3": "not attempted"}
    failed = next(r for r in res.rows if r.exercise == "90.2")
    assert "differs" in failed.detail
    assert not res.all_passed
    table = format_table(res)
    assert "1/3 exercises passed" in table


def test_grader_all_pass_on_solution(tmp_path):
    res = grade_notebook(_write(tmp_path, solution_notebook()))
    assert res.all_passed, format_table(res)


def test_grader_survives_a_crash_and_says_where(tmp_path):
    res = grade_notebook(_write(tmp_path, solution_notebook(crash_after_first=True)))
    states = {r.exercise: r.status for r in res.rows}
    assert states["90.1"] == "passed"
    assert states["90.2"] == states["90.3"] == "not run"
    assert "kernel died in cell 5" in res.crashed_at
    assert "kernel died in cell 5" in next(r for r in res.rows if r.exercise == "90.2").detail


def test_grader_cli_exit_codes(tmp_path):
    good = _write(tmp_path, solution_notebook(), "good.ipynb")
    bad = _write(tmp_path, bn.learner_notebook(solution_notebook()), "bad.ipynb")
    ok = subprocess.run([sys.executable, "-m", "ar_course", "grade", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "3/3 exercises passed" in ok.stdout
    no = subprocess.run([sys.executable, "-m", "ar_course", "grade", str(bad)], capture_output=True, text=True)
    assert no.returncode == 1
    assert no.stdout.count("not attempted") == 3
    missing = subprocess.run([sys.executable, "-m", "ar_course", "grade", str(tmp_path / "nope.ipynb")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no such notebook" in missing.stderr


def test_format_table_wraps_a_long_reason_under_the_result_column():
    reason = ("output on input 'ties' differs at 1 of 37 positions; first at index (3,): got 2, expected 1. "
              "Hint: ties go to the lowest index, which is what torch.argmin returns on a tie")
    res = GradeResult([Row("1.1", "vq_lookup", "failed", reason), Row("1.2", "ste", "passed")], None, 3.0)
    lines = format_table(res).splitlines()
    start = lines[0].index("result")
    body = lines[2:-1]
    assert body[0].startswith("1.1       vq_lookup  failed: output on input 'ties'")
    assert len(body) > 2 and all(len(line) <= 100 for line in lines)  # wrapped, not cut
    continued = body[1:-1]
    assert all(line[:start].isspace() and line[start] != " " for line in continued)
    assert " ".join(line.strip() for line in body[:-1]).endswith(reason)  # the whole reason, hint included
    assert body[-1].startswith("1.2       ste        passed")


@pytest.mark.parametrize("content, message", [
    (b"", "is not a Jupyter notebook (the file is empty)"),
    (b"\xff\xfe\x00", "is not a Jupyter notebook (a binary file, not UTF-8 text)"),
    (b'{"cells": []}', "is not a Jupyter notebook (JSON without an 'nbformat' version)"),
])
def test_grade_notebook_raises_value_error_for_bad_files(tmp_path, content, message):
    path = tmp_path / "nb.ipynb"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        grade_notebook(path)
    assert str(info.value) == f"{path} {message}"


@pytest.mark.parametrize("limits", [{"timeout": 0}, {"cell_timeout": -1.0}, {"timeout": float("nan")}])
def test_grade_notebook_refuses_bad_time_limits(tmp_path, limits):
    path = _write(tmp_path, solution_notebook())
    with pytest.raises(ValueError, match="must be a number of seconds in"):
        grade_notebook(path, **limits)
