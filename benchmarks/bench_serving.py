"""Serving the shipped character-level target model to many requests (chapter 09).

Measures, in one run on one machine, on seeded synthetic traces (Poisson arrivals, lognormal prompt and output
lengths, prompts cut from the held-out text):

* static batching vs continuous batching at equal KV memory (same pool of blocks): output tokens per second,
  time to first token and time per output token (p50/p99), KV memory over time; the same greedy outputs;
  continuous batching with each KV compression inside the engine (int8 and packed int4 pools, sinks + window
  eviction at 96 and 48 positions, MiniCache merging from layer 10 and 6): throughput, KV bytes in use (peak
  and mean over the steps), how many requests get the full-precision tokens, and the held-out NLL of the same
  compression;
* continuous batching with and without prefix caching on a trace whose requests share a system prompt:
  prefill tokens computed and TTFT;
* memory wasted by paged blocks vs contiguous preallocation of the model's full length per sequence;
* KV bytes per token vs held-out NLL of ``lm_target`` for each KV compression method (KIVI int8/int4/int2,
  sinks + window and H2O heavy hitters at 1/4 and 1/8 of the cache, MiniCache-style merging);
* a load test of the HTTP server (``python -m ar_course serve``'s app) on 127.0.0.1: a bounded number of
  concurrent streaming clients; latency and TTFT p50/p99 and whether every request completed.

Writes ``benchmarks/results/serving.json`` and ``serving.png``::

    python benchmarks/bench_serving.py            # --threads 1 by default
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ar_course import cli  # noqa: E402
from ar_course.data.text import load_text_dataset  # noqa: E402
from ar_course.files import atomic_write_text, save_figure  # noqa: E402
from ar_course.serving import Engine, EngineConfig  # noqa: E402
from ar_course.serving.compression import CompressedAttention, heldout_nll, kv_bytes_per_token  # noqa: E402
from ar_course.serving.h2o import h2o_heldout_nll  # noqa: E402
from ar_course.serving.trace import make_trace, replay, summarize  # noqa: E402
from ar_course.transformer import load_pretrained  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_SIZE = 16  # the engines' KV block (positions)
SYSTEM_PROMPT = ("You are a careful assistant for the Python documentation. Answer with one short, correct "
                 "sentence, then stop. Question: ")
# engine rows: (name, EngineConfig options, the CompressedAttention method and arguments for its held-out NLL)
ENGINES = [("int8", {"kv_bits": 8}, ("int8_pool", {})), ("int4", {"kv_bits": 4}, ("int4_pool", {})),
           ("sinks_window_96", {"kv_window": 96, "kv_sinks": 4}, ("sink_window", {"sinks": 4, "window": 96})),
           ("sinks_window_48", {"kv_window": 48, "kv_sinks": 4}, ("sink_window", {"sinks": 4, "window": 48})),
           ("h2o_96", {"kv_h2o_budget": 96, "kv_h2o_recent": 48}, ("h2o_blocks", {"window": 96, "recent": 48})),
           ("h2o_48", {"kv_h2o_budget": 48, "kv_h2o_recent": 24}, ("h2o_blocks", {"window": 48, "recent": 24})),
           ("minicache_10", {"kv_merge_from": 10}, ("minicache", {"merge_from": 10})),
           ("minicache_6", {"kv_merge_from": 6}, ("minicache", {"merge_from": 6}))]
METHODS = [("none", {}), ("int8", {}), ("int4", {}), ("int2", {}), ("int8_pool", {}), ("int4_pool", {}),
           ("sink_window", {"window": 96}),
           ("sink_window", {"window": 48}), ("h2o", {"window": 96, "recent": 48}),
           ("h2o", {"window": 48, "recent": 24}), ("h2o_blocks", {"window": 96, "recent": 48}),
           ("h2o_blocks", {"window": 48, "recent": 24}),
           ("minicache", {"merge_from": 10}), ("minicache", {"merge_from": 6})]


def run_engine(model, trace, config: EngineConfig) -> tuple[dict, Engine]:
    engine = Engine(model, config)
    ids = replay(engine, trace)
    summary = summarize(engine)
    summary["outputs"] = {i: engine.requests[i].output for i in ids}
    return summary, engine


def batching(model, val, args) -> tuple[dict, dict]:
    """Static vs continuous batching on one trace at equal KV memory, ``args.repeats`` rounds of the three
    policies one after the other; each policy's run with the median throughput is reported, with every round's
    throughput and ratios. Returns results and the engines of the reported runs."""
    trace = make_trace(val, args.requests, seed=args.seed, rate=args.rate, prompt_median=32, output_median=48,
                       sigma=0.9)
    policies = {"static": ("static", None), "static_max_length": ("static", model.config.block_size),
                "continuous": ("continuous", None)}
    runs = {name: [] for name in policies}
    for _ in range(args.repeats):
        for name, (policy, reserve) in policies.items():
            config = EngineConfig(num_blocks=args.blocks, block_size=BLOCK_SIZE, max_running=args.max_running,
                                  max_step_tokens=256, policy=policy, static_reserve=reserve)
            runs[name].append(run_engine(model, trace, config))
    results, engines = {}, {}
    for name, done in runs.items():
        ranked = sorted(done, key=lambda run: run[0]["tokens_per_second"])
        results[name], engines[name] = ranked[len(ranked) // 2]
        results[name]["tokens_per_second_runs"] = [run[0]["tokens_per_second"] for run in done]
    same = all(run[0]["outputs"] == results["continuous"]["outputs"] for done in runs.values() for run in done)
    results["compressed"] = compressed_engines(model, trace, engines["continuous"], results["continuous"], args)
    for name in policies:
        del results[name]["outputs"]
    results["same_outputs"] = same
    results["speedup"] = results["continuous"]["tokens_per_second"] / results["static"]["tokens_per_second"]
    results["speedup_vs_max_length"] = (results["continuous"]["tokens_per_second"]
                                        / results["static_max_length"]["tokens_per_second"])
    per_round = lambda other: [c / o for c, o in zip(results["continuous"]["tokens_per_second_runs"],  # noqa: E731
                                                     results[other]["tokens_per_second_runs"])]
    results["speedup_runs"], results["speedup_vs_max_length_runs"] = per_round("static"), per_round("static_max_length")
    results["trace"] = {"requests": len(trace), "rate_per_s": args.rate, "kv_blocks": args.blocks,
                        "block_size": BLOCK_SIZE, "prompt_tokens_mean": sum(len(r.prompt) for r in trace) / len(trace),
                        "output_tokens_mean": sum(r.max_new_tokens for r in trace) / len(trace)}
    return results, engines


def kv_bytes(engine: Engine) -> dict:
    """KV bytes of the blocks in use over an engine's steps: peak and mean."""
    used = [h.kv_bytes for h in engine.history]
    return {"kv_bytes_peak": max(used), "kv_bytes_mean": sum(used) / len(used)}


