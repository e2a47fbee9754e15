"""Chapter 08, text half: the shipped masked diffusion LM against the AR model of the same size and data.

Measures, in one run on one machine:

* the NLL bound (nats/char) of ``diffusion_lm`` on held-out windows, full-sequence and block-wise (block 1 is
  its exact left-to-right NLL), next to the NLL of ``lm_small`` (same shape and training windows; the
  diffusion model trains 68,000 steps in two schedules to AR's 1,500, since AR trained longer only overfits the
  small corpus: see ``ar_course.diffusion_lm.train``);
* sample quality against denoising steps, for full and block-wise diffusion: the NLL of the samples under the
  shipped 12-layer ``lm_target`` (lower: more like the corpus) and their unigram entropy (too low: degenerate,
  repetitive text), with the same measures of held-out text and of ``lm_small``'s samples as references;
* characters per second of each configuration on the CPU (the KV-cached path, and for block-wise diffusion the
  uncached one), best of ``--repeats``;
* the validation curves the two shipped runs recorded while training (their checkpoints' ``evals``);
* the data-constrained study, scaled down (:func:`ar_course.diffusion_lm.study.data_constrained`): a small
  unique-text budget repeated for many epochs, validation loss against epochs for AR and diffusion.

Writes ``benchmarks/results/diffusion_lm.json`` (with a ``summary`` of the chapter's targets) and
``diffusion_lm.png``::

    python benchmarks/bench_diffusion_lm.py            # --threads 1 by default: stable numbers on a busy CPU
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
import torch  # noqa: E402

from ar_course import checkpoint, cli  # noqa: E402
from ar_course.data import load_text_dataset  # noqa: E402
from ar_course.diffusion_lm.study import StudyConfig, crossing, data_constrained  # noqa: E402
from ar_course.files import atomic_write_text  # noqa: E402
from ar_course.transformer.train import evaluate_lm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (block size, steps) of the quality/speed table; block None is full-sequence diffusion
CONFIGS = [(None, 4), (None, 8), (None, 16), (None, 32), (None, 64),
           (16, 4), (16, 8), (16, 16), (16, 32), (16, 64),
           (4, 16), (4, 32), (4, 64), (1, 64)]


@torch.no_grad()
def judge(target, ids: torch.Tensor) -> float:
    """Mean NLL (nats/char) of characters 1.. of each row of ``ids`` ``(n, L)`` under the AR ``target``."""
    logits, _ = target(ids[:, :-1])  # (n, L-1, V)
    return float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:]))


def unigram_entropy(ids: torch.Tensor, vocab: int) -> float:
    """Entropy (nats) of the character histogram of ``ids`` (any shape)."""
    p = torch.bincount(ids.flatten(), minlength=vocab).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def timed(fn, repeats: int) -> tuple[object, float]:
    """``fn()``'s result from its first call and the best wall time of ``repeats`` calls."""
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        out = result if out is None else out
    return out, best


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=cli.positive_int, default=32, help="samples per configuration")
    parser.add_argument("--bound-windows", type=cli.positive_int, default=256,
                        help="held-out windows for the NLL bound")
    parser.add_argument("--bound-samples", type=cli.positive_int, default=4,
                        help="noise draws per window for the bound")
    parser.add_argument("--repeats", type=cli.positive_int, default=2, help="best of N timings")
    parser.add_argument("--budget", type=cli.positive_int, default=StudyConfig.budget,
                        help="data-constrained: unique characters")
    parser.add_argument("--epochs", type=cli.positive_int, default=StudyConfig.epochs, help="data-constrained: epochs")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=cli.path_arg, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    dlm, tok = checkpoint.load_with_tokenizer("diffusion_lm", kind="diffusion_lm")
    ar = checkpoint.load("lm_small", kind="lm")
    target = checkpoint.load("lm_target", kind="lm")
    _, _, val_ids = load_text_dataset()
    L, V = dlm.config.length, dlm.config.vocab_size
    n_win = min(args.bound_windows, len(val_ids) // L)
    windows = val_ids[: n_win * L].view(n_win, L)  # (n_win, L)

    # 1. likelihood: the bound at several block sizes against AR's NLL, on the same windows
    ar_nll = evaluate_lm(ar, val_ids[: n_win * L + 1], L)
    bounds = {}
    for b in (L, 16, 4, 1):
        bounds[b] = dlm.nll_bound(windows, block_size=b, samples=args.bound_samples,
                                  generator=torch.Generator().manual_seed(0))
        print(f"bound, block {b}: {bounds[b]:.4f} nats/char (AR: {ar_nll:.4f})", flush=True)

    # 2. quality and speed of samples
    data_rows = windows[: args.n]
    references = {"held-out text": {"nll_target": judge(target, data_rows), "entropy": unigram_entropy(data_rows, V)}}
    prompt = data_rows[:, :1]  # AR needs a first character: the held-out windows' own
    ar_ids, ar_sec = timed(lambda: ar.generate(prompt, L - 1, generator=torch.Generator().manual_seed(0)),
                           args.repeats)
    references["lm_small (AR, KV cache)"] = {"nll_target": judge(target, ar_ids), "entropy": unigram_entropy(ar_ids, V),
                                             "chars_per_s": args.n * (L - 1) / ar_sec}
    print(references, flush=True)
    rows = []
    for b, steps in CONFIGS:
        gen = lambda cache: dlm.generate(args.n, L, steps=steps, block_size=b, use_cache=cache,  # noqa: E731
                                         generator=torch.Generator().manual_seed(0))
        ids, sec = timed(lambda: gen(True), args.repeats)
        row = {"block_size": b or L, "mode": "full" if b is None else "block", "steps": steps,
               "chars_per_pass": L / steps, "nll_target": judge(target, ids), "entropy": unigram_entropy(ids, V),
               "chars_per_s": args.n * L / sec, "sample": tok.decode(ids[0])}
        if b is not None:
            _, sec_plain = timed(lambda: gen(False), 1)
            row["chars_per_s_uncached"] = args.n * L / sec_plain
        rows.append(row)
        print({k: v for k, v in row.items() if k != "sample"}, flush=True)

    # 3. the data-constrained study
    study = data_constrained(StudyConfig(budget=args.budget, epochs=args.epochs), progress=False)
    cross = crossing(study)
    print(cross, flush=True)

    full_bound = bounds[L]
    ratio = full_bound / ar_nll
    best_full = min((r for r in rows if r["mode"] == "full"), key=lambda r: r["nll_target"])
    ar_row = next(r for r in rows if r["block_size"] == 1)
    records = {name: checkpoint.info(name) for name in ("diffusion_lm", "lm_small")}
    # a run continued from another (--init) counts the steps of both
    steps = {name: record.get("init_steps", 0) + record["steps"] for name, record in records.items()}
    summary = [
        {"what": f"NLL bound of the diffusion LM (full, length {L}) vs AR NLL, same size and corpus (diffusion "
                 f"{steps['diffusion_lm']} steps, AR {steps['lm_small']})",
         "measured": f"{full_bound:.3f} vs {ar_nll:.3f} nats/char ({ratio:.2f}x); block 16: {bounds[16]:.3f} "
                     f"({bounds[16] / ar_nll:.2f}x), block 4: {bounds[4]:.3f} ({bounds[4] / ar_nll:.2f}x), "
                     f"block 1: {bounds[1]:.3f} ({bounds[1] / ar_nll:.2f}x)",
         "target": "<= 1.2x (full diffusion)", "met": ratio <= 1.2},
        {"what": f"sample NLL under lm_target (n = {args.n}, {L} chars): full diffusion at its best steps vs "
                 f"block 1 (= AR order) vs held-out text",
         "measured": f"{best_full['nll_target']:.2f} at {best_full['steps']} steps vs {ar_row['nll_target']:.2f} vs "
                     f"{references['held-out text']['nll_target']:.2f}", "target": "-", "met": None},
        {"what": "chars/s on the CPU: full diffusion 8 steps, block 16 x 2 steps, block 1 (AR order), lm_small",
         "measured": ", ".join(f"{r['chars_per_s']:.0f}" for r in rows
                               if (r["block_size"], r["steps"]) in ((L, 8), (16, 8), (1, 64)))
                     + f", {references['lm_small (AR, KV cache)']['chars_per_s']:.0f}", "target": "-", "met": None},
        {"what": f"data-constrained ({args.budget} unique chars, {args.epochs} epochs): best validation loss, "
                 f"AR NLL vs diffusion bound",
         "measured": f"AR {cross['ar_best']:.3f} (epoch {cross['ar_best_epoch']:g}) vs diffusion "
                     f"{cross['diffusion_best']:.3f} (epoch {cross['diffusion_best_epoch']:g})",
         "target": "report whether diffusion passes AR", "met": None},
    ]
    result = {
        "machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads, "n": args.n, "length": L,
        "params": {"diffusion_lm": dlm.num_params(), "lm_small": ar.num_params()},
        "training": {name: {k: record.get(k) for k in ("init", "init_steps", "steps", "seed", "lr", "batch_size",
                                                       "tokens_seen", "train_seconds", "evals")}
                     for name, record in records.items()},
        "bound_windows": n_win, "bound_samples": args.bound_samples,
        "ar_nll": ar_nll, "bounds": {str(k): v for k, v in bounds.items()},
        "references": references, "samples": rows, "data_constrained": {**study, "crossing": cross},
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "diffusion_lm.json", json.dumps(result, indent=1))
    plot(result, args.out / "diffusion_lm.png")
    for row in summary:
        print(row)
    print(f"wrote {args.out / 'diffusion_lm.json'} and diffusion_lm.png")
    return 0


def plot(result: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 5, figsize=(25, 4.5))
    L = result["length"]
    blocks = sorted({r["block_size"] for r in result["samples"]}, reverse=True)
    for b in blocks:
        rs = [r for r in result["samples"] if r["block_size"] == b]
        label = "full diffusion" if b == L else f"block {b}" + (" (= AR order)" if b == 1 else "")
        axes[0].plot([r["steps"] for r in rs], [r["nll_target"] for r in rs], "o-", label=label)
        axes[1].plot([r["steps"] for r in rs], [r["entropy"] for r in rs], "o-", label=label)
        axes[2].plot([r["chars_per_s"] for r in rs], [r["nll_target"] for r in rs], "o-", label=label)
    for ref, style in zip(result["references"], ("--", ":")):
        for ax, key in ((axes[0], "nll_target"), (axes[1], "entropy")):
            ax.axhline(result["references"][ref][key], color="gray", ls=style, label=ref)
    axes[0].set(xscale="log", xlabel="denoising passes", ylabel="nats/char under lm_target",
                title="sample NLL (lower: closer to the corpus)")
    axes[1].set(xscale="log", xlabel="denoising passes", ylabel="nats", title="unigram entropy of the samples")
    passes = sorted({r["steps"] for r in result["samples"]})
    for ax in axes[:2]:  # ticks at the measured pass counts, plain numbers (log-axis labels ran together)
        ax.set_xticks(passes, [str(p) for p in passes])
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[2].set(xscale="log", xlabel="chars / s (CPU, KV cache)", ylabel="nats/char under lm_target",
                title=f"quality vs speed ({result['threads']} thread(s))")
    axes[0].legend(fontsize=7)
    dc = result["data_constrained"]
    axes[3].plot(dc["epochs"], dc["ar"], "o-", label="AR (val NLL)")
    axes[3].plot(dc["epochs"], dc["diffusion"], "s-", label="diffusion (val NLL bound)")
    axes[3].set(xlabel="epochs over the unique text", ylabel="nats/char",
                title=f"data-constrained: {dc['config']['budget']} unique chars")
    axes[3].legend()
    for name, key, marker in (("lm_small", "val_loss", "o-"), ("diffusion_lm", "val_bound", "s-")):
        run = result["training"][name]
        evals = run.get("evals") or []
        axes[4].plot([e["step"] for e in evals], [e[key] for e in evals], marker, ms=3, label=f"{name} ({key})")
        if run.get("init_steps"):
            axes[4].axvline(run["init_steps"], color="gray", ls=":", label=f"{name}: second schedule starts")
    axes[4].set(xlabel="training step", ylabel="nats/char (trainer's validation windows)",
                title="the shipped runs: validation during training")
    axes[4].legend(fontsize=7)
    plt.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
