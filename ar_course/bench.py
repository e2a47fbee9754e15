"""``python -m ar_course bench``: run the scripts in ``benchmarks/`` and print their summary table.

Works on a checkout of the repository (``--root PATH``, or found from the current folder upward): the
installed package does not ship ``benchmarks/``.

Each ``benchmarks/bench_NAME.py`` writes ``benchmarks/results/NAME.json`` (and a plot); a result's
``summary`` list holds rows ``{"what", "measured", "target", "met"}`` that this command prints. Ratios are
measured inside one run on one machine; the JSON records the machine and date.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ar_course.checkout import CheckoutNotFound, find_root, root_path
from ar_course.cli import ArgumentParser, UsageError, prog


def available(root: Path | None = None) -> dict[str, Path]:
    """Benchmark name -> script path, in the checkout ``root`` (default: found from the current folder upward;
    :class:`~ar_course.checkout.CheckoutNotFound` when there is none)."""
    bench_dir = find_root("benchmarks", root) / "benchmarks"
    return {p.stem.removeprefix("bench_"): p for p in sorted(bench_dir.glob("bench_*.py"))}


def _row(what: str, measured: str, target: str = "-", met: bool | None = None) -> dict:
    return {"what": what, "measured": measured, "target": target, "met": met}


KV_CACHE_TARGET = 5.0
"""Speed-up of KV-cached over recomputing decoding that the README's benchmark table asks for."""


def _kv_cache(d: dict) -> list[dict]:
    same = d["same_tokens_greedy"] and d["same_tokens_sampled"]
    return [_row(f"KV-cached vs recomputing decoding, {d['model']}, {d['new_tokens']} new tokens",
                 f"{d['speedup']:.2f}x ({d['ms_per_token_cached']:.1f} vs {d['ms_per_token_recompute']:.1f} ms/token), "
                 f"same tokens: {same}", f">= {KV_CACHE_TARGET:g}x, identical tokens",
                 same and d["speedup"] >= KV_CACHE_TARGET)]


def _guidance(w: float) -> str:
    """A guidance strength as the package writes it, with the scale of the CFG paper beside it."""
    return f"w = {w:g} (s = {1 + w:g})"


def _raster_quality(d: dict) -> list[dict]:
    """The raster benchmark's quality rows, each with its guidance strength ``"cfg"`` (w). Results written before
    the package's guidance convention was w recorded ``quality_by_scale`` by the scale ``s = 1 + w``."""
    if "quality_by_cfg" in d:
        return d["quality_by_cfg"]
    return [{**{k: v for k, v in r.items() if k != "scale"}, "cfg": r["scale"] - 1} for r in d["quality_by_scale"]]


RASTER_ACCURACY_TARGET = 0.9
"""Class accuracy of raster AR samples at the best guidance strength that the README's benchmark table asks for."""


def _raster(d: dict) -> list[dict]:
    best = max(_raster_quality(d), key=lambda r: r["accuracy"])
    return [_row("raster AR class accuracy at the best guidance strength",
                 f"{best['accuracy']:.3f} at {_guidance(best['cfg'])} (Frechet {best['frechet']:.2f}; data vs data "
                 f"{d['real_vs_real']['frechet']:.2f})", f">= {RASTER_ACCURACY_TARGET:.0%}",
                 best["accuracy"] >= RASTER_ACCURACY_TARGET),
            _row("raster AR forward passes per image", f"{d['forward_passes_per_image']['kv_cache']}", "-", None)]


def _rising(values: list[float]) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


def _tokenizers(d: dict) -> list[dict]:
    m, usage = d["msvq_vs_vq"], {r["name"]: r for r in d["usage"]}
    psnr = d["scales_sweep"]["psnr"]
    rows = [_row("multi-scale vs single-scale VQ, held-out PSNR", f"{m['msvq_psnr']:.2f} vs {m['vq_psnr']:.2f} dB "
                 f"(gap {-m['gap_db']:.2f} dB, {d['setup']['steps']} steps)", "within 1 dB", -m["gap_db"] <= 1.0)]
    if "shipped" in d:
        sh = d["shipped"]
        by_scale = sh["scales_sweep"]["psnr"]
        rows.append(_row("shipped multi-scale vs single-scale VQ, held-out PSNR",
                         f"{sh['msvq_psnr']:.2f} vs {sh['vq_psnr']:.2f} dB (gap {-sh['gap_db']:.2f} dB, {sh['steps']} "
                         f"steps); by scale " + " -> ".join(f"{v:.1f}" for v in by_scale),
                         "within 1 dB, monotone", -sh["gap_db"] <= 1.0 and _rising(by_scale)))
    return rows + [
        _row("codebook usage with / without dead-code restart", f"{usage['restart']['fraction_used']:.1%} / "
             f"{usage['no restart']['fraction_used']:.1%}", ">= 90% with restart",
             usage["restart"]["fraction_used"] >= 0.9),
        _row("PSNR as scales are added", " -> ".join(f"{v:.1f}" for v in psnr), "monotone", _rising(psnr))]


