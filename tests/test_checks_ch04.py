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
    msg = assert_fails(ch04.block_causal_mask, mask_token_causal, contains="cannot attend")
    assert "token-by-token causal mask" in msg
    msg = assert_fails(ch04.block_causal_mask, mask_transposed, contains="the mask is transposed")
    assert "leaks the future" in msg
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


def embed_no_position(x, level_table, pos_table, scales, start=0):
    return x + level_table[ref.level_ids(scales)[start:start + x.shape[1]]]


def embed_in_place(x, level_table, pos_table, scales, start=0):
    p = torch.arange(start, start + x.shape[1])
    x += level_table[ref.level_ids(scales)[p]] + pos_table[p]  # the right sum, written into the caller's x
    return x


def test_embed_rejects_wrong_answers():
    assert_fails(ch04.embed_levels_positions, embed_level_by_position, contains="indexed by the position")
    assert_fails(ch04.embed_levels_positions, embed_ignores_start, contains="counted from 0")
    assert_fails(ch04.embed_levels_positions, embed_from_zero, contains="counted from 0")
    assert_fails(ch04.embed_levels_positions, embed_no_level, contains="the level embedding is missing")
    assert_fails(ch04.embed_levels_positions, embed_no_position, contains="the position embedding is missing")
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


def step_ignores_canvas(vq, f_hat, k, tokens):
    s = vq.scales[k]
    f_hat = vq.accumulate(None, k, tokens.view(-1, s, s))  # passes None: the canvas restarts every scale
    if k == len(vq.scales) - 1:
        return f_hat, None
    return f_hat, vq.next_input(f_hat, k).flatten(2).transpose(1, 2)


def step_nearest_resize(vq, f_hat, k, tokens):
    s = vq.scales[k]
    f_hat = vq.accumulate(f_hat, k, tokens.view(-1, s, s))
    if k == len(vq.scales) - 1:
        return f_hat, None
    return f_hat, F.interpolate(f_hat, size=vq.scales[k + 1]).flatten(2).transpose(1, 2)  # default mode: nearest


def test_scale_step_rejects_wrong_answers():
    msg = assert_fails(ch04.scale_step, step_not_cumulative, contains="made from this scale's codes alone")
    assert "next_input" in msg
    msg = assert_fails(ch04.scale_step, step_flatten_without_transpose, contains="which mixes channels and positions")
    assert "next_input" in msg
    msg = assert_fails(ch04.scale_step, step_column_major, contains="read into the s x s map column by column")
    assert "f_hat" in msg
    assert_fails(ch04.scale_step, step_ignores_canvas, contains="the canvas holds this scale's codes only")
    assert_fails(ch04.scale_step, step_nearest_resize, contains="default (nearest) mode")
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


def tf_previous_codes_only(vq, indices):
    # each input resized from the previous scale's codes alone, not from the canvas of all scales before
    inputs = [F.interpolate(vq.accumulate(None, k, indices[k]), size=indices[k + 1].shape[-1], mode="area")
              .flatten(2).transpose(1, 2) for k in range(len(indices) - 1)]
    return torch.cat(inputs, dim=1), torch.cat([i.flatten(1) for i in indices], dim=1)


def test_teacher_forcing_rejects_wrong_answers():
    assert_fails(ch04.teacher_forcing_sequence, tf_includes_last_canvas, contains="shape")
    msg = assert_fails(ch04.teacher_forcing_sequence, tf_same_scale_inputs, contains="already holds scale k's own")
    assert "inputs on input" in msg
    msg = assert_fails(ch04.teacher_forcing_sequence, tf_targets_fine_to_coarse,
                       contains="the targets run from the finest scale to the coarsest")
    assert "targets on input" in msg
    assert_fails(ch04.teacher_forcing_sequence, tf_previous_codes_only, contains="the previous scale's codes alone")


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


def loss_log_of_softmax_with_eps(eps, clamp):
    def loss(logits, targets, scales):
        p = logits.softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        nll = -torch.log(torch.clamp(p, min=eps) if clamp else p + eps)
        sizes = [s * s for s in scales]
        return nll.mean(), torch.stack([part.mean() for part in nll.split(sizes, dim=1)])
    return loss


def loss_log_softmax(logits, targets, scales):  # the stable form written by hand: correct
    nll = -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    per, begin = [], 0
    for s in scales:
        per.append(nll[:, begin:begin + s * s].mean())
        begin += s * s
    return nll.mean(), torch.stack(per)


