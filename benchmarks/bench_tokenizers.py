"""Tokenizer quality on held-out MNIST digits: writes ``benchmarks/results/tokenizers.json`` and ``.png``.

Every model is the same conv VQ-VAE (32x32 -> 8x8 latents of 16 dimensions) trained from the same seed
for the same number of steps; only the quantizer changes. Measured on the 5,000 held-out test digits:

1. PSNR and codebook usage per codebook size (16 .. 1024 codes, dead-code restart on);
2. codebook usage during training without restart, with restart, and with l2-normalised codes (256 codes);
3. VAR's multi-scale quantizer (scales 1,2,3,4,6,8 = 130 tokens) against single-scale VQ at 256 codes;
4. for the multi-scale model, PSNR and latent error when decoding from the first 1..6 scales;
5. the shipped tokenizers (``mnist_vq`` and ``mnist_msvq``, 1,500 steps) on the same digits: 3 and 4 again.

Codebook usage is the fraction of the codes that the held-out digits use: at the end on all of them, during
training (the plot's curves) on the first :data:`CURVE_IMAGES`, so a curve can end below the final figure.

Usage::

    python benchmarks/bench_tokenizers.py              # 6 trainings of 600 steps, tens of minutes on 2 cores
    python benchmarks/bench_tokenizers.py --quick      # a smoke run (few steps, small subsets)
    python benchmarks/bench_tokenizers.py --plot       # redraw the .png from the existing .json, train nothing
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ar_course import cli, metrics  # noqa: E402
from ar_course.data import load_mnist  # noqa: E402
from ar_course.files import atomic_write_text, save_figure  # noqa: E402
from ar_course.tokenizers import load_pretrained  # noqa: E402
from ar_course.tokenizers.train import OPTION_QUANTIZERS, default_config, evaluate, train_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CURVE_IMAGES = 1000
"""Held-out digits (the first ones) on which codebook usage is measured during training."""


def restarts(config) -> bool:
    """Whether training ``config`` restarts dead codes: a ``dead_code_threshold > 0`` on a quantizer that reads it
    (VQ, RVQ, multi-scale VQ; FSQ, LFQ and the continuous ``kl`` have no codebook to restart)."""
    return config.dead_code_threshold > 0 and config.quantizer in OPTION_QUANTIZERS["dead_code_threshold"]


def run(name: str, config, steps: int, train: torch.Tensor, test: torch.Tensor, eval_every: int = 0,
        curve_images: torch.Tensor | None = None) -> tuple[dict, object]:
    """Train one tokenizer; return its summary (held-out metrics, time, usage curve) and the model."""
    start = time.perf_counter()
    curve_set = test if curve_images is None else curve_images
    model, _, history = train_tokenizer(config, steps=steps, seed=0, train_images=train, test_images=curve_set,
                                        eval_every=eval_every, progress=False, device="cpu")
    final = evaluate(model, test)
    summary = {"name": name, "quantizer": config.quantizer, "num_codes": config.num_codes,
               "restart": restarts(config), "l2_norm": config.l2_norm, **final,
               "train_seconds": time.perf_counter() - start,
               "usage_curve": {"steps": history.eval_steps,
                               "fraction_used": [e.get("fraction_used") for e in history.evals]}}  # kl: no codebook
    usage = (f", usage {final['fraction_used']:.1%}, perplexity {final['perplexity']:.1f}" if "fraction_used" in final
             else "")
    print(f"{name:>22}: PSNR {final['psnr']:.2f} dB{usage} ({summary['train_seconds']:.0f} s)", flush=True)
    return summary, model


def load_digits(quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST train and held-out test images ``(N, 1, 32, 32)``; small subsets for a ``quick`` smoke run."""
    train, test = load_mnist("train", size=32)[0], load_mnist("test", size=32)[0]
    return (train[:2000], test[:200]) if quick else (train, test)


@torch.no_grad()
def scales_sweep(model, test: torch.Tensor) -> dict:
    """PSNR and latent MSE when the multi-scale model decodes from the first k scales, k = 1..S."""
    q = model.quantizer
    z = torch.cat([model.encode(c) for c in test.split(500)])
    indices = [torch.cat(parts) for parts in zip(*(q.encode(c) for c in z.split(500)))]
    out = {"num_scales": [], "tokens": [], "psnr": [], "latent_mse": []}
    for k in range(1, len(q.scales) + 1):
        f_hat = torch.cat([q.decode([i[b:b + 500] for i in indices[:k]]) for b in range(0, z.shape[0], 500)])
        recon = torch.cat([model.decode(c) for c in f_hat.split(500)])
        out["num_scales"].append(k)
        out["tokens"].append(sum(s * s for s in q.scales[:k]))
        out["psnr"].append(metrics.psnr(recon, test))
        out["latent_mse"].append(float((f_hat - z).pow(2).mean()))
    return out


