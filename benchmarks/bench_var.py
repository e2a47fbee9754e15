"""VAR (next-scale prediction) vs the chapter 03 raster-order model on MNIST, with the shipped checkpoints.

Measures, in one run on one machine, for both models with KV caches and classifier-free guidance:
forward passes per batch, CPU wall-clock per batch of mixed classes, class accuracy (shipped classifier) and
Frechet distance against as many held-out test digits. Also VAR's class accuracy over guidance strengths.

Writes ``benchmarks/results/var.json`` and ``var.png``::

    python benchmarks/bench_var.py                 # --threads 1 (stable on a busy CPU), timings again at 2
    python benchmarks/bench_var.py --per-class 100 --batch-size 100
    python benchmarks/bench_var.py --out /tmp/var     # write there: the committed result stays as it is
    python benchmarks/bench_var.py --replot           # redraw var.png from the existing var.json, measure nothing
"""

from __future__ import annotations

import datetime
import json
import platform
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

from ar_course import cli  # noqa: E402
from ar_course.files import atomic_write_text, save_figure  # noqa: E402
from ar_course.var import load_pretrained  # noqa: E402
from ar_course.var.compare import (  # noqa: E402
    best_seconds_interleaved, compare_generators, plot_comparison, raster_sampler, var_sampler,
)

RESULTS = Path(__file__).resolve().parent / "results"


def plot(result: dict, path: Path) -> None:
    """The comparison's bar charts of ``result["rows"]``; the seconds were measured on the CPU (where
    :func:`main` loads both models) unless the rows say otherwise (results before they recorded a device)."""
    rows = result["rows"]
    save_figure(plot_comparison(rows, device=None if all("device" in r for r in rows) else "cpu"), path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=cli.positive_int, default=50,
                        help="samples per class for accuracy and distance")
    parser.add_argument("--batch-size", type=cli.positive_int, default=100,
                        help="chunk size when generating the samples")
    parser.add_argument("--timing-batches", type=cli.positive_int, nargs="+", default=[1, 10, 100],
                        help="batch sizes whose CPU wall-clock is measured")
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="timed calls per model and batch size, "
                        "interleaved; the best counts [5]")
    parser.add_argument("--var-cfg", type=cli.finite_float, nargs="+", default=[0.0, 1.0, 2.0, 4.0],
                        help="VAR guidance strengths to evaluate (0 = conditional); the best is compared")
    parser.add_argument("--ar-cfg", type=cli.finite_float, default=None,
                        help="raster guidance strength (0 = conditional); default: its best recorded strength")
    parser.add_argument("--threads", type=cli.positive_int, default=1,
                        help="torch CPU threads for the quality runs and the "
                        "main timings [1]")
    parser.add_argument("--timing-threads", type=cli.positive_int, nargs="*", default=[2],
                        help="further thread counts at which the batch sizes are timed again [2]")
    parser.add_argument("--out", type=cli.path_arg, default=RESULTS,
                        help="folder for var.json and var.png, created if missing [benchmarks/results]")
    parser.add_argument("--replot", action="store_true", help="only redraw var.png in --out from the var.json there")
    args = parser.parse_args(argv)
    if args.replot:
        if not (args.out / "var.json").is_file():
            parser.error(f"--replot redraws an existing result, and {args.out / 'var.json'} does not exist: "
                         "run without --replot first")
        plot(json.loads((args.out / "var.json").read_text(encoding="utf-8")), args.out / "var.png")
        print(f"wrote {args.out / 'var.png'} from {args.out / 'var.json'}")
        return 0
    torch.set_num_threads(args.threads)
    var_model, var_tok = load_pretrained()

    sweep = compare_generators({f"VAR cfg {c:g}": var_sampler(var_model, var_tok, cfg=c) for c in args.var_cfg},
                               per_class=args.per_class, batch_size=args.batch_size, timing_batch=10, repeats=1)
    best = max(sweep, key=lambda r: r["class_accuracy"])
    best_cfg = args.var_cfg[sweep.index(best)]
    samplers = {"VAR": var_sampler(var_model, var_tok, cfg=best_cfg)}
    ar_cfg = None
    try:
        from ar_course import raster

        ar_model, ar_tok = raster.load_pretrained()
        recorded = raster.pretrained_info().get("accuracy_by_cfg", {})
        ar_cfg = args.ar_cfg if args.ar_cfg is not None else (
            float(max(recorded, key=recorded.get)) if recorded else 1.0)
        samplers["raster AR"] = raster_sampler(ar_model, ar_tok, cfg=ar_cfg)
    except Exception as exc:  # noqa: BLE001 - the raster checkpoint may not exist yet
        print(f"raster AR model not available ({type(exc).__name__}: {exc}); measuring VAR alone")
    rows = compare_generators(samplers, per_class=args.per_class, batch_size=args.batch_size,
                              timing_batch=args.timing_batches[0], repeats=args.repeats)
    timing_by_threads = {}
    for threads in [args.threads] + [t for t in args.timing_threads if t != args.threads]:
        torch.set_num_threads(threads)
        timing_by_threads[threads] = {
            b: best_seconds_interleaved({name: partial(s.sample, torch.arange(10).repeat(b)[:b], 0)
                                         for name, s in samplers.items()}, args.repeats)
            for b in args.timing_batches}
    torch.set_num_threads(args.threads)
    timing = timing_by_threads[args.threads]
    summary = {"var_cfg": best_cfg, "ar_cfg": ar_cfg, "seconds_per_batch_by_size": timing,
               "seconds_per_batch_by_threads": timing_by_threads}
    if len(rows) == 2:
        v, a = rows
        summary.update(pass_ratio=a["forward_passes"] / v["forward_passes"],
                       speedup_by_batch={b: t["raster AR"] / t["VAR"] for b, t in timing.items()},
                       speedup_by_threads={n: {b: t["raster AR"] / t["VAR"] for b, t in by.items()}
                                           for n, by in timing_by_threads.items()},
                       accuracy_gap_points=100 * (v["class_accuracy"] - a["class_accuracy"]))
    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "threads": args.threads,
              "torch": torch.__version__, "var_params": var_model.num_params(), "rows": rows,
              "var_guidance_sweep": sweep, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "var.json", json.dumps(result, indent=2))
    plot(result, args.out / "var.png")
    for r in sweep + rows:
        print(f"{r['name']:<12} passes {r['forward_passes']:>3}  {r['seconds_per_batch']:.3f} s/batch  "
              f"acc {r['class_accuracy']:.3f}  FD {r['frechet_distance']:.2f}")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
