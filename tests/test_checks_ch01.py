"""Chapter 01's checks accept the reference, report stubs as not attempted and reject plausible mistakes."""

import pytest
import torch
import torch.nn.functional as F

from ar_course.checks import ch01
from ar_course.checks.reference import ch01 as answers
from ar_course.tokenizers import functional as ref
from checks_helpers import assert_fails, assert_not_attempted, assert_passes, stub

EXERCISES = ["vq_lookup", "straight_through", "vq_loss", "codebook_usage", "dead_code_restart", "ema_update",
             "residual_quantize", "phi_index", "multiscale_encode", "multiscale_decode", "teacher_forcing_inputs"]
ANSWERS = {"codebook_usage": answers.codebook_usage, "multiscale_decode": answers.multiscale_decode}
REFERENCES = {name: ANSWERS[name] if name in ANSWERS else getattr(ref, name) for name in EXERCISES}


def test_chapter_registers_every_exercise_in_order():
    numbers = [ch01.chapter.exercises[name].number for name in EXERCISES]
    assert numbers == [f"1.{i}" for i in range(1, len(EXERCISES) + 1)]


@pytest.mark.parametrize("name", EXERCISES)
def test_reference_passes(name, capsys):
    check = getattr(ch01, name)
    assert_passes(check, REFERENCES[name])
    number = ch01.chapter.exercises[name].number
    assert capsys.readouterr().out.strip() == f"Exercise {number} passed"
    assert ch01.use(REFERENCES[name]) is REFERENCES[name]


@pytest.mark.parametrize("name", EXERCISES)
def test_stub_is_not_attempted(name):
    assert_not_attempted(getattr(ch01, name), stub)


def test_use_falls_back_to_reference(capsys):
    def vq_lookup(z, codebook):
        raise NotImplementedError

    assert ch01.use(vq_lookup) is ref.vq_lookup
    assert "using the reference" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# plausible wrong answers, one test per exercise


def test_vq_lookup_mistakes():
    assert_fails(ch01.vq_lookup, lambda z, cb: (z @ cb.t()).argmax(1), contains="largest dot product")
    assert_fails(ch01.vq_lookup, lambda z, cb: ((z[:, None] - cb[None]) ** 2).sum(-1).argmax(1),
                 contains="farthest code")
    assert_fails(ch01.vq_lookup, lambda z, cb: (z[:, None] - cb[None]).abs().sum(-1).argmin(1))  # L1 distance
    last = lambda z, cb: cb.shape[0] - 1 - torch.cdist(z, cb).flip(1).argmin(1)  # ties to the highest index
    assert_fails(ch01.vq_lookup, last, contains="ties")
    assert_fails(ch01.vq_lookup, lambda z, cb: torch.cdist(z, cb).argmin(1).int(), contains="dtype")


def test_straight_through_mistakes():
    assert_fails(ch01.straight_through, lambda z, z_q: z_q, contains="no gradient reaches z (the encoder)")
    assert_fails(ch01.straight_through, lambda z, z_q: z_q + (z - z_q).detach())  # value of z
    assert_fails(ch01.straight_through, lambda z, z_q: z + z_q - z, contains="no gradient reaches z")  # cancels
    assert_fails(ch01.straight_through, lambda z, z_q: z.detach() + (z_q - z), contains="sign flipped")
    msg = assert_fails(ch01.straight_through, lambda z, z_q: z * (z_q / z).detach(),
                       contains="gradient reaching z (the encoder) on input")
    assert "passed through unchanged" in msg and "no gradient reaches" not in msg  # a wrong, not a zero, gradient
    assert_fails(ch01.straight_through, lambda z, z_q: z + z_q - z.detach(), contains="codebook")  # z_q not detached
    assert_fails(ch01.straight_through, lambda z, z_q: z_q.detach(), contains="no gradient")
    assert_fails(ch01.straight_through, lambda z, z_q: z + (z - z_q).detach())  # wrong value


