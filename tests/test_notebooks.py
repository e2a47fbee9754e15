"""Every learner notebook, executed as shipped, ends each exercise 'not attempted'; every solution notebook
passes each of its checks. (The full solution notebooks also run top to bottom under nbval in `make test`.)"""

from pathlib import Path

import pytest

from ar_course.grade import format_table, grade_notebook

ROOT = Path(__file__).resolve().parents[1]
LEARNER = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_every_solution_has_a_learner_notebook():
    assert [p.name for p in SOLUTIONS] == [p.name for p in LEARNER]
    assert SOLUTIONS, "no notebooks found"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", LEARNER, ids=[p.name for p in LEARNER])
def test_learner_notebook_as_shipped(path):
    res = grade_notebook(path)
    assert res.rows, f"{path.name} has no exercises"
    assert res.crashed_at is None, format_table(res)
    assert all(r.status == "not attempted" for r in res.rows), format_table(res)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.name for p in SOLUTIONS])
def test_solution_notebook_passes_its_checks(path):
    res = grade_notebook(path)
    assert res.all_passed, format_table(res)
