"""Every chapter 02 check accepts the reference, reports a stub as not attempted, and rejects plausible
wrong implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ar_course import sampling
from ar_course.checks import ch02
from ar_course.checks.reference import ch02 as answers
from ar_course.transformer import functional as ref
from checks_helpers import assert_fails, assert_not_attempted, assert_passes, stub

# --------------------------------------------------------------------------------------------------------
# wrong implementations a learner might plausibly write


def softmax_no_max_subtraction(scores, mask):
    e = torch.exp(scores.masked_fill(~mask, float("-inf")))
    return e / e.sum(-1, keepdim=True).clamp_min(1e-30)


def softmax_overflowing(scores, mask):
    e = torch.exp(scores.masked_fill(~mask, float("-inf")))
    return e / e.sum(-1, keepdim=True)


def softmax_fill_zero(scores, mask):
    s = scores.masked_fill(~mask, 0.0)
    return torch.softmax(s, -1)


def softmax_nan_on_empty_rows(scores, mask):
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)


def softmax_max_over_all_entries(scores, mask):  # the masked entries take part in the row maximum
    e = torch.exp(scores - scores.amax(-1, keepdim=True)) * mask
    return e / e.sum(-1, keepdim=True).clamp_min(1e-30)


def softmax_mask_after_exp(scores, mask):  # shifted by the kept maximum, masked by multiplying after exp
    m = scores.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    e = torch.exp(scores - m) * mask
    return e / e.sum(-1, keepdim=True).clamp_min(1e-30)


def softmax_mask_after_exp_guarded(scores, mask):  # as above, dividing a row sum that is not > 0 by 1
    m = scores.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    e = torch.exp(scores - m) * mask
    t = e.sum(-1, keepdim=True)
    return e / torch.where(t > 0, t, torch.ones_like(t))


def softmax_in_place(scores, mask):  # right values, but writes -inf into the caller's scores
    scores.masked_fill_(~mask, float("-inf"))
    return ref.masked_softmax(scores, mask)


def mask_strict(t_q, t_k):
    return torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q - 1)


def mask_top_left(t_q, t_k):
    return torch.ones(t_q, t_k, dtype=torch.bool).tril()


def mask_inverted(t_q, t_k):  # True for "blocked", as nn.MultiheadAttention's attn_mask
    return ~torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q)


def mask_float(t_q, t_k):
    return torch.ones(t_q, t_k).tril(t_k - t_q)


def attention_no_scale(q, k, v, mask=None):
    return ref.masked_softmax(q @ k.transpose(-2, -1), mask) @ v


def attention_scale_by_d(q, k, v, mask=None):
    return ref.masked_softmax(q @ k.transpose(-2, -1) / q.shape[-1], mask) @ v


def attention_softmax_over_queries(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-2).nan_to_num() @ v


def attention_ignores_mask(q, k, v, mask=None):
    return ref.scaled_dot_product_attention(q, k, v)


def attention_unshifted_exp(q, k, v, mask=None):  # a softmax written out without subtracting the row maximum
    e = torch.exp(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]))
    if mask is not None:
        e = e.masked_fill(~mask, 0.0)
    return e / e.sum(-1, keepdim=True) @ v


def _mha(x, attn, positions, *, cut="heads", causal=True, rope_v=False, rope=True, proj=True, merge=True):
    """Multi-head self-attention as a learner might write it, with one slip chosen by the flags."""
    B, T, C = x.shape
    H = attn.n_head
    q, k, v = attn.qkv(x).split(C, dim=-1)
    if cut == "heads":
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
    elif cut == "reshape":
        q, k, v = (t.reshape(B, H, T, C // H) for t in (q, k, v))
    elif cut == "interleaved":
        q, k, v = (t.view(B, T, C // H, H).permute(0, 3, 1, 2) for t in (q, k, v))
    else:  # one head of C channels
        q, k, v = q[:, None], k[:, None], v[:, None]
    if rope:
        q, k = answers.rotary_embedding(q, positions), answers.rotary_embedding(k, positions)
    if rope_v:
        v = answers.rotary_embedding(v, positions)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
    y = torch.softmax(scores, -1) @ v  # (B, H, T, D)
    if cut == "reshape":
        y = y.reshape(B, T, C)
    elif cut == "interleaved":
        y = y.permute(0, 2, 3, 1).reshape(B, T, C)
    elif cut == "one":
        y = y[:, 0]
    else:
        y = y.transpose(1, 2).reshape(B, T, C) if merge else y.reshape(B, T, C)
    return attn.proj(y) if proj else y


def mha_one_head(x, attn, positions):
    return _mha(x, attn, positions, cut="one")


def mha_reshape_heads(x, attn, positions):
    return _mha(x, attn, positions, cut="reshape")


def mha_interleaved_heads(x, attn, positions):
    return _mha(x, attn, positions, cut="interleaved")


def mha_merge_no_transpose(x, attn, positions):
    return _mha(x, attn, positions, merge=False)


def mha_no_causal_mask(x, attn, positions):
    return _mha(x, attn, positions, causal=False)


def mha_no_rope(x, attn, positions):
    return _mha(x, attn, positions, rope=False)


def mha_rotates_values(x, attn, positions):
    return _mha(x, attn, positions, rope_v=True)


def mha_no_projection(x, attn, positions):
    return _mha(x, attn, positions, proj=False)


def mha_correct(x, attn, positions):
    return _mha(x, attn, positions)


def mha_positions_ignored(x, attn, positions):  # rotates at 0..T-1 whatever positions says
    return _mha(x, attn, torch.arange(x.shape[1]))


def layer_norm_instead(x, weight, eps=1e-6):
    return (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * weight


def rms_eps_outside(x, weight, eps=1e-6):
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight


def softmax_over_queries(scores, mask):  # each column normalised, not each row
    s = scores.masked_fill(~mask, float("-inf"))
    m = s.amax(-2, keepdim=True)
    e = (s - torch.where(torch.isfinite(m), m, 0.0)).exp()
    t = e.sum(-2, keepdim=True)
    return e / torch.where(t > 0, t, 1.0)


def rms_no_sqrt(x, weight, eps=1e-6):  # the mean square, not its root
    return x / (x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rms_no_weight(x, weight, eps=1e-6):
    return ref.rms_norm(x, None, eps)


def rms_half_precision_statistics(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rms_stays_float32(x, weight, eps=1e-6):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rms_weight_data(x, weight, eps=1e-6):  # the gain taken outside autograd: it never receives a gradient
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight.data


def _rope(x, positions, base, exponent_scale=2.0, sign=1.0, interleaved=False):
    D = x.shape[-1]
    i = torch.arange(D // 2, dtype=torch.float64, device=positions.device)
    ang = positions.double()[:, None] * base ** (-exponent_scale * i / D)
    cos, sin = ang.cos().float(), (sign * ang.sin()).float()
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def rope_interleaved(x, positions, base=10000.0):
    return _rope(x, positions, base, interleaved=True)


def rope_wrong_frequencies(x, positions, base=10000.0):
    return _rope(x, positions, base, exponent_scale=1.0)


def rope_wrong_direction(x, positions, base=10000.0):
    return _rope(x, positions, base, sign=-1.0)


def rope_arange_positions(x, positions, base=10000.0):  # the positions argument ignored: 0..T-1 instead
    return _rope(x, torch.arange(x.shape[-2]), base).to(x.dtype)


def rope_float32_tables(x, positions, base=10000.0):  # right values, but a float16 x comes back float32
    return _rope(x, positions, base)


def rope_in_place(x, positions, base=10000.0):  # writes the rotated halves back into x
    out = _rope(x, positions, base)
    x.copy_(out)
    return x


def rope_four_axes_only(x, positions, base=10000.0):  # unpacks (B, H, T, D): fails on other ranks
    B, H, T, D = x.shape
    return _rope(x, positions, base).to(x.dtype)


def _norm(x, norm):
    return ref.rms_norm(x, norm.weight, norm.eps)


def block_post_norm(x, block, positions):
    h = _norm(x + mha_correct(x, block.attn, positions), block.norm1)
    return _norm(h + block.mlp(h), block.norm2)


def block_missing_attention_residual(x, block, positions):
    h = mha_correct(_norm(x, block.norm1), block.attn, positions)
    return h + block.mlp(_norm(h, block.norm2))


def block_missing_mlp_residual(x, block, positions):
    h = x + mha_correct(_norm(x, block.norm1), block.attn, positions)
    return block.mlp(_norm(h, block.norm2))


def block_parallel(x, block, positions):
    return x + mha_correct(_norm(x, block.norm1), block.attn, positions) + block.mlp(_norm(x, block.norm2))


def block_reuses_norm1(x, block, positions):
    h = x + mha_correct(_norm(x, block.norm1), block.attn, positions)
    return h + block.mlp(_norm(h, block.norm1))


def block_no_causal_mask(x, block, positions):
    h = x + mha_no_causal_mask(_norm(x, block.norm1), block.attn, positions)
    return h + block.mlp(_norm(h, block.norm2))


def block_default_eps(x, block, positions):  # rms_norm called without the norms' eps
    h = x + mha_correct(ref.rms_norm(x, block.norm1.weight), block.attn, positions)
    return h + block.mlp(ref.rms_norm(h, block.norm2.weight))


def block_positions_ignored(x, block, positions):
    h = x + mha_positions_ignored(_norm(x, block.norm1), block.attn, positions)
    return h + block.mlp(_norm(h, block.norm2))


def _gpt(model, idx, *, final_norm=True, softmax=False, reverse=False, scale=False, chain=True):
    positions = torch.arange(idx.shape[1], device=idx.device)
    emb = model.wte(idx) * (math.sqrt(model.config.n_embd) if scale else 1.0)
    x = emb
    for block in (reversed(model.blocks) if reverse else model.blocks):
        x = answers.transformer_block(x if chain else emb, block, positions)
    logits = model.lm_head(_norm(x, model.norm_f) if final_norm else x)
    return torch.softmax(logits, -1) if softmax else logits


def gpt_no_final_norm(model, idx):
    return _gpt(model, idx, final_norm=False)


def gpt_returns_probabilities(model, idx):
    return _gpt(model, idx, softmax=True)


def gpt_blocks_reversed(model, idx):
    return _gpt(model, idx, reverse=True)


def gpt_scaled_embeddings(model, idx):
    return _gpt(model, idx, scale=True)


def gpt_blocks_not_chained(model, idx):
    return _gpt(model, idx, chain=False)


def gpt_head_is_embedding(model, idx):  # right only when the head is tied to the embedding
    x = model.wte(idx)
    for block in model.blocks:
        x = answers.transformer_block(x, block, torch.arange(idx.shape[1], device=idx.device))
    return _norm(x, model.norm_f) @ model.wte.weight.T


def gpt_correct(model, idx):
    return _gpt(model, idx)


def gpt_final_norm_default_eps(model, idx):  # rms_norm called without model.norm_f.eps
    x = model.wte(idx)
    for block in model.blocks:
        x = answers.transformer_block(x, block, torch.arange(idx.shape[1], device=idx.device))
    return model.lm_head(ref.rms_norm(x, model.norm_f.weight))


def _step(model, optimizer, chunk, forward, max_norm=1.0, *, zero=True, shift=True, clip=True, step=True,
          zero_late=False, total=False):
    if zero:
        optimizer.zero_grad()
    logits = forward(model, chunk[:, :-1])
    targets = chunk[:, 1:] if shift else chunk[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="sum" if total else "mean")
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if zero_late:
        optimizer.zero_grad()
    if step:
        optimizer.step()
    return loss.item()


def step_no_zero_grad(model, optimizer, chunk, forward, max_norm=1.0):
    return _step(model, optimizer, chunk, forward, max_norm, zero=False)


def step_unshifted_targets(model, optimizer, chunk, forward, max_norm=1.0):
    return _step(model, optimizer, chunk, forward, max_norm, shift=False)


def step_no_clipping(model, optimizer, chunk, forward, max_norm=1.0):
    return _step(model, optimizer, chunk, forward, max_norm, clip=False)


def step_zero_grad_before_step(model, optimizer, chunk, forward, max_norm=1.0):
    return _step(model, optimizer, chunk, forward, max_norm, zero_late=True)


def step_forgets_optimizer_step(model, optimizer, chunk, forward, max_norm=1.0):
    return _step(model, optimizer, chunk, forward, max_norm, step=False)


def step_summed_loss(model, optimizer, chunk, forward, max_norm=1.0):
    return _step(model, optimizer, chunk, forward, max_norm, total=True)


def step_returns_tensor(model, optimizer, chunk, forward, max_norm=1.0):  # forgets .item(): the graph stays alive
    optimizer.zero_grad()
    loss = F.cross_entropy(forward(model, chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    return loss


def cache_whole_buffer(q, k_new, v_new, k_cache, v_cache, pos):
    T = q.shape[-2]
    k_cache[:, :, pos : pos + T] = k_new
    v_cache[:, :, pos : pos + T] = v_new
    return ref.scaled_dot_product_attention(q, k_cache, v_cache)  # the empty slots get attention too


def cache_excludes_current(q, k_new, v_new, k_cache, v_cache, pos):
    T = q.shape[-2]
    k_cache[:, :, pos : pos + T] = k_new
    v_cache[:, :, pos : pos + T] = v_new
    mask = ref.causal_mask(T, pos + T).tril(pos - 1)
    return ref.scaled_dot_product_attention(q, k_cache[:, :, : pos + T], v_cache[:, :, : pos + T], mask)


def cache_not_written(q, k_new, v_new, k_cache, v_cache, pos):
    k = torch.cat([k_cache[:, :, :pos], k_new], dim=2)
    v = torch.cat([v_cache[:, :, :pos], v_new], dim=2)
    T = q.shape[-2]
    return ref.scaled_dot_product_attention(q, k, v, ref.causal_mask(T, pos + T))


def cache_no_causal_within_chunk(q, k_new, v_new, k_cache, v_cache, pos):
    T = q.shape[-2]
    k_cache[:, :, pos : pos + T] = k_new
    v_cache[:, :, pos : pos + T] = v_new
    return ref.scaled_dot_product_attention(q, k_cache[:, :, : pos + T], v_cache[:, :, : pos + T])


def cache_scales_q_in_place(q, k_new, v_new, k_cache, v_cache, pos):  # right output, but q is scaled in place
    T = q.shape[-2]
    k_cache[:, :, pos : pos + T] = k_new
    v_cache[:, :, pos : pos + T] = v_new
    q.mul_(q.shape[-1] ** -0.5)
    scores = q @ k_cache[:, :, : pos + T].transpose(-2, -1)
    return ref.masked_softmax(scores, ref.causal_mask(T, pos + T)) @ v_cache[:, :, : pos + T]


def top_k_off_by_one(logits, k):
    kth = torch.topk(logits, max(k - 1, 1), dim=-1).values[..., -1:] if k > 1 else logits.amax(-1, keepdim=True) + 1
    return logits.masked_fill(logits < kth, float("-inf"))


def top_k_drops_kth(logits, k):  # "<=" where "<" belongs: the k-th largest logit itself is removed
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits <= kth, float("-inf"))


def top_k_by_indices(logits, k):
    k = min(k, logits.shape[-1])
    idx = torch.topk(logits, k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_k_zero_fill(logits, k):
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, 0.0)


def top_k_in_place(logits, k):  # right output, but the caller's logits are overwritten
    out = sampling.top_k_filter(logits, k)
    logits[out == float("-inf")] = float("-inf")
    return logits


def top_p_in_place(logits, p):
    out = sampling.top_p_filter(logits, p)
    logits[out == float("-inf")] = float("-inf")
    return logits


def top_p_rows_of_a_matrix(logits, p):  # works along dim 1, right only for (B, V) logits
    if p >= 1:
        return logits
    probs = torch.softmax(logits, 1)
    sp, _ = probs.sort(1, descending=True)
    least = torch.where((sp.cumsum(1) - sp) < p, sp, torch.ones_like(sp)).amin(1, keepdim=True)
    return logits.masked_fill(probs < least, float("-inf"))


def top_p_drops_crossing_token(logits, p):
    probs = torch.softmax(logits, -1)
    sp, si = torch.sort(probs, -1, descending=True)
    keep_sorted = torch.cumsum(sp, -1) < p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, si, keep_sorted)
    return logits.masked_fill(~keep, float("-inf")) if p < 1 else logits


def top_p_on_logits(logits, p):
    sl, si = torch.sort(logits, -1, descending=True)
    keep_sorted = (torch.cumsum(sl, -1) - sl) < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, si, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_ignores_ties(logits, p):
    if p >= 1:
        return logits
    probs = torch.softmax(logits, -1)
    sp, si = torch.sort(probs, -1, descending=True)
    keep_sorted = (torch.cumsum(sp, -1) - sp) < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, si, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


# --------------------------------------------------------------------------------------------------------

CASES = {
    "masked_softmax": (ref.masked_softmax, [softmax_no_max_subtraction, softmax_fill_zero, softmax_nan_on_empty_rows,
                                            softmax_max_over_all_entries, softmax_in_place]),
    "causal_mask": (ref.causal_mask, [mask_strict, mask_top_left, mask_float, mask_inverted]),
    "attention": (ref.scaled_dot_product_attention,
                  [attention_no_scale, attention_scale_by_d, attention_softmax_over_queries, attention_ignores_mask,
                   attention_unshifted_exp]),
    "rotary_embedding": (answers.rotary_embedding, [rope_interleaved, rope_wrong_frequencies, rope_wrong_direction,
                                                    rope_float32_tables, rope_in_place, rope_four_axes_only]),
    "self_attention": (answers.self_attention,
                       [mha_one_head, mha_reshape_heads, mha_interleaved_heads, mha_merge_no_transpose,
                        mha_no_causal_mask, mha_no_rope, mha_rotates_values, mha_no_projection, mha_positions_ignored]),
    "rms_norm": (ref.rms_norm, [layer_norm_instead, rms_eps_outside, rms_no_weight, rms_half_precision_statistics,
                                rms_stays_float32, rms_weight_data]),
    "transformer_block": (answers.transformer_block,
                          [block_post_norm, block_missing_attention_residual, block_missing_mlp_residual,
                           block_parallel, block_reuses_norm1, block_no_causal_mask, block_default_eps,
                           block_positions_ignored]),
    "gpt_forward": (answers.gpt_forward, [gpt_no_final_norm, gpt_returns_probabilities, gpt_blocks_reversed,
                                          gpt_scaled_embeddings, gpt_blocks_not_chained, gpt_head_is_embedding,
                                          gpt_final_norm_default_eps]),
    "train_step": (answers.train_step, [step_no_zero_grad, step_unshifted_targets, step_no_clipping,
                                        step_zero_grad_before_step, step_forgets_optimizer_step, step_summed_loss,
                                        step_returns_tensor]),
    "cached_attention": (answers.cached_attention,
                         [cache_whole_buffer, cache_excludes_current, cache_not_written, cache_no_causal_within_chunk,
                          cache_scales_q_in_place]),
    "top_k_filter": (sampling.top_k_filter, [top_k_off_by_one, top_k_by_indices, top_k_zero_fill, top_k_in_place]),
    "top_p_filter": (sampling.top_p_filter, [top_p_drops_crossing_token, top_p_on_logits, top_p_ignores_ties,
                                             top_p_in_place, top_p_rows_of_a_matrix]),
}

MUTANTS = [(name, m) for name, (_, ms) in CASES.items() for m in ms]


def test_chapter_has_twelve_exercises_numbered_in_order():
    assert set(CASES) == set(ch02.chapter.exercises)
    assert [ex.number for ex in ch02.chapter.exercises.values()] == [f"2.{i}" for i in range(1, 13)]


@pytest.mark.parametrize("name", list(CASES))
def test_reference_passes(name, capsys):
    check = getattr(ch02, name)
    assert_passes(check, CASES[name][0])
    assert capsys.readouterr().out.strip().endswith("passed")


@pytest.mark.parametrize("name", list(CASES))
def test_stub_is_not_attempted(name, capsys):
    assert_not_attempted(getattr(ch02, name), stub)
    assert "not attempted" in capsys.readouterr().out


@pytest.mark.parametrize("name, mutant", MUTANTS, ids=[f"{n}-{m.__name__}" for n, m in MUTANTS])
def test_wrong_implementation_fails(name, mutant):
    msg = assert_fails(getattr(ch02, name), mutant)
    assert "Hint:" in msg


DIAGNOSES = [
    ("masked_softmax", softmax_overflowing, "exp overflowed"),
    ("masked_softmax", softmax_no_max_subtraction, "exp overflowed"),
    ("masked_softmax", softmax_nan_on_empty_rows, "fully masked row came out NaN"),
    ("masked_softmax", softmax_fill_zero, "set to 0 before the softmax"),
    ("masked_softmax", softmax_max_over_all_entries, "row maximum included the masked entries"),
    ("masked_softmax", softmax_mask_after_exp, "the mask was applied after exp, by multiplying"),
    ("masked_softmax", softmax_mask_after_exp_guarded, "the mask was applied after exp, by multiplying"),
    ("masked_softmax", softmax_over_queries, "that normalises each column (over axis -2, the queries)"),
    ("causal_mask", mask_strict, "off by one"),
    ("causal_mask", mask_top_left, "LAST t_q positions"),
    ("causal_mask", mask_inverted, "the mask is inverted"),
    ("attention", attention_softmax_over_queries, "softmax over the queries"),
    ("attention", attention_no_scale, "without the scale"),
    ("attention", attention_scale_by_d, "the scale is 1/D"),
    ("attention", attention_ignores_mask, "the mask is not applied"),
    ("attention", attention_unshifted_exp, "subtract each row's maximum"),
    ("self_attention", mha_one_head, "single head"),
    ("self_attention", mha_reshape_heads, "straight to (B, H, T, D)"),
    ("self_attention", mha_interleaved_heads, "h + H"),
    ("self_attention", mha_merge_no_transpose, "straight to (B, T, C)"),
    ("self_attention", mha_no_causal_mask, "no causal mask"),
    ("self_attention", mha_no_rope, "were not rotated"),
    ("self_attention", mha_rotates_values, "values were rotated"),
    ("self_attention", mha_no_projection, "projection"),
    ("self_attention", mha_positions_ignored, "not at the positions passed in"),
    ("rms_norm", layer_norm_instead, "that is LayerNorm"),
    ("rms_norm", rms_eps_outside, "outside the square root"),
    ("rms_norm", rms_no_weight, "weight is not applied"),
    ("rms_norm", rms_no_sqrt, "divides by the mean of squares"),
    ("rms_norm", rms_half_precision_statistics, "overflows to inf"),
    ("rms_norm", rms_stays_float32, "stayed in float32"),
    ("rms_norm", rms_weight_data, "outside autograd"),
    ("rotary_embedding", rope_interleaved, "(2i, 2i+1)"),
    ("rotary_embedding", rope_wrong_frequencies, "base**(-i/D)"),
    ("rotary_embedding", rope_wrong_direction, "wrong way"),
    ("rotary_embedding", rope_arange_positions, "positions 0..T-1, not by the positions it is given"),
    ("transformer_block", block_post_norm, "post-norm"),
    ("transformer_block", block_missing_attention_residual, "attention output replaces the residual stream"),
    ("transformer_block", block_missing_mlp_residual, "MLP's output replaces the residual stream"),
    ("transformer_block", block_parallel, "parallel block"),
    ("transformer_block", block_reuses_norm1, "its own norm"),
    ("transformer_block", block_no_causal_mask, "no causal mask"),
    ("transformer_block", block_default_eps, "default eps"),
    ("transformer_block", block_positions_ignored, "not at the positions passed in"),
    ("gpt_forward", gpt_no_final_norm, "last normalisation"),
    ("gpt_forward", gpt_returns_probabilities, "probabilities"),
    ("gpt_forward", gpt_blocks_reversed, "reverse order"),
    ("gpt_forward", gpt_scaled_embeddings, "sqrt(C)"),
    ("gpt_forward", gpt_blocks_not_chained, "every block read the embeddings"),
    ("gpt_forward", gpt_final_norm_default_eps, "model.norm_f.eps"),
    ("gpt_forward", gpt_head_is_embedding, "computed with the token embedding"),
    ("train_step", step_no_zero_grad, "never cleared"),
    ("train_step", step_unshifted_targets, "not shifted"),
    ("train_step", step_no_clipping, "not clipped"),
    ("train_step", step_zero_grad_before_step, "never changed"),
    ("train_step", step_forgets_optimizer_step, "never changed"),
    ("train_step", step_summed_loss, "summed"),
    ("cached_attention", cache_whole_buffer, "whole cache buffer"),
    ("cached_attention", cache_excludes_current, "cannot see their own positions"),
    ("cached_attention", cache_no_causal_within_chunk, "both directions"),
    ("cached_attention", cache_not_written, "not written into the caches"),
    ("top_k_filter", top_k_by_indices, "tied with the k-th largest"),
    ("top_k_filter", top_k_zero_fill, "needs -inf"),
    ("top_k_filter", top_k_off_by_one, "only k - 1 tokens were kept"),
    ("top_k_filter", top_k_drops_kth, "only k - 1 tokens were kept"),
    ("top_p_filter", top_p_drops_crossing_token, "one token too few"),
    ("top_p_filter", top_p_on_logits, "accumulates logits"),
    ("top_p_filter", top_p_ignores_ties, "tied with the least likely kept"),
    ("top_p_filter", top_p_rows_of_a_matrix, "worked along axis 1"),
]


@pytest.mark.parametrize("name, mutant, diagnosis", DIAGNOSES, ids=[f"{n}-{m.__name__}" for n, m, _ in DIAGNOSES])
def test_common_mistakes_get_their_own_diagnosis(name, mutant, diagnosis):
    msg = assert_fails(getattr(ch02, name), mutant, contains=diagnosis)
    others = [d for n, _, d in DIAGNOSES if n == name and d != diagnosis]
    assert not any(d.lower() in msg.lower() for d in others), msg  # one diagnosis, the right one


def test_attention_mistakes_that_differ_everywhere_are_told_apart():
    """The issue's example: softmax over the wrong axis and a wrong scale both differ at every position."""
    msgs = [assert_fails(ch02.attention, m) for m in (attention_softmax_over_queries, attention_no_scale)]
    assert all("differs at 240 of 240 positions" in m for m in msgs)
    assert msgs[0].split("; ")[1] != msgs[1].split("; ")[1]