def test_vq_loss_mistakes():
    assert_fails(ch01.vq_loss, lambda z, z_q, beta: (1 + beta) * F.mse_loss(z, z_q), contains="without stop-gradients")
    swapped = lambda z, z_q, beta: beta * F.mse_loss(z_q, z.detach()) + F.mse_loss(z, z_q.detach())
    assert_fails(ch01.vq_loss, swapped, contains="beta weighs the codebook term")
    summed = lambda z, z_q, beta: ((z_q - z.detach()) ** 2).sum() + beta * ((z - z_q.detach()) ** 2).sum()
    assert_fails(ch01.vq_loss, summed, contains="sums the squared errors")


def test_codebook_usage_mistakes():
    def no_minlength(indices, num_codes):
        counts = torch.bincount(indices.flatten())
        p = counts[counts > 0].double() / counts.sum()
        return float((counts > 0).sum()) / len(counts), float((-(p * p.log()).sum()).exp())

    def base_two(indices, num_codes):
        counts = torch.bincount(indices.flatten(), minlength=num_codes)
        p = counts[counts > 0].double() / counts.sum()
        return float((counts > 0).sum()) / num_codes, float(2 ** (-(p * p.log()).sum()))

    def unique_over_tokens(indices, num_codes):
        return indices.unique().numel() / indices.numel(), answers.codebook_usage(indices, num_codes)[1]

    def zero_terms(indices, num_codes):
        counts = torch.bincount(indices.flatten(), minlength=num_codes).double()
        p = counts / counts.sum()
        return float((counts > 0).sum()) / num_codes, float((-(p * p.log()).sum()).exp())

    assert_fails(ch01.codebook_usage, no_minlength, contains="largest index seen + 1")
    assert_fails(ch01.codebook_usage, zero_terms, contains="0 * log 0")
    assert_fails(ch01.codebook_usage, base_two)
    assert_fails(ch01.codebook_usage, unique_over_tokens)

    def tensors(indices, num_codes):  # right values, but 0-dim tensors instead of Python floats
        counts = torch.bincount(indices.flatten(), minlength=num_codes).double()
        p = counts[counts > 0] / counts.sum()
        return (counts > 0).sum() / num_codes, torch.exp(-(p * p.log()).sum())

    assert_fails(ch01.codebook_usage, tensors, contains="not a number")


def test_dead_code_restart_mistakes():
    def at_most(codebook, counts, candidates, threshold):  # <= instead of <
        dead = counts <= threshold
        new = codebook.clone()
        new[dead] = candidates[torch.arange(int(dead.sum())) % len(candidates)]
        return new, dead

    def no_wrap(codebook, counts, candidates, threshold):
        dead = counts < threshold
        new = codebook.clone()
        new[dead] = candidates[torch.arange(int(dead.sum()))]
        return new, dead

    def in_place(codebook, counts, candidates, threshold):
        dead = counts < threshold
        codebook[dead] = candidates[torch.arange(int(dead.sum())) % len(candidates)]
        return codebook, dead

    def by_code_index(codebook, counts, candidates, threshold):
        dead = counts < threshold
        new = codebook.clone()
        where = dead.nonzero().flatten()
        new[where] = candidates[where % len(candidates)]
        return new, dead

    assert_fails(ch01.dead_code_restart, at_most, contains="dead only below the threshold")
    assert_fails(ch01.dead_code_restart, no_wrap, contains="more dead codes")
    assert_fails(ch01.dead_code_restart, in_place, contains="changed its argument `codebook` in place")
    assert_fails(ch01.dead_code_restart, by_code_index)

    def resets_counts(codebook, counts, candidates, threshold):  # right output, but writes into counts
        new, dead = ref.dead_code_restart(codebook, counts, candidates, threshold)
        counts[dead] = threshold
        return new, dead

    assert_fails(ch01.dead_code_restart, resets_counts, contains="changed its argument `counts` in place")


def _ema(cluster_size, embed_sum, z, indices, decay, eps, smooth=True, swap=False):
    k = cluster_size.shape[0]
    onehot = F.one_hot(indices, k).float()
    a, b = (1 - decay, decay) if swap else (decay, 1 - decay)
    size = a * cluster_size + b * onehot.sum(0)
    total = a * embed_sum + b * onehot.t() @ z
    n = size.sum()
    denom = (size + eps) / (n + k * eps) * n if smooth else size
    return size, total, total / denom[:, None]


