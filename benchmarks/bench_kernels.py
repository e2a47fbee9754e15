"""Kernel benchmarks: writes benchmarks/results/kernels.json and kernels.png.

CPU (always): nearest-code search at 65,536 vectors x 1,024 codes x 32 dims, numba's fused CPU search
against ``torch.cdist`` + ``argmin``: time (median of repeats) and peak extra memory, measured in a fresh
process per method as the rise of the resident-set high-water mark (Linux ``VmHWM``, reset just before
the call), next to the size of the buffers each method must allocate.

GPU (only when CUDA is present; device and date are recorded): Triton FlashAttention forward against
``F.scaled_dot_product_attention`` at T = 1024-4096, d = 64, and its TFLOP/s against a measured bf16 matmul
ceiling; decode attention's achieved bandwidth against the measured copy bandwidth; the fused nearest-code
search against cdist + argmin; and for each, what ``backend="auto"`` runs after its one-time measurement.

    python benchmarks/bench_kernels.py [--repeats 5] [--out benchmarks/results]
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ar_course import cli
from ar_course.files import atomic_write_text, save_figure

ROOT = Path(__file__).resolve().parents[1]
N, K, D = 65_536, 1_024, 32

_MEMORY_PROBE = """
import re, sys, torch
from pathlib import Path
from ar_course.kernels.cpu_vq import vq_nearest_cpu
def hwm_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
g = torch.Generator().manual_seed(0)
z, c = torch.randn({n}, {d}, generator=g), torch.randn({k}, {d}, generator=g)
run = {{"numba_cpu": lambda: vq_nearest_cpu(z, c),
       "torch_cdist": lambda: torch.cdist(z, c).argmin(1)}}[sys.argv[1]]
