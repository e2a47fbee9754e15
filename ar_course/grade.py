"""Grade a learner's notebook: execute its tagged cells and print a table of exercises.

``python -m ar_course grade notebooks/01_vector_quantization.ipynb`` runs the cells tagged ``setup``,
``exercise`` and ``check`` (in order, in a fresh kernel of the current Python environment, with a time
limit), collects each check's verdict from the report the checks write (see
:mod:`ar_course.checks.core`), and prints one row per exercise: passed, failed (first line of the reason),
not attempted, or not run (and why). The exit code is 0 only when every exercise passed.

A notebook that crashes midway (kernel death, time-out) is still reported: the rows after the crash say
where it happened.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ipykernel.kernelspec
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from .build_notebooks import exercise_label
from .checks.core import FAILED, NOT_ATTEMPTED, PASSED, REPORT_ENV

GRADED_TAGS = ("setup", "exercise", "check")
CURRENT_ENV = "ar-course-current-env"


class _CurrentEnvSpecs(KernelSpecManager):
    """Resolve our kernel name to ipykernel in *this* interpreter, whatever kernels are installed."""

    def get_kernel_spec(self, kernel_name):  # noqa: D401
        if kernel_name == CURRENT_ENV:
            return self.kernel_spec_class(
                resource_dir=ipykernel.kernelspec.RESOURCES, **ipykernel.kernelspec.get_kernel_dict()
            )
        return super().get_kernel_spec(kernel_name)


@dataclass
class Row:
    exercise: str
    name: str
    status: str
    detail: str = ""


@dataclass
class GradeResult:
    rows: list[Row]
    crashed_at: str | None
    seconds: float

    @property
    def all_passed(self) -> bool:
        return bool(self.rows) and all(r.status == PASSED for r in self.rows)


def graded_cells(nb: nbformat.NotebookNode) -> list[tuple[int, nbformat.NotebookNode]]:
    """(original index, cell) for every code cell tagged setup, exercise or check."""
    out = []
    for i, cell in enumerate(nb.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type == "code" and any(t in tags for t in GRADED_TAGS):
            out.append((i, cell))
    return out


def _error_line(cell: nbformat.NotebookNode) -> str | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename')}: {str(out.get('evalue', '')).splitlines()[0] if out.get('evalue') else ''}"
    return None


def grade_notebook(path: str | Path, timeout: float = 600.0, cell_timeout: float = 300.0) -> GradeResult:
    """Execute the tagged cells of the notebook at ``path`` and return one row per exercise."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    cells = graded_cells(nb)
    exercises: list[tuple[str, str]] = []
    for _, cell in cells:
        if "exercise" in cell.metadata.get("tags", []):
            label = exercise_label(cell.source)
            if label:
                exercises.append(label)

    run_nb = nbformat.v4.new_notebook(metadata=nb.metadata, cells=[c for _, c in cells])
    start = time.perf_counter()
    crashed_at: str | None = None
    errors: dict[int, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.jsonl"
        old = os.environ.get(REPORT_ENV)
        os.environ[REPORT_ENV] = str(report)
        try:
            km = AsyncKernelManager(kernel_name=CURRENT_ENV, kernel_spec_manager=_CurrentEnvSpecs())
            client = NotebookClient(
                run_nb, km=km, timeout=int(cell_timeout), allow_errors=True, kernel_name=CURRENT_ENV,
                resources={"metadata": {"path": str(path.parent.resolve())}},
            )
            with client.setup_kernel():
                for j, cell in enumerate(run_nb.cells):
                    orig = cells[j][0]
                    remaining = timeout - (time.perf_counter() - start)
                    if remaining <= 0:
                        crashed_at = f"time limit of {timeout:.0f} s reached before cell {orig}"
                        break
                    client.timeout = int(max(1, min(cell_timeout, remaining)))
                    try:
                        client.execute_cell(cell, j)
                    except CellTimeoutError:
                        crashed_at = f"cell {orig} timed out"
                        break
                    except DeadKernelError:
                        crashed_at = f"kernel died in cell {orig}"
                        break
                    err = _error_line(cell)
                    if err:
                        errors[orig] = err
        except DeadKernelError:
            crashed_at = crashed_at or "kernel died"
        finally:
            if old is None:
                os.environ.pop(REPORT_ENV, None)
            else:
                os.environ[REPORT_ENV] = old
        verdicts: dict[str, dict] = {}
        if report.exists():
            for line in report.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                verdicts[rec["exercise"]] = rec  # the last verdict for an exercise wins

    setup_errors = [
        f"cell {i}: {errors[i]}" for i, c in cells if i in errors and "setup" in c.metadata.get("tags", [])
    ]
    rows = []
    for number, name in exercises:
        rec = verdicts.get(number)
        if rec is not None:
            detail = rec["message"].splitlines()[0] if rec["message"] else ""
            rows.append(Row(number, name, rec["status"], detail))
        elif crashed_at:
            rows.append(Row(number, name, "not run", f"notebook stopped: {crashed_at}"))
        elif setup_errors:
            rows.append(Row(number, name, "not run", f"setup failed: {setup_errors[0]}"))
        else:
            rows.append(Row(number, name, "not run", "its check cell did not report (missing, or it errored)"))
    return GradeResult(rows, crashed_at, time.perf_counter() - start)


def format_table(result: GradeResult, title: str = "") -> str:
    """A plain-text table of the rows plus a summary line."""
    header = ("exercise", "function", "result")
    body = []
    for r in result.rows:
        status = r.status + (f": {r.detail}" if r.detail else "")
        if len(status) > 110:
            status = status[:107] + "..."
        body.append((r.exercise, r.name, status))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    n_pass = sum(r.status == PASSED for r in result.rows)
    lines.append(f"{n_pass}/{len(result.rows)} exercises passed ({result.seconds:.0f} s)")
    if result.crashed_at:
        lines.append(f"The notebook stopped early: {result.crashed_at}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ar_course grade",
        description="Execute a notebook's setup/exercise/check cells and print which exercises pass.",
    )
    parser.add_argument("notebooks", nargs="+", type=Path, help="notebook(s) to grade")
    parser.add_argument("--timeout", type=float, default=600.0, help="time limit per notebook in seconds")
    parser.add_argument("--cell-timeout", type=float, default=300.0, help="time limit per cell in seconds")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    ok = True
    results = {}
    for nb_path in args.notebooks:
        if not nb_path.is_file():
            print(f"error: no such notebook: {nb_path}", file=sys.stderr)
            return 2
        res = grade_notebook(nb_path, timeout=args.timeout, cell_timeout=args.cell_timeout)
        print(format_table(res, title=str(nb_path)))
        print()
        ok = ok and res.all_passed
        results[str(nb_path)] = [r.__dict__ for r in res.rows]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0 if ok else 1


__all__ = ["grade_notebook", "format_table", "GradeResult", "Row", "PASSED", "FAILED", "NOT_ATTEMPTED"]