def _threads(n: int | str) -> str:
    return f"{n} thread" if str(n) == "1" else f"{n} threads"


def _var(d: dict) -> list[dict]:
    s = d["summary"]
    return [_row("VAR vs raster AR forward passes", f"{s['pass_ratio']:.1f}x fewer", ">= 8x", s["pass_ratio"] >= 8),
            _row(f"VAR vs raster AR CPU wall-clock per batch ({_threads(d.get('threads', 1))})", ", ".join(
                f"batch {b}: {v:.1f}x" for b, v in s["speedup_by_batch"].items()), ">= 4x",
                all(v >= 4 for v in s["speedup_by_batch"].values())),
            *[_row(f"VAR vs raster AR CPU wall-clock per batch ({_threads(n)})", ", ".join(
                f"batch {b}: {v:.1f}x" for b, v in by.items()), ">= 4x", all(v >= 4 for v in by.values()))
              for n, by in s.get("speedup_by_threads", {}).items() if str(n) != str(d.get("threads", 1))],
            _row("class accuracy, VAR minus raster AR", f"{s['accuracy_gap_points']:+.1f} points", ">= -5 points",
                 s["accuracy_gap_points"] >= -5)]


def _kernels(d: dict) -> list[dict]:
    c = d["cpu"]
    rows = [_row(f"numba CPU nearest-code search vs torch cdist, N={c['shape']['N']} K={c['shape']['K']}",
                 f"{c['speedup']:.1f}x, {c['numba_cpu']['peak_extra_mib']:.1f} vs "
                 f"{c['torch_cdist']['peak_extra_mib']:.0f} MiB extra", "faster, no N x K buffer",
                 c["speedup"] > 1 and c["agreement"] == 1.0)]
    g = d.get("gpu")
    if not g:
        rows.append(_row("GPU kernel targets", "not measured (no GPU on this machine)", "see bench_kernels.py", None))
        return rows
    on = f" ({g['device']})"
    if g["flash_attention"]:
        worst = min(g["flash_attention"], key=lambda r: r["speed_vs_sdpa"])
        best = max(g["flash_attention"], key=lambda r: r["triton_tflops"])
        fraction = best.get("fraction_of_matmul_peak")
        peak = f" = {fraction:.0%} of measured bf16 matmul" if fraction is not None else ""
        rows.append(_row(f"Triton FlashAttention vs SDPA, T = 1024-4096, d = 64{on}",
                         f"worst {worst['speed_vs_sdpa']:.2f}x (T={worst['T']}, causal {worst['causal']}); "
                         f"best {best['triton_tflops']:.0f} TFLOP/s{peak}", ">= 0.8x",
                         worst["speed_vs_sdpa"] >= 0.8))
    ours = [r for r in g["decode_attention"] if r["backend"] != "torch" and "error" not in r]
    decode_errors = [f"{r['backend']}: {r['error']}" for r in g["decode_attention"] if "error" in r]
    if ours:
        worst = min(ours, key=lambda r: r["fraction_of_copy_bandwidth"])
        rows.append(_row(f"decode attention bandwidth vs measured copy bandwidth{on}",
                         f"lowest {worst['fraction_of_copy_bandwidth']:.0%} ({worst['backend']}, T={worst['T']}, "
                         f"{worst['bandwidth_gbs']:.0f} of {g['copy_bandwidth_gbs']:.0f} GB/s)", ">= 70%",
                         worst["fraction_of_copy_bandwidth"] >= 0.7))
    elif decode_errors:  # every kernel back-end failed: a failed row, not no row
        rows.append(_row(f"decode attention bandwidth vs measured copy bandwidth{on}",
                         f"failed: {decode_errors[0]}", ">= 70%", False))
    speedups = [r["cdist_ms"] / r[k] for r in g["vq_nearest"] for k in r if k.endswith("_ms") and k != "cdist_ms"]
    vq_errors = [f"{k[:-len('_error')]}: {r[k]}" for r in g["vq_nearest"] for k in r if k.endswith("_error")]
    if speedups:
        rows.append(_row(f"fused nearest-code search vs cdist + argmin{on}",
                         f"{min(speedups):.1f}x to {max(speedups):.1f}x", "faster", min(speedups) > 1))
    elif vq_errors:
        rows.append(_row(f"fused nearest-code search vs cdist + argmin{on}", f"failed: {vq_errors[0]}", "faster",
                         False))
    return rows


