"""Every solution notebook runs top to bottom; the executed copies are kept in ``build/executed/`` for the site.

``make test`` runs this file explicitly (its name keeps it out of a plain ``pytest tests``): it replaces
``pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 solutions`` and keeps what that gave --
any cell's error fails (the report names the notebook and the code cell, with the traceback), a cell may run
``CELL_TIMEOUT`` seconds, outputs are not compared with stored ones, the kernel is this Python -- and also keeps
what it ran:
``make site`` turns the copies into HTML without running anything again (``ar_course.site``).

Checks run strict here (``AR_COURSE_STRICT_CHECKS=1``): a solution whose check fails is an error, not a
printed line. ``AR_COURSE_EXECUTED_DIR`` moves the copies elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ar_course.site import CELL_TIMEOUT, NotebookRunError, execute_notebook

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXECUTED = Path(os.environ.get("AR_COURSE_EXECUTED_DIR", ROOT / "build" / "executed"))


def test_there_are_solutions():
    assert SOLUTIONS, f"no notebooks in {ROOT / 'solutions'}"


@pytest.mark.slow
@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.name for p in SOLUTIONS])
def test_solution_runs_top_to_bottom(path: Path) -> None:
    failure = None
    try:
        execute_notebook(path, EXECUTED / path.name, cell_timeout=CELL_TIMEOUT)
    except NotebookRunError as exc:
        failure = f"{exc}\n\n{exc.details}"
    if failure:  # outside the except block: the report shows the failing cell once, without our call stack
        pytest.fail(failure, pytrace=False)
