"""Chapter 09 checks: each accepts the reference, reports a stub as not attempted, and rejects plausible wrong
answers (block and offset swapped, attention over a block's unused end, admission that overtakes or keeps no
decode block, unchained block hashes, absmax or truncating quantization, a window without sinks...)."""

import math

import torch

from ar_course.checks import ch09
from ar_course.checks.reference import ch09 as answers
from ar_course.serving import attention, compression, paged, prefix
from checks_helpers import assert_fails, assert_not_attempted, assert_passes, stub


def _check(check, reference, wrongs, named):
    assert_passes(check, reference)
    assert_not_attempted(check, stub)
    for wrong in wrongs:
        assert_fails(check, wrong)
    for wrong, says in named:
        assert_fails(check, wrong, contains=says)


def test_9_1():
    def offset_first(table, pos, bs):
        return table[pos % bs] * bs + pos // bs

    def no_table(table, pos, bs):
        return pos

    def unscaled(table, pos, bs):
        return table[pos // bs] + pos % bs

    _check(ch09.slot_mapping, paged.slot_mapping, [offset_first, no_table, unscaled],
           [(offset_first, "swapped"), (no_table, "through the block table"), (unscaled, "scale the id")])


def test_9_2():
    def no_mask(q, k_pool, v_pool, tables, lengths):
        k = k_pool[tables].flatten(1, 2)
        v = v_pool[tables].flatten(1, 2)
        s = torch.einsum("bhd,bthd->bht", q, k) / math.sqrt(q.shape[-1])
        return torch.einsum("bht,bthd->bhd", s.softmax(-1), v)

    def table_ignored(q, k_pool, v_pool, tables, lengths):
        order = torch.arange(tables.numel()).view_as(tables) % k_pool.shape[0]
        return attention.paged_attention(q, k_pool, v_pool, order, lengths)

    def off_by_one_length(q, k_pool, v_pool, tables, lengths):
        return attention.paged_attention(q, k_pool, v_pool, tables, (lengths - 1).clamp(min=1))

    def softmax_by_hand(q, k_pool, v_pool, tables, lengths):  # exp of the raw scores, no shift by the maximum
        k, v = k_pool[tables].flatten(1, 2), v_pool[tables].flatten(1, 2)
        s = torch.einsum("bhd,bthd->bht", q, k) / math.sqrt(q.shape[-1])
        e = s.exp() * (torch.arange(k.shape[1])[None, :] < lengths[:, None])[:, None, :]
        return torch.einsum("bht,bthd->bhd", e / e.sum(-1, keepdim=True), v)

    def sdpa(q, k_pool, v_pool, tables, lengths):  # right: the library's attention with a boolean mask
        k, v = k_pool[tables].flatten(1, 2).transpose(1, 2), v_pool[tables].flatten(1, 2).transpose(1, 2)
        keep = (torch.arange(k.shape[2])[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=keep)[:, :, 0]

    _check(ch09.paged_attention, attention.paged_attention, [no_mask, table_ignored, off_by_one_length],
           [(no_mask, "unused end"), (softmax_by_hand, "overflows")])
    assert_passes(ch09.paged_attention, sdpa)


def test_9_3():
    def fill_everything(needs, free, running, max_running):
        return len(needs)

    def skipping(needs, free, running, max_running):
        k = 0
        for need in needs:
            if running + k < max_running and need <= free - running - k:
                free, k = free - need, k + 1
        return k

    def no_reserve(needs, free, running, max_running):
        k = 0
        for need in needs:
            if running + k >= max_running or need > free:
                break
            free, k = free - need, k + 1
        return k

    def limit_after(needs, free, running, max_running):  # the batch limit tested only after an admission
        k = 0
        for need in needs:
            if need > free - running - k:
                break
            free, k = free - need, k + 1
            if running + k >= max_running:
                break
        return k

    _check(ch09.admit, answers.admit, [fill_everything, skipping, no_reserve],
           [(skipping, "first come, first served"), (no_reserve, "next token"),
            (limit_after, "already held max_running")])


def test_9_4():
    def unchained(tokens, bs):
        return [hash((0, tuple(tokens[i * bs:(i + 1) * bs]))) for i in range(len(tokens) // bs)]

    def with_partial(tokens, bs):
        out, parent = [], 0
        for i in range(0, len(tokens), bs):
            parent = hash((parent, tuple(tokens[i:i + bs])))
            out.append(parent)
        return out

    def hash_of_everything(tokens, bs):
        return [hash(tuple(tokens[:(i + 1) * bs])) for i in range(len(tokens) // bs)]

    _check(ch09.prefix_block_hashes, prefix.prefix_block_hashes, [unchained, with_partial, hash_of_everything],
           [(unchained, "hashed on its own tokens"), (with_partial, "partly filled")])


def test_9_5():
    def absmax(x, bits, dim):
        scale = x.abs().amax(dim, keepdim=True).clamp_min(1e-8) / (2 ** (bits - 1) - 1)
        codes = (x / scale).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + 2 ** (bits - 1)
        return codes.to(torch.uint8), scale, -scale * 2 ** (bits - 1)

    def truncating(x, bits, dim):
        lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
        scale = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
        return ((x - lo) / scale).floor().clamp(0, 2 ** bits - 1).to(torch.uint8), scale, lo

    def wrong_axis(x, bits, dim):
        return compression.quantize(x, bits, dim=0)

    def zero_scale(x, bits, dim):  # no floor on hi - lo: a constant slice gets scale 0 and codes from 0 / 0
        lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
        scale = (hi - lo) / (2 ** bits - 1)
        return ((x - lo) / scale).round().clamp(0, 2 ** bits - 1).to(torch.uint8), scale, lo

    def zero_scale_nan_free(x, bits, dim):  # the same scale 0, with the 0 / 0 codes replaced by 0
        codes, _, lo = compression.quantize(x, bits, dim)
        return codes, (x.amax(dim, keepdim=True) - lo) / (2 ** bits - 1), lo

    _check(ch09.quantize, compression.quantize, [absmax, truncating, wrong_axis, zero_scale, zero_scale_nan_free],
           [(absmax, "symmetric"), (truncating, "rounded"), (zero_scale, "positive scale"),
            (zero_scale_nan_free, "positive scale")])


def test_9_6():
    def plain_window(T, sinks, window):
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        return (j <= i) & (j > i - window)

    def one_too_many(T, sinks, window):
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        return (j <= i) & ((j < sinks) | (j >= i - (window - sinks)))

    def window_after_sinks(T, sinks, window):
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        return (j <= i) & ((j < sinks) | (j > i - window))

    def float_mask(T, sinks, window):
        return compression.sink_window_mask(T, sinks, window).float()

    _check(ch09.sink_window_mask, compression.sink_window_mask,
           [plain_window, one_too_many, window_after_sinks, float_mask],
           [(plain_window, "sinks"), (one_too_many, "one token too many"), (window_after_sinks, "window - sinks long")])
