"""One GPU report: the GPU tests, the kernels against torch and against measured ceilings, and images/second of
every system configuration, in at most five minutes on one CUDA GPU. Writes ``benchmarks/results/gpu.json`` and
``gpu.png`` (atomically), naming the device and the date::

    make gpu-report                                  # = PYTHONPATH=. python benchmarks/gpu_report.py
    python benchmarks/gpu_report.py --table          # the README's GPU table (markdown) from gpu.json

Runs from a plain checkout with the machine's own torch / triton / numba (no install step; numba-cuda 0.30
needs ``numpy.row_stack``, which numpy 2.5 removed: importing ``ar_course.kernels``, as every GPU path does
before it compiles a kernel, puts it back). Each part runs in its own process under its share of the time
budget (:data:`PARTS`), never more than what the report has left; a part that runs out is cut off and noted,
and the parts after an exhausted budget are skipped with a note:

* ``tests``: ``pytest -m gpu`` over the test files that have GPU tests: passed / failed / skipped counts and
  each failure's first line.
* ``kernels``: ``bench_kernels``' GPU measurements (FlashAttention against SDPA and the bf16 matmul ceiling,
  decode attention against the copy bandwidth, nearest-code search against ``cdist``; both ceilings measured
  here), written section by section.
* ``system``: images/second of every configuration in :data:`CONFIGS` (VAR / raster AR x kernels torch / auto
  x eager / CUDA graphs) at each batch in :data:`BATCHES`, warm (timed after a warm-up call at that size, whose
  time, compile and capture included, is recorded too), with the GPU-busy fraction and the kernel launches
  of one profiled call. Rows are written as they are measured, so a part cut off keeps what it finished.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a plain checkout: the package and the benchmarks beside this file
sys.path.insert(0, str(ROOT / "benchmarks"))

from ar_course import cli  # noqa: E402  (the checkout beside this file)
RESULTS = ROOT / "benchmarks" / "results"
TOTAL_S = 290.0
"""The report's time limit in seconds (five minutes, less a margin for starting up and writing)."""
PARTS = {"tests": 120.0, "kernels": 60.0, "system": 110.0}
"""Each part's share of :data:`TOTAL_S`, in the order they run."""
MIN_PART_S = 10.0
"""A part is skipped when less than this is left for it."""
BATCHES = (64, 256, 1024)
CONFIGS = {  # name -> Generator.generate options; in order of importance (the budget may cut the last ones):
    # each torch row beside its auto row, so that a cut leaves pairs to compare (auto >= 0.97x torch)
    "VAR, torch, eager": {"method": "var", "kernels": "torch"},
    "VAR, auto, eager": {"method": "var", "kernels": "auto"},
    "raster AR, torch, eager": {"method": "ar", "kernels": "torch"},
    "raster AR, auto, eager": {"method": "ar", "kernels": "auto"},
    "VAR, torch, graphs": {"method": "var", "kernels": "torch", "graphs": True},
    "VAR, auto, graphs": {"method": "var", "kernels": "auto", "graphs": True},
    "raster AR, torch, graphs": {"method": "ar", "kernels": "torch", "graphs": True},
    "raster AR, auto, graphs": {"method": "ar", "kernels": "auto", "graphs": True},
}
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cuGraphLaunch")
"""Prefixes of the host API calls that launch work on the GPU (``cudaLaunchKernelExC``... included; a graph
replay is one launch)."""


# the time budget ------------------------------------------------------------------------------------------


@dataclass
class Budget:
    """What is left of ``total_s`` seconds since the budget was made (``clock``: seconds, monotonic)."""

    total_s: float
    clock: Callable[[], float] = time.monotonic
    start: float = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def left(self) -> float:
        return self.total_s - (self.clock() - self.start)

    def share(self, part_s: float, later_s: float = 0.0) -> float:
        """Seconds a part may run: its share, plus what earlier parts left unused beyond the ``later_s`` the
        parts after it are due, at most what is left (0 when nothing is)."""
        left = self.left()
        return max(0.0, min(left, max(part_s, left - later_s)))


