"""End-to-end benchmark of the full system (chapter 07): every generation configuration of
:class:`ar_course.system.Generator`, measured in one run on one machine.

For each configuration (raster AR; raster AR + draft speculative / Jacobi / relaxed Jacobi; VAR; VAR +
kernels="auto"; raster AR and VAR with a ``torch.compile``d decode step): images per second (best of
``--repeats`` timed calls after a warm-up, on a batch of ``--timing-batch`` mixed classes; the speculative
ones run one image at a time, as they must), target
forward passes per image, class accuracy and Frechet distance of ``--per-class`` x 10 samples against as many
held-out MNIST test digits. Then VAR vs raster AR images/second over batch sizes, the per-component ratios
recorded by the chapters' own benchmarks (``benchmarks/results/*.json``), and on a CUDA machine batch-64
VAR generation in bf16 (``--gpu-only`` measures just that and merges it into an existing ``system.json``).

Writes ``benchmarks/results/system.json`` and ``system.png``::

    python benchmarks/bench_system.py                 # ~10 min on a 2-core CPU
    python benchmarks/bench_system.py --per-class 5   # a quick look
    python benchmarks/bench_system.py --gpu-only      # on a GPU machine: add the GPU half
    python benchmarks/bench_system.py --out /tmp/sys  # write (and --gpu-only: merge into) system.json there
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402
import torch  # noqa: E402

from ar_course import cli, metrics  # noqa: E402
from ar_course.files import atomic_write_text, save_figure  # noqa: E402
from ar_course.system import Generator  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {  # name -> Generator.generate keyword arguments
    "raster AR": {"method": "ar"},
    "raster AR + draft": {"method": "ar", "speculative": "draft"},
    "raster AR + Jacobi": {"method": "ar", "speculative": "jacobi"},
    "raster AR + relaxed Jacobi": {"method": "ar", "speculative": "jacobi", "relaxed_delta": 0.2},
    "VAR": {"method": "var", "kernels": "torch"},
    "VAR + kernels": {"method": "var", "kernels": "auto"},
    "raster AR compiled": {"method": "ar", "compile": True},
    "VAR compiled": {"method": "var", "compile": True},
}
COMPONENT_BENCHES = ("tokenizers", "kv_cache", "raster", "var", "speculative", "kernels")


def best_seconds(gen: Generator, jobs: dict[str, tuple[torch.Tensor, dict]], repeats: int) -> dict[str, dict]:
    """Best-of-``repeats`` stats of every job ``name -> (classes, generate kwargs)``, timed interleaved (one
    call of each job per repeat, after a warm-up call of each) so that a burst of load on the machine hits
    every job alike."""
    for classes, kwargs in jobs.values():
        gen.generate(classes, **kwargs)
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name, (classes, kwargs) in jobs.items():
            stats = gen.generate(classes, **kwargs).stats.as_dict()
            if name not in best or stats["seconds"] < best[name]["seconds"]:
                best[name] = stats
    return best


def measure_configs(gen: Generator, per_class: int, timing_batch: int, repeats: int, seed: int) -> list[dict]:
    n = per_class * 10
    reference = metrics.held_out_set("mnist")[0][:n]
    classes = torch.arange(10).repeat(per_class)  # (n,) mixed classes
    rows = []
    for name, kwargs in CONFIGS.items():
        t0 = time.perf_counter()
        out = gen.generate(classes, seed=seed + 1, batch_size=100, **kwargs)
        rows.append({"name": name, **kwargs, "timing_batch": timing_batch,
                     "passes_per_image": out.stats.passes_per_image, "acceptance_rate": out.stats.acceptance_rate,
                     "class_accuracy": metrics.class_accuracy(out.images, out.classes),
                     "frechet_distance": metrics.frechet_distance(out.images, reference), "n": n})
        print(f"{name:<28} quality: {rows[-1]['passes_per_image']:5.1f} passes/img  acc "
              f"{rows[-1]['class_accuracy']:.3f}  FD {rows[-1]['frechet_distance']:.2f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    timed = best_seconds(gen, {r["name"]: (classes[:timing_batch], {"seed": seed, **CONFIGS[r["name"]]})
                               for r in rows}, repeats)
    for r in rows:
        r["images_per_second"] = timed[r["name"]]["images_per_second"]
        r["backends"] = timed[r["name"]]["backends"]
        print(f"{r['name']:<28} {r['images_per_second']:8.1f} img/s (batch {timing_batch})", flush=True)
    return rows


def batch_sweep(gen: Generator, sizes: list[int], repeats: int, seed: int) -> list[dict]:
    rows = []
    for b in sizes:
        classes = torch.arange(b) % 10
        timed = best_seconds(gen, {m: (classes, {"method": m, "seed": seed}) for m in ("var", "ar")}, repeats)
        var_ips, ar_ips = timed["var"]["images_per_second"], timed["ar"]["images_per_second"]
        rows.append({"batch": b, "var_images_per_second": var_ips, "ar_images_per_second": ar_ips,
                     "ratio": var_ips / ar_ips})
        print(f"batch {b:>3}: VAR {var_ips:8.1f} img/s, raster AR {ar_ips:8.1f} img/s, {var_ips / ar_ips:.1f}x",
              flush=True)
    return rows


def component_rows() -> list[dict]:
    """The summary rows the chapters' benchmarks recorded (whatever results exist)."""
    rows = []
    for name in COMPONENT_BENCHES:
        path = RESULTS / f"{name}.json"
        if path.is_file():
            summary = json.loads(path.read_text(encoding="utf-8")).get("summary")
            if isinstance(summary, list):
                rows += [{"bench": name, **row} for row in summary]
    return rows