def test_loss_rejects_wrong_answers():
    assert_fails(ch04.var_loss, loss_mean_of_scales, contains="mean of the per-scale means")
    assert_fails(ch04.var_loss, loss_off_by_one_bounds, contains="one token of the next scale too")
    assert_fails(ch04.var_loss, loss_summed, contains="the total is the sum of the token losses")
    assert_fails(ch04.var_loss, loss_log_of_softmax, contains="log of softmax probabilities")
    assert_fails(ch04.var_loss, loss_log_of_softmax_with_eps(1e-8, clamp=True), contains="eps (1e-08)")
    assert_fails(ch04.var_loss, loss_log_of_softmax_with_eps(1e-10, clamp=False), contains="caps each token's loss")
    assert_fails(ch04.var_loss, loss_log_of_softmax_with_eps(torch.finfo(torch.float32).tiny, clamp=True),
                 contains="-log(eps) = 87.3")
    # an eps not guessed: still fails, on the confident case, and the diagnosis names the mistake without the eps
    unnamed = assert_fails(ch04.var_loss, loss_log_of_softmax_with_eps(3e-7, clamp=True),
                           contains="with an eps to keep it finite")
    assert "on input 'scales (1, 2, 3), batch 2, vocab 7, logits far apart" in unnamed
    # added to every probability, that eps already shifts an ordinary case's per-scale losses
    assert_fails(ch04.var_loss, loss_log_of_softmax_with_eps(3e-7, clamp=False),
                 contains="with an eps to keep it finite")
    assert_passes(ch04.var_loss, loss_log_softmax)


# 4.6 ------------------------------------------------------------------------------------------------------


# the wrong loops are the check's own mistake loop (ch04._loop_with, which draws from a generator seeded as the
# check's) with one slip; "halves swapped" and "ramp over S" write the slip their own way


def loop_no_ramp(model, vq, classes, **kw):
    return ch04._loop_with(model, vq, classes, **{**kw, "ramp": False})


def loop_scale_convention(model, vq, classes, **kw):
    # uses uncond + t * (cond - uncond): t = 0 would then be the unconditional model
    return ch04._loop_with(model, vq, classes, mix=lambda c, u, t: u + t * (c - u), **kw)