vq_nearest_cpu(z[:10], c[:10]); torch.cdist(z[:10], c[:10]).argmin(1)  # compile and warm up, small
Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
before = hwm_kib()
run()
print(hwm_kib() - before)
"""


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (and numba compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _peak_extra_mib(method: str) -> float | None:
    """Rise of peak RSS during one call, in a fresh process (None where /proc is unavailable)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    code = _MEMORY_PROBE.format(n=N, k=K, d=D)
    res = subprocess.run([sys.executable, "-c", code, method], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return None
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def bench_cpu(repeats: int) -> dict:
    from ar_course.kernels.cpu_vq import vq_nearest_cpu

    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(N, D, generator=g), torch.randn(K, D, generator=g)
    ours, theirs = vq_nearest_cpu(z, c), torch.cdist(z, c).argmin(1)
    out = {
        "shape": {"N": N, "K": K, "D": D},
        "threads": {"torch": torch.get_num_threads(), "numba": _numba_threads()},
        "agreement": float((ours == theirs).double().mean()),
        "numba_cpu": {"seconds": _median_seconds(lambda: vq_nearest_cpu(z, c), repeats),
                      "peak_extra_mib": _peak_extra_mib("numba_cpu"),
                      "buffers_mib": (K * 4 + N * 8) / 2**20},
        "torch_cdist": {"seconds": _median_seconds(lambda: torch.cdist(z, c).argmin(1), repeats),
                        "peak_extra_mib": _peak_extra_mib("torch_cdist"),
                        "buffers_mib": (N * K * 4 + N * 8) / 2**20},
    }
    out["speedup"] = out["torch_cdist"]["seconds"] / out["numba_cpu"]["seconds"]
    return out


def _numba_threads() -> int:
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def _cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# GPU ----------------------------------------------------------------------------------------------------


def _gpu_seconds(fn: Callable[[], object], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def _copy_bandwidth() -> float:
    """Measured device-memory bandwidth in bytes/s: read + write of a 1 GiB copy."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _gpu_seconds(lambda: dst.copy_(src))


def _matmul_flops() -> float:
    """Measured bf16 matmul throughput in FLOP/s (8192^3 through cuBLAS): the ceiling that attention's
    TFLOP/s are compared against."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / _gpu_seconds(lambda: a @ b, repeats=10)


def _auto_ran(call: Callable[[], object]) -> str:
    """What ``backend="auto"`` runs for this call after its one-time measurement (``ar_course.kernels.ops``)."""
    import ar_course.kernels as K_

    call()  # the first call of a kind measures the kernel against torch
    with K_.record_dispatch() as ran:
        call()
    (op,) = ran.calls
    return ran.backend(op)


def gpu_ceilings() -> dict:
    """The device's name and the two ceilings the kernels are compared against, measured here."""
    return {"device": torch.cuda.get_device_name(0), "matmul_bf16_tflops": _matmul_flops() / 1e12,
            "copy_bandwidth_gbs": _copy_bandwidth() / 1e9}


def _backends() -> list[str]:
    import ar_course.kernels as K_

    return (["triton"] if K_.env.TRITON_INSTALLED else []) + ["numba", "torch"]


def bench_flash(matmul_tflops: float) -> list[dict]:
    """Triton FlashAttention against SDPA at T = 1024-4096, d = 64 (none without Triton)."""
    import torch.nn.functional as F

    import ar_course.kernels as K_

    rows: list[dict] = []
    if not K_.env.TRITON_INSTALLED:
        return rows
    b, h, d = 4, 16, 64
    for t in (1024, 2048, 4096):
        q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for causal in (False, True):
            mask = "causal" if causal else None
            ours = _gpu_seconds(lambda: K_.flash_attention(q, k, v, mask, backend="triton"))
            sdpa = _gpu_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
            rows.append({"T": t, "causal": causal, "triton_ms": ours * 1e3, "sdpa_ms": sdpa * 1e3,
                         "speed_vs_sdpa": sdpa / ours, "triton_tflops": flops / ours / 1e12,
                         "fraction_of_matmul_peak": flops / ours / 1e12 / matmul_tflops,
                         "auto_runs": _auto_ran(lambda: K_.flash_attention(q, k, v, mask))})
    return rows


def bench_decode(copy_gbs: float) -> list[dict]:
    """Decode attention of every backend: achieved bandwidth against the copy bandwidth."""
    import ar_course.kernels as K_

    rows: list[dict] = []
    b, h, d = 8, 32, 128
    for t in (4096, 16384):
        q = torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16)
        k_cache, v_cache = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cache_bytes = 2 * k_cache.numel() * k_cache.element_size()
        auto = _auto_ran(lambda: K_.decode_attention(q, k_cache, v_cache, t))
        for backend in _backends():
            try:
                sec = _gpu_seconds(lambda: K_.decode_attention(q, k_cache, v_cache, t, backend=backend))
            except Exception as exc:  # noqa: BLE001 -- one back-end failing leaves the others' rows
                rows.append({"T": t, "backend": backend, "error": cli.exception_line(exc)})
                continue
            rows.append({"T": t, "backend": backend, "ms": sec * 1e3, "bandwidth_gbs": cache_bytes / sec / 1e9,
                         "fraction_of_copy_bandwidth": cache_bytes / sec / 1e9 / copy_gbs, "auto_runs": auto})
    return rows


def bench_vq() -> list[dict]:
    """The fused nearest-code search of each kernel backend against ``cdist`` + ``argmin``."""
    import ar_course.kernels as K_

    rows: list[dict] = []
    for n in (65_536, 1_048_576):
        z, c = torch.randn(n, 32, device="cuda"), torch.randn(1024, 32, device="cuda")
        row = {"N": n, "K": 1024, "D": 32, "cdist_ms": _gpu_seconds(lambda: torch.cdist(z, c).argmin(1)) * 1e3}
        for backend in _backends()[:-1]:
            try:
                row[f"{backend}_ms"] = _gpu_seconds(lambda: K_.vq_nearest(z, c, backend=backend)) * 1e3
            except Exception as exc:  # noqa: BLE001 -- one back-end failing leaves the others' numbers
                row[f"{backend}_error"] = cli.exception_line(exc)
        row["auto_runs"] = _auto_ran(lambda: K_.vq_nearest(z, c))
        rows.append(row)
    return rows


def bench_gpu() -> dict:
    """Every GPU measurement: the ceilings, then FlashAttention, decode attention and nearest-code search."""
    out = gpu_ceilings()
    out["flash_attention"] = bench_flash(out["matmul_bf16_tflops"])
    out["decode_attention"] = bench_decode(out["copy_bandwidth_gbs"])
    out["vq_nearest"] = bench_vq()
    return out


# report -------------------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = results.get("gpu")
    fig, axes = plt.subplots(1, 4 if gpu else 2, figsize=(16 if gpu else 9, 3.6))
    cpu = results["cpu"]
    names = ["torch_cdist", "numba_cpu"]
    labels = ["cdist + argmin", "numba fused"]
    axes[0].bar(labels, [cpu[m]["seconds"] for m in names], color=["tab:gray", "tab:blue"])
    axes[0].set(ylabel="seconds", title=f"CPU nearest code, {N}x{K}x{D}")
    mem = [cpu[m]["peak_extra_mib"] or cpu[m]["buffers_mib"] for m in names]
    axes[1].bar(labels, mem, color=["tab:gray", "tab:blue"])
    axes[1].set(ylabel="MiB", title="peak extra memory", yscale="log")
    if gpu:
        fa = [r for r in gpu["flash_attention"] if r["causal"]]
        axes[2].plot([r["T"] for r in fa], [r["speed_vs_sdpa"] for r in fa], "o-", label="causal")
        fa = [r for r in gpu["flash_attention"] if not r["causal"]]
        axes[2].plot([r["T"] for r in fa], [r["speed_vs_sdpa"] for r in fa], "s-", label="full")
        axes[2].axhline(1.0, color="gray", lw=0.8)
        axes[2].set(xlabel="T", ylabel="speed vs SDPA", title="Triton FlashAttention, d=64", xscale="log")
        axes[2].legend()
        dec = [r for r in gpu["decode_attention"] if "error" not in r]  # a back-end that failed has no bar
        axes[3].bar([f"{r['backend']}\nT={r['T']}" for r in dec], [r["fraction_of_copy_bandwidth"] for r in dec])
        axes[3].set(ylabel="fraction of copy bandwidth", title="decode attention")
    fig.suptitle(f"{results['machine']} ({results['date']})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="timed repeats per CPU measurement")
    parser.add_argument("--out", type=cli.path_arg, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    results = {
        "date": dt.date.today().isoformat(),
        "machine": f"{_cpu_name()}, {torch.get_num_threads()} torch threads",
        "cpu": bench_cpu(args.repeats),
        "gpu": bench_gpu() if torch.cuda.is_available() else None,
    }
    cpu = results["cpu"]
    results["summary"] = [{
        "what": f"nearest-code search {N}x{K}x{D}: numba CPU vs torch.cdist+argmin",
        "measured": f"{cpu['numba_cpu']['seconds']:.3f} s vs {cpu['torch_cdist']['seconds']:.3f} s "
                    f"({cpu['speedup']:.1f}x); peak extra {cpu['numba_cpu']['peak_extra_mib']:.1f} vs "
                    f"{cpu['torch_cdist']['peak_extra_mib']:.0f} MiB",
        "target": "at least as fast, O(N+K) memory",
        "met": bool(cpu["speedup"] >= 1.0),
    }]
    print(f"CPU nearest code {N}x{K}x{D}: numba {cpu['numba_cpu']['seconds']:.3f} s, cdist+argmin "
          f"{cpu['torch_cdist']['seconds']:.3f} s ({cpu['speedup']:.2f}x); peak extra memory "
          f"{cpu['numba_cpu']['peak_extra_mib']} MiB vs {cpu['torch_cdist']['peak_extra_mib']} MiB; "
          f"agreement {cpu['agreement']:.6f}")
    if results["gpu"]:
        print(json.dumps(results["gpu"], indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "kernels.json", json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "kernels.png")
    print(f"wrote {args.out / 'kernels.json'} and kernels.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