ATTENTION_KERNEL_NAMES = ("flash", "fmha", "attention", "attn", "decode_partial", "decode_combine")
"""Substrings of the names of the kernels (CUDA) or ops (CPU) that do attention: torch's SDPA and chapter 06's."""


def attention_time_ms(gen: Generator, classes: torch.Tensor, seed: int, device: str = "cuda", **kwargs) -> dict:
    """Time of one ``gen.generate`` call (profiler, after a warm-up call), in total and in attention: on
    ``"cuda"`` the GPU time of the kernels, on ``"cpu"`` the self time of the ops. It shows how the chapter
    06 kernels do inside the system rather than on their own."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device == "cuda"
    gen.generate(classes, seed=seed, **kwargs)
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        gen.generate(classes, seed=seed, **kwargs)
    kind = DeviceType.CUDA if on_gpu else DeviceType.CPU
    events = [e for e in prof.key_averages() if getattr(e, "device_type", None) == kind]

    def ms(e) -> float:  # kernels are leaves; CPU ops nest, so count each op's own time once
        return (e.device_time_total if on_gpu else e.self_cpu_time_total) / 1e3

    attention = [e for e in events if any(n in e.key.lower() for n in ATTENTION_KERNEL_NAMES)]
    return {"total_ms": sum(map(ms, events)), "attention_ms": sum(map(ms, attention)),
            "attention_kernels": sorted(e.key for e in attention if ms(e) > 0)}


def gpu_section(repeats: int, seed: int, device: str = "cuda") -> dict:
    """Batch-64 VAR and raster AR on the GPU (bf16 autocast, kernels auto / torch / compiled), and the
    attention kernels' GPU time inside batch-64 VAR generation, chapter 06's kernels against SDPA."""
    if device == "cuda" and not torch.cuda.is_available():
        return {"measured": False, "reason": "no CUDA device on this machine"}
    gen = Generator.from_pretrained("mnist", device=device)
    classes = torch.arange(64) % 10
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
    out = {"measured": True, "device": name, "date": datetime.date.today().isoformat()}
    jobs = {"VAR bf16 + kernels": {"method": "var", "kernels": "auto"},
            "VAR bf16 torch": {"method": "var", "kernels": "torch"},
            "VAR bf16 compiled": {"method": "var", "compile": True},
            "raster AR bf16": {"method": "ar", "kernels": "auto"},
            "raster AR bf16 compiled": {"method": "ar", "compile": True}}
    timed = best_seconds(gen, {k: (classes, {"seed": seed, **v}) for k, v in jobs.items()}, repeats)
    for job, stats in timed.items():
        out[job] = {"images_per_second": stats["images_per_second"], "batch": 64, "backends": stats["backends"],
                    "precision": stats["precision"]}
        print(f"{job:<28} {stats['images_per_second']:8.1f} img/s (batch 64, {stats['precision']})", flush=True)
    try:  # the profiler's event fields vary across torch versions: report rather than lose the run
        ours = attention_time_ms(gen, classes, seed, device, method="var", kernels="auto")
        sdpa = attention_time_ms(gen, classes, seed, device, method="var", kernels="torch")
        if not (ours["attention_ms"] > 0 and sdpa["attention_ms"] > 0):
            raise RuntimeError(f"no attention kernels among the profiled names {ATTENTION_KERNEL_NAMES}")
        out["attention_inside_var"] = {"kernels": ours, "sdpa": sdpa,
                                       "speed_vs_sdpa": sdpa["attention_ms"] / ours["attention_ms"]}
    except Exception as exc:  # noqa: BLE001
        out["attention_inside_var"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def merge_gpu(result: dict, gpu: dict) -> dict:
    """``result`` (a ``system.json`` measured on a CPU machine) with its GPU section replaced by ``gpu`` and
    its summary recomputed: a GPU machine's short runs add their half without re-measuring the CPU."""
    return {**result, "gpu": gpu, "summary": summarize(result["configs"], result["batch_sweep"], gpu)}


