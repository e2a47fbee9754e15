"""Chapter 11: the shipped aligned raster models (GRPO, CCA) against the base model, and reward hacking.

Measures, in one run on one machine:

* class accuracy (shipped classifier) and Frechet distance to real test digits of the base model at several
  guidance strengths w, and of ``ar_mnist_grpo`` and ``ar_mnist_cca`` at w = 0 (same n, seed and classes);
* images per second of guided sampling (the base model at its best w: a doubled batch) and of guidance-free
  sampling (the aligned models at w = 0), with the static KV cache, at a few batch sizes, best of ``--repeats``;
  at the largest batch, where the time goes (:func:`speed_breakdown`: tokens with each KV cache, and decoding);
* the same for VAR (chapter 04): ``var_mnist`` at several w against ``var_mnist_cca`` at w = 0, quality and
  images per second guided vs guidance-free (``var_*`` keys; VAR's sampler with its dynamic KV cache);
* the GRPO and CCA training curves the shipped checkpoints recorded (reward, KL, accuracy over steps);
* reward hacking: GRPO runs from the base model with the brightness reward, at several KL weights, logging
  the reward (brightness) and the class accuracy of fixed samples as training goes.

Writes ``benchmarks/results/align.json`` (with a ``summary`` of the chapter's targets) and ``align.png``::

    python benchmarks/bench_align.py            # --threads 1 by default: stable numbers on a busy CPU
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ar_course import checkpoint, cli, metrics, raster, var  # noqa: E402
from ar_course.align import GRPOConfig, train_grpo  # noqa: E402
from ar_course.files import atomic_write_text, save_figure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"base": "ar_mnist", "grpo": "ar_mnist_grpo", "cca": "ar_mnist_cca"}
VAR_MODELS = {"base": "var_mnist", "cca": "var_mnist_cca"}
GENERATE = {"ar": raster.generate_images, "var": var.generate_images}


def quality(models: dict, tokenizer, cfgs: list[float], n: int, family: str = "ar") -> list[dict]:
    """Accuracy and Frechet distance of ``n`` samples (n/10 per class, seed 0): base at ``cfgs``, others at 0
    (``family``: raster ``"ar"`` or ``"var"`` models)."""
    test_images, _ = metrics.held_out_set("mnist")
    real = test_images[torch.randperm(test_images.shape[0], generator=torch.Generator().manual_seed(1))[:n]]
    classes = torch.arange(10).repeat_interleave(n // 10)
    rows = []
    for name, model in models.items():
        for w in cfgs if name == "base" else [0.0]:
            images = GENERATE[family](model, tokenizer, classes, cfg=w, seed=0).cpu()
            rows.append({"model": name, "cfg": w, "accuracy": metrics.class_accuracy(images, classes),
                         "frechet": metrics.frechet_distance(images, real), "brightness": float(images.mean())})
            print(rows[-1], flush=True)
    return rows


def images_per_second(model, tokenizer, cfg: float, batch: int, repeats: int, family: str = "ar") -> float:
    """Best-of-``repeats`` images per second generating ``batch`` images (tokens and decoding); raster models
    with the static KV cache (the faster one for guided and guidance-free sampling alike: :func:`speed_breakdown`),
    VAR (``family="var"``) with its sampler's dynamic one (one pass per scale)."""
    classes = torch.arange(batch) % 10
    options = {"cache": "static"} if family == "ar" else {}
    return batch / _best_seconds(lambda: GENERATE[family](model, tokenizer, classes, cfg=cfg, seed=0,
                                                          batch_size=batch, **options), repeats)


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def speed_breakdown(base, aligned, tokenizer, best_w: float, batch: int, repeats: int) -> dict:
    """Seconds for one batch of ``batch`` images, split into token generation, guided (``base`` at ``best_w``: a
    doubled batch) and guidance-free (``aligned`` at w = 0), with each KV cache (best of ``repeats``), and
    decoding the tokens to pixels, the same work for both. With tokens costing ``g`` guided and ``a`` guidance-free
    and decoding ``d``, the images/s ratio is ``(g + d) / (a + d)``: ``(2a + d) / (a + d)`` (``ratio_at_2x``) when
    guidance exactly doubles the token cost, below 2 by the decoder's share."""
    classes = torch.arange(batch) % 10
    side = tokenizer.config.latent_side
    tokens = lambda model, w, cache: raster.generate_tokens(  # noqa: E731
        model, classes, (side, side), cfg=w, cache=cache, generator=torch.Generator().manual_seed(0))
    out = {"batch": batch}
    for cache in ("dynamic", "static"):
        g = _best_seconds(lambda: tokens(base, best_w, cache), repeats)
        a = _best_seconds(lambda: tokens(aligned, 0.0, cache), repeats)
        out[cache] = {"tokens_guided_s": g, "tokens_unguided_s": a, "tokens_ratio": g / a}
    maps = tokens(aligned, 0.0, "static")
    d = _best_seconds(lambda: tokenizer.decode_from_indices(maps), repeats)
    out["decode_s"] = d
    for cache in ("dynamic", "static"):
        r = out[cache]
        r["images_ratio"] = (r["tokens_guided_s"] + d) / (r["tokens_unguided_s"] + d)
        r["ratio_at_2x"] = (2 * r["tokens_unguided_s"] + d) / (r["tokens_unguided_s"] + d)
    return out


