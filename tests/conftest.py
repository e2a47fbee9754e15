import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_terminal_summary(terminalreporter):
    from fuzz_report import COUNTS

    if COUNTS:
        terminalreporter.section("fuzz cases")
        for name, n in sorted(COUNTS.items()):
            terminalreporter.write_line(f"fuzz: {name}: {n} cases")