def run_part(name: str, command: list[str], seconds: float) -> tuple[dict, str]:
    """Run one part's ``command`` for at most ``seconds``: ``({"status": "ok" | "failed" | "timed out" |
    "skipped", "seconds", "note" where not ok}, its output)``; a part cut off leaves what it wrote so far."""
    if seconds < MIN_PART_S:
        return {"status": "skipped", "seconds": 0.0,
                "note": f"{seconds:.0f} s of the {TOTAL_S:.0f} s budget left for {name}"}, ""
    start = time.monotonic()
    # a session of its own: a part cut off is killed with every process it started (a test's subprocess, compile
    # workers), which would otherwise keep the GPU busy and hold the output pipes open past the budget
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=_env(name), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=seconds)
        status, output = ("ok" if proc.returncode == 0 else "failed"), stdout + stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        status, output = "timed out", _text(stdout) + _text(stderr)
    except BaseException:  # Ctrl-C or a signal reaches only the report: its part, in a session of its own, goes too
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    out = {"status": status, "seconds": round(time.monotonic() - start, 1)}
    if status == "timed out":
        out["note"] = f"cut off after its {seconds:.0f} s share of the budget; what it finished is kept"
    elif status == "failed":
        last = output.strip().splitlines()[-1] if output.strip() else "?"
        out["note"] = f"exited with an error: {last}"
    return out, output


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _env(name: str = "") -> dict[str, str]:
    """The environment of part ``name``: the checkout first on ``PYTHONPATH``; for the tests, Triton kernels on
    their first configuration (``AR_COURSE_TRITON_AUTOTUNE=0``: they check answers, and autotuning every kind
    of call they make would take most of their share; the kernels part measures with autotuning)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    untuned = {"AR_COURSE_TRITON_AUTOTUNE": "0"} if name == "tests" else {}  # ar_course.kernels.env.AUTOTUNE_ENV
    return {**os.environ, "PYTHONPATH": path, **untuned}


# the parts ------------------------------------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    """The test files with GPU tests (collecting only them keeps the course's notebook tests out)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(encoding="utf-8"))


def tests_command() -> list[str]:
    """``pytest -m gpu -v`` in a fresh interpreter."""
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", *gpu_test_files()]  # a file that cannot import stops no other


def read_pytest(output: str) -> dict:
    """Counts and failures from ``pytest -v -rfE`` output, a run cut off included (its finished tests):
    ``{"passed", "failed", "skipped", "failures": ["file::test: message", ...]}`` (errors count as failures, a
    file that could not be collected as one failure, ``tests/x.py: ModuleNotFoundError: ...``; the message comes
    from the short summary, which a cut-off run lacks)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    outcomes = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "SKIPPED": "skipped", "XFAIL": "skipped"}
    failures: dict[str, str] = {}
    collection_errors: dict[str, str] = {}  # file -> its exception, from the ERRORS section
    collecting = ""
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 2 and "::" in words[0] and words[1] in outcomes:  # "file::test PASSED [ 50%]"
            counts[outcomes[words[1]]] += 1
            if outcomes[words[1]] == "failed":
                failures.setdefault(words[0], "")
        elif len(words) >= 2 and words[0] in ("FAILED", "ERROR") and "::" in words[1]:  # "FAILED file::test - msg"
            failures[words[1]] = line.split(" - ", 1)[1] if " - " in line else ""
        elif len(words) >= 2 and words[0] == "ERROR" and words[1].endswith(".py"):  # "ERROR file.py[ - msg]": its
            counts["failed"] += words[1] not in failures  # tests never ran (an import error at collection)
            failures[words[1]] = line.split(" - ", 1)[1] if " - " in line else collection_errors.get(words[1], "")
        elif line.startswith("_") and "ERROR collecting" in line:  # "____ ERROR collecting tests/x.py ____"
            collecting = line.split("ERROR collecting", 1)[1].strip(" _")
        elif collecting and line.startswith("E   ") and collecting not in collection_errors:
            collection_errors[collecting] = line[4:].strip()  # the first "E   ..." line: the exception
    return {**counts, "failures": [f"{test}: {msg}" if msg else test for test, msg in failures.items()]}


def measure_kernels(out: Path) -> None:
    """The ``kernels`` part: what ``bench_kernels.bench_gpu`` measures, section by section (the ceilings, then
    FlashAttention, decode attention, nearest-code search), each written to ``out`` when done; a section that
    raises is recorded as ``"<section>_error"`` and the next one runs."""
    import bench_kernels as bk

    kernels = bk.gpu_ceilings()
    _write_json(out, {"kernels": kernels})
    sections = {"flash_attention": lambda: bk.bench_flash(kernels["matmul_bf16_tflops"]),
                "decode_attention": lambda: bk.bench_decode(kernels["copy_bandwidth_gbs"]),
                "vq_nearest": bk.bench_vq}
    for name, measure in sections.items():
        try:
            kernels[name] = measure()
        except Exception as exc:  # noqa: BLE001 -- a section that fails is recorded; the next ones still run
            kernels[f"{name}_error"] = cli.exception_line(exc)
        _write_json(out, {"kernels": kernels})


def measure_system(out: Path, seconds: float, batches: tuple[int, ...] = BATCHES,
                   clock: Callable[[], float] = time.monotonic) -> None:
    """The ``system`` part: every configuration at every batch size, rows written to ``out`` as they come. A
    measurement starts only while the ``seconds`` left exceed three times the last one plus 5 s; the rest are
    listed as skipped."""
    import torch

    from ar_course.system import Generator

    budget = Budget(seconds, clock)
    gen = Generator.from_pretrained("mnist", device="cuda")
    rows: list[dict] = []
    skipped: list[str] = []
    last = 0.0
    for name, options in CONFIGS.items():
        for b in batches:
            if budget.left() < 3 * last + 5:
                skipped.append(_row_name(name, b))
                continue
            start = clock()
            try:
                rows.append({"config": name, "batch": b, **options, **measure_one(gen, torch.arange(b) % 10, options)})
            except Exception as exc:  # noqa: BLE001 -- one configuration's failure is a result, not the end
                rows.append({"config": name, "batch": b, **options, "error": f"{type(exc).__name__}: {exc}"})
            last = clock() - start
            _write_json(out, {"system": {"rows": rows, "skipped": skipped}})
    _write_json(out, {"system": {"rows": rows, "skipped": skipped}})


def not_reached(system: dict) -> list[str]:
    """The configurations and batch sizes a ``system`` part neither measured nor skipped (it ended first)."""
    done = {_row_name(r["config"], r["batch"]) for r in system.get("rows", [])} | set(system.get("skipped", []))
    return [f"{_row_name(name, b)} (the part ended first)" for name in CONFIGS for b in BATCHES
            if _row_name(name, b) not in done]


def _row_name(config: str, batch: int) -> str:
    """How a system row is named where it was not measured: ``"VAR, auto, eager, batch 256"``."""
    return f"{config}, batch {batch}"


def measure_one(gen, classes, options: dict) -> dict:
    """One configuration at one batch size: a warm-up call (its time and capture time recorded), a timed warm
    call, and a profiled call for the GPU-busy time and the launches."""
    kwargs = {"seed": 0, "batch_size": len(classes), **options}
    start = time.monotonic()
    first = gen.generate(classes, **kwargs).stats
    first_seconds = time.monotonic() - start
    warm = gen.generate(classes, **kwargs).stats
    row = {"images_per_second": warm.images_per_second, "seconds": warm.seconds,
           "first_call_seconds": first_seconds, "capture_seconds": first.capture_seconds,
           "backends": warm.backends, "precision": warm.precision}
    row.update(profile_call(gen, classes, kwargs, warm.seconds))
    return row


def profile_call(gen, classes, kwargs: dict, warm_seconds: float) -> dict:
    """GPU-busy fraction (the kernels' summed GPU time over the warm call's wall time) and launches (host
    calls that start GPU work) and GPU kernels of one profiled call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:  # the profiler's event fields vary across torch versions: report rather than lose the row
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            gen.generate(classes, **kwargs)
        events = prof.events()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy_us = sum(e.device_time_total for e in kernels)  # a kernel event's own duration
        launches = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name.startswith(LAUNCH_CALLS))
        return {"gpu_busy_fraction": busy_us / 1e6 / warm_seconds, "launches_per_call": launches,
                "gpu_kernels_per_call": len(kernels)}
    except Exception as exc:  # noqa: BLE001
        return {"profile_error": f"{type(exc).__name__}: {exc}"}


