"""Checks for chapter 05, speculative decoding: ``checks.ch05.accepted_prefix(accepted_prefix)`` etc.

The random exercises (a speculative round, the Jacobi verification) get the uniform numbers ``u`` as an
argument and make their draws with ``sampling.sample_from_probs(..., generator)`` in the documented order,
so the check can run them next to the reference with identically seeded generators and compare tokens.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ar_course import sampling
from ar_course.checks.core import (Case, Chapter, CheckFailure, Mistake, call, check_unchanged, clone_args, compare,
                                   compare_cases, compare_explained, explain)
from ar_course.checks.reference import ch05 as answers
from ar_course.speculative import functional as ref
from ar_course.transformer.model import KVCache

chapter = Chapter(5, "Speculative decoding")
use = chapter.use
hint = chapter.hint


def _dists(g: torch.Generator, *shape: int, sharp: float = 1.5, zeros: bool = False) -> torch.Tensor:
    """Random distributions ``(*shape)`` along the last dim; ``zeros=True`` cuts some entries to 0."""
    logits = torch.randn(*shape, generator=g) * sharp
    if zeros:
        logits = logits.masked_fill(torch.rand(*shape, generator=g) < 0.3, float("-inf"))
        logits[..., 0] = logits[..., 0].clamp(min=-1.0)  # keep every row non-empty
    return torch.softmax(logits, dim=-1)


# --------------------------------------------------------------------------------------------------------
# 5.1 how many drafts a round keeps, 5.2 the residual distribution


def _prefix_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(51)
    for name, (B, L, V) in [("64 rounds of 5 drafts, V=7", (64, 5, 7)), ("16 rounds of 9 drafts, V=4", (16, 9, 4))]:
        p, q = _dists(g, B, L, V, zeros=True), _dists(g, B, L, V)
        drafts = sampling.sample_from_probs(q, g)  # (B, L)
        yield Case(name, (p, q, drafts, torch.rand(B, L, generator=g)))
    p, q = _dists(g, 8, 6, 5), _dists(g, 8, 6, 5)
    yield Case("8 rounds where the draft is the target (every draft accepted)",
               (p, p.clone(), sampling.sample_from_probs(p, g), torch.rand(8, 6, generator=g)))
    p = torch.tensor([[[0.7, 0.3, 0.0], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]]]).repeat(3, 1, 1)  # (3, 3, 3)
    q = torch.tensor([[[0.1, 0.1, 0.8], [0.2, 0.2, 0.6], [0.25, 0.5, 0.25]]]).repeat(3, 1, 1)
    drafts = torch.tensor([[0, 2, 1], [2, 0, 0], [0, 1, 1]])  # accept probabilities (1, 1, .5), (0, 1, 1), (1, 1, .5)
    u = torch.tensor([[0.3, 0.9, 0.7], [0.1, 0.1, 0.1], [0.9, 0.99, 0.2]])
    yield Case("hand-made: a late rejection, a first-draft rejection after which all would pass, all accepted",
               (p, q, drafts, u))
    # u = 0 is a possible uniform number: a draft the target gives probability 0 must still fail (0 < 0 is False)
    p = torch.tensor([[[0.0, 0.6, 0.4], [0.3, 0.3, 0.4]], [[0.5, 0.5, 0.0], [0.2, 0.0, 0.8]]])  # (2, 2, 3)
    q = torch.tensor([[[0.5, 0.3, 0.2], [0.3, 0.3, 0.4]], [[0.4, 0.4, 0.2], [0.1, 0.6, 0.3]]])
    yield Case("u = 0 on drafts the target gives probability 0", (p, q, torch.tensor([[0, 2], [1, 1]]),
                                                                  torch.tensor([[0.0, 0.5], [0.2, 0.0]])))


def _at(dist: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``dist[..., tokens]``: the probability of each drafted token."""
    return dist.gather(-1, tokens[..., None]).squeeze(-1)


