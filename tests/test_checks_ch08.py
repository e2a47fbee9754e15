"""Chapter 08 checks: each accepts the reference (and, for the random masks and the step maps, a right answer
computed another way), reports a stub as not attempted, and rejects plausible wrong answers (a revealed-fraction
schedule; training masks rounded the wrong way, empty, with one count or one choice for the whole batch, the first
positions or a run; re-masking the most confident or the known tokens, noise left out; a step map that ignores the
neighbourhood, visits columns first or reads through a negative index; an unweighted or per-masked-token MDLM
loss, an unconditioned reveal probability, known tokens overwritten, one time grid for all blocks...)."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from ar_course.checks import ch08
from ar_course.checks.reference import ch08 as answers
from ar_course.masked import functional as M
from checks_helpers import assert_fails, assert_not_attempted, assert_passes, stub

# 8.1 ------------------------------------------------------------------------------------------------------


def ratio_revealed(r, schedule="cosine"):
    return 1 - M.mask_ratio(r, schedule)


def ratio_full_angle(r, schedule="cosine"):
    r = torch.as_tensor(r, dtype=torch.float32)
    return {"cosine": torch.cos(math.pi * r), "linear": 1 - r, "square": 1 - r * r}[schedule]


def ratio_sine(r, schedule="cosine"):
    r = torch.as_tensor(r, dtype=torch.float32)
    return {"cosine": torch.sin(0.5 * math.pi * r), "linear": 1 - r, "square": 1 - r * r}[schedule]


def ratio_square_wrong(r, schedule="cosine"):
    r = torch.as_tensor(r, dtype=torch.float32)
    return {"cosine": torch.cos(0.5 * math.pi * r), "linear": 1 - r, "square": (1 - r) ** 2}[schedule]


def ratio_half_cosine(r, schedule="cosine"):
    r = torch.as_tensor(r, dtype=torch.float32)
    return {"cosine": (1 + torch.cos(math.pi * r)) / 2, "linear": 1 - r, "square": 1 - r * r}[schedule]


def ratio_ignores_schedule(r, schedule="cosine"):
    return torch.cos(0.5 * math.pi * torch.as_tensor(r, dtype=torch.float32))


def ratio_float64(r, schedule="cosine"):
    return M.mask_ratio(r, schedule).double()


def ratio_tensor_only(r, schedule="cosine"):  # right on tensors; raises on a Python float r
    return {"cosine": torch.cos(0.5 * math.pi * r), "linear": 1 - r, "square": 1 - r * r}[schedule]


def ratio_float_passthrough(r, schedule="cosine"):  # returns a Python float for a Python float r
    if isinstance(r, float):
        return {"cosine": math.cos(0.5 * math.pi * r), "linear": 1 - r, "square": 1 - r * r}[schedule]
    return M.mask_ratio(r, schedule)


def test_8_1():
    check = ch08.mask_ratio
    assert_passes(check, M.mask_ratio)
    assert_not_attempted(check, stub)
    for wrong in (ratio_revealed, ratio_full_angle, ratio_sine, ratio_square_wrong, ratio_ignores_schedule,
                  ratio_float64):
        assert_fails(check, wrong)
    assert_fails(check, ratio_full_angle, contains="quarter turn")
    assert_fails(check, ratio_ignores_schedule, contains="schedule argument is ignored")
    assert_fails(check, ratio_sine, contains="rises from 0 to 1")
    assert_fails(check, ratio_revealed, contains="fraction already revealed")
    assert_fails(check, ratio_square_wrong, contains="squares the linear schedule")
    assert_fails(check, ratio_half_cosine, contains="half-turn cosine")
    assert_fails(check, ratio_tensor_only, contains="Python float")
    assert_fails(check, ratio_float_passthrough, contains="should be a torch.Tensor")


def ratio_rounded_pi(r, schedule="cosine"):  # pi / 2 rounded to 1.57: gamma(1) = 8e-4, not 0
    r = torch.as_tensor(r, dtype=torch.float32)
    return torch.cos(1.57 * r) if schedule == "cosine" else M.mask_ratio(r, schedule)


def test_8_1_rejects_pi_over_2_rounded_to_1_57():
    """8.1's tolerance is tight enough for a cosine with pi/2 written as 1.57: the end of sampling would not be
    'everything revealed'."""
    assert_fails(ch08.mask_ratio, ratio_rounded_pi)


# 8.2 ------------------------------------------------------------------------------------------------------


def _count(r, n, schedule, rounding=torch.ceil, least=1):
    return rounding(M.mask_ratio(r, schedule) * n).long().clamp(least, n)


def _hide_lowest(scores, count):  # hide, in each row, the `count` positions with the lowest scores
    return scores.argsort(1).argsort(1) < count[:, None]


def mask_floor(r, n, schedule="cosine", generator=None):
    return _hide_lowest(torch.rand(len(r), n, generator=generator), _count(r, n, schedule, torch.floor))


def mask_round(r, n, schedule="cosine", generator=None):
    return _hide_lowest(torch.rand(len(r), n, generator=generator), _count(r, n, schedule, torch.round))


def mask_floor_plus_one(r, n, schedule="cosine", generator=None):
    return _hide_lowest(torch.rand(len(r), n, generator=generator),
                        _count(r, n, schedule, lambda x: torch.floor(x) + 1))


def mask_may_be_empty(r, n, schedule="cosine", generator=None):
    return _hide_lowest(torch.rand(len(r), n, generator=generator), _count(r, n, schedule, least=0))


def mask_one_count(r, n, schedule="cosine", generator=None):  # topk needs one k: the first row's
    k = int(_count(r, n, schedule)[0])
    hidden = torch.rand(len(r), n, generator=generator).topk(k, dim=1).indices
    return torch.zeros(len(r), n, dtype=torch.bool).scatter_(1, hidden, True)


def mask_first_positions(r, n, schedule="cosine", generator=None):
    return torch.arange(n)[None, :] < _count(r, n, schedule)[:, None]


def mask_one_permutation(r, n, schedule="cosine", generator=None):  # one random order for the whole batch
    rank = torch.randperm(n, generator=generator).argsort()[None, :].expand(len(r), n)
    return rank < _count(r, n, schedule)[:, None]


def mask_contiguous_run(r, n, schedule="cosine", generator=None):  # a random start, then a run (wrapping round)
    start = torch.randint(0, n, (len(r), 1), generator=generator)
    return (torch.arange(n)[None, :] - start) % n < _count(r, n, schedule)[:, None]


def mask_global_rng(r, n, schedule="cosine", generator=None):
    return _hide_lowest(torch.rand(len(r), n), _count(r, n, schedule))


def mask_bernoulli(r, n, schedule="cosine", generator=None):  # each position hidden on its own with gamma(r)
    return torch.rand(len(r), n, generator=generator) < M.mask_ratio(r, schedule)[:, None]


def mask_float_counts(r, n, schedule="cosine", generator=None):
    return M.training_mask(r, n, schedule, generator).float()


def mask_per_row_loop(r, n, schedule="cosine", generator=None):  # right, drawn another way: a permutation per row
    out = torch.zeros(len(r), n, dtype=torch.bool)
    for b, count in enumerate(_count(r, n, schedule).tolist()):
        out[b, torch.randperm(n, generator=generator)[:count]] = True
    return out


def mask_own_seed(r, n, schedule="cosine", generator=None):  # a seed of its own: `generator` is never used
    return _hide_lowest(torch.rand(len(r), n, generator=torch.Generator().manual_seed(0)), _count(r, n, schedule))


def mask_reseeds_global(r, n, schedule="cosine", generator=None):  # torch.manual_seed inside the function
    torch.manual_seed(0)
    return _hide_lowest(torch.rand(len(r), n), _count(r, n, schedule))


def mask_fixed_default(r, n, schedule="cosine", generator=None):  # generator=None falls back on a fixed seed
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    return _hide_lowest(torch.rand(len(r), n, generator=g), _count(r, n, schedule))


def mask_rows_in_pairs(r, n, schedule="cosine", generator=None):  # each draw serves two neighbouring rows
    scores = torch.rand((len(r) + 1) // 2, n, generator=generator).repeat_interleave(2, dim=0)[: len(r)]
    return _hide_lowest(scores, _count(r, n, schedule))


def mask_argsort_once(r, n, schedule="cosine", generator=None):  # right: the inverse of a uniform permutation
    return torch.rand(len(r), n, generator=generator).argsort(1) < _count(r, n, schedule)[:, None]


def test_8_2():
    check = ch08.training_mask
    assert_passes(check, M.training_mask)
    assert_passes(check, mask_per_row_loop)
    assert_not_attempted(check, stub)
    for wrong in (mask_bernoulli, mask_float_counts):
        assert_fails(check, wrong)
    assert_fails(check, mask_bernoulli, contains="changes with the random draws")
    assert_fails(check, mask_floor, contains="rounded down")
    assert_fails(check, mask_round, contains="nearest whole number")
    assert_fails(check, mask_floor_plus_one, contains="one too many")
    assert_fails(check, mask_may_be_empty, contains="hides one at least")
    assert_fails(check, mask_one_count, contains="as many positions as the first one")
    assert_fails(check, mask_first_positions, contains="its first positions")
    assert_fails(check, mask_one_permutation, contains="hide the same positions")
    assert_fails(check, mask_contiguous_run, contains="not a uniformly random set")
    assert_fails(check, mask_global_rng, contains="must come from `generator`")
    assert_fails(check, mask_float_counts, contains="bool tensor")
    assert_passes(check, mask_argsort_once)
    with torch.random.fork_rng(devices=[]):
        assert_fails(check, mask_reseeds_global, contains="seeded 7 and 8 gave the same masks")
    assert_fails(check, mask_own_seed, contains="seeded 7 and 8 gave the same masks")
    assert_fails(check, mask_fixed_default, contains="generator=None, two calls gave the same masks")
    assert_fails(check, mask_rows_in_pairs, contains="not drawn independently")


def mask_left_on_the_cpu(r, n, schedule="cosine", generator=None):  # the hint's key line without .to(r.device)
    count = torch.ceil(M.mask_ratio(r.cpu(), schedule) * n).long().clamp(1, n)
    return torch.rand(r.shape[0], n, generator=generator).argsort(1).argsort(1) < count[:, None]


def test_8_2_returns_the_mask_on_rs_device():
    """The text promises the mask on r's device: with r on the meta device (standing in for a GPU, its values still
    readable through .cpu()), a mask computed and left on the CPU is named; the reference's .to(r.device) passes."""
    assert_fails(ch08.training_mask, mask_left_on_the_cpu, contains="returned a tensor on the cpu device")
    assert_passes(ch08.training_mask, M.training_mask)