def test_cache_check_names_the_unwritten_cache():
    assert_fails(ch02.cached_attention, cache_not_written, contains="k_cache after the call")


@pytest.mark.parametrize("name, mutant, says", [
    ("masked_softmax", softmax_in_place, "changed its argument `scores` in place"),
    ("rotary_embedding", rope_in_place, "changed its argument `x` in place"),
    ("rotary_embedding", rope_float32_tables, "dtype torch.float32, expected torch.float16"),
    ("rotary_embedding", rope_four_axes_only, "no batch or head axes"),
    ("train_step", step_returns_tensor, "return a Python float"),
    ("cached_attention", cache_scales_q_in_place, "changed its argument `q` in place"),
    ("top_k_filter", top_k_in_place, "changed its argument `logits` in place"),
    ("top_p_filter", top_p_in_place, "changed its argument `logits` in place"),
    ("top_p_filter", top_p_rows_of_a_matrix, "batched (2, 3, 15)"),
    ("gpt_forward", lambda model, idx: model(idx)[0], "calls model(idx), the library's forward pass"),
], ids=lambda v: getattr(v, "__name__", None))
def test_wrong_answers_that_only_some_inputs_reveal(name, mutant, says):
    """In-place writes into an argument, a dtype lost on half inputs, a rank or batch axis assumed, a tensor where a
    float is due: each names what went wrong."""
    assert_fails(getattr(ch02, name), mutant, contains=says)


