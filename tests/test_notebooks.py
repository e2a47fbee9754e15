"""Every learner notebook, executed as shipped (Run All), runs top to bottom and ends each exercise 'not
attempted'; every solution notebook passes each of its checks through the grader, which runs only the tagged
cells. (The full solution notebooks also run top to bottom in `make test`: tests/run_solutions.py.)"""

import asyncio
import os
import tempfile
import time
from pathlib import Path
from queue import Empty

import nbformat
import pytest
from jupyter_client.channels import AsyncZMQSocketChannel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from ar_course.build_notebooks import KERNELSPEC, exercise_label
from ar_course.checks.core import STRICT_ENV
from ar_course.site import CELL_TIMEOUT
from ar_course.grade import (
    POLL_SLICE, _ipc_prefix, _WatchfulChannel, _WatchfulKernelClient, format_table, grade_notebook, kernel_manager,
)
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


@pytest.mark.timeout(300)
def test_a_kernel_starts_under_a_temporary_directory_too_long_for_a_socket(monkeypatch, tmp_path):
    """A TMPDIR whose socket paths pass the 107-byte limit (or are not UTF-8) puts the kernel's sockets in /tmp:
    grading used to end in "ZMQError: File name too long" and the kernel's traceback."""
    long = tmp_path / ("l" * 80)
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    prefix = _ipc_prefix()
    assert prefix is not None and prefix.parent.parent == Path("/tmp")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "\udcc3\udcbc"))  # LC_ALL=C's view of "ü"
    assert _ipc_prefix().parent.parent == Path("/tmp")
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    NotebookClient(nb, km=kernel_manager(), timeout=120).execute()
    assert nb.cells[0].outputs[0]["text"] == "42\n"


def test_the_kernel_client_looks_again_for_a_message_it_was_not_woken_for(monkeypatch):
    """A missed asyncio wake-up costs one poll slice, not the cell's time limit: every wait on a socket is at
    most POLL_SLICE seconds, a message is returned as soon as a look finds it, and the caller's timeout still
    ends the wait with Empty."""
    waits: list[float | None] = []
    found_at = {"look": 4}

    async def one_look(self, timeout=None):
        waits.append(timeout)
        if len(waits) < found_at["look"]:
            await asyncio.sleep(timeout or 0)
            raise Empty
        return {"msg_type": "execute_reply"}

    monkeypatch.setattr(AsyncZMQSocketChannel, "get_msg", one_look)
    channel = _WatchfulChannel.__new__(_WatchfulChannel)  # no socket: the parent's get_msg is the fake above
    assert asyncio.run(channel.get_msg(timeout=900)) == {"msg_type": "execute_reply"}
    assert len(waits) == 4 and all(0 < w <= POLL_SLICE for w in waits)
    waits.clear()
    assert asyncio.run(channel.get_msg(timeout=None)) == {"msg_type": "execute_reply"}  # IOPub waits forever
    assert waits == [POLL_SLICE] * 4
    waits.clear()
    found_at["look"] = 10**9
    start = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(channel.get_msg(timeout=0.6))
    # ends at the caller's 0.6 s; the loose upper bound only tells it from a wait of the cell's whole limit, since a
    # loaded host can stretch a 0.25 s sleep several times over
    assert 0.6 <= time.monotonic() - start < 30 and waits and all(0 <= w <= POLL_SLICE for w in waits)
    client = kernel_manager().client()  # no kernel started: the client's channels are made on first use
    assert isinstance(client, _WatchfulKernelClient)
    assert client.shell_channel_class is _WatchfulChannel and client.iopub_channel_class is _WatchfulChannel


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("path", LEARNER, ids=[p.name for p in LEARNER])
def test_learner_notebook_runs_all(path, monkeypatch):
    """Run All on a fresh learner notebook, every cell, in its own python3 kernel, with the learner's lenient
    checks: each unattempted check prints its line and the chapter goes on with the references to the end."""
    monkeypatch.setenv(STRICT_ENV, "0")
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")  # python3 = this environment's, as under `make lab`
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, km=kernel_manager(KERNELSPEC["name"]), kernel_name=KERNELSPEC["name"],
                            timeout=CELL_TIMEOUT, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
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