PREFIX_DROP_TOLERANCE = 0.1
"""How far (relative) the drop in prefill tokens computed with prefix caching may fall from the shared fraction of
the prompt tokens and still be "about the shared fraction" (README's target): only whole blocks are reused (a
120-token prefix in blocks of 16 shares 112 tokens), and requests admitted before the prefix is cached compute it."""


def _serving(d: dict) -> list[dict]:
    b, c, p = d["batching"], d["batching"]["continuous"], d["prefix_caching"]
    rounds = ", ".join(f"{v:.2f}x" for v in b["speedup_vs_max_length_runs"])
    int8 = next(r for r in d["compression"] if r["method"] == "int8_pool")
    kivi = next(r for r in d["compression"] if r["method"] == "int8")
    window = max((r for r in d["compression"] if r["method"] == "sink_window" and r["bytes_fraction"] <= 0.25),
                 key=lambda r: r["bytes_fraction"])  # the largest window at 1/4 of the cache or less
    pool = b["compressed"]["int8"]["kv_bytes_peak_vs_plain"]
    h = d["http"]
    return [_row("continuous batching vs static batching with max-length preallocation, tokens/s",
                 f"{b['speedup_vs_max_length']:.2f}x (rounds {rounds}); vs exact reservation {b['speedup']:.2f}x; "
                 f"same outputs: {b['same_outputs']}", ">= 2x", min(b["speedup_vs_max_length_runs"]) >= 2),
            _row("paged KV memory wasted per sequence (blocks) vs contiguous preallocation",
                 f"{c['paged_waste_blocks_per_sequence']:.2f} blocks ({c['paged_waste_fraction']:.1%}) vs "
                 f"{c['contiguous_waste_fraction']:.1%}", "< 1 block per sequence",
                 c["paged_waste_blocks_per_sequence"] < 1),
            _row("int8 KV pool: peak KV bytes vs fp32, held-out NLL change",  # nll_change: relative, nll / base - 1
                 f"{pool:.2f}x, {int8['nll_change']:+.2%}", "<= 0.5x within 1% NLL",
                 pool <= 0.5 and abs(int8["nll_change"]) <= 0.01),
            _row("prefix caching: prefill tokens computed vs the shared fraction of prompt tokens",
                 f"{p['prefill_drop']:.0%} fewer, shared fraction {p['shared_fraction']:.0%} (same outputs: "
                 f"{p['same_outputs']})",
                 f"drop by about the shared fraction (within {PREFIX_DROP_TOLERANCE:.0%} of it)",
                 abs(p["prefill_drop"] - p["shared_fraction"]) <= PREFIX_DROP_TOLERANCE * p["shared_fraction"]),
            _row("held-out NLL change: KIVI-style int8 KV, 4 sinks + window at 1/4 of the cache",
                 f"int8 {kivi['nll_change']:+.2%}; window {window['window']} ({window['bytes_fraction']:.2f} of the "
                 f"bytes) {window['nll_change']:+.2%}", "int8 within 1%, sinks + window at 1/4 within 5%",
                 abs(kivi["nll_change"]) <= 0.01 and abs(window["nll_change"]) <= 0.05),
            _row("HTTP load test of the server: streamed requests answered",
                 "not measured (--http-requests 0)" if h is None else
                 f"{h['completed']}/{h['requests']} completed, {h['errors']} errors ({h['clients']} clients)",
                 "every request answered", None if h is None else h["completed"] == h["requests"])]


SUMMARIZERS = {"kv_cache": _kv_cache, "raster": _raster, "tokenizers": _tokenizers, "var": _var,
               "kernels": _kernels, "serving": _serving}
"""Summary rows derived from the measurements of results that do not store a ``summary`` list."""


