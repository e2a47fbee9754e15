"""Every way the course decodes MNIST token maps, on one steps-vs-quality plot (chapter 08).

In one run on one machine, against the same held-out test digits, with the same number of samples each
(``--n-eval``, 50 per class by default), seed 0:

* MaskGIT (the shipped ``maskgit_mnist``) at K = 1, 2, 4, 8, 16, 64 decoding steps, guidance ``--cfg``; and at
  8 steps over a few guidance strengths (``--cfg-sweep``);
* the next-neighbour (NAR) order on the same MaskGIT weights: one anti-diagonal per pass, 2n - 1 = 15 passes;
* raster AR (chapter 03, ``ar_mnist``): 64 passes;
* VAR (chapter 04, ``var_mnist``): 6 passes, one per scale;
* Speculative Jacobi Decoding (chapter 05) on the raster model: lossless, fewer passes (one image at a time).

For each: forward passes per image (counted at the first transformer block, one batch of 10), class accuracy
(shipped classifier), Frechet distance in the classifier's feature space, and the wall time of the whole
evaluation run per image (``--threads`` threads). Writes ``benchmarks/results/parallel_images.json`` and
``parallel_images.png``::

    python benchmarks/bench_parallel_images.py          # about 10 minutes on a busy 2-core CPU
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
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ar_course import cli, masked, metrics, raster, var  # noqa: E402
from ar_course.speculative import SpecStats, sjd_generate  # noqa: E402
from ar_course.transformer.counting import count_forward_passes  # noqa: E402
from ar_course.utils import get_device  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def evaluate(name: str, images_of, model, classes: torch.Tensor, real: torch.Tensor, **extra) -> dict:
    """Count passes on a batch of 10, generate ``classes`` (timed), score; one result row."""
    passes = count_forward_passes(model, lambda: images_of(classes[::max(1, len(classes) // 10)][:10]))
    t0 = time.perf_counter()
    images = images_of(classes).cpu()
    seconds = time.perf_counter() - t0
    row = {"name": name, **extra, "forward_passes": passes, "n": int(classes.numel()),
           "accuracy": metrics.class_accuracy(images, classes), "frechet": metrics.frechet_distance(images, real),
           "ms_per_image": 1e3 * seconds / classes.numel()}
    print(f"{name}: {passes} passes, accuracy {row['accuracy']:.3f}, Frechet {row['frechet']:.2f}, "
          f"{row['ms_per_image']:.1f} ms/image")
    return row


@torch.no_grad()
def sjd_images(model, tokenizer, classes: torch.Tensor, cfg: float, window: int, seed: int
               ) -> tuple[torch.Tensor, SpecStats]:
    """SJD samples one image at a time (the library's SJD takes a batch of one)."""
    g = torch.Generator().manual_seed(seed)
    maps, stats = [], SpecStats()
    for y in tqdm(classes.tolist(), desc="SJD", leave=False):
        seq, st = sjd_generate(model, 64, classes=torch.tensor([y]), window=window, cfg=cfg, generator=g)
        maps.append(seq[0])
        stats.merge(st)
    return tokenizer.decode_from_indices(torch.stack(maps).view(-1, 8, 8)), stats


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=cli.int_list(1), default="1,2,4,8,16,64", help="MaskGIT decoding steps K")
    parser.add_argument("--cfg", type=cli.finite_float, default=None,
                        help="MaskGIT guidance strength w (default: the best 8-step accuracy of --cfg-sweep)")
    parser.add_argument("--cfg-sweep", type=cli.float_list(), default="0,1,2,3",
                        help="guidance strengths w tried for MaskGIT at 8 steps")
    parser.add_argument("--raster-cfg", type=cli.finite_float, default=1.0,
                        help="raster AR guidance w (its best accuracy)")
    parser.add_argument("--var-cfg", type=cli.finite_float, default=2.0, help="VAR guidance w (its best in var.json)")
    parser.add_argument("--sjd-window", type=cli.positive_int, default=8)
    parser.add_argument("--maskgit", type=cli.checkpoint_arg, default=None,
                        help="MaskGIT checkpoint (default: the shipped one)")
    parser.add_argument("--n-eval", type=cli.positive_int, default=500, help="samples per method (and real-vs-real n)")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", type=cli.device_name, default=None)
    parser.add_argument("--out", type=cli.path_arg, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = get_device(args.device)
    n = args.n_eval
    classes = torch.arange(10).repeat_interleave(n // 10).to(device)  # (n,)
    test_images, _ = metrics.held_out_set("mnist")
    real = test_images[torch.randperm(test_images.shape[0], generator=torch.Generator().manual_seed(1))[:n]]
    baseline = metrics.data_baseline("mnist", n=n, repeats=3)
    print(f"real vs real at n={n}: Frechet {baseline['frechet']:.2f}")

    mg, mg_tok = masked.load_pretrained(device, args.maskgit)
    sweep = [evaluate(f"MaskGIT K=8 w={w:g}", lambda c, w=w: masked.generate_images(mg, mg_tok, c, steps=8, cfg=w),
                      mg, classes, real, steps=8, cfg=w) for w in args.cfg_sweep]
    cfg = args.cfg if args.cfg is not None else max(sweep, key=lambda r: (r["accuracy"], -r["frechet"]))["cfg"]
    maskgit = [evaluate(f"MaskGIT K={k}", lambda c, k=k: masked.generate_images(mg, mg_tok, c, steps=k, cfg=cfg),
                        mg, classes, real, steps=k, cfg=cfg) for k in args.steps]
    neighbour = evaluate("MaskGIT weights, neighbour order",
                         lambda c: masked.generate_images(mg, mg_tok, c, order="neighbour", cfg=cfg),
                         mg, classes, real, cfg=cfg)

    ar, ar_tok = raster.load_pretrained(device)
    raster_row = evaluate("raster AR", lambda c: raster.generate_images(ar, ar_tok, c, cfg=args.raster_cfg),
                          ar, classes, real, cfg=args.raster_cfg)
    vm, vm_tok = var.load_pretrained(device)
    var_row = evaluate("VAR", lambda c: var.generate_images(vm, vm_tok, c, cfg=args.var_cfg), vm, classes, real,
                       cfg=args.var_cfg)

    t0 = time.perf_counter()
    sjd_imgs, stats = sjd_images(ar.cpu(), ar_tok.cpu(), classes.cpu(), args.raster_cfg, args.sjd_window, 0)
    seconds = time.perf_counter() - t0
    sjd_row = {"name": "SJD (raster AR)", "cfg": args.raster_cfg, "window": args.sjd_window,
               "forward_passes": stats.target_calls / n, "n": n, "batch": 1,
               "accuracy": metrics.class_accuracy(sjd_imgs, classes.cpu()),
               "frechet": metrics.frechet_distance(sjd_imgs, real), "ms_per_image": 1e3 * seconds / n}
    print(f"SJD: {sjd_row['forward_passes']:.1f} passes, accuracy {sjd_row['accuracy']:.3f}, "
          f"Frechet {sjd_row['frechet']:.2f}")

    k8 = next(r for r in maskgit if r["steps"] == 8)
    summary = [
        {"what": "MaskGIT, 8 steps: class accuracy", "measured": round(k8["accuracy"], 4), "target": ">= 0.95",
         "met": k8["accuracy"] >= 0.95},
        {"what": "MaskGIT, 8 steps: Frechet distance vs 1.5x raster AR's (64 passes)",
         "measured": round(k8["frechet"], 3), "target": f"<= {1.5 * raster_row['frechet']:.3f}",
         "met": k8["frechet"] <= 1.5 * raster_row["frechet"]},
    ]
    result = {
        "date": datetime.date.today().isoformat(), "device": str(device),
        "cpu": platform.processor() or platform.machine(), "threads": args.threads,
        "torch": torch.__version__, "n_eval": n, "seed": 0, "real_vs_real": baseline,
        "maskgit_info": {k: v for k, v in masked.pretrained_info(args.maskgit).items()
                         if k in ("steps", "seed", "batch_size", "schedule", "final_train_loss", "test_loss")},
        "maskgit_noise": masked.model.DEFAULT_NOISE,
        "maskgit_cfg": cfg, "maskgit_cfg_sweep_8_steps": sweep, "maskgit": maskgit, "neighbour": neighbour,
        "raster": raster_row, "var": var_row, "sjd": sjd_row, "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parallel_images.json").write_text(json.dumps(result, indent=2))
    plot(result).savefig(args.out / "parallel_images.png", dpi=120)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out / 'parallel_images.json'} and parallel_images.png")
    return 0


def plot(result: dict) -> plt.Figure:
    """Class accuracy and Frechet distance against forward passes per image, one marker per decoder."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    mg = result["maskgit"]
    others = [(result["neighbour"], "s", "neighbour order (MaskGIT weights)"), (result["raster"], "o", "raster AR"),
              (result["var"], "^", "VAR"), (result["sjd"], "D", "SJD (raster AR)")]
    for ax, key, label in ((axes[0], "accuracy", "class accuracy"), (axes[1], "frechet", "Frechet distance")):
        ax.plot([r["forward_passes"] for r in mg], [r[key] for r in mg], "o-", color="C0",
                label=f"MaskGIT, K steps (w={result['maskgit_cfg']:g})")
        for r in mg:
            ax.annotate(f"K={r['steps']}", (r["forward_passes"], r[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        for (r, marker, name), color in zip(others, ("C1", "C2", "C3", "C4")):
            ax.plot([r["forward_passes"]], [r[key]], marker, color=color, ms=8, label=f"{name} (w={r['cfg']:g})")
        ax.set(xscale="log", xlabel="forward passes per image", ylabel=label,
               title=f"{label}, n = {result['n_eval']}")
    axes[1].axhline(result["real_vs_real"]["frechet"], color="gray", ls="--", label="real vs real")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"decoding MNIST token maps: quality vs sequential passes ({result['device']}, "
                 f"{result['threads']} thread(s))")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