def compressed_engines(model, trace, plain: Engine, plain_result: dict, args) -> dict:
    """The continuous engine on ``trace`` with each compression of :data:`ENGINES` inside it, against the plain
    one: throughput, KV bytes in use, identical requests; the held-out NLL is :func:`compression`'s."""
    rows, ref = {}, plain_result["outputs"]
    base = kv_bytes(plain)
    for name, options, _ in ENGINES:
        config = EngineConfig(num_blocks=args.blocks, block_size=BLOCK_SIZE, max_running=args.max_running,
                              max_step_tokens=256, **options)
        summary, engine = run_engine(model, trace, config)
        got = summary.pop("outputs")
        rows[name] = {"options": options, "tokens_per_second": summary["tokens_per_second"], **kv_bytes(engine),
                      "kv_bytes_peak_vs_plain": kv_bytes(engine)["kv_bytes_peak"] / base["kv_bytes_peak"],
                      "kv_bytes_mean_vs_plain": kv_bytes(engine)["kv_bytes_mean"] / base["kv_bytes_mean"],
                      "bytes_per_block_vs_fp32": engine.bytes_per_block() / plain.bytes_per_block(),
                      "identical_requests": sum(got[i] == o for i, o in ref.items()) / len(ref),
                      "ttft_s": summary["ttft_s"]}
    rows["none"] = {"tokens_per_second": plain_result["tokens_per_second"], **base}
    return rows