def test_8_2_leaves_the_global_generator_as_it_was():
    state = torch.random.get_rng_state()
    assert_passes(ch08.training_mask, M.training_mask)
    assert torch.equal(torch.random.get_rng_state(), state)


def mask_biased_to_first_positions(r, n, schedule="cosine", generator=None):
    # a uniform score plus a small ramp: early positions are hidden more often (about 40% vs 30% for n = 10)
    scores = torch.rand(len(r), n, generator=generator) + 0.2 * torch.arange(n) / n
    return _hide_lowest(scores, _count(r, n, schedule))


def mask_reusing_every_eighth_row(r, n, schedule="cosine", generator=None):
    # every 8th row reuses the mask of the row before it (12.5% repeats, chance is 1/120 for 3 of 10)
    scores = torch.rand(len(r), n, generator=generator)
    keep = torch.arange(len(r))
    keep[8::8] -= 1
    return _hide_lowest(scores[keep], _count(r, n, schedule))


def test_8_2_names_unequal_positions_and_repeated_rows():
    """8.2's statistical tests are tight enough for small defects: positions hidden about 40% vs 30% of the time,
    and one row in eight repeating the row before it (far above chance, far below every other row)."""
    assert_fails(ch08.training_mask, mask_biased_to_first_positions, contains="not equally likely")
    assert_fails(ch08.training_mask, mask_reusing_every_eighth_row, contains="not drawn independently")