def plot(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    sizes = results["codebook_sizes"]
    ax = axes[0]
    ax.plot([r["num_codes"] for r in sizes], [r["psnr"] for r in sizes], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("codebook size")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.set_title("PSNR per codebook size (VQ, restart)")
    ax = axes[1]
    curve_images = results["setup"].get("curve_images", CURVE_IMAGES)  # results before it was recorded: the constant
    for i, r in enumerate(results["usage"]):
        steps = r["usage_curve"]["steps"]
        ax.plot(steps, [100 * u for u in r["usage_curve"]["fraction_used"]], "o-", color=f"C{i}", label=r["name"])
        ax.plot(steps[-1], 100 * r["fraction_used"], "x", color=f"C{i}", ms=9, mew=2)
    ax.plot([], [], "kx", ms=9, mew=2, label="at the end, on all held-out digits")
    ax.set_xlabel("training step")
    ax.set_ylabel("codes used by held-out digits (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"codebook usage, 256 codes\n(lines: on the first {curve_images:,} held-out digits)")
    ax.legend(fontsize=8)
    ax = axes[2]
    pair = results["msvq_vs_vq"]
    values = [pair["vq_psnr"], pair["msvq_psnr"]]
    # dots, not bars: the axis does not start at 0 dB, where bar heights would exaggerate the gap
    ax.scatter([0, 1], values, s=90, color=["C0", "C1"], zorder=3)
    for i, v in enumerate(values):
        ax.annotate(f"{v:.2f} dB", (i, v), textcoords="offset points", xytext=(10, 0), va="center", fontsize=9)
    ax.set_xticks([0, 1], ["VQ (64 tokens)", "multi-scale (130 tokens)"])
    ax.set_xlim(-0.5, 1.7)
    ax.set_ylim(min(values) - 1.5, max(values) + 1.5)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylabel("held-out PSNR (dB; axis not from 0)")
    shipped = f"; shipped: {results['shipped']['gap_db']:+.2f} dB" if "shipped" in results else ""
    ax.set_title(f"multi-scale - VQ = {pair['gap_db']:+.2f} dB ({results['setup']['steps']} steps{shipped})")
    ax = axes[3]
    sw = results["scales_sweep"]
    ax.plot(sw["num_scales"], sw["psnr"], "o-")
    for k, t, p in zip(sw["num_scales"], sw["tokens"], sw["psnr"]):
        ax.annotate(f"{t} tok", (k, p), textcoords="offset points", xytext=(-4, 6), ha="right", fontsize=8)
    ax.set_xlabel("scales decoded")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.set_title("coarse to fine: first k scales")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=cli.positive_int, default=600)
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, small data subsets")
    parser.add_argument("--threads", type=cli.nonnegative_int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=cli.path_arg, default=RESULTS / "tokenizers.json")
    parser.add_argument("--plot", action="store_true", help="only redraw the .png next to --out from that .json")
    args = parser.parse_args(argv)
    if args.plot:
        if not args.out.is_file():
            parser.error(f"--plot redraws an existing result, and {args.out} does not exist: run without --plot first")
        plot(json.loads(args.out.read_text(encoding="utf-8")), args.out.with_suffix(".png"))
        print(f"wrote {args.out.with_suffix('.png')} from {args.out}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 20 if args.quick else args.steps
    train, test = load_digits(args.quick)
    curve = test[:CURVE_IMAGES]
    eval_every = max(steps // 6, 1)

    sizes = [run(f"vq K={k} restart", default_config("vq", num_codes=k), steps, train, test, eval_every, curve)[0]
             for k in (16, 64, 256, 1024)]
    vq_256 = next(r for r in sizes if r["num_codes"] == 256)
    usage = [run("no restart", default_config("vq", dead_code_threshold=0.0), steps, train, test, eval_every, curve)[0],
             {**vq_256, "name": "restart"},  # the same run as in the size sweep
             run("l2-normalised, no restart", default_config("vq", l2_norm=True, dead_code_threshold=0.0), steps,
                 train, test, eval_every, curve)[0]]
    msvq, msvq_model = run("msvq K=256 restart", default_config("msvq"), steps, train, test)
    shipped_vq, shipped_msvq = load_pretrained("mnist_vq"), load_pretrained("mnist_msvq")
    shipped = {"vq_psnr": evaluate(shipped_vq, test)["psnr"], "msvq_psnr": evaluate(shipped_msvq, test)["psnr"],
               "steps": 1500, "scales_sweep": scales_sweep(shipped_msvq, test)}
    shipped["gap_db"] = shipped["msvq_psnr"] - shipped["vq_psnr"]
    print(f"shipped (1,500 steps): multi-scale {shipped['msvq_psnr']:.2f} dB vs VQ {shipped['vq_psnr']:.2f} dB "
          f"({shipped['gap_db']:+.2f} dB)", flush=True)

    results = {
        "date": datetime.date.today().isoformat(),
        "setup": {"dataset": "MNIST 32x32 (20k train / 5k held-out test)", "steps": steps, "batch_size": 64,
                  "seed": 0, "latent": "8x8x16", "quick": args.quick, "test_images": len(test),
                  "curve_images": len(curve), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "machine": platform.platform(), "python": sys.version.split()[0]},
        "codebook_sizes": sizes,
        "usage": usage,
        "msvq_vs_vq": {"vq_psnr": vq_256["psnr"], "msvq_psnr": msvq["psnr"], "gap_db": msvq["psnr"] - vq_256["psnr"],
                       "vq_tokens": 64, "msvq_tokens": 130, "vq_steps": 64, "msvq_steps": 6,
                       "msvq_fraction_used": msvq["fraction_used"]},
        "scales_sweep": scales_sweep(msvq_model, test),
        "shipped": shipped,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