def hacking(base, tokenizer, kls: list[float], steps: int, lr: float, per_class: int) -> list[dict]:
    """GRPO with the brightness reward from the base model at each KL weight; the curves of each run."""
    runs = []
    for kl in kls:
        policy = copy.deepcopy(base)
        config = GRPOConfig(steps=steps, lr=lr, kl_coef=kl, reward="brightness", eval_every=max(1, steps // 6),
                            eval_per_class=per_class)
        start = time.perf_counter()
        log = train_grpo(policy, copy.deepcopy(base), tokenizer, config, progress=False)
        runs.append({"kl_coef": kl, "steps": steps, "lr": lr, "seconds": time.perf_counter() - start,
                     **log.as_dict()})
        print({k: runs[-1][k] for k in ("kl_coef", "eval_step", "accuracy", "brightness")}, flush=True)
    return runs


def compare(rows: list[dict], speed: list[dict], names: tuple[str, ...], family: str = "",
            breakdown: dict | None = None) -> tuple[dict, list[dict]]:
    """The aligned models ``names`` at w = 0 against the base model at its best w (accuracy, then Frechet):
    ``({"base_best", "aligned"}, summary rows)``; ``family`` (e.g. ``"VAR"``) names the models in the rows."""
    label = (lambda name: f"{family} + {name.upper()}") if family else str.upper
    base_name = family or "base"
    base = [r for r in rows if r["model"] == "base"]
    best = max(base, key=lambda r: (r["accuracy"], -r["frechet"]))
    out = {"base_best": best, "aligned": {}}
    summary = []
    for name in names:
        r = next(r for r in rows if r["model"] == name)
        gap = 100 * (r["accuracy"] - best["accuracy"])
        ratio = r["frechet"] / best["frechet"]
        by_batch = {s["batch"]: s[f"{name}_unguided"] / s["base_guided"] for s in speed}
        largest = max(by_batch)
        speedup = by_batch[largest]
        why = ""
        if breakdown is not None and name == "cca":
            dyn, sta = breakdown["dynamic"], breakdown["static"]
            why = (f"; at batch {breakdown['batch']}, tokens alone {dyn['tokens_ratio']:.2f}x with the dynamic KV "
                   f"cache / {sta['tokens_ratio']:.2f}x with the static one, images {dyn['images_ratio']:.2f}x / "
                   f"{sta['images_ratio']:.2f}x; decoding takes {breakdown['decode_s']:.3f} s for both, so an exact "
                   f"2x token cost would give {dyn['ratio_at_2x']:.2f}x / {sta['ratio_at_2x']:.2f}x")
        out["aligned"][name] = {"accuracy_gap_points": gap, "frechet_ratio": ratio, "speedup_by_batch": by_batch}
        summary += [
            {"what": f"{label(name)} at w = 0 vs {base_name} at its best w = {best['cfg']:g}: class accuracy",
             "measured": f"{100 * r['accuracy']:.1f}% vs {100 * best['accuracy']:.1f}% ({gap:+.1f} points)",
             "target": ">= -1 point", "met": gap >= -1},
            {"what": f"{label(name)} at w = 0 vs {base_name} at best w: Frechet distance",
             "measured": f"{r['frechet']:.2f} vs {best['frechet']:.2f} ({ratio:.2f}x)", "target": "<= 1.5x",
             "met": ratio <= 1.5},
            {"what": f"{label(name)} guidance-free vs {base_name} guided: images/s by batch size "
                     f"({', '.join(map(str, by_batch))}; target at the largest)",
             "measured": ", ".join(f"{v:.2f}x" for v in by_batch.values()) + why, "target": ">= 1.9x",
             "met": speedup >= 1.9}]
    return out, summary


def summarize(rows: list[dict], speed: list[dict], hack: list[dict], breakdown: dict | None = None,
              var_rows: list[dict] | None = None, var_speed: list[dict] | None = None
              ) -> tuple[dict, list[dict], dict | None]:
    """The comparison at equal accuracy and the summary rows of the chapter's targets (the CCA speed row says
    where the time goes, from ``breakdown``), then VAR's comparison and rows when ``var_rows`` are given:
    ``(comparison, summary, var_comparison)``."""
    out, summary = compare(rows, speed, ("grpo", "cca"), breakdown=breakdown)
    if hack:
        free = min(hack, key=lambda h: h["kl_coef"])
        kept = max(hack, key=lambda h: h["kl_coef"])
        summary.append({"what": f"reward hacking (brightness reward, KL weight {free['kl_coef']:g} vs "
                                f"{kept['kl_coef']:g}): brightness, class accuracy at the end",
                        "measured": f"{free['brightness'][0]:.3f} -> {free['brightness'][-1]:.3f} and "
                                    f"{free['accuracy'][0]:.2f} -> {free['accuracy'][-1]:.2f}, vs "
                                    f"{kept['brightness'][-1]:.3f} and {kept['accuracy'][-1]:.2f}",
                        "target": "reward up, accuracy down; KL limits it",
                        "met": free["brightness"][-1] > free["brightness"][0]
                        and free["accuracy"][-1] < free["accuracy"][0]})
    var_out = None
    if var_rows is not None:
        var_out, var_summary = compare(var_rows, var_speed, ("cca",), family="VAR")
        summary += var_summary
    return out, summary, var_out


def plot(result: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    rows, speed = result["quality"], result["speed"]
    base = [r for r in rows if r["model"] == "base"]
    for ax, key in ((axes[0, 0], "accuracy"), (axes[0, 1], "frechet")):
        ax.plot([r["cfg"] for r in base], [r[key] for r in base], "o-", color="gray", label="base")
        for name, color in (("grpo", "C0"), ("cca", "C1")):
            r = next(r for r in rows if r["model"] == name)
            ax.plot([0], [r[key]], "*", ms=15, color=color, label=f"{name.upper()} (w = 0)")
        if result.get("var_quality"):
            var_base = [r for r in result["var_quality"] if r["model"] == "base"]
            ax.plot([r["cfg"] for r in var_base], [r[key] for r in var_base], "s--", color="black", label="VAR")
            r = next(r for r in result["var_quality"] if r["model"] == "cca")
            ax.plot([0], [r[key]], "P", ms=13, color="C3", label="VAR + CCA (w = 0)")
        if key == "frechet":  # before the legend, so that the line has an entry
            ax.axhline(result["real_vs_real"]["frechet"], color="green", ls="--", label="real vs real")
        ax.set(xlabel="guidance strength w", ylabel=key, title=f"{key}, n = {result['n_eval']}")
        ax.legend()
    bs = [s["batch"] for s in speed]
    for key, label in (("base_guided", f"base, w = {result['comparison']['base_best']['cfg']:g}"),
                       ("grpo_unguided", "GRPO, w = 0"), ("cca_unguided", "CCA, w = 0")):
        axes[0, 2].plot(bs, [s[key] for s in speed], "o-", label=label)
    if result.get("var_speed"):
        vs = result["var_speed"]
        for key, label in (("base_guided", f"VAR, w = {result['var_comparison']['base_best']['cfg']:g}"),
                           ("cca_unguided", "VAR + CCA, w = 0")):
            axes[0, 2].plot([s["batch"] for s in vs], [s[key] for s in vs], "s--", label=label)
        axes[0, 2].set(yscale="log")  # VAR's S passes per image run far faster than the raster model's h * w
    axes[0, 2].set(xscale="log", xlabel="batch size", ylabel="images / s",
                   title=f"sampling speed ({result['threads']} thread(s))")
    axes[0, 2].legend()
    curves = result["grpo_curves"]
    axes[1, 0].plot(curves["step"], curves["reward"], alpha=0.6, label="reward (mean p(class))")
    axes[1, 0].plot(curves["eval_step"], curves["accuracy"], "o-", label="class accuracy (w = 0)")
    axes[1, 0].set(xlabel="GRPO step", title="GRPO with the classifier reward")
    axes[1, 0].legend()
    axes[1, 1].plot(curves["step"], curves["kl"])
    axes[1, 1].set(xlabel="GRPO step", ylabel="k3 KL per token", title="KL to the base model")
    for h in result["hacking"]:
        line, = axes[1, 2].plot(h["eval_step"], h["brightness"], "o-", label=f"brightness, KL {h['kl_coef']:g}")
        axes[1, 2].plot(h["eval_step"], h["accuracy"], "s--", color=line.get_color(),
                        label=f"accuracy, KL {h['kl_coef']:g}")
    axes[1, 2].set(xlabel="GRPO step", title="reward hacking: brightness reward")
    axes[1, 2].legend(fontsize=7)
    plt.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfgs", type=cli.float_list(), default="0,0.5,1,1.5,2",
                        help="guidance strengths w of the base model")
    parser.add_argument("--var-cfgs", type=cli.float_list(), default="0,1,2,3,4",
                        help="guidance strengths w of the base VAR model")
    parser.add_argument("--n-eval", type=cli.positive_int, default=500,
                        help="samples per evaluation (and real baseline n)")
    parser.add_argument("--batches", type=cli.int_list(1), default="10,50,200,500",
                        help="batch sizes to time (500: generate_images' chunk)")
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="best of N timings")
    parser.add_argument("--hack-kls", type=cli.float_list(0, allow_empty=True), default="0,0.2,1",
                        help="KL weights of the reward-hacking runs ('' to skip)")
    parser.add_argument("--hack-steps", type=cli.positive_int, default=100)
    parser.add_argument("--hack-lr", type=cli.positive_float, default=3e-4)
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=cli.path_arg, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models, tokenizer = {}, None
    for name, ckpt in MODELS.items():
        models[name], tokenizer = checkpoint.load_with_tokenizer(ckpt, "cpu", kind=raster.CHECKPOINT_KIND)
    rows = quality(models, tokenizer, list(args.cfgs), args.n_eval)
    best_w = max((r for r in rows if r["model"] == "base"), key=lambda r: (r["accuracy"], -r["frechet"]))["cfg"]
    speed = []
    for b in args.batches:
        speed.append({"batch": b, "base_guided": images_per_second(models["base"], tokenizer, best_w, b, args.repeats),
                      **{f"{n}_unguided": images_per_second(models[n], tokenizer, 0.0, b, args.repeats)
                         for n in ("base", "grpo", "cca")}})
        print(speed[-1], flush=True)
    breakdown = speed_breakdown(models["base"], models["cca"], tokenizer, best_w, max(s["batch"] for s in speed),
                                args.repeats + 1)
    print(breakdown, flush=True)
    var_models, var_tokenizer = {}, None
    for name, ckpt in VAR_MODELS.items():
        var_models[name], var_tokenizer = checkpoint.load_with_tokenizer(ckpt, "cpu", kind=var.CHECKPOINT_KIND)
    var_rows = quality(var_models, var_tokenizer, list(args.var_cfgs), args.n_eval, "var")
    var_best_w = max((r for r in var_rows if r["model"] == "base"), key=lambda r: (r["accuracy"], -r["frechet"]))["cfg"]
    var_speed = []
    for b in (s["batch"] for s in speed):
        var_speed.append({"batch": b, **{f"{n}_{how}": images_per_second(var_models[n], var_tokenizer, w, b,
                                                                        args.repeats, "var")
                                         for n, how, w in (("base", "guided", var_best_w), ("base", "unguided", 0.0),
                                                           ("cca", "unguided", 0.0))}})
        print(var_speed[-1], flush=True)
    kls = list(args.hack_kls)
    hack = hacking(models["base"], tokenizer, kls, args.hack_steps, args.hack_lr, per_class=10)
    comparison, summary, var_comparison = summarize(rows, speed, hack, breakdown, var_rows, var_speed)
    result = {
        "machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads, "n_eval": args.n_eval, "models": MODELS,
        "real_vs_real": metrics.data_baseline("mnist", n=args.n_eval, repeats=3),
        "quality": rows, "speed": speed, "speed_breakdown": breakdown, "comparison": comparison,
        **{f"{name}_{key}": checkpoint.info(MODELS[name])[key] for name in ("grpo", "cca")
           for key in ("curves", "options")},
        "hacking": hack, "var_models": VAR_MODELS, "var_quality": var_rows, "var_speed": var_speed,
        "var_comparison": var_comparison,
        **{f"var_cca_{key}": checkpoint.info(VAR_MODELS["cca"])[key] for key in ("curves", "options")},
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "align.json", json.dumps(result, indent=1))
    plot(result, args.out / "align.png")
    for row in summary:
        print(row)
    print(f"wrote {args.out / 'align.json'} and align.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