def test_training_mask_is_the_random_mask_draw_given_r():
    # random_mask draws r first, then the positions' scores: training_mask given that r hides the same positions
    for batch, n, schedule in ((7, 16, "cosine"), (5, 9, "square")):
        g, g_lib = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        r = torch.rand(batch, generator=g)
        assert torch.equal(M.training_mask(r, n, schedule, g), M.random_mask(batch, n, schedule, g_lib))


# 8.3 ------------------------------------------------------------------------------------------------------


def _step(tokens, mask, log_probs, sampled, n_masked, noise, noise_scale, *, largest=False, protect=True,
          use_noise=True, probs=False, keep_known=True):
    conf = log_probs.gather(-1, sampled[..., None])[..., 0]
    if probs:
        conf = conf.exp()
    if use_noise and noise is not None:
        conf = conf + noise_scale * noise
    if protect:
        conf = conf.masked_fill(~mask, float("-inf") if largest else float("inf"))
    new_mask = torch.zeros_like(mask).scatter_(1, conf.topk(n_masked, dim=-1, largest=largest).indices, True)
    revealed = (mask & ~new_mask) if keep_known else ~new_mask
    return torch.where(revealed, sampled, tokens), new_mask


def step_most_confident(t, m, lp, s, n, noise=None, scale=0.0):
    return _step(t, m, lp, s, n, noise, scale, largest=True)


def step_remasks_known(t, m, lp, s, n, noise=None, scale=0.0):
    return _step(t, m, lp, s, n, noise, scale, protect=False)


def step_no_noise(t, m, lp, s, n, noise=None, scale=0.0):
    return _step(t, m, lp, s, n, noise, scale, use_noise=False)


def step_noise_on_probs(t, m, lp, s, n, noise=None, scale=0.0):
    return _step(t, m, lp, s, n, noise, scale, probs=True)


def step_overwrites_known(t, m, lp, s, n, noise=None, scale=0.0):
    return _step(t, m, lp, s, n, noise, scale, keep_known=False)


def step_fills_remasked(t, m, lp, s, n, noise=None, scale=0.0):
    tokens, new_mask = M.confidence_step(t, m, lp, s, n, noise, scale)
    return torch.where(m, s, tokens), new_mask  # the re-masked positions hold a sample instead of [MASK]


def step_in_place(t, m, lp, s, n, noise=None, scale=0.0):
    new_tokens, new_mask = M.confidence_step(t, m, lp, s, n, noise, scale)
    t.copy_(new_tokens)
    m.copy_(new_mask)
    return t, m


def step_mask_in_place(t, m, lp, s, n, noise=None, scale=0.0):
    new_tokens, new_mask = M.confidence_step(t, m, lp, s, n, noise, scale)
    m &= new_mask  # the re-masked positions are a subset of the masked ones
    return new_tokens, m


def step_known_score_zero(t, m, lp, s, n, noise=None, scale=0.0):  # a known token is certain: log-prob 0
    conf = lp.gather(-1, s[..., None])[..., 0]
    if noise is not None:
        conf = conf + scale * noise
    new_mask = torch.zeros_like(m).scatter_(1, conf.masked_fill(~m, 0.0).topk(n, dim=-1, largest=False).indices, True)
    return torch.where(m & ~new_mask, s, t), new_mask


def step_known_score(fill):  # known positions get a finite confidence: "high", but not out of reach
    def step(t, m, lp, s, n, noise=None, scale=0.0):
        conf = lp.gather(-1, s[..., None])[..., 0]
        if noise is not None:
            conf = conf + scale * noise
        chosen = conf.masked_fill(~m, fill).topk(n, dim=-1, largest=False).indices
        new_mask = torch.zeros_like(m).scatter_(1, chosen, True)
        return torch.where(m & ~new_mask, s, t), new_mask
    return step


def test_8_3_rejects_a_finite_confidence_for_known_tokens():
    check = ch08.confidence_step
    for fill in (0.5, 1.0, 2.0, 3.0, 5.0, 10.0):  # a "high" finite score: large noise lifts the new samples above it
        message = assert_fails(check, step_known_score(fill), contains="known positions got a finite confidence")
        assert "a confidence of 0 " not in message  # the message holds for any finite fill, not only 0
        assert "large noise at weight 4.0" in message
    assert_passes(check, step_known_score(math.inf))
    # the case that catches them: every masked score is above 10, and there are known positions to re-mask
    case = next(c for c in ch08._step_cases() if "large noise" in c.name)
    tokens, mask, log_probs, sampled, n_masked, noise, scale = case.args
    scores = log_probs.gather(-1, sampled[..., None])[..., 0] + scale * noise
    assert 3.0 <= scale <= 4.5 and float(scores[mask].min()) > 10
    assert bool(((~mask).sum(1) >= n_masked).all())


def step_sorted(t, m, lp, s, n, noise=None, scale=0.0):  # right: ranks from a sort, noise folded in by dividing
    conf = lp.gather(-1, s[..., None])[..., 0]
    if noise is not None and scale > 0:
        conf = conf / scale + noise  # the same order as conf + scale * noise
    new_mask = torch.where(m, conf, torch.full_like(conf, math.inf)).argsort(-1).argsort(-1) < n
    return torch.where(m & ~new_mask, s, t), new_mask


def test_8_3():
    check = ch08.confidence_step
    assert_passes(check, M.confidence_step)
    assert_not_attempted(check, stub)
    for wrong in (step_most_confident, step_remasks_known, step_no_noise, step_noise_on_probs,
                  step_overwrites_known, step_fills_remasked):
        assert_fails(check, wrong)
    assert_fails(check, step_most_confident, contains="re-masks the most confident")
    assert_fails(check, step_no_noise, contains="noise is left out")
    assert_fails(check, step_overwrites_known, contains="revealed at an earlier step never changes")
    assert_fails(check, step_in_place, contains="changed its argument `tokens` in place")
    assert_fails(check, step_mask_in_place, contains="changed its argument `mask` in place")
    assert_fails(check, step_known_score_zero, contains="known positions got a finite confidence")
    assert_fails(check, step_fills_remasked, contains="the positions masked again at this step got their samples")
    assert_passes(check, step_sorted)


# 8.4 ------------------------------------------------------------------------------------------------------

NAR = ((-1, 0), (0, -1))


