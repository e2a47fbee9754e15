"""Raster-order AR image generation with the shipped MNIST model: cost per image and quality per guidance strength.

Measures, in one run on one machine:

* forward passes per image (counted with a hook: one per token, 64 for an 8x8 map) and positions computed,
  with and without the KV cache;
* seconds per image at several batch sizes, guided (doubled batch) and unguided, with and without the KV
  cache, and whether the cache changes the tokens (``same_tokens_*``: float rounding can flip a near-tie, so
  a large batch may differ in a map or two);
* class accuracy (shipped classifier) and Frechet distance to real test digits at several guidance strengths
  w (``quality_by_cfg``; results before the package's convention was w recorded ``quality_by_scale`` by the
  scale s = 1 + w), next to the real-vs-real baseline at the same n.

Writes ``benchmarks/results/raster.json`` and ``raster.png``::

    python benchmarks/bench_raster.py            # --threads 1 by default: stable numbers on a busy CPU
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

from ar_course import cli, metrics, raster  # noqa: E402
from ar_course.files import atomic_write_text, save_figure  # noqa: E402
from ar_course.utils import get_device  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def timed_tokens(model, batch: int, cfg: float, use_cache: bool, repeats: int) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` seconds to sample ``batch`` token maps; returns ``(seconds, maps)``."""
    device = next(model.parameters()).device
    classes = torch.arange(batch, device=device) % 10
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = raster.generate_tokens(model, classes, (8, 8), cfg=cfg, use_cache=use_cache,
                                     generator=torch.Generator(device=device).manual_seed(0))
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def count_passes(model, use_cache: bool) -> tuple[int, int]:
    """(forward passes, positions computed per sequence) for one guided 8x8 map."""
    shapes: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(a[0].shape[1]), with_kwargs=True)
    try:
        timed_tokens(model, 1, 2.0, use_cache, 1)
    finally:
        hook.remove()
    class_positions = 1 if use_cache else len(shapes)  # the class token: computed once, or in every pass
    return len(shapes), sum(shapes) + class_positions


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=cli.int_list(1), default="1,10,50", help="batch sizes to time")
    parser.add_argument("--cfgs", type=cli.float_list(), default="-1,0,0.5,1,2,3",
                        help="guidance strengths w to evaluate (0: conditional, -1: unconditional)")
    parser.add_argument("--n-eval", type=cli.positive_int, default=500,
                        help="samples per guidance strength (and real baseline n)")
    parser.add_argument("--repeats", type=cli.positive_int, default=2, help="best of N timings")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", type=cli.device_name, default=None)
    parser.add_argument("--out", type=cli.path_arg, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = get_device(args.device)
    model, tokenizer = raster.load_pretrained(device)

    passes_cached, positions_cached = count_passes(model, True)
    passes_plain, positions_plain = count_passes(model, False)
    timing = []
    for b in args.batches:
        row = {"batch": b}
        for cfg, tag in ((0.0, "unguided"), (2.0, "guided")):
            t_c, maps_c = timed_tokens(model, b, cfg, True, args.repeats)
            t_p, maps_p = timed_tokens(model, b, cfg, False, args.repeats)
            row[f"ms_per_image_{tag}_cached"] = round(1e3 * t_c / b, 3)
            row[f"ms_per_image_{tag}_recompute"] = round(1e3 * t_p / b, 3)
            row[f"same_tokens_{tag}"] = bool(torch.equal(maps_c, maps_p))
        timing.append(row)
        print(row)

    n = args.n_eval
    baseline = metrics.data_baseline("mnist", n=n, repeats=3)
    test_images, _ = metrics.held_out_set("mnist")
    real = test_images[torch.randperm(test_images.shape[0], generator=torch.Generator().manual_seed(1))[:n]]
    classes = torch.arange(10).repeat_interleave(n // 10)
    quality = []
    for w in args.cfgs:
        images = raster.generate_images(model, tokenizer, classes, cfg=w, seed=0).cpu()
        quality.append({"cfg": w, "accuracy": metrics.class_accuracy(images, classes),
                        "frechet": metrics.frechet_distance(images, real)})
        print(quality[-1])

    result = {
        "date": datetime.date.today().isoformat(),
        "model": "ar_mnist", "params": model.num_params(), "config": model.config.to_dict(),
        "device": str(device), "cpu": platform.processor() or platform.machine(), "threads": args.threads,
        "torch": torch.__version__,
        "forward_passes_per_image": {"kv_cache": passes_cached, "recompute": passes_plain},
        "positions_computed_per_sequence": {"kv_cache": positions_cached, "recompute": positions_plain},
        "timing": timing,
        "n_eval": n, "real_vs_real": baseline, "quality_by_cfg": quality,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "raster.json", json.dumps(result, indent=2))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    bs = [r["batch"] for r in timing]
    for tag, style in (("unguided", "o"), ("guided", "s")):
        axes[0].plot(bs, [r[f"ms_per_image_{tag}_cached"] for r in timing], style + "-", label=f"{tag}, KV cache")
        axes[0].plot(bs, [r[f"ms_per_image_{tag}_recompute"] for r in timing], style + "--", label=f"{tag}, recompute")
    axes[0].set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per image",
                title=f"64 forward passes per image ({device}, {args.threads} thread(s))")
    axes[0].legend(fontsize=8)
    cfgs = [q["cfg"] for q in quality]
    axes[1].plot(cfgs, [q["accuracy"] for q in quality], "o-")
    axes[1].set(xlabel="guidance strength w", ylabel="class accuracy", title=f"class accuracy, n = {n}")
    axes[2].plot(cfgs, [q["frechet"] for q in quality], "o-", label="samples vs real")
    axes[2].axhline(baseline["frechet"], color="green", ls="--", label="real vs real")
    axes[2].set(xlabel="guidance strength w", ylabel="Frechet distance", yscale="log",
                title=f"Frechet distance, n = {n}")
    axes[2].legend()
    plt.tight_layout()
    save_figure(fig, args.out / "raster.png", dpi=120)
    print(f"wrote {args.out / 'raster.json'} and raster.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
