"""Synthetic request traces and running them through an :class:`~ar_course.serving.Engine`.

:func:`make_trace` draws a seeded trace: Poisson arrivals, lognormal prompt and output lengths, prompts cut
from a text (optionally after a shared system prompt). :func:`replay` feeds it to an engine as the arrivals
come (on the engine's clock) and :func:`summarize` turns what happened into serving metrics: throughput,
time to first token (TTFT), time per output token (TPOT), and the KV memory in use and wasted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ar_course.serving.engine import Engine
from ar_course.utils import check_bool, check_int, check_number, check_seed


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives (seconds from the start), its prompt and how many tokens it wants."""

    arrival: float
    prompt: list[int]
    max_new_tokens: int


def make_trace(text_ids: torch.Tensor, n: int, *, seed: int = 0, rate: float = 20.0, prompt_median: int = 48,
               output_median: int = 48, sigma: float = 0.8, max_len: int = 384,
               shared_prefix: list[int] | None = None) -> list[TraceRequest]:
    """``n`` requests: exponential gaps of mean ``1 / rate`` seconds (Poisson arrivals), prompt and output
    lengths lognormal around the medians (log-std ``sigma``), clipped so that prompt + output fit in
    ``max_len``; prompts are random slices of ``text_ids`` ``(N,)``, after ``shared_prefix`` when given.

    Raises:
        TypeError: ``text_ids`` not a tensor, or a count or number of the wrong type.
        ValueError: ``text_ids`` not 1-D, ``n < 0``, ``rate <= 0``, medians ``< 1``, ``sigma < 0`` or not finite,
            ``max_len < 2``, ``seed`` outside ``[-2**63, 2**64 - 1]``, or a text too short for a prompt that was
            drawn."""
    if not isinstance(text_ids, torch.Tensor):
        raise TypeError(f"text_ids must be a 1-D tensor of token ids, got {type(text_ids).__name__}")
    if text_ids.ndim != 1:
        raise ValueError(f"text_ids must be 1-D (N,), got shape {tuple(text_ids.shape)}")
    n, seed = check_int("n", n, lo=0), check_seed(seed)
    rate = check_number("rate", rate, lo=0, lo_open=True)
    check_int("prompt_median", prompt_median, lo=1), check_int("output_median", output_median, lo=1)
    check_number("sigma", sigma, lo=0), check_int("max_len", max_len, lo=2)
    g = torch.Generator().manual_seed(seed)
    prefix = list(shared_prefix or [])
    out, t = [], 0.0
    for _ in range(n):
        t += float(torch.empty((), dtype=torch.float32).exponential_(rate, generator=g))
        p, o = (torch.randn(2, generator=g, dtype=torch.float32) * sigma).exp().tolist()
        n_out = max(1, min(int(round(output_median * o)), max_len // 2))
        n_prompt = max(1, min(int(round(prompt_median * p)), max_len - n_out - len(prefix)))
        if len(text_ids) <= n_prompt:
            raise ValueError(f"text_ids has {len(text_ids)} tokens, too few to cut a prompt of {n_prompt} from: pass a "
                             f"longer text or a smaller prompt_median / max_len")
        start = int(torch.randint(0, len(text_ids) - n_prompt, (1,), generator=g))
        out.append(TraceRequest(t, prefix + text_ids[start:start + n_prompt].tolist(), n_out))
    return out


def replay(engine: Engine, trace: list[TraceRequest], *, realtime: bool = True) -> dict[int, TraceRequest]:
    """Run ``trace`` through ``engine``: each request is added once the engine's clock passes its arrival
    (``realtime=False``: all at once, at the start). Returns ``{request id: trace request}``.

    Raises:
        TypeError: ``engine`` is not an :class:`Engine`, ``trace`` not a list of :class:`TraceRequest` (what
            :func:`make_trace` returns), or ``realtime`` not a bool.
    """
    if not isinstance(engine, Engine):
        raise TypeError(f"engine must be an Engine, got {type(engine).__name__}")
    if not isinstance(trace, (list, tuple)) or not all(isinstance(r, TraceRequest) for r in trace):
        if isinstance(trace, (list, tuple)):
            stray = next(r for r in trace if not isinstance(r, TraceRequest))
            found = f"a {type(trace).__name__} holding {type(stray).__name__}"
        else:
            found = type(trace).__name__
        raise TypeError(f"trace must be a list of TraceRequest (make_trace makes one), got {found}")
    realtime = check_bool("realtime", realtime)
    pending = sorted(trace, key=lambda r: r.arrival) if realtime else list(trace)
    start, ids, i = engine.clock(), {}, 0
    while i < len(pending) or engine.has_work:
        now = engine.clock() - start
        while i < len(pending) and (not realtime or pending[i].arrival <= now):
            rid = engine.add_request(pending[i].prompt, pending[i].max_new_tokens)
            engine.requests[rid].arrival = start + pending[i].arrival if realtime else start
            ids[rid] = pending[i]
            i += 1
        if engine.has_work:
            engine.step()
        elif i < len(pending):
            time.sleep(max(0.0, min(pending[i].arrival - now, 0.05)))
    return ids


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p99": math.nan}
    v = torch.tensor(values, dtype=torch.float64)
    return {"p50": float(v.quantile(0.5)), "p99": float(v.quantile(0.99))}


def summarize(engine: Engine, contiguous_len: int | None = None) -> dict:
    """Serving metrics of everything ``engine`` has run (``replay`` first): output tokens per second over the
    makespan, TTFT and TPOT (p50/p99, seconds), prefill tokens computed, preemptions, and the KV memory per
    step: positions stored (per sequence), positions reserved (paged: whole blocks; contiguous: ``contiguous_len``
    per running sequence, default the model's ``block_size``), and the fraction of the reserved memory wasted.

    Paged waste is the slots of the blocks in use that hold no position (:attr:`StepRecord.slots_empty`), over
    all their slots, and per sequence in blocks: a block that several sequences share (prefix caching) counts
    once, as one block of positions, so the waste is never negative. Contiguous waste gives each sequence its own
    copy of a shared prefix: 1 - positions stored / reserved.
    ``ValueError`` when no request has finished with output tokens yet."""
    reqs = [r for r in engine.requests.values() if r.status == "finished" and r.output]
    if not reqs:
        raise ValueError("summarize needs at least one finished request with output tokens: replay a trace first")
    first = min(r.arrival for r in reqs)
    last = max(r.token_times[-1] for r in reqs)
    tokens = sum(len(r.output) for r in reqs)
    ttft = [r.token_times[0] - r.arrival for r in reqs]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.output) - 1) for r in reqs if len(r.output) > 1]
    bs = engine.config.block_size
    contiguous_len = contiguous_len or engine.model.config.block_size
    stored = [h.tokens_stored for h in engine.history]
    paged = sum(h.blocks_used for h in engine.history) * bs
    empty = sum(h.slots_empty for h in engine.history)
    contiguous = sum(len(h.running) for h in engine.history) * contiguous_len
    return {
        "requests": len(reqs), "output_tokens": tokens, "seconds": last - first,
        "tokens_per_second": tokens / (last - first), "steps": len(engine.history),
        "ttft_s": _percentiles(ttft), "tpot_s": _percentiles(tpot),
        "prefill_tokens_computed": engine.prefill_computed, "preemptions": engine.preemptions,
        "mean_running": sum(len(h.running) for h in engine.history) / max(len(engine.history), 1),
        "kv_positions_stored_mean": sum(stored) / max(len(stored), 1),
        "paged_waste_fraction": empty / max(paged, 1),
        "contiguous_waste_fraction": 1 - sum(stored) / max(contiguous, 1),
        "paged_waste_blocks_per_sequence": empty / bs / max(sum(len(h.running) for h in engine.history), 1),
    }