def _step_map(h, w, neighbours, *, columns=False, pick=max, wrap=False, backwards=False, check=True):
    if check and any(not (di < 0 or (di == 0 and dj < 0)) for di, dj in neighbours):
        raise ValueError("offset not earlier in raster order")
    step = torch.zeros(h, w, dtype=torch.long)
    cells = [(i, j) for j in range(w) for i in range(h)] if columns else [(i, j) for i in range(h) for j in range(w)]
    for i, j in cells:
        known = []
        for di, dj in neighbours:
            a, b = (i - di, j - dj) if backwards else (i + di, j + dj)
            if (a < h and b < w) if wrap else (0 <= a < h and 0 <= b < w):
                known.append(int(step[a, b]))
        step[i, j] = 1 + pick(known) if known else 0
    return step


def order_always_diagonal(h, w, neighbours=NAR):
    return torch.arange(h)[:, None] + torch.arange(w)[None, :]


def order_column_major(h, w, neighbours=NAR):
    return _step_map(h, w, neighbours, columns=True)


def order_earliest_neighbour(h, w, neighbours=NAR):
    return _step_map(h, w, neighbours, pick=min)


def order_negative_index(h, w, neighbours=NAR):
    return _step_map(h, w, neighbours, wrap=True)


def order_backwards(h, w, neighbours=NAR):
    return _step_map(h, w, neighbours, backwards=True)


def order_one_based(h, w, neighbours=NAR):
    return _step_map(h, w, neighbours) + 1


def order_no_validation(h, w, neighbours=NAR):
    return _step_map(h, w, neighbours, check=False)


def order_validates_inside_only(h, w, neighbours=NAR):  # an offset is tested only when it lands inside the map
    step = torch.zeros(h, w, dtype=torch.long)
    for i in range(h):
        for j in range(w):
            known = []
            for di, dj in neighbours:
                if 0 <= i + di < h and 0 <= j + dj < w:
                    if not (di < 0 or (di == 0 and dj < 0)):
                        raise ValueError("offset not earlier in raster order")
                    known.append(int(step[i + di, j + dj]))
            step[i, j] = 1 + max(known) if known else 0
    return step


def order_int32(h, w, neighbours=NAR):
    return _step_map(h, w, neighbours).int()


def order_relaxed(h, w, neighbours=NAR):  # right, computed another way: relax every position until nothing moves
    if any(not (di < 0 or (di == 0 and dj < 0)) for di, dj in neighbours):
        raise ValueError("offset not earlier in raster order")
    step = torch.zeros(h, w, dtype=torch.long)
    for _ in range(h * w):
        for i in range(h):
            for j in range(w):
                for di, dj in neighbours:
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        step[i, j] = max(int(step[i, j]), int(step[i + di, j + dj]) + 1)
    return step


def order_visited_by(key):  # the right rule, but the positions visited in another order than raster order
    def step_map(h, w, neighbours=NAR):
        if any(not (di < 0 or (di == 0 and dj < 0)) for di, dj in neighbours):
            raise ValueError("offset not earlier in raster order")
        step = torch.zeros(h, w, dtype=torch.long)
        for i, j in sorted(((i, j) for i in range(h) for j in range(w)), key=key):
            known = [int(step[i + di, j + dj]) for di, dj in neighbours if 0 <= i + di < h and 0 <= j + dj < w]
            step[i, j] = 1 + max(known) if known else 0
        return step
    return step_map


def test_8_4_names_any_order_other_than_raster():
    check = ch08.neighbour_step_map
    for key in (lambda p: (p[0] + p[1], p[0]),  # along anti-diagonals (the upper-and-left order itself)
                lambda p: (-p[0], -p[1]),  # raster order backwards
                lambda p: (p[1], p[0])):  # column by column
        message = assert_fails(check, order_visited_by(key), contains="not visited in raster order")
        assert "up and to the right is read before its own pass is known" in message
    assert_passes(check, order_visited_by(lambda p: p))  # raster order itself


def test_8_4():
    check = ch08.neighbour_step_map
    assert_passes(check, answers.neighbour_step_map)
    assert_passes(check, order_relaxed)
    assert_not_attempted(check, stub)
    assert_fails(check, order_int32)
    assert_fails(check, order_always_diagonal, contains="whatever neighbours are given")
    assert_fails(check, order_column_major, contains="column by column")
    assert_fails(check, order_column_major, contains="not visited in raster order")
    assert_fails(check, order_earliest_neighbour, contains="the earliest neighbour")
    assert_fails(check, order_negative_index, contains="negative index")
    assert_fails(check, order_backwards, contains="applied backwards")
    assert_fails(check, order_one_based, contains="counted from 0")
    assert_fails(check, order_no_validation, contains="must raise ValueError")
    assert_fails(check, order_validates_inside_only, contains="whether or not the offset lands inside")


def test_reference_neighbour_map_matches_the_library_order():
    for h, w in ((8, 8), (3, 5)):
        steps = M.neighbour_steps(h, w)
        step_map = answers.neighbour_step_map(h, w).flatten()
        assert all(torch.equal(step_map == k, s) for k, s in enumerate(steps))
    i, j = torch.arange(5)[:, None], torch.arange(6)[None, :]
    assert torch.equal(answers.neighbour_step_map(5, 6, ((-1, -1), (-1, 0), (-1, 1), (0, -1))), 2 * i + j)


# 8.5 ------------------------------------------------------------------------------------------------------


def mdlm_unweighted(logits, targets, masked, t):
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * masked).sum(1) / targets.shape[1]


def mdlm_weight_t(logits, targets, masked, t):
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * masked * t[:, None]).sum(1) / targets.shape[1]


def mdlm_mean_over_masked(logits, targets, masked, t):
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * masked / t[:, None]).sum(1) / masked.sum(1).clamp(min=1)


def mdlm_all_positions(logits, targets, masked, t):
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll / t[:, None]).mean(1)


def mdlm_batch_mean(logits, targets, masked, t):
    return answers.mdlm_loss(logits, targets, masked, t).mean()


def mdlm_log_of_softmax(logits, targets, masked, t):
    nll = -logits.softmax(-1).gather(-1, targets[..., None])[..., 0].log()
    return (nll * masked / t[:, None]).sum(1) / targets.shape[1]