PREFIX_MISTAKES = [
    Mistake(lambda p, q, d, u: (u < (_at(p, d) / _at(q, d)).clamp(max=1)).long().sum(-1),
            "that counts every draft that passes; a round stops at its first rejection, so a draft after a "
            "rejected one never counts"),
    Mistake(lambda p, q, d, u: (u <= (_at(p, d) / _at(q, d)).clamp(max=1)).long().cumprod(-1).sum(-1),
            "that keeps a draft when u <= min(1, p/q): at u = 0 it accepts a token the target gives probability 0; "
            "the test is strict, u < min(1, p/q)"),
    Mistake(lambda p, q, d, u: (u < (_at(q, d) / _at(p, d)).nan_to_num(1.0).clamp(max=1)).long().cumprod(-1).sum(-1),
            "that tests with q/p; the ratio is the target's probability over the draft's"),
    Mistake(lambda p, q, d, u: (u >= (_at(p, d) / _at(q, d)).clamp(max=1)).long().cumprod(-1).sum(-1),
            "that keeps a draft when u >= min(1, p/q): it is accepted when u is below the acceptance probability"),
    Mistake(lambda p, q, d, u: (ref.accepted_prefix(p, q, d, u) + 1).clamp(max=d.shape[-1]),
            "off by one: the first rejected draft was counted too; a round keeps only the drafts before it"),
    Mistake(lambda p, q, d, u: (u < (1 + _at(p, d) - _at(q, d)).clamp(0, 1)).long().cumprod(-1).sum(-1),
            "that accepts with probability 1 - (q - p), a difference; the acceptance probability is the ratio "
            "min(1, p/q)"),
]


@chapter.exercise("5.1", reference=ref.accepted_prefix, hints=(
    "each draft passes with probability min(1, p(x) / q(x)), tested with its own uniform number; then think "
    "about what one rejection does to the drafts after it",
    "read p and q at the drafted tokens (gather on the last axis), compare u with the capped ratio, and count "
    "the leading passes of each row: a running product of the 0/1 passes is 1 exactly up to the first failure",
    "a = (p.gather(-1, d[..., None]) / q.gather(-1, d[..., None])).squeeze(-1).clamp(max=1); "
    "return (u < a).long().cumprod(dim=1).sum(dim=1)",
))
def accepted_prefix(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _prefix_cases(), mistakes=PREFIX_MISTAKES)


def _residual_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(52)
    yield Case("5 rows, V=9", (_dists(g, 5, 9, zeros=True), _dists(g, 5, 9)))
    yield Case("batch 3x2, V=6", (_dists(g, 3, 2, 6), _dists(g, 3, 2, 6, zeros=True)))
    p = torch.tensor([[0.0, 0.0, 0.6, 0.4], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])
    yield Case("disjoint supports, p == q, overlapping", (p, q))


RESIDUAL_MISTAKES = [
    Mistake(lambda p, q: (p - q).clamp(min=0), "those rows do not sum to 1: normalise the clamped difference"),
    Mistake(lambda p, q: ref.residual_distribution(q, p), "that is what q has more of than p; after a rejection "
            "the token comes from what p has more of than q"),
    Mistake(lambda p, q: p, "that is p itself; after a rejection the token comes from what p has more of than q, "
            "max(0, p - q) normalised (p only where p == q)"),
    Mistake(lambda p, q: (p - q).clamp(min=0) / (p - q).clamp(min=0).sum(-1, keepdim=True),
            "a row where p == q came out NaN (0 / 0): nothing is left of p - q there, and the residual falls back "
            "to p"),
]


@chapter.exercise("5.2", reference=ref.residual_distribution, hints=(
    "after a rejection, the replacement must come from the probability mass p has and q under-covers",
    "clamp p - q at 0 and normalise it to sum 1 along the last axis; where the clamped difference sums to 0 "
    "(p == q) there is nothing to correct: return p there",
    "r = (p - q).clamp(min=0); z = r.sum(-1, keepdim=True); return torch.where(z > 0, "
    "r / z.clamp_min(torch.finfo(p.dtype).tiny), p)",
))
def residual_distribution(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _residual_cases(), mistakes=RESIDUAL_MISTAKES)


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