def prefix_caching(model, val, tok, args) -> dict:
    """Continuous batching with and without prefix caching; every request starts with the same system prompt."""
    system = tok.encode(SYSTEM_PROMPT).tolist()
    trace = make_trace(val, args.requests, seed=args.seed + 1, rate=args.rate, prompt_median=16, output_median=24,
                       sigma=0.6, shared_prefix=system)
    out = {}
    for caching in (False, True):
        config = EngineConfig(num_blocks=args.blocks, block_size=BLOCK_SIZE, max_running=args.max_running,
                              prefix_caching=caching)
        out["on" if caching else "off"] = run_engine(model, trace, config)[0]
    same = out["on"].pop("outputs") == out["off"].pop("outputs")
    prompt_tokens = sum(len(r.prompt) for r in trace)
    return {**out, "same_outputs": same, "shared_prefix_tokens": len(system), "prompt_tokens": prompt_tokens,
            "shared_fraction": len(system) * len(trace) / prompt_tokens,
            "prefill_drop": 1 - out["on"]["prefill_tokens_computed"] / out["off"]["prefill_tokens_computed"]}


def compression(model, val, args) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed)
    T = model.config.block_size
    starts = torch.randint(0, len(val) - T - 1, (args.windows,), generator=g).tolist()
    windows = torch.stack([val[s:s + T + 1] for s in starts])  # (N, T+1)
    rows = []
    for method, kw in METHODS:
        if method == "h2o_blocks":  # the engine's H2O, decoded one token at a time through its rule
            nll = h2o_heldout_nll(model, windows, kw["window"], kw["recent"], BLOCK_SIZE)
        else:
            nll = heldout_nll(model, windows, CompressedAttention(method, **kw))
        rows.append({"method": method, **kw, "nll": nll,
                     "bytes_per_token": kv_bytes_per_token(model.config, method, T, **kw)})
    for name, _, (method, kw) in ENGINES:  # the NLL of each engine's compression (sinks: the engine's 4)
        if not any(r["method"] == method and all(r.get(k) == v for k, v in kw.items() if k != "sinks")
                   for r in rows):
            raise RuntimeError(f"METHODS lacks {method} {kw}, the compression of engine {name}")
    base = rows[0]
    for r in rows:
        r["bytes_fraction"] = r["bytes_per_token"] / base["bytes_per_token"]
        r["nll_change"] = r["nll"] / base["nll"] - 1
    return rows


