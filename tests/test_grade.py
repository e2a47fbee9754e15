"""The grader executes tagged cells in a real kernel and reports each exercise's state."""

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from ar_course import build_notebooks as bn
from ar_course import grade
from ar_course.checks.core import STRICT_ENV
from ar_course.grade import GradeResult, Row, chapter_exercises, format_table, grade_notebook, main
from fixtures.make_fixtures import solution_notebook

pytestmark = pytest.mark.timeout(300)
TOUR = Path(__file__).resolve().parents[1] / "solutions" / "00_tour.ipynb"


def _write(tmp_path, nb, name="nb.ipynb"):
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def _tagged_cell(kind: str, source: str, tag: str):
    make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
    return make(source, metadata={"tags": [tag]})


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


def test_exit_status_is_one_when_any_notebook_fails(tmp_path, monkeypatch):
    """A failing notebook followed by a passing one still exits 1: the status is not only the last one's."""
    paths = [tmp_path / "a.ipynb", tmp_path / "b.ipynb"]
    results = {str(paths[0]): "failed", str(paths[1]): "passed"}
    monkeypatch.setattr(grade, "read_notebook", lambda p: None)
    monkeypatch.setattr(grade, "notebook_exercises", lambda nb, p: [("1.1", "a")])
    monkeypatch.setattr(grade, "grade_notebook", lambda p, **kw: GradeResult([Row("1.1", "a", results[str(p)])],
                                                                             None, 0.0))
    assert main([str(p) for p in paths]) == 1


def test_the_last_verdict_of_an_exercise_wins(tmp_path):
    """A learner who fixes a function and reruns its check is graded on the rerun, not on the first, failed, run."""
    report = tmp_path / "r.jsonl"
    report.write_text("\n".join(json.dumps({"exercise": "1.1", "status": s, "message": ""})
                                for s in ("failed", "passed")) + "\n")
    verdicts, malformed, _ = grade._read_report(report)
    assert verdicts["1.1"]["status"] == "passed" and malformed == []


def test_check_cells_belong_to_the_exercise_cell_before_them():
    """Each exercise owns the check cells up to the next exercise cell, so a "not run" reason names the
    exercise's own check cell, not another's."""
    nb = nbformat.v4.new_notebook(cells=[_tagged_cell("code", "# Exercise 1.1: a\n", "exercise"),
                                         _tagged_cell("code", "check(a)", "check"),
                                         _tagged_cell("code", "# Exercise 1.2: b\n", "exercise")])
    own = grade._own_cells(grade.graded_cells(nb))
    assert own == {"1.1": (0, [1]), "1.2": (2, [])}


def test_markdown_cells_are_never_graded_cells():
    """Only code cells run: a Markdown cell carrying a grading tag is not a graded cell."""
    nb = nbformat.v4.new_notebook(cells=[_tagged_cell("markdown", "# Exercise 1.1: a", "exercise"),
                                         _tagged_cell("code", "x = 1", "setup")])
    assert [i for i, _ in grade.graded_cells(nb)] == [1]


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