def mdlm_exp_over_sum(logits, targets, masked, t):
    e = logits.exp()
    nll = -(e.gather(-1, targets[..., None])[..., 0] / e.sum(-1)).log()
    return (nll * masked / t[:, None]).sum(1) / targets.shape[1]


def mdlm_summed_over_length(logits, targets, masked, t):  # the sum over L, never divided by L
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * masked / t[:, None]).sum(1)


def mdlm_ignore_index(logits, targets, masked, t):  # right: unmasked targets ignored by cross_entropy
    nll = F.cross_entropy(logits.transpose(1, 2), targets.masked_fill(~masked, -100), reduction="none")
    return nll.sum(1) / t / targets.shape[1]


def test_8_5():
    check = ch08.mdlm_loss
    assert_passes(check, answers.mdlm_loss)
    assert_not_attempted(check, stub)
    for wrong in (mdlm_unweighted, mdlm_weight_t, mdlm_mean_over_masked, mdlm_all_positions, mdlm_batch_mean):
        assert_fails(check, wrong)
    assert_fails(check, mdlm_unweighted, contains="1/t")
    assert_fails(check, mdlm_mean_over_masked, contains="length L")
    assert_fails(check, mdlm_all_positions, contains="only masked")
    assert_fails(check, mdlm_batch_mean, contains="averaged over the batch")
    assert_fails(check, mdlm_summed_over_length, contains="not divided by its length L")
    for wrong in (mdlm_log_of_softmax, mdlm_exp_over_sum):
        assert_fails(check, wrong, contains="log of a softmax")
    assert_passes(check, mdlm_ignore_index)


# 8.6 ------------------------------------------------------------------------------------------------------


def reveal_unnormalised(x, proposal, t, s, mask_id, u):
    return torch.where((x == mask_id) & (u < t - s), proposal, x)


def reveal_stay(x, proposal, t, s, mask_id, u):
    return torch.where((x == mask_id) & (u < s / t), proposal, x)


def reveal_overwrites(x, proposal, t, s, mask_id, u):
    return torch.where(u < (t - s) / t, proposal, x)


def reveal_all(x, proposal, t, s, mask_id, u):
    return torch.where(x == mask_id, proposal, x)


def reveal_inverted(x, proposal, t, s, mask_id, u):
    return torch.where((x == mask_id) & (u > (t - s) / t), proposal, x)


def reveal_at_or_below(x, proposal, t, s, mask_id, u):
    return torch.where((x == mask_id) & (u <= (t - s) / t), proposal, x)


def reveal_largest_id_is_mask(x, proposal, t, s, mask_id, u):  # mask_id unused: taken as the largest id in x
    return torch.where((x == x.max()) & (u < (t - s) / t), proposal, x)


def reveal_over_one_minus_s(x, proposal, t, s, mask_id, u):  # conditioned on "not masked at s" instead of t
    return torch.where((x == mask_id) & (u < (t - s) / (1 - s)), proposal, x)


def reveal_one_minus_ratio(x, proposal, t, s, mask_id, u):  # right: (t - s) / t written as 1 - s / t
    return torch.where((x == mask_id) & (u < 1 - s / t), proposal, x)


def test_8_6():
    check = ch08.reveal_step
    assert_passes(check, answers.reveal_step)
    assert_not_attempted(check, stub)
    for wrong in (reveal_unnormalised, reveal_stay, reveal_overwrites, reveal_all, reveal_inverted):
        assert_fails(check, wrong)
    assert_fails(check, reveal_unnormalised, contains="(t - s) / t")
    assert_fails(check, reveal_stay, contains="s / t is the chance")
    assert_fails(check, reveal_over_one_minus_s, contains="(t - s) / (1 - s) conditions on the wrong event")
    assert_fails(check, reveal_inverted, contains="below the reveal probability")
    assert_fails(check, reveal_overwrites, contains="never change")
    assert_fails(check, reveal_at_or_below, contains="u < p, strictly")
    message = assert_fails(check, reveal_largest_id_is_mask, contains="found as the largest id, not as mask_id")
    assert "mask_id 0" in message
    assert_fails(check, reveal_all, contains="every masked token was revealed at once")
    assert_passes(check, reveal_one_minus_ratio)


# 8.7 ------------------------------------------------------------------------------------------------------