def _round_from_p(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """The mistake: the token after a rejection drawn from p instead of the residual."""
    n = int(ref.accepted_prefix(p[None, :-1], q[None], draft[None], u[None]))
    return torch.cat([draft[:n], sampling.sample_from_probs(p[n], generator).view(1)])


def _round_keeps_going(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
    """The mistake: every draft that passes its own test kept, then a token from p[L]."""
    passes = u < (_at(p[:-1], draft) / _at(q, draft)).clamp(max=1)
    return torch.cat([draft[passes], sampling.sample_from_probs(p[-1], generator).view(1)])


def _round_no_bonus(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    out = ref.speculative_round(p, q, draft, u, generator)
    return out[:-1] if len(out) == len(draft) + 1 else out


ROUND_MISTAKES = [
    Mistake(_round_from_p, "the token after a rejection was drawn from p; it comes from the residual distribution "
            "(exercise 5.2), which adds back the mass the draft under-covers, so the tokens follow p"),
    Mistake(_round_keeps_going, "that keeps every draft that passes its own test, even after a rejection; the round "
            "stops at its first rejection"),
    Mistake(_round_no_bonus, "the bonus token is missing: when all L drafts are accepted, the round adds one more "
            "token, drawn from p[L]"),
]


def _compare_random(fn: Callable, ref_fn: Callable, mistakes: list[Mistake] | None = None) -> None:
    """Run ``fn`` and ``ref_fn`` on every round with identically seeded generators; a difference that one of
    ``mistakes`` (called with the round's arguments and a generator seeded alike) reproduces is named."""
    for seed, (name, args) in enumerate(_round_inputs()):
        expected = ref_fn(*args, torch.Generator().manual_seed(seed))
        given = clone_args(args)
        got = call(fn, *given, torch.Generator().manual_seed(seed), where=name)
        check_unchanged(("p", "q", "draft", "u"), args, given, name)
        try:
            compare(got, expected, where=name)
        except CheckFailure as exc:
            seeded = [Mistake(lambda *a, m=m, seed=seed: m.fn(*a, torch.Generator().manual_seed(seed)), m.says)
                      for m in mistakes or ()]
            raise explain(exc, seeded, Case(name, args), got) from None


@chapter.exercise("5.3", reference=ref.speculative_round, hints=(
    "exercise 5.1 tells how many drafts the round keeps; what remains is the one token drawn after them: a "
    "correction after a rejection, or a bonus when nothing was rejected",
    "accept draft i while u[i] < min(1, p/q); at the first rejection draw the replacement from the residual of "
    "row i (exercise 5.2) and stop; if all L drafts are accepted, add a bonus token drawn from p[L]; make that "
    "one draw with sampling.sample_from_probs and the generator",
    "n = int(prefix_fn(p[None, :L], q[None], draft[None], u[None])[0]) (5.1); dist = residual_fn(p[n], q[n]) (5.2) "
    "if n < L else p[L]; "
    "return torch.cat([draft[:n], sampling.sample_from_probs(dist, generator).view(1)])",
))
def speculative_round(fn: Callable, ref_fn: Callable) -> None:
    _compare_random(fn, ref_fn, ROUND_MISTAKES)


@chapter.exercise("5.6", reference=ref.jacobi_verify, hints=(
    "Jacobi decoding verifies like a speculative round, then reuses the target's rows it has not consumed as "
    "the next round's draft",
    "run the speculative round (it returns m tokens); the rows p[m:] the round did not use become the next "
    "draft's distributions, and one sample_from_probs draw from them its tokens (nothing is carried when m = L + 1)",
    "accepted = round_fn(p, q, draft, u, generator); m = len(accepted); carry_q = p[m:]; carry = "
    "sampling.sample_from_probs(carry_q, generator) if len(carry_q) else draft[:0]; return accepted, carry, "
    "carry_q",
))
def jacobi_verify(fn: Callable, ref_fn: Callable) -> None:
    _compare_random(fn, ref_fn)


# --------------------------------------------------------------------------------------------------------
# 5.4 cache rollback


def _rollback_first_only(caches: list[KVCache], seq_len: int) -> None:
    for cache in caches[:1]:
        cache.rollback(min(cache.length, seq_len - 1))


def _rollback_to_seq_len(caches: list[KVCache], seq_len: int) -> None:
    for cache in caches:
        cache.rollback(min(cache.length, seq_len))


ROLLBACK_MISTAKES = [  # the first that matches is named: on [7, 12] the first two both leave 12
    Mistake(_rollback_first_only, "only the first cache was rolled back (a return inside the loop stops after it); "
            "the later ones keep the positions computed for the rejected drafts"),
    Mistake(lambda caches, seq_len: None, "no cache was rolled back: they still hold the positions computed for "
            "the rejected drafts"),
    Mistake(_rollback_to_seq_len, "that keeps seq_len positions; the sequence's last token has not been fed to "
            "any model yet, so a cache holds at most seq_len - 1"),
]


def _lengths_after(fn: Callable, lengths: tuple[int, ...], seq_len: int) -> list[int]:
    """The cache lengths after ``fn`` rolls back fresh caches of ``lengths`` to a sequence of ``seq_len``."""
    caches = []
    for n in lengths:
        c = KVCache(1, 1, 1, 24, 2)
        c.advance(n)
        caches.append(c)
    fn(caches, seq_len)
    return [c.length for c in caches]


@chapter.exercise("5.4", reference=ref.rollback_caches, hints=(
    "after a round a cache may hold positions of rejected drafts, and the sequence's last token has not been "
    "fed to any model yet",
    "each cache keeps min(its length, seq_len - 1) positions: what it computed for rejected drafts goes, and "
    "the last token is fed at the next call; a shorter cache stays as it is",
    "for cache in caches: cache.rollback(min(cache.length, seq_len - 1))",
))
def rollback_caches(fn: Callable, ref_fn: Callable) -> None:
    # the last case rolls back the second cache only: a loop that stops after the first cache fails it
    for lengths, seq_len in [((12, 7), 9), ((5, 5), 6), ((20, 3), 4), ((9,), 3), ((4, 10), 11), ((7, 12), 9)]:
        where = f"caches of lengths {list(lengths)}, sequence of {seq_len} tokens"
        got_caches, ref_caches = [], []
        for n in lengths:
            for bucket in (got_caches, ref_caches):
                c = KVCache(1, 1, 1, 24, 2)
                c.advance(n)
                bucket.append(c)
        ref_fn(ref_caches, seq_len)
        call(fn, got_caches, seq_len, where=where)
        got = [c.length for c in got_caches]
        try:
            compare(got, [c.length for c in ref_caches], where=where, name="cache lengths")
        except CheckFailure as exc:
            scenario = [Mistake(lambda m=m, lengths=lengths, seq_len=seq_len: _lengths_after(m.fn, lengths, seq_len),
                                m.says) for m in ROLLBACK_MISTAKES]
            raise explain(exc, scenario, Case(where), got) from None


# --------------------------------------------------------------------------------------------------------
# 5.5 choosing the draft length from alpha and the cost ratio


def _tokens(alpha: float, gamma: int) -> float:
    """Expected tokens per round, for the mistakes below (the closed form, gamma + 1 at alpha = 1)."""
    return float(gamma + 1) if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def _first_best(speedups: dict[int, float]) -> tuple[int, float]:
    best = max(speedups, key=lambda g: (speedups[g], -g))
    return best, speedups[best]


def _drafts_only(alpha: float, c: float, max_gamma: int) -> tuple[int, float]:
    return _first_best({g: (_tokens(alpha, g) - 1) / (g * c + 1) if g else 1.0 for g in range(max_gamma + 1)})


def _off_by_one(alpha: float, c: float, max_gamma: int) -> tuple[int, float]:
    return _first_best({g: _tokens(alpha, g - 1) / (g * c + 1) if g else 1.0 for g in range(max_gamma + 1)})


def _no_target_call(alpha: float, c: float, max_gamma: int) -> tuple[int, float]:
    return _first_best({g: _tokens(alpha, g) / (g * c) if g else 1.0 for g in range(max_gamma + 1)})


def _never_plain(alpha: float, c: float, max_gamma: int) -> tuple[int, float]:
    return _first_best({g: _tokens(alpha, g) / (g * c + 1) for g in range(1, max_gamma + 1)})


def _ties_to_longest(alpha: float, c: float, max_gamma: int) -> tuple[int, float]:
    speedups = {g: _tokens(alpha, g) / (g * c + 1) for g in range(max_gamma + 1)}
    best = max(speedups, key=lambda g: (speedups[g], g))
    return best, speedups[best]


BEST_GAMMA_MISTAKES = [
    Mistake(_drafts_only, "that counts the accepted drafts only; the target call always adds one token of its own "
                          "(a correction or a bonus)"),
    Mistake(_off_by_one, "off by one: gamma drafts and the target's own token make gamma + 1 terms, "
                         "alpha^0 .. alpha^gamma"),
    Mistake(_no_target_call, "that prices a round at its gamma draft calls only; it also runs the target once, "
                             "so it costs gamma * c + 1 target calls"),
    Mistake(_never_plain, "that always speculates; when no gamma beats plain decoding, the answer is gamma = 0 "
                          "with speedup 1"),
    Mistake(_ties_to_longest, "on a tie, keep the shorter draft (the smallest gamma): the same speed for less work"),
]

# (alpha, c, max_gamma): an interior optimum, a short one, one where speculation loses, alpha = 1 with a
# cheap and with a costly draft (a tie), a free draft, and two ties at speedup 1
BEST_GAMMA_CASES = [(0.8, 0.05, 16), (0.9, 0.1, 16), (0.5, 0.3, 8), (0.2, 0.5, 8), (1.0, 0.25, 6), (0.95, 0.02, 30),
                    (0.6, 0.0, 10), (1.0, 1.0, 5), (0.0, 0.0, 4)]


@chapter.exercise("5.5", reference=answers.best_draft_length, hints=(
    "try every draft length from 0 to max_gamma: predict the tokens a round yields and what the round costs in "
    "target calls, and keep the best ratio",
    "a round yields 1 + alpha + ... + alpha^gamma tokens on average, (1 - alpha^(gamma+1)) / (1 - alpha) "
    "(gamma + 1 at alpha = 1), and costs gamma * c + 1 target calls; gamma = 0 is plain decoding, speedup 1; "
    "on ties keep the smaller gamma",
    "s = [tokens(g) / (g * c + 1) for g in range(max_gamma + 1)]; best = s.index(max(s)); return best, s[best]",
))
def best_draft_length(fn: Callable, ref_fn: Callable) -> None:
    for alpha, c, max_gamma in BEST_GAMMA_CASES:
        where = f"alpha={alpha}, c={c}, max_gamma={max_gamma}"
        got = call(fn, alpha, c, max_gamma, where=where)
        if not isinstance(got, tuple) or len(got) != 2:
            raise CheckFailure(f"on {where}: return a pair (gamma, speedup), got {type(got).__name__}")
        if isinstance(got[0], bool) or not isinstance(got[0], int):
            raise CheckFailure(f"on {where}: gamma should be a Python int, got {type(got[0]).__name__}")
        compare_explained(got, ref_fn(alpha, c, max_gamma), BEST_GAMMA_MISTAKES, Case(where, (alpha, c, max_gamma)),
                          name="(gamma, speedup)")


# --------------------------------------------------------------------------------------------------------
# 5.7 relaxed acceptance


def _relaxed_cases() -> Iterator[Case]:
    # first, by hand, so that each mistake below is named on it: row 0's neighbours hold 0.1 of p (0.2 of q), under
    # delta = 0.3; row 1's hold 0.5 of p (0.2 of q), over it. No ratio reaches 1, so none is hidden by the clamp.
    p1 = torch.tensor([[0.2, 0.05, 0.05, 0.7], [0.4, 0.3, 0.2, 0.1]])
    q1 = torch.tensor([[0.6, 0.1, 0.1, 0.2], [0.1, 0.1, 0.1, 0.7]])
    nb = torch.tensor([[1, 2], [0, 2], [1, 0], [2, 1]])
    yield Case("hand-made: neighbour mass 0.1 below delta 0.3, and 0.5 above it",
               (p1, q1, torch.tensor([0, 3]), nb, 0.3))
    g = torch.Generator().manual_seed(57)
    V = 10
    neighbors = ref.codebook_neighbors(torch.randn(V, 3, generator=g), 3)
    p, q = _dists(g, 8, V, sharp=2.0), _dists(g, 8, V, sharp=2.0)
    tokens = sampling.sample_from_probs(q, g)
    for delta in (0.0, 0.02, 0.15, 0.6):
        yield Case(f"8 rows, V={V}, 3 neighbours, delta={delta}", (p, q, tokens, neighbors, delta))
    p2, q2 = _dists(g, 2, 3, V, sharp=2.0), _dists(g, 2, 3, V, sharp=2.0)
    yield Case(f"2x3 rows (two batch axes), V={V}, delta=0.15",
               (p2, q2, sampling.sample_from_probs(q2, g), neighbors, 0.15))


def _relaxed_with(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor, extra: torch.Tensor | float) -> torch.Tensor:
    return ((_at(p, tokens) + extra) / _at(q, tokens)).clamp(max=1)


def _relaxed_by_row(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor, neighbors: torch.Tensor,
                    delta: float) -> torch.Tensor:
    """The mistake: the neighbours of row i's index instead of those of the token drafted in row i."""
    rows = torch.arange(tokens.numel()).view(tokens.shape)  # (...,)
    return _relaxed_with(p, q, tokens, p.gather(-1, neighbors[rows]).sum(-1).clamp(max=delta))


RELAXED_MISTAKES = [
    Mistake(lambda p, q, tokens, neighbors, delta: _relaxed_with(
        p, q, tokens, p.gather(-1, neighbors[tokens]).sum(-1) if delta > 0 else 0.0),
        "the neighbours' mass is not capped at delta: delta bounds how far the test may be relaxed"),
    Mistake(lambda p, q, tokens, neighbors, delta: _relaxed_with(p, q, tokens, delta),
            "that adds delta even where the neighbours hold less; the extra mass is the smaller of the two"),
    Mistake(lambda p, q, tokens, neighbors, delta: _relaxed_with(
        p, q, tokens, q.gather(-1, neighbors[tokens]).sum(-1).clamp(max=delta)),
        "the neighbours' mass was read from the draft q; the token borrows probability the target p gives its "
        "neighbours"),
    Mistake(_relaxed_by_row, "the neighbours were looked up by row number; a row's neighbours are those of the "
                             "token drafted there"),
]


@chapter.exercise("5.7", reference=answers.relaxed_acceptance_probability, hints=(
    "relaxed acceptance lets the drafted token borrow a little target probability from its neighbours in the "
    "codebook, at most delta of it",
    "the extra mass is the smaller of delta and the target's probability summed over the drafted token's "
    "neighbours; accept with min(1, (p[x] + extra) / q[x])",
    "m = p.gather(-1, neighbors[tokens]).sum(-1).clamp(max=delta); return ((p_x + m) / q_x).clamp(max=1) with "
    "p_x, q_x the probabilities of the drafted tokens",
))
def relaxed_acceptance_probability(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _relaxed_cases(), mistakes=RELAXED_MISTAKES)