@pytest.mark.parametrize("name, fn", [
    ("masked_softmax", lambda scores, mask: torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num()),
    ("attention", lambda q, k, v, mask=None: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
    ("rotary_embedding", lambda x, positions, base=10000.0: _rope(x, positions, base).to(x.dtype)),
    ("top_p_filter", lambda logits, p: top_p_rows_of_a_matrix(logits.flatten(0, -2), p).view_as(logits)),
], ids=["softmax-nan_to_num", "attention-torch-sdpa", "rope-float32-then-cast", "top_p-flattened-rows"])
def test_other_correct_answers_pass(name, fn):
    assert_passes(getattr(ch02, name), fn)


def test_use_falls_back_to_reference_until_passed(capsys):
    def top_k_filter(logits, k):
        return top_k_by_indices(logits, k)

    assert ch02.use(top_k_filter) is sampling.top_k_filter
    assert_fails(ch02.top_k_filter, top_k_filter, contains="ties")
    assert ch02.use(top_k_filter) is sampling.top_k_filter

    def attention(q, k, v, mask=None):
        return ref.scaled_dot_product_attention(q, k, v, mask)

    assert_passes(ch02.attention, attention)
    assert ch02.use(attention) is attention


def test_dependency_references_agree_with_the_library():
    """The references of the assembled model are the package's modules: a GPT run through the functional parts
    (the learner's path) gives the module's logits."""
    torch.manual_seed(0)
    model, idx = next(ch02._gpt_cases()).args
    with torch.no_grad():
        assert torch.allclose(gpt_correct(model, idx), model(idx)[0], atol=1e-5)


def _library_forward(model, idx, *, causal=True, wiring="pre"):
    """A fast forward on the package's modules with one wiring change, for the training threshold."""
    from ar_course.transformer import functional as tf
    from ar_course.transformer.model import sdpa_attention, use_attention

    rope = tf.rope_angles(torch.arange(idx.shape[1]), model.config.head_dim)
    x = model.wte(idx)
    attend = lambda q, k, v, mask, is_causal, p: sdpa_attention(q, k, v, mask, causal, p)  # noqa: E731
    with use_attention(attend):
        for b in model.blocks:
            if wiring == "post":
                h = b.norm1(x + b.attn(x, rope))
                x = b.norm2(h + b.mlp(h))
            elif wiring == "no attention residual":
                h = b.attn(b.norm1(x), rope)
                x = h + b.mlp(b.norm2(h))
            else:
                h = x + b.attn(b.norm1(x), rope)
                x = h + b.mlp(b.norm2(h))
    return model.lm_head(model.norm_f(x))


@pytest.mark.parametrize("what, step, kwargs", [
    ("the reference", answers.train_step, {}),
    ("no causal mask", answers.train_step, {"causal": False}),
    ("post-norm blocks", answers.train_step, {"wiring": "post"}),
    ("a block missing its attention residual", answers.train_step, {"wiring": "no attention residual"}),
    ("un-shifted targets", step_unshifted_targets, {}),
    ("no optimizer step", step_forgets_optimizer_step, {}),
])
def test_training_threshold_tells_a_working_model_from_a_broken_one(what, step, kwargs):
    """The loss the training check requires is reached by the reference and missed by a model wired wrongly
    (its weights are measured with the package's causal pre-norm GPT) or trained on the wrong targets."""
    loss = ch02.train_briefly(step, lambda m, idx: _library_forward(m, idx, **kwargs))
    if what == "the reference":
        assert loss < ch02.TRAIN_LOSS_TARGET / 3, loss
    else:
        assert loss > ch02.TRAIN_LOSS_TARGET, (what, loss)


def test_training_check_states_the_target_loss(monkeypatch):
    monkeypatch.setattr(ch02, "train_briefly", lambda fn, forward: 0.9)
    msg = assert_fails(ch02.train_step, answers.train_step, contains=f"not below {ch02.TRAIN_LOSS_TARGET}")
    assert "Hint:" in msg


def test_training_check_trains_the_learners_passed_forward(monkeypatch):
    seen = []

    def gpt_forward(model, idx):  # assembled from the parts, as the exercise asks
        seen.append(idx.shape)
        x, positions = model.wte(idx), torch.arange(idx.shape[1], device=idx.device)
        for block in model.blocks:
            x = answers.transformer_block(x, block, positions)
        return model.lm_head(ref.rms_norm(x, model.norm_f.weight, model.norm_f.eps))

    monkeypatch.setattr(ch02.chapter, "_passed", {})
    assert_passes(ch02.gpt_forward, gpt_forward)
    seen.clear()
    assert_passes(ch02.train_step, answers.train_step)
    assert len(seen) >= 2 * 3 + ch02.TRAIN_STEPS


# third audit: more correct answers in other styles, and wrong answers of new kinds ------------------------


def softmax_big_negative_then_mask(scores, mask):
    s = scores.masked_fill(~mask, -1e9)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True) * mask


