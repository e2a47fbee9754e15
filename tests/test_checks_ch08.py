"""Chapter 08 checks: each accepts the reference, reports a stub as not attempted, and rejects plausible wrong
answers (a revealed-fraction schedule, a loss over every position or per row, re-masking the most confident or the
known tokens, noise left out, anti-diagonals the wrong way; an unweighted or per-masked-token MDLM loss, an
unconditioned reveal probability, known tokens overwritten, one time grid for all blocks...)."""

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
    assert_fails(check, ratio_tensor_only, contains="Python float")
    assert_fails(check, ratio_float_passthrough, contains="should be a torch.Tensor")


# 8.2 ------------------------------------------------------------------------------------------------------


def ce_all_positions(logits, targets, mask):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def ce_visible(logits, targets, mask):
    return F.cross_entropy(logits[~mask], targets[~mask])


def ce_per_row(logits, targets, mask):
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return ((nll * mask).sum(1) / mask.sum(1)).mean()


def ce_zeroed_mean(logits, targets, mask):
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * mask).mean()


def ce_no_log_softmax(logits, targets, mask):
    return -logits[mask].gather(-1, targets[mask][:, None]).mean()


def ce_detached(logits, targets, mask):
    return F.cross_entropy(logits[mask].detach(), targets[mask])


def ce_rewrapped(logits, targets, mask):
    return torch.tensor(F.cross_entropy(logits[mask], targets[mask]).item())


def test_8_2():
    check = ch08.masked_cross_entropy
    assert_passes(check, M.masked_cross_entropy)
    assert_not_attempted(check, stub)
    for wrong in (ce_all_positions, ce_visible, ce_per_row, ce_zeroed_mean, ce_no_log_softmax):
        assert_fails(check, wrong)
    assert_fails(check, ce_all_positions, contains="every position counts")
    assert_fails(check, ce_per_row, contains="averages each row first")
    assert_fails(check, ce_visible, contains="visible positions")
    for wrong in (ce_detached, ce_rewrapped):  # right values, but no gradient reaches the logits
        assert_fails(check, wrong, contains="no gradient flows")


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


# 8.4 ------------------------------------------------------------------------------------------------------


def order_raster(h, w):
    return torch.arange(h * w).view(h, w)


def order_other_diagonal(h, w):
    return torch.arange(h)[:, None] - torch.arange(w)[None, :] + w - 1


def order_rings(h, w):
    return torch.maximum(torch.arange(h)[:, None], torch.arange(w)[None, :])


def order_transposed(h, w):
    return (torch.arange(w)[:, None] + torch.arange(h)[None, :])  # (w, h): right only for square maps


def order_int32(h, w):
    return (torch.arange(h)[:, None] + torch.arange(w)[None, :]).int()


def test_8_4():
    check = ch08.neighbour_step_map
    assert_passes(check, answers.neighbour_step_map)
    assert_passes(check, lambda h, w: torch.arange(h)[:, None] + torch.arange(w)[None, :])
    assert_not_attempted(check, stub)
    for wrong in (order_raster, order_other_diagonal, order_rings, order_transposed, order_int32):
        assert_fails(check, wrong)
    assert_fails(check, order_raster, contains="raster order")
    assert_fails(check, order_other_diagonal, contains="other way")
    assert_fails(check, order_rings, contains="square rings")


def test_reference_neighbour_map_matches_the_library_order():
    for h, w in ((8, 8), (3, 5)):
        steps = M.neighbour_steps(h, w)
        step_map = answers.neighbour_step_map(h, w).flatten()
        assert all(torch.equal(step_map == k, s) for k, s in enumerate(steps))


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


def test_8_5():
    check = ch08.mdlm_loss
    assert_passes(check, answers.mdlm_loss)
    assert_not_attempted(check, stub)
    for wrong in (mdlm_unweighted, mdlm_weight_t, mdlm_mean_over_masked, mdlm_all_positions, mdlm_batch_mean):
        assert_fails(check, wrong)
    assert_fails(check, mdlm_unweighted, contains="1/t")
    assert_fails(check, mdlm_mean_over_masked, contains="length L")
    assert_fails(check, mdlm_all_positions, contains="only masked")


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


def test_8_6():
    check = ch08.reveal_step
    assert_passes(check, answers.reveal_step)
    assert_not_attempted(check, stub)
    for wrong in (reveal_unnormalised, reveal_stay, reveal_overwrites, reveal_all, reveal_inverted):
        assert_fails(check, wrong)
    assert_fails(check, reveal_unnormalised, contains="(t - s) / t")
    assert_fails(check, reveal_overwrites, contains="never change")


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
    for wrong in (schedule_tensor_times, schedule_numpy_times):
        assert_fails(check, wrong, contains="Python floats")
