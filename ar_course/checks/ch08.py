"""Checks for chapter 08, parallel decoding: ``checks.ch08.mask_ratio(mask_ratio)``.

Every check compares with the library (:mod:`ar_course.masked` for images, :mod:`ar_course.diffusion_lm` for
text) on seeded random inputs and hand-made edge cases (the ends of the schedule, rows with different numbers of
masked tokens, noise that overturns the order of confidences, non-square maps, uniform draws on both sides of the
reveal probability, one block and blocks of one, a Python float for the schedule), and names the usual mistakes: a
schedule that counts revealed tokens instead of masked ones, a loss over every position or averaged per row (or
one that no gradient flows through), re-masking the most confident tokens or known ones, a step that writes into
its inputs, anti-diagonals in the wrong direction; for text, an MDLM loss without its 1/t weight or
averaged over the masked tokens, a reveal probability that is not conditioned on being masked, a block schedule
whose time runs once over the whole sequence."""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ar_course.checks.core import Case, Chapter, CheckFailure, Mistake, call, clone_args, compare_cases, describe
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


def _ratio_revealed(r, schedule="cosine"):
    return 1 - ref.mask_ratio(r, schedule)


def _ratio_full_angle(r, schedule="cosine"):
    return torch.cos(math.pi * r) if schedule == "cosine" else ref.mask_ratio(r, schedule)


def _ratio_sine(r, schedule="cosine"):
    return torch.sin(0.5 * math.pi * r) if schedule == "cosine" else ref.mask_ratio(r, schedule)


def _ratio_square_of_r(r, schedule="cosine"):
    return r * r if schedule == "square" else ref.mask_ratio(r, schedule)


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
# 8.2 the masked cross-entropy


def _ce_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(82)
    for b, n, v in ((2, 6, 5), (4, 16, 11)):
        logits = torch.randn(b, n, v, generator=g)
        targets = torch.randint(0, v, (b, n), generator=g)
        mask = torch.rand(b, n, generator=g) < 0.5
        mask[0, :] = True  # rows with different numbers of masked positions
        mask[1, 1:] = False
        mask[1, 0] = True
        yield Case(f"random ({b}, {n}, {v})", (logits, targets, mask))
    logits = torch.randn(1, 4, 3, generator=g)
    one = torch.tensor([[False, False, True, False]])
    yield Case("one masked position", (logits, torch.tensor([[0, 1, 2, 0]]), one))


def _ce_all(logits, targets, mask):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _ce_visible(logits, targets, mask):
    return F.cross_entropy(logits[~mask], targets[~mask])


def _ce_per_row(logits, targets, mask):
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, N)
    return ((nll * mask).sum(1) / mask.sum(1)).mean()


def _ce_zeroed_mean(logits, targets, mask):
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, N)
    return (nll * mask).mean()


def _ce_sum(logits, targets, mask):
    return F.cross_entropy(logits[mask], targets[mask], reduction="sum")


CE_MISTAKES = [
    Mistake(_ce_all, "every position counts; the visible ones are trivial to predict (the model sees them) and "
                     "must be left out"),
    Mistake(_ce_visible, "those are the visible positions; mask is True where the token is hidden"),
    Mistake(_ce_per_row, "that averages each row first, so a row with one masked token weighs as much as a row "
                         "with sixty; average over all masked tokens together"),
    Mistake(_ce_zeroed_mean, "zeroing the visible positions and taking the mean divides by every position, "
                             "not by the masked ones"),
    Mistake(_ce_sum, "that is the sum; the loss is the mean over the masked tokens"),
]


@chapter.exercise("8.2", reference=ref.masked_cross_entropy, hints=(
    "only the hidden positions are predictions the model has to make; pick them out before the cross-entropy",
    "boolean indexing logits[mask] gives (M, V) and targets[mask] gives (M,): one row per masked token",
    "return F.cross_entropy(logits[mask], targets[mask])",
))
def masked_cross_entropy(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _ce_cases(), mistakes=CE_MISTAKES, grad_wrt=(0,))


# --------------------------------------------------------------------------------------------------------
# 8.3 one confidence-based decoding step

