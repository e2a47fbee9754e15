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
        keep = (torch.arange(k.shape[2], device=q.device)[None, :] < lengths[:, None])[:, None, None, :]  # (B,1,1,T)
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=keep)[:, :, 0]

    def newest_masked(q, k_pool, v_pool, tables, lengths):  # `< lengths - 1`: a length-1 row attends to nothing
        k, v = k_pool[tables].flatten(1, 2), v_pool[tables].flatten(1, 2)
        s = torch.einsum("bhd,bthd->bht", q, k) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~(torch.arange(k.shape[1]) < lengths[:, None] - 1)[:, None, :], float("-inf"))
        return torch.einsum("bht,bthd->bhd", s.softmax(-1), v)

    def one_past(q, k_pool, v_pool, tables, lengths):  # `<= lengths`: one unwritten slot too many
        k, v = k_pool[tables].flatten(1, 2), v_pool[tables].flatten(1, 2)
        s = torch.einsum("bhd,bthd->bht", q, k) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~(torch.arange(k.shape[1]) <= lengths[:, None])[:, None, :], float("-inf"))
        return torch.einsum("bht,bthd->bhd", s.softmax(-1), v)

    def first_blocks(q, k_pool, v_pool, tables, lengths):  # every sequence reads pool blocks 0, 1, 2
        k = k_pool[:tables.shape[1]].flatten(0, 1).expand(q.shape[0], -1, -1, -1)
        v = v_pool[:tables.shape[1]].flatten(0, 1).expand(q.shape[0], -1, -1, -1)
        s = torch.einsum("bhd,bthd->bht", q, k) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~(torch.arange(k.shape[1]) < lengths[:, None])[:, None, :], float("-inf"))
        return torch.einsum("bht,bthd->bhd", s.softmax(-1), v)

    _check(ch09.paged_attention, attention.paged_attention, [no_mask, table_ignored, off_by_one_length],
           [(no_mask, "unused end"), (softmax_by_hand, "overflows"), (table_ignored, "block table was not used"),
            (first_blocks, "block table was not used"), (off_by_one_length, "newest key"),
            (newest_masked, "newest key"), (one_past, "one past the newest key")])
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
           [(unchained, "hashed on its own tokens"), (with_partial, "partly filled"),
            (hash_of_everything, "whole prefix up to each block")])


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

    def last_axis(x, bits, dim):  # dim ignored: the statistics always over the last axis
        return compression.quantize(x, bits, dim=-1)

    def whole_tensor(x, bits, dim):  # one minimum and maximum for everything
        lo, hi = x.min(), x.max()
        scale = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
        return ((x - lo) / scale).round().clamp(0, 2 ** bits - 1).to(torch.uint8), scale, lo

    _check(ch09.quantize, compression.quantize, [absmax, truncating, wrong_axis, zero_scale, zero_scale_nan_free],
           [(absmax, "symmetric"), (truncating, "rounded"), (zero_scale, "positive scale"),
            (zero_scale_nan_free, "positive scale"), (wrong_axis, "another axis than dim"),
            (last_axis, "another axis than dim"), (whole_tensor, "of the whole tensor")])


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

    def transposed(T, sinks, window):  # mask[j, i]: keys as rows, queries as columns
        i, j = torch.arange(T)[None, :], torch.arange(T)[:, None]
        return (j <= i) & ((j < sinks) | (j > i - (window - sinks)))

    _check(ch09.sink_window_mask, compression.sink_window_mask,
           [plain_window, one_too_many, window_after_sinks, float_mask, transposed],
           [(plain_window, "sinks"), (one_too_many, "one token too many"), (window_after_sinks, "window - sinks long"),
            (transposed, "the mask is transposed")])


# right answers written in other styles than the reference: each must pass ------------------------------------


