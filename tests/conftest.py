import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_terminal_summary(terminalreporter):
    from fuzz_report import COUNTS

    if COUNTS:  # under pytest-xdist, the workers' counts (added up by pytest_testnodedown below)
        terminalreporter.section("fuzz cases")
        for name, n in sorted(COUNTS.items()):
            terminalreporter.write_line(f"fuzz: {name}: {n} cases")


@pytest.fixture(autouse=True)
def _fresh_check_history():
    """Each test starts from a fresh session's check history (hint levels shown, exercises passed), as a new
    kernel would: the chapters' registries are module globals shared by all tests."""
    yield
    for name, module in list(sys.modules.items()):
        if name.startswith("ar_course.checks.ch"):
            module.chapter.reset()


@pytest.fixture(autouse=True)
def _close_figures():
    """Each test's matplotlib figures are closed after it (pyplot keeps every figure open otherwise, and warns
    past 20), without importing matplotlib into tests that never used it."""
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def pytest_sessionfinish(session):
    """An xdist worker hands its fuzz case counts to the controller, which prints the summary."""
    if hasattr(session.config, "workeroutput"):
        from fuzz_report import COUNTS

        session.config.workeroutput["fuzz_counts"] = dict(COUNTS)


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_FuzzCountsFromWorkers(), "fuzz-counts-from-workers")


class _FuzzCountsFromWorkers:
    def pytest_testnodedown(self, node, error):
        from fuzz_report import record

        for name, n in getattr(node, "workeroutput", {}).get("fuzz_counts", {}).items():
            record(name, n)