def test_ema_update_mistakes():
    assert_fails(ch01.ema_update, lambda *a: _ema(*a, smooth=False))
    assert_fails(ch01.ema_update, lambda *a: _ema(*a, swap=True))

    def no_decay_on_new(cluster_size, embed_sum, z, indices, decay, eps):  # forgets the (1 - decay) factor
        onehot = F.one_hot(indices, cluster_size.shape[0]).float()
        size = decay * cluster_size + onehot.sum(0)
        total = decay * embed_sum + onehot.t() @ z
        n = size.sum()
        return size, total, total / ((size + eps) / (n + len(size) * eps) * n)[:, None]

    assert_fails(ch01.ema_update, no_decay_on_new)

    def in_place(cluster_size, embed_sum, z, indices, decay, eps):  # updates the running statistics in place
        counts = torch.bincount(indices, minlength=len(cluster_size)).float()
        size = cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        total = embed_sum.mul_(decay).add_(torch.zeros_like(embed_sum).index_add_(0, indices, z), alpha=1 - decay)
        n = size.sum()
        return size, total, total / ((size + eps) / (n + len(size) * eps) * n)[:, None]

    assert_fails(ch01.ema_update, in_place, contains="changed its argument `cluster_size` in place")


def test_residual_quantize_mistakes():
    def no_residual(z, codebooks):  # every level codes z itself
        idx = torch.stack([ref.vq_lookup(z, cb) for cb in codebooks], 1)
        return idx, sum(codebooks[d][idx[:, d]] for d in range(len(codebooks)))

    def previous_code_only(z, codebooks):  # residual against the last code, not the running sum
        rest, z_hat, out = z, torch.zeros_like(z), []
        for cb in codebooks:
            i = ref.vq_lookup(rest, cb)
            z_hat = z_hat + cb[i]
            rest = z - cb[i]
            out.append(i)
        return torch.stack(out, 1), z_hat

    def depth_first(z, codebooks):
        idx, z_hat = ref.residual_quantize(z, codebooks)
        return idx.t(), z_hat

    assert_fails(ch01.residual_quantize, no_residual)
    assert_fails(ch01.residual_quantize, previous_code_only, contains="depth")
    assert_fails(ch01.residual_quantize, depth_first, contains="shape")

    def residual_in_place(z, codebooks):  # `rest = z; rest -= code` subtracts from the caller's z
        rest, z_hat, out = z, torch.zeros_like(z), []
        for cb in codebooks:
            i = ref.vq_lookup(rest, cb)
            rest -= cb[i]
            z_hat = z_hat + cb[i]
            out.append(i)
        return torch.stack(out, 1), z_hat

    assert_fails(ch01.residual_quantize, residual_in_place, contains="changed its argument `z` in place")


def test_phi_index_mistakes():
    def even_ticks(k, num_scales, num_phi):
        at = k / (num_scales - 1) if num_scales > 1 else 0.0
        return int((torch.linspace(0, 1, num_phi) - at).abs().argmin())

    def over_s(k, num_scales, num_phi):
        m = 1 / (3 * num_phi)
        return int((torch.linspace(m, 1 - m, num_phi, dtype=torch.float64) - k / num_scales).abs().argmin())

    def rounded(k, num_scales, num_phi):
        return round(k / max(num_scales - 1, 1) * (num_phi - 1))

    for wrong in (even_ticks, over_s, rounded):
        assert_fails(ch01.phi_index, wrong)

    def as_float(k, num_scales, num_phi):  # the right index as a float, which cannot index the list phis
        return float(ref.phi_index(k, num_scales, num_phi))

    def position_unrounded(k, num_scales, num_phi):  # the continuous tick position: int() would truncate it
        return ref.phi_index(k, num_scales, num_phi) + 0.4

    assert_fails(ch01.phi_index, as_float, contains="should return an int")
    assert_fails(ch01.phi_index, position_unrounded, contains="should return an int")
    tensor_index = lambda k, num_scales, num_phi: torch.tensor(ref.phi_index(k, num_scales, num_phi))  # noqa: E731
    assert_passes(ch01.phi_index, tensor_index)


def test_phi_index_accepts_float32_ticks():
    def float32_ticks(k, num_scales, num_phi):
        at = k / (num_scales - 1) if num_scales > 1 else 0.0
        m = 1 / (3 * num_phi)
        return int((torch.linspace(m, 1 - m, num_phi) - at).abs().argmin())

    assert_passes(ch01.phi_index, float32_ticks)


