"""``python -m ar_course bench``: run the scripts in ``benchmarks/`` and print their summary table.

Each ``benchmarks/bench_NAME.py`` writes ``benchmarks/results/NAME.json`` (and a plot); a result's
``summary`` list holds rows ``{"what", "measured", "target", "met"}`` that this command prints. Ratios are
measured inside one run on one machine; the JSON records the machine and date.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
RESULTS = BENCH_DIR / "results"


def available() -> dict[str, Path]:
    """Benchmark name -> script path."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def summary_rows(names: list[str]) -> list[dict]:
    """The summary rows of the named benchmarks' latest results (missing results are skipped)."""
    rows = []
    for name in names:
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        summary = data.get("summary", [])
        if isinstance(summary, dict):  # {"what": "measured", ...}
            summary = [{"what": k, "measured": v} for k, v in summary.items()]
        for row in summary:
            if not isinstance(row, dict):
                row = {"what": str(row), "measured": ""}
            rows.append({"bench": name, "date": data.get("date", ""), "what": "", "measured": "", **row})
    return rows


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return "no benchmark results yet"
    lines = []
    for r in rows:
        met = {True: "yes", False: "NO"}.get(r.get("met"), "-")
        lines.append(f"[{r['bench']}] {r['what']}\n    measured: {r['measured']}\n    target: {r.get('target', '-')}"
                     f"   met: {met}   ({r.get('date', '')})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    scripts = available()
    parser = argparse.ArgumentParser(prog="python -m ar_course bench", description="Run the benchmarks in benchmarks/ and print their summary table.")
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(scripts) or 'none found'}")
    parser.add_argument("--table", action="store_true", help="only print the latest results, run nothing")
    args = parser.parse_args(argv)
    if not BENCH_DIR.is_dir():
        print(f"error: no benchmarks/ folder next to the package ({BENCH_DIR}); run from a source checkout",
              file=sys.stderr)
        return 2
    unknown = [n for n in args.names if n not in scripts]
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)}; choose from: {', '.join(scripts)}", file=sys.stderr)
        return 2
    names = args.names or list(scripts)
    failed = []
    if not args.table:
        for name in names:
            print(f"== {name}: {scripts[name].relative_to(ROOT)}", flush=True)
            res = subprocess.run([sys.executable, str(scripts[name])], cwd=ROOT)
            if res.returncode != 0:
                failed.append(name)
    print()
    print(format_rows(summary_rows(names)))
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
