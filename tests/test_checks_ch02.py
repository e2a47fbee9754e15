"""Every chapter 02 check accepts the reference, reports a stub as not attempted, and rejects plausible
wrong implementations."""

from __future__ import annotations

import math

import pytest
import torch

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


def mask_strict(t_q, t_k):
    return torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q - 1)


def mask_top_left(t_q, t_k):
    return torch.ones(t_q, t_k, dtype=torch.bool).tril()


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


def split_no_transpose(x, n_head):
    B, T, C = x.shape
    return x.reshape(B, n_head, T, C // n_head)


def split_interleaved(x, n_head):
    B, T, C = x.shape
    return x.view(B, T, C // n_head, n_head).permute(0, 3, 1, 2)


def merge_no_transpose(x):
    B, H, T, D = x.shape
    return x.reshape(B, T, H * D)


def merge_interleaved(x):
    B, H, T, D = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, T, H * D)


def layer_norm_instead(x, weight, eps=1e-6):
    return (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * weight


def rms_eps_outside(x, weight, eps=1e-6):
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight


def rms_no_weight(x, weight, eps=1e-6):
    return ref.rms_norm(x, None, eps)


def _rope(x, positions, base, exponent_scale=2.0, sign=1.0, interleaved=False):
    D = x.shape[-1]
    i = torch.arange(D // 2, dtype=torch.float64)
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


def block_post_norm(x, norm1, attn, norm2, mlp):
    h = norm1(x + attn(x))
    return norm2(h + mlp(h))


def block_missing_mlp_residual(x, norm1, attn, norm2, mlp):
    h = x + attn(norm1(x))
    return mlp(norm2(h))


def block_parallel(x, norm1, attn, norm2, mlp):
    return x + attn(norm1(x)) + mlp(norm2(x))


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


def top_k_off_by_one(logits, k):
    kth = torch.topk(logits, max(k - 1, 1), dim=-1).values[..., -1:] if k > 1 else logits.amax(-1, keepdim=True) + 1
    return logits.masked_fill(logits < kth, float("-inf"))


def top_k_by_indices(logits, k):
    k = min(k, logits.shape[-1])
    idx = torch.topk(logits, k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_k_zero_fill(logits, k):
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, 0.0)


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
    "masked_softmax": (ref.masked_softmax, [softmax_no_max_subtraction, softmax_fill_zero, softmax_nan_on_empty_rows]),
    "causal_mask": (ref.causal_mask, [mask_strict, mask_top_left, mask_float]),
    "attention": (ref.scaled_dot_product_attention,
                  [attention_no_scale, attention_scale_by_d, attention_softmax_over_queries, attention_ignores_mask]),
    "split_heads": (ref.split_heads, [split_no_transpose, split_interleaved]),
    "merge_heads": (ref.merge_heads, [merge_no_transpose, merge_interleaved]),
    "rms_norm": (ref.rms_norm, [layer_norm_instead, rms_eps_outside, rms_no_weight]),
    "rotary_embedding": (answers.rotary_embedding, [rope_interleaved, rope_wrong_frequencies, rope_wrong_direction]),
    "transformer_block": (answers.pre_norm_block, [block_post_norm, block_missing_mlp_residual, block_parallel]),
    "cached_attention": (answers.cached_attention,
                         [cache_whole_buffer, cache_excludes_current, cache_not_written, cache_no_causal_within_chunk]),
    "top_k_filter": (sampling.top_k_filter, [top_k_off_by_one, top_k_by_indices, top_k_zero_fill]),
    "top_p_filter": (sampling.top_p_filter, [top_p_drops_crossing_token, top_p_on_logits, top_p_ignores_ties]),
}

MUTANTS = [(name, m) for name, (_, ms) in CASES.items() for m in ms]


def test_chapter_has_at_least_eight_exercises():
    assert len(ch02.chapter.exercises) >= 8
    assert set(CASES) == set(ch02.chapter.exercises)


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
    ("masked_softmax", softmax_nan_on_empty_rows, "fully masked row came out NaN"),
    ("masked_softmax", softmax_fill_zero, "set to 0 before the softmax"),
    ("causal_mask", mask_strict, "off by one"),
    ("causal_mask", mask_top_left, "LAST t_q positions"),
    ("attention", attention_softmax_over_queries, "softmax over the queries"),
    ("attention", attention_no_scale, "without the scale"),
    ("attention", attention_scale_by_d, "the scale is 1/D"),
    ("attention", attention_ignores_mask, "the mask is not applied"),
    ("split_heads", split_no_transpose, "straight to (B, H, T, D)"),
    ("split_heads", split_interleaved, "h + H"),
    ("merge_heads", merge_no_transpose, "straight to (B, T, H*D)"),
    ("merge_heads", merge_interleaved, "interleaves"),
    ("rms_norm", layer_norm_instead, "that is LayerNorm"),
    ("rms_norm", rms_eps_outside, "outside the square root"),
    ("rms_norm", rms_no_weight, "weight is not applied"),
    ("rotary_embedding", rope_interleaved, "(2i, 2i+1)"),
    ("rotary_embedding", rope_wrong_frequencies, "base**(-i/D)"),
    ("rotary_embedding", rope_wrong_direction, "wrong way"),
    ("transformer_block", block_post_norm, "post-norm"),
    ("transformer_block", block_missing_mlp_residual, "replaces the residual stream"),
    ("transformer_block", block_parallel, "parallel block"),
    ("cached_attention", cache_whole_buffer, "whole cache buffer"),
    ("cached_attention", cache_excludes_current, "cannot see their own positions"),
    ("cached_attention", cache_no_causal_within_chunk, "both directions"),
    ("top_k_filter", top_k_by_indices, "tied with the k-th largest"),
    ("top_k_filter", top_k_zero_fill, "needs -inf"),
    ("top_p_filter", top_p_drops_crossing_token, "one token too few"),
    ("top_p_filter", top_p_on_logits, "accumulates logits"),
    ("top_p_filter", top_p_ignores_ties, "tied with the least likely kept"),
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