MASK = 99


def _step_case(name: str, g: torch.Generator, b: int, n: int, v: int, known: float, n_masked: int,
               noise_scale: float) -> Case:
    mask = torch.rand(b, n, generator=g) >= known  # (B, N)
    mask[:, : n_masked + 1] = True  # every row has more masked positions than stay masked
    tokens = torch.randint(0, v, (b, n), generator=g).masked_fill(mask, MASK)
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


def _step_with(conf_fn: Callable, largest: bool = False, protect: bool = True) -> Callable:
    def step(tokens, mask, log_probs, sampled, n_masked, noise=None, noise_scale=0.0):
        conf = conf_fn(log_probs.gather(-1, sampled[..., None])[..., 0], noise, noise_scale)  # (B, N)
        if protect:
            conf = conf.masked_fill(~mask, float("-inf") if largest else float("inf"))
        chosen = conf.topk(n_masked, dim=-1, largest=largest).indices
        new_mask = torch.zeros_like(mask).scatter_(1, chosen, True)
        return torch.where(mask & ~new_mask, sampled, tokens), new_mask
    return step


def _noisy(conf, noise, scale):
    return conf + scale * noise if noise is not None else conf


def _step_overwrites_known(tokens, mask, log_probs, sampled, n_masked, noise=None, noise_scale=0.0):
    new_tokens, new_mask = ref.confidence_step(tokens, mask, log_probs, sampled, n_masked, noise, noise_scale)
    return torch.where(new_mask, tokens, sampled), new_mask


STEP_MISTAKES = [
    Mistake(_step_with(_noisy, largest=True), "that re-masks the most confident tokens; keep those and re-mask "
                                              "the least confident"),
    Mistake(_step_with(_noisy, protect=False), "a known token was re-masked; give known positions infinite "
                                               "confidence so that only newly sampled ones can be re-masked"),
    Mistake(_step_with(lambda c, noise, s: c), "the Gumbel noise is left out; add noise_scale * noise to the "
                                               "log-probabilities"),
    Mistake(_step_with(lambda c, noise, s: c.exp() + s * noise if noise is not None else c.exp()),
            "the noise is added to probabilities; add it to log-probabilities (Gumbel noise on logits samples)"),
    Mistake(_step_overwrites_known, "known tokens were replaced by fresh samples; a token revealed at an earlier "
                                    "step never changes"),
]


@chapter.exercise("8.3", reference=ref.confidence_step, hints=(
    "score each sampled token by its own log-probability (plus the scaled noise); known positions must never be "
    "picked for re-masking, and re-masking takes the lowest scores",
    "conf = log_probs.gather(-1, sampled[..., None])[..., 0] + noise_scale * noise, then masked_fill(~mask, inf); "
    "topk(n_masked, largest=False) gives the positions to hide again",
    "new_mask = torch.zeros_like(mask).scatter_(1, conf.topk(n_masked, dim=-1, largest=False).indices, True); "
    "return torch.where(mask & ~new_mask, sampled, tokens), new_mask",
))
def confidence_step(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _step_cases(), mistakes=STEP_MISTAKES)
    names = ("tokens", "mask", "log_probs", "sampled")
    for case in _step_cases():
        args = clone_args(case.args)
        call(fn, *args, where=case.name)
        for name, before, after in zip(names, case.args, args):
            if not torch.equal(before, after):
                raise CheckFailure(f"your function changed its argument `{name}` in place on input {case.name!r}; "
                                   "the caller may still need the map it passed in, so build new tensors")


# --------------------------------------------------------------------------------------------------------
# 8.4 the next-neighbour order


def _order_cases() -> Iterator[Case]:
    for h, w in ((8, 8), (3, 5), (5, 2), (1, 4), (1, 1)):
        yield Case(f"{h} x {w} map", (h, w))


def _order_raster(h, w):
    return torch.arange(h * w).view(h, w)


def _order_other_diagonal(h, w):
    i, j = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return (i - j + w - 1).long()


def _order_rings(h, w):
    i, j = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return torch.maximum(i, j).long()


