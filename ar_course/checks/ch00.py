"""Checks for chapter 00, the tour: ``checks.ch00.stable_softmax(stable_softmax)`` etc.

Softmax and cross-entropy are compared with the references in :mod:`ar_course.checks.reference.ch00` on seeded inputs,
including logits large enough to overflow ``exp`` and ``-inf`` entries. Sampling is random, so its check
compares *distributions*: it draws thousands of tokens per row with the learner's function and runs a
chi-square goodness-of-fit test against ``softmax(logits / temperature)``, at several temperatures. It also
checks the exact cases: greedy decoding at temperature 0, reproducibility under a seeded generator (and other
tokens under another seed), a batch of one, ``generator=None`` (two calls draw different tokens from the global
generator), and a ``ValueError`` for a negative temperature.
Softmax gradients are compared on every input, fully masked slices included (zeros, not NaN); the sampler and
the cross-entropy must leave the tensors they are given unchanged.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from scipy.stats import chi2

from ar_course.checks.core import (Case, Chapter, CheckFailure, Mistake, call, check_unchanged, compare,
                                   compare_cases, describe)
from ar_course.checks.reference import ch00 as ref

chapter = Chapter(0, "Tour")
use = chapter.use
hint = chapter.hint

NEG_INF = float("-inf")
DRAWS = 4000  # tokens drawn per row and temperature in the distribution test
P_MIN = 1e-6  # a chi-square p-value below this rejects the sampler (a correct one fails ~1e-5 of the time)


# --------------------------------------------------------------------------------------------------------
# 0.1 stable softmax


def _softmax_cases() -> Iterator[Case]:
    """Inputs of 0.1; gradients are compared on every one, ``-inf`` entries included (they get gradient 0)."""
    g = torch.Generator().manual_seed(1)
    yield Case("5x7 random logits", (torch.randn(5, 7, generator=g),))
    yield Case("4x3x6 logits, dim=1", (torch.randn(4, 3, 6, generator=g), 1))
    yield Case("6x4 logits, dim=0", (torch.randn(6, 4, generator=g),), {"dim": 0})
    yield Case("3x5 logits of size ~1000 (exp overflows)", (torch.randn(3, 5, generator=g) * 1000,))
    yield Case("2x9 float64 logits", (torch.randn(2, 9, generator=g, dtype=torch.float64),))
    yield Case("4x1 logits (a single token)", (torch.randn(4, 1, generator=g),))
    masked = torch.randn(3, 8, generator=g) * 2
    masked[0, [1, 4, 5]] = NEG_INF
    masked[2, :7] = NEG_INF
    yield Case("3x8 logits with -inf entries", (masked,))
    empty = torch.randn(3, 6, generator=g)
    empty[1] = NEG_INF
    yield Case("3x6 logits, row 1 all -inf (expect zeros there)", (empty,))


def _softmax_overflowing(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    e = logits.exp()
    return e / e.sum(dim, keepdim=True)


def _softmax_nan_gradient(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Right values, but the all -inf slice computes 0 / 0 in a branch that torch.where then discards."""
    top = logits.amax(dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(logits - top)
    s = e.sum(dim, keepdim=True)
    return torch.where(s > 0, e / s, torch.zeros_like(e))


def _softmax_global_max(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    e = torch.exp(logits - logits.max())
    return e / e.sum(dim, keepdim=True)


SOFTMAX_MISTAKES = [  # the first that matches is named: a slice of -inf is NaN for both
    Mistake(lambda logits, dim=-1: torch.softmax(logits, dim),
            "a slice that is all -inf came out NaN (its maximum is -inf, and -inf - (-inf) is NaN); it should be "
            "all zeros"),
    Mistake(_softmax_overflowing, "that is exp(x) / sum(exp(x)) without a shift: exp overflows to inf for large "
            "logits and inf / inf is NaN"),
    Mistake(_softmax_nan_gradient, "the values are right, but the gradient of the all -inf slice is NaN: a NaN "
            "computed there (0 / 0, or -inf - (-inf)) still flows backwards even when torch.where or nan_to_num "
            "hides it in the output, and one fully masked row would then turn every weight NaN in training"),
    Mistake(lambda logits, dim=-1: ref.stable_softmax(logits, -1),
            "that is the softmax over the last axis whatever dim is given; it must run along dim"),
    Mistake(lambda logits, dim=-1: ref.stable_softmax(logits, 0),
            "that is the softmax over axis 0 whatever dim is given; it must run along dim (default -1, the last)"),
    Mistake(_softmax_global_max, "that subtracts the maximum of the whole tensor, not of each slice: a slice far "
            "below it underflows to exp(...) = 0 everywhere, and 0 / 0 is NaN"),
]


@chapter.exercise("0.1", reference=ref.stable_softmax, hints=(
    "softmax does not change when the same number is subtracted from every entry of a slice; choose that "
    "number so that no exp can overflow",
    "subtract the maximum along dim (keepdim=True so it broadcasts) before exp; a slice of nothing but -inf has "
    "maximum -inf, so subtract 0 there, and give a slice whose exps sum to 0 zeros instead of 0 / 0",
    "m = logits.amax(dim, keepdim=True); m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)); "
    "e = (logits - m).exp(); s = e.sum(dim, keepdim=True); return e / torch.where(s > 0, s, torch.ones_like(s))",
))
def stable_softmax(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _softmax_cases(), grad_wrt=(0,), mistakes=SOFTMAX_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 0.2 sampling with a temperature


def _sampling_cases() -> Iterator[tuple[str, torch.Tensor, tuple[float, ...]]]:
    """(name, logits (B, V), temperatures to test)."""
    g = torch.Generator().manual_seed(2)
    yield "3 rows x 9 tokens", torch.randn(3, 9, generator=g) * 1.5, (1.0, 0.5, 2.0)
    masked = torch.randn(2, 13, generator=g) * 2
    masked[0, [1, 4, 5]] = NEG_INF
    masked[1, 7:] = NEG_INF
    yield "2 rows x 13 tokens with -inf entries", masked, (1.0, 0.7)
    yield "2 rows x 6 tokens, logits around 400", torch.randn(2, 6, generator=g) * 2 + 400, (1.0,)
    yield "1 row x 5 tokens, low temperature", torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0]]), (0.25,)
    tail = torch.zeros(1, 200)  # a token at 80%, 5 at 2%, 194 at 0.05% (10% together): cutting off a tail fails
    tail[0, 0], tail[0, 1:6] = 7.35, 3.66
    yield "1 row x 200 tokens: one at 80%, five at 2%, a long tail", tail, (1.0,)


