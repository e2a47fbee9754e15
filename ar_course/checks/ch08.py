"""Checks for chapter 08, parallel decoding: ``checks.ch08.mask_ratio(mask_ratio)``.

Every check compares with the library (:mod:`ar_course.masked` for images, :mod:`ar_course.diffusion_lm` for text) or
with :mod:`ar_course.checks.reference.ch08` on seeded random inputs and hand-made edge cases (the ends of the schedule,
counts that are whole numbers, noise that overturns the order of confidences or lifts every new score above 0,
non-square maps, neighbourhoods that reach up and to the right or two rows up, confident logits, uniform draws on both
sides of the reveal probability and at it, a mask id that is not the largest, one block and blocks of one, a Python
float or a float64 tensor for the schedule), and names the usual mistakes: a schedule that counts revealed tokens
instead of masked ones; training masks rounded the wrong way, empty, with one count for the whole batch, the same
positions in every row, the first positions or a run of neighbours; re-masking the most confident tokens or known ones
(also through a finite confidence, 0 or any other, that large noise lifts the new samples above), a step that writes
into its inputs; a step map that ignores the neighbourhood, visits it in another order than raster order (column by
column, say), waits for the earliest neighbour only or reads outside the map through a negative index; for text, an MDLM
loss without its 1/t weight, averaged over the masked tokens or taken as the log of a softmax, a reveal probability that
is not conditioned on being masked, a block schedule whose time runs once over the whole sequence, rises, stops short of
0 or has one pass too few; also counts that change with the draws, re-masked positions given samples, the noise at full
weight, tokens revealed earlier masked again. The training masks are random: their check holds the counts exactly, and
which positions are hidden only to what a uniform choice gives over 10,000 rows (and that they change with the
generator's seed), so any correct way of drawing them passes."""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from ar_course.checks.core import (Case, Chapter, CheckFailure, Mistake, call, check_off_cpu, compare_cases,
                                   describe)
from ar_course.checks.reference import ch08 as answers
from ar_course.masked import functional as ref

chapter = Chapter(8, "Parallel decoding")
use = chapter.use
hint = chapter.hint


# --------------------------------------------------------------------------------------------------------
# 8.1 the mask-ratio schedule


def _ratio_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(81)
    yield Case("r = 0, 0.1, ..., 1, cosine", (torch.linspace(0, 1, 11), "cosine"))
    yield Case("r = 0, 0.1, ..., 1, linear", (torch.linspace(0, 1, 11), "linear"))
    yield Case("r = 0, 0.1, ..., 1, square", (torch.linspace(0, 1, 11), "square"))
    for schedule in ("cosine", "linear", "square"):
        yield Case(f"random (3, 4) r, {schedule}", (torch.rand(3, 4, generator=g), schedule))
    yield Case("default schedule (cosine)", (torch.rand(5, generator=g),))
    for schedule in ("cosine", "linear", "square"):
        yield Case(f"r = 0.25 as a Python float, {schedule}", (0.25, schedule))
    for schedule in ("cosine", "linear", "square"):  # the answer is float32 whatever float r comes in
        yield Case(f"float64 (4,) r, {schedule}", (torch.rand(4, generator=g, dtype=torch.float64), schedule))


def _ratio_revealed(r, schedule="cosine"):
    return 1 - ref.mask_ratio(r, schedule)


def _ratio_full_angle(r, schedule="cosine"):
    return torch.cos(math.pi * r) if schedule == "cosine" else ref.mask_ratio(r, schedule)


def _ratio_sine(r, schedule="cosine"):
    return torch.sin(0.5 * math.pi * r) if schedule == "cosine" else ref.mask_ratio(r, schedule)


def _ratio_square_of_r(r, schedule="cosine"):
    return r * r if schedule == "square" else ref.mask_ratio(r, schedule)


def _ratio_square_of_one_minus(r, schedule="cosine"):
    return (1 - torch.as_tensor(r, dtype=torch.float32)) ** 2 if schedule == "square" else ref.mask_ratio(r, schedule)


def _ratio_half_cosine(r, schedule="cosine"):
    r = torch.as_tensor(r, dtype=torch.float32)
    return (1 + torch.cos(math.pi * r)) / 2 if schedule == "cosine" else ref.mask_ratio(r, schedule)


def _ratio_always_cosine(r, schedule="cosine"):
    return ref.mask_ratio(r, "cosine")


RATIO_MISTAKES = [
    Mistake(_ratio_revealed, "that is the fraction already revealed; gamma(r) is the fraction still masked, "
                             "1 at the start (r = 0) and 0 at the end"),
    Mistake(_ratio_sine, "sin(pi r / 2) rises from 0 to 1, the fraction revealed; gamma(r) is the fraction still "
                         "masked"),
    Mistake(_ratio_full_angle, "cos(pi r) reaches 0 halfway and goes negative; the cosine schedule covers a "
                               "quarter turn"),
    Mistake(_ratio_square_of_r, "r^2 rises from 0 to 1; the square schedule must fall from 1 to 0"),
    Mistake(_ratio_square_of_one_minus, "(1 - r)^2 squares the linear schedule; the square schedule is 1 - r^2, "
                                        "which masks more of the sequence early on"),
    Mistake(_ratio_half_cosine, "(1 + cos(pi r)) / 2 is a half-turn cosine rescaled to [0, 1]; the cosine schedule "
                                "is cos(pi r / 2), a quarter turn, which stays near 1 longer"),
    Mistake(_ratio_always_cosine, "the schedule argument is ignored"),
]


