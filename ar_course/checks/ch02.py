"""Checks for chapter 02, the causal transformer: ``checks.ch02.attention(attention)`` etc.

Each check runs the learner's function on seeded random inputs and edge cases (sizes that are not
"nice", fully masked rows, huge scores, ties) and compares it with the reference in
:mod:`ar_course.transformer.functional`, :mod:`ar_course.sampling` or, for what the modules do not call,
:mod:`ar_course.checks.reference.ch02`. The exercises that assemble the model (2.5 self-attention, 2.7 the
block, 2.8 the GPT forward pass) run on the weights of the package's modules and are compared with those
modules; the training step (2.9) is compared step by step with the reference and then trains a tiny GPT,
which must reach :data:`TRAIN_LOSS_TARGET`. The functions that create tensors of their own (2.4 rotary, 2.5, 2.8,
2.10) also run once on the meta device, standing in for a GPU, so that a tensor left on the CPU is caught.
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ar_course import sampling
from ar_course.checks.core import (Case, Chapter, CheckFailure, Mistake, call, check_off_cpu, check_unchanged,
                                   clone_args, compare, compare_cases, compare_explained, explain, running)
from ar_course.checks.reference import ch02 as answers
from ar_course.transformer import functional as ref
from ar_course.transformer.model import GPT, Block, GPTConfig, SelfAttention

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
    hidden = ref.causal_mask(4, 6)
    yield Case("masked scores 1000 above the kept ones", (torch.randn(4, 6, generator=g) + 1000.0 * ~hidden, hidden))


def _softmax_unshifted(scores: torch.Tensor, mask: torch.Tensor, *, guard: bool = False) -> torch.Tensor:
    """A softmax without subtracting the row maximum; with ``guard`` a zero row sum divides as 1 (no 0 / 0)."""
    e = scores.masked_fill(~mask, float("-inf")).exp()
    t = e.sum(-1, keepdim=True)
    return e / (torch.where(t > 0, t, 1.0) if guard else t)


def _softmax_mask_after_exp(scores: torch.Tensor, mask: torch.Tensor, *, guard: bool = False) -> torch.Tensor:
    """The row maximum over the kept entries, but the mask applied by multiplying after exp: a masked score far
    above the kept ones makes exp inf, and inf * 0 is NaN. With ``guard`` a row sum that is not > 0 (NaN here)
    divides as 1."""
    m = scores.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
    e = (scores - torch.where(torch.isfinite(m), m, 0.0)).exp() * mask
    t = e.sum(-1, keepdim=True)
    return e / (torch.where(t > 0, t, 1.0) if guard else t)


def _softmax_max_over_all(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    e = (scores - scores.amax(-1, keepdim=True)).exp() * mask
    t = e.sum(-1, keepdim=True)
    return e / torch.where(t > 0, t, 1.0)


SOFTMAX_MISTAKES = [
    Mistake(lambda scores, mask: torch.softmax(scores.masked_fill(~mask, float("-inf")), -1),
            "a fully masked row came out NaN (0 / 0); it should be all zeros"),
    *[Mistake(partial(_softmax_unshifted, guard=guard), "exp overflowed: without subtracting the row maximum, "
              "exp(1000) is inf and inf / inf is NaN") for guard in (False, True)],
    Mistake(lambda scores, mask: torch.softmax(scores.masked_fill(~mask, 0.0), -1),
            "masked entries were set to 0 before the softmax, and exp(0) still gives them weight; a masked entry "
            "must get none"),
    Mistake(_softmax_max_over_all, "the row maximum included the masked entries: a masked score far above the kept "
            "ones makes exp underflow to 0 for every kept entry"),
    *[Mistake(partial(_softmax_mask_after_exp, guard=guard), "the mask was applied after exp, by multiplying: a "
              "masked score far above the kept ones makes exp inf, and inf * 0 is NaN; fill the masked scores with "
              "-inf before exp") for guard in (False, True)],
    Mistake(lambda scores, mask: ref.masked_softmax(scores.mT, mask.expand_as(scores).mT).mT,
            "that normalises each column (over axis -2, the queries); each row, one query, must sum to 1 over its "
            "keys, the last axis"),
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
    Mistake(lambda t_q, t_k: ~torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q),
            "the mask is inverted: here True must mean 'may attend' (nn.MultiheadAttention's attn_mask uses True "
            "for 'blocked'; this course's masks do not)"),
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
    # (5, 5) first: at (1, 1) an inverted mask and the off-by-one one are both [[False]], and the wrong one is named
    cases = [Case(f"t_q={a}, t_k={b}", (a, b)) for a, b in [(5, 5), (1, 1), (7, 7), (3, 8), (1, 9), (4, 6)]]
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
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) * s for s in (12.0, 12.0, 1.0))
    yield Case("scores in the hundreds, causal mask", (q, k, v, ref.causal_mask(4)))


def _attention_variant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                       scale: float, over_queries: bool = False, use_mask: bool = True) -> torch.Tensor:
    """Attention with one thing changed: the scale of the scores, the softmax axis, or the mask ignored."""
    scores = q @ k.transpose(-2, -1) * scale  # (..., T_q, T_k)
    keep = mask if use_mask and mask is not None else torch.ones_like(scores, dtype=torch.bool)
    if over_queries:
        return ref.masked_softmax(scores.transpose(-2, -1), keep.transpose(-2, -1)).transpose(-2, -1) @ v
    return ref.masked_softmax(scores, keep) @ v


def _attention_unshifted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                         fill: bool) -> torch.Tensor:
    """A softmax written out without subtracting the row maximum; the mask applied after exp by filling with 0
    (``fill``) or by multiplying (where inf * 0 = NaN)."""
    e = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).exp()  # (..., T_q, T_k)
    if mask is not None:
        e = e.masked_fill(~mask, 0.0) if fill else e * mask
    return e / e.sum(-1, keepdim=True) @ v


UNSHIFTED = ("exp overflowed: a score in the hundreds gives exp = inf and inf / inf = NaN; the softmax must subtract "
             "each row's maximum first (as your masked_softmax does)")


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
    Mistake(lambda q, k, v, mask=None: _attention_unshifted(q, k, v, mask, fill=True), UNSHIFTED),
    Mistake(lambda q, k, v, mask=None: _attention_unshifted(q, k, v, mask, fill=False), UNSHIFTED),
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
# 2.4 rotary embedding


def _rope_cases() -> Iterator[Case]:
    g = _gen(5)
    yield Case("B=2 H=3 T=6 D=8, positions 0..5", (torch.randn(2, 3, 6, 8, generator=g), torch.arange(6)))
    yield Case("T=4 D=16, positions 37..40", (torch.randn(1, 2, 4, 16, generator=g), torch.arange(37, 41)))
    yield Case("T=5 D=6, unordered positions", (torch.randn(1, 1, 5, 6, generator=g), torch.tensor([9, 2, 0, 130, 5])))
    yield Case("T=3 D=8, base=100", (torch.randn(2, 1, 3, 8, generator=g), torch.tensor([1, 4, 7]), 100.0))
    yield Case("(T, D) input, no batch or head axes, T=4 D=10", (torch.randn(4, 10, generator=g), torch.arange(3, 7)))


def _rope_half_cases() -> Iterator[Case]:
    g = _gen(51)
    yield Case("float16 x, B=1 H=2 T=5 D=8", (torch.randn(1, 2, 5, 8, generator=g).half(), torch.arange(5)))
    yield Case("float16 x, T=6 D=16, positions up to 2047 (angles need more precision than float16)",
               (torch.randn(1, 1, 6, 16, generator=g).half(), torch.tensor([0, 7, 130, 999, 1500, 2047])))


def _rope_variant(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, *, exponent: float = 2.0,
                  sign: float = 1.0, interleaved: bool = False, angle_dtype: torch.dtype = torch.float64
                  ) -> torch.Tensor:
    """Rotary embedding with one thing changed: the frequencies, the direction, the pairing, or the precision
    of the angles."""
    D = x.shape[-1]
    i = torch.arange(D // 2, dtype=torch.float64)
    freqs = (base ** (-exponent * i / D)).to(angle_dtype)  # (D/2,)
    angle = (positions.to(angle_dtype)[:, None] * freqs).double()  # (T, D/2)
    cos, sin = angle.cos().to(x.dtype), (sign * angle.sin()).to(x.dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


ROPE_MISTAKES = [
    Mistake(lambda x, positions, base=10000.0: _rope_variant(x, positions, base, interleaved=True),
            "that rotates the pairs (2i, 2i+1), as the RoFormer paper writes it; this course, like the GPT-NeoX and "
            "Llama code, pairs feature i with feature i + D/2 (the same rotation with the features permuted)"),
    Mistake(lambda x, positions, base=10000.0: _rope_variant(x, positions, base, exponent=1.0),
            "the frequencies are base**(-i/D); pair i turns at base**(-2i/D)"),
    Mistake(lambda x, positions, base=10000.0: _rope_variant(x, positions, base, sign=-1.0),
            "the rotation goes the wrong way (the sines have the wrong sign)"),
    Mistake(lambda x, positions, base=10000.0: _rope_variant(x, torch.arange(x.shape[-2]), base),
            "that rotates by the positions 0..T-1, not by the positions it is given"),
    Mistake(lambda x, positions, base=10000.0: _rope_variant(x, positions, base, angle_dtype=x.dtype),
            "the angles were computed in x's dtype, float16: above 1024 float16 only holds whole numbers, so "
            "position * frequency is off by up to half a radian"),
]


@chapter.exercise("2.4", reference=answers.rotary_embedding, hints=(
    "rotary embedding turns pairs of features by an angle that grows with the position, each pair at its own "
    "frequency; find which features form a pair and how fast pair i turns",
    "pair feature i with feature i + D/2 (the two halves of the vector); pair i turns by position * base**(-2i/D); "
    "rotate each pair (x1, x2) by that angle the usual way, with cos and sin cast to x.dtype (float16 in, "
    "float16 out)",
    "angle = positions[:, None] * base ** (-2 * torch.arange(D // 2, device=x.device) / D); cos, sin = "
    "angle.cos().to(x.dtype), angle.sin().to(x.dtype); x1, x2 = x[..., :D//2], x[..., D//2:]; "
    "return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)",
))
def rotary_embedding(fn, ref_fn):
    compare_cases(fn, ref_fn, _rope_cases(), atol=1e-4, mistakes=ROPE_MISTAKES)
    compare_cases(fn, ref_fn, _rope_half_cases(), atol=4e-3, rtol=4e-3, mistakes=ROPE_MISTAKES)
    check_off_cpu(fn, next(_rope_cases()))


# --------------------------------------------------------------------------------------------------------
# 2.5 multi-head self-attention


def _scaled_weights(module: torch.nn.Module, std: float, seed: int) -> torch.nn.Module:
    """``module`` with every linear / embedding weight redrawn at ``std`` and every norm weight in [0.5, 1.5]:
    the default 0.02 makes attention nearly uniform and the norms' gains all 1, which hides mistakes."""
    g = _gen(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm_f.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


GAPPED_POSITIONS = torch.tensor([0, 1, 2, 5, 6, 9, 14, 15, 30])  # a shift of 0..T-1 would not show: RoPE is relative


def _self_attention_cases() -> Iterator[Case]:
    for seed, (B, T, C, H) in enumerate([(2, 7, 24, 3), (1, 9, 16, 4), (3, 1, 8, 2)]):
        attn = _scaled_weights(SelfAttention(GPTConfig(n_embd=C, n_head=H)), 0.4, 20 + seed)
        x = torch.randn(B, T, C, generator=_gen(30 + seed))
        yield Case(f"B={B} T={T} C={C}, {H} heads", (x, attn, torch.arange(T)))
    attn = _scaled_weights(SelfAttention(GPTConfig(n_embd=16, n_head=4)), 0.4, 23)
    yield Case("B=2 T=9 C=16, 4 heads, positions with gaps", (torch.randn(2, 9, 16, generator=_gen(33)), attn,
                                                               GAPPED_POSITIONS))


def _self_attention_variant(x: torch.Tensor, attn: SelfAttention, positions: torch.Tensor, *, split: str = "heads",
                            merge_transpose: bool = True, causal: bool = True, rope_qk: bool = True,
                            rope_v: bool = False, proj: bool = True, own_positions: bool = False) -> torch.Tensor:
    """Multi-head self-attention with one thing changed: how the heads are cut (``split``: "heads", "reshape"
    straight to (B, H, T, D), "interleaved" channels, or "one" head of C channels) and put back, the mask,
    which tensors are rotated, the positions (``own_positions``: 0..T-1 whatever was passed), or the output
    projection."""
    B, T, C = x.shape
    H = attn.n_head
    positions = torch.arange(T) if own_positions else positions
    splits = {
        "heads": lambda t: ref.split_heads(t, H),
        "reshape": lambda t: t.reshape(B, H, T, C // H),
        "interleaved": lambda t: t.view(B, T, C // H, H).permute(0, 3, 1, 2),
        "one": lambda t: t[:, None],  # (B, 1, T, C)
    }
    merges = {
        "heads": ref.merge_heads,
        "reshape": lambda y: y.reshape(B, T, C),
        "interleaved": lambda y: y.permute(0, 2, 3, 1).reshape(B, T, C),
        "one": lambda y: y[:, 0],
    }
    q, k, v = (splits[split](t) for t in attn.qkv(x).split(C, dim=-1))  # 3 x (B, H, T, D)
    if rope_qk:
        q, k = answers.rotary_embedding(q, positions), answers.rotary_embedding(k, positions)
    if rope_v:
        v = answers.rotary_embedding(v, positions)
    y = ref.scaled_dot_product_attention(q, k, v, ref.causal_mask(T) if causal else None)  # (B, H, T, D)
    y = merges[split](y) if merge_transpose else y.reshape(B, T, C)
    return attn.proj(y) if proj else y


SELF_ATTENTION_MISTAKES = [
    Mistake(lambda x, attn, positions: _self_attention_variant(x, attn, positions, split="one"),
            "that is a single head over all C channels; each of the n_head heads attends over its own D = C / H "
            "channels"),
    Mistake(lambda x, attn, positions: _self_attention_variant(x, attn, positions, split="reshape"),
            "the heads were cut with a reshape of (B, T, C) straight to (B, H, T, D), which reads memory in the "
            "wrong order: a head mixes channels of different time steps"),
    Mistake(lambda x, attn, positions: _self_attention_variant(x, attn, positions, split="interleaved"),
            "head h got the channels h, h + H, h + 2H...; each head owns a contiguous block of D channels"),
    Mistake(lambda x, attn, positions: _self_attention_variant(x, attn, positions, merge_transpose=False),
            "the heads were put back with a reshape of (B, H, T, D) straight to (B, T, C), mixing time steps"),
    Mistake(lambda x, attn, positions: _self_attention_variant(x, attn, positions, causal=False),
            "no causal mask: every position also sees the positions after it"),
    Mistake(lambda x, attn, positions: _self_attention_variant(x, attn, positions, rope_qk=False),
            "the queries and keys were not rotated, so attention does not know the order of the tokens"),
    Mistake(lambda x, attn, positions: _self_attention_variant(x, attn, positions, rope_v=True),
            "the values were rotated too; only queries and keys carry the positions"),
    Mistake(lambda x, attn, positions: _self_attention_variant(x, attn, positions, proj=False),
            "the output projection attn.proj is missing"),
    Mistake(lambda x, attn, positions: _self_attention_variant(x, attn, positions, own_positions=True),
            "the queries and keys were rotated at positions 0..T-1, not at the positions passed in"),
]


@chapter.exercise("2.5", reference=answers.self_attention, hints=(
    "project x to queries, keys and values with attn.qkv, cut each into n_head heads, rotate queries and keys, "
    "attend causally in every head at once, then put the heads back side by side and project with attn.proj",
    "q, k, v = attn.qkv(x).split(C, dim=-1); view each (B, T, C) as (B, T, H, D) and transpose to (B, H, T, D); "
    "rotary_embedding on q and k; attention with the causal mask (T, T); transpose back to (B, T, H, D) and "
    "reshape to (B, T, C) before attn.proj",
    "q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in attn.qkv(x).split(C, -1)); q, k = rope_fn(q, "
    "positions), rope_fn(k, positions); y = attention_fn(q, k, v, mask_fn(T, T).to(x.device)); return "
    "attn.proj(y.transpose(1, 2).reshape(B, T, C)) with H = attn.n_head",
))
def self_attention(fn, ref_fn):
    with torch.no_grad():
        compare_cases(fn, ref_fn, _self_attention_cases(), atol=1e-5, mistakes=SELF_ATTENTION_MISTAKES, off_cpu=True)


# --------------------------------------------------------------------------------------------------------
# 2.6 RMSNorm


def _rms_half_naive(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


RMS_MISTAKES = [
    Mistake(_rms_half_naive, "the mean of squares was computed in x's own half precision: in float16, x^2 "
            "overflows to inf from |x| > 256 (and loses its digits below about 1e-4)"),
    Mistake(lambda x, weight, eps=1e-6: torch.nn.functional.layer_norm(x, x.shape[-1:], weight, None, eps),
            "that is LayerNorm: it subtracts the mean; RMSNorm only divides by the root mean square"),
    Mistake(lambda x, weight, eps=1e-6: x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight,
            "eps is added outside the square root; it goes inside, next to the mean of squares"),
    Mistake(lambda x, weight, eps=1e-6: ref.rms_norm(x, None, eps), "the weight is not applied"),
    Mistake(lambda x, weight, eps=1e-6: (x.float() / (x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
            * weight, "that divides by the mean of squares; RMSNorm divides by its square root (the root mean "
                      "square)"),
    Mistake(lambda x, weight, eps=1e-6: ref.rms_norm(x.float(), weight.float(), eps),
            "the result stayed in float32; a norm returns the dtype it was given"),
    Mistake(lambda x, weight, eps=1e-6: ref.rms_norm(x, weight.detach(), eps),
            "the weight was used outside autograd (.data or .detach()), so the gain would never learn"),
]


def _rms_half_cases() -> Iterator[Case]:
    g = _gen(41)
    big, gain = (torch.randn(3, 16, generator=g) * 400).half(), (torch.rand(16, generator=g) + 0.5).half()
    yield Case("float16, values in the hundreds (x^2 overflows float16)", (big, gain, 1e-6))
    small = (torch.randn(4, 32, generator=g) * 1e-3).half()
    yield Case("float16, values ~1e-3 (x^2 underflows float16), eps=1e-8", (small, torch.ones(32).half(), 1e-8))


def _rms_bfloat16_cases() -> Iterator[Case]:
    g = _gen(42)
    yield Case("bfloat16 activations", (torch.randn(2, 5, 12, generator=g).bfloat16(),
                                        (torch.rand(12, generator=g) + 0.5).bfloat16(), 1e-6))


@chapter.exercise("2.6", reference=ref.rms_norm, hints=(
    "RMSNorm rescales each vector (the last axis) to unit root mean square and then applies a learned "
    "per-channel gain; unlike LayerNorm it does not centre the vector. Think about what x^2 does in float16",
    "compute in float32: xf = x.float(); divide xf by sqrt(mean(xf^2 over the last axis) + eps), eps inside the "
    "square root, keepdim=True; cast back to x.dtype, then multiply by weight",
    "xf = x.float(); return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight",
))
def rms_norm(fn, ref_fn):
    g = _gen(4)
    cases = [
        Case("B=2 T=5 C=12 with weight", (torch.randn(2, 5, 12, generator=g), torch.rand(12, generator=g) + 0.5, 1e-6)),
        Case("shifted input (mean 3)", (torch.randn(4, 9, generator=g) + 3.0, torch.ones(9), 1e-6)),
        Case("tiny input (~1e-3), eps=1e-5", (torch.randn(3, 7, generator=g) * 1e-3, torch.rand(7, generator=g), 1e-5)),
    ]
    compare_cases(fn, ref_fn, cases, atol=1e-5, grad_wrt=(0, 1), mistakes=RMS_MISTAKES)
    compare_cases(fn, ref_fn, _rms_half_cases(), atol=4e-3, rtol=4e-3, mistakes=RMS_MISTAKES)
    compare_cases(fn, ref_fn, _rms_bfloat16_cases(), atol=2e-2, rtol=2e-2, mistakes=RMS_MISTAKES)  # 8-bit mantissa


# --------------------------------------------------------------------------------------------------------
# 2.7 pre-norm block


def _block_cases() -> Iterator[Case]:
    for seed, (B, T, C, H) in enumerate([(2, 6, 24, 3), (1, 9, 16, 4)]):
        block = _scaled_weights(Block(GPTConfig(n_embd=C, n_head=H)), 0.3, 50 + seed)
        x = torch.randn(B, T, C, generator=_gen(60 + seed)) * 2 + 1  # a mean: post-norm then differs more
        yield Case(f"B={B} T={T} C={C}, {H} heads", (x, block, torch.arange(T)))
    block = _scaled_weights(Block(GPTConfig(n_embd=16, n_head=4, norm_eps=0.1)), 0.3, 52)
    x = torch.randn(2, 9, 16, generator=_gen(62)) * 2 + 1
    yield Case("B=2 T=9 C=16, 4 heads, norm eps 0.1, positions with gaps", (x, block, GAPPED_POSITIONS))


def _block_variant(x: torch.Tensor, block: Block, positions: torch.Tensor, *, wiring: str = "pre",
                   causal: bool = True, norm_eps: bool = True, own_positions: bool = False) -> torch.Tensor:
    """A block wired differently (``wiring``), whose attention has no causal mask or ignores ``positions``, or whose
    norms use rms_norm's default eps instead of their own (``norm_eps=False``)."""
    def attn(h: torch.Tensor) -> torch.Tensor:
        return _self_attention_variant(h, block.attn, positions, causal=causal, own_positions=own_positions)

    def n1(h: torch.Tensor) -> torch.Tensor:
        return block.norm1(h) if norm_eps else ref.rms_norm(h, block.norm1.weight)

    def n2(h: torch.Tensor) -> torch.Tensor:
        return block.norm2(h) if norm_eps else ref.rms_norm(h, block.norm2.weight)

    mlp = block.mlp
    if wiring == "post":
        h = n1(x + attn(x))
        return n2(h + mlp(h))
    if wiring == "no attention residual":
        h = attn(n1(x))
        return h + mlp(n2(h))
    if wiring == "no mlp residual":
        return mlp(n2(x + attn(n1(x))))
    if wiring == "parallel":
        return x + attn(n1(x)) + mlp(n2(x))
    if wiring == "one norm":
        h = x + attn(n1(x))
        return h + mlp(n1(h))
    h = x + attn(n1(x))
    return h + mlp(n2(h))


BLOCK_MISTAKES = [
    Mistake(lambda x, block, positions: _block_variant(x, block, positions, wiring="post"),
            "that is a post-norm block (normalise after adding); a pre-norm block normalises each sublayer's "
            "input and leaves the residual stream alone"),
    Mistake(lambda x, block, positions: _block_variant(x, block, positions, wiring="no attention residual"),
            "the attention output replaces the residual stream; it should be added to it"),
    Mistake(lambda x, block, positions: _block_variant(x, block, positions, wiring="no mlp residual"),
            "the MLP's output replaces the residual stream; it should be added to it"),
    Mistake(lambda x, block, positions: _block_variant(x, block, positions, wiring="parallel"),
            "attention and the MLP both read x (a parallel block); the MLP reads the stream after attention"),
    Mistake(lambda x, block, positions: _block_variant(x, block, positions, wiring="one norm"),
            "norm1 was used before the MLP too; each sublayer has its own norm (norm2 for the MLP)"),
    Mistake(lambda x, block, positions: _block_variant(x, block, positions, causal=False),
            "the attention has no causal mask: every position also sees the positions after it"),
    Mistake(lambda x, block, positions: _block_variant(x, block, positions, norm_eps=False),
            "the norms ran with rms_norm's default eps, not the block's own (block.norm1.eps, block.norm2.eps)"),
    Mistake(lambda x, block, positions: _block_variant(x, block, positions, own_positions=True),
            "the attention rotated at positions 0..T-1, not at the positions passed in"),
]


@chapter.exercise("2.7", reference=answers.transformer_block, hints=(
    "a pre-norm block has two sublayers; each one reads a normalised copy of the residual stream and adds its "
    "output back to the stream",
    "first your self_attention on rms_norm(x, block.norm1.weight, block.norm1.eps), added to x; then block.mlp "
    "on the second norm (block.norm2) of that sum, added to the sum; the stream itself is never normalised",
    "h = x + attention_layer_fn(norm_fn(x, block.norm1.weight, block.norm1.eps), block.attn, positions); return "
    "h + block.mlp(norm_fn(h, block.norm2.weight, block.norm2.eps))",
))
def transformer_block(fn, ref_fn):
    with torch.no_grad():
        compare_cases(fn, ref_fn, _block_cases(), atol=1e-5, mistakes=BLOCK_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 2.8 the GPT forward pass


def _gpt_cases() -> Iterator[Case]:
    for seed, (tie, B, T, eps) in enumerate([(True, 2, 9, 1e-6), (True, 1, 1, 1e-6), (False, 3, 12, 0.05)]):
        config = GPTConfig(vocab_size=11, block_size=12, n_layer=3, n_head=2, n_embd=16, tie_weights=tie, norm_eps=eps)
        torch.manual_seed(70 + seed)
        model = _scaled_weights(GPT(config), 0.3, 70 + seed)
        idx = torch.randint(0, 11, (B, T), generator=_gen(80 + seed))
        head = "tied head" if tie else "separate head"
        yield Case(f"3 layers, {head}, B={B} T={T}, norm eps {eps:g}", (model, idx))


def _gpt_variant(model: GPT, idx: torch.Tensor, *, final_norm: bool = True, probs: bool = False,
                 reverse: bool = False, scale_embedding: bool = False, chained: bool = True,
                 final_eps: bool = True, embedding_head: bool = False) -> torch.Tensor:
    """The GPT forward pass with one thing changed."""
    positions = torch.arange(idx.shape[1], device=idx.device)
    emb = model.wte(idx)  # (B, T, C)
    if scale_embedding:
        emb = emb * math.sqrt(emb.shape[-1])
    x = emb
    for block in (list(model.blocks)[::-1] if reverse else model.blocks):
        x = answers.transformer_block(x if chained else emb, block, positions)
    if final_norm:
        x = model.norm_f(x) if final_eps else ref.rms_norm(x, model.norm_f.weight)
    logits = x @ model.wte.weight.T if embedding_head else model.lm_head(x)  # (B, T, V)
    return logits.softmax(-1) if probs else logits


GPT_MISTAKES = [
    Mistake(lambda model, idx: _gpt_variant(model, idx, final_norm=False),
            "the last normalisation (model.norm_f) is missing before the head"),
    Mistake(lambda model, idx: _gpt_variant(model, idx, probs=True),
            "those are probabilities (a softmax); the forward pass returns logits, and the loss does the softmax"),
    Mistake(lambda model, idx: _gpt_variant(model, idx, reverse=True), "the blocks ran in reverse order"),
    Mistake(lambda model, idx: _gpt_variant(model, idx, scale_embedding=True),
            "the embeddings were multiplied by sqrt(C) (as in the original transformer); this GPT uses them as "
            "they are"),
    Mistake(lambda model, idx: _gpt_variant(model, idx, chained=False),
            "every block read the embeddings; each block reads the previous block's output"),
    Mistake(lambda model, idx: _gpt_variant(model, idx, final_eps=False),
            "the final norm ran with rms_norm's default eps, not model.norm_f.eps"),
    Mistake(lambda model, idx: _gpt_variant(model, idx, embedding_head=True),
            "the logits were computed with the token embedding (x @ model.wte.weight.T); that is the head only when "
            "it is tied to the embedding: this model has its own, model.lm_head"),
]


@chapter.exercise("2.8", reference=answers.gpt_forward, hints=(
    "tokens become vectors (model.wte), every block transforms the stream in turn, and a final norm and the "
    "head turn the last stream into one logit per vocabulary entry; positions enter inside attention only",
    "x = model.wte(idx); positions = torch.arange(T) on idx's device; x = transformer_block(x, block, positions) "
    "for each block of model.blocks in order; then rms_norm with model.norm_f's weight and eps, then model.lm_head",
    "x = model.wte(idx); for block in model.blocks: x = block_fn(x, block, torch.arange(T, device=idx.device)); "
    "return model.lm_head(final_norm_fn(x, model.norm_f.weight, model.norm_f.eps)) with T = idx.shape[1]",
))
def gpt_forward(fn, ref_fn):
    with torch.no_grad():
        compare_cases(fn if fn is ref_fn else _assembled(fn), ref_fn, _gpt_cases(), atol=1e-4, mistakes=GPT_MISTAKES)
    check_off_cpu(fn, next(_gpt_cases()))


_LIBRARY_FORWARD = inspect.unwrap(GPT.forward).__code__


def _assembled(fn: Callable) -> Callable:
    """``fn``, failing when its token embedding runs inside ``GPT.forward`` (the answer key is that call)."""
    def run(model: GPT, idx: torch.Tensor) -> torch.Tensor:
        inside: list[bool] = []
        hook = model.wte.register_forward_hook(lambda *_: inside.append(running(_LIBRARY_FORWARD)))
        try:
            out = fn(model, idx)
        finally:
            hook.remove()
        if any(inside):
            raise CheckFailure("your function calls model(idx), the library's forward pass: the exercise is to "
                               "assemble it from model.wte, your transformer_block, rms_norm and model.lm_head")
        return out
    return run


# --------------------------------------------------------------------------------------------------------
# 2.9 the training step

TRAIN_CONFIG = GPTConfig(vocab_size=10, block_size=24, n_layer=2, n_head=2, n_embd=32)
TRAIN_STEPS, TRAIN_BATCH, TRAIN_LR = 150, 16, 1e-2
TRAIN_LOSS_TARGET = 0.5  # nats per token on the tiny corpus after TRAIN_STEPS AdamW steps; uniform is ln 10 = 2.30
CORPUS_PERIOD = 30


def _forward_in_use() -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """The learner's ``gpt_forward`` once its check has passed, else the reference (silently)."""
    return chapter.passed("gpt_forward")


def tiny_corpus() -> torch.Tensor:
    """A seeded random sequence of :data:`CORPUS_PERIOD` tokens repeated: ``(20 * CORPUS_PERIOD,)`` int64. The
    next token is a function of the last two, so a model that has learnt it predicts it almost surely."""
    cycle = torch.randint(0, TRAIN_CONFIG.vocab_size, (CORPUS_PERIOD,), generator=_gen(90))
    return cycle.repeat(20)


def _windows(corpus: torch.Tensor, n: int, length: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, corpus.numel() - length + 1, (n,), generator=g)
    return corpus[starts[:, None] + torch.arange(length)]  # (n, length)


def train_briefly(step_fn: Callable, forward: Callable, steps: int = TRAIN_STEPS) -> float:
    """Train a fresh tiny GPT on :func:`tiny_corpus` with ``step_fn(model, optimizer, chunk, forward)`` for ``steps``
    AdamW steps, then return the next-token loss (nats) of the trained weights under the package's GPT forward
    (so a forward that peeks at the future, or wires the model differently, does not count)."""
    torch.manual_seed(91)
    model = GPT(TRAIN_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR)
    corpus, g = tiny_corpus(), _gen(92)
    T = TRAIN_CONFIG.block_size
    for i in range(steps):
        call(step_fn, model, opt, _windows(corpus, TRAIN_BATCH, T + 1, g), forward, 1.0, where=f"training step {i}")
    with torch.no_grad():
        chunk = _windows(corpus, 64, T + 1, _gen(93))
        logits, _ = model(chunk[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()).item()


def _step_scenario(step_fn: Callable, forward: Callable, seed: int, max_norm: float) -> tuple[list, dict]:
    """Three SGD steps of ``step_fn`` on a tiny seeded GPT: the losses returned and the parameters after."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=2, n_embd=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = _gen(seed)
    losses = []
    for i in range(3):
        chunk = torch.randint(0, 7, (4, 9), generator=g)
        losses.append(call(step_fn, model, opt, chunk, forward, max_norm, where=f"step {i + 1} of 3"))
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def _step_no_zero_grad(model, optimizer, chunk, forward, max_norm=1.0):
    logits = forward(model, chunk[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    return loss.item()


def _step_variant(model, optimizer, chunk, forward, max_norm=1.0, *, shift: bool = True, clip: bool | str = True,
                  step: bool = True, reduction: str = "mean"):
    optimizer.zero_grad()
    logits = forward(model, chunk[:, :-1])
    targets = chunk[:, 1:] if shift else chunk[:, :-1]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
    loss.backward()
    if clip == "each":
        for p in model.parameters():
            torch.nn.utils.clip_grad_norm_(p, max_norm)
    elif clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if step:
        optimizer.step()
    return loss.item()


STEP_MISTAKES = [
    Mistake(_step_no_zero_grad, "the gradients of earlier steps were never cleared (zero_grad), so backward() adds "
            "each step's gradient to the old ones"),
    Mistake(lambda *a: _step_variant(*a, shift=False), "the targets are the inputs themselves, not shifted: the "
            "model learns to copy the token it already sees instead of predicting the next one"),
    Mistake(lambda *a: _step_variant(*a, clip=False), "the gradient norm was not clipped to max_norm"),
    Mistake(lambda *a: _step_variant(*a, clip="each"), "each parameter's gradient was clipped to max_norm on its "
            "own; clipping scales all the gradients together, by their total norm over every parameter"),
    Mistake(lambda *a: _step_variant(*a, step=False), "the parameters never changed: the optimizer did not step, "
            "or the gradients were cleared between backward() and step()"),
    Mistake(lambda *a: _step_variant(*a, reduction="sum"), "the loss is summed over the positions; take the mean, "
            "so the step size does not grow with the batch"),
]


@chapter.exercise("2.9", reference=answers.train_step, hints=(
    "one step: forget the old gradients, predict every next token of the chunk, measure the cross-entropy, "
    "back-propagate, keep the gradient from exploding, update; which token is the target of position t?",
    "optimizer.zero_grad(); logits = forward(model, chunk[:, :-1]) (B, T, V); the targets are chunk[:, 1:]; "
    "F.cross_entropy on logits.flatten(0, 1) and targets.flatten(); loss.backward(); "
    "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm); optimizer.step(); return loss.item()",
    "optimizer.zero_grad(); loss = F.cross_entropy(forward(model, chunk[:, :-1]).flatten(0, 1), chunk[:, "
    "1:].flatten()); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm); "
    "optimizer.step(); return loss.item()",
))
def train_step(fn, ref_fn):
    forward = _forward_in_use()
    for seed, max_norm in [(0, 1e3), (1, 0.05)]:
        where = f"3 SGD steps of a 1-layer GPT, max_norm={max_norm:g}"
        expected = _step_scenario(ref_fn, forward, seed, max_norm)
        got = _step_scenario(fn, forward, seed, max_norm)
        kind = next((type(loss).__name__ for loss in got[0] if not isinstance(loss, float)), None)
        if kind:
            raise CheckFailure(f"your function returned the loss as a {kind} on input {where!r}; return a Python "
                               "float (loss.item()): a tensor kept in a list of losses holds on to its step")
        try:
            compare(got[0], expected[0], where=where, atol=1e-5, name="the losses returned")
            compare(got[1], expected[1], where=where, atol=1e-5, name="the parameters after the steps")
        except CheckFailure as exc:
            scenario = [Mistake(lambda m=m: _step_scenario(m.fn, forward, seed, max_norm), m.says)
                        for m in STEP_MISTAKES]
            raise explain(exc, scenario, Case(where), got, atol=1e-5) from None
    loss = train_briefly(fn, forward)
    if not loss < TRAIN_LOSS_TARGET:
        raise CheckFailure(f"after {TRAIN_STEPS} AdamW steps on the tiny repeated corpus the next-token loss is "
                           f"{loss:.3f} nats, not below {TRAIN_LOSS_TARGET}")


# --------------------------------------------------------------------------------------------------------
# 2.10 attention with a KV cache


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
# the caches after the call, when the function attended to the new keys and values without storing them
CACHE_WRITE_MISTAKES = [
    Mistake(lambda q, k_new, v_new, k_cache, v_cache, pos: (k_cache, v_cache),
            "the new keys and values were not written into the caches at [pos : pos + T]; the next decoding step "
            "reads them from there"),
]


@chapter.exercise("2.10", reference=answers.cached_attention, hints=(
    "the cache holds the keys and values of the first pos positions; the new tokens add theirs, and then "
    "attend like any causal attention over everything written so far",
    "write k_new and v_new into the caches at [pos : pos + T]; attend over positions [0 : pos + T] only (the "
    "rest of the buffer is empty) with the causal mask for T queries over pos + T keys",
    "k_cache[:, :, pos:pos+T] = k_new; v_cache[:, :, pos:pos+T] = v_new; return attention(q, k_cache[:, :, "
    ":pos+T], v_cache[:, :, :pos+T], causal_mask(T, pos + T).to(q.device))",
))
def cached_attention(fn, ref_fn):
    for case in _cache_cases():
        a_ref, a_fn = clone_args(case.args), clone_args(case.args)
        expected = ref_fn(*a_ref)
        kept = clone_args(a_fn)
        got = call(fn, *a_fn, where=case.name)
        check_unchanged(("q", "k_new", "v_new", None, None, "pos"), kept, a_fn, case.name)
        compare_explained(got, expected, CACHE_MISTAKES, case)
        try:
            compare(a_fn[3], a_ref[3], where=case.name, name="k_cache after the call")
            compare(a_fn[4], a_ref[4], where=case.name, name="v_cache after the call")
        except CheckFailure as exc:
            raise explain(exc, CACHE_WRITE_MISTAKES, case, (a_fn[3], a_fn[4])) from None
    check_off_cpu(fn, next(_cache_cases()))


# --------------------------------------------------------------------------------------------------------
# 2.11 / 2.12 top-k and top-p


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
    Mistake(lambda logits, k: sampling.top_k_filter(logits, k - 1),
            "off by one: only k - 1 tokens were kept; the token with the k-th largest logit stays too (remove only "
            "the logits strictly below it)"),
    Mistake(_top_k_by_position, "exactly k tokens were kept, so tokens tied with the k-th largest logit were "
            "dropped; the filter must depend on the values only, so every tie stays"),
    Mistake(_top_k_zero_fill, "the removed logits were set to 0, which still has probability; a removed token "
            "needs -inf"),
]


@chapter.exercise("2.11", reference=sampling.top_k_filter, hints=(
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
    yield Case("batched (2, 3, 15) logits, p=0.7", (torch.randn(2, 3, 15, generator=g) * 2, 0.7))


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
    Mistake(lambda logits, p: sampling.top_p_filter(logits.transpose(1, -1), p).transpose(1, -1),
            "the filter worked along axis 1, which is the vocabulary only for 2-D (B, V) logits; it must work along "
            "the last axis (dim=-1) whatever the leading axes"),
]


@chapter.exercise("2.12", reference=sampling.top_p_filter, hints=(
    "keep the most likely tokens, in order of probability, until together they hold at least p of the "
    "probability mass; check the token that crosses p and tokens tied with the last one kept",
    "sort the probabilities (the softmax, not the logits) in descending order; keep a token when the mass "
    "BEFORE it is < p, so the token that crosses p stays; then keep every token at least as likely as the "
    "least likely kept one, and set the others to -inf; p = 1 keeps everything",
    "probs = torch.softmax(logits, -1); sp, _ = probs.sort(-1, descending=True); keep = (sp.cumsum(-1) - sp) < "
    "p; least = torch.where(keep, sp, 1.0).amin(-1, keepdim=True); return logits.masked_fill(probs < least, "
    "float('-inf'))",
))
def top_p_filter(fn, ref_fn):
    compare_cases(fn, ref_fn, _top_p_cases(), mistakes=TOP_P_MISTAKES)


__all__ = [
    "chapter", "use", "hint", "masked_softmax", "causal_mask", "attention", "rotary_embedding", "self_attention",
    "rms_norm", "transformer_block", "gpt_forward", "train_step", "cached_attention", "top_k_filter", "top_p_filter",
    "train_briefly", "tiny_corpus", "TRAIN_LOSS_TARGET",
]
