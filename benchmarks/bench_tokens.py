"""What should a token be? One table on held-out MNIST: writes ``benchmarks/results/tokens.json`` and ``.png``.

1. Reconstruction: the same conv autoencoder (32x32 -> 8x8 latent grid), seed and number of steps for every
   quantizer -- VQ with and without dead-code restart, with the straight-through estimator or the rotation trick,
   residual VQ (depth 4), VAR's multi-scale VQ, FSQ (levels 8,6,5), LFQ (8 bits) and the continuous KL
   autoencoder -- with held-out PSNR, codebook usage (during training too) and bits per image. Training is
   :func:`bench_tokenizers.run` (chapter 01's benchmark), at fewer steps than the shipped tokenizers.
2. Generation: the shipped discrete raster AR (``ar_mnist`` over ``mnist_vq``) against the shipped continuous AR
   (``continuous_ar_mnist`` over ``tokenizer_mnist_kl``), both trained 1,500 steps at batch 32, at equal samples
   and guidance: chapter 03's class accuracy and Frechet distance to held-out digits, with the continuous head's
   Euler steps swept. The shipped tokenizers' PSNR sits beside them ("better reconstruction, worse generation"?).

Usage::

    python benchmarks/bench_tokens.py             # 9 trainings of 250 steps + the generation sweep
    python benchmarks/bench_tokens.py --quick     # a smoke run
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ar_course import cli, continuous, metrics, raster  # noqa: E402
from ar_course.data import load_mnist  # noqa: E402
from ar_course.tokenizers.train import default_config, evaluate  # noqa: E402
from bench_tokenizers import run  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FLOAT_BITS = 16
"""Bits per channel at which the continuous tokens are counted (float16 storage)."""

VARIANTS = [
    ("VQ, straight-through, no restart", dict(quantizer="vq", dead_code_threshold=0.0)),
    ("VQ, straight-through, restart", dict(quantizer="vq")),
    ("VQ, rotation trick, no restart", dict(quantizer="vq", dead_code_threshold=0.0, rotation_trick=True)),
    ("VQ, rotation trick, restart", dict(quantizer="vq", rotation_trick=True)),
    ("RVQ depth 4, restart", dict(quantizer="rvq")),
    ("multi-scale VQ, restart", dict(quantizer="msvq")),
    ("FSQ 8,6,5, no restart", dict(quantizer="fsq")),
    ("LFQ 8 bits, entropy loss", dict(quantizer="lfq")),
    ("continuous KL, 4 channels", dict(quantizer="kl")),
]


def bits_per_image(model) -> float:
    """Tokens per image times log2(codebook size); the continuous tokens at :data:`FLOAT_BITS` per channel."""
    c = model.config
    if c.quantizer == "kl":
        return c.latent_side**2 * c.latent_dim * FLOAT_BITS
    return model.tokens_per_image * math.log2(c.num_codes)


def reconstruction_table(steps: int, train: torch.Tensor, test: torch.Tensor, curve: torch.Tensor) -> list[dict]:
    rows = []
    for name, kw in VARIANTS:
        config = default_config(kw.pop("quantizer"), **kw)
        summary, model = run(name, config, steps, train, test, max(steps // 5, 1), curve)
        summary["bits_per_image"] = bits_per_image(model)
        summary["tokens_per_image"] = model.tokens_per_image
        summary["rotation_trick"] = config.rotation_trick
        if config.quantizer == "kl":
            summary["num_codes"] = None
        rows.append(summary)
    return rows


@torch.no_grad()
def generation(n: int, cfg: float, head_steps: list[int]) -> dict:
    """Class accuracy and Frechet distance of ``n`` samples (n / 10 per class) from both shipped AR models."""
    test_images, _ = metrics.held_out_set("mnist")
    real = test_images[torch.randperm(test_images.shape[0], generator=torch.Generator().manual_seed(1))[:n]]
    classes = torch.arange(10).repeat_interleave(n // 10)
    out = {"n": n, "cfg": cfg, "real_vs_real": metrics.data_baseline("mnist", n=n, repeats=3)}

    model, tokenizer = raster.load_pretrained()
    start = time.perf_counter()
    images = raster.generate_images(model, tokenizer, classes, cfg=cfg, seed=0).cpu()
    out["discrete"] = {"model": "ar_mnist", "tokenizer": "mnist_vq", "seconds": time.perf_counter() - start,
                       "accuracy": metrics.class_accuracy(images, classes),
                       "frechet": metrics.frechet_distance(images, real),
                       "tokenizer_psnr": evaluate(tokenizer, test_images)["psnr"]}
    print("discrete raster AR", out["discrete"], flush=True)

    model, tokenizer = continuous.load_pretrained()
    out["continuous_tokenizer_psnr"] = evaluate(tokenizer, test_images)["psnr"]
    rows = []
    for steps in head_steps:
        start = time.perf_counter()
        images = continuous.generate_images(model, tokenizer, classes, steps=steps, cfg=cfg, seed=0).cpu()
        rows.append({"head_steps": steps, "seconds": time.perf_counter() - start,
                     "accuracy": metrics.class_accuracy(images, classes),
                     "frechet": metrics.frechet_distance(images, real)})
        print("continuous AR", rows[-1], flush=True)
    out["continuous"] = rows
    return out


def plot(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    rows = results["reconstruction"]
    names = [r["name"] for r in rows]
    ax = axes[0]
    colors = ["C2" if r["quantizer"] == "kl" else "C0" for r in rows]
    # dots, not bars: the axis does not start at 0 dB, where bar lengths would exaggerate the differences
    ax.scatter([r["psnr"] for r in rows], range(len(rows)), s=50, color=colors, zorder=3)
    for i, r in enumerate(rows):
        used = f", {r['fraction_used']:.0%} used" if r.get("fraction_used") is not None else ""
        ax.annotate(f"{r['psnr']:.2f} dB{used}, {r['bits_per_image']:.0f} bits", (r["psnr"], i),
                    textcoords="offset points", xytext=(7, 0), va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("held-out PSNR (dB; axis not from 0)")
    ax.set_xlim(min(r["psnr"] for r in rows) - 0.5, max(r["psnr"] for r in rows) + 5)
    ax.set_title(f"reconstruction, {results['setup']['steps']} steps each")
    ax = axes[1]
    for r in rows:
        if r["usage_curve"]["fraction_used"] and r["usage_curve"]["fraction_used"][0] is not None:
            ax.plot(r["usage_curve"]["steps"], [100 * u for u in r["usage_curve"]["fraction_used"]], "o-",
                    label=r["name"], ms=3)
    ax.set_xlabel("training step")
    ax.set_ylabel("codes used on held-out digits (%)")
    ax.set_ylim(0, 105)
    ax.set_title("codebook usage during training")
    ax.legend(fontsize=6)
    gen = results["generation"]
    steps = [r["head_steps"] for r in gen["continuous"]]
    for ax, key, label in ((axes[2], "accuracy", "class accuracy"), (axes[3], "frechet", "Frechet distance")):
        ax.plot(steps, [r[key] for r in gen["continuous"]], "o-", color="C2", label="continuous AR (flow head)")
        ax.axhline(gen["discrete"][key], color="C0", ls="--", label="discrete raster AR (VQ)")
        if key == "frechet":
            ax.axhline(gen["real_vs_real"]["frechet"], color="gray", ls=":", label="real vs real")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("head Euler steps")
        ax.set_ylabel(label)
        ax.set_title(f"{label}, {gen['n']} samples, w = {gen['cfg']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_rows(facts: dict, by_name: dict, gen: dict, best: dict) -> list[dict]:
    """The rows ``python -m ar_course bench --table`` prints: the issue's targets and what was measured."""
    st, rot = by_name["VQ, straight-through, no restart"], by_name["VQ, rotation trick, no restart"]
    d = gen["discrete"]
    ratio = facts["frechet_ratio_continuous_over_discrete"]
    return [
        {"what": "FSQ codebook usage, no restart or auxiliary loss", "measured": f"{facts['fsq_usage']:.1%}",
         "target": ">= 95%", "met": facts["fsq_usage"] >= 0.95},
        {"what": "LFQ codebook usage with its entropy loss", "measured": f"{facts['lfq_usage']:.1%}",
         "target": ">= 90%", "met": facts["lfq_usage"] >= 0.90},
        {"what": "rotation trick vs straight-through, no restart, equal steps: PSNR / usage",
         "measured": f"{rot['psnr']:.2f} vs {st['psnr']:.2f} dB / {rot['fraction_used']:.1%} vs "
                     f"{st['fraction_used']:.1%}", "target": "reported", "met": None},
        {"what": "continuous KL autoencoder vs single-scale VQ (shipped), held-out PSNR",
         "measured": f"{gen['continuous_tokenizer_psnr']:.2f} vs {d['tokenizer_psnr']:.2f} dB "
                     f"({facts['continuous_minus_vq_psnr_db_shipped']:+.2f} dB)",
         "target": ">= +3 dB", "met": facts["continuous_minus_vq_psnr_db_shipped"] >= 3},
        {"what": f"continuous AR ({best['head_steps']} head steps) vs discrete raster AR, {gen['n']} samples, "
                 f"w = {gen['cfg']:g}: class accuracy / Frechet",
         "measured": f"{best['accuracy']:.1%} vs {d['accuracy']:.1%} / {best['frechet']:.2f} vs {d['frechet']:.2f} "
                     f"({ratio:.2f}x)",
         "target": ">= 90%, <= 1.5x", "met": best["accuracy"] >= 0.9 and ratio <= 1.5},
        {"what": "better reconstruction, worse generation (continuous vs VQ)",
         "measured": str(facts["better_reconstruction_worse_generation"]), "target": "reported", "met": None},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=cli.positive_int, default=250,
                        help="training steps of every tokenizer [%(default)s]")
    parser.add_argument("--n-eval", type=cli.positive_int, default=500,
                        help="generated samples per model [%(default)s]")
    parser.add_argument("--cfg", type=cli.finite_float, default=1.0, help="guidance strength w of both AR models")
    parser.add_argument("--head-steps", type=cli.int_list(1), default="1,2,4,8,16,32")
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, small subsets")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads [%(default)s]")
    parser.add_argument("--out", type=cli.path_arg, default=RESULTS / "tokens.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = 10 if args.quick else args.steps
    n_eval = 50 if args.quick else args.n_eval
    head_steps = [1, 4] if args.quick else list(args.head_steps)
    train, test = load_mnist("train", size=32)[0], load_mnist("test", size=32)[0]
    if args.quick:
        train, test = train[:2000], test[:200]
    start = time.perf_counter()
    recon = reconstruction_table(steps, train, test, test[:500])
    gen = generation(n_eval, args.cfg, head_steps)
    best = min(gen["continuous"], key=lambda r: r["frechet"])
    by_name = {r["name"]: r for r in recon}
    st, rot = by_name["VQ, straight-through, no restart"], by_name["VQ, rotation trick, no restart"]
    facts = {
        "fsq_usage": by_name["FSQ 8,6,5, no restart"]["fraction_used"],
        "lfq_usage": by_name["LFQ 8 bits, entropy loss"]["fraction_used"],
        "rotation_vs_straight_through_no_restart": {"psnr_db": rot["psnr"] - st["psnr"],
                                                    "usage": rot["fraction_used"] - st["fraction_used"]},
        "continuous_minus_vq_psnr_db_shipped": gen["continuous_tokenizer_psnr"] - gen["discrete"]["tokenizer_psnr"],
        "best_head_steps": best["head_steps"],
        "frechet_ratio_continuous_over_discrete": best["frechet"] / gen["discrete"]["frechet"],
        "better_reconstruction_worse_generation": bool(
            gen["continuous_tokenizer_psnr"] > gen["discrete"]["tokenizer_psnr"]
            and best["frechet"] > gen["discrete"]["frechet"]),
    }
    results = {
        "setup": {"dataset": "MNIST 32x32 (20k train / 5k held-out test)", "steps": steps, "batch_size": 64,
                  "seed": 0, "grid": "8x8", "quick": args.quick, "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "machine": platform.platform(),
                  "python": sys.version.split()[0], "float_bits": FLOAT_BITS,
                  "total_seconds": time.perf_counter() - start},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "reconstruction": recon,
        "generation": gen,
        "key_facts": facts,
        "summary": summary_rows(facts, by_name, gen, best),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps(facts, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({results['setup']['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