def slots_by_loop(table, pos, bs):  # one position at a time, stacked
    return torch.stack([table[p // bs] * bs + p % bs for p in pos])


def slots_by_gather(table, pos, bs):
    return table.gather(0, torch.div(pos, bs, rounding_mode="floor")) * bs + torch.remainder(pos, bs)


def slots_by_lists(table, pos, bs):  # plain Python ints, back to a tensor
    blocks = table.tolist()
    return torch.tensor([blocks[p // bs] * bs + p % bs for p in pos.tolist()])


def slots_of_every_position(table, pos, bs):  # the slots of all the sequence's positions, then indexed
    return (table[:, None] * bs + torch.arange(bs)).flatten()[pos]


def test_9_1_other_styles():
    for right in (slots_by_loop, slots_by_gather, slots_by_lists, slots_of_every_position):
        assert_passes(ch09.slot_mapping, right)


def paged_by_sequence(q, k_pool, v_pool, tables, lengths):  # a loop over the batch, only the first lengths[b] keys
    B, H, D = q.shape
    out = []
    for b in range(B):
        n = int(lengths[b])
        k, v = k_pool[tables[b]].reshape(-1, H, D)[:n], v_pool[tables[b]].reshape(-1, H, D)[:n]  # (n, H, D)
        w = torch.softmax((k * q[b]).sum(-1) / math.sqrt(D), dim=0)  # (n, H)
        out.append((w[..., None] * v).sum(0))
    return torch.stack(out)


def paged_by_matmul(q, k_pool, v_pool, tables, lengths):  # max-subtracted softmax by hand, torch.where mask
    k = k_pool[tables].flatten(1, 2).permute(0, 2, 1, 3)  # (B, H, T, D)
    v = v_pool[tables].flatten(1, 2).permute(0, 2, 1, 3)
    s = (k @ q[..., None]).squeeze(-1) / q.shape[-1] ** 0.5  # (B, H, T)
    s = torch.where(torch.arange(s.shape[-1], device=s.device) < lengths[:, None, None], s, torch.tensor(float("-inf")))
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return ((e / e.sum(-1, keepdim=True))[..., None, :] @ v).squeeze(-2)


def paged_in_float64(q, k_pool, v_pool, tables, lengths):
    return attention.paged_attention(q.double(), k_pool.double(), v_pool.double(), tables, lengths).float()


def paged_large_negative_mask(q, k_pool, v_pool, tables, lengths):  # -1e9 for the padding instead of -inf
    k, v = k_pool[tables].flatten(1, 2), v_pool[tables].flatten(1, 2)
    s = torch.einsum("bhd,bthd->bht", q, k) * q.shape[-1] ** -0.5
    s = s.masked_fill((torch.arange(k.shape[1], device=s.device) >= lengths[:, None])[:, None], -1e9)
    return torch.einsum("bht,bthd->bhd", s.softmax(-1), v)


def test_9_2_other_styles():
    for right in (paged_by_sequence, paged_by_matmul, paged_in_float64, paged_large_negative_mask):
        assert_passes(ch09.paged_attention, right)


def admit_while(needs, free, running, max_running):
    k = 0
    while k < len(needs) and running + k < max_running and needs[k] <= free - running - k:
        free, k = free - needs[k], k + 1
    return k


def admit_by_cumsum(needs, free, running, max_running):  # vectorised: the longest prefix that fits
    if not needs:
        return 0
    k = torch.arange(len(needs))
    fits = (running + k < max_running) & (torch.cumsum(torch.tensor(needs), 0) <= free - running - k)
    return int(torch.cumprod(fits.int(), 0).sum())


def admit_recursive(needs, free, running, max_running):
    if not needs or running >= max_running or needs[0] > free - running:
        return 0
    return 1 + admit_recursive(needs[1:], free - needs[0], running + 1, max_running)


def test_9_3_other_styles():
    for right in (admit_while, admit_by_cumsum, admit_recursive):
        assert_passes(ch09.admit, right)


def hashes_by_accumulate(tokens, bs):
    import itertools

    blocks = [tuple(tokens[i:i + bs]) for i in range(0, len(tokens) - bs + 1, bs)]
    return list(itertools.accumulate(blocks, lambda parent, block: hash((parent, block)), initial=0))[1:]


def hashes_by_zip(tokens, bs):  # zip(*[iter] * bs) yields the full blocks only
    out, parent, it = [], 0, iter(tokens)
    for block in zip(*[it] * bs):
        parent = hash((parent, block))
        out.append(parent)
    return out


def hashes_from_a_tensor(tokens, bs):
    n = len(tokens) // bs
    out, parent = [], 0
    for row in torch.tensor(tokens, dtype=torch.long)[:n * bs].view(n, bs):
        parent = hash((parent, tuple(row.tolist())))
        out.append(parent)
    return out


def test_9_4_other_styles():
    for right in (hashes_by_accumulate, hashes_by_zip, hashes_from_a_tensor):
        assert_passes(ch09.prefix_block_hashes, right)


def quantize_min_max(x, bits, dim):  # min/max values, clamp(min=), .byte(), floor(v + 0.5) and no clamp of codes
    lo, hi = x.min(dim, keepdim=True).values, x.max(dim, keepdim=True).values
    scale = torch.clamp(hi - lo, min=1e-8) / (2 ** bits - 1)
    return torch.floor((x - lo) / scale + 0.5).byte(), scale, lo


def quantize_aminmax_times_levels(x, bits, dim):  # multiply by the number of steps, divide by the range
    lo, hi = torch.aminmax(x, dim=dim, keepdim=True)
    span, steps = torch.maximum(hi - lo, torch.tensor(1e-8)), 2 ** bits - 1
    return ((x - lo) * steps / span).round().clamp(0, steps).to(torch.uint8), span / steps, lo


def quantize_in_float64(x, bits, dim):
    codes, scale, lo = compression.quantize(x.double(), bits, dim)
    return codes, scale.to(x.dtype), lo.to(x.dtype)


def quantize_dim_moved_last(x, bits, dim):
    codes, scale, lo = compression.quantize(x.movedim(dim, -1), bits, -1)
    return codes.movedim(-1, dim), scale.movedim(-1, dim), lo.movedim(-1, dim)


def test_9_5_other_styles():
    for right in (quantize_min_max, quantize_aminmax_times_levels, quantize_in_float64, quantize_dim_moved_last):
        assert_passes(ch09.quantize, right)


def mask_by_lists(T, sinks, window):
    return torch.tensor([[j <= i and (j < sinks or j > i - (window - sinks)) for j in range(T)] for i in range(T)])


def mask_by_tril(T, sinks, window):
    ones = torch.ones(T, T, dtype=torch.bool)
    causal = torch.tril(ones)
    sink_columns = causal.clone()
    sink_columns[:, sinks:] = False
    return (causal & ~torch.tril(ones, -(window - sinks))) | sink_columns


def mask_by_rows(T, sinks, window):
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        m[i, max(0, i - (window - sinks) + 1):i + 1] = True
        m[i, :min(sinks, i + 1)] = True
    return m


_MASKS_BY_T: dict = {}


def mask_cached_by_length(T, sinks, window):  # wrong: a module-level cache keyed by T alone
    if T not in _MASKS_BY_T:
        _MASKS_BY_T[T] = compression.sink_window_mask(T, sinks, window)
    return _MASKS_BY_T[T]


def test_9_6_other_styles():
    for right in (mask_by_lists, mask_by_tril, mask_by_rows):
        assert_passes(ch09.sink_window_mask, right)
    _MASKS_BY_T.clear()
    message = assert_fails(ch09.sink_window_mask, mask_cached_by_length, contains="not by T alone")
    assert "T=10 again" in message


def test_9_2_mask_made_on_the_cpu_is_caught():
    def mask_on_cpu(q, k_pool, v_pool, tables, lengths):  # right values on the CPU; fails with tensors on a GPU
        k, v = k_pool[tables].flatten(1, 2), v_pool[tables].flatten(1, 2)  # (B, T, H, D)
        s = torch.einsum("bhd,bthd->bht", q, k) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~(torch.arange(k.shape[1]) < lengths[:, None])[:, None, :], float("-inf"))
        return torch.einsum("bht,bthd->bhd", s.softmax(-1), v)

    assert_fails(ch09.paged_attention, mask_on_cpu, contains="mixed devices")