@chapter.exercise("8.1", reference=ref.mask_ratio, hints=(
    "every schedule is a function of r that is 1 at r = 0 (all masked) and 0 at r = 1 (all revealed)",
    "cosine: cos(pi / 2 * r); linear: 1 - r; square: 1 - r ** 2 (on a float tensor)",
    "r = torch.as_tensor(r, dtype=torch.float32); return {'cosine': torch.cos(0.5 * math.pi * r).clamp(0, 1), "
    "'linear': 1 - r, 'square': 1 - r * r}[schedule]",
))
def mask_ratio(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _ratio_cases(), atol=1e-6, mistakes=RATIO_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 8.2 the training masks


def _mask_count_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(82)
    yield Case("6 random r, n = 16, cosine", (torch.rand(6, generator=g), 16, "cosine"))
    yield Case("5 random r, n = 10, linear", (torch.rand(5, generator=g), 10, "linear"))
    yield Case("5 random r, n = 13, square", (torch.rand(5, generator=g), 13, "square"))
    for schedule in ("cosine", "linear"):
        yield Case(f"r = 0 and r = 1, n = 7, {schedule}", (torch.tensor([0.0, 1.0]), 7, schedule))
    yield Case("r = 0.5, n = 10, linear (gamma * n = 5 exactly)", (torch.tensor([0.5]), 10, "linear"))
    yield Case("r = 0.25, n = 16, square (gamma * n = 15 exactly)", (torch.tensor([0.25]), 16, "square"))
    yield Case("n = 1, cosine", (torch.rand(3, generator=g), 1, "cosine"))


def _counts_of(fn: Callable) -> Callable:
    # how many positions each row of fn's masks hides (a fixed generator: the counts must not depend on it)
    def counts(r, n, schedule):
        out = fn(r, n, schedule, torch.Generator().manual_seed(0))
        return out.sum(1) if isinstance(out, torch.Tensor) and out.ndim == 2 else out
    return counts


def _count_with(rounding: Callable, least: int = 1, revealed: bool = False, schedule_of: Callable | None = None
                ) -> Callable:
    def counts(r, n, schedule):
        gamma = ref.mask_ratio(r, schedule_of(schedule) if schedule_of else schedule)
        return rounding((1 - gamma if revealed else gamma) * n).long().clamp(least, n)
    return counts


def _count_first_row(r, n, schedule):
    return _count_with(torch.ceil)(r, n, schedule)[:1].expand(r.shape[0])


COUNT_MISTAKES = [
    Mistake(_count_with(torch.ceil, least=0), "with gamma(r) = 0 (r = 1) that row hides nothing, and a training "
                                              "example with no hidden token teaches nothing; every row hides one "
                                              "at least"),
    Mistake(_count_with(torch.floor), "the count is rounded down; gamma(r) * n rounds up, so a row never hides "
                                      "fewer than the schedule asks"),
    Mistake(_count_with(torch.round), "the count is rounded to the nearest whole number; gamma(r) * n rounds up"),
    Mistake(_count_with(lambda x: torch.floor(x) + 1), "floor(x) + 1 is one too many when gamma(r) * n is a whole "
                                                       "number; that is not rounding up"),
    Mistake(_count_with(torch.ceil, revealed=True), "that counts the revealed tokens (1 - gamma(r)); gamma(r) is "
                                                    "the fraction hidden"),
    Mistake(_count_with(torch.ceil, schedule_of=lambda s: "cosine"), "the schedule argument is ignored"),
    Mistake(_count_first_row, "every row hides as many positions as the first one; each row has its own r, so "
                              "its own count"),
]

def _random_counts(fn: Callable) -> str:
    """The diagnosis of masks whose counts change with the generator's seed (each position hidden on its own with
    probability gamma(r), say), or ""."""
    for case in _mask_count_cases():
        r, n, schedule = case.args
        try:
            counts = [fn(r.clone(), n, schedule, torch.Generator().manual_seed(seed)).sum(1) for seed in (0, 1, 2)]
            varies = not (torch.equal(counts[0], counts[1]) and torch.equal(counts[0], counts[2]))
        except Exception:  # noqa: BLE001 - no diagnosis then
            return ""
        if varies:
            return ("; the number of hidden positions changes with the random draws (as when each position is "
                    "hidden on its own with probability gamma(r)); a row hides exactly ceil(gamma(r) * n), only "
                    "which positions is random")
    return ""


SPREAD_N, SPREAD_K, SPREAD_ROWS = 10, 3, 10000  # 10,000 rows that each hide 3 of 10 positions (linear, r = 0.75)


def _spread_failure(got: torch.Tensor) -> str | None:
    """What is wrong with the positions of masks that each hide SPREAD_K of SPREAD_N, or None. A uniform choice
    passes: the tolerances are about 6.5 (positions), 8 (pairs) and 18 (a row repeating the one before it)
    standard deviations wide."""
    rows = f"{SPREAD_ROWS} rows that each hide {SPREAD_K} of {SPREAD_N} positions"
    m = got.detach().cpu().double()  # (rows, n)
    freq = m.mean(0)  # (n,)
    if bool((freq[:SPREAD_K] > 0.9).all()):
        return (f"positions 0 to {SPREAD_K - 1} are hidden in nearly all {rows}: each row hides its first "
                "positions, so the model never learns to fill in the others")
    if bool((m == m[:1]).all()):
        return (f"all {rows} hide the same positions; the rows are separate training examples, each with its "
                "own random choice")
    j = int((freq - SPREAD_K / SPREAD_N).abs().argmax())
    if abs(float(freq[j]) - SPREAD_K / SPREAD_N) > 0.03:
        return (f"position {j} is hidden in {float(freq[j]):.1%} of {rows}, expected {SPREAD_K / SPREAD_N:.0%}; "
                "the positions are not equally likely to be hidden")
    pairs = (m.T @ m) / SPREAD_ROWS  # (n, n): how often two positions are hidden together
    expected = SPREAD_K * (SPREAD_K - 1) / (SPREAD_N * (SPREAD_N - 1))
    off = (pairs - expected).abs().fill_diagonal_(0)
    i, j = divmod(int(off.argmax()), SPREAD_N)
    if float(off[i, j]) > 0.02:
        return (f"positions {i} and {j} are hidden together in {float(pairs[i, j]):.1%} of {rows}, expected "
                f"{expected:.1%}; the hidden positions of a row are not a uniformly random set (a run of "
                "neighbouring positions is one particular shape, not any set)")
    repeats = float((m[1:] == m[:-1]).all(1).double().mean())  # a row that hides what the row before it hides
    chance = 1 / math.comb(SPREAD_N, SPREAD_K)
    if repeats > 3 * chance:
        return (f"a row hides the same positions as the row before it in {repeats:.1%} of {rows}, expected about "
                f"{chance:.1%}; the rows are not drawn independently of each other")
    return None


@chapter.exercise("8.2", reference=ref.training_mask, hints=(
    "two separate questions: how many positions each row hides (its own r through the schedule, rounded up, never "
    "0), and which ones (every set of that size equally likely, every row drawn on its own)",
    "a row's count differs from the next row's, so topk with one k does not fit; give every position a uniform "
    "random score from the generator and hide, in each row, the positions whose score ranks below that row's count",
    "count = torch.ceil(masked.mask_ratio(r.cpu(), schedule) * n).long().clamp(1, n); scores = torch.rand(len(r), "
    "n, generator=generator); return (scores.argsort(1).argsort(1) < count[:, None]).to(r.device)",
))
def training_mask(fn: Callable, ref_fn: Callable) -> None:
    for case in _mask_count_cases():
        r, n, schedule = case.args
        got = call(fn, r.clone(), n, schedule, torch.Generator().manual_seed(0), where=case.name)
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool or tuple(got.shape) != (len(r), n):
            raise CheckFailure(f"the mask on input {case.name!r} is {describe(got)}; expected a bool tensor of "
                               f"shape ({len(r)}, {n}), True where the token is hidden")
    try:
        compare_cases(_counts_of(fn), _counts_of(ref_fn), _mask_count_cases(), mistakes=COUNT_MISTAKES)
    except CheckFailure as exc:
        named = any(m.says in str(exc) for m in COUNT_MISTAKES)
        raise CheckFailure(f"hidden positions per row (mask.sum(1)): {exc}"
                           + ("" if named else _random_counts(fn))) from None
    r = torch.full((SPREAD_ROWS,), 0.75)
    name = f"{SPREAD_ROWS} rows with r = 0.75, n = {SPREAD_N}, linear"
    first, again = (call(fn, r, SPREAD_N, "linear", torch.Generator().manual_seed(7), where=name) for _ in range(2))
    if not torch.equal(first, again):
        raise CheckFailure(f"on input {name!r}, two calls with generators seeded alike gave different masks; every "
                           "random number must come from `generator`, so that a seeded run can be repeated")
    problem = _spread_failure(first)
    if problem:
        raise CheckFailure(f"on input {name!r}, {problem}")
    _check_draws_vary(fn)
    # the notebook trains on DEVICE with a CPU generator: the mask must come back on r's device
    check_off_cpu(fn, Case("4 random r, n = 16, cosine", (torch.rand(4, generator=torch.Generator().manual_seed(5)),
                                                          16, "cosine", torch.Generator().manual_seed(0))),
                  result_follows=True)


def _check_draws_vary(fn: Callable) -> None:
    """Fail when the masks do not change with the random numbers: the same for two generators seeded differently,
    or for two calls on the global generator (whose state is restored afterwards)."""
    r = torch.full((200,), 0.75)
    name = f"200 rows with r = 0.75, n = {SPREAD_N}, linear"
    seeded = [call(fn, r, SPREAD_N, "linear", torch.Generator().manual_seed(s), where=name) for s in (7, 8)]
    if torch.equal(seeded[0], seeded[1]):
        raise CheckFailure(f"on input {name!r}, generators seeded 7 and 8 gave the same masks: the draws do not "
                           "come from `generator` (a seed fixed inside the function makes every call alike)")
    with torch.random.fork_rng(devices=[]):
        unseeded = [call(fn, r, SPREAD_N, "linear", None, where=f"{name}, generator=None") for _ in range(2)]
    if torch.equal(unseeded[0], unseeded[1]):
        raise CheckFailure(f"on input {name!r} with generator=None, two calls gave the same masks: without a "
                           "generator the draws come from torch's global one, which moves on between calls")


# --------------------------------------------------------------------------------------------------------
# 8.3 one confidence-based decoding step

MASK = 99


def _step_case(name: str, g: torch.Generator, b: int, n: int, v: int, known: float, n_masked: int,
               noise_scale: float, mask_id: int = MASK) -> Case:
    mask = torch.rand(b, n, generator=g) >= known  # (B, N)
    mask[:, : n_masked + 1] = True  # every row has more masked positions than stay masked
    tokens = torch.randint(0, v, (b, n), generator=g).masked_fill(mask, mask_id)
    log_probs = torch.log_softmax(2 * torch.randn(b, n, v, generator=g), dim=-1)
    sampled = torch.randint(0, v, (b, n), generator=g)
    noise = -torch.log(-torch.log(torch.rand(b, n, generator=g).clamp(1e-9, 1 - 1e-7)))
    return Case(name, (tokens, mask, log_probs, sampled, n_masked, noise if noise_scale else None, noise_scale))


def _step_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(83)
    yield _step_case("(2, 8) map, keep 3 masked, no noise", g, 2, 8, 5, 0.3, 3, 0.0)
    yield _step_case("(3, 16) map, keep 5 masked, noise 2.0", g, 3, 16, 7, 0.5, 5, 2.0)
    yield _step_case("(2, 12) map, keep 1 masked, noise 0.5", g, 2, 12, 4, 0.0, 1, 0.5)
    yield _step_case("last step: keep 0 masked", g, 2, 8, 5, 0.4, 0, 1.0)
    yield _high_noise_case(torch.Generator().manual_seed(831))  # its own draws: the other cases' stay as they were
    yield _confident_case(g)
    # the masked positions hold id 0, not the largest id: a still-masked position keeps what `tokens` holds there
    yield _step_case("(2, 8) map whose mask id is 0, keep 2 masked, noise 1.0", g, 2, 8, 5, 0.3, 2, 1.0, mask_id=0)


def _confident_case(g: torch.Generator) -> Case:
    # every new sample is near certain and its noise positive, so every masked score is above 0, the
    # log-probability of a certain token: only an infinite confidence keeps the known positions out of reach
    b, n, v, n_masked = 2, 10, 6, 3
    mask = torch.rand(b, n, generator=g) < 0.5
    mask[:, : n_masked + 2] = True
    tokens = torch.randint(0, v, (b, n), generator=g).masked_fill(mask, MASK)
    sampled = torch.randint(0, v, (b, n), generator=g)
    logits = torch.randn(b, n, v, generator=g) + 8 * torch.nn.functional.one_hot(sampled, v)
    noise = -torch.log(-torch.log(0.5 + 0.5 * torch.rand(b, n, generator=g)))  # Gumbel draws above 0.36
    return Case("(2, 10) map, confident samples, positive noise 2.0, keep 3 masked",
                (tokens, mask, torch.log_softmax(logits, dim=-1), sampled, n_masked, noise, 2.0))


def _high_noise_case(g: torch.Generator) -> Case:
    # confident samples with large Gumbel draws (above 2.97) at weight 4: every masked score is above 10, so a known
    # position given any finite confidence up to 10 (3, 5, 10...) is re-masked in place of a new sample
    b, n, v, n_masked = 2, 10, 6, 3
    mask = torch.rand(b, n, generator=g) < 0.5
    mask[:, : n_masked + 2] = True
    mask[:, -n_masked:] = False  # as many known positions as stay masked, at least
    tokens = torch.randint(0, v, (b, n), generator=g).masked_fill(mask, MASK)
    sampled = torch.randint(0, v, (b, n), generator=g)
    logits = torch.randn(b, n, v, generator=g) + 8 * torch.nn.functional.one_hot(sampled, v)
    noise = -torch.log(-torch.log(0.95 + 0.05 * torch.rand(b, n, generator=g)))  # Gumbel draws above 2.97
    return Case("(2, 10) map, confident samples, large noise at weight 4.0 (every masked score above 10), keep 3 "
                "masked", (tokens, mask, torch.log_softmax(logits, dim=-1), sampled, n_masked, noise, 4.0))


def _step_with(conf_fn: Callable, largest: bool = False, protect: bool = True, known: float = math.inf
               ) -> Callable:
    def step(tokens, mask, log_probs, sampled, n_masked, noise=None, noise_scale=0.0):
        conf = conf_fn(log_probs.gather(-1, sampled[..., None])[..., 0], noise, noise_scale)  # (B, N)
        if protect:
            conf = conf.masked_fill(~mask, -known if largest else known)
        chosen = conf.topk(n_masked, dim=-1, largest=largest).indices
        new_mask = torch.zeros_like(mask).scatter_(1, chosen, True)
        return torch.where(mask & ~new_mask, sampled, tokens), new_mask
    return step


def _noisy(conf, noise, scale):
    return conf + scale * noise if noise is not None else conf


def _step_overwrites_known(tokens, mask, log_probs, sampled, n_masked, noise=None, noise_scale=0.0):
    new_tokens, new_mask = ref.confidence_step(tokens, mask, log_probs, sampled, n_masked, noise, noise_scale)
    return torch.where(new_mask, tokens, sampled), new_mask


def _step_mask_id_guessed(tokens, mask, log_probs, sampled, n_masked, noise=None, noise_scale=0.0):
    new_tokens, new_mask = ref.confidence_step(tokens, mask, log_probs, sampled, n_masked, noise, noise_scale)
    return torch.where(new_mask, tokens.max(), new_tokens), new_mask


def _step_fills_remasked(tokens, mask, log_probs, sampled, n_masked, noise=None, noise_scale=0.0):
    new_tokens, new_mask = ref.confidence_step(tokens, mask, log_probs, sampled, n_masked, noise, noise_scale)
    return torch.where(mask, sampled, new_tokens), new_mask


def _step_best_token_confidence(tokens, mask, log_probs, sampled, n_masked, noise=None, noise_scale=0.0):
    conf = log_probs.max(-1).values
    conf = _noisy(conf, noise, noise_scale).masked_fill(~mask, math.inf)
    new_mask = torch.zeros_like(mask).scatter_(1, conf.topk(n_masked, dim=-1, largest=False).indices, True)
    return torch.where(mask & ~new_mask, sampled, tokens), new_mask


def _step_unscaled_noise(tokens, mask, log_probs, sampled, n_masked, noise=None, noise_scale=0.0):
    return ref.confidence_step(tokens, mask, log_probs, sampled, n_masked, noise, 1.0 if noise is not None else 0.0)


STEP_MISTAKES = [
    Mistake(_step_with(_noisy, largest=True), "that re-masks the most confident tokens; keep those and re-mask "
                                              "the least confident"),
    Mistake(_step_with(_noisy, protect=False), "a known token was re-masked; give known positions infinite "
                                               "confidence so that only newly sampled ones can be re-masked"),
    Mistake(_step_with(_noisy, known=0.0), "a known token was re-masked: known positions got a finite confidence "
                                           "(0, the log-probability of a certain token, or any other number), and "
                                           "a sample's log-probability plus positive noise can rise above any "
                                           "finite number"),
    Mistake(_step_with(lambda c, noise, s: c), "the Gumbel noise is left out; add noise_scale * noise to the "
                                               "log-probabilities"),
    Mistake(_step_with(lambda c, noise, s: c.exp() + s * noise if noise is not None else c.exp()),
            "the noise is added to probabilities; add it to log-probabilities (Gumbel noise on logits samples)"),
    Mistake(_step_overwrites_known, "known tokens were replaced by fresh samples; a token revealed at an earlier "
                                    "step never changes"),
    Mistake(_step_mask_id_guessed, "a position that stays masked got the largest id in tokens; it keeps the value "
                                   "tokens holds there (the mask id, whatever it is), so take it from tokens"),
    Mistake(_step_fills_remasked, "the positions masked again at this step got their samples too; only the revealed "
                                  "ones take a sample, a re-masked one keeps the mask id that tokens holds"),
    Mistake(_step_best_token_confidence, "that scores each position by its most likely token's log-probability; the "
                                         "confidence is the log-probability of the token actually sampled there"),
    Mistake(_step_unscaled_noise, "the noise is added at full weight whatever noise_scale is; noise_scale sets how "
                                  "much the noise counts"),
]


@chapter.exercise("8.3", reference=ref.confidence_step, hints=(
    "score each sampled token by its own log-probability (plus the scaled noise); known positions must never be "
    "picked for re-masking, and re-masking takes the lowest scores",
    "conf = log_probs.gather(-1, sampled[..., None])[..., 0], plus noise_scale * noise when noise is not None, then "
    "masked_fill(~mask, inf); topk(n_masked, largest=False) gives the positions to hide again",
    "conf = log_probs.gather(-1, sampled[..., None])[..., 0]; if noise is not None: conf = conf + noise_scale * noise; "
    "conf = conf.masked_fill(~mask, math.inf); new_mask = torch.zeros_like(mask).scatter_(1, conf.topk(n_masked, "
    "dim=-1, largest=False).indices, True); return torch.where(mask & ~new_mask, sampled, tokens), new_mask",
))
def confidence_step(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _step_cases(), mistakes=STEP_MISTAKES, off_cpu=True)


# --------------------------------------------------------------------------------------------------------
# 8.4 the order of a fixed neighbourhood

NAR = ((-1, 0), (0, -1))  # upper and left: the next-neighbour order
CONTEXT_3X3 = ((-1, -1), (-1, 0), (-1, 1), (0, -1))  # the four earlier neighbours of a 3 x 3 window


def _order_cases() -> Iterator[Case]:
    yield Case("4 x 5 map, upper-right only", (4, 5, ((-1, 1),)))
    yield Case("4 x 5 map, two up and right, and left", (4, 5, ((-1, 2), (0, -1))))
    for h, w in ((8, 8), (3, 5), (5, 2), (1, 4), (1, 1)):
        yield Case(f"{h} x {w} map, default neighbours", (h, w))
    yield Case("4 x 6 map, upper and left", (4, 6, NAR))
    yield Case("5 x 6 map, the earlier 3 x 3 neighbours", (5, 6, CONTEXT_3X3))
    yield Case("6 x 3 map, two rows up, and left", (6, 3, ((-2, 0), (0, -1))))
    yield Case("3 x 5 map, left only", (3, 5, ((0, -1),)))
    yield Case("3 x 4 map, no neighbours", (3, 4, ()))


# (h, w, neighbours) with an offset that is not earlier in raster order; on the 1 x 2 map it never lands inside
BAD_NEIGHBOURS = ((3, 3, ((0, 1),)), (3, 3, ((0, 0),)), (3, 3, ((1, -1),)), (3, 3, ((-1, 0), (0, 1))),
                  (1, 2, ((1, 0),)))


def _map_by(visit: Callable, pick: Callable = max, extra: int = 0, wrap: bool = False, sign: int = 1) -> Callable:
    # a step map computed in the order `visit(h, w)`, from `pick` of the known neighbours' steps
    def step_map(h, w, neighbours=NAR):
        step = torch.zeros(h, w, dtype=torch.long)
        for i, j in visit(h, w):
            cells = [(i + sign * di, j + sign * dj) for di, dj in neighbours]
            known = [int(step[a, b]) for a, b in cells if (a < h and b < w if wrap else 0 <= a < h and 0 <= b < w)]
            step[i, j] = 1 + pick(known) if known else 0
        return step + extra
    return step_map


def _rows(h, w):
    return [(i, j) for i in range(h) for j in range(w)]


def _columns(h, w):
    return [(i, j) for j in range(w) for i in range(h)]


def _map_diagonal(h, w, neighbours=NAR):
    return torch.arange(h)[:, None] + torch.arange(w)[None, :]


def _map_of_an_earlier_call(h, w, neighbours=NAR):
    # a map kept between calls by its size alone: the map of the check's first case of this size, when that case
    # had other neighbours (the cases run in order, so that one was computed and kept first)
    first = next(c.args for c in _order_cases() if c.args[:2] == (h, w))
    kept = tuple(first[2]) if len(first) > 2 else NAR
    if kept == tuple(neighbours):
        raise ValueError("this is the first call of this size")
    return answers.neighbour_step_map(h, w, kept)


ORDER_MISTAKES = [
    Mistake(_map_diagonal, "that is i + j, the map of the upper and left neighbours, whatever neighbours are "
                           "given; other neighbourhoods give other maps"),
    Mistake(_map_by(_columns), "the positions are not visited in raster order (row by row, each left to right) but "
                               "in another one (column by column, along anti-diagonals, backwards...), so a "
                               "neighbour up and to the right is read before its own pass is known"),
    Mistake(_map_by(_rows, pick=min), "1 + the earliest neighbour's pass: a token must wait for all of its "
                                      "neighbours, the latest included"),
    Mistake(_map_by(_rows, wrap=True), "a neighbour outside the map was read through a negative index (step[-1] "
                                       "is the last row); a neighbour outside the map does not exist and holds "
                                       "nothing up"),
    Mistake(_map_by(_rows, sign=-1), "the offsets are applied backwards: (di, dj) names the token at "
                                     "(i + di, j + dj)"),
    Mistake(_map_by(_rows, extra=1), "passes are counted from 0: a token with no neighbour in the map is pass 0"),
    Mistake(_map_of_an_earlier_call, "that is the map of an earlier call of the same size with other neighbours: "
                                     "a map kept between calls must be looked up by the neighbours too, not by "
                                     "the size alone"),
]


@chapter.exercise("8.4", reference=answers.neighbour_step_map, hints=(
    "a token's pass is one more than the latest pass among its neighbours inside the map (0 if it has none); "
    "in which order can you visit the positions so that every neighbour's pass is already known?",
    "every allowed offset points to an earlier position in raster order, so a loop over rows, then columns, always "
    "finds its neighbours done; skip neighbours outside the map (a negative index would wrap around)",
    "step[i, j] = 1 + max(step[i + di, j + dj] for the neighbours inside the map), or 0 when there are none; "
    "raise ValueError first for any (di, dj) with di > 0, or di == 0 and dj >= 0",
))
def neighbour_step_map(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _order_cases(), mistakes=ORDER_MISTAKES)
    for h, w, neighbours in BAD_NEIGHBOURS:
        where = f"{h} x {w} map, neighbours {neighbours}"
        try:
            call(fn, h, w, neighbours, where=where)
        except CheckFailure as exc:
            if "raised ValueError" in str(exc):
                continue
            raise
        raise CheckFailure(f"on input {where!r} your function returned a map; an offset that is not earlier in "
                           "raster order can make two tokens wait for each other (no order exists), so it must "
                           "raise ValueError, whether or not the offset lands inside this map")


# --------------------------------------------------------------------------------------------------------
# 8.5 the MDLM loss: masked cross-entropy weighted by the schedule


def _mdlm_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(85)
    for B, L, V in ((4, 6, 9), (2, 9, 7)):  # V is neither L - 1 nor L + 1: each wrong divisor is told apart
        logits = torch.randn(B, L, V, generator=g)
        targets = torch.randint(0, V, (B, L), generator=g)
        masked = torch.rand(B, L, generator=g) < 0.5
        masked[:, 0] = True  # at least one masked token per row
        yield Case(f"random B={B}, L={L}, V={V}", (logits, targets, masked, torch.rand(B, generator=g) * 0.9 + 0.1))
    logits = torch.randn(3, 4, 6, generator=g)
    targets = torch.randint(0, 6, (3, 4), generator=g)
    masked = torch.tensor([[True, False, True, False], [False] * 4, [True] * 4])
    yield Case("rows with 2, 0 and 4 masked tokens", (logits, targets, masked, torch.tensor([0.5, 0.3, 1.0])))
    logits = 40 * torch.randn(2, 5, 7, generator=g)  # gaps of a hundred nats and more: exp(-gap) underflows to 0
    masked = torch.rand(2, 5, generator=g) < 0.6
    masked[:, 0] = True
    yield Case("confident logits (40 x randn), B=2, L=5, V=7",
               (logits, torch.randint(0, 7, (2, 5), generator=g), masked, torch.tensor([0.7, 0.2])))


def _mdlm_unweighted(logits, targets, masked, t):
    return answers.mdlm_loss(logits, targets, masked, torch.ones_like(t))


def _mdlm_times_t(logits, targets, masked, t):
    return answers.mdlm_loss(logits, targets, masked, 1.0 / t)


def _mdlm_per_masked(logits, targets, masked, t):
    count = masked.sum(1).clamp(min=1)
    return answers.mdlm_loss(logits, targets, masked, t) * masked.shape[1] / count


def _mdlm_every_position(logits, targets, masked, t):
    return answers.mdlm_loss(logits, targets, torch.ones_like(masked), t)


def _mdlm_over_vocabulary(logits, targets, masked, t):
    return answers.mdlm_loss(logits, targets, masked, t) * targets.shape[1] / logits.shape[-1]


def _mdlm_over_length_minus_one(logits, targets, masked, t):
    return answers.mdlm_loss(logits, targets, masked, t) * targets.shape[1] / (targets.shape[1] - 1)


def _mdlm_not_per_token(logits, targets, masked, t):
    return answers.mdlm_loss(logits, targets, masked, t) * targets.shape[1]


def _mdlm_batch_mean(logits, targets, masked, t):
    return answers.mdlm_loss(logits, targets, masked, t).mean()


def _mdlm_log_of_softmax(logits, targets, masked, t):
    nll = -torch.log(logits.softmax(-1).gather(-1, targets[..., None])[..., 0])  # (B, L)
    return (nll * masked / t[:, None]).sum(1) / targets.shape[1]


MDLM_MISTAKES = [
    Mistake(_mdlm_unweighted, "the masked cross-entropy is not weighted: at time t each masked token counts 1/t"),
    Mistake(_mdlm_times_t, "the weight is 1/t, not t: rows with few masks (small t) count more"),
    Mistake(_mdlm_per_masked, "the sum is divided by the number of masked tokens; the bound is in nats per "
                              "token of the sequence, so divide by its length L"),
    Mistake(_mdlm_over_vocabulary, "the sum is divided by the vocabulary size V; the bound is in nats per token of "
                                   "the sequence, so divide by its length L"),
    Mistake(_mdlm_over_length_minus_one, "the sum is divided by L - 1; every one of the L positions is a token of "
                                         "the sequence, so divide by L"),
    Mistake(_mdlm_not_per_token, "the sum over the sequence is not divided by its length L; the bound is in nats "
                                 "per token"),
    Mistake(_mdlm_batch_mean, "the losses are averaged over the batch; the function returns one loss per "
                              "sequence, shape (B,)"),
    Mistake(_mdlm_every_position, "unmasked tokens are copied through by the model and cost nothing; only masked "
                                  "positions enter the loss"),
    Mistake(_mdlm_log_of_softmax, "the log of a softmax: with confident logits a small probability underflows to 0 "
                                  "and its log is -inf, so the loss turns inf or nan where the log-probability "
                                  "itself is finite"),
]


@chapter.exercise("8.5", reference=answers.mdlm_loss, hints=(
    "the bound integrates, over t, the cross-entropy of the masked tokens weighted by -alpha'(t) / (1 - alpha(t)); "
    "with alpha(t) = 1 - t, what is that weight?",
    "per-token cross-entropy with reduction='none' (B, L), times masked, times 1 / t[:, None], summed over L and "
    "divided by L",
    "nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction='none'); "
    "return (nll * masked / t[:, None]).sum(1) / targets.shape[1]",
))
def mdlm_loss(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _mdlm_cases(), mistakes=MDLM_MISTAKES, grad_wrt=(0,), off_cpu=True)


# --------------------------------------------------------------------------------------------------------
# 8.6 one denoising step of the diffusion LM


def _reveal_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(86)
    M = 9
    for t, s in ((1.0, 0.75), (0.5, 0.25), (0.3, 0.0), (0.8, 0.7)):
        # ~75 masked positions: enough draws that the wrong reveal probabilities (which differ by 0.08 or more)
        # disagree somewhere on every case, so each mistake is named as itself
        x = torch.randint(0, M, (4, 32), generator=g)
        x[torch.rand(4, 32, generator=g) < 0.6] = M
        yield Case(f"t = {t}, s = {s}", (x, torch.randint(0, M, (4, 32), generator=g), t, s, M,
                                         torch.rand(4, 32, generator=g)))
    x = torch.tensor([[M, 1, M, 2, M, M, M]])
    u = torch.tensor([[0.1, 0.1, 0.45, 0.45, 0.55, 0.9, 0.5]])
    yield Case("hand-made: t = 1, s = 0.5, draws on both sides of 1/2 and one at it",
               (x, torch.tensor([[5, 6, 7, 8, 4, 3, 2]]), 1.0, 0.5, M, u))
    x = torch.randint(1, M + 1, (2, 8), generator=g)
    x[torch.rand(2, 8, generator=g) < 0.5] = 0
    yield Case("mask_id 0 (the lowest id), t = 0.6, s = 0.2",
               (x, torch.randint(1, M + 1, (2, 8), generator=g), 0.6, 0.2, 0, torch.rand(2, 8, generator=g)))


def _reveal_stay_prob(x, proposal, t, s, mask_id, u):
    reveal = (x == mask_id) & (u < s / t)
    return torch.where(reveal, proposal, x)


def _reveal_unnormalised(x, proposal, t, s, mask_id, u):
    reveal = (x == mask_id) & (u < t - s)
    return torch.where(reveal, proposal, x)


def _reveal_over_one_minus_s(x, proposal, t, s, mask_id, u):
    reveal = (x == mask_id) & (u < (t - s) / (1 - s))
    return torch.where(reveal, proposal, x)


def _reveal_overwrites(x, proposal, t, s, mask_id, u):
    return torch.where(u < (t - s) / t, proposal, x)


def _reveal_inverted(x, proposal, t, s, mask_id, u):
    reveal = (x == mask_id) & (u >= (t - s) / t)
    return torch.where(reveal, proposal, x)


def _reveal_at_or_below(x, proposal, t, s, mask_id, u):
    reveal = (x == mask_id) & (u <= (t - s) / t)
    return torch.where(reveal, proposal, x)


def _reveal_every_masked(x, proposal, t, s, mask_id, u):
    return torch.where(x == mask_id, proposal, x)


def _reveal_largest_id_is_mask(x, proposal, t, s, mask_id, u):
    reveal = (x == x.max()) & (u < (t - s) / t)  # the mask id taken as the largest id, not the argument
    return torch.where(reveal, proposal, x)


def _reveal_wipes_known(x, proposal, t, s, mask_id, u):
    reveal = (x == mask_id) & (u < (t - s) / t)
    return torch.where(reveal, proposal, torch.full_like(x, mask_id))


REVEAL_MISTAKES = [
    Mistake(_reveal_unnormalised, "t - s is the chance that a token is masked at t and not at s; given that it "
                                  "is masked at t (probability t), the chance to reveal it is (t - s) / t"),
    Mistake(_reveal_stay_prob, "s / t is the chance that a masked token stays masked; a token is revealed with "
                               "the rest"),
    Mistake(_reveal_over_one_minus_s, "(t - s) / (1 - s) conditions on the wrong event: what is known is that the "
                                      "token is masked at t, which has probability t, so p = (t - s) / t"),
    Mistake(_reveal_overwrites, "tokens that are already revealed must never change (an absorbing process has "
                                "no way back)"),
    Mistake(_reveal_wipes_known, "every position not revealed at this step was set to the mask id, so tokens "
                                 "revealed earlier were masked again; they never change (an absorbing process has "
                                 "no way back)"),
    Mistake(_reveal_inverted, "a token is revealed when its draw u is below the reveal probability"),
    Mistake(_reveal_at_or_below, "a draw equal to the reveal probability revealed its token; the rule is u < p, "
                                 "strictly, so that a draw in [0, 1) reveals with probability exactly p"),
    Mistake(_reveal_largest_id_is_mask, "the masked positions were found as the largest id, not as mask_id: the "
                                        "mask id is an argument and need not be the largest (here it is 0)"),
]


@chapter.exercise("8.6", reference=answers.reveal_step, hints=(
    "under the linear schedule a token is masked at time t with probability t; given that, how likely is it to be "
    "masked no more at time s < t?",
    "p = (t - s) / t; reveal where x == mask_id and u < p, taking the proposal there; everything else stays",
    "reveal = (x == mask_id) & (u < (t - s) / t); return torch.where(reveal, proposal, x)",
))
def reveal_step(fn: Callable, ref_fn: Callable) -> None:
    try:
        compare_cases(fn, ref_fn, _reveal_cases(), mistakes=REVEAL_MISTAKES, off_cpu=True)
    except CheckFailure as exc:
        raise _told_apart(exc, fn) from None


REVEAL_ALL = ("every masked token was revealed at once; each is revealed only with probability (t - s) / t, so "
              "that some stay masked for the later steps")


def _told_apart(failure: CheckFailure, fn: Callable) -> CheckFailure:
    """``failure``, its diagnosis (t - s) / (1 - s) replaced when ``fn`` reveals every masked token: at t = 1,
    where the first case fails, both reveal them all; another case tells them apart."""
    says = next(m.says for m in REVEAL_MISTAKES if m.fn is _reveal_over_one_minus_s)
    if not str(failure).endswith(says):
        return failure
    case = next(c for c in _reveal_cases() if c.args[2] < 1.0)
    try:
        got = fn(*(a.clone() if isinstance(a, torch.Tensor) else a for a in case.args))
        everything = torch.equal(got, _reveal_every_masked(*case.args))
    except Exception:  # noqa: BLE001 - the diagnosis stays as it is
        everything = False
    if not everything or torch.equal(got, _reveal_over_one_minus_s(*case.args)):
        return failure
    return CheckFailure(f"{str(failure)[: -len(says)]}{REVEAL_ALL}")


# --------------------------------------------------------------------------------------------------------
# 8.7 the block-wise schedule


def _schedule_cases() -> Iterator[Case]:
    # first a case where passes per block counted as steps // block_size (4) or as per - 1 (1) differ from per (2)
    # and from each other; with blocks of 4 and 4 steps both give 1, and the first failure could not tell them apart
    yield Case("length 8, blocks of 2, 8 steps", (8, 2, 8))
    yield Case("length 8, blocks of 4, 4 steps", (8, 4, 4))
    yield Case("length 6, one block (full diffusion), 3 steps", (6, 6, 3))
    yield Case("length 4, blocks of 1 (AR order), 4 steps", (4, 1, 4))
    yield Case("length 12, blocks of 3, 12 steps", (12, 3, 12))


def _schedule_global_time(length, block_size, steps):
    grid = torch.linspace(1.0, 0.0, steps + 1).tolist()
    return [(a, b, grid[k], grid[k + 1]) for k, (a, b, _, _) in
            enumerate(answers.block_schedule(length, block_size, steps))]


def _schedule_all_steps_each(length, block_size, steps):
    grid = torch.linspace(1.0, 0.0, steps + 1).tolist()
    return [(a, a + block_size, grid[i], grid[i + 1]) for a in range(0, length, block_size) for i in range(steps)]


def _schedule_right_to_left(length, block_size, steps):
    per = steps // (length // block_size)
    rows = answers.block_schedule(length, block_size, steps)
    blocks = [rows[i : i + per] for i in range(0, len(rows), per)]
    return [row for blk in reversed(blocks) for row in blk]


def _schedule_short_of_zero(length, block_size, steps):
    per = steps // (length // block_size)
    grid = [1 - i / (per + 1) for i in range(per + 1)]
    return [(a, a + block_size, grid[i], grid[i + 1]) for a in range(0, length, block_size) for i in range(per)]


def _schedule_one_pass_short(length, block_size, steps):
    per = steps // (length // block_size)
    grid = torch.linspace(1.0, 0.0, per).tolist()
    return [(a, a + block_size, grid[i], grid[i + 1]) for a in range(0, length, block_size) for i in range(per - 1)]


def _schedule_time_rising(length, block_size, steps):
    return [(a, b, 1.0 - t, 1.0 - s) for a, b, t, s in answers.block_schedule(length, block_size, steps)]


def _schedule_inclusive_end(length, block_size, steps):
    return [(a, b - 1, t, s) for a, b, t, s in answers.block_schedule(length, block_size, steps)]


def _schedule_per_block_size(length, block_size, steps):
    per = max(1, steps // block_size)
    grid = torch.linspace(1.0, 0.0, per + 1).tolist()
    return [(a, a + block_size, grid[i], grid[i + 1]) for a in range(0, length, block_size) for i in range(per)]


SCHEDULE_MISTAKES = [
    Mistake(_schedule_global_time, "time runs from 1 to 0 inside every block (each block starts all masked and "
                                   "must end clean), not once over the whole sequence"),
    Mistake(_schedule_all_steps_each, "steps counts every pass of the whole generation; each block gets "
                                      "steps // n_blocks of them"),
    Mistake(_schedule_right_to_left, "blocks go left to right: each is conditioned on the finished blocks "
                                     "before it"),
    Mistake(_schedule_short_of_zero, "the times fall in steps of 1 / (per + 1), so a block's last pass stops short "
                                     "of t = 0 and leaves tokens masked; inside a block time falls from 1 to 0"),
    Mistake(_schedule_time_rising, "the time rises from 0 to 1 inside a block; it falls from 1 (all masked) to 0 "
                                   "(clean), t the time before a pass and s the time after it"),
    Mistake(_schedule_inclusive_end, "end is the block's last index; it is one past it, as in a slice "
                                     "x[start:end]"),
    Mistake(_schedule_per_block_size, "each block got steps // block_size passes; the steps are shared among the "
                                      "blocks, steps // n_blocks each"),
    Mistake(_schedule_one_pass_short, "each block got one pass too few: a grid of n times from 1 to 0 bounds "
                                      "n - 1 passes, so a block's steps // n_blocks passes need steps // n_blocks "
                                      "+ 1 times"),
]


@chapter.exercise("8.7", reference=answers.block_schedule, hints=(
    "split 0..length-1 into blocks of block_size; each block gets the same number of passes, and inside a block "
    "the time falls from 1 (all masked) to 0 (clean)",
    "per = steps // (length // block_size); grid = torch.linspace(1, 0, per + 1).tolist(); one entry "
    "(start, start + block_size, grid[i], grid[i + 1]) per block and per i",
    "per = steps // (length // block_size); grid = torch.linspace(1, 0, per + 1).tolist(); return [(a, a + "
    "block_size, grid[i], grid[i + 1]) for a in range(0, length, block_size) for i in range(per)]",
))
def block_schedule(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _schedule_cases(), mistakes=SCHEDULE_MISTAKES)
    for case in _schedule_cases():
        for k, (start, end, t, s) in enumerate(call(fn, *case.args, where=case.name)):
            if not (isinstance(start, int) and isinstance(end, int) and isinstance(t, float) and isinstance(s, float)):
                raise CheckFailure(f"pass {k} on input {case.name!r} is ({describe(start)}, {describe(end)}, "
                                   f"{describe(t)}, {describe(s)}); start and end should be Python ints and t, s "
                                   "Python floats (a tensor's .tolist() gives them)")