def http_load(model, tok, val, args) -> dict:
    """A load test of ``python -m ar_course serve``'s app on 127.0.0.1: ``args.http_requests`` streamed requests
    from ``args.http_clients`` concurrent clients; latency, TTFT and whether every request completed."""
    import socket
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import uvicorn

    from ar_course.serving.server import create_app

    trace = make_trace(val, args.http_requests, seed=args.seed + 2, prompt_median=32, output_median=32, sigma=0.6)
    config = EngineConfig(num_blocks=args.blocks, block_size=BLOCK_SIZE, max_running=args.max_running)
    app = create_app(Engine(model, config), tok, max_pending=args.http_clients, timeout_s=120.0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def one(req) -> dict:
        body = {"prompt": tok.decode(req.prompt), "max_tokens": req.max_new_tokens, "temperature": 0, "stream": True}
        t0, first, chunks, finish = time.perf_counter(), None, 0, None
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=180) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                first = first or time.perf_counter()
                chunks += bool(choice["text"])
                finish = choice["finish_reason"] or finish
        return {"status": r.status_code, "latency": time.perf_counter() - t0, "ttft": (first or t0) - t0,
                "tokens": chunks, "finish": finish, "wanted": req.max_new_tokens}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.http_clients) as pool:
        answers = list(pool.map(one, trace))
    seconds = time.perf_counter() - t0
    server.should_exit = True
    thread.join(timeout=60)
    pct = lambda key, q: float(torch.tensor([a[key] for a in answers]).quantile(q))  # noqa: E731
    complete = sum(a["status"] == 200 and a["finish"] == "length" and a["tokens"] == a["wanted"] for a in answers)
    return {"requests": len(answers), "clients": args.http_clients, "completed": complete,
            "errors": sum(a["status"] != 200 for a in answers), "seconds": seconds,
            "tokens_per_second": sum(a["tokens"] for a in answers) / seconds,
            "latency_s": {"p50": pct("latency", 0.5), "p99": pct("latency", 0.99)},
            "ttft_s": {"p50": pct("ttft", 0.5), "p99": pct("ttft", 0.99)}}


MARKERS = "osD^vP*X<>"
"""One marker (and colour) per compression method; a second setting of a method is drawn hollow."""


