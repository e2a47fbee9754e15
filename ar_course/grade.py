"""Grade a learner's notebook: execute its tagged cells and print a table of exercises.

``python -m ar_course grade notebooks/01_vector_quantization.ipynb`` runs the cells tagged ``setup``,
``exercise`` and ``check`` (in order, in a fresh kernel of the current Python environment, with a time
limit), collects each check's verdict from the report the checks write (see
:mod:`ar_course.checks.core`), and prints one row per exercise of the chapter: passed, failed (first line of the
reason), not attempted, or not run (and why). The exit code is 0 only when every exercise passed.

The rows are every exercise of the notebook's chapter, whatever the learner did to the notebook: the chapter is
the number before the dot of the notebook's first ``# Exercise N.M: name`` cell, and its exercises are those the
package's checks register (``ar_course.checks.chNN``, see :func:`chapter_exercises`). A check's verdict is the
row's status wherever the learner put the function; an exercise whose check never reported is "not run", and the
row says why in one line: the error of a setup cell, its exercise cell missing or without its header, the error
its exercise cell or its check cell raised (with the cell's index in the notebook).

A notebook that crashes midway (kernel death, time-out) is still reported: the rows after the crash say
where it happened (a kernel stuck past its time limit is killed). A line of the report that is not a check's
verdict (the notebook's own code can write to the report file) is skipped, and the table says so in one line.
A file the grader cannot use (not a notebook, or one without exercises) is refused before any kernel starts:
:func:`read_notebook` and :func:`grade_notebook` raise ``ValueError`` naming the file and what is wrong, which the
command prints as one ``error:`` line (exit status 2).
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import json
import os
import re
import sys
import tempfile
import textwrap
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Iterator

import ipykernel.kernelspec
import nbformat
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from traitlets import Type

from .build_notebooks import exercise_label
from .checks.core import FAILED, NOT_ATTEMPTED, PASSED, REPORT_ENV
from .cli import ArgumentParser, UsageError, first_line, float_in, path_arg
from .files import atomic_write_text, check_output_path

GRADED_TAGS = ("setup", "exercise", "check")
CURRENT_ENV = "ar-course-current-env"
MAX_SECONDS = 86400.0
"""Longest time limit (a day): larger ones would overflow the kernel client's timers."""
TABLE_WIDTH = 100
"""The table's width in characters: a longer result wraps onto lines under the result column."""


class _CurrentEnvSpecs(KernelSpecManager):
    """Resolve our kernel name to ipykernel in *this* interpreter, whatever kernels are installed."""

    def get_kernel_spec(self, kernel_name):  # noqa: D401
        if kernel_name == CURRENT_ENV:
            return self.kernel_spec_class(
                resource_dir=ipykernel.kernelspec.RESOURCES, **ipykernel.kernelspec.get_kernel_dict()
            )
        return super().get_kernel_spec(kernel_name)


POLL_SLICE = 0.25
"""Seconds the kernel client waits on a socket before looking again (see :class:`_WatchfulChannel`)."""