class _Recomputing:
    """A model whose every step after the first also reruns a full forward pass: an extra pass per scale."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def step(self, k, x, cls, cache):
        logits = self.model.step(k, x, cls, cache)
        if k > 0:
            c = self.model.config
            self.model(torch.zeros(cls.shape[0], c.num_tokens - 1, c.latent_dim), cls)
        return logits


def loop_extra_passes(model, vq, classes, **kw):
    return ch04._loop_with(_Recomputing(model), vq, classes, **kw)


def loop_halves_swapped(model, vq, classes, **kw):
    # the null class in rows 0..B-1: logits[:B] are the unconditional half
    return ch04._loop_with(model, vq, classes, mix=lambda c, u, t: cfg_mix(u, c, t), **kw)


def loop_ramp_over_s(model, vq, classes, **kw):
    # t = cfg * k / S: an off-by-one ramp that never reaches cfg
    return ch04._loop_with(model, vq, classes, mix=lambda c, u, t: cfg_mix(c, u, t * (len(model.config.scales) - 1)
                                                                           / len(model.config.scales)), **kw)


def loop_guides_positive_cfg_only(model, vq, classes, *, cfg=0.0, **kw):
    # `if cfg > 0:` instead of cfg != 0: a negative strength (away from the class) is dropped
    return ch04._loop_with(model, vq, classes, cfg=cfg if cfg > 0 else 0.0, **kw)


def test_block_mask_names_an_inverted_mask():
    msg = assert_fails(ch04.block_causal_mask, lambda scales: ~ref.block_causal_mask(scales),
                       contains="the mask is inverted")
    assert "transposed" not in msg


def test_sampling_rejects_wrong_answers():
    assert_fails(ch04.sample_pyramid, loop_guides_positive_cfg_only, contains="cfg -1")
    msg = assert_fails(ch04.sample_pyramid, loop_no_ramp, contains="that guides every scale with the full cfg")
    assert "pyramid" in msg
    msg = assert_fails(ch04.sample_pyramid, loop_scale_convention, contains="reading the strength t as LlamaGen's scale")
    assert "pyramid" in msg
    assert_fails(ch04.sample_pyramid, loop_halves_swapped, contains="the halves are swapped")
    assert_fails(ch04.sample_pyramid, loop_ramp_over_s, contains="the ramp cfg * k / S never reaches cfg")
    assert_fails(ch04.sample_pyramid, loop_extra_passes, contains="one model.step per scale")


def test_sampling_rejects_the_library_loop():
    def library(model, vq, classes, **kw):
        return sample_pyramid(model, vq, classes, **kw)

    def through_generate(model, vq, classes, **kw):
        return model.generate(vq, classes, **kw)

    assert_fails(ch04.sample_pyramid, library, contains="the library's version of this loop")
    assert_fails(ch04.sample_pyramid, through_generate, contains="the library's version of this loop")


def test_mistake_loop_without_a_slip_passes():
    # each of the check's loop mistakes differs from a right answer by its slip only
    assert_passes(ch04.sample_pyramid, ch04._loop_with)


def test_per_row_sampling_changes_the_random_stream():
    # drawing each position separately consumes the generator in another order: different tokens
    msg = assert_fails(ch04.sample_pyramid,
                       lambda model, vq, classes, **kw: ch04._loop_with(model, vq, classes, per_position=True,
                                                                        **kw),
                       contains="draws a scale's tokens one position at a time")
    assert "pyramid" in msg


# correct answers in other styles (third audit): each must pass --------------------------------------------


def mask_by_blocks(scales) -> torch.Tensor:
    L = sum(s * s for s in scales)
    mask, begin = torch.zeros(L, L, dtype=torch.bool), 0
    for s in scales:
        end = begin + s * s
        mask[begin:end, :end] = True
        begin = end
    return mask


def mask_by_bucketize(scales) -> torch.Tensor:
    ends = torch.tensor([s * s for s in scales]).cumsum(0)
    level = torch.bucketize(torch.arange(int(ends[-1])), ends, right=True)
    return level.unsqueeze(1) >= level.unsqueeze(0)


def mask_by_nested_lists(scales) -> torch.Tensor:
    level = [k for k, s in enumerate(scales) for _ in range(s * s)]
    return torch.tensor([[a >= b for b in level] for a in level])


def mask_by_scale_ends(scales) -> torch.Tensor:
    sizes = torch.tensor([s * s for s in scales])
    end_of_own_scale = torch.repeat_interleave(sizes.cumsum(0), sizes)  # (L,)
    return torch.arange(int(sizes.sum()))[None, :] < end_of_own_scale[:, None]


def embed_by_loop(x, level_table, pos_table, scales, start=0) -> torch.Tensor:
    level = [k for k, s in enumerate(scales) for _ in range(s * s)]
    rows = [pos_table[p] + level_table[level[p]] for p in range(start, start + x.shape[1])]
    return x + torch.stack(rows)


def embed_by_f_embedding(x, level_table, pos_table, scales, start=0) -> torch.Tensor:
    ends = torch.tensor([s * s for s in scales], device=x.device).cumsum(0)
    p = torch.arange(start, start + x.shape[1], device=x.device)
    return x + F.embedding(p, pos_table) + F.embedding(torch.bucketize(p, ends, right=True), level_table)


def embed_in_float64(x, level_table, pos_table, scales, start=0) -> torch.Tensor:
    sl = slice(start, start + x.shape[1])
    extra = pos_table[sl].double() + level_table.index_select(0, ref.level_ids(scales, x.device)[sl]).double()
    return (x.double() + extra).float()


def embed_by_f_embedding_of_cpu_ids(x, level_table, pos_table, scales, start=0) -> torch.Tensor:
    p = torch.arange(start, start + x.shape[1])  # on the CPU: F.embedding of a GPU table refuses it
    return x + F.embedding(ref.level_ids(scales)[p], level_table) + F.embedding(p, pos_table)


def embed_index_select_of_cpu_ids(x, level_table, pos_table, scales, start=0) -> torch.Tensor:
    sl = slice(start, start + x.shape[1])
    return x + pos_table[sl] + level_table.index_select(0, ref.level_ids(scales)[sl])


def test_4_2_names_ids_left_on_the_cpu():
    """F.embedding and index_select of CPU ids run on the meta device but not on a GPU (audit 30): named."""
    for wrong in (embed_by_f_embedding_of_cpu_ids, embed_index_select_of_cpu_ids):
        assert_fails(ch04.embed_levels_positions, wrong, contains="mixed devices (Expected all tensors to be on the "
                                                                   "same device")


def embed_with_int32_levels(x, level_table, pos_table, scales, start=0) -> torch.Tensor:
    level = torch.repeat_interleave(torch.arange(len(scales), dtype=torch.int32), torch.tensor([s * s for s in scales]))
    sl = slice(start, start + x.shape[1])
    return x + pos_table[sl] + level_table[level[sl].long()]


def step_by_permute(vq, f_hat, k, tokens):
    B, s = tokens.shape[0], round(tokens.shape[1] ** 0.5)
    f_hat = vq.accumulate(f_hat, k, tokens.reshape(B, s, s))
    if k + 1 == len(vq.scales):
        return f_hat, None
    nxt = vq.next_input(f_hat, k)
    return f_hat, nxt.permute(0, 2, 3, 1).reshape(B, -1, nxt.shape[1])


def step_by_einsum_as_list(vq, f_hat, k, tokens):
    s = vq.scales[k]
    f_hat = vq.accumulate(f_hat, k, tokens.unflatten(1, (s, s)))
    last = k == len(vq.scales) - 1
    return [f_hat, None if last else torch.einsum("bdhw->bhwd", vq.next_input(f_hat, k)).flatten(1, 2)]


def step_by_position_loop(vq, f_hat, k, tokens):
    s = vq.scales[k]
    f_hat = vq.accumulate(f_hat, k, tokens.view(-1, s, s))
    if k == len(vq.scales) - 1:
        return f_hat, None
    nxt = vq.next_input(f_hat, k)  # (B, D, s', s')
    side = nxt.shape[-1]
    return f_hat, torch.stack([nxt[:, :, i, j] for i in range(side) for j in range(side)], dim=1)


def teacher_forcing_by_filtering(vq, indices):
    f_hat, steps = None, []
    for k, idx in enumerate(indices):
        f_hat, nxt = ref.scale_step(vq, f_hat, k, idx.reshape(idx.shape[0], -1))
        steps.append(nxt)
    targets = torch.cat([idx.view(idx.shape[0], -1) for idx in indices], 1)
    return torch.cat([x for x in steps if x is not None], 1), targets


def teacher_forcing_by_tokenizer(vq, indices):
    f_hat, inputs = None, []
    for k, idx in enumerate(indices):
        f_hat = vq.accumulate(f_hat, k, idx)
        if k < len(indices) - 1:
            inputs.append(vq.next_input(f_hat, k).flatten(2).mT)
    return torch.cat(inputs, 1), torch.cat([i.reshape(i.shape[0], -1) for i in indices], 1)


def teacher_forcing_preallocated(vq, indices):
    B, first = indices[0].shape[0], indices[0].shape[1] ** 2
    L = sum(i.shape[1] * i.shape[2] for i in indices)
    inputs, f_hat, at = torch.zeros(B, L - first, vq.dim), None, 0
    for k, idx in enumerate(indices):
        f_hat, nxt = ref.scale_step(vq, f_hat, k, idx.flatten(1))
        if nxt is not None:
            inputs[:, at:at + nxt.shape[1]] = nxt
            at += nxt.shape[1]
    return inputs, torch.cat([i.flatten(1) for i in indices], dim=-1)


def loss_by_log_softmax_split(logits, targets, scales):
    nll = -logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return nll.mean(), torch.stack([part.mean() for part in nll.split([s * s for s in scales], dim=1)])


def loss_by_logsumexp_index_add(logits, targets, scales, on_inputs_device=True):
    device = logits.device if on_inputs_device else None  # None: on the CPU, wrong for logits on a GPU
    nll = torch.logsumexp(logits, -1) - logits.gather(2, targets[..., None])[..., 0]
    sizes = torch.tensor([s * s for s in scales], device=device)
    per_scale = torch.zeros(len(scales), device=device).index_add(0, ref.level_ids(scales, device), nll.sum(0))
    return nll.sum() / nll.numel(), per_scale / (nll.shape[0] * sizes)


def loss_in_float64(logits, targets, scales):
    nll = F.cross_entropy(logits.double().transpose(1, 2), targets, reduction="none")
    per_scale, begin = [], 0
    for s in scales:
        per_scale.append(nll[:, begin:begin + s * s].mean())
        begin += s * s
    return nll.mean().float(), torch.stack(per_scale).float()


def loss_as_weighted_scale_means(logits, targets, scales):
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    level = ref.level_ids(scales)
    per_scale = torch.stack([nll[:, level == k].mean() for k in range(len(scales))])
    sizes = torch.tensor([s * s for s in scales], dtype=per_scale.dtype, device=per_scale.device)
    return (per_scale * sizes).sum() / sizes.sum(), per_scale


def _sampler(always_double: bool):
    """A hand-written 4.6 loop: the library's strength and mix, and (``always_double``) the doubled batch even at
    cfg 0, where the mix gives the conditional logits exactly."""
    def sampler(model, vq, classes, *, sampling=SamplingConfig(), cfg=0.0, ramp=True, generator=None):
        B, scales = classes.shape[0], model.config.scales
        double = always_double or cfg != 0
        rows = torch.cat([classes, torch.full_like(classes, model.null_class)]) if double else classes
        cache, f_hat, x, out = model.make_cache(rows.shape[0]), None, None, []
        for k, s in enumerate(scales):
            logits = model.step(k, x, rows, cache)
            if double:
                t = ref.guidance_strength(cfg, k, len(scales), ramp=ramp)
                logits = cfg_mix(logits[:B], logits[B:], t)
            tokens = sample(logits, sampling=sampling, generator=generator)
            out.append(tokens.reshape(B, s, s))
            f_hat, x = ref.scale_step(vq, f_hat, k, tokens)
            if double and x is not None:
                x = x.repeat(2, 1, 1)
        return out

    return sampler


def sampler_by_chunks(model, vq, classes, *, sampling=SamplingConfig(), cfg=0.0, ramp=True, generator=None):
    """The doubled batch built by repeat and the guidance written as cond + t (cond - uncond)."""
    B, S = classes.shape[0], len(model.config.scales)
    guided = cfg != 0
    rows = classes.repeat(2) if guided else classes
    if guided:
        rows[B:] = model.null_class  # rows is a new tensor: the caller's classes stay as they were
    cache, f_hat, x, out = model.make_cache(rows.shape[0]), None, None, []
    for k, s in enumerate(model.config.scales):
        logits = model.step(k, x, rows, cache)
        if guided:
            t = cfg * (k / (S - 1)) if ramp else cfg
            cond, uncond = logits.chunk(2)
            logits = cond + t * (cond - uncond)
        tokens = sample(logits, sampling=sampling, generator=generator)
        out.append(tokens.reshape(B, s, s))
        f_hat, x = ref.scale_step(vq, f_hat, k, tokens)
        if guided and x is not None:
            x = torch.cat([x, x], 0)
    return out


CORRECT_ALTERNATIVES = {
    "block_causal_mask": [mask_by_blocks, mask_by_bucketize, mask_by_nested_lists, mask_by_scale_ends],
    "embed_levels_positions": [embed_by_loop, embed_by_f_embedding, embed_in_float64, embed_with_int32_levels],
    "scale_step": [step_by_permute, step_by_einsum_as_list, step_by_position_loop],
    "teacher_forcing_sequence": [teacher_forcing_by_tokenizer, teacher_forcing_preallocated,
                                 teacher_forcing_by_filtering],
    "var_loss": [loss_by_log_softmax_split, loss_by_logsumexp_index_add, loss_in_float64, loss_as_weighted_scale_means],
    "sample_pyramid": [_sampler(always_double=True), _sampler(always_double=False), sampler_by_chunks],
}


@pytest.mark.parametrize("name,index", [(n, i) for n, fns in CORRECT_ALTERNATIVES.items() for i in range(len(fns))])
def test_correct_answers_in_other_styles_pass(name, index):
    assert_passes(getattr(ch04, name), CORRECT_ALTERNATIVES[name][index])


# wrong answers of kinds the earlier audits did not try (third audit) ---------------------------------------


def test_scale_step_rejects_a_canvas_kept_between_calls():
    kept: dict[str, torch.Tensor] = {}

    def own_canvas(vq, f_hat, k, tokens):  # ignores f_hat: right only when called scale after scale
        s = vq.scales[k]
        kept["f"] = vq.accumulate(None if k == 0 else kept["f"], k, tokens.view(-1, s, s))
        nxt = None if k == len(vq.scales) - 1 else vq.next_input(kept["f"], k).flatten(2).transpose(1, 2)
        return kept["f"], nxt

    assert_fails(ch04.scale_step, own_canvas, contains="not from a canvas kept between calls")


def test_sampling_that_ignores_the_generator_is_named():
    def global_random_state(model, vq, classes, **kw):
        kw.pop("generator")
        return _sampler(always_double=False)(model, vq, classes, **kw)

    assert_fails(ch04.sample_pyramid, global_random_state, contains="identically seeded generators")


def test_var_loss_made_on_the_cpu_is_caught():
    """Scale sizes and per-scale sums made on the CPU fail off the CPU (the check runs once on the meta device)."""
    assert_fails(ch04.var_loss, lambda logits, targets, scales: loss_by_logsumexp_index_add(logits, targets, scales,
                                                                                            False),
                 contains="mixed devices")