def _summary(name: str, path: Path, data: object) -> list:
    """The summary list of the result ``data`` of benchmark ``name`` (read from ``path``): its ``summary`` list,
    else the rows :data:`SUMMARIZERS` derive from it. ``ValueError`` naming the file and what is wrong when it
    holds neither."""
    def wrong(why: str) -> ValueError:
        return ValueError(f"benchmark result {path} {why}; rerun: {prog('bench')} {name}")

    if not isinstance(data, dict):
        raise wrong(f"is a JSON {type(data).__name__}, not an object")
    if isinstance(data.get("summary"), list):
        return data["summary"]
    if name not in SUMMARIZERS:
        found = "no" if "summary" not in data else f"a {type(data['summary']).__name__} as its"
        raise wrong(f"has {found} 'summary' (expected a list of rows)")
    try:
        return SUMMARIZERS[name](data)
    except KeyError as exc:
        raise wrong(f"lacks {exc.args[0]!r}, which the table needs") from None
    except (LookupError, TypeError, AttributeError, ValueError, ArithmeticError, StopIteration) as exc:
        raise wrong(f"does not hold the measurements the table needs ({type(exc).__name__}: {exc})") from None


def summary_rows(names: list[str], root: Path) -> list[dict]:
    """The summary rows of the named benchmarks' latest results in the checkout ``root`` (missing results are
    skipped). Raises ``ValueError`` naming the file for a result that is not valid JSON or not of the shape its
    benchmark writes."""
    rows = []
    for name in names:
        path = root / "benchmarks" / "results" / f"{name}.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"benchmark result {path} is not valid JSON ({exc}); rerun: {prog('bench')} "
                             f"{name}") from None
        for row in _summary(name, path, data):
            if not isinstance(row, dict):
                row = {"what": str(row), "measured": ""}
            rows.append({"bench": name, "date": data.get("date", "date not recorded"), "what": "", "measured": "",
                         **row})
    return rows


def format_rows(rows: list[dict]) -> str:
    """The table the command prints: per row of :func:`summary_rows`, ``[bench] what``, then the measured value,
    the target, whether it was met (``yes``, ``NO`` or ``-``) and the result's date; ``no benchmark results yet``
    when there are none."""
    if not rows:
        return "no benchmark results yet"
    lines = []
    for r in rows:
        met = "yes" if r.get("met") is True else "NO" if r.get("met") is False else "-"
        lines.append(f"[{r['bench']}] {r['what']}\n    measured: {r['measured']}\n    target: {r.get('target', '-')}"
                     f"   met: {met}   ({r.get('date', '')})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course bench``: runs each named benchmark once (a name given twice too), then prints the
    table. Exit status 0, 1 when a benchmark failed or wrote a result the table cannot read, 2 for bad input (an
    unknown name, no checkout, and with ``--table`` a result file that is not valid)."""
    parser = ArgumentParser(prog="python -m ar_course bench",
                            description="Run the benchmarks in benchmarks/ and print their summary table.")
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all): the NAME of each "
                                                 "benchmarks/bench_NAME.py; one named twice runs once")
    parser.add_argument("--table", action="store_true", help="only print the latest results, run nothing")
    parser.add_argument("--root", type=root_path, default=None,
                        help="the repository checkout (default: found from the current folder upward)")
    args = parser.parse_args(argv)
    try:
        root = find_root("benchmarks", args.root)
    except CheckoutNotFound as exc:
        raise UsageError(str(exc)) from None
    scripts = available(root)
    names = list(dict.fromkeys(args.names)) or list(scripts)  # each once, in the order named
    unknown = [n for n in names if n not in scripts]
    if unknown:
        raise UsageError(f"unknown benchmark(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(scripts)}")
    failed = []
    if not args.table:
        for name in names:
            print(f"== {name}: {scripts[name].relative_to(root)}", flush=True)
            res = subprocess.run([sys.executable, str(scripts[name])], cwd=root)
            if res.returncode != 0:
                failed.append(name)
    try:
        print(("\n" if not args.table else "") + format_rows(summary_rows(names, root)))  # a gap after runs
    except ValueError as exc:
        if args.table:  # the results are this command's input
            raise UsageError(str(exc)) from None
        if not failed:  # a benchmark that ran wrote a result the table cannot read
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if failed:
        print(f"error: benchmark(s) failed: {', '.join(failed)} (their output is above)", file=sys.stderr)
        return 1
    return 0