def test_grader_lists_every_exercise_of_the_chapter_and_each_ones_own_error(tmp_path, capsys):
    """Chapter 0 with 0.1's exercise cell deleted, a line added above 0.2's header (its function left a stub) and a
    SyntaxError in 0.3's cell: all three rows are there, in order, and nothing passes (it was "2/2 passed")."""
    nb = nbformat.read(TOUR, as_version=4)
    starts = {c.source.split(":")[0]: c for c in nb.cells if c.source.startswith("# Exercise 0.")}
    nb.cells.remove(starts["# Exercise 0.1"])
    starts["# Exercise 0.2"].source = ("import math\n# Exercise 0.2: sample_categorical\n"
                                       "def sample_categorical(*a, **k):\n    raise NotImplementedError\n")
    starts["# Exercise 0.3"].source += "\n    return (\n"
    syntax_cell = nb.cells.index(starts["# Exercise 0.3"])
    report = tmp_path / "grades.json"
    assert main([str(_write(tmp_path, nb)), "--json", str(report)]) == 1
    assert "0/3 exercises passed" in capsys.readouterr().out
    rows = json.loads(report.read_text(encoding="utf-8"))[str(tmp_path / "nb.ipynb")]
    assert [(r["exercise"], r["name"], r["status"]) for r in rows] == [
        ("0.1", "stable_softmax", "not run"), ("0.2", "sample_categorical", "not attempted"),
        ("0.3", "cross_entropy_from_logits", "not run")]
    assert rows[0]["detail"] == "its exercise cell is missing or no longer starts with '# Exercise 0.1: stable_softmax'"
    assert re.fullmatch(rf"its exercise cell raised SyntaxError: incomplete input \(line \d+\) "  # no temporary file
                        rf"\(cell {syntax_cell}\)", rows[2]["detail"]), rows[2]["detail"]


def test_grader_names_a_check_cells_error_and_keeps_an_unknown_chapters_own_list(tmp_path):
    """Chapter 90 is not the package's: the notebook's own exercises are the rows (90.3, its header moved down a
    line, is not one), and 90.2's check cell's own error is its reason."""
    nb = solution_notebook()
    nb.cells[6].source = "fx.increment(increment_typo)"
    nb.cells[7].source = "y = 1\n" + nb.cells[7].source
    res = grade_notebook(_write(tmp_path, nb))
    why = "its check cell raised NameError: name 'increment_typo' is not defined (cell 6)"
    assert res.rows == [Row("90.1", "double", "passed"), Row("90.2", "increment", "not run", why)]
    assert not res.all_passed


def test_chapter_exercises_come_from_the_chapters_checks_in_number_order():
    ch05 = [("5.1", "accepted_prefix"), ("5.2", "residual_distribution"), ("5.3", "speculative_round"),
            ("5.4", "rollback_caches"), ("5.5", "best_draft_length"), ("5.6", "jacobi_verify"),
            ("5.7", "relaxed_acceptance_probability")]  # registered with 5.6 before 5.4
    assert chapter_exercises([("5.6", "jacobi_verify")]) == ch05
    assert chapter_exercises([("5.2", "mine"), ("5.9", "extra")]) == ch05 + [("5.9", "extra")]
    assert chapter_exercises([("90.2", "b"), ("90.1", "a")]) == [("90.2", "b"), ("90.1", "a")]


def test_rows_follow_the_number_order_past_nine():
    """Exercises sort by number, not as text: chapter 01's 1.10 and 1.11 come after 1.9, not before 1.2."""
    numbers = [n for n, _ in chapter_exercises([("1.1", "any")])]
    assert "1.11" in numbers
    assert numbers == sorted(numbers, key=lambda n: tuple(int(p) for p in n.split(".")))


def test_ctrl_c_on_the_grader_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C (SIGINT to the grader's process group, as a terminal sends it) while a cell runs: the grader said
    `error: interrupted` after a 20-line ZMQError traceback from shutting the kernel down gracefully (audit 30);
    now it kills the kernel as after a timeout: one line, exit 130."""
    import os
    import signal
    import time

    marker = tmp_path / "cell-started"
    nb = solution_notebook()
    nb.cells[2].source = (f"# Exercise 90.1: double\nimport time\nopen({str(marker)!r}, 'w').close()\n"
                          "time.sleep(120)\ndef double(x):\n    return 2 * x")
    path = _write(tmp_path, nb, "slow.ipynb")
    # a pytest-xdist worker ignores SIGINT and its children would inherit that: give the grader the default back
    proc = subprocess.Popen([sys.executable, "-m", "ar_course", "grade", str(path)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the slow cell never started"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (proc.returncode, err.strip().splitlines()) == (130, ["error: interrupted"])