class _WatchfulChannel(AsyncZMQSocketChannel):
    """A kernel-client channel that waits for a message in slices of :data:`POLL_SLICE` seconds, looking at the
    socket again after each, up to the caller's ``timeout``.

    Under load the asyncio wake-up for a message that has already arrived is sometimes missed, and one long wait
    then sleeps on a message that is there: the kernel had replied within a millisecond, and the run sat idle
    for the cell's whole time limit (30 s in a stress test of 300 widget cells, 900 s in CI) before the reply
    was read. Looking again every slice bounds that loss to the slice."""

    async def get_msg(self, timeout: float | None = None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_SLICE if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await super().get_msg(timeout=min(POLL_SLICE, left))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise


class _WatchfulKernelClient(AsyncKernelClient):
    """The async kernel client with :class:`_WatchfulChannel` for the shell and IOPub channels."""

    shell_channel_class = Type(_WatchfulChannel)  # type: ignore[arg-type]
    iopub_channel_class = Type(_WatchfulChannel)  # type: ignore[arg-type]


def kernel_manager(kernel_name: str = CURRENT_ENV) -> AsyncKernelManager:
    """A manager for the kernel ``kernel_name``: by default ipykernel in this interpreter, whatever kernels are
    installed; any installed kernel by name (``"python3"``, the notebooks' own).

    The kernel talks to us over local IPC sockets in a private folder of the temporary directory (not TCP), so
    ipykernel has nothing to warn about ("Kernel is running over TCP without encryption") and nothing listens on
    the network. (Encrypted TCP through CurveZMQ, tried before, seemed to lose messages under load: a cell's reply
    never came and the run waited for its full timeout; the missed wake-up :class:`_WatchfulChannel` guards
    against looks the same.) Windows has no IPC sockets and keeps plain TCP on localhost."""
    client = f"{__name__}._WatchfulKernelClient"
    prefix = None if os.name == "nt" else _ipc_prefix()
    if prefix is None:
        return AsyncKernelManager(kernel_name=kernel_name, kernel_spec_manager=_CurrentEnvSpecs(),
                                  client_class=client)
    return AsyncKernelManager(kernel_name=kernel_name, kernel_spec_manager=_CurrentEnvSpecs(), transport="ipc",
                              ip=str(prefix), client_class=client)


IPC_PATH_MAX = 107
"""Bytes of a Unix socket's path on Linux (``sun_path`` less its final NUL); macOS allows 103."""


def _ipc_prefix() -> Path | None:
    """Where a kernel's IPC sockets go: ``ar-course-kernels-UID/kernel-PID-RANDOM`` in the temporary directory,
    else in ``/tmp`` when that path is too long for a socket (with the ``-N`` jupyter_client adds) or not UTF-8
    (a non-ASCII TMPDIR under ``LC_ALL=C``), or when its folder cannot be made; None (use TCP) if neither works.
    Each kernel has a prefix of its own: jupyter_client numbers IPC sockets from 1 up, so two processes starting
    kernels at once (pytest-xdist) would otherwise bind the same paths and cross their messages."""
    limit = (103 if sys.platform == "darwin" else IPC_PATH_MAX) - len("-99")
    for base in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
        prefix = Path(base) / f"ar-course-kernels-{os.getuid()}" / f"kernel-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            if len(str(prefix).encode("utf-8")) > limit:
                continue
        except UnicodeEncodeError:  # bytes the locale could not decode: zmq cannot name the socket
            continue
        try:
            prefix.parent.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            continue
        return prefix
    return None


@dataclass
class Row:
    """One exercise's line of the table: its number (``"1.3"``), function name, ``status`` (passed, failed, not
    attempted or ``"not run"``) and the reason's first line."""

    exercise: str
    name: str
    status: str
    detail: str = ""


@dataclass
class GradeResult:
    """A graded notebook: one :class:`Row` per exercise, why the run stopped early (``None`` when it did not), the
    seconds it took, and the report lines skipped as malformed."""

    rows: list[Row]
    crashed_at: str | None
    seconds: float
    malformed: list[str] = field(default_factory=list)
    """Why each skipped line of the grade report is not a verdict (``line 3 is not JSON: 'oops'``)."""

    @property
    def all_passed(self) -> bool:
        """Whether there is at least one exercise and every one passed."""
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
    """``"SyntaxError: '(' was never closed (...)"``: the error a run cell raised, its type and the first line of
    its message (the type alone without one); ``None`` when it raised none."""
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            message = re.sub(r"\([^()]*\.py, (line \d+)\)", r"(\1)", first_line(str(out.get("evalue", ""))))
            return f"{out.get('ename')}: {message}" if message else str(out.get("ename"))
    return None


def _not_a_notebook(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is not a Jupyter notebook ({why})")


def _did_you_mean(path: Path) -> str:
    """`` (did you mean notebooks/01_vector_quantization.ipynb?)`` when ``path`` is the start of the name of a
    notebook beside it or in a ``notebooks`` folder there (``grade 01``), else ``""``."""
    folder = path.parent
    found = [p for where in (folder, folder / "notebooks") if where.is_dir()
             for p in sorted(where.glob(f"{glob.escape(path.name)}*.ipynb"))]
    return f" (did you mean {' or '.join(str(p) for p in found[:3])}?)" if found else ""


def read_notebook(path: str | Path) -> nbformat.NotebookNode:
    """The notebook at ``path`` (any nbformat version, converted to 4). Raises ``ValueError`` naming the file
    and what is wrong: missing, a folder, not ``.ipynb``, unreadable, empty, binary, not JSON, or JSON that is
    not a valid notebook."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no such notebook: {path}{_did_you_mean(path)}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a notebook")
    if path.suffix.lower() != ".ipynb":
        raise _not_a_notebook(path, "expected a .ipynb file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise _not_a_notebook(path, "the file is empty")
    try:
        text = data.decode("utf-8")
        content = json.loads(text)
    except UnicodeDecodeError:
        raise _not_a_notebook(path, "a binary file, not UTF-8 text") from None
    except json.JSONDecodeError as exc:  # some messages end in "at" already ("Unterminated string starting at")
        raise _not_a_notebook(path, f"not valid JSON: {exc.msg.removesuffix(' at')} at line {exc.lineno} column "
                                    f"{exc.colno}") from None
    if not isinstance(content, dict) or "nbformat" not in content:
        raise _not_a_notebook(path, "JSON without an 'nbformat' version")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. missing cell ids: Jupyter adds them, the grader needs none
            nb = nbformat.convert(nbformat.reader.reads(text), 4)  # reads without logging errors
            nbformat.validate(nb, relax_add_props=True)  # extra fields other tools add are fine
    except Exception as exc:  # noqa: BLE001 - nbformat raises many types (ValidationError, TypeError,
        # AssertionError...) on malformed content; each is this one answer
        why = first_line(str(exc)) or type(exc).__name__
        raise _not_a_notebook(path, f"invalid notebook structure: {why}") from None
    return nb


def notebook_exercises(nb: nbformat.NotebookNode, path: str | Path) -> list[tuple[str, str]]:
    """``(number, function name)`` of every exercise cell of ``nb``; ``ValueError`` when it has none."""
    exercises = []
    for _, cell in graded_cells(nb):
        if "exercise" in cell.metadata.get("tags", []):
            label = exercise_label(cell.source)
            if label:
                exercises.append(label)
    if not exercises:
        raise ValueError(f"{path} has no exercises to grade (no code cell tagged 'exercise' starting with "
                         "'# Exercise N.M: name')")
    return exercises


def _number_key(number: str) -> tuple[int, ...]:
    """``(1, 10)`` for ``"1.10"``: exercise numbers in the course's order (1.2 before 1.10)."""
    return tuple(int(part) for part in number.split("."))


def chapter_exercises(exercises: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every exercise to grade for a notebook whose own exercise cells are ``exercises`` (non-empty, from
    :func:`notebook_exercises`), so that one a learner deleted or whose header they changed is still listed.

    The chapter is the number before the dot of the notebook's first exercise (``1`` for ``1.3``). When the
    package has checks for it (``ar_course.checks.ch01``), the answer is all of that chapter's exercises in number
    order, followed by any exercise of the notebook the chapter does not have; otherwise (a chapter the package
    does not know) the notebook's own list."""
    module = f"{__package__}.checks.ch{_number_key(exercises[0][0])[0]:02d}"
    try:
        registered = importlib.import_module(module).chapter.exercises.values()
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return exercises
    listed = sorted(((ex.number, ex.name) for ex in registered), key=lambda ex: _number_key(ex[0]))
    numbers = {number for number, _ in listed}
    return listed + [ex for ex in exercises if ex[0] not in numbers]


def _own_cells(cells: list[tuple[int, nbformat.NotebookNode]]) -> dict[str, tuple[int, list[int]]]:
    """Exercise number -> (notebook index of its exercise cell, those of the check cells after it up to the next
    exercise cell), for every exercise cell that starts with its header (the first one, for a number used
    twice)."""
    own: dict[str, tuple[int, list[int]]] = {}
    checks: list[int] = []
    for i, cell in cells:
        tags = cell.metadata.get("tags", [])
        if "exercise" in tags:
            label = exercise_label(cell.source)
            checks = []  # a new exercise cell: the check cells that follow are its own, not the previous one's
            if label and label[0] not in own:
                own[label[0]] = (i, checks)
        elif "check" in tags:
            checks.append(i)
    return own


def _why_not_run(number: str, name: str, own: dict[str, tuple[int, list[int]]], errors: dict[int, str],
                 setup_errors: list[str]) -> str:
    """Why exercise ``number`` has no verdict although the notebook ran to its end: a setup cell's error, its
    exercise cell missing (or without its header), the error its exercise cell or else its check cell raised."""
    if setup_errors:
        return f"setup failed: {setup_errors[0]}"
    if number not in own:
        return f"its exercise cell is missing or no longer starts with '# Exercise {number}: {name}'"
    exercise_cell, check_cells = own[number]
    if exercise_cell in errors:
        return f"its exercise cell raised {errors[exercise_cell]} (cell {exercise_cell})"
    for i in check_cells:
        if i in errors:
            return f"its check cell raised {errors[i]} (cell {i})"
    return "no check reported: no cell tagged 'check' after its exercise cell calls its check"


def _check_time_limits(timeout: float, cell_timeout: float) -> None:
    for name, value in (("timeout", timeout), ("cell_timeout", cell_timeout)):
        if not (isinstance(value, (int, float)) and 0 < value <= MAX_SECONDS):
            raise ValueError(f"{name} must be a number of seconds in (0, {MAX_SECONDS:g}], got {value!r}")


def grade_notebook(path: str | Path, timeout: float = 600.0, cell_timeout: float = 300.0) -> GradeResult:
    """Execute the tagged cells of the notebook at ``path`` and return one row per exercise of its chapter (see
    :func:`chapter_exercises`), in order.

    ``timeout`` limits the whole notebook and ``cell_timeout`` each cell (seconds, in ``(0, 86400]``). A file
    that is not a notebook with exercises raises ``ValueError`` (see :func:`read_notebook`) before any kernel
    starts."""
    _check_time_limits(timeout, cell_timeout)
    path = Path(path)
    nb = read_notebook(path)
    exercises = chapter_exercises(notebook_exercises(nb, path))
    cells = graded_cells(nb)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.jsonl"
        with _environment(REPORT_ENV, str(report)):
            crashed_at, errors = _run_cells(cells, nb.metadata, path.parent.resolve(), timeout, cell_timeout)
        verdicts, malformed, unreported = _read_report(report)
    setup_errors = [
        f"cell {i}: {errors[i]}" for i, c in cells if i in errors and "setup" in c.metadata.get("tags", [])
    ]
    own = _own_cells(cells)
    rows = []
    for number, name in exercises:
        rec = verdicts.get(number)
        if rec is not None:
            detail = rec["message"].splitlines()[0] if rec["message"] else ""
            rows.append(Row(number, name, rec["status"], detail))
        elif crashed_at:
            rows.append(Row(number, name, "not run", f"notebook stopped: {crashed_at}"))
        elif number in unreported:
            rows.append(Row(number, name, "not run", f"malformed grade report ({unreported[number]})"))
        else:
            rows.append(Row(number, name, "not run", _why_not_run(number, name, own, errors, setup_errors)))
    return GradeResult(rows, crashed_at, time.perf_counter() - start, malformed)


VERDICT_STATUSES = (PASSED, FAILED, NOT_ATTEMPTED)


def _shown(line: str) -> str:
    """A report line quoted for a message, shortened when long."""
    return repr(line) if len(line) <= 40 else repr(line[:37]) + "..."


def _read_report(report: Path) -> tuple[dict[str, dict], list[str], dict[str, str]]:
    """The grade report's verdicts by exercise (the last one for an exercise wins), why each malformed line was
    skipped, and which line (``"line 3"``) last named an exercise in a malformed record.

    A verdict is a JSON object ``{"exercise": str, "status": one of VERDICT_STATUSES, "message": str}`` on a line
    of its own (as :mod:`ar_course.checks.core` writes it); the notebook's own code can write anything there."""
    verdicts: dict[str, dict] = {}
    malformed: list[str] = []
    unreported: dict[str, str] = {}
    if not report.exists():
        return verdicts, malformed, unreported
    for n, line in enumerate(report.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            malformed.append(f"line {n} is not JSON: {_shown(line)}")
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("exercise"), str)
                and rec.get("status") in VERDICT_STATUSES and isinstance(rec.get("message"), str)):
            malformed.append(f"line {n} is not a verdict {{exercise, status, message}}: {_shown(line)}")
            if isinstance(rec, dict) and isinstance(rec.get("exercise"), str):
                unreported[rec["exercise"]] = f"line {n}"
            continue
        verdicts[rec["exercise"]] = rec
    return verdicts, malformed, unreported


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """Set the environment variable ``name`` (inherited by the kernel) for the block, then restore it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _run_cells(cells: list[tuple[int, nbformat.NotebookNode]], metadata: dict, folder: Path, timeout: float,
               cell_timeout: float) -> tuple[str | None, dict[int, str]]:
    """Run ``cells`` (``(index in the notebook, cell)``) in one fresh kernel in ``folder``, going on after a
    cell's error. Returns why the run stopped early (``None`` if it did not) and each erroring cell's line."""
    run_nb = nbformat.v4.new_notebook(metadata=metadata, cells=[c for _, c in cells])
    start = time.perf_counter()
    crashed_at: str | None = None
    errors: dict[int, str] = {}
    client = NotebookClient(run_nb, km=kernel_manager(), timeout=int(cell_timeout), allow_errors=True,
                            kernel_name=CURRENT_ENV, resources={"metadata": {"path": str(folder)}})
    try:
        with client.setup_kernel(cleanup_kc=True):  # shut the kernel down when done (we own it)
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
                    # kill the stuck kernel: a graceful shutdown interrupts the cell and closes the kernel's
                    # sockets while it replies, and it prints a ZMQError traceback on our stderr
                    client.shutdown_kernel = "immediate"
                    break
                except DeadKernelError:
                    crashed_at = f"kernel died in cell {orig}"
                    break
                except KeyboardInterrupt:  # Ctrl-C: as after a timeout, no ZMQError traceback on the way out
                    client.shutdown_kernel = "immediate"
                    raise
                err = _error_line(cell)
                if err:
                    errors[orig] = err
    except DeadKernelError:
        crashed_at = crashed_at or "kernel died"
    return crashed_at, errors


def format_table(result: GradeResult, title: str = "") -> str:
    """A plain-text table of the rows plus a summary line. A long result (a failure's reason and hint) is
    wrapped onto continuation lines under the result column, so the table stays :data:`TABLE_WIDTH` wide (the
    result column keeps at least 40 characters: long exercise or function names make it wider)."""
    header = ("exercise", "function", "result")
    cells = [(r.exercise, r.name, r.status + (f": {r.detail}" if r.detail else "")) for r in result.rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header[:2])]
    indent = sum(widths) + 2 * len(widths)  # where the result column starts
    wrapped = [textwrap.wrap(c[2], width=max(40, TABLE_WIDTH - indent), break_on_hyphens=False) or [""]
               for c in cells]
    widths.append(max(len(header[2]), *(len(line) for lines in wrapped for line in lines)) if cells else
                  len(header[2]))
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    for c, result_lines in zip(cells, wrapped):
        lines.append("  ".join(x.ljust(w) for x, w in zip(c[:2], widths)) + "  " + result_lines[0])
        lines += [" " * indent + more for more in result_lines[1:]]
    n_pass = sum(r.status == PASSED for r in result.rows)
    lines.append(f"{n_pass}/{len(result.rows)} exercises passed ({result.seconds:.0f} s)")
    if result.crashed_at:
        lines.append(f"The notebook stopped early: {result.crashed_at}.")
    if result.malformed:
        n = len(result.malformed)
        lines.append(f"Skipped {n} malformed line{'s' * (n > 1)} of the grade report: {result.malformed[0]}"
                     + (f" (and {n - 1} more)" if n > 1 else "") + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course grade``: every notebook and the ``--json`` path are checked before any is graded;
    the JSON is written atomically. Exit status 0 when every exercise passed, 1 otherwise, 2 for bad input."""
    seconds = float_in(0.0, MAX_SECONDS, lo_open=True)
    parser = ArgumentParser(
        prog="python -m ar_course grade",
        description="Execute a notebook's setup/exercise/check cells and print which exercises pass.",
    )
    parser.add_argument("notebooks", nargs="+", type=path_arg,
                        help="notebook(s) to grade; one named twice (even by another path) is graded once")
    parser.add_argument("--timeout", type=seconds, default=600.0,
                        help=f"time limit per notebook in seconds, at most {MAX_SECONDS:g} [600]")
    parser.add_argument("--cell-timeout", type=seconds, default=300.0,
                        help=f"time limit per cell in seconds, at most {MAX_SECONDS:g} [300]")
    parser.add_argument("--json", type=path_arg, help="also write the results to this .json file")
    args = parser.parse_args(argv)
    unique: dict[str, Path] = {}
    for nb_path in args.notebooks:
        unique.setdefault(os.path.realpath(nb_path), nb_path)  # each notebook once, as first named
    notebooks = list(unique.values())
    try:
        if args.json is not None:
            check_output_path(args.json, suffix=".json", what="--json")
        for nb_path in notebooks:
            notebook_exercises(read_notebook(nb_path), nb_path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    ok = True
    results = {}
    for nb_path in notebooks:
        res = grade_notebook(nb_path, timeout=args.timeout, cell_timeout=args.cell_timeout)
        print(format_table(res, title=str(nb_path)))
        print()
        ok = ok and res.all_passed
        results[str(nb_path)] = [r.__dict__ for r in res.rows]
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(results, indent=2))
    return 0 if ok else 1


__all__ = ["grade_notebook", "read_notebook", "notebook_exercises", "chapter_exercises", "format_table", "GradeResult",
           "Row", "PASSED", "FAILED", "NOT_ATTEMPTED"]