def schedule_global(length, block_size, steps):
    grid = torch.linspace(1.0, 0.0, steps + 1).tolist()
    starts = [a for a in range(0, length, block_size) for _ in range(steps // (length // block_size))]
    return [(a, a + block_size, grid[k], grid[k + 1]) for k, a in enumerate(starts)]


def schedule_each_all(length, block_size, steps):
    grid = torch.linspace(1.0, 0.0, steps + 1).tolist()
    return [(a, a + block_size, grid[i], grid[i + 1]) for a in range(0, length, block_size) for i in range(steps)]


def schedule_no_last(length, block_size, steps):
    per = steps // (length // block_size)
    grid = torch.linspace(1.0, 1.0 / (per + 1), per + 1).tolist()  # never reaches t = 0: masks left over
    return [(a, a + block_size, grid[i], grid[i + 1]) for a in range(0, length, block_size) for i in range(per)]


def schedule_reversed(length, block_size, steps):
    per = steps // (length // block_size)
    grid = torch.linspace(1.0, 0.0, per + 1).tolist()
    return [(a, a + block_size, grid[i], grid[i + 1]) for a in reversed(range(0, length, block_size))
            for i in range(per)]


def schedule_time_rising(length, block_size, steps):  # the time runs from 0 up to 1 in each block
    per = steps // (length // block_size)
    grid = torch.linspace(0.0, 1.0, per + 1).tolist()
    return [(a, a + block_size, grid[i], grid[i + 1]) for a in range(0, length, block_size) for i in range(per)]


def schedule_tensor_times(length, block_size, steps):
    per = steps // (length // block_size)
    grid = torch.linspace(1.0, 0.0, per + 1)  # the times stay 0-d tensors
    return [(a, a + block_size, grid[i], grid[i + 1]) for a in range(0, length, block_size) for i in range(per)]


def schedule_numpy_times(length, block_size, steps):
    return [(a, b, np.float32(t), np.float32(s)) for a, b, t, s in answers.block_schedule(length, block_size, steps)]


def test_8_7():
    check = ch08.block_schedule
    assert_passes(check, answers.block_schedule)
    assert_not_attempted(check, stub)
    for wrong in (schedule_global, schedule_each_all, schedule_no_last, schedule_reversed):
        assert_fails(check, wrong)
    assert_fails(check, schedule_global, contains="inside every block")
    assert_fails(check, schedule_each_all, contains="steps // n_blocks")
    assert_fails(check, schedule_reversed, contains="left to right")
    assert_fails(check, schedule_no_last, contains="stops short of t = 0")
    assert_fails(check, schedule_time_rising, contains="the time rises from 0 to 1")
    for wrong in (schedule_tensor_times, schedule_numpy_times):
        assert_fails(check, wrong, contains="Python floats")


# Right answers written other ways (each must pass) and wrong ones of other kinds ----------------------------------


def ratio_float64_then_cast(r, schedule="cosine"):  # right: computed in float64, no clamp, cast back
    r = torch.as_tensor(r, dtype=torch.float64)
    out = {"cosine": torch.cos(r * math.pi / 2), "linear": 1 - r, "square": (1 - r) * (1 + r)}[schedule]
    return out.float()


def ratio_numpy_sine(r, schedule="cosine"):  # right: numpy, cos(pi r / 2) written as sin(pi (1 - r) / 2)
    a = np.asarray(r.numpy() if isinstance(r, torch.Tensor) else r, dtype=np.float64)
    out = {"cosine": np.sin(np.pi / 2 * (1 - a)), "linear": 1 - a, "square": 1 - a * a}[schedule]
    return torch.from_numpy(np.asarray(out)).to(torch.float32)


def ratio_python_float_branch(r, schedule="cosine"):  # right: math for a Python float, torch for a tensor
    if isinstance(r, float):
        value = {"cosine": math.cos(math.pi * r / 2), "linear": 1 - r, "square": 1 - r * r}[schedule]
        return torch.tensor(value, dtype=torch.float32)
    r = r.float()
    return {"cosine": torch.cos(math.pi * r / 2).clamp(min=0), "linear": torch.ones_like(r) - r,
            "square": 1 - r.pow(2)}[schedule]


def ratio_keeps_float64(r, schedule="cosine"):  # a float64 r gives a float64 answer; the spec asks float32
    r = r if isinstance(r, torch.Tensor) else torch.tensor(r, dtype=torch.float32)
    return {"cosine": torch.cos(math.pi / 2 * r), "linear": 1 - r, "square": 1 - r * r}[schedule]


def test_8_1_other_forms():
    for right in (ratio_float64_then_cast, ratio_numpy_sine, ratio_python_float_branch):
        assert_passes(ch08.mask_ratio, right)
    assert_fails(ch08.mask_ratio, ratio_keeps_float64, contains="float64 (4,) r")


def mask_multinomial(r, n, schedule="cosine", generator=None):  # right: a random order per row, first count slots
    count = torch.ceil(M.mask_ratio(r, schedule) * n).long().clamp(1, n)
    order = torch.multinomial(torch.ones(r.shape[0], n), n, replacement=False, generator=generator)  # (B, n)
    hidden = torch.arange(n)[None, :] < count[:, None]  # (B, n)
    return torch.zeros(r.shape[0], n, dtype=torch.bool).scatter(1, order, hidden)


def mask_kth_score(r, n, schedule="cosine", generator=None):  # right: scores up to each row's count-th smallest
    count = torch.ceil(M.mask_ratio(r, schedule) * n).long().clamp(1, n)
    scores = torch.rand(r.shape[0], n, generator=generator)
    return scores <= scores.sort(dim=1).values.gather(1, (count - 1)[:, None])


def mask_python_counts(r, n, schedule="cosine", generator=None):  # right: math.ceil per row, randperm per row
    rows = []
    for b in range(r.shape[0]):
        k = max(1, math.ceil(float(M.mask_ratio(r[b], schedule)) * n))
        row = torch.zeros(n, dtype=torch.bool)
        row[torch.randperm(n, generator=generator)[:k]] = True
        rows.append(row)
    return torch.stack(rows)


def mask_shifted_window(r, n, schedule="cosine", generator=None):  # one permutation; rows slide a window along it
    count = torch.ceil(M.mask_ratio(r, schedule) * n).long().clamp(1, n)
    perm = torch.randperm(n, generator=generator)
    shift = torch.randint(0, n, (r.shape[0],), generator=generator)
    slot = (torch.arange(n)[None, :] - shift[:, None]) % n  # (B, n)
    return torch.zeros(r.shape[0], n, dtype=torch.bool).scatter(1, perm.expand(r.shape[0], n), slot < count[:, None])


_SCORE_TABLES: dict = {}


def mask_cached_scores(r, n, schedule="cosine", generator=None):  # one score table per n, kept between calls
    if n not in _SCORE_TABLES:
        _SCORE_TABLES[n] = torch.rand(20000, n, generator=generator)
    count = torch.ceil(M.mask_ratio(r, schedule) * n).long().clamp(1, n)
    return _SCORE_TABLES[n][: r.shape[0]].argsort(1).argsort(1) < count[:, None]


def test_8_2_other_forms():
    for right in (mask_multinomial, mask_kth_score, mask_python_counts):
        assert_passes(ch08.training_mask, right)
    assert_fails(ch08.training_mask, mask_shifted_window, contains="not a uniformly random set")
    _SCORE_TABLES.clear()
    assert_fails(ch08.training_mask, mask_cached_scores, contains="seeded 7 and 8 gave the same masks")
    _SCORE_TABLES.clear()


def step_row_loop(t, m, lp, s, n, noise=None, scale=0.0):  # right: one row at a time, masked positions only
    new_tokens, new_mask = t.clone(), torch.zeros_like(m)
    for b in range(t.shape[0]):
        idx = m[b].nonzero().flatten()
        conf = torch.stack([lp[b, i, s[b, i]] for i in idx])
        if noise is not None:
            conf = conf + scale * noise[b, idx]
        order = conf.argsort()
        new_mask[b, idx[order[:n]]] = True
        new_tokens[b, idx[order[n:]]] = s[b, idx[order[n:]]]
    return new_tokens, new_mask


def step_ranks_float64(t, m, lp, s, n, noise=None, scale=0.0):  # right: take_along_dim, float64, ranks, torch.where
    conf = torch.take_along_dim(lp, s.unsqueeze(-1), dim=-1).squeeze(-1).double()
    conf = conf + scale * (noise.double() if noise is not None else 0.0)
    conf = torch.where(m, conf, torch.full_like(conf, math.inf))
    new_mask = conf.argsort(dim=1).argsort(dim=1) < n
    return torch.where(new_mask | ~m, t, s), new_mask


def step_one_hot_negated(t, m, lp, s, n, noise=None, scale=0.0):  # right: one_hot, topk of -conf, index assignment
    conf = (lp * F.one_hot(s, lp.shape[-1])).sum(-1)
    if noise is not None and scale:
        conf = conf + scale * noise
    idx = (-conf).masked_fill(~m, -math.inf).topk(n, dim=-1).indices
    new_mask = torch.zeros_like(m)
    new_mask[torch.arange(m.shape[0])[:, None], idx] = True
    new_tokens = t.clone()
    reveal = m & ~new_mask
    new_tokens[reveal] = s[reveal]
    return new_tokens, new_mask


def step_argmax_confidence(t, m, lp, s, n, noise=None, scale=0.0):  # scores the most likely token, not the sampled
    conf = lp.max(-1).values
    if noise is not None:
        conf = conf + scale * noise
    conf = conf.masked_fill(~m, math.inf)
    new_mask = torch.zeros_like(m).scatter(1, conf.topk(n, -1, largest=False).indices, True)
    return torch.where(m & ~new_mask, s, t), new_mask


def step_unscaled_noise(t, m, lp, s, n, noise=None, scale=0.0):  # adds the noise at weight 1 whatever noise_scale is
    return M.confidence_step(t, m, lp, s, n, noise, 1.0 if noise is not None else 0.0)


def step_mask_id_max(tokens, mask, log_probs, sampled, n_masked, noise=None, noise_scale=0.0):
    new_tokens, new_mask = M.confidence_step(tokens, mask, log_probs, sampled, n_masked, noise, noise_scale)
    return torch.where(new_mask, tokens.max(), new_tokens), new_mask  # guesses the mask id as the largest id


def test_8_3_other_forms():
    for right in (step_row_loop, step_ranks_float64, step_one_hot_negated):
        assert_passes(ch08.confidence_step, right)
    for wrong in (step_argmax_confidence, step_unscaled_noise):
        assert_fails(ch08.confidence_step, wrong)
    assert_fails(ch08.confidence_step, step_argmax_confidence, contains="its most likely token's log-probability")
    assert_fails(ch08.confidence_step, step_unscaled_noise, contains="at full weight whatever noise_scale is")
    assert_fails(ch08.confidence_step, step_mask_id_max, contains="got the largest id in tokens")


def order_nested_lists(h, w, neighbours=NAR):  # right: Python lists, then torch.tensor
    if any(di > 0 or (di == 0 and dj >= 0) for di, dj in neighbours):
        raise ValueError("every offset must point back in raster order")
    step = [[0] * w for _ in range(h)]
    for i in range(h):
        for j in range(w):
            prev = [step[i + di][j + dj] for di, dj in neighbours if 0 <= i + di < h and 0 <= j + dj < w]
            step[i][j] = max(prev) + 1 if prev else 0
    return torch.tensor(step)


def order_memoised(h, w, neighbours=NAR):  # right: a recursive function with a cache, valid for one call
    import functools

    if any(not (di < 0 or (di == 0 and dj < 0)) for di, dj in neighbours):
        raise ValueError("every offset must point back in raster order")

    @functools.lru_cache(maxsize=None)
    def at(i, j):
        inside = [(i + di, j + dj) for di, dj in neighbours if 0 <= i + di < h and 0 <= j + dj < w]
        return 1 + max(at(a, b) for a, b in inside) if inside else 0

    return torch.tensor([[at(i, j) for j in range(w)] for i in range(h)], dtype=torch.long)


def order_numpy_waves(h, w, neighbours=NAR):  # right: pass after pass, every position whose neighbours are done
    if any(not (di < 0 or (di == 0 and dj < 0)) for di, dj in neighbours):
        raise ValueError("every offset must point back in raster order")
    step = np.full((h, w), -1, dtype=np.int64)
    k = 0
    while (step < 0).any():
        ready = [(i, j) for i in range(h) for j in range(w) if step[i, j] < 0 and all(
            not (0 <= i + di < h and 0 <= j + dj < w) or 0 <= step[i + di, j + dj] < k for di, dj in neighbours)]
        for i, j in ready:
            step[i, j] = k
        k += 1
    return torch.from_numpy(step)


_MAPS_BY_SIZE: dict = {}


def order_cached_by_size(h, w, neighbours=NAR):  # keeps the first map of each size, whatever the neighbours
    if (h, w) not in _MAPS_BY_SIZE:
        _MAPS_BY_SIZE[(h, w)] = answers.neighbour_step_map(h, w, neighbours)
    answers.neighbour_step_map(1, 1, neighbours)  # the offsets are still validated
    return _MAPS_BY_SIZE[(h, w)]


def test_8_4_other_forms():
    for right in (order_nested_lists, order_memoised, order_numpy_waves):
        assert_passes(ch08.neighbour_step_map, right)
    _MAPS_BY_SIZE.clear()
    message = assert_fails(ch08.neighbour_step_map, order_cached_by_size, contains="looked up by the neighbours too")
    assert "two up and right" in message
    _MAPS_BY_SIZE.clear()


def mdlm_log_softmax_gather(logits, targets, masked, t):  # right: log_softmax and gather, divided by t after the sum
    lp = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    return -(lp * masked).sum(-1) / t / logits.shape[1]


def mdlm_logsumexp_float64(logits, targets, masked, t):  # right: logsumexp in float64, torch.where, cast back
    x = logits.double()
    nll = torch.logsumexp(x, -1) - x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(masked, nll, torch.zeros_like(nll))
    return (nll.sum(1) / (t.double() * targets.shape[1])).float()


def mdlm_row_loop(logits, targets, masked, t):  # right: one row at a time, the masked positions selected
    out = []
    for b in range(logits.shape[0]):
        sel = masked[b]
        ce = F.cross_entropy(logits[b][sel], targets[b][sel], reduction="sum") if sel.any() else logits[b].sum() * 0
        out.append(ce / t[b] / logits.shape[1])
    return torch.stack(out)


def mdlm_nll_loss_einsum(logits, targets, masked, t):  # right: nll_loss on log_softmax, mean over L, einsum weight
    nll = F.nll_loss(F.log_softmax(logits, dim=-1).permute(0, 2, 1), targets, reduction="none")
    return torch.einsum("b,b->b", (nll * masked.float()).mean(dim=1), 1.0 / t)


def mdlm_over_vocabulary(logits, targets, masked, t):  # divides by V, not by L
    return answers.mdlm_loss(logits, targets, masked, t) * targets.shape[1] / logits.shape[-1]


def mdlm_over_length_minus_one(logits, targets, masked, t):  # divides by L - 1
    return answers.mdlm_loss(logits, targets, masked, t) * targets.shape[1] / (targets.shape[1] - 1)


def mdlm_no_grad(logits, targets, masked, t):  # computed under no_grad: nothing to train with
    with torch.no_grad():
        return answers.mdlm_loss(logits, targets, masked, t)


def test_8_5_other_forms():
    for right in (mdlm_log_softmax_gather, mdlm_logsumexp_float64, mdlm_row_loop, mdlm_nll_loss_einsum):
        assert_passes(ch08.mdlm_loss, right)
    assert_fails(ch08.mdlm_loss, mdlm_over_vocabulary, contains="divided by the vocabulary size V")
    assert_fails(ch08.mdlm_loss, mdlm_over_length_minus_one, contains="divided by L - 1")  # not blamed on V
    assert_fails(ch08.mdlm_loss, mdlm_no_grad, contains="no gradient flows")


def reveal_index_assign(x, proposal, t, s, mask_id, u):  # right: a copy, then boolean-index assignment
    out = x.clone()
    sel = (x == mask_id) & (u < (t - s) / t)
    out[sel] = proposal[sel]
    return out


def reveal_arithmetic(x, proposal, t, s, mask_id, u):  # right: u * t < t - s, as integer arithmetic
    reveal = ((x == mask_id) & (u * t < t - s)).long()
    return x + reveal * (proposal - x)


def reveal_python_loop(x, proposal, t, s, mask_id, u):  # right: Python loops over every position
    p = 1.0 - s / t
    return torch.tensor([[int(proposal[b, i]) if int(x[b, i]) == mask_id and float(u[b, i]) < p else int(x[b, i])
                          for i in range(x.shape[1])] for b in range(x.shape[0])], dtype=torch.long)


def reveal_masked_scatter(x, proposal, t, s, mask_id, u):  # right: masked_scatter of the chosen proposals
    sel = x.eq(mask_id).logical_and(u.lt((t - s) / t))
    return x.masked_scatter(sel, proposal[sel])


def reveal_wipes_visible(x, proposal, t, s, mask_id, u):  # every position not revealed now becomes [MASK]
    reveal = (x == mask_id) & (u < (t - s) / t)
    return torch.where(reveal, proposal, torch.full_like(x, mask_id))


def test_8_6_other_forms():
    for right in (reveal_index_assign, reveal_arithmetic, reveal_python_loop, reveal_masked_scatter):
        assert_passes(ch08.reveal_step, right)
    assert_fails(ch08.reveal_step, reveal_wipes_visible, contains="tokens revealed earlier were masked again")


def schedule_numpy_loops(length, block_size, steps):  # right: np.linspace, nested loops, float() of each time
    n_blocks = length // block_size
    per = steps // n_blocks
    times = np.linspace(1.0, 0.0, per + 1)
    return [(blk * block_size, (blk + 1) * block_size, float(times[i]), float(times[i + 1]))
            for blk in range(n_blocks) for i in range(per)]


def schedule_fractions(length, block_size, steps):  # right: 1 - i / per in Python floats
    per = steps // (length // block_size)
    return [(a, a + block_size, 1 - i / per, 1 - (i + 1) / per) for a in range(0, length, block_size)
            for i in range(per)]


def schedule_numpy_float64(length, block_size, steps):  # right: np.float64 times (a subclass of float)
    per = steps * block_size // length
    g = np.linspace(1, 0, per + 1)
    return [(int(a), int(a + block_size), g[i], g[i + 1]) for a in np.arange(0, length, block_size) for i in range(per)]


def schedule_per_block_size(length, block_size, steps):  # steps // block_size passes per block
    per = max(1, steps // block_size)
    grid = torch.linspace(1.0, 0.0, per + 1).tolist()
    return [(a, a + block_size, grid[i], grid[i + 1]) for a in range(0, length, block_size) for i in range(per)]


def schedule_inclusive_end(length, block_size, steps):  # end is the last index of the block, not one past it
    return [(a, b - 1, t, s) for a, b, t, s in answers.block_schedule(length, block_size, steps)]


def schedule_one_pass_short(length, block_size, steps):  # per times on the grid: per - 1 passes per block
    per = steps // (length // block_size)
    grid = torch.linspace(1.0, 0.0, per).tolist()
    return [(a, a + block_size, grid[i], grid[i + 1]) for a in range(0, length, block_size) for i in range(per - 1)]


def test_8_7_tells_a_grid_one_pass_short_from_passes_per_block_size():
    check = ch08.block_schedule
    message = assert_fails(check, schedule_one_pass_short, contains="one pass too few")
    assert "steps // block_size" not in message
    message = assert_fails(check, schedule_per_block_size, contains="steps // block_size passes")
    assert "one pass too few" not in message


def test_8_7_other_forms():
    for right in (schedule_numpy_loops, schedule_fractions, schedule_numpy_float64):
        assert_passes(ch08.block_schedule, right)
    for wrong in (schedule_per_block_size, schedule_inclusive_end):
        assert_fails(ch08.block_schedule, wrong)
    assert_fails(ch08.block_schedule, schedule_per_block_size, contains="steps // block_size passes")
    assert_fails(ch08.block_schedule, schedule_inclusive_end, contains="one past it")