# the report -----------------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a reader never sees half a file)."""
    from ar_course.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")


def versions() -> dict:
    """The software the report ran on."""
    import numpy
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "numpy": numpy.__version__}
    for name in ("triton", "numba"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 -- a missing or broken package is part of the record
            out[name] = f"unavailable ({type(exc).__name__})"
    return out


def write_report(report: dict, out_dir: Path) -> None:
    """``gpu.json`` and ``gpu.png`` in ``out_dir``, each written atomically."""
    _write_json(out_dir / "gpu.json", report)
    from ar_course.files import atomic_path

    fig = plot(report)
    with atomic_path(out_dir / "gpu.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot(report: dict):
    """Images/second by batch size of every configuration, and the kernels against torch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    rows = [r for r in (report.get("system") or {}).get("rows", []) if "images_per_second" in r]
    for i, name in enumerate(dict.fromkeys(r["config"] for r in rows)):
        mine = [r for r in rows if r["config"] == name]
        a.plot([r["batch"] for r in mine], [r["images_per_second"] for r in mine], "os^Dv<>P"[i % 8] + "-",
               label=name)
    a.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / second", title="system, warm calls")
    if rows:
        a.legend(fontsize=7)
    kernels = report.get("kernels") or {}
    bars = [(f"flash T={r['T']}{' causal' if r['causal'] else ''}", r["speed_vs_sdpa"])
            for r in kernels.get("flash_attention", [])]
    bars += [(f"vq N={r['N']}", r["cdist_ms"] / r["triton_ms"]) for r in kernels.get("vq_nearest", [])
             if "triton_ms" in r]
    if bars:
        b.barh([n for n, _ in bars], [v for _, v in bars])
        b.axvline(1.0, color="gray", lw=0.8)
    b.set(xlabel="speed vs torch (SDPA / cdist)", title="Triton kernels")
    fig.suptitle(f"{report.get('device', '?')} ({report.get('date', '?')})", fontsize=9)
    fig.tight_layout()
    return fig


def render_table(report: dict) -> str:
    """The README's GPU section, markdown, from a ``gpu.json`` report: the device and date, the tests, the
    system configurations and the kernels against torch and the measured ceilings."""
    lines = [f"Measured on {report['device']} on {report['date']} by `make gpu-report` "
             f"(torch {report.get('versions', {}).get('torch', '?')}).", ""]
    tests = report.get("tests") or {}
    if "passed" in tests:
        lines.append(f"GPU tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped.")
        lines += [f"- failed: {f}" for f in tests.get("failures", [])]
        lines.append("")
    system = report.get("system") or {}
    if system.get("rows"):
        lines += ["| configuration | batch | images/s | first call (s) | capture (s) | GPU busy | launches/call | "
                  "attention / decode (precision) |", "|---|---|---|---|---|---|---|---|"]
        for r in system["rows"]:
            if "error" in r:
                lines.append(f"| {r['config']} | {r['batch']} | error: {r['error']} | | | | | |")
                continue
            busy = f"{r['gpu_busy_fraction']:.0%}" if "gpu_busy_fraction" in r else "-"
            launches = f"{r['launches_per_call']:,}" if "launches_per_call" in r else "-"
            backends = r.get("backends", {})
            fallbacks = " (fallback)" if backends.get("fallbacks") else ""
            ran = (f"{backends.get('attention', '-')} / {backends.get('decode_attention', '-')} "
                   f"({r.get('precision', '-')})")  # which kernels ran: graphs route one-token steps elsewhere
            lines.append(f"| {r['config']}{fallbacks} | {r['batch']} | {r['images_per_second']:,.0f} | "
                         f"{r['first_call_seconds']:.2f} | {r['capture_seconds']:.2f} | {busy} | {launches} | {ran} |")
        lines.append("")
    skipped = [f"- not measured (time budget): {note}" for note in system.get("skipped", [])]
    lines += skipped + [""] * bool(skipped)
    kernels = report.get("kernels") or {}
    if kernels:
        lines += [f"Ceilings measured in the same run: bf16 matmul {kernels['matmul_bf16_tflops']:.0f} TFLOP/s, "
                  f"device copy {kernels['copy_bandwidth_gbs'] / 1000:.2f} TB/s (read + write).", "",
                  "| kernel | size | ours | torch | vs torch | vs ceiling |", "|---|---|---|---|---|---|"]
        for r in kernels.get("flash_attention", []):
            lines.append(f"| FlashAttention (Triton){' causal' if r['causal'] else ''} | T={r['T']} | "
                         f"{r['triton_ms']:.3f} ms | SDPA {r['sdpa_ms']:.3f} ms | {r['speed_vs_sdpa']:.2f}x | "
                         f"{r['fraction_of_matmul_peak']:.0%} of matmul |")
        for r in kernels.get("decode_attention", []):
            lines.append(f"| decode attention ({r['backend']}) | T={r['T']} | " + (
                f"error: {r['error']} | | | |" if "error" in r else
                f"{r['ms']:.3f} ms | | | {r['fraction_of_copy_bandwidth']:.0%} of copy |"))
        for r in kernels.get("vq_nearest", []):
            for backend in ("triton", "numba"):
                if f"{backend}_ms" in r:
                    lines.append(f"| nearest code ({backend}) | N={r['N']} | {r[f'{backend}_ms']:.3f} ms | cdist "
                                 f"{r['cdist_ms']:.3f} ms | {r['cdist_ms'] / r[f'{backend}_ms']:.2f}x | |")
                elif f"{backend}_error" in r:
                    lines.append(f"| nearest code ({backend}) | N={r['N']} | error: {r[f'{backend}_error']} | | | |")
        lines.append("")
        lines += [f"- {key[:-len('_error')]}: failed: {why}" for key, why in kernels.items() if key.endswith("_error")]
    for name, part in (report.get("parts") or {}).items():
        if part.get("status") != "ok":
            lines.append(f"- {name}: {part['status']}: {part.get('note', '')}")
    return "\n".join(lines).rstrip() + "\n"


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the report, in one line (None when it can)."""
    try:
        import torch
    except ImportError as exc:
        return f"{sys.executable} cannot import torch ({exc}): run the report with the Python that has it"
    if not torch.cuda.is_available():
        return f"no CUDA GPU: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)"
    return None


def run_report(out_dir: Path, total_s: float = TOTAL_S) -> dict:
    """Run the parts in order within the budget; returns the report written to ``out_dir``."""
    import torch

    budget = Budget(total_s)
    report = {"device": torch.cuda.get_device_name(0), "date": dt.date.today().isoformat(),
              "versions": versions(), "budget_s": total_s, "parts": {}}
    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, share) in enumerate(PARTS.items()):
            seconds = budget.share(share, later_s=sum(list(PARTS.values())[i + 1:]))
            result = Path(tmp, f"{name}.json")
            command = {"tests": tests_command(),
                       "kernels": [*me, "--part", "kernels", "--part-out", str(result)],
                       "system": [*me, "--part", "system", "--part-out", str(result),
                                  "--seconds", f"{max(seconds - 20, 1):.0f}"]}[name]  # 20 s: start, load
            print(f"{name}: up to {seconds:.0f} s", flush=True)
            status, output = run_part(name, command, seconds)
            if status["status"] not in ("ok", "skipped"):
                status["output_tail"] = output[-1500:]
            report["parts"][name] = status
            if name == "tests":
                report["tests"] = read_pytest(output) if status["status"] != "skipped" else {}
            else:
                report[name] = json.loads(result.read_text(encoding="utf-8"))[name] if result.is_file() else {}
            if name == "system" and status["status"] != "ok":  # cut off or failed: say which rows never started
                report["system"]["skipped"] = [*report["system"].get("skipped", []), *not_reached(report["system"])]
            print(f"{name}: {status['status']} in {status['seconds']:.0f} s", flush=True)
    write_report(report, out_dir)
    return report


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", action="store_true", help="print the README's GPU table from gpu.json and exit")
    p.add_argument("--out", type=cli.path_arg, default=RESULTS,
                   help="folder of gpu.json and gpu.png [benchmarks/results]")
    p.add_argument("--part", choices=("kernels", "system"), help=argparse.SUPPRESS)  # one part, in its own process
    p.add_argument("--part-out", type=cli.path_arg, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=cli.positive_float, default=PARTS["system"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        path = args.out / "gpu.json"
        if not path.is_file():  # the table's input: a missing or unreadable file is bad input (status 2)
            print(f"error: no GPU report at {path}: run `make gpu-report` on a CUDA machine first", file=sys.stderr)
            return 2
        try:
            table = render_table(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"error: {path} is not a GPU report ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        print(table, end="")
        return 0
    reason = no_gpu_reason()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    if args.part == "kernels":
        measure_kernels(args.part_out)
    elif args.part == "system":
        measure_system(args.part_out, args.seconds)
    else:
        report = run_report(args.out)
        print(render_table(report), end="")
        print(f"wrote {args.out / 'gpu.json'} and gpu.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
