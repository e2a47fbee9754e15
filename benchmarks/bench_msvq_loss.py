"""Which loss the multi-scale tokenizer trains on: writes ``benchmarks/results/msvq_loss.json`` and ``.png``.

VAR's multi-scale quantizer (scales 1,2,3,4,6,8 = 130 tokens, 256 codes) trained three ways, each for the
shipped tokenizer's 1,500 steps from the same seed on the same digits (``MultiScaleVQ``'s ``loss`` and
``final_weight``):

1. ``every_scale``, weight 0: VAR's plain average of the loss over the partial sums after every scale;
2. ``every_scale``, weight 32: that average plus 32 times the complete reconstruction's term (what ships);
3. ``final``: the complete reconstruction's term only.

For each, on the 5,000 held-out test digits: the PSNR of the full reconstruction against the shipped
single-scale VQ (``mnist_vq``, 1,500 steps, 64 tokens), and the PSNR when decoding from the first 1..6 scales
(coarse-to-fine generation needs every partial sum to be better than the one before).

Usage::

    python benchmarks/bench_msvq_loss.py            # 3 trainings of 1,500 steps: about 10 minutes on 1 core
    python benchmarks/bench_msvq_loss.py --quick    # a smoke run (few steps, small subsets)
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ar_course import cli  # noqa: E402
from ar_course.files import atomic_write_text, save_figure  # noqa: E402
from ar_course.tokenizers import load_pretrained  # noqa: E402
from ar_course.tokenizers.train import default_config, evaluate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tokenizers import load_digits, run, scales_sweep  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOSSES = {  # name -> the config fields that differ
    "every scale, weight 0 (VAR's average)": {"msvq_loss": "every_scale", "msvq_final_weight": 0.0},
    "every scale, weight 32 (shipped)": {"msvq_loss": "every_scale", "msvq_final_weight": 32.0},
    "final only": {"msvq_loss": "final"},
}
TARGET_GAP_DB = 1.0  # chapter 01's target: within 1 dB of single-scale VQ, PSNR rising with every scale


def summarize(results: dict) -> list[dict]:
    """The rows ``python -m ar_course bench --table`` prints: each loss's gap to VQ and whether its partial sums
    improve with every scale."""
    rows = []
    for r in results["losses"]:
        psnr = r["scales_sweep"]["psnr"]
        falls = [k + 1 for k in range(1, len(psnr)) if psnr[k] <= psnr[k - 1]]  # 1-based scale counts
        rises = f"PSNR rises with every scale ({psnr[0]:.1f} -> {psnr[-1]:.1f} dB)" if not falls else (
            f"PSNR falls at {len(falls)} of {len(psnr) - 1} scale steps (at {', '.join(map(str, falls))} scales)")
        rows.append({"what": f"multi-scale VQ loss: {r['name']}, {results['setup']['steps']} steps",
                     "measured": f"{r['psnr']:.2f} vs VQ {results['vq_psnr']:.2f} dB ({r['gap_db']:+.2f} dB); {rises}",
                     "target": f"within {TARGET_GAP_DB:g} dB, monotone",
                     "met": abs(r["gap_db"]) <= TARGET_GAP_DB and not falls})
    return rows


def plot(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results["losses"]:
        sweep = r["scales_sweep"]
        ax.plot(sweep["tokens"], sweep["psnr"], "o-", label=f"{r['name']}: {r['psnr']:.2f} dB")
    ax.axhline(results["vq_psnr"], color="gray", ls="--",
               label=f"single-scale VQ, 64 tokens: {results['vq_psnr']:.2f} dB")
    ax.set_xscale("log")
    ax.set_xlabel("tokens decoded (first k of 6 scales)")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.set_title(f"multi-scale VQ: the loss decides the partial sums ({results['setup']['steps']} steps)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=cli.positive_int, default=1500)
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, small data subsets")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads [1]")
    parser.add_argument("--out", type=cli.path_arg, default=RESULTS / "msvq_loss.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = 20 if args.quick else args.steps
    train, test = load_digits(args.quick)
    vq_psnr = evaluate(load_pretrained("mnist_vq"), test)["psnr"]
    losses = []
    for name, fields in LOSSES.items():
        summary, model = run(name, default_config("msvq", **fields), steps, train, test)
        summary = {k: v for k, v in summary.items() if k != "usage_curve"}  # no curve was recorded (eval_every 0)
        losses.append({**summary, **fields, "gap_db": summary["psnr"] - vq_psnr,
                       "scales_sweep": scales_sweep(model, test)})
    results = {
        "date": datetime.date.today().isoformat(),
        "setup": {"dataset": "MNIST 32x32 (20k train / 5k held-out test)", "steps": steps, "batch_size": 64,
                  "lr": 2e-3, "seed": 0, "codes": 256, "scales": [1, 2, 3, 4, 6, 8], "quick": args.quick,
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
                  "python": sys.version.split()[0]},
        "vq_psnr": vq_psnr,
        "losses": losses,
    }
    results["summary"] = summarize(results)
    for row in results["summary"]:
        print(f"{row['what']}: {row['measured']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