def plot(rows: list[dict], sweep: list[dict]) -> plt.Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(rows):  # VAR configurations share their quality: markers tell them apart
        a.scatter(r["images_per_second"], r["class_accuracy"], s=50, label=r["name"],
                  marker="os^Dv<>P"[i % 8], alpha=0.8)
    a.legend(fontsize=7, loc="lower right")
    a.set_xscale("log")
    speeds = [r["images_per_second"] for r in rows]
    a.set_xticks([v for v in (3, 10, 30, 100, 300, 1000, 3000, 10000) if min(speeds) / 3 <= v <= 3 * max(speeds)])
    a.set_xlabel("images / second (CPU, log)")
    a.set_ylabel("class accuracy")
    a.set_title("speed / quality of every configuration")
    bs = [s["batch"] for s in sweep]
    b.plot(bs, [s["var_images_per_second"] for s in sweep], "o-", label="VAR (6 passes)")
    b.plot(bs, [s["ar_images_per_second"] for s in sweep], "s-", label="raster AR (64 passes)")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("batch size")
    b.set_ylabel("images / second")
    b.set_title("throughput vs batch size")
    b.set_xticks(bs)
    b.set_yticks([v for v in (3, 10, 30, 100, 300, 1000, 3000, 10000)
                  if min(min(s["ar_images_per_second"] for s in sweep), 10) / 3 <= v
                  <= 3 * max(s["var_images_per_second"] for s in sweep)])
    b.legend()
    for axis in (a.xaxis, b.xaxis, b.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    return fig


def summarize(rows: list[dict], sweep: list[dict], gpu: dict) -> list[dict]:
    by = {r["name"]: r for r in rows}
    var, ar = by["VAR + kernels"], by["raster AR"]
    equal_quality = [r for r in rows if r["class_accuracy"] >= var["class_accuracy"] - 0.05]
    fastest = max(equal_quality, key=lambda r: r["images_per_second"])
    out = [
        {"what": f"VAR + kernels vs raster AR, images/second at batch {var['timing_batch']} (CPU)",
         "measured": f"{var['images_per_second'] / ar['images_per_second']:.1f}x "
                     f"({var['images_per_second']:.0f} vs {ar['images_per_second']:.0f} img/s)",
         "target": ">= 4x", "met": var["images_per_second"] >= 4 * ar["images_per_second"]},
        {"what": "fastest configuration at equal quality (class accuracy within 5 points of VAR + kernels)",
         "measured": f"{fastest['name']} ({fastest['images_per_second']:.0f} img/s, accuracy "
                     f"{fastest['class_accuracy']:.3f}); VAR + kernels {var['images_per_second']:.0f} img/s "
                     f"(attention: {var['backends']['attention']})",
         "target": "a VAR configuration (kernels and/or compiled) fastest", "met": fastest["method"] == "var"},
        {"what": f"torch.compile'd decode step vs eager, images/second at batch {var['timing_batch']} (CPU)",
         "measured": f"raster AR {by['raster AR compiled']['images_per_second'] / ar['images_per_second']:.2f}x, "
                     f"VAR {by['VAR compiled']['images_per_second'] / by['VAR']['images_per_second']:.2f}x; "
                     f"VAR compiled / raster AR compiled "
                     f"{by['VAR compiled']['images_per_second'] / by['raster AR compiled']['images_per_second']:.1f}x",
         "target": "pays (> 1x) where used", "met": None},
        {"what": "VAR / raster AR images/second by batch size (CPU)",
         "measured": ", ".join(f"batch {s['batch']}: {s['ratio']:.1f}x" for s in sweep),
         "target": ">= 4x", "met": all(s["ratio"] >= 4 for s in sweep)},
    ]
    for name in ("raster AR + draft", "raster AR + Jacobi", "raster AR + relaxed Jacobi"):
        r = by[name]
        out.append({"what": f"{name}: passes per image and speed vs raster AR (one image at a time vs batch)",
                    "measured": f"{r['passes_per_image']:.1f} passes (vs 64), {r['images_per_second']:.1f} img/s, "
                                f"accuracy {r['class_accuracy']:.3f} vs {ar['class_accuracy']:.3f}",
                    "target": "-", "met": None})
    if gpu.get("measured"):
        v = gpu["VAR bf16 + kernels"]
        out.append({"what": f"batch-64 VAR generation on {gpu['device']}",
                    "measured": f"{v['images_per_second']:.0f} img/s ({v['backends']['attention']}); torch "
                                f"{gpu['VAR bf16 torch']['images_per_second']:.0f}, compiled "
                                f"{gpu['VAR bf16 compiled']['images_per_second']:.0f}",
                    "target": "stated", "met": True})
        inside = gpu["attention_inside_var"]
        out.append({"what": "attention kernels inside batch-64 VAR generation vs SDPA (GPU time)",
                    "measured": inside.get("error") or f"{inside['speed_vs_sdpa']:.2f}x ("
                    f"{inside['kernels']['attention_ms']:.2f} vs {inside['sdpa']['attention_ms']:.2f} ms)",
                    "target": "chapter 06 targets", "met": None})
    else:
        out.append({"what": "GPU: batch-64 VAR generation", "measured": "not measured (no GPU on this machine)",
                    "target": "stated images/second", "met": None})
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=cli.positive_int, default=30,
                   help="samples per class for accuracy / Frechet [30]")
    p.add_argument("--timing-batch", type=cli.positive_int, default=10, help="images per timed call [10]")
    p.add_argument("--batches", type=cli.positive_int, nargs="+", default=[1, 10, 64], help="batch sizes of the sweep")
    p.add_argument("--repeats", type=cli.positive_int, default=5, help="timed calls per configuration [5]")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads [2]")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    p.add_argument("--gpu-only", action="store_true",
                   help="measure only the GPU section and merge it into the existing system.json in --out")
    p.add_argument("--out", type=cli.path_arg, default=RESULTS,
                   help="folder for system.json and system.png, created if missing [benchmarks/results]")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.out / "system.json"
    if args.gpu_only:
        if not path.is_file():
            p.error(f"--gpu-only merges into {path}, which does not exist: run without it first")
        gpu = gpu_section(args.repeats, args.seed)
        if not gpu["measured"]:
            p.error(f"--gpu-only: {gpu['reason']}")
        result = merge_gpu(json.loads(path.read_text(encoding="utf-8")), gpu)
    else:
        gen = Generator.from_pretrained("mnist", device="cpu")
        rows = measure_configs(gen, args.per_class, args.timing_batch, args.repeats, args.seed)
        sweep = batch_sweep(gen, args.batches, args.repeats, args.seed)
        gpu = gpu_section(args.repeats, args.seed)
        result = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
                  "cpu": platform.processor() or platform.machine(), "threads": args.threads,
                  "torch": torch.__version__, "configs": rows, "batch_sweep": sweep, "gpu": gpu,
                  "components": component_rows(), "summary": summarize(rows, sweep, gpu)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2))
    save_figure(plot(result["configs"], result["batch_sweep"]), args.out / "system.png", dpi=120)
    for row in result["summary"]:
        print(f"- {row['what']}: {row['measured']} (target {row['target']}, met {row['met']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
