"""Checks for chapter 02, the causal transformer: ``checks.ch02.attention(attention)`` etc.

Each check runs the learner's function on seeded random inputs and edge cases (sizes that are not
"nice", fully masked rows, huge scores, ties) and compares it with the reference in
:mod:`ar_course.transformer.functional`, :mod:`ar_course.sampling` or, for what the modules do not call,
:mod:`ar_course.checks.reference.ch02`.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from ar_course import sampling
from ar_course.checks.core import (Case, Chapter, CheckFailure, Mistake, call, clone_args, compare, compare_cases,
                                   explain)
from ar_course.checks.reference import ch02 as answers
from ar_course.transformer import functional as ref
from ar_course.transformer.model import GPTConfig, RMSNorm, SelfAttention, SwiGLU

chapter = Chapter(2, "The causal transformer")
use = chapter.use
hint = chapter.hint


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------
# 2.1 masked softmax


def _softmax_cases() -> Iterator[Case]:
    g = _gen(0)
    scores = torch.randn(5, 7, generator=g)
    mask = torch.rand(5, 7, generator=g) > 0.4
    mask[:, 2] = True
    yield Case("random 5x7 scores, random mask", (scores, mask))
    scores = torch.randn(2, 3, 6, 6, generator=g)
    yield Case("2x3x6x6 scores, causal 6x6 mask (broadcast)", (scores, ref.causal_mask(6)))
    big = torch.tensor([[1000.0, 1001.0, 999.0, -50.0], [-1000.0, -1001.0, -999.0, -998.0]])
    yield Case("huge scores (+-1000)", (big, torch.ones(2, 4, dtype=torch.bool)))
    empty = torch.ones(3, 5, dtype=torch.bool)
    empty[1] = False
    yield Case("row 1 fully masked (expect zeros)", (torch.randn(3, 5, generator=g), empty))


def _softmax_unshifted(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    e = scores.masked_fill(~mask, float("-inf")).exp()
    return e / e.sum(-1, keepdim=True)


SOFTMAX_MISTAKES = [
    Mistake(lambda scores, mask: torch.softmax(scores.masked_fill(~mask, float("-inf")), -1),
            "a fully masked row came out NaN (0 / 0); it should be all zeros"),
    Mistake(_softmax_unshifted, "exp overflowed: without subtracting the row maximum, exp(1000) is inf and inf / "
            "inf is NaN"),
    Mistake(lambda scores, mask: torch.softmax(scores.masked_fill(~mask, 0.0), -1),
            "masked entries were set to 0 before the softmax, and exp(0) still gives them weight; a masked entry "
            "must get none"),
]


@chapter.exercise("2.1", reference=ref.masked_softmax, hints=(
    "a masked entry must end with weight exactly 0, and the softmax must survive scores of any size and rows "
    "with nothing kept",
    "fill the masked scores with -inf (exp(-inf) = 0), subtract the row maximum over the kept entries before "
    "exp, and for a row with nothing kept (its maximum is -inf) avoid -inf - (-inf) and 0 / 0: it gets zeros",
    "s = scores.masked_fill(~mask, -inf); m = s.amax(-1, keepdim=True); m = torch.where(torch.isfinite(m), m, "
    "0); e = (s - m).exp(); t = e.sum(-1, keepdim=True); return e / torch.where(t > 0, t, 1)",
))
def masked_softmax(fn, ref_fn):
    compare_cases(fn, ref_fn, _softmax_cases(), atol=1e-6, mistakes=SOFTMAX_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 2.2 causal mask


CAUSAL_MISTAKES = [
    Mistake(lambda t_q, t_k: torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q - 1),
            "off by one: a query cannot see its own position there, but a token attends to itself (the diagonal "
            "is allowed)"),
    Mistake(lambda t_q, t_k: torch.ones(t_q, t_k, dtype=torch.bool).tril(),
            "the triangle starts at the top-left corner; with t_q < t_k the queries are the LAST t_q positions, so "
            "it is shifted right by t_k - t_q"),
    Mistake(lambda t_q, t_k: torch.ones(t_q, t_k, dtype=torch.bool).triu(t_k - t_q),
            "that lets a query see the keys after it (the upper triangle); it may see only the keys up to its "
            "own position"),
]


@chapter.exercise("2.2", reference=ref.causal_mask, hints=(
    "write down, for query i, its absolute position among the t_k positions, then which keys it may see",
    "the queries are the last t_q of the t_k positions: query i sits at position t_k - t_q + i and sees keys "
    "0 up to and including that position; return a bool tensor (t_q, t_k)",
    "return torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q), or compare arange(t_k)[None, :] <= "
    "arange(t_q)[:, None] + t_k - t_q",
))
def causal_mask(fn, ref_fn):
    cases = [Case(f"t_q={a}, t_k={b}", (a, b)) for a, b in [(1, 1), (5, 5), (7, 7), (3, 8), (1, 9), (4, 6)]]
    compare_cases(fn, ref_fn, cases, mistakes=CAUSAL_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 2.3 attention


def _attention_cases() -> Iterator[Case]:
    g = _gen(1)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    yield Case("B=2 H=3 T=5 D=8, no mask", (q, k, v, None))
    yield Case("B=2 H=3 T=5 D=8, causal mask", (q, k, v, ref.causal_mask(5)))
    q = torch.randn(1, 2, 3, 6, generator=g)
    k, v = torch.randn(1, 2, 7, 6, generator=g), torch.randn(1, 2, 7, 5, generator=g)
    yield Case("3 queries over 7 keys, D=6, D_v=5, shifted causal mask", (q, k, v, ref.causal_mask(3, 7)))
    q, k, v = (torch.randn(3, 1, 9, 16, generator=g) * 3 for _ in range(3))
    rnd = torch.rand(3, 1, 9, 9, generator=g) > 0.5
    rnd[..., 0] = True
    yield Case("B=3 T=9 D=16, random (B,1,T,T) mask", (q, k, v, rnd))


def _attention_variant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                       scale: float, over_queries: bool = False, use_mask: bool = True) -> torch.Tensor:
    """Attention with one thing changed: the scale of the scores, the softmax axis, or the mask ignored."""
    scores = q @ k.transpose(-2, -1) * scale  # (..., T_q, T_k)
    keep = mask if use_mask and mask is not None else torch.ones_like(scores, dtype=torch.bool)
    if over_queries:
        return ref.masked_softmax(scores.transpose(-2, -1), keep.transpose(-2, -1)).transpose(-2, -1) @ v
    return ref.masked_softmax(scores, keep) @ v


ATTENTION_MISTAKES = [
    Mistake(lambda q, k, v, mask=None: _attention_variant(q, k, v, mask, scale=q.shape[-1] ** -0.5,
                                                          over_queries=True),
            "that is a softmax over the queries (dim -2): the weights of each query must sum to 1 over the keys"),
    Mistake(lambda q, k, v, mask=None: _attention_variant(q, k, v, mask, scale=1.0),
            "that is attention without the scale: the scores must be divided by sqrt(D) so their size does not "
            "grow with the head size"),
    Mistake(lambda q, k, v, mask=None: _attention_variant(q, k, v, mask, scale=1.0 / q.shape[-1]),
            "the scale is 1/D; it should be 1/sqrt(D), the standard deviation of a dot product of D unit-variance "
            "terms"),
    Mistake(lambda q, k, v, mask=None: _attention_variant(q, k, v, mask, scale=math.sqrt(q.shape[-1])),
            "the scores are multiplied by sqrt(D); they should be divided by it"),
    Mistake(lambda q, k, v, mask=None: _attention_variant(q, k, v, mask, scale=q.shape[-1] ** -0.5, use_mask=False),
            "the mask is not applied: masked keys still get weight"),
    Mistake(lambda q, k, v, mask=None: _attention_variant(q, k, v, None if mask is None else ~mask,
                                                          scale=q.shape[-1] ** -0.5),
            "the mask is inverted: True means the query may attend to that key"),
]


@chapter.exercise("2.3", reference=ref.scaled_dot_product_attention, hints=(
    "three steps: score every query against every key, turn each query's scores into weights that sum to 1, "
    "and average the values with those weights; check the size of the scores and which axis is normalised",
    "scores = q @ k^T (shape (..., T_q, T_k)) divided by sqrt(D) with D = q.shape[-1]; normalise each query's "
    "row over the keys (the last axis) with your masked_softmax, which also applies the mask; multiply by v",
    "return masked_softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), mask) @ v (with an all-True mask "
    "when mask is None)",
))
def attention(fn, ref_fn):
    compare_cases(fn, ref_fn, _attention_cases(), atol=1e-5, grad_wrt=(0, 1, 2), mistakes=ATTENTION_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 2.4 / 2.5 heads


SPLIT_MISTAKES = [
    Mistake(lambda x, n_head: x.reshape(x.shape[0], n_head, x.shape[1], x.shape[2] // n_head),
            "that reshapes (B, T, C) straight to (B, H, T, D): the memory is read in the wrong order, so a head "
            "mixes channels of different time steps"),
    Mistake(lambda x, n_head: x.view(x.shape[0], x.shape[1], x.shape[2] // n_head, n_head).permute(0, 3, 1, 2),
            "that gives head h the channels h, h + H, h + 2H...; each head owns a contiguous block of D channels"),
]


@chapter.exercise("2.4", reference=ref.split_heads, hints=(
    "each head owns a contiguous block of D = C / H channels; first expose the heads as their own axis, then "
    "move that axis in front of time",
    "view (B, T, C) as (B, T, H, D), so the last axis splits into blocks, then swap the T and H axes; a single "
    "reshape to (B, H, T, D) reads memory in the wrong order",
    "return x.view(B, T, n_head, C // n_head).transpose(1, 2)",
))
def split_heads(fn, ref_fn):
    g = _gen(2)
    cases = [
        Case("B=2 T=5 C=12, 3 heads", (torch.randn(2, 5, 12, generator=g), 3)),
        Case("B=1 T=7 C=16, 4 heads", (torch.arange(112.0).view(1, 7, 16), 4)),
        Case("B=3 T=1 C=10, 1 head", (torch.randn(3, 1, 10, generator=g), 1)),
    ]
    compare_cases(fn, ref_fn, cases, mistakes=SPLIT_MISTAKES)


MERGE_MISTAKES = [
    Mistake(lambda x: x.reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3]),
            "that reshapes (B, H, T, D) straight to (B, T, H*D), mixing time steps; bring T in front of H first"),
    Mistake(lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3]),
            "that interleaves the heads' channels; head h's D channels must stay one contiguous block"),
]


@chapter.exercise("2.5", reference=ref.merge_heads, hints=(
    "undo split_heads step by step, in the opposite order",
    "swap the H and T axes back to (B, T, H, D), then join the last two axes into H*D channels (reshape: the "
    "swapped tensor is not contiguous, so view fails)",
    "return x.transpose(1, 2).reshape(B, T, H * D)",
))
def merge_heads(fn, ref_fn):
    g = _gen(3)
    cases = [
        Case("B=2 H=3 T=5 D=4", (torch.randn(2, 3, 5, 4, generator=g),)),
        Case("B=1 H=4 T=7 D=4 (arange)", (torch.arange(112.0).view(1, 4, 7, 4),)),
        Case("split_heads output, B=2 T=6 C=15, 5 heads", (ref.split_heads(torch.randn(2, 6, 15, generator=g), 5),)),
    ]
    compare_cases(fn, ref_fn, cases, mistakes=MERGE_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 2.6 RMSNorm


RMS_MISTAKES = [
    Mistake(lambda x, weight, eps=1e-6: torch.nn.functional.layer_norm(x, x.shape[-1:], weight, None, eps),
            "that is LayerNorm: it subtracts the mean; RMSNorm only divides by the root mean square"),
    Mistake(lambda x, weight, eps=1e-6: x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight,
            "eps is added outside the square root; it goes inside, next to the mean of squares"),
    Mistake(lambda x, weight, eps=1e-6: ref.rms_norm(x, None, eps), "the weight is not applied"),
]


@chapter.exercise("2.6", reference=ref.rms_norm, hints=(
    "RMSNorm rescales each vector (the last axis) to unit root mean square and then applies a learned "
    "per-channel gain; unlike LayerNorm it does not centre the vector",
    "divide x by sqrt(mean(x^2 over the last axis) + eps), with eps inside the square root and keepdim=True, "
    "then multiply by weight",
    "return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight",
))
def rms_norm(fn, ref_fn):
    g = _gen(4)
    cases = [
        Case("B=2 T=5 C=12 with weight", (torch.randn(2, 5, 12, generator=g), torch.rand(12, generator=g) + 0.5, 1e-6)),
        Case("shifted input (mean 3)", (torch.randn(4, 9, generator=g) + 3.0, torch.ones(9), 1e-6)),
        Case("tiny input (~1e-3), eps=1e-5", (torch.randn(3, 7, generator=g) * 1e-3, torch.rand(7, generator=g), 1e-5)),
    ]
    compare_cases(fn, ref_fn, cases, atol=1e-5, grad_wrt=(0,), mistakes=RMS_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 2.7 rotary embedding


def _rope_cases() -> Iterator[Case]:
    g = _gen(5)
    yield Case("B=2 H=3 T=6 D=8, positions 0..5", (torch.randn(2, 3, 6, 8, generator=g), torch.arange(6)))
    yield Case("T=4 D=16, positions 37..40", (torch.randn(1, 2, 4, 16, generator=g), torch.arange(37, 41)))
    yield Case("T=5 D=6, unordered positions", (torch.randn(1, 1, 5, 6, generator=g), torch.tensor([9, 2, 0, 130, 5])))
    yield Case("T=3 D=8, base=100", (torch.randn(2, 1, 3, 8, generator=g), torch.tensor([1, 4, 7]), 100.0))


def _rope_variant(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, *, exponent: float = 2.0,
                  sign: float = 1.0, interleaved: bool = False) -> torch.Tensor:
    """Rotary embedding with one thing changed: the frequencies, the direction, or the pairing."""
    D = x.shape[-1]
    i = torch.arange(D // 2, dtype=torch.float64)
    angle = positions.double()[:, None] * base ** (-exponent * i / D)  # (T, D/2)
    cos, sin = angle.cos().to(x.dtype), (sign * angle.sin()).to(x.dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


ROPE_MISTAKES = [
    Mistake(lambda x, positions, base=10000.0: _rope_variant(x, positions, base, interleaved=True),
            "that rotates the pairs (2i, 2i+1); this course pairs feature i with feature i + D/2"),
    Mistake(lambda x, positions, base=10000.0: _rope_variant(x, positions, base, exponent=1.0),
            "the frequencies are base**(-i/D); pair i turns at base**(-2i/D)"),
    Mistake(lambda x, positions, base=10000.0: _rope_variant(x, positions, base, sign=-1.0),
            "the rotation goes the wrong way (the sines have the wrong sign)"),
]


@chapter.exercise("2.7", reference=answers.rotary_embedding, hints=(
    "rotary embedding turns pairs of features by an angle that grows with the position, each pair at its own "
    "frequency; find which features form a pair and how fast pair i turns",
    "pair feature i with feature i + D/2 (the two halves of the vector); pair i turns by position * base**(-2i/D); "
    "rotate each pair (x1, x2) by that angle the usual way",
    "angle = positions[:, None] * base ** (-2 * torch.arange(D // 2) / D); x1, x2 = x[..., :D//2], x[..., D//2:]; "
    "return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)",
))
def rotary_embedding(fn, ref_fn):
    compare_cases(fn, ref_fn, _rope_cases(), atol=1e-4, mistakes=ROPE_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 2.8 pre-norm block


def _block_cases() -> Iterator[Case]:
    for seed, (B, T, C, H) in enumerate([(2, 5, 24, 3), (1, 7, 16, 4)]):
        torch.manual_seed(100 + seed)
        cfg = GPTConfig(n_embd=C, n_head=H)
        norm1, norm2 = RMSNorm(C), RMSNorm(C)
        with torch.no_grad():
            norm1.weight.uniform_(0.5, 1.5)
            norm2.weight.uniform_(0.5, 1.5)
        attn, mlp = SelfAttention(cfg).eval(), SwiGLU(cfg)
        x = torch.randn(B, T, C, generator=_gen(seed)) * 2 + 1
        yield Case(f"B={B} T={T} C={C}", (x, norm1, attn, norm2, mlp))


BLOCK_MISTAKES = [
    Mistake(lambda x, norm1, attn, norm2, mlp: norm2((h := norm1(x + attn(x))) + mlp(h)),
            "that is a post-norm block (normalise after adding); a pre-norm block normalises each sublayer's "
            "input and leaves the residual stream alone"),
    Mistake(lambda x, norm1, attn, norm2, mlp: mlp(norm2(x + attn(norm1(x)))),
            "the MLP's output replaces the residual stream; it should be added to it"),
    Mistake(lambda x, norm1, attn, norm2, mlp: x + attn(norm1(x)) + mlp(norm2(x)),
            "attention and the MLP both read x (a parallel block); the MLP reads the stream after attention"),
]


@chapter.exercise("2.8", reference=answers.pre_norm_block, hints=(
    "a pre-norm block has two sublayers; each one reads a normalised copy of the residual stream and adds its "
    "output back to the stream",
    "first attention on norm1 of the input, added to the input; then the MLP on norm2 of that sum, added to "
    "the sum; the stream itself is never normalised inside the block",
    "h = x + attn(norm1(x)); return h + mlp(norm2(h))",
))
def transformer_block(fn, ref_fn):
    with torch.no_grad():
        compare_cases(fn, ref_fn, _block_cases(), atol=1e-5, mistakes=BLOCK_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 2.9 attention with a KV cache


def _cache_cases() -> Iterator[Case]:
    g = _gen(6)
    for name, B, H, T, D, pos, L in [
        ("one decode step at pos 4", 1, 2, 1, 8, 4, 10),
        ("one decode step at pos 0 (empty cache)", 2, 1, 1, 4, 0, 6),
        ("3 new tokens at pos 5", 2, 3, 3, 4, 5, 12),
        ("prefill of 6 tokens at pos 0", 1, 2, 6, 8, 0, 9),
    ]:
        q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
        kc, vc = torch.zeros(B, H, L, D), torch.zeros(B, H, L, D)
        kc[:, :, :pos] = torch.randn(B, H, pos, D, generator=g)
        vc[:, :, :pos] = torch.randn(B, H, pos, D, generator=g)
        yield Case(name, (q, k, v, kc, vc, pos))


def _cache_variant(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, pos: int, *, whole_buffer: bool = False, diagonal: int = 0,
                   causal: bool = True) -> torch.Tensor:
    """Cached attention with one thing changed: the keys attended to, or the mask within the new tokens."""
    T = q.shape[-2]
    k_cache[:, :, pos:pos + T] = k_new
    v_cache[:, :, pos:pos + T] = v_new
    if whole_buffer:
        return ref.scaled_dot_product_attention(q, k_cache, v_cache)
    mask = ref.causal_mask(T, pos + T).tril(pos + diagonal) if causal else None
    return ref.scaled_dot_product_attention(q, k_cache[:, :, :pos + T], v_cache[:, :, :pos + T], mask)


CACHE_MISTAKES = [
    Mistake(lambda *args: _cache_variant(*args, whole_buffer=True),
            "that attends over the whole cache buffer, empty slots after pos + T included; only positions "
            "0 .. pos + T - 1 hold keys"),
    Mistake(lambda *args: _cache_variant(*args, diagonal=-1),
            "off by one: the new tokens cannot see their own positions; a token attends to itself"),
    Mistake(lambda *args: _cache_variant(*args, causal=False),
            "the new tokens see each other in both directions; a new token may not see the new tokens after it"),
]


@chapter.exercise("2.9", reference=answers.cached_attention, hints=(
    "the cache holds the keys and values of the first pos positions; the new tokens add theirs, and then "
    "attend like any causal attention over everything written so far",
    "write k_new and v_new into the caches at [pos : pos + T]; attend over positions [0 : pos + T] only (the "
    "rest of the buffer is empty) with the causal mask for T queries over pos + T keys",
    "k_cache[:, :, pos:pos+T] = k_new; v_cache[:, :, pos:pos+T] = v_new; return attention(q, k_cache[:, :, "
    ":pos+T], v_cache[:, :, :pos+T], causal_mask(T, pos + T))",
))
def cached_attention(fn, ref_fn):
    for case in _cache_cases():
        a_ref, a_fn = clone_args(case.args), clone_args(case.args)
        expected = ref_fn(*a_ref)
        got = call(fn, *a_fn, where=case.name)
        try:
            compare(got, expected, where=case.name, atol=1e-5)
        except CheckFailure as exc:
            raise explain(exc, CACHE_MISTAKES, case, got, atol=1e-5) from None
        compare(a_fn[3], a_ref[3], where=case.name, name="k_cache after the call")
        compare(a_fn[4], a_ref[4], where=case.name, name="v_cache after the call")


# --------------------------------------------------------------------------------------------------------
# 2.10 / 2.11 top-k and top-p


def _top_k_cases() -> Iterator[Case]:
    g = _gen(7)
    yield Case("4x50 random logits, k=7", (torch.randn(4, 50, generator=g) * 2, 7))
    yield Case("k=1", (torch.randn(3, 11, generator=g), 1))
    ties = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5, 0.1, 0.9]])
    yield Case("ties at the k-th value, k=2", (ties, 2))
    yield Case("k larger than the vocabulary", (torch.randn(2, 5, generator=g), 9))
    yield Case("batched (2, 3, 13), k=4", (torch.randn(2, 3, 13, generator=g), 4))


def _top_k_by_position(logits: torch.Tensor, k: int) -> torch.Tensor:
    idx = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def _top_k_zero_fill(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, 0.0)


TOP_K_MISTAKES = [
    Mistake(_top_k_by_position, "exactly k tokens were kept, so tokens tied with the k-th largest logit were "
            "dropped; the filter must depend on the values only, so every tie stays"),
    Mistake(_top_k_zero_fill, "the removed logits were set to 0, which still has probability; a removed token "
            "needs -inf"),
]


@chapter.exercise("2.10", reference=sampling.top_k_filter, hints=(
    "the filter keeps the tokens whose logit is among the k largest of their row and removes the rest; "
    "decide by value, so tied logits are treated alike",
    "find each row's k-th largest logit (torch.topk(...).values, the last one, kept as a column) and set every "
    "logit strictly below it to -inf; ties with it stay; k >= V keeps everything",
    "kth = torch.topk(logits, k, dim=-1).values[..., -1:]; return logits.masked_fill(logits < kth, "
    "float('-inf')) (after returning logits unchanged when k >= V)",
))
def top_k_filter(fn, ref_fn):
    compare_cases(fn, ref_fn, _top_k_cases(), mistakes=TOP_K_MISTAKES)


def _top_p_cases() -> Iterator[Case]:
    g = _gen(8)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    yield Case("probs (0.5, 0.3, 0.15, 0.05), p=0.6 (the 0.3 token crosses 0.6)", (probs.log(), 0.6))
    yield Case("6x40 random logits, p=0.9", (torch.randn(6, 40, generator=g) * 2, 0.9))
    yield Case("5x17 random logits, p=0.35", (torch.randn(5, 17, generator=g) * 3, 0.35))
    yield Case("p=1 keeps everything", (torch.randn(2, 9, generator=g), 1.0))
    yield Case("tiny p keeps the top token", (torch.randn(3, 12, generator=g), 1e-4))
    yield Case("three tokens tied at the threshold", (torch.tensor([[2.0, 1.0, 1.0, 1.0, -3.0]]), 0.5))


def _top_p_variant(logits: torch.Tensor, p: float, *, mass_including: bool = False, on_logits: bool = False,
                   keep_ties: bool = True) -> torch.Tensor:
    """Top-p with one thing changed: the crossing token dropped, logits summed, or ties cut."""
    if p >= 1:
        return logits
    probs = logits.float() if on_logits else torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass = torch.cumsum(sorted_probs, dim=-1) - (0 if mass_including else sorted_probs)
    keep_sorted = mass < p
    keep_sorted[..., 0] = True
    if keep_ties:
        least = torch.where(keep_sorted, sorted_probs, torch.full_like(sorted_probs, float("inf"))).amin(-1, True)
        return logits.masked_fill(probs < least, float("-inf"))
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


TOP_P_MISTAKES = [
    Mistake(lambda logits, p: _top_p_variant(logits, p, mass_including=True),
            "one token too few: the token whose probability carries the mass past p was dropped; keep a token "
            "when the mass BEFORE it is below p, so the kept mass reaches p"),
    Mistake(lambda logits, p: _top_p_variant(logits, p, on_logits=True),
            "that accumulates logits; p is a probability mass, so sum the softmax probabilities"),
    Mistake(lambda logits, p: _top_p_variant(logits, p, keep_ties=False),
            "a token tied with the least likely kept token was dropped; tied tokens must be treated alike"),
]


@chapter.exercise("2.11", reference=sampling.top_p_filter, hints=(
    "keep the most likely tokens, in order of probability, until together they hold at least p of the "
    "probability mass; check the token that crosses p and tokens tied with the last one kept",
    "sort the probabilities (the softmax, not the logits) in descending order; keep a token when the mass "
    "BEFORE it is < p, so the token that crosses p stays; then keep every token at least as likely as the "
    "least likely kept one, and set the others to -inf; p = 1 keeps everything",
    "sp, _ = probs.sort(-1, descending=True); keep = (sp.cumsum(-1) - sp) < p; least = torch.where(keep, sp, "
    "1.0).amin(-1, keepdim=True); return logits.masked_fill(probs < least, float('-inf'))",
))
def top_p_filter(fn, ref_fn):
    compare_cases(fn, ref_fn, _top_p_cases(), mistakes=TOP_P_MISTAKES)


__all__ = [
    "chapter", "use", "hint", "masked_softmax", "causal_mask", "attention", "split_heads", "merge_heads", "rms_norm",
    "rotary_embedding", "transformer_block", "cached_attention", "top_k_filter", "top_p_filter",
]
