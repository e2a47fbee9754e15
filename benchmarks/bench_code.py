"""The package's seams, measured: import time of its main modules, which heavy libraries each import pulls in,
and the functions longer than 60 lines.

    python benchmarks/bench_code.py --label before   # e.g. before a refactor
    python benchmarks/bench_code.py --label after    # after it: code.json then holds both, with their commits
    python benchmarks/bench_code.py --out /tmp/code  # read and write code.json there: the committed one stays

Each import is timed in a fresh interpreter (best of ``--repeats``), so nothing is cached between runs but the
operating system's file cache (one untimed import warms it). Writes ``benchmarks/results/code.json`` and
``code.png``.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import platform
import subprocess
import sys
from pathlib import Path

from ar_course import cli
from ar_course.files import atomic_write_text, save_figure

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODULES = ("ar_course", "ar_course.transformer", "ar_course.tokenizers", "ar_course.var", "ar_course.speculative",
           "ar_course.system")
HEAVY = ("matplotlib", "scipy", "numba", "triton", "jupyter_client", "ipykernel", "nbclient", "ipywidgets", "PIL")
LONG = 60

_PROBE = """
import os, sys, time, json
env = dict(os.environ)
start = time.perf_counter()
import {module}
seconds = time.perf_counter() - start
changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(json.dumps({{"seconds": seconds, "heavy": heavy, "env_changed": changed}}))
"""


def time_import(module: str, repeats: int) -> dict:
    """Best-of-``repeats`` import time of ``module`` in fresh interpreters, the heavy libraries it loaded and the
    environment variables it changed."""
    code = _PROBE.format(module=module, heavy=HEAVY)
    runs = []
    for _ in range(repeats + 1):  # the first run warms the file cache and is dropped
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs[1:], key=lambda r: r["seconds"])
    return {"module": module, "seconds": round(best["seconds"], 3), "heavy": best["heavy"],
            "env_changed": best["env_changed"]}


def long_functions(package: Path, limit: int = LONG) -> list[dict]:
    """Functions and methods of ``package`` longer than ``limit`` lines (decorators and docstrings included),
    longest first."""
    rows = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - start + 1
                if lines > limit:
                    rows.append({"where": f"{path.relative_to(ROOT)}:{node.lineno}", "name": node.name,
                                 "lines": lines, "parameters": len(node.args.args) + len(node.args.kwonlyargs)})
    return sorted(rows, key=lambda r: -r["lines"])


def git_commit() -> str:
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return res.stdout.strip() or "unknown"


def summary(runs: dict) -> list[dict]:
    """Summary rows for ``python -m ar_course bench --table``: each measured label's figures."""
    rows = []
    for label, run in runs.items():
        times = {r["module"]: r["seconds"] for r in run["imports"]}
        heavy = sorted({m for r in run["imports"] for m in r["heavy"]})
        rows.append({"what": f"import time and long functions ({label}, {run['commit']})",
                     "measured": f"import ar_course.transformer {times['ar_course.transformer']:.2f} s, "
                                 f"ar_course.system {times['ar_course.system']:.2f} s; heavy libraries imported: "
                                 f"{', '.join(heavy) or 'none'}; {len(run['long_functions'])} functions over "
                                 f"{LONG} lines",
                     "target": "no heavy library imported by the library modules", "met": not heavy})
    return rows


def plot(runs: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(1, len(runs))
    for i, (label, run) in enumerate(runs.items()):
        secs = [next(r["seconds"] for r in run["imports"] if r["module"] == m) for m in MODULES]
        bars = ax.bar([j + i * width for j in range(len(MODULES))], secs, width, label=f"{label} ({run['commit']})")
        ax.bar_label(bars, [f"{s:.3f} s" for s in secs], fontsize=6, padding=1)  # a 0.000 s bar is invisible
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(MODULES))])
    ax.set_xticklabels([m.replace("ar_course.", ".") for m in MODULES], fontsize=8)
    ax.set_ylabel("import time (s, best of runs)")
    ax.margins(y=0.15)  # room for the labels above the bars
    ax.set_title("Import time in a fresh interpreter")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="current", help="name of this measurement in code.json [current]")
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="timed imports per module [5]")
    parser.add_argument("--out", type=cli.path_arg, default=RESULTS,
                        help="folder for code.json and code.png, created if missing [benchmarks/results]")
    args = parser.parse_args(argv)
    out = args.out / "code.json"
    data = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    runs = data.get("runs", {})
    runs[args.label] = {"commit": git_commit(), "date": dt.date.today().isoformat(),
                        "machine": f"{platform.machine()} {platform.system()}, python {platform.python_version()}",
                        "imports": [time_import(m, args.repeats) for m in MODULES],
                        "long_functions": long_functions(ROOT / "ar_course")}
    data = {"date": dt.date.today().isoformat(), "runs": runs, "summary": summary(runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(data, indent=1) + "\n")
    plot(runs, args.out / "code.png")
    for row in data["summary"]:
        print(f"{row['what']}: {row['measured']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