def _encode(f, codebook, scales, phis, down="area", up="bicubic", residual=True, use_phi=True, in_place=False):
    b, c, side, _ = f.shape
    f_hat, out = torch.zeros_like(f), []
    for s, phi in zip(scales, phis):
        src = f if in_place else f - f_hat if residual else f  # in_place: f itself holds the residual
        rest = src if s == side else F.interpolate(src, size=(s, s), mode=down)
        idx = ref.vq_lookup(rest.permute(0, 2, 3, 1).reshape(-1, c), codebook).view(b, s, s)
        h = codebook[idx].permute(0, 3, 1, 2)
        h = h if s == side else F.interpolate(h, size=(side, side), mode=up)
        f_hat = f_hat + (phi(h) if use_phi else h)
        if in_place:
            f -= phi(h)
        out.append(idx)
    return out


def test_multiscale_encode_mistakes():
    assert_fails(ch01.multiscale_encode, lambda *a: _encode(*a, residual=False))
    assert_fails(ch01.multiscale_encode, lambda *a: _encode(*a, up="nearest"))
    assert_fails(ch01.multiscale_encode, lambda *a: _encode(*a, use_phi=False), contains="phis")
    assert_fails(ch01.multiscale_encode, lambda *a: _encode(*a, down="bilinear"))
    assert_fails(ch01.multiscale_encode, lambda *a: _encode(*a, in_place=True),
                 contains="changed its argument `f` in place")


def _decode(indices, codebook, phis, up="bicubic", use_phi=True, last_only=False):
    side = indices[-1].shape[-1]
    f_hat = 0
    for idx, phi in list(zip(indices, phis))[-1 if last_only else 0:]:
        h = codebook[idx].permute(0, 3, 1, 2)
        h = h if idx.shape[-1] == side else F.interpolate(h, size=(side, side), mode=up)
        f_hat = f_hat + (phi(h) if use_phi else h)
    return f_hat


def test_multiscale_decode_mistakes():
    assert_fails(ch01.multiscale_decode, lambda *a: _decode(*a, use_phi=False))
    assert_fails(ch01.multiscale_decode, lambda *a: _decode(*a, up="bilinear"))
    assert_fails(ch01.multiscale_decode, lambda *a: _decode(*a, last_only=True))


def _f_hat_after(indices, codebook, phis, k, up="bicubic"):
    """f_hat at full size after scales 0..k."""
    side = indices[-1].shape[-1]
    f_hat = 0
    for j in range(k + 1):
        h = codebook[indices[j]].permute(0, 3, 1, 2)
        h = h if indices[j].shape[-1] == side else F.interpolate(h, size=(side, side), mode=up)
        f_hat = f_hat + phis[j](h)
    return f_hat


def _down(x, s, mode="area"):
    return x if x.shape[-1] == s else F.interpolate(x, size=(s, s), mode=mode)


def test_teacher_forcing_inputs_mistakes():
    def same_scale(indices, codebook, phis):  # off by one: downsampled to scale k instead of k + 1
        return [_down(_f_hat_after(indices, codebook, phis, k), indices[k].shape[-1]) for k in range(len(indices) - 1)]

    def with_last(indices, codebook, phis):  # one map too many
        return ref.teacher_forcing_inputs(indices, codebook, phis) + [
            answers.multiscale_decode(indices, codebook, phis)]

    def current_scale_only(indices, codebook, phis):  # not cumulative
        return [_down(_f_hat_after(indices, codebook, phis, k) - (_f_hat_after(indices, codebook, phis, k - 1)
                                                                  if k else 0), indices[k + 1].shape[-1])
                for k in range(len(indices) - 1)]

    def bilinear_down(indices, codebook, phis):
        return [_down(_f_hat_after(indices, codebook, phis, k), indices[k + 1].shape[-1], mode="bilinear")
                for k in range(len(indices) - 1)]

    assert_fails(ch01.teacher_forcing_inputs, same_scale, contains="shape")
    assert_fails(ch01.teacher_forcing_inputs, with_last, contains="items")
    assert_fails(ch01.teacher_forcing_inputs, current_scale_only)
    assert_fails(ch01.teacher_forcing_inputs, bilinear_down)