def softmax_logsumexp(scores, mask):
    s = torch.where(mask, scores, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    return torch.where(mask, torch.exp(s - lse.nan_to_num(neginf=0.0)), torch.zeros_like(s))


def softmax_row_loop(scores, mask):
    mask = mask.expand_as(scores)
    rows = []
    for s, m in zip(scores.reshape(-1, scores.shape[-1]), mask.reshape(-1, scores.shape[-1])):
        e = torch.zeros_like(s)
        if m.any():
            e[m] = torch.exp(s[m] - s[m].max())
            e = e / e.sum()
        rows.append(e)
    return torch.stack(rows).view(scores.shape)


def causal_by_complement(t_q, t_k):
    return ~torch.ones(t_q, t_k, dtype=torch.bool).triu(t_k - t_q + 1)


def causal_last_rows_of_square(t_q, t_k):
    return torch.ones(t_k, t_k, dtype=torch.bool).tril()[-t_q:]


def causal_python_lists(t_q, t_k):
    return torch.tensor([[j <= t_k - t_q + i for j in range(t_k)] for i in range(t_q)])


def attention_einsum(q, k, v, mask=None):
    s = torch.einsum("...qd,...kd->...qk", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(mask.logical_not(), float("-inf"))
    return torch.einsum("...qk,...kd->...qd", s.softmax(-1), v)


def attention_float64(q, k, v, mask=None):
    s = (q.double() @ k.double().mT) / math.sqrt(q.size(-1))
    if mask is not None:
        s = torch.where(mask, s, float("-inf"))
    return (s.softmax(-1) @ v.double()).to(q.dtype)


def attention_queries_scaled_first(q, k, v, mask=None):
    s = (q / math.sqrt(q.shape[-1])) @ k.transpose(-1, -2)
    return ref.masked_softmax(s, torch.ones_like(s, dtype=torch.bool) if mask is None else mask) @ v


def rope_upcast_rotate_half(x, positions, base=10000.0):
    D, xf = x.shape[-1], x.float()
    theta = base ** (-torch.arange(D // 2, dtype=torch.float32, device=x.device) * 2 / D)
    a = torch.outer(positions.float(), theta).repeat(1, 2)  # (T, D)
    rotated = torch.cat([-xf[..., D // 2:], xf[..., :D // 2]], -1)
    return (xf * a.cos() + rotated * a.sin()).to(x.dtype)


def rope_complex(x, positions, base=10000.0):
    D, xf = x.shape[-1], x.float()
    theta = base ** (-2 * torch.arange(D // 2, dtype=torch.float64, device=x.device) / D)
    turn = torch.polar(torch.ones_like(positions, dtype=torch.float64)[:, None].expand(-1, D // 2),
                       positions.double()[:, None] * theta)  # (T, D/2) complex
    z = torch.complex(xf[..., :D // 2], xf[..., D // 2:]) * turn.to(torch.complex64)
    return torch.cat([z.real, z.imag], -1).to(x.dtype)


def rope_stack_then_flatten(x, positions, base=10000.0):
    D = x.size(-1)
    a = positions[:, None].double() * torch.pow(base, -torch.arange(0, D, 2, dtype=torch.float64,
                                                                     device=positions.device) / D)
    c, s = torch.cos(a).to(x.dtype), torch.sin(a).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-2).flatten(-2)


def rope_cpu_frequencies(x, positions, base=10000.0):  # right on the CPU; the frequencies stay there on a GPU
    D = x.shape[-1]
    theta = 1.0 / base ** (torch.arange(0, D, 2).float() / D)
    a = positions.float()[:, None] * theta
    c, s = a.cos().to(x.dtype), a.sin().to(x.dtype)
    return torch.cat([x[..., :D // 2] * c - x[..., D // 2:] * s, x[..., :D // 2] * s + x[..., D // 2:] * c], -1)


def rope_float16_angles(x, positions, base=10000.0):  # angles computed in x's dtype: too coarse in float16
    D = x.shape[-1]
    a = positions.to(x.dtype)[:, None] * base ** (-torch.arange(0, D, 2, dtype=x.dtype, device=x.device) / D)
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * a.cos() - x2 * a.sin(), x1 * a.sin() + x2 * a.cos()], -1)


def mha_head_by_head(x, attn, positions):
    B, T, C = x.shape
    D = C // attn.n_head
    q, k, v = attn.qkv(x).chunk(3, -1)
    outs = []
    for h in range(attn.n_head):
        cut = slice(h * D, (h + 1) * D)
        qh, kh = answers.rotary_embedding(q[..., cut], positions), answers.rotary_embedding(k[..., cut], positions)
        outs.append(F.scaled_dot_product_attention(qh, kh, v[..., cut], is_causal=True))
    return attn.proj(torch.cat(outs, -1))


def mha_one_permute(x, attn, positions):
    B, T, C = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, T, 3, attn.n_head, C // attn.n_head)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
    q, k = answers.rotary_embedding(q, positions), answers.rotary_embedding(k, positions)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.proj(y.permute(0, 2, 1, 3).flatten(2))


def mha_cpu_mask(x, attn, positions):  # right on the CPU; the causal mask stays there on a GPU
    B, T, C = x.shape
    q, k, v = (ref.split_heads(t, attn.n_head) for t in attn.qkv(x).split(C, -1))
    q, k = answers.rotary_embedding(q, positions), answers.rotary_embedding(k, positions)
    return attn.proj(ref.merge_heads(ref.scaled_dot_product_attention(q, k, v, ref.causal_mask(T))))


def rms_linalg_norm(x, weight, eps=1e-6):
    xf = x.float()
    mean_square = torch.linalg.vector_norm(xf, dim=-1, keepdim=True) ** 2 / x.shape[-1]
    return (xf / (mean_square + eps).sqrt()).type_as(x) * weight


def rms_gain_in_float32(x, weight, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rms_float64(x, weight, eps=1e-6):
    xd = x.double()
    return (xd / (xd.pow(2).mean(-1, keepdim=True) + eps).sqrt()).to(x.dtype) * weight


def block_with_the_modules_norms(x, block, positions):
    h = x + answers.self_attention(block.norm1(x), block.attn, positions)
    return h + block.mlp(block.norm2(h))


def block_step_by_step(x, block, positions):
    x = x + answers.self_attention(ref.rms_norm(x, block.norm1.weight, block.norm1.eps), block.attn, positions)
    return x + block.mlp(ref.rms_norm(x, block.norm2.weight, eps=block.norm2.eps))


def gpt_functional_embedding(model, idx):
    x, positions = F.embedding(idx, model.wte.weight), torch.arange(idx.size(1), device=idx.device)
    for block in model.blocks:
        x = answers.transformer_block(x, block, positions)
    return model.lm_head(model.norm_f(x))


def gpt_linear_head(model, idx):
    positions = torch.arange(idx.shape[-1], device=idx.device)
    x = model.wte(idx)
    blocks = list(model.blocks)
    for i in range(len(blocks)):
        x = answers.transformer_block(x, blocks[i], positions)
    return F.linear(ref.rms_norm(x, model.norm_f.weight, model.norm_f.eps), model.lm_head.weight,
                    model.lm_head.bias)


def gpt_cpu_positions(model, idx):  # right on the CPU; the positions stay there on a GPU
    x, positions = model.wte(idx), torch.arange(idx.shape[1])
    for block in model.blocks:
        x = answers.transformer_block(x, block, positions)
    return model.lm_head(model.norm_f(x))


def step_classes_second(model, optimizer, chunk, forward, max_norm=1.0):
    model.zero_grad()
    loss = F.cross_entropy(forward(model, chunk[:, :-1]).transpose(1, 2), chunk[:, 1:])  # (B, V, T) form
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm)
    optimizer.step()
    return float(loss.detach())


def step_log_softmax_gather(model, optimizer, chunk, forward, max_norm=1.0):
    optimizer.zero_grad()
    log_probs = forward(model, chunk[:, :-1]).log_softmax(-1)
    loss = -log_probs.gather(-1, chunk[:, 1:, None]).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    optimizer.step()
    return loss.item()


def step_clears_after_stepping(model, optimizer, chunk, forward, max_norm=1.0):
    logits = forward(model, chunk[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def step_clips_by_hand(model, optimizer, chunk, forward, max_norm=1.0):
    optimizer.zero_grad()
    loss = F.cross_entropy(forward(model, chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.sqrt(sum((g ** 2).sum() for g in grads))
    for g in grads:
        g.mul_(min(1.0, max_norm / (float(total) + 1e-6)))
    optimizer.step()
    return loss.item()


def step_clips_each_parameter(model, optimizer, chunk, forward, max_norm=1.0):  # per tensor, not the total norm
    optimizer.zero_grad()
    loss = F.cross_entropy(forward(model, chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten())
    loss.backward()
    for p in model.parameters():
        torch.nn.utils.clip_grad_norm_(p, max_norm)
    optimizer.step()
    return loss.item()


def cache_cat_then_write(q, k_new, v_new, k_cache, v_cache, pos):
    T = q.shape[2]
    k, v = torch.cat([k_cache[:, :, :pos], k_new], 2), torch.cat([v_cache[:, :, :pos], v_new], 2)
    k_cache[:, :, pos:pos + T].copy_(k_new)
    v_cache[:, :, pos:pos + T].copy_(v_new)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ref.causal_mask(T, pos + T, device=q.device))


def cache_whole_buffer_masked(q, k_new, v_new, k_cache, v_cache, pos):
    T = q.shape[-2]
    new = torch.arange(pos, pos + T, device=q.device)
    k_cache.index_copy_(2, new, k_new)
    v_cache.index_copy_(2, new, v_new)
    mask = torch.arange(k_cache.shape[2], device=q.device)[None, :] <= new[:, None]  # empty slots masked out
    return ref.scaled_dot_product_attention(q, k_cache, v_cache, mask)


def cache_narrow(q, k_new, v_new, k_cache, v_cache, pos):
    T = q.size(-2)
    k_cache.narrow(2, pos, T).copy_(k_new)
    v_cache.narrow(2, pos, T).copy_(v_new)
    k, v = k_cache.narrow(2, 0, pos + T), v_cache.narrow(2, 0, pos + T)
    return ref.scaled_dot_product_attention(q, k, v, ref.causal_mask(T, pos + T).to(q.device))


def cache_cpu_mask(q, k_new, v_new, k_cache, v_cache, pos):  # right on the CPU; the mask stays there on a GPU
    T = q.shape[-2]
    k_cache[:, :, pos:pos + T] = k_new
    v_cache[:, :, pos:pos + T] = v_new
    return ref.scaled_dot_product_attention(q, k_cache[:, :, :pos + T], v_cache[:, :, :pos + T],
                                            ref.causal_mask(T, pos + T))


def top_k_sorted(logits, k):
    kth = logits.sort(-1, descending=True).values[..., min(k, logits.shape[-1]) - 1, None]
    return torch.where(logits >= kth, logits, torch.full_like(logits, float("-inf")))


def top_k_kthvalue(logits, k):
    V = logits.shape[-1]
    if k >= V:
        return logits.clone()
    kth = torch.kthvalue(logits, V - k + 1, dim=-1, keepdim=True).values
    return logits.masked_fill(logits < kth, float("-inf"))


def top_k_python_rows(logits, k):
    rows = []
    for row in logits.reshape(-1, logits.shape[-1]):
        kth = sorted(row.tolist(), reverse=True)[min(k, row.numel()) - 1]
        rows.append(row.masked_fill(row < kth, float("-inf")))
    return torch.stack(rows).view_as(logits)


def top_p_shift_right(logits, p):
    """The usual shifted-cumsum form: remove a token once the mass up to the token before it exceeds p."""
    probs = logits.softmax(-1)
    sp = probs.sort(-1, descending=True).values
    remove = sp.cumsum(-1) > p
    remove = torch.cat([torch.zeros_like(remove[..., :1]), remove[..., :-1]], -1)
    return logits.masked_fill(probs < sp.masked_fill(remove, 2.0).amin(-1, keepdim=True), float("-inf"))


def top_p_sorted_logits(logits, p):
    sl = logits.sort(-1, descending=True).values
    sp = sl.softmax(-1)
    least = sl.masked_fill(sp.cumsum(-1) - sp >= p, float("inf")).amin(-1, keepdim=True)
    return logits.masked_fill(logits < least, float("-inf"))


def top_p_float64(logits, p):
    probs = logits.double().softmax(-1)
    sp = probs.sort(-1, descending=True).values
    least = torch.where(sp.cumsum(-1) - sp < p, sp, 1.0).amin(-1, keepdim=True)
    return logits.masked_fill(probs < least, float("-inf"))


@pytest.mark.parametrize("name, fn", [
    ("masked_softmax", softmax_big_negative_then_mask), ("masked_softmax", softmax_logsumexp),
    ("masked_softmax", softmax_row_loop),
    ("causal_mask", causal_by_complement), ("causal_mask", causal_last_rows_of_square),
    ("causal_mask", causal_python_lists),
    ("attention", attention_einsum), ("attention", attention_float64), ("attention", attention_queries_scaled_first),
    ("rotary_embedding", rope_upcast_rotate_half), ("rotary_embedding", rope_complex),
    ("rotary_embedding", rope_stack_then_flatten),
    ("self_attention", mha_head_by_head), ("self_attention", mha_one_permute),
    ("rms_norm", rms_linalg_norm), ("rms_norm", rms_gain_in_float32), ("rms_norm", rms_float64),
    ("transformer_block", block_with_the_modules_norms), ("transformer_block", block_step_by_step),
    ("gpt_forward", gpt_functional_embedding), ("gpt_forward", gpt_linear_head),
    ("train_step", step_classes_second), ("train_step", step_log_softmax_gather),
    ("train_step", step_clears_after_stepping), ("train_step", step_clips_by_hand),
    ("cached_attention", cache_cat_then_write), ("cached_attention", cache_whole_buffer_masked),
    ("cached_attention", cache_narrow),
    ("top_k_filter", top_k_sorted), ("top_k_filter", top_k_kthvalue), ("top_k_filter", top_k_python_rows),
    ("top_p_filter", top_p_shift_right), ("top_p_filter", top_p_sorted_logits), ("top_p_filter", top_p_float64),
], ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_correct_answers_in_other_styles_pass(name, fn):
    assert_passes(getattr(ch02, name), fn)


@pytest.mark.parametrize("name, wrong, contains", [
    ("rotary_embedding", rope_cpu_frequencies, "mixed devices"),
    ("rotary_embedding", rope_float16_angles, "angles were computed in x's dtype, float16"),
    ("self_attention", mha_cpu_mask, "mixed devices"),
    ("gpt_forward", gpt_cpu_positions, "mixed devices"),
    ("cached_attention", cache_cpu_mask, "mixed devices"),
    ("train_step", step_clips_each_parameter, "each parameter's gradient was clipped"),
], ids=["rope-cpu-frequencies", "rope-float16-angles", "mha-cpu-mask", "gpt-cpu-positions", "cache-cpu-mask",
        "step-clips-each-parameter"])
def test_wrong_answers_of_new_kinds_fail(name, wrong, contains):
    assert_fails(getattr(ch02, name), wrong, contains=contains)
