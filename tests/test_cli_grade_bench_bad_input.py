"""Bad input to ``grade``, ``bench`` and ``generate`` (the CLI audit's items 18-22): a cell that times out, a
malformed grade report line, benchmark results of the wrong shape, names given twice, and small message defects.
Each is one ``error:`` line (exit 2 for bad input, 1 for a failure while working) or a table that says what was
skipped, never a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from ar_course import bench, grade
from ar_course.checkpoint import CheckpointError, resolve
from ar_course.checks.core import REPORT_ENV
from cli_helpers import error_line, run
from fixtures.make_fixtures import solution_notebook

BENCH_HELP = "(see python -m ar_course bench --help)"


def _notebook(tmp_path: Path, name: str = "nb.ipynb") -> Path:
    path = tmp_path / name
    nbformat.write(solution_notebook(), path)
    return path


# -- grade: a cell that times out (item 18) -----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_grade_a_cell_timing_out_prints_the_table_and_nothing_on_stderr(tmp_path):
    """The stuck kernel is killed: its graceful shutdown used to print a 19-line ZMQError traceback."""
    cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["setup"]}),
             nbformat.v4.new_code_cell("# Exercise 1.1: foo\nwhile True:\n    pass", metadata={"tags": ["exercise"]}),
             nbformat.v4.new_code_cell("print('check')", metadata={"tags": ["check"]})]
    path = tmp_path / "loop.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    # capture_output waits for the end of stderr: the kernel's too, which inherits it; 5 s lets the setup cell run on
    # a loaded host (the loop in cell 1 times out whatever the limit)
    res = subprocess.run([sys.executable, "-m", "ar_course", "grade", str(path), "--cell-timeout", "5"],
                         capture_output=True, text=True, timeout=100)
    assert res.returncode == 1 and res.stderr == "", res.stderr
    assert "not run: notebook stopped: cell 1 timed out" in res.stdout
    assert "The notebook stopped early: cell 1 timed out." in res.stdout


# -- grade: malformed lines in the grade report (item 19) ---------------------------------------------------


def _reporting(monkeypatch: pytest.MonkeyPatch, *lines: str) -> None:
    """Replace the kernel run by one that writes ``lines`` to the grade report, as a notebook's code could."""
    def run_cells(*args, **kwargs):
        with open(os.environ[REPORT_ENV], "a", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        return None, {}

    monkeypatch.setattr(grade, "_run_cells", run_cells)


PASS = json.dumps({"exercise": "90.1", "status": "passed", "message": ""})


@pytest.mark.parametrize("line, why, row", [
    ("not json", "line 2 is not JSON: 'not json'", "no check reported"),
    ('{"exercise": "90.2"}', "line 2 is not a verdict {exercise, status, message}: '{\"exercise\": \"90.2\"}'",
     "not run: malformed grade report (line 2)"),
    ('{"exercise": "90.2", "status": "great", "message": ""}', "line 2 is not a verdict",
     "not run: malformed grade report (line 2)"),
    ('{"exercise": "90.2", "status": "passed", "message": 3}', "line 2 is not a verdict",
     "not run: malformed grade report (line 2)"),
    ("[1, 2]", "line 2 is not a verdict {exercise, status, message}: '[1, 2]'", "no check reported"),
])
def test_grade_skips_a_malformed_report_line_and_still_prints_the_table(capsys, monkeypatch, tmp_path, line, why,
                                                                        row):
    _reporting(monkeypatch, PASS, line)
    out_json = tmp_path / "o.json"
    status, out, err = run(capsys, "grade", _notebook(tmp_path), "--json", out_json)
    assert status == 1 and err == ""
    assert f"Skipped 1 malformed line of the grade report: {why}" in out
    lines = out.splitlines()
    assert next(x for x in lines if x.startswith("90.1")).split()[-1] == "passed"
    assert row in next(x for x in lines if x.startswith("90.2"))
    assert [r["status"] for r in json.loads(out_json.read_text(encoding="utf-8"))[str(tmp_path / "nb.ipynb")]] == [
        "passed", "not run", "not run"]


def test_grade_a_malformed_line_does_not_undo_a_verdict_and_several_are_counted(capsys, monkeypatch, tmp_path):
    _reporting(monkeypatch, PASS, '{"exercise": "90.1"}', "x" * 100, "")
    status, out, err = run(capsys, "grade", _notebook(tmp_path))
    assert status == 1 and err == ""
    assert next(x for x in out.splitlines() if x.startswith("90.1")).split()[-1] == "passed"
    assert "Skipped 3 malformed lines of the grade report: line 2 is not a verdict" in out and "(and 2 more)." in out


# -- grade and bench: names given twice (item 21) -----------------------------------------------------------


def test_grade_grades_a_notebook_named_twice_once(capsys, monkeypatch, tmp_path):
    path, other = _notebook(tmp_path), _notebook(tmp_path, "other.ipynb")
    graded = []

    def grade_notebook(nb_path, timeout, cell_timeout):
        graded.append(nb_path)
        return grade.GradeResult([grade.Row("90.1", "double", "passed")], None, 0.0)

    monkeypatch.setattr(grade, "grade_notebook", grade_notebook)
    (tmp_path / "sub").mkdir()
    status, out, err = run(capsys, "grade", path, other, path, tmp_path / "sub" / ".." / "nb.ipynb", other)
    assert status == 0 and err == ""
    assert graded == [path, other] and out.count("exercises passed") == 2
    assert "named twice" in run(capsys, "grade", "--help")[1]


def _checkout(tmp_path: Path, results: dict[str, str], scripts: dict[str, str] | None = None) -> Path:
    """A minimal ar-course checkout with ``benchmarks/bench_NAME.py`` scripts and their result files."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "ar-course"\n')
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    for name, text in results.items():
        (tmp_path / "benchmarks" / "results" / f"{name}.json").write_text(text)
    for name, code in {**dict.fromkeys(results, ""), **(scripts or {})}.items():
        (tmp_path / "benchmarks" / f"bench_{name}.py").write_text(code)
    return tmp_path


ROW = '{"date": "d", "summary": [{"what": "w", "measured": "m", "met": true}]}'


def test_bench_runs_and_prints_a_benchmark_named_twice_once(capsys, tmp_path):
    count = tmp_path / "count.txt"
    root = _checkout(tmp_path, {"code": ROW}, {"code": f"open({str(count)!r}, 'a').write('x')"})
    status, out, err = run(capsys, "bench", "--root", root, "--table", "code", "code")
    assert status == 0 and err == "" and out.count("[code] w") == 1
    status, out, err = run(capsys, "bench", "--root", root, "code", "code")
    assert status == 0 and err == "" and out.count("[code] w") == 1 and count.read_text(encoding="utf-8") == "x"
    assert "named twice runs once" in " ".join(run(capsys, "bench", "--help")[1].split())


# -- bench: results of the wrong shape (item 20) ------------------------------------------------------------


@pytest.mark.parametrize("name, text, why", [
    ("var", "[1, 2]", "is a JSON list, not an object"),
    ("code", "3", "is a JSON int, not an object"),
    ("raster", '{"date": "x"}', "lacks 'quality_by_scale', which the table needs"),
    ("serving", '{"batching": {}}', "lacks 'continuous', which the table needs"),
    ("var", '{"summary": "oops"}', "does not hold the measurements the table needs (TypeError: "),
    ("code", '{"summary": "oops"}', "has a str as its 'summary' (expected a list of rows)"),
    ("code", '{"date": "x"}', "has no 'summary' (expected a list of rows)"),
])
def test_bench_table_refuses_a_result_of_the_wrong_shape_in_one_line(capsys, tmp_path, name, text, why):
    root = _checkout(tmp_path, {name: text})
    path = root / "benchmarks" / "results" / f"{name}.json"
    status, out, err = run(capsys, "bench", "--root", root, "--table", name)
    assert status == 2 and out == ""
    line = error_line(err)
    assert line.startswith(f"error: benchmark result {path} {why}")
    assert line.endswith(f"; rerun: python -m ar_course bench {name}")
    with pytest.raises(ValueError, match=f"benchmark result {path} "):
        bench.summary_rows([name], root)


def test_bench_a_run_that_writes_a_result_of_the_wrong_shape_fails_in_one_line(capsys, tmp_path):
    result = tmp_path / "benchmarks" / "results" / "code.json"
    root = _checkout(tmp_path, {"code": ROW}, {"code": f"open({str(result)!r}, 'w').write('[]')"})
    status, _, err = run(capsys, "bench", "--root", root, "code")
    assert status == 1 and error_line(err) == (f"error: benchmark result {result} is a JSON list, not an object; "
                                               "rerun: python -m ar_course bench code")


def test_bench_table_shows_a_met_flag_it_cannot_read_as_unknown(capsys, tmp_path):
    root = _checkout(tmp_path, {"code": '{"summary": [{"what": "w", "measured": "m", "met": [1]}]}'})
    status, out, err = run(capsys, "bench", "--root", root, "--table")
    assert status == 0 and err == "" and "met: -" in out


# -- small message defects (item 22) ------------------------------------------------------------------------


def test_grade_truncated_notebook_message_says_at_once(capsys, tmp_path):
    path = tmp_path / "trunc.ipynb"
    path.write_text('{"nbformat": 4, "cells": [{"source": "abc')
    status, out, err = run(capsys, "grade", path)
    assert status == 2 and out == ""
    assert error_line(err) == (f"error: {path} is not a Jupyter notebook (not valid JSON: Unterminated string "
                               "starting at line 1 column 38)")


def test_bench_refuses_an_empty_root_as_typed(capsys):
    status, out, err = run(capsys, "bench", "--root", "", "--table")
    assert status == 2 and out == "" and error_line(err) == f"error: --root must be a folder, got '' {BENCH_HELP}"


def test_a_folder_given_as_a_checkpoint_is_called_a_folder(capsys, tmp_path):
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    message = f"{folder} is a folder, expected a .safetensors file"
    for given in (folder, str(folder)):
        with pytest.raises(CheckpointError, match=f"^{re.escape(message)}$"):
            resolve(given)
    status, out, err = run(capsys, "generate", "--out", tmp_path / "x.png", "--var-checkpoint", folder)
    assert status == 2 and out == ""
    assert error_line(err) == f"error: {message}"
    assert not (tmp_path / "x.png").exists()


def test_generate_has_no_dataset_option(capsys):
    """--dataset was a label that changed no image, so it is gone: the checkpoints decide classes and size."""
    status, out, _ = run(capsys, "generate", "--help")
    assert status == 0 and "--dataset" not in out
