"""Chapter 04 checks: each accepts the reference, reports a stub as not attempted, and rejects plausible wrong
answers (a mask that lets a scale see its successor, level ids by position, a non-cumulative canvas, the mean
of per-scale losses, guidance without the ramp...)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ar_course.sampling import SamplingConfig, cfg_mix, sample
from ar_course.checks import ch04
from ar_course.var import functional as ref
from ar_course.var.model import sample_pyramid
from checks_helpers import assert_fails, assert_not_attempted, assert_passes, stub

REFERENCES = {
    "block_causal_mask": ref.block_causal_mask,
    "embed_levels_positions": ref.embed_levels_positions,
    "scale_step": ref.scale_step,
    "teacher_forcing_sequence": ref.teacher_forcing_sequence,
    "var_loss": ref.var_loss,
    "sample_pyramid": sample_pyramid,
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_reference_passes_and_stub_is_not_attempted(name):
    check = getattr(ch04, name)
    assert_passes(check, REFERENCES[name])
    assert_not_attempted(check, stub)


def test_six_exercises_registered():
    assert sorted(ch04.chapter.exercises) == sorted(REFERENCES)
    assert [e.number for e in ch04.chapter.exercises.values()] == ["4.1", "4.2", "4.3", "4.4", "4.5", "4.6"]


# 4.1 ------------------------------------------------------------------------------------------------------


def mask_sees_successor(scales):
    lvl = ref.level_ids(scales)
    return lvl[:, None] + 1 >= lvl[None, :]


def mask_token_causal(scales):
    L = sum(s * s for s in scales)
    return torch.ones(L, L, dtype=torch.bool).tril()


def mask_transposed(scales):
    return ref.block_causal_mask(scales).T


def mask_hard_coded(scales):
    return ref.block_causal_mask((1, 2, 3, 4, 6, 8))


def test_mask_rejects_wrong_answers():
    assert_fails(ch04.block_causal_mask, mask_sees_successor, contains="later")
    assert_fails(ch04.block_causal_mask, mask_token_causal, contains="cannot attend")
    assert_fails(ch04.block_causal_mask, mask_transposed)
    assert_fails(ch04.block_causal_mask, mask_hard_coded, contains="shape")


# 4.2 ------------------------------------------------------------------------------------------------------


def embed_level_by_position(x, level_table, pos_table, scales, start=0):
    T = x.shape[1]
    idx = torch.arange(start, start + T).clamp(max=level_table.shape[0] - 1)
    return x + level_table[idx] + pos_table[start:start + T]


def embed_ignores_start(x, level_table, pos_table, scales, start=0):
    T = x.shape[1]
    lvl = ref.level_ids(scales)
    return x + level_table[lvl[start:start + T]] + pos_table[:T]


def embed_no_level(x, level_table, pos_table, scales, start=0):
    return x + pos_table[start:start + x.shape[1]]


def embed_from_zero(x, level_table, pos_table, scales, start=0):
    T = x.shape[1]
    return x + level_table[ref.level_ids(scales)[:T]] + pos_table[:T]


def embed_in_place(x, level_table, pos_table, scales, start=0):
    p = torch.arange(start, start + x.shape[1])
    x += level_table[ref.level_ids(scales)[p]] + pos_table[p]  # the right sum, written into the caller's x
    return x


def test_embed_rejects_wrong_answers():
    assert_fails(ch04.embed_levels_positions, embed_level_by_position, contains="indexed by the position")
    assert_fails(ch04.embed_levels_positions, embed_ignores_start, contains="counted from 0")
    assert_fails(ch04.embed_levels_positions, embed_from_zero, contains="counted from 0")
    assert_fails(ch04.embed_levels_positions, embed_no_level)
    assert_fails(ch04.embed_levels_positions, embed_in_place, contains="changed its argument `x` in place")


# 4.3 ------------------------------------------------------------------------------------------------------


def step_not_cumulative(vq, f_hat, k, tokens):
    s = vq.scales[k]
    h = vq.accumulate(None, k, tokens.view(-1, s, s))
    f_hat = h if f_hat is None else f_hat + h
    if k == len(vq.scales) - 1:
        return f_hat, None
    return f_hat, vq.next_input(h, k).flatten(2).transpose(1, 2)  # only this scale's codes


def step_flatten_without_transpose(vq, f_hat, k, tokens):
    s = vq.scales[k]
    f_hat = vq.accumulate(f_hat, k, tokens.view(-1, s, s))
    if k == len(vq.scales) - 1:
        return f_hat, None
    nxt = vq.next_input(f_hat, k)
    return f_hat, nxt.reshape(nxt.shape[0], -1, nxt.shape[1])  # mixes channels and positions


def step_column_major(vq, f_hat, k, tokens):
    s = vq.scales[k]
    f_hat = vq.accumulate(f_hat, k, tokens.view(-1, s, s).transpose(1, 2))
    if k == len(vq.scales) - 1:
        return f_hat, None
    return f_hat, vq.next_input(f_hat, k).flatten(2).transpose(1, 2)


def step_adds_in_place(vq, f_hat, k, tokens):
    s = vq.scales[k]
    h = vq.accumulate(None, k, tokens.view(-1, s, s))
    if f_hat is None:
        f_hat = h
    else:
        f_hat += h  # the right canvas, but the caller's previous canvas is overwritten
    if k == len(vq.scales) - 1:
        return f_hat, None
    return f_hat, vq.next_input(f_hat, k).flatten(2).transpose(1, 2)


def test_scale_step_rejects_wrong_answers():
    assert_fails(ch04.scale_step, step_not_cumulative, contains="next_input")
    assert_fails(ch04.scale_step, step_flatten_without_transpose, contains="next_input")
    assert_fails(ch04.scale_step, step_column_major, contains="f_hat")
    assert_fails(ch04.scale_step, step_adds_in_place, contains="changed its argument `f_hat` in place")


def test_scale_step_accepts_other_row_major_flattenings():
    def step_permuted(vq, f_hat, k, tokens):
        s = vq.scales[k]
        f_hat = vq.accumulate(f_hat, k, tokens.reshape(-1, s, s))
        if k == len(vq.scales) - 1:
            return f_hat, None
        nxt = F.interpolate(f_hat, size=vq.scales[k + 1], mode="area")  # what next_input does
        return f_hat, nxt.permute(0, 2, 3, 1).reshape(nxt.shape[0], -1, nxt.shape[1])

    assert_passes(ch04.scale_step, step_permuted)


# 4.4 ------------------------------------------------------------------------------------------------------


def tf_includes_last_canvas(vq, indices):
    inputs, targets = ref.teacher_forcing_sequence(vq, indices)
    f_hat = vq.decode(indices)
    return torch.cat([inputs, f_hat.flatten(2).transpose(1, 2)[:, :1]], dim=1), targets


def tf_same_scale_inputs(vq, indices):
    # reads each scale's own canvas (leaks the answer) instead of the canvas before it
    f_hat, inputs = None, []
    for k, idx in enumerate(indices):
        f_hat = vq.accumulate(f_hat, k, idx)
        if k >= 1:
            inputs.append(F.interpolate(f_hat, size=idx.shape[-1], mode="area").flatten(2).transpose(1, 2))
    targets = torch.cat([i.flatten(1) for i in indices], dim=1)
    return torch.cat(inputs, dim=1), targets


def tf_targets_fine_to_coarse(vq, indices):
    inputs, _ = ref.teacher_forcing_sequence(vq, indices)
    return inputs, torch.cat([i.flatten(1) for i in reversed(indices)], dim=1)


def test_teacher_forcing_rejects_wrong_answers():
    assert_fails(ch04.teacher_forcing_sequence, tf_includes_last_canvas, contains="shape")
    assert_fails(ch04.teacher_forcing_sequence, tf_same_scale_inputs, contains="inputs")
    assert_fails(ch04.teacher_forcing_sequence, tf_targets_fine_to_coarse, contains="targets")


# 4.5 ------------------------------------------------------------------------------------------------------


def loss_mean_of_scales(logits, targets, scales):
    _, per_scale = ref.var_loss(logits, targets, scales)
    return per_scale.mean(), per_scale


def loss_off_by_one_bounds(logits, targets, scales):
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    per, begin = [], 0
    for s in scales:
        per.append(nll[:, begin:begin + s * s + 1].mean())
        begin += s * s
    return nll.mean(), torch.stack(per)


def loss_summed(logits, targets, scales):
    loss, per_scale = ref.var_loss(logits, targets, scales)
    return loss * targets.numel(), per_scale


def loss_log_of_softmax(logits, targets, scales):
    nll = -logits.softmax(-1).log().gather(-1, targets[..., None]).squeeze(-1)  # -inf where a probability underflows
    per, begin = [], 0
    for s in scales:
        per.append(nll[:, begin:begin + s * s].mean())
        begin += s * s
    return nll.mean(), torch.stack(per)


def loss_log_softmax(logits, targets, scales):  # the stable form written by hand: correct
    nll = -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    per, begin = [], 0
    for s in scales:
        per.append(nll[:, begin:begin + s * s].mean())
        begin += s * s
    return nll.mean(), torch.stack(per)


def test_loss_rejects_wrong_answers():
    assert_fails(ch04.var_loss, loss_mean_of_scales, contains="mean of the per-scale means")
    assert_fails(ch04.var_loss, loss_off_by_one_bounds)
    assert_fails(ch04.var_loss, loss_summed)
    assert_fails(ch04.var_loss, loss_log_of_softmax, contains="log of softmax probabilities")
    assert_passes(ch04.var_loss, loss_log_softmax)


# 4.6 ------------------------------------------------------------------------------------------------------


def _loop(model, vq, classes, *, cfg=0.0, sampling=SamplingConfig(), generator=None, ramp=True, mix=None,
          per_row=False, recompute=False):
    """A sampling loop with switchable mistakes."""
    c, B = model.config, classes.shape[0]
    guided = cfg != 0
    cls = torch.cat([classes, torch.full_like(classes, model.null_class)]) if guided else classes
    cache = model.make_cache(cls.shape[0])
    f_hat, x, out = None, None, []
    for k, s in enumerate(c.scales):
        logits = model.step(k, x, cls, cache)
        if recompute and k > 0:  # an extra pass per scale
            model(torch.zeros(cls.shape[0], c.num_tokens - 1, c.latent_dim), cls)
        if guided:
            t = ref.guidance_strength(cfg, k, c.num_scales, ramp=ramp)
            logits = mix(logits[:B], logits[B:], t) if mix else cfg_mix(logits[:B], logits[B:], t)
        if per_row:
            tokens = torch.stack([sample(logits[:, i], sampling=sampling, generator=generator)
                                  for i in range(s * s)], dim=1)
        else:
            tokens = sample(logits, sampling=sampling, generator=generator)
        out.append(tokens.view(B, s, s))
        f_hat, x = ref.scale_step(vq, f_hat, k, tokens)
        if guided and x is not None:
            x = torch.cat([x, x])
    return out


def loop_no_ramp(model, vq, classes, **kw):
    return _loop(model, vq, classes, **{**kw, "ramp": False})


def loop_scale_convention(model, vq, classes, **kw):
    # uses uncond + t * (cond - uncond): t = 0 would then be the unconditional model
    return _loop(model, vq, classes, mix=lambda c, u, t: u + t * (c - u), **kw)


def loop_extra_passes(model, vq, classes, **kw):
    return _loop(model, vq, classes, recompute=True, **kw)


def test_sampling_rejects_wrong_answers():
    assert_fails(ch04.sample_pyramid, loop_no_ramp, contains="pyramid")
    assert_fails(ch04.sample_pyramid, loop_scale_convention, contains="pyramid")
    assert_fails(ch04.sample_pyramid, loop_extra_passes, contains="one model.step per scale")


def test_sampling_rejects_the_library_loop():
    def library(model, vq, classes, **kw):
        return sample_pyramid(model, vq, classes, **kw)

    def through_generate(model, vq, classes, **kw):
        return model.generate(vq, classes, **kw)

    assert_fails(ch04.sample_pyramid, library, contains="the library's version of this loop")
    assert_fails(ch04.sample_pyramid, through_generate, contains="the library's version of this loop")


def test_hand_written_loop_passes():
    assert_passes(ch04.sample_pyramid, _loop)


def test_per_row_sampling_changes_the_random_stream():
    # drawing each position separately consumes the generator in another order: different tokens
    assert_fails(ch04.sample_pyramid, lambda model, vq, classes, **kw: _loop(model, vq, classes, per_row=True, **kw),
                 contains="pyramid")
