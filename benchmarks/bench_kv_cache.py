"""KV-cached generation vs recomputing the prefix, with the shipped character-level target model.

Measures, in one run on one machine:

* wall-clock time of ``GPT.generate`` for 256 new tokens at batch 1, with and without the KV cache, and
  checks that both produce the same tokens (greedy and seeded sampling);
* the time of one decode step as the sequence grows: constant-ish with the cache, linear without it.

Writes ``benchmarks/results/kv_cache.json`` and ``kv_cache.png``::

    python benchmarks/bench_kv_cache.py            # --threads 1 by default: stable numbers on a busy CPU
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

from ar_course import cli  # noqa: E402
from ar_course.sampling import GREEDY, SamplingConfig  # noqa: E402
from ar_course.files import atomic_write_text, save_figure  # noqa: E402
from ar_course.transformer import load_pretrained  # noqa: E402
from ar_course.utils import get_device  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The for statement is used to iterate over the elements of a sequence (such as a string, tuple or list):"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_generate(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[bool, tuple[float, torch.Tensor]]:
    """Best-of-``repeats`` seconds of greedy ``generate`` with (True) and without (False) the cache, the two
    timed alternately so that a busy machine slows both alike; returns ``{use_cache: (seconds, tokens)}``."""
    best = {True: (float("inf"), None), False: (float("inf"), None)}
    for _ in range(repeats):
        for use_cache in (True, False):
            sync(prompt.device)
            t0 = time.perf_counter()
            out = model.generate(prompt, new_tokens, sampling=GREEDY, use_cache=use_cache)
            sync(prompt.device)
            best[use_cache] = min(best[use_cache], (time.perf_counter() - t0, out), key=lambda r: r[0])
    return best


@torch.no_grad()
def step_times(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[float], list[float]]:
    """Seconds per generated token (greedy), cached and recomputing, same tokens fed to both."""
    cache = model.make_cache(1)
    logits, _ = model(prompt, cache=cache)
    seq = prompt
    cached, full = [], []
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        seq = torch.cat([seq, nxt], dim=1)
        sync(seq.device)
        t0 = time.perf_counter()
        logits, _ = model(nxt, cache=cache)
        sync(seq.device)
        t1 = time.perf_counter()
        model(seq)
        sync(seq.device)
        t2 = time.perf_counter()
        cached.append(t1 - t0)
        full.append(t2 - t1)
    return cached, full


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=cli.positive_int, default=256)
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="best of N timings (default 3)")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", type=cli.device_name, default=None)
    parser.add_argument("--out", type=cli.path_arg, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = get_device(args.device)
    model, tok = load_pretrained("lm_target", device=device)
    prompt = tok.encode(PROMPT)[None].to(device)  # (1, T0)

    timed = time_generate(model, prompt, args.new_tokens, args.repeats)
    (t_cache, out_cache), (t_full, out_full) = timed[True], timed[False]
    same_greedy = bool(torch.equal(out_cache, out_full))
    sampled = [
        model.generate(prompt, args.new_tokens, sampling=SamplingConfig(temperature=0.8, top_k=20, top_p=0.95),
                       generator=torch.Generator(device=device).manual_seed(0), use_cache=c)
        for c in (True, False)
    ]
    same_sampled = bool(torch.equal(*sampled))
    cached, full = step_times(model, prompt, args.new_tokens)

    lengths = list(range(prompt.shape[1] + 1, prompt.shape[1] + args.new_tokens + 1))
    result = {
        "date": datetime.date.today().isoformat(),
        "model": "lm_target",
        "params": model.num_params(),
        "config": model.config.to_dict(),
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "batch_size": 1,
        "prompt_tokens": prompt.shape[1],
        "new_tokens": args.new_tokens,
        "seconds_cached": round(t_cache, 4),
        "seconds_recompute": round(t_full, 4),
        "speedup": round(t_full / t_cache, 2),
        "ms_per_token_cached": round(1e3 * t_cache / args.new_tokens, 3),
        "ms_per_token_recompute": round(1e3 * t_full / args.new_tokens, 3),
        "same_tokens_greedy": same_greedy,
        "same_tokens_sampled": same_sampled,
        "sample": tok.decode(out_cache[0].cpu()),
        "step_ms": {
            "sequence_length": lengths,
            "cached": [round(1e3 * t, 4) for t in cached],
            "recompute": [round(1e3 * t, 4) for t in full],
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "kv_cache.json", json.dumps(result, indent=1) + "\n")

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(lengths, result["step_ms"]["recompute"], label="recompute the prefix", alpha=0.8)
    a.plot(lengths, result["step_ms"]["cached"], label="KV cache", alpha=0.8)
    a.set(xlabel="sequence length", ylabel="ms per new token", title="one decode step", yscale="log")
    a.legend()
    steps = range(1, args.new_tokens + 1)
    b.plot(steps, torch.tensor(full).cumsum(0) * 1e3, label="recompute the prefix")
    b.plot(steps, torch.tensor(cached).cumsum(0) * 1e3, label="KV cache")
    b.set(xlabel="tokens generated", ylabel="total ms",
          title=f"{result['speedup']}x faster at {args.new_tokens} tokens")
    b.legend()
    fig.suptitle(f"lm_target ({model.num_params() / 1e6:.2f}M params), batch 1, {device}, {args.threads} thread(s)")
    fig.tight_layout()
    save_figure(fig, args.out / "kv_cache.png", dpi=110)
    print(json.dumps({k: v for k, v in result.items() if k not in ("step_ms", "config", "sample")}, indent=1))
    return 0 if same_greedy and same_sampled else 1


if __name__ == "__main__":
    raise SystemExit(main())