def _pooled(observed: torch.Tensor, expected: torch.Tensor,
            min_expected: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (V,) with every token expected fewer than ``min_expected`` times merged into one bin (plus the
    next least likely token when even that bin falls short), so the chi-square approximation holds."""
    order = torch.argsort(expected)  # least likely first
    obs, exp = observed[order], expected[order]
    cut = int((exp < min_expected).sum())
    if 0 < cut < len(exp) and exp[:cut].sum() < min_expected:
        cut += 1
    if cut <= 1:
        return obs, exp
    return torch.cat([obs[:cut].sum()[None], obs[cut:]]), torch.cat([exp[:cut].sum()[None], exp[cut:]])


def _chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of counts ``observed`` (V,) against ``expected`` (V,)."""
    obs, exp = _pooled(observed.double(), expected.double())
    if len(exp) < 2:
        return 1.0
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(chi2.sf(stat, len(exp) - 1))


def _check_draws(draws: object, n: int, vocab: int, where: str) -> torch.Tensor:
    """The learner's tokens as a (n,) int64 tensor, after checking type, shape, dtype and range."""
    if not isinstance(draws, torch.Tensor):
        raise CheckFailure(f"output on input {where!r} should be a torch.Tensor, got {describe(draws)}")
    if tuple(draws.shape) != (n,):
        raise CheckFailure(f"output on input {where!r} has shape {tuple(draws.shape)}, expected ({n},): one token "
                           "per row (torch.multinomial returns (B, 1); drop the last axis)")
    if draws.dtype != torch.int64:
        raise CheckFailure(f"output on input {where!r} has dtype {draws.dtype}, expected torch.int64")
    draws = draws.cpu()
    if bool(((draws < 0) | (draws >= vocab)).any()):
        raise CheckFailure(f"output on input {where!r} holds token {int(draws.max())}, outside 0..{vocab - 1}")
    return draws


def _without_last_token(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    probs = torch.softmax(logits[:, :-1].double() / temperature, dim=-1)
    return torch.cat([probs, torch.zeros_like(probs[:, :1])], dim=-1)


def _without_tail(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    kept = torch.where(probs < 0.01, 0.0, probs)
    return kept / kept.sum(-1, keepdim=True)


# distributions a plausible wrong sampler draws from, (logits (B, V), temperature) -> (B, V) probabilities; the
# first whose chi-square test every row passes is named
SAMPLING_MISTAKES = [
    Mistake(lambda logits, temperature: torch.softmax(logits.double(), dim=-1),
            "the tokens follow softmax(logits), as at temperature 1: the temperature was left out, or it divided "
            "the probabilities, which renormalising undoes; it must divide the logits"),
    Mistake(lambda logits, temperature: torch.softmax(logits.double() * temperature, dim=-1),
            "the tokens follow softmax(logits * temperature): the logits were multiplied by the temperature, so a "
            "low temperature flattens the distribution instead of sharpening it"),
    Mistake(lambda logits, temperature: torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double(),
            "that always picks the most likely token (the argmax); only temperature 0 is greedy, any other "
            "temperature draws at random"),
    Mistake(_without_last_token, "the last token of the vocabulary is never drawn: an off-by-one leaves it out"),
    Mistake(_without_tail, "the unlikely tokens are never drawn: a cut-off (a probability threshold, top-k or top-p) "
                           "removed the tail; plain sampling keeps every token whose probability is above 0"),
]


def _follows(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Whether every row of ``counts`` (B, V) passes the chi-square test against ``probs`` (B, V)."""
    for c, q in zip(counts, probs):
        if bool(((q == 0) & (c > 0)).any()) or _chi_square_p(c, q * c.sum()) < P_MIN:
            return False
    return True


def _diagnosed(failure: CheckFailure, counts: torch.Tensor, logits: torch.Tensor,
               temperature: float) -> CheckFailure:
    """``failure`` completed with the first of :data:`SAMPLING_MISTAKES` whose distribution the draws follow."""
    for mistake in SAMPLING_MISTAKES:
        if _follows(counts, mistake.fn(logits, temperature)):
            return CheckFailure(f"{failure}; {mistake.says}")
    return failure


def _check_distribution(fn: Callable, name: str, logits: torch.Tensor, temperature: float, seed: int) -> None:
    """Draw DRAWS tokens per row with ``fn`` and test them against ``softmax(logits / temperature)``."""
    where = f"{name}, temperature {temperature:g}, {DRAWS} draws per row"
    rows, vocab = logits.shape
    batch = logits.repeat(DRAWS, 1)  # (DRAWS * B, V): row i is logits[i % B]
    with torch.random.fork_rng(devices=[]):  # a sampler that ignores `generator` is still deterministic here
        torch.manual_seed(seed)
        draws = call(fn, batch, temperature, generator=torch.Generator().manual_seed(seed), where=where)
    check_unchanged(("logits",), (logits.repeat(DRAWS, 1),), (batch,), where,
                    why="so a second call on it sees other values")
    draws = _check_draws(draws, DRAWS * rows, vocab, where).view(DRAWS, rows)  # (DRAWS, B)
    expected = torch.softmax(logits.double() / temperature, dim=-1)  # (B, V)
    all_counts = torch.stack([torch.bincount(draws[:, r], minlength=vocab) for r in range(rows)]).double()  # (B, V)
    for r in range(rows):
        counts = all_counts[r]  # (V,)
        impossible = (expected[r] == 0) & (counts > 0)
        if bool(impossible.any()):
            tok = int(impossible.nonzero()[0])
            raise CheckFailure(f"on input {where!r} row {r} drew token {tok} {int(counts[tok])} times, but its "
                               "logit is -inf (probability 0)")
        p = _chi_square_p(counts, expected[r] * DRAWS)
        if p < P_MIN:
            freq, want = counts / DRAWS, expected[r]
            tok = int((freq - want).abs().argmax())
            raise _diagnosed(CheckFailure(
                f"token frequencies on input {where!r} do not follow softmax(logits / temperature): row {r} "
                f"drew token {tok} {100 * float(freq[tok]):.1f}% of the time, expected "
                f"{100 * float(want[tok]):.1f}% (chi-square p = {p:.1e})"), all_counts, logits, temperature)


@chapter.exercise("0.2", reference=ref.sample_categorical, hints=(
    "the temperature reshapes the distribution before the draw: which quantity does it divide, and what "
    "should happen as it goes to 0?",
    "divide the logits (not the probabilities) by the temperature, take their softmax and draw one token per "
    "row with the generator you were given; temperature 0 is the argmax (no draw); a negative one is a "
    "ValueError",
    "probs = torch.softmax(logits / temperature, -1); return torch.multinomial(probs, 1, "
    "generator=generator).squeeze(-1) (or the Gumbel-max trick), after the temperature == 0 and < 0 cases",
))
def sample_categorical(fn: Callable, ref_fn: Callable) -> None:
    g = torch.Generator().manual_seed(20)
    logits = torch.randn(6, 10, generator=g)
    where = "6x10 random logits, temperature 0"
    compare(call(fn, logits.clone(), 0.0, where=where), ref_fn(logits, 0.0), where=where)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    where = "tied maxima, temperature 0 (expect the first)"
    compare(call(fn, ties.clone(), 0.0, where=where), ref_fn(ties, 0.0), where=where)

    for i, (name, case_logits, temperatures) in enumerate(_sampling_cases()):
        for j, temperature in enumerate(temperatures):
            _check_distribution(fn, name, case_logits, temperature, seed=100 * i + j)

    logits = torch.randn(500, 20, generator=g)
    where = "500x20 logits, two generators seeded alike"
    first = call(fn, logits.clone(), 1.0, generator=torch.Generator().manual_seed(7), where=where)
    second = call(fn, logits.clone(), 1.0, generator=torch.Generator().manual_seed(7), where=where)
    if not torch.equal(first, second):
        raise CheckFailure(f"on input {where!r} the two calls drew different tokens: draw every random number "
                           "with generator=generator")
    where = "500x20 logits, generators seeded 7 and 8"
    other = call(fn, logits.clone(), 1.0, generator=torch.Generator().manual_seed(8), where=where)
    if torch.equal(first, other):
        raise CheckFailure(f"on input {where!r} the two calls drew the same 500 tokens: the draws do not come "
                           "from the generator you were given (a fixed seed or a generator of your own inside the "
                           "function repeats the same tokens whatever the caller passes)")

    for temperature in (1.0, 0.0):  # batch of one: the (1,) shape must survive
        where = f"1x20 logits (a batch of one), temperature {temperature:g}"
        draws = call(fn, logits[:1].clone(), temperature, generator=torch.Generator().manual_seed(9), where=where)
        _check_draws(draws, 1, logits.shape[1], where)
    where = "500x20 logits, temperature 1, no generator (generator=None), two calls"
    with torch.random.fork_rng(devices=[]):  # the global generator moves on between the calls, as in a notebook
        torch.manual_seed(10)
        first = _check_draws(call(fn, logits.clone(), 1.0, where=where), logits.shape[0], logits.shape[1], where)
        second = _check_draws(call(fn, logits.clone(), 1.0, where=where), logits.shape[0], logits.shape[1], where)
    if torch.equal(first, second):
        raise CheckFailure(f"on input {where!r} both calls drew the same 500 tokens: without a generator the draws "
                           "must come from torch's global generator (a fresh torch.Generator() made inside the "
                           "function starts from the same seed every time)")

    try:
        out = fn(logits[:2].clone(), -1.0)
    except ValueError:
        return
    except NotImplementedError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other error is the wrong kind
        raise CheckFailure(f"temperature -1 should raise ValueError, got {type(exc).__name__}") from None
    raise CheckFailure(f"temperature -1 should raise ValueError, but your function returned {describe(out)}")


# --------------------------------------------------------------------------------------------------------
# 0.3 cross-entropy from logits


def _cross_entropy_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(3)
    yield Case("37 rows x 11 classes", (torch.randn(37, 11, generator=g) * 2, torch.randint(0, 11, (37,), generator=g)))
    near = torch.Generator().manual_seed(30)  # its own generator, so the cases after it keep their inputs
    yield Case("6x5 logits around 200, close together (exp overflows)",
               (torch.randn(6, 5, generator=near) + 200, torch.randint(0, 5, (6,), generator=near)))
    yield Case("9x7 logits of size ~1000 (exp overflows)",
               (torch.randn(9, 7, generator=g) * 1000, torch.randint(0, 7, (9,), generator=g)))
    padded = torch.randint(0, 5, (12,), generator=g)
    padded[[2, 3, 8, 11]] = -100
    yield Case("12x5 with 4 targets = -100 (ignored)", (torch.randn(12, 5, generator=g), padded))
    yield Case("10x4 with ignore_index=0 (class 0 does not count)",
               (torch.randn(10, 4, generator=g), torch.tensor([0, 1, 2, 3, 0, 1, 0, 2, 3, 3])), {"ignore_index": 0})
    yield Case("8x6 float64 logits",
               (torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 6, (8,), generator=g)))
    yield Case("a single row", (torch.randn(1, 30, generator=g), torch.tensor([17])))


def _cross_entropy_overflowing(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    keep = targets != ignore_index
    picked = logits.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    per_row = logits.exp().sum(-1).log() - picked
    return per_row[keep].mean()


def _cross_entropy_over_all_rows(logits: torch.Tensor, targets: torch.Tensor,
                                 ignore_index: int = -100) -> torch.Tensor:
    keep = targets != ignore_index
    picked = logits.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    per_row = torch.logsumexp(logits, -1) - picked
    return torch.where(keep, per_row, torch.zeros_like(per_row)).sum() / len(targets)


def _cross_entropy_log_of_softmax(logits: torch.Tensor, targets: torch.Tensor,
                                  ignore_index: int = -100) -> torch.Tensor:
    keep = targets != ignore_index
    picked = torch.softmax(logits, -1).gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    return -picked.log()[keep].mean()


def _cross_entropy_summed(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    keep = targets != ignore_index
    picked = logits.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    return (torch.logsumexp(logits, -1) - picked)[keep].sum()


CROSS_ENTROPY_MISTAKES = [  # the first that matches is named: both give inf where a target's probability underflows
    Mistake(_cross_entropy_log_of_softmax, "that is the log of a softmax: a target far below the row maximum gets "
            "a probability that underflows to 0, and -log 0 is inf"),
    Mistake(_cross_entropy_overflowing, "that is log(sum(exp(x))) without a shift: exp overflows to inf for large "
            "logits"),
    Mistake(_cross_entropy_over_all_rows, "that divides by every row, ignored ones included: the mean is over "
            "the rows that count"),
    Mistake(_cross_entropy_summed, "that is the sum of the rows' losses; the loss is their mean, so it does not "
            "grow with the batch"),
    Mistake(lambda logits, targets, ignore_index=-100: ref.cross_entropy_from_logits(logits, targets),
            "that always ignores the targets equal to -100, not the ignore_index it is given"),
    Mistake(lambda logits, targets, ignore_index=-100: -ref.cross_entropy_from_logits(logits, targets, ignore_index),
            "that is the mean log-probability of the targets, without the minus sign: a loss is minus the log, "
            "so it is positive"),
]


@chapter.exercise("0.3", reference=ref.cross_entropy_from_logits, hints=(
    "the loss of a row is minus the log of the probability its target gets; compute that log directly from the "
    "logits, without forming probabilities that can overflow or underflow",
    "log softmax(x)[t] = x[t] - logsumexp(x), and logsumexp(x) = m + log(sum(exp(x - m))) with m the row "
    "maximum; rows whose target is ignore_index count neither in the sum nor in the number you divide by",
    "m = logits.amax(-1, keepdim=True); lse = m.squeeze(-1) + (logits - m).exp().sum(-1).log(); keep = targets "
    "!= ignore_index; return (lse - logits.gather(1, t[:, None]).squeeze(1))[keep].mean() with t the targets, "
    "ignored ones replaced by 0",
))
def cross_entropy_from_logits(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _cross_entropy_cases(), grad_wrt=(0,), mistakes=CROSS_ENTROPY_MISTAKES)