def compression_panel(ax, rows: list[dict]) -> None:
    """KV bytes per token against the held-out NLL change of each compression row of :func:`compression`: one
    marker per row, named with its two values in a legend beside the panel (labels on the points overlapped:
    most rows lie within a few percent of each other). The NLL change is on a symmetric log scale, linear
    within +-1%."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seen = set()
    for r in rows:
        i = methods.index(r["method"])
        name = r["method"] + (f" from {r['merge_from']}" if "merge_from" in r else "") + (
            f" {r['window']}" if "window" in r else "")
        color, change = f"C{i % 10}", 100 * r["nll_change"]
        ax.scatter(r["bytes_fraction"], change, marker=MARKERS[i % len(MARKERS)], s=40,
                   label=f"{name}: {r['bytes_fraction']:.2f}, {change:+.1f}%",
                   facecolors="none" if r["method"] in seen else color, edgecolors=color, linewidths=1.2)
        seen.add(r["method"])
    ax.set_yscale("symlog", linthresh=1)
    ax.set_yticks([-1, 0, 1, 2, 5, 10, 20, 50, 100], ["-1%", "0", "+1%", "+2%", "+5%", "+10%", "+20%", "+50%",
                                                      "+100%"])
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(xlabel="KV bytes per token (fraction of fp16)", ylabel="held-out NLL change (symlog)",
           title="KV compression: memory vs quality")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)


def plot(result: dict, engines: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.2))
    for policy, engine in ((n, engines[n]) for n in ("static_max_length", "continuous")):
        t0 = engine.history[0].time
        axes[0].plot([h.time - t0 for h in engine.history], [h.blocks_used * engine.config.block_size
                                                             for h in engine.history], label=f"{policy}: reserved")
        axes[0].plot([h.time - t0 for h in engine.history], [h.tokens_stored for h in engine.history], "--",
                     label=f"{policy}: stored")
    axes[0].set(xlabel="seconds", ylabel="KV positions", title="KV memory over time (equal pool)")
    axes[0].legend(fontsize=8)
    b = result["batching"]
    names = ["static_max_length", "static", "continuous"]
    axes[1].bar(["static\n(max-length\nreserve)", "static\n(exact\nreserve)", "continuous"],
                [b[n]["tokens_per_second"] for n in names], color=["tab:gray", "tab:olive", "tab:blue"])
    axes[1].set(ylabel="output tokens / s",
                title=f"throughput at equal KV memory: {b['speedup_vs_max_length']:.2f}x / {b['speedup']:.2f}x")
    compression_panel(axes[2], result["compression"])
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=cli.positive_int, default=48)
    parser.add_argument("--rate", type=cli.positive_float, default=40.0, help="mean arrivals per second")
    parser.add_argument("--blocks", type=cli.positive_int, default=96, help="KV pool size in blocks of 16")
    parser.add_argument("--max-running", type=cli.positive_int, default=16)
    parser.add_argument("--windows", type=cli.positive_int, default=16, help="held-out windows for the NLL")
    parser.add_argument("--repeats", type=cli.positive_int, default=3,
                        help="rounds of the batching comparison (median reported)")
    parser.add_argument("--http-requests", type=cli.nonnegative_int, default=32, help="load test requests (0: skip it)")
    parser.add_argument("--http-clients", type=cli.positive_int, default=8, help="concurrent load-test clients")
    parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
    parser.add_argument("--threads", type=cli.positive_int, default=1)
    parser.add_argument("--out", type=cli.path_arg, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_pretrained("lm_target")
    _, _, val = load_text_dataset()
    batch, engines = batching(model, val, args)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "platform": platform.platform(),
                    "threads": args.threads, "torch": torch.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "lm_target", "args": {k: str(v) for k, v in vars(args).items()},
        "batching": batch, "prefix_caching": prefix_caching(model, val, tok, args),
        "compression": compression(model, val, args),
        "http": http_load(model, tok, val, args) if args.http_requests else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "serving.json", json.dumps(result, indent=1) + "\n")
    plot(result, engines, args.out / "serving.png")
    b, p = result["batching"], result["prefix_caching"]
    print(f"throughput static max-length {b['static_max_length']['tokens_per_second']:.1f} tok/s, static exact "
          f"{b['static']['tokens_per_second']:.1f} tok/s, continuous {b['continuous']['tokens_per_second']:.1f} tok/s "
          f"({b['speedup_vs_max_length']:.2f}x / {b['speedup']:.2f}x, medians of {args.repeats} rounds; per round "
          f"{', '.join(f'{x:.2f}' for x in b['speedup_vs_max_length_runs'])}x / "
          f"{', '.join(f'{x:.2f}' for x in b['speedup_runs'])}x), same outputs {b['same_outputs']}")
    for name, r in b["compressed"].items():
        if name != "none":
            print(f"engine {name:16s} {r['tokens_per_second']:6.1f} tok/s, KV bytes in use peak/mean "
                  f"{r['kv_bytes_peak_vs_plain']:.3f}/{r['kv_bytes_mean_vs_plain']:.3f} of the fp32 engine's, "
                  f"{r['identical_requests']:.0%} of requests identical to full precision")
    print(f"paged waste {b['continuous']['paged_waste_fraction']:.1%} "
          f"({b['continuous']['paged_waste_blocks_per_sequence']:.2f} blocks/seq) vs contiguous "
          f"{b['continuous']['contiguous_waste_fraction']:.1%}")
    print(f"prefix caching: prefill tokens -{p['prefill_drop']:.1%} (shared fraction {p['shared_fraction']:.1%}), "
          f"TTFT p50 {p['off']['ttft_s']['p50'] * 1e3:.0f} -> {p['on']['ttft_s']['p50'] * 1e3:.0f} ms")
    for r in result["compression"]:
        setting = r.get("merge_from", r.get("window", ""))
        print(f"{r['method']:12s} {setting!s:3s} bytes {r['bytes_fraction']:.3f}  NLL {r['nll']:.4f} "
              f"({r['nll_change']:+.2%})")
    h = result["http"]
    if h:
        print(f"HTTP load test: {h['completed']}/{h['requests']} completed, {h['errors']} errors, {h['clients']} "
              f"clients, "
              f"latency p50/p99 {h['latency_s']['p50']:.2f}/{h['latency_s']['p99']:.2f} s, TTFT p50/p99 "
              f"{h['ttft_s']['p50']:.2f}/{h['ttft_s']['p99']:.2f} s, {h['tokens_per_second']:.1f} tok/s")
    http_ok = h is None or h["completed"] == h["requests"]
    return 0 if b["same_outputs"] and p["same_outputs"] and http_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