def _order_one_based(h, w):
    return answers.neighbour_step_map(h, w) + 1


def _order_rows(h, w):
    return torch.arange(h)[:, None].expand(h, w).clone()


ORDER_MISTAKES = [
    Mistake(_order_raster, "that is raster order, one token per step (h * w steps); the neighbour order "
                           "generates a whole anti-diagonal at once"),
    Mistake(_order_other_diagonal, "those diagonals run the other way (i - j): a token's upper neighbour is "
                                   "then generated after it"),
    Mistake(_order_rings, "max(i, j) grows square rings from the corner; a token's left and upper neighbours "
                          "must come strictly before it"),
    Mistake(_order_one_based, "steps are counted from 0: the corner (0, 0) is step 0"),
    Mistake(_order_rows, "one row per step; the next token on a row would need its left neighbour from the "
                         "same step"),
]


@chapter.exercise("8.4", reference=answers.neighbour_step_map, hints=(
    "a token can be generated once its upper neighbour (i - 1, j) and its left neighbour (i, j - 1) are known; "
    "what is the earliest step for (i, j) if (0, 0) is step 0?",
    "the step is i + j; build it from a column of row indices and a row of column indices (broadcasting)",
    "return torch.arange(h)[:, None] + torch.arange(w)[None, :]",
))
def neighbour_step_map(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _order_cases(), mistakes=ORDER_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 8.5 the MDLM loss: masked cross-entropy weighted by the schedule


def _mdlm_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(85)
    for B, L, V in ((4, 6, 5), (2, 9, 7)):
        logits = torch.randn(B, L, V, generator=g)
        targets = torch.randint(0, V, (B, L), generator=g)
        masked = torch.rand(B, L, generator=g) < 0.5
        masked[:, 0] = True  # at least one masked token per row
        yield Case(f"random B={B}, L={L}, V={V}", (logits, targets, masked, torch.rand(B, generator=g) * 0.9 + 0.1))
    logits = torch.randn(3, 4, 6, generator=g)
    targets = torch.randint(0, 6, (3, 4), generator=g)
    masked = torch.tensor([[True, False, True, False], [False] * 4, [True] * 4])
    yield Case("rows with 2, 0 and 4 masked tokens", (logits, targets, masked, torch.tensor([0.5, 0.3, 1.0])))


def _mdlm_unweighted(logits, targets, masked, t):
    return answers.mdlm_loss(logits, targets, masked, torch.ones_like(t))


def _mdlm_times_t(logits, targets, masked, t):
    return answers.mdlm_loss(logits, targets, masked, 1.0 / t)


def _mdlm_per_masked(logits, targets, masked, t):
    count = masked.sum(1).clamp(min=1)
    return answers.mdlm_loss(logits, targets, masked, t) * masked.shape[1] / count


def _mdlm_every_position(logits, targets, masked, t):
    return answers.mdlm_loss(logits, targets, torch.ones_like(masked), t)


MDLM_MISTAKES = [
    Mistake(_mdlm_unweighted, "the masked cross-entropy is not weighted: at time t each masked token counts 1/t"),
    Mistake(_mdlm_times_t, "the weight is 1/t, not t: rows with few masks (small t) count more"),
    Mistake(_mdlm_per_masked, "the sum is divided by the number of masked tokens; the bound is in nats per "
                              "token of the sequence, so divide by its length L"),
    Mistake(_mdlm_every_position, "unmasked tokens are copied through by the model and cost nothing; only masked "
                                  "positions enter the loss"),
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
    compare_cases(fn, ref_fn, _mdlm_cases(), mistakes=MDLM_MISTAKES, grad_wrt=(0,))


# --------------------------------------------------------------------------------------------------------
# 8.6 one denoising step of the diffusion LM


def _reveal_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(86)
    M = 9
    for t, s in ((1.0, 0.75), (0.5, 0.25), (0.3, 0.0), (0.8, 0.7)):
        x = torch.randint(0, M, (3, 10), generator=g)
        x[torch.rand(3, 10, generator=g) < 0.6] = M
        yield Case(f"t = {t}, s = {s}", (x, torch.randint(0, M, (3, 10), generator=g), t, s, M,
                                         torch.rand(3, 10, generator=g)))
    x = torch.tensor([[M, 1, M, 2, M, M]])
    u = torch.tensor([[0.1, 0.1, 0.45, 0.45, 0.55, 0.9]])
    yield Case("hand-made: t = 1, s = 0.5, draws on both sides of 1/2", (x, torch.tensor([[5, 6, 7, 8, 4, 3]]),
                                                                         1.0, 0.5, M, u))


def _reveal_stay_prob(x, proposal, t, s, mask_id, u):
    reveal = (x == mask_id) & (u < s / t)
    return torch.where(reveal, proposal, x)


def _reveal_unnormalised(x, proposal, t, s, mask_id, u):
    reveal = (x == mask_id) & (u < t - s)
    return torch.where(reveal, proposal, x)


def _reveal_overwrites(x, proposal, t, s, mask_id, u):
    return torch.where(u < (t - s) / t, proposal, x)


def _reveal_inverted(x, proposal, t, s, mask_id, u):
    reveal = (x == mask_id) & (u >= (t - s) / t)
    return torch.where(reveal, proposal, x)


REVEAL_MISTAKES = [
    Mistake(_reveal_unnormalised, "t - s is the chance that a token is masked at t and not at s; given that it "
                                  "is masked at t (probability t), the chance to reveal it is (t - s) / t"),
    Mistake(_reveal_stay_prob, "s / t is the chance that a masked token stays masked; a token is revealed with "
                               "the rest"),
    Mistake(_reveal_overwrites, "tokens that are already revealed must never change (an absorbing process has "
                                "no way back)"),
    Mistake(_reveal_inverted, "a token is revealed when its draw u is below the reveal probability"),
]


@chapter.exercise("8.6", reference=answers.reveal_step, hints=(
    "under the linear schedule a token is masked at time t with probability t; given that, how likely is it to be "
    "masked no more at time s < t?",
    "p = (t - s) / t; reveal where x == mask_id and u < p, taking the proposal there; everything else stays",
    "reveal = (x == mask_id) & (u < (t - s) / t); return torch.where(reveal, proposal, x)",
))
def reveal_step(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _reveal_cases(), mistakes=REVEAL_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 8.7 the block-wise schedule


def _schedule_cases() -> Iterator[Case]:
    yield Case("length 8, blocks of 4, 4 steps", (8, 4, 4))
    yield Case("length 8, blocks of 2, 8 steps", (8, 2, 8))
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


SCHEDULE_MISTAKES = [
    Mistake(_schedule_global_time, "time runs from 1 to 0 inside every block (each block starts all masked and "
                                   "must end clean), not once over the whole sequence"),
    Mistake(_schedule_all_steps_each, "steps counts every pass of the whole generation; each block gets "
                                      "steps // n_blocks of them"),
    Mistake(_schedule_right_to_left, "blocks go left to right: each is conditioned on the finished blocks "
                                     "before it"),
]


@chapter.exercise("8.7", reference=answers.block_schedule, hints=(
    "split 0..length-1 into blocks of block_size; each block gets the same number of passes, and inside a block "
    "the time falls from 1 (all masked) to 0 (clean)",
    "per = steps // (length // block_size); grid = torch.linspace(1, 0, per + 1).tolist(); one entry "
    "(start, start + block_size, grid[i], grid[i + 1]) per block and per i",
    "return [(a, a + block_size, grid[i], grid[i + 1]) for a in range(0, length, block_size) for i in range(per)]",
))
def block_schedule(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _schedule_cases(), mistakes=SCHEDULE_MISTAKES)
    for case in _schedule_cases():
        for k, (start, end, t, s) in enumerate(call(fn, *case.args, where=case.name)):
            if not (isinstance(start, int) and isinstance(end, int) and isinstance(t, float) and isinstance(s, float)):
                raise CheckFailure(f"pass {k} on input {case.name!r} is ({describe(start)}, {describe(end)}, "
                                   f"{describe(t)}, {describe(s)}); start and end should be Python ints and t, s "
                                   "Python floats (a tensor's .tolist() gives them)")
