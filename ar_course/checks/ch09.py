"""Checks for chapter 09, serving: ``checks.ch09.slot_mapping(slot_mapping)``.

Block addressing (9.1), paged attention (9.2, also on scores large enough to overflow an unshifted exp),
admission (9.3, also into a batch already at its limit), the prefix-block hash (9.4), KIVI-style quantization
(9.5) and the StreamingLLM mask (9.6)."""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from ar_course.checks.core import Case, Chapter, CheckFailure, Mistake, call, compare_cases, describe
from ar_course.checks.reference import ch09 as answers
from ar_course.serving import attention, compression, paged, prefix

chapter = Chapter(9, "Serving")
use = chapter.use
hint = chapter.hint


# --------------------------------------------------------------------------------------------------------
# 9.1 slot mapping


def _slot_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(91)
    for bs, n_blocks in [(4, 6), (3, 5), (16, 3)]:
        table = torch.randperm(20, generator=g)[:n_blocks]
        positions = torch.randint(0, n_blocks * bs, (9,), generator=g)
        yield Case(f"block_size {bs}, {n_blocks} shuffled blocks", (table, positions, bs))
    yield Case("block_size 1", (torch.tensor([7, 2, 9]), torch.tensor([2, 0, 1]), 1))
    yield Case("one block, positions 0..3", (torch.tensor([5]), torch.arange(4), 4))


