"""Every learner notebook, executed as shipped (Run All), runs top to bottom and ends each exercise 'not
attempted'; every solution notebook passes each of its checks through the grader, which runs only the tagged
cells. (The full solution notebooks also run top to bottom in `make test`: tests/run_solutions.py.)"""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from ar_course.build_notebooks import KERNELSPEC, exercise_label
from ar_course.checks.core import STRICT_ENV
from ar_course.grade import format_table, grade_notebook, kernel_manager
from fixtures.make_fixtures import solution_notebook

ROOT = Path(__file__).resolve().parents[1]
LEARNER = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_every_solution_has_a_learner_notebook():
    assert [p.name for p in SOLUTIONS] == [p.name for p in LEARNER]
    assert SOLUTIONS, "no notebooks found"


@pytest.mark.timeout(300)
def test_a_failing_check_stops_a_solution_run():
    """pytest runs checks strictly (the repository's conftest.py), so a solution notebook whose check fails
    stops at that check: nbval fails it in `make test`."""
    assert os.environ[STRICT_ENV] == "1"
    nb = solution_notebook(double_body="return x * 3", untagged_error=False)
    client = NotebookClient(nb, km=kernel_manager(), timeout=120, allow_errors=False)
    with pytest.raises(CellExecutionError, match="Exercise 90.1 failed"):
        client.execute()


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("path", LEARNER, ids=[p.name for p in LEARNER])
def test_learner_notebook_runs_all(path, monkeypatch):
    """Run All on a fresh learner notebook, every cell, in its own python3 kernel, with the learner's lenient
    checks: each unattempted check prints its line and the chapter goes on with the references to the end."""
    monkeypatch.setenv(STRICT_ENV, "0")
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")  # python3 = this environment's, as under `make lab`
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, km=kernel_manager(KERNELSPEC["name"]), kernel_name=KERNELSPEC["name"], timeout=900,
                            allow_errors=False, resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    exercises = [exercise_label(c.source)[0] for c in nb.cells if "exercise" in c.metadata.get("tags", [])]
    printed = "".join(o.get("text", "") for c in nb.cells if "check" in c.metadata.get("tags", [])
                      for o in c.outputs if o.output_type == "stream")
    for number in exercises:
        assert f"Exercise {number} not attempted yet" in printed, number


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.name for p in SOLUTIONS])
def test_solution_notebook_passes_its_checks(path):
    res = grade_notebook(path)
    assert res.all_passed, format_table(res)
