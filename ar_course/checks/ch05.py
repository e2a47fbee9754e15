"""Checks for chapter 05, speculative decoding: ``checks.ch05.acceptance_probability(acceptance_probability)``.

The random exercises (a speculative round, the Jacobi verification) get the uniform numbers ``u`` as an
argument and make their draws with ``sampling.sample_from_probs(..., generator)`` in the documented order,
so the check can run them next to the reference with identically seeded generators and compare tokens.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ar_course import sampling
from ar_course.checks.core import Case, Chapter, call, compare, compare_cases
from ar_course.checks.reference import ch05 as answers
from ar_course.speculative import analysis
from ar_course.speculative import functional as ref
from ar_course.transformer.model import KVCache

chapter = Chapter(5, "Speculative decoding")
use = chapter.use


def _dists(g: torch.Generator, *shape: int, sharp: float = 1.5, zeros: bool = False) -> torch.Tensor:
    """Random distributions ``(*shape)`` along the last dim; ``zeros=True`` cuts some entries to 0."""
    logits = torch.randn(*shape, generator=g) * sharp
    if zeros:
        logits = logits.masked_fill(torch.rand(*shape, generator=g) < 0.3, float("-inf"))
        logits[..., 0] = logits[..., 0].clamp(min=-1.0)  # keep every row non-empty
    return torch.softmax(logits, dim=-1)


# --------------------------------------------------------------------------------------------------------
# 5.1 the accept test, 5.2 the residual distribution


def _accept_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(51)
    for name, shape in [("6 rows, V=7", (6, 7)), ("batch 2x5, V=11", (2, 5, 11))]:
        p, q = _dists(g, *shape, zeros=True), _dists(g, *shape)
        tokens = sampling.sample_from_probs(q, g)
        yield Case(name, (p, q, tokens))
    p = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.1, 0.8], [0.2, 0.2, 0.6], [0.25, 0.5, 0.25]])
    yield Case("hand-made: p > q, p == q, p < q, p = 0", (p[[0, 1, 2, 0]], q[[0, 1, 2, 0]], torch.tensor([0, 2, 1, 2])))


@chapter.exercise("5.1", reference=ref.acceptance_probability,
                  hint="gather p and q at the drafted token and take min(1, p / q): a probability never exceeds 1")
def acceptance_probability(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _accept_cases())


def _residual_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(52)
    yield Case("5 rows, V=9", (_dists(g, 5, 9, zeros=True), _dists(g, 5, 9)))
    yield Case("batch 3x2, V=6", (_dists(g, 3, 2, 6), _dists(g, 3, 2, 6, zeros=True)))
    p = torch.tensor([[0.0, 0.0, 0.6, 0.4], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])
    yield Case("disjoint supports, p == q, overlapping", (p, q))


@chapter.exercise("5.2", reference=ref.residual_distribution,
                  hint="clamp p - q at 0 and divide by its row sum; where that sum is 0 (p == q) return p")
def residual_distribution(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _residual_cases())


# --------------------------------------------------------------------------------------------------------
# 5.3 one speculative round, 5.6 the Jacobi verification


def _round_inputs() -> Iterator[tuple[str, tuple]]:
    """``(name, (p, q, draft, u))``: random rounds plus an identical, a disjoint and a greedy draft."""
    g = torch.Generator().manual_seed(53)
    for i in range(40):
        L, V = 1 + i % 5, 3 + i % 6
        p, q = _dists(g, L + 1, V, sharp=2.0, zeros=i % 2 == 0), _dists(g, L, V, sharp=2.0)
        draft = sampling.sample_from_probs(q, g)
        yield f"random round {i}: L={L}, V={V}", (p, q, draft, torch.rand(L, generator=g))
    p = _dists(g, 4, 6)
    u = torch.rand(3, generator=g)
    yield "draft == target (everything accepted)", (p, p[:3].clone(), torch.tensor([1, 4, 2]), u)
    p = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    yield "disjoint supports at the first draft", (p, q, torch.tensor([1, 3]), torch.tensor([0.01, 0.5]))
    p = torch.eye(5)[[2, 0, 4, 1]]
    q = torch.eye(5)[[2, 0, 3]]
    yield "greedy (one-hot) rows, rejection at 2", (p, q, torch.tensor([2, 0, 3]), torch.tensor([0.9, 0.99, 0.0]))


def _compare_random(fn: Callable, ref_fn: Callable) -> None:
    for seed, (name, args) in enumerate(_round_inputs()):
        expected = ref_fn(*args, torch.Generator().manual_seed(seed))
        got = call(fn, *[a.clone() for a in args], torch.Generator().manual_seed(seed), where=name)
        compare(got, expected, where=name)


@chapter.exercise("5.3", reference=ref.speculative_round,
                  hint="stop at the FIRST i with u[i] >= min(1, p/q); redraw it from the residual of row i; "
                       "if nothing is rejected, add a bonus token from p[L]; one sample_from_probs call")
def speculative_round(fn: Callable, ref_fn: Callable) -> None:
    _compare_random(fn, ref_fn)


@chapter.exercise("5.6", reference=ref.jacobi_verify,
                  hint="first the speculative round (m tokens); then carry = one sample_from_probs(p[m:]) "
                       "draw, with carry_q = p[m:] (empty when m = L + 1)")
def jacobi_verify(fn: Callable, ref_fn: Callable) -> None:
    _compare_random(fn, ref_fn)


# --------------------------------------------------------------------------------------------------------
# 5.4 cache rollback


@chapter.exercise("5.4", reference=ref.rollback_caches,
                  hint="each cache keeps min(its length, seq_len - 1) positions: the last token is fed next time")
def rollback_caches(fn: Callable, ref_fn: Callable) -> None:
    for lengths, seq_len in [((12, 7), 9), ((5, 5), 6), ((20, 3), 4), ((9,), 3), ((4, 10), 11)]:
        where = f"caches of lengths {list(lengths)}, sequence of {seq_len} tokens"
        got_caches, ref_caches = [], []
        for n in lengths:
            for bucket in (got_caches, ref_caches):
                c = KVCache(1, 1, 1, 24, 2)
                c.advance(n)
                bucket.append(c)
        ref_fn(ref_caches, seq_len)
        call(fn, got_caches, seq_len, where=where)
        compare([c.length for c in got_caches], [c.length for c in ref_caches], where=where, name="cache lengths")


# --------------------------------------------------------------------------------------------------------
# 5.5 the expected number of tokens per target call


@chapter.exercise("5.5", reference=analysis.expected_tokens_per_call,
                  hint="(1 - alpha**(gamma + 1)) / (1 - alpha); at alpha = 1 every draft and the bonus come: gamma + 1")
def expected_tokens_per_call(fn: Callable, ref_fn: Callable) -> None:
    cases = [(0.0, 3), (0.5, 2), (0.8, 5), (0.37, 1), (0.9, 0), (1.0, 4), (0.99, 7)]
    for alpha, gamma in cases:
        where = f"alpha={alpha}, gamma={gamma}"
        compare(call(fn, alpha, gamma, where=where), ref_fn(alpha, gamma), where=where)


# --------------------------------------------------------------------------------------------------------
# 5.7 relaxed acceptance


def _relaxed_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(57)
    V = 10
    neighbors = ref.codebook_neighbors(torch.randn(V, 3, generator=g), 3)
    p, q = _dists(g, 8, V, sharp=2.0), _dists(g, 8, V, sharp=2.0)
    tokens = sampling.sample_from_probs(q, g)
    for delta in (0.0, 0.02, 0.15, 0.6):
        yield Case(f"8 rows, V={V}, 3 neighbours, delta={delta}", (p, q, tokens, neighbors, delta))
    p1 = torch.tensor([[0.5, 0.05, 0.05, 0.4]])
    q1 = torch.tensor([[0.1, 0.1, 0.7, 0.1]])
    nb = torch.tensor([[1, 2], [0, 2], [1, 0], [2, 1]])
    yield Case("neighbour mass 0.1 below delta 0.3", (p1, q1, torch.tensor([0]), nb, 0.3))


@chapter.exercise("5.7", reference=answers.relaxed_acceptance_probability,
                  hint="m = min(delta, p[neighbors[x]].sum()); accept with min(1, (p[x] + m) / q[x])")
def relaxed_acceptance_probability(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _relaxed_cases())