SLOT_MISTAKES = [
    Mistake(lambda table, pos, bs: table[pos % bs] * bs + pos // bs,
            "block and offset are swapped: the block index is the quotient, the offset the remainder"),
    Mistake(lambda table, pos, bs: table[pos // bs] + pos % bs,
            "that adds the offset to the block id; a block holds block_size slots, so scale the id first"),
    Mistake(lambda table, pos, bs: (pos // bs) * bs + pos % bs,
            "that is the position itself: the slots must go through the block table"),
]


@chapter.exercise("9.1", reference=paged.slot_mapping, hints=(
    "two questions per position: which of the sequence's own blocks holds it, and how far into that block is it? "
    "Then the table says where that block sits in the pool",
    "position p is in the sequence's block p // block_size, at offset p % block_size; look that block up in "
    "block_table (index it with a tensor of block indices), multiply by block_size, add the offset",
    "return block_table[positions // block_size] * block_size + positions % block_size",
))
def slot_mapping(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _slot_cases(), mistakes=SLOT_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 9.2 paged attention


def _paged_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(92)
    for B, H, D, bs, nb, shared in [(3, 2, 4, 4, 10, True), (2, 1, 8, 3, 7, False), (4, 3, 2, 2, 16, True)]:
        k_pool, v_pool = torch.randn(nb, bs, H, D, generator=g), torch.randn(nb, bs, H, D, generator=g)
        tables = torch.stack([torch.randperm(nb, generator=g)[:3] for _ in range(B)])  # (B, 3)
        if shared:
            tables[1, 0] = tables[0, 0]
        lengths = torch.randint(1, 3 * bs + 1, (B,), generator=g)
        lengths[0] = 1
        yield Case(f"B={B}, H={H}, D={D}, block_size {bs}{', shared block' if shared else ''}",
                   (torch.randn(B, H, D, generator=g), k_pool, v_pool, tables, lengths))
    k_pool, v_pool = torch.randn(6, 2, 2, 4, generator=g), torch.randn(6, 2, 2, 4, generator=g)
    tables = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(2)])  # (2, 3)
    yield Case("large scores (|q| ~ 100): B=2, H=2, D=4, block_size 2",
               (100 * torch.randn(2, 2, 4, generator=g), k_pool, v_pool, tables, torch.tensor([5, 3])))


def _paged_no_length_mask(q, k_pool, v_pool, tables, lengths):
    full = torch.full_like(lengths, tables.shape[1] * k_pool.shape[1])
    return attention.paged_attention(q, k_pool, v_pool, tables, full)


def _paged_no_scale(q, k_pool, v_pool, tables, lengths):
    return attention.paged_attention(q * math.sqrt(q.shape[-1]), k_pool, v_pool, tables, lengths)


def _paged_unshifted_exp(q, k_pool, v_pool, tables, lengths):
    k, v = k_pool[tables].flatten(1, 2), v_pool[tables].flatten(1, 2)  # (B, T, H, D)
    scores = torch.einsum("bhd,bthd->bht", q, k) / math.sqrt(q.shape[-1])  # (B, H, T)
    e = scores.exp() * (torch.arange(k.shape[1])[None, :] < lengths[:, None])[:, None, :]
    return torch.einsum("bht,bthd->bhd", e / e.sum(-1, keepdim=True), v)


def _paged_with_mask(q, k_pool, v_pool, tables, valid):
    """Attention of ``q`` over the keys read through ``tables``, at the positions where ``valid`` ``(B, T)`` holds."""
    k, v = k_pool[tables].flatten(1, 2), v_pool[tables].flatten(1, 2)  # (B, T, H, D)
    scores = torch.einsum("bhd,bthd->bht", q, k) / math.sqrt(q.shape[-1])  # (B, H, T)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bht,bthd->bhd", scores.softmax(-1), v)


def _paged_positions(tables, k_pool):
    return torch.arange(tables.shape[1] * k_pool.shape[1])[None, :]  # (1, T)


def _paged_drops_newest(q, k_pool, v_pool, tables, lengths):  # a length-1 sequence attends to nothing: NaN
    return _paged_with_mask(q, k_pool, v_pool, tables, _paged_positions(tables, k_pool) < lengths[:, None] - 1)


def _paged_drops_newest_kept_one(q, k_pool, v_pool, tables, lengths):  # the same, with at least one position
    return _paged_with_mask(q, k_pool, v_pool, tables,
                            _paged_positions(tables, k_pool) < (lengths[:, None] - 1).clamp(min=1))


def _paged_one_past(q, k_pool, v_pool, tables, lengths):
    return _paged_with_mask(q, k_pool, v_pool, tables, _paged_positions(tables, k_pool) <= lengths[:, None])


def _paged_pool_in_order(q, k_pool, v_pool, tables, lengths):  # sequence b's blocks taken as b * max_blocks + j
    in_order = torch.arange(tables.numel()).view_as(tables) % k_pool.shape[0]
    return attention.paged_attention(q, k_pool, v_pool, in_order, lengths)


def _paged_first_blocks(q, k_pool, v_pool, tables, lengths):  # every sequence reads pool blocks 0, 1, 2...
    first = torch.arange(tables.shape[1]).expand_as(tables) % k_pool.shape[0]
    return attention.paged_attention(q, k_pool, v_pool, first, lengths)


_PAGED_NO_TABLE = ("the block table was not used: the keys came from the pool's blocks in storage order, but a "
                   "sequence's blocks can sit anywhere in the pool, and its table says where")
_PAGED_NEWEST = ("the newest key, at position lengths[b] - 1, is masked out: the sequence's keys are at positions "
                 "0 .. lengths[b] - 1, the last one included")

PAGED_MISTAKES = [
    Mistake(_paged_no_length_mask, "the query also attends to the unused end of its last block: mask the positions "
            "at and after lengths[b]"),
    Mistake(_paged_no_scale, "the scores are not divided by sqrt(D)"),
    Mistake(_paged_unshifted_exp, "exp of the raw scores overflows to inf once a score passes about 88 (float32), and "
            "inf / inf is nan: a softmax by hand must not exponentiate scores that large"),
    Mistake(_paged_pool_in_order, _PAGED_NO_TABLE),
    Mistake(_paged_first_blocks, _PAGED_NO_TABLE),
    Mistake(_paged_drops_newest, _PAGED_NEWEST),
    Mistake(_paged_drops_newest_kept_one, _PAGED_NEWEST),
    Mistake(_paged_one_past, "the query also attends to position lengths[b], one past the newest key: that slot is "
            "not written yet, so it holds stale values"),
]


@chapter.exercise("9.2", reference=attention.paged_attention, hints=(
    "gather each sequence's keys and values through its block table, then it is ordinary attention of one query "
    "over the first lengths[b] positions",
    "k_pool[block_tables] is (B, max_blocks, block_size, H, D): flatten blocks and offsets into one position axis; "
    "scores q.k / sqrt(D), -inf at positions >= lengths[b], softmax, weighted sum of the values",
    "k = k_pool[block_tables].flatten(1, 2); v = ...; s = torch.einsum('bhd,bthd->bht', q, k) / "
    "math.sqrt(q.shape[-1]); pad = torch.arange(k.shape[1], device=q.device)[None] >= lengths[:, None]; "
    "s = s.masked_fill(pad[:, None], float('-inf')); return torch.einsum('bht,bthd->bhd', s.softmax(-1), v)",
))
def paged_attention(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _paged_cases(), mistakes=PAGED_MISTAKES, off_cpu=True)


# --------------------------------------------------------------------------------------------------------
# 9.3 admission


def _admit_cases() -> Iterator[Case]:
    yield Case("everything fits", ([2, 3, 1], 40, 0, 8))
    yield Case("the batch is full", ([1, 1, 1], 40, 6, 8))
    yield Case("the second request does not fit, the third would", ([3, 30, 1], 20, 2, 8))
    yield Case("a decode block is kept for every sequence", ([4, 4, 4], 14, 2, 8))
    yield Case("no free blocks", ([1], 0, 0, 4))
    yield Case("empty queue", ([], 10, 1, 4))
    yield Case("exactly fits after the reserve", ([5], 7, 2, 4))
    yield Case("the batch is already at its limit", ([1, 1], 40, 4, 4))


def _admit_skipping(needs, free, running, max_running):
    admitted = 0
    for need in needs:
        if running + admitted < max_running and need <= free - running - admitted:
            free -= need
            admitted += 1
    return admitted


def _admit_no_reserve(needs, free, running, max_running):
    admitted = 0
    for need in needs:
        if running + admitted >= max_running or need > free:
            break
        free -= need
        admitted += 1
    return admitted


def _admit_no_batch_limit(needs, free, running, max_running):
    return answers.admit(needs, free, running, 10 ** 9)


def _admit_limit_after(needs, free, running, max_running):
    admitted = 0
    for need in needs:
        if need > free - running - admitted:
            break
        free -= need
        admitted += 1
        if running + admitted >= max_running:
            break
    return admitted


ADMIT_MISTAKES = [
    Mistake(_admit_skipping, "a later request overtook one that did not fit: admission is first come, first served, "
            "so the first request that does not fit stops it"),
    Mistake(_admit_no_reserve, "no block was kept for the next token of the sequences in the batch: they would be "
            "preempted at their next decode step"),
    Mistake(_admit_no_batch_limit, "more sequences than max_running are in the batch"),
    Mistake(_admit_limit_after, "a request joined a batch that already held max_running sequences: the limit is "
            "tested only after an admission, so the first request of a full batch always gets in"),
]


@chapter.exercise("9.3", reference=answers.admit, hints=(
    "walk the queue in order; stop at the first request the batch or the pool cannot take",
    "a request fits when the batch (running + admitted so far) is below max_running and its need is at most the "
    "free blocks minus one per sequence in the batch; admitting it takes its blocks from the free ones",
    "k = 0; for need in needs: r = num_running + k; if r >= max_running or need > free_blocks - r: break; "
    "free_blocks -= need; k += 1; return k",
))
def admit(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _admit_cases(), mistakes=ADMIT_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 9.4 prefix-block hashes


def _hash_cases() -> Iterator[Case]:
    yield Case("two full blocks and a partial one", ([5, 1, 4, 4, 2, 9, 7], 3))
    yield Case("same second block, different first block", ([6, 1, 4, 4, 2, 9, 7], 3))
    yield Case("exactly two blocks", ([3, 3, 3, 3], 2))
    yield Case("shorter than a block", ([1, 2], 4))
    yield Case("block_size 1", ([8, 8, 8], 1))


def _hash_no_chain(tokens, bs):
    return [hash((0, tuple(tokens[i * bs:(i + 1) * bs]))) for i in range(len(tokens) // bs)]


def _hash_partial_block(tokens, bs):
    out, parent = [], 0
    for i in range(0, len(tokens), bs):
        parent = hash((parent, tuple(tokens[i:i + bs])))
        out.append(parent)
    return out


def _hash_swapped(tokens, bs):
    out, parent = [], 0
    for i in range(len(tokens) // bs):
        parent = hash((tuple(tokens[i * bs:(i + 1) * bs]), parent))
        out.append(parent)
    return out


def _hash_whole_prefix(tokens, bs):
    return [hash(tuple(tokens[:(i + 1) * bs])) for i in range(len(tokens) // bs)]


HASH_MISTAKES = [
    Mistake(_hash_no_chain, "each block is hashed on its own tokens only: two prompts that differ earlier would "
            "share a block whose keys and values differ"),
    Mistake(_hash_partial_block, "the last, partly filled block got a hash: it is still being written, so it "
            "cannot be shared"),
    Mistake(_hash_swapped, "the pair is (block tokens, parent); the spec hashes (parent, block tokens)"),
    Mistake(_hash_whole_prefix, "that hashes the whole prefix up to each block, not the chain: the spec hashes "
            "(parent hash, this block's tokens), which names the same prefix but reads each token once"),
]


@chapter.exercise("9.4", reference=prefix.prefix_block_hashes, hints=(
    "the keys of a block depend on every token before it, so its name must too: chain the hashes",
    "start from parent = 0; for each full block i, parent = hash((parent, tuple(block i's tokens))); skip a "
    "partial last block",
    "parent, hashes = 0, []; for i in range(len(tokens) // block_size): parent = hash((parent, "
    "tuple(tokens[i * block_size:(i + 1) * block_size]))); hashes.append(parent); return hashes",
))
def prefix_block_hashes(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _hash_cases(), mistakes=HASH_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 9.5 quantize


def _quant_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(95)
    yield Case("keys per channel: stats over tokens (dim=2), 4 bits", (torch.randn(2, 3, 16, 8, generator=g), 4, 2))
    yield Case("values per token: stats over channels (dim=3), 8 bits",
               (torch.randn(2, 3, 16, 8, generator=g) * 5, 8, 3))
    yield Case("2 bits, shifted data", (torch.rand(4, 10, generator=g) + 3, 2, 1))
    yield Case("a constant slice", (torch.ones(3, 5), 4, 1))


def _quant_symmetric(x, bits, dim):
    scale = x.abs().amax(dim, keepdim=True).clamp_min(1e-8) / (2 ** (bits - 1) - 1)
    codes = (x / scale).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + 2 ** (bits - 1)
    return codes.to(torch.uint8), scale, -scale * 2 ** (bits - 1)


def _quant_floor(x, bits, dim):
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
    return ((x - lo) / scale).floor().clamp(0, 2 ** bits - 1).to(torch.uint8), scale, lo


def _quant_levels(x, bits, dim):
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / 2 ** bits
    return ((x - lo) / scale).round().clamp(0, 2 ** bits - 1).to(torch.uint8), scale, lo


def _quant_axis(axis):
    """Quantization with its statistics over ``axis`` whatever ``dim`` says."""
    return lambda x, bits, dim: compression.quantize(x, bits, axis)


def _quant_whole_tensor(x, bits, dim):
    lo, hi = x.amin(), x.amax()
    scale = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
    return ((x - lo) / scale).round().clamp(0, 2 ** bits - 1).to(torch.uint8), scale, lo


_QUANT_AXIS = ("the minimum and maximum were taken along another axis than dim: each slice's statistics run along "
               "dim (keys per channel over the tokens, values per token over the channels)")

QUANT_MISTAKES = [
    Mistake(_quant_symmetric, "that is symmetric (absmax) quantization: it wastes levels when a slice is not "
            "centred at 0; use the slice's minimum and maximum"),
    Mistake(_quant_floor, "the codes are truncated, not rounded to the nearest level"),
    Mistake(_quant_levels, "b bits give 2**b levels, hence 2**b - 1 steps between the minimum and the maximum"),
    *(Mistake(_quant_axis(axis), _QUANT_AXIS) for axis in (0, 1, -1)),
    Mistake(_quant_whole_tensor, "the minimum and maximum are of the whole tensor: each slice along dim gets its "
            "own, so one outlier channel does not coarsen every other one"),
]


@chapter.exercise("9.5", reference=compression.quantize, hints=(
    "min-max (asymmetric) quantization: map [min, max] of each slice onto the integers 0 .. 2**bits - 1",
    "lo, hi = amin/amax over dim (keepdim=True); scale = max(hi - lo, 1e-8) / (2**bits - 1); codes = "
    "round((x - lo) / scale) clamped to the range, as uint8",
    "lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True); scale = (hi - lo).clamp_min(1e-8) / "
    "(2 ** bits - 1); return ((x - lo) / scale).round().clamp(0, 2 ** bits - 1).to(torch.uint8), scale, lo",
))
def quantize(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _quant_cases(), mistakes=QUANT_MISTAKES, off_cpu=True)
    case = Case("a constant slice", (torch.ones(3, 5), 4, 1))
    scale = call(fn, *case.args, where=case.name)[1]
    if not bool((scale > 0).all()):
        raise CheckFailure(f"the scale is {describe(float(scale.min()))} on input {case.name!r}, so (x - lo) / scale "
                           "is 0 / 0 = NaN before the cast to uint8, whose result is then undefined: a slice whose "
                           "values are all equal still needs a positive scale")


# --------------------------------------------------------------------------------------------------------
# 9.6 sinks + window


def _mask_cases() -> Iterator[Case]:
    yield Case("T=10, 2 sinks, window 5", (10, 2, 5))
    yield Case("T=12, no sinks, window 4", (12, 0, 4))
    yield Case("T=6, window larger than T", (6, 1, 9))
    yield Case("T=9, 3 sinks, window 4", (9, 3, 4))
    yield Case("T=10 again, 4 sinks, window 5 (one recent token)", (10, 4, 5))  # a mask cached by T alone is stale


def _mask_no_sinks(T, sinks, window):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= i) & (j > i - window)


def _mask_off_by_one(T, sinks, window):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= i) & ((j < sinks) | (j >= i - (window - sinks)))


def _mask_not_causal(T, sinks, window):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j < sinks) | ((j <= i) & (j > i - (window - sinks)))


def _mask_window_after_sinks(T, sinks, window):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= i) & ((j < sinks) | (j > i - window))


def _mask_of_an_earlier_call(T, sinks, window):
    # a mask kept between calls by T alone: the mask of the check's first case of this length, when that case had
    # other sinks or another window (the cases run in order, so that one was computed and kept first)
    first = next(c.args for c in _mask_cases() if c.args[0] == T)
    if first == (T, sinks, window):
        raise ValueError("this is the first call of this length")
    return compression.sink_window_mask(*first)


def _mask_transposed(T, sinks, window):
    return compression.sink_window_mask(T, sinks, window).T


MASK_MISTAKES = [
    Mistake(_mask_no_sinks, "that is a plain sliding window: the first tokens (the attention sinks) fall out of it"),
    Mistake(_mask_off_by_one, "each query keeps one token too many: sinks plus recent tokens must be window in all"),
    Mistake(_mask_window_after_sinks, "the sinks come on top of window recent tokens; the cache holds window "
                                      "entries in all, so the recent part is window - sinks long"),
    Mistake(_mask_not_causal, "early queries see sink tokens from their future: keep the causal rule j <= i"),
    Mistake(_mask_transposed, "the mask is transposed: row i is the query and column j the key it may attend to, "
                              "so each row keeps keys at or before i"),
    Mistake(_mask_of_an_earlier_call, "that is the mask of an earlier call with the same T but other sinks or "
                                      "window: a mask kept between calls must be looked up by all three arguments, "
                                      "not by T alone"),
]


@chapter.exercise("9.6", reference=compression.sink_window_mask, hints=(
    "a cache of window entries: the first sinks tokens forever, plus the most recent window - sinks ones",
    "with i the query and j the key (aranges as a column and a row): causal j <= i, and (j < sinks or j is one of "
    "the last window - sinks positions up to i)",
    "i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]; "
    "return (j <= i) & ((j < sinks) | (j > i - (window - sinks)))",
))
def sink_window_mask(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _mask_cases(), mistakes=MASK_MISTAKES)
