"""Checks for chapter 02, the causal transformer: ``checks.ch02.attention(attention)`` etc.

Each check runs the learner's function on seeded random inputs and edge cases (sizes that are not
"nice", fully masked rows, huge scores, ties) and compares it with the reference in
:mod:`ar_course.transformer.functional`, :mod:`ar_course.sampling` or, for what the modules do not call,
:mod:`ar_course.checks.reference.ch02`.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ar_course import sampling
from ar_course.checks.core import Case, Chapter, call, clone_args, compare, compare_cases
from ar_course.checks.reference import ch02 as answers
from ar_course.transformer import functional as ref
from ar_course.transformer.model import GPTConfig, RMSNorm, SelfAttention, SwiGLU

chapter = Chapter(2, "The causal transformer")
use = chapter.use


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


@chapter.exercise(
    "2.1", reference=ref.masked_softmax,
    hint="fill masked scores with -inf, subtract the row max over kept entries, and give a fully masked "
    "row zeros instead of 0/0 = NaN",
)
def masked_softmax(fn, ref_fn):
    compare_cases(fn, ref_fn, _softmax_cases(), atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# 2.2 causal mask


@chapter.exercise(
    "2.2", reference=ref.causal_mask,
    hint="query i sits at absolute position t_k - t_q + i and sees keys up to and including that position; "
    "return dtype torch.bool",
)
def causal_mask(fn, ref_fn):
    cases = [Case(f"t_q={a}, t_k={b}", (a, b)) for a, b in [(1, 1), (5, 5), (7, 7), (3, 8), (1, 9), (4, 6)]]
    compare_cases(fn, ref_fn, cases)


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


@chapter.exercise(
    "2.3", reference=ref.scaled_dot_product_attention,
    hint="scores = q @ k.transpose(-2, -1) / sqrt(D) with D = q.shape[-1]; softmax over the keys (last dim) "
    "with your masked_softmax; then @ v",
)
def attention(fn, ref_fn):
    compare_cases(fn, ref_fn, _attention_cases(), atol=1e-5, grad_wrt=(0, 1, 2))


# --------------------------------------------------------------------------------------------------------
# 2.4 / 2.5 heads


@chapter.exercise(
    "2.4", reference=ref.split_heads,
    hint="view as (B, T, H, D) so each head owns a contiguous block of D channels, then transpose(1, 2)",
)
def split_heads(fn, ref_fn):
    g = _gen(2)
    cases = [
        Case("B=2 T=5 C=12, 3 heads", (torch.randn(2, 5, 12, generator=g), 3)),
        Case("B=1 T=7 C=16, 4 heads", (torch.arange(112.0).view(1, 7, 16), 4)),
        Case("B=3 T=1 C=10, 1 head", (torch.randn(3, 1, 10, generator=g), 1)),
    ]
    compare_cases(fn, ref_fn, cases)


@chapter.exercise(
    "2.5", reference=ref.merge_heads,
    hint="transpose(1, 2) back to (B, T, H, D) before reshaping to (B, T, H*D) (reshape, not view: the "
    "transposed tensor is not contiguous)",
)
def merge_heads(fn, ref_fn):
    g = _gen(3)
    cases = [
        Case("B=2 H=3 T=5 D=4", (torch.randn(2, 3, 5, 4, generator=g),)),
        Case("B=1 H=4 T=7 D=4 (arange)", (torch.arange(112.0).view(1, 4, 7, 4),)),
        Case("split_heads output, B=2 T=6 C=15, 5 heads", (ref.split_heads(torch.randn(2, 6, 15, generator=g), 5),)),
    ]
    compare_cases(fn, ref_fn, cases)


# --------------------------------------------------------------------------------------------------------
# 2.6 RMSNorm


@chapter.exercise(
    "2.6", reference=ref.rms_norm,
    hint="x * rsqrt(mean(x**2, last dim) + eps) * weight: no mean subtraction, eps inside the square root",
)
def rms_norm(fn, ref_fn):
    g = _gen(4)
    cases = [
        Case("B=2 T=5 C=12 with weight", (torch.randn(2, 5, 12, generator=g), torch.rand(12, generator=g) + 0.5, 1e-6)),
        Case("shifted input (mean 3)", (torch.randn(4, 9, generator=g) + 3.0, torch.ones(9), 1e-6)),
        Case("tiny input (~1e-3), eps=1e-5", (torch.randn(3, 7, generator=g) * 1e-3, torch.rand(7, generator=g), 1e-5)),
    ]
    compare_cases(fn, ref_fn, cases, atol=1e-5, grad_wrt=(0,))


# --------------------------------------------------------------------------------------------------------
# 2.7 rotary embedding


def _rope_cases() -> Iterator[Case]:
    g = _gen(5)
    yield Case("B=2 H=3 T=6 D=8, positions 0..5", (torch.randn(2, 3, 6, 8, generator=g), torch.arange(6)))
    yield Case("T=4 D=16, positions 37..40", (torch.randn(1, 2, 4, 16, generator=g), torch.arange(37, 41)))
    yield Case("T=5 D=6, unordered positions", (torch.randn(1, 1, 5, 6, generator=g), torch.tensor([9, 2, 0, 130, 5])))
    yield Case("T=3 D=8, base=100", (torch.randn(2, 1, 3, 8, generator=g), torch.tensor([1, 4, 7]), 100.0))


@chapter.exercise(
    "2.7", reference=answers.rotary_embedding,
    hint="pair feature i with feature i + D/2 (not 2i with 2i+1); angle = position * base**(-2i/D); "
    "out = cat(x1*cos - x2*sin, x1*sin + x2*cos)",
)
def rotary_embedding(fn, ref_fn):
    compare_cases(fn, ref_fn, _rope_cases(), atol=1e-4)


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


@chapter.exercise(
    "2.8", reference=answers.pre_norm_block,
    hint="normalise the input of each sublayer, never the residual stream: h = x + attn(norm1(x)); "
    "out = h + mlp(norm2(h))",
)
def transformer_block(fn, ref_fn):
    with torch.no_grad():
        compare_cases(fn, ref_fn, _block_cases(), atol=1e-5)


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


@chapter.exercise(
    "2.9", reference=answers.cached_attention,
    hint="write k_new/v_new into the caches at [pos : pos+T], attend over positions [0 : pos+T] only (the "
    "rest of the buffer is empty), with causal_mask(T, pos+T) so new tokens do not see later new tokens",
)
def cached_attention(fn, ref_fn):
    for case in _cache_cases():
        a_ref, a_fn = clone_args(case.args), clone_args(case.args)
        expected = ref_fn(*a_ref)
        got = call(fn, *a_fn, where=case.name)
        compare(got, expected, where=case.name, atol=1e-5)
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


@chapter.exercise(
    "2.10", reference=sampling.top_k_filter,
    hint="find the k-th largest value per row (torch.topk(...).values[..., -1:]) and set every logit "
    "strictly below it to -inf; ties with it stay; k >= V keeps everything",
)
def top_k_filter(fn, ref_fn):
    compare_cases(fn, ref_fn, _top_k_cases())


def _top_p_cases() -> Iterator[Case]:
    g = _gen(8)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    yield Case("probs (0.5, 0.3, 0.15, 0.05), p=0.6 (the 0.3 token crosses 0.6)", (probs.log(), 0.6))
    yield Case("6x40 random logits, p=0.9", (torch.randn(6, 40, generator=g) * 2, 0.9))
    yield Case("5x17 random logits, p=0.35", (torch.randn(5, 17, generator=g) * 3, 0.35))
    yield Case("p=1 keeps everything", (torch.randn(2, 9, generator=g), 1.0))
    yield Case("tiny p keeps the top token", (torch.randn(3, 12, generator=g), 1e-4))
    yield Case("three tokens tied at the threshold", (torch.tensor([[2.0, 1.0, 1.0, 1.0, -3.0]]), 0.5))


@chapter.exercise(
    "2.11", reference=sampling.top_p_filter,
    hint="sort the probabilities (softmax, not logits) in descending order; keep a token when the mass "
    "BEFORE it is < p, so the token crossing p stays; then keep every token at least as likely as the "
    "least likely kept one (ties)",
)
def top_p_filter(fn, ref_fn):
    compare_cases(fn, ref_fn, _top_p_cases())


__all__ = [
    "chapter", "use", "masked_softmax", "causal_mask", "attention", "split_heads", "merge_heads", "rms_norm",
    "rotary_embedding", "transformer_block", "cached_attention", "top_k_filter", "top_p_filter",
]
