"""Chapter 01's checks accept the reference, report stubs as not attempted and reject plausible mistakes."""

import collections
import math

import numpy as np
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
    assert_fails(ch01.vq_lookup, lambda z, cb: (z[:, None] - cb[None]).abs().sum(-1).argmin(1),
                 contains="by the L1 distance")
    last = lambda z, cb: cb.shape[0] - 1 - torch.cdist(z, cb).flip(1).argmin(1)  # ties to the highest index
    assert_fails(ch01.vq_lookup, last, contains="on a tie that keeps the code with the highest index")
    assert_fails(ch01.vq_lookup, lambda z, cb: ((z[:, None] - cb[None]) ** 2).sum(-1).argmin(0),  # wrong axis
                 contains="argmin over the vectors (dim 0)")
    assert_fails(ch01.vq_lookup, lambda z, cb: torch.cdist(z, cb).argmin(1).int(), contains="dtype")


def test_straight_through_mistakes():
    assert_fails(ch01.straight_through, lambda z, z_q: z_q, contains="no gradient reaches z (the encoder)")
    assert_fails(ch01.straight_through, lambda z, z_q: z_q + (z - z_q).detach(),  # value of z
                 contains="the output has the value of z, not of z_q")
    assert_fails(ch01.straight_through, lambda z, z_q: z + z_q - z, contains="no gradient reaches z")  # cancels
    assert_fails(ch01.straight_through, lambda z, z_q: z.detach() + (z_q - z), contains="sign flipped")
    msg = assert_fails(ch01.straight_through, lambda z, z_q: z * (z_q / z).detach(),
                       contains="gradient reaching z (the encoder) on input")
    assert "passed through unchanged" in msg and "no gradient reaches" not in msg  # a wrong, not a zero, gradient
    assert_fails(ch01.straight_through, lambda z, z_q: z + z_q - z.detach(), contains="codebook")  # z_q not detached
    assert_fails(ch01.straight_through, lambda z, z_q: z_q.detach(), contains="no gradient")
    assert_fails(ch01.straight_through, lambda z, z_q: z + (z - z_q).detach(),  # wrong value
                 contains="that is 2z - z_q")
    assert_fails(ch01.straight_through, lambda z, z_q: z + z_q.detach(), contains="that is z + z_q")


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
    assert_fails(ch01.codebook_usage, base_two, contains="perplexity in base 2")
    assert_fails(ch01.codebook_usage, unique_over_tokens, contains="by the number of tokens")

    def entropy_only(indices, num_codes):  # forgets the exp
        counts = torch.bincount(indices.flatten(), minlength=num_codes)
        p = counts[counts > 0].double() / counts.sum()
        return float((counts > 0).sum()) / num_codes, float(-(p * p.log()).sum())

    assert_fails(ch01.codebook_usage, entropy_only, contains="the entropy itself")

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
    assert_fails(ch01.dead_code_restart, by_code_index, contains="by its index in the codebook")

    def never_picked(codebook, counts, candidates, threshold):  # only count 0 is dead
        dead = counts == 0
        new = codebook.clone()
        new[dead] = candidates[torch.arange(int(dead.sum())) % len(candidates)]
        return new, dead

    assert_fails(ch01.dead_code_restart, never_picked, contains="only codes never picked")

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
    assert_fails(ch01.ema_update, lambda *a: _ema(*a, smooth=False), contains="without smoothing them")
    assert_fails(ch01.ema_update, lambda *a: _ema(*a, swap=True), contains="decay weighs the new batch")

    def no_decay_on_new(cluster_size, embed_sum, z, indices, decay, eps):  # forgets the (1 - decay) factor
        onehot = F.one_hot(indices, cluster_size.shape[0]).float()
        size = decay * cluster_size + onehot.sum(0)
        total = decay * embed_sum + onehot.t() @ z
        n = size.sum()
        return size, total, total / ((size + eps) / (n + len(size) * eps) * n)[:, None]

    assert_fails(ch01.ema_update, no_decay_on_new, contains="without the (1 - decay) factor")

    def plus_eps(cluster_size, embed_sum, z, indices, decay, eps):  # smooths by adding eps only
        N, m, _ = ref.ema_update(cluster_size, embed_sum, z, indices, decay, eps)
        return N, m, m / (N + eps)[:, None]

    assert_fails(ch01.ema_update, plus_eps, contains="divides by N + eps")

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

    assert_fails(ch01.residual_quantize, no_residual, contains="every level codes z itself")
    assert_fails(ch01.residual_quantize, previous_code_only, contains="minus the previous level's code only")
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

    for wrong, says in ((even_ticks, "evenly from 0 to 1"), (over_s, "places scale k at k / num_scales"),
                        (rounded, "evenly from 0 to 1")):  # rounding k / (S-1) * (num_phi-1) picks such a tick
        assert_fails(ch01.phi_index, wrong, contains=says)

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
    assert_fails(ch01.multiscale_encode, lambda *a: _encode(*a, residual=False), contains="every scale codes f itself")
    assert_fails(ch01.multiscale_encode, lambda *a: _encode(*a, up="nearest"), contains="nearest-neighbour")
    assert_fails(ch01.multiscale_encode, lambda *a: _encode(*a, use_phi=False), contains="without being refined")
    assert_fails(ch01.multiscale_encode, lambda *a: _encode(*a, down="bilinear"),
                 contains="residual is shrunk with bilinear")
    assert_fails(ch01.multiscale_encode, lambda *a: _encode(*a, up="bilinear"),
                 contains="upsampled bilinearly, not bicubically")
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
    assert_fails(ch01.multiscale_decode, lambda *a: _decode(*a, use_phi=False), contains="without being refined")
    assert_fails(ch01.multiscale_decode, lambda *a: _decode(*a, up="bilinear"), contains="upsampled bilinearly")
    assert_fails(ch01.multiscale_decode, lambda *a: _decode(*a, last_only=True),
                 contains="last scale's contribution alone")
    assert_fails(ch01.multiscale_decode, lambda *a: _decode(*a, up="nearest"), contains="nearest-neighbour")


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

    assert_fails(ch01.teacher_forcing_inputs, same_scale, contains="takes the side of scale k+1")
    assert_fails(ch01.teacher_forcing_inputs, with_last, contains="items")
    assert_fails(ch01.teacher_forcing_inputs, current_scale_only, contains="scale k's contribution alone")
    assert_fails(ch01.teacher_forcing_inputs, bilinear_down, contains="f_hat is shrunk with bilinear")


# third audit: correct answers in other styles ---------------------------------------------------------------


def lookup_broadcast(z, codebook):
    return ((z[:, None] - codebook[None]) ** 2).sum(-1).argmin(1)


def lookup_cdist(z, codebook):
    return torch.cdist(z, codebook).argmin(dim=1)


def lookup_row_loop(z, codebook):
    return torch.stack([((codebook - v) ** 2).sum(1).argmin() for v in z])


def lookup_without_the_z_term(z, codebook):  # |z|^2 is the same for every code, so it can be left out
    return (0.5 * codebook.pow(2).sum(1) - z @ codebook.T).argmin(1)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, z_q):
        return z_q.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def ste_custom_function(z, z_q):
    return _StraightThrough.apply(z, z_q)


def ste_zq_plus_zero(z, z_q):
    return z_q.detach() + z - z.detach()


def ste_no_grad_difference(z, z_q):
    with torch.no_grad():
        shift = z_q - z
    return z + shift


def loss_sums_over_numel(z, z_q, beta=0.25):
    return ((z_q - z.detach()) ** 2).sum() / z.numel() + beta * ((z - z_q.detach()) ** 2).sum() / z.numel()


def loss_float64(z, z_q, beta=0.25):
    codebook = (z_q.double() - z.detach().double()).pow(2).mean()
    commitment = (z.double() - z_q.detach().double()).pow(2).mean()
    return (codebook + beta * commitment).to(z.dtype)


def loss_dot_products(z, z_q, beta=0.25):
    a, b = z_q.flatten() - z.flatten().detach(), z.flatten() - z_q.flatten().detach()
    return torch.dot(a, a) / a.numel() + beta * torch.dot(b, b) / b.numel()


def usage_unique(indices, num_codes):
    _, counts = torch.unique(indices, return_counts=True)
    p = counts.double() / counts.sum()
    return len(counts) / num_codes, math.exp(-(p * p.log()).sum().item())


def usage_counter(indices, num_codes):
    counts = collections.Counter(indices.flatten().tolist())
    n = sum(counts.values())
    return len(counts) / num_codes, math.exp(-sum(c / n * math.log(c / n) for c in counts.values()))


def usage_numpy(indices, num_codes):
    counts = np.bincount(indices.reshape(-1).numpy(), minlength=num_codes)
    p = counts[counts > 0] / counts.sum()
    return np.count_nonzero(counts) / num_codes, np.exp(-(p * np.log(p)).sum())  # NumPy floats are numbers too


def usage_xlogy(indices, num_codes):
    p = torch.bincount(indices.flatten(), minlength=num_codes).float()
    p = p / p.sum()
    return (p > 0).float().mean().item(), torch.exp(-torch.special.xlogy(p, p).sum()).item()


def restart_loop(codebook, counts, candidates, threshold=1.0):
    new, dead, j = codebook.clone(), counts < threshold, 0
    for k in range(len(counts)):
        if dead[k]:
            new[k], j = candidates[j % len(candidates)], j + 1
    return new, dead


def restart_cumsum_where(codebook, counts, candidates, threshold=1.0):
    dead = counts < threshold
    order = (dead.long().cumsum(0) - 1).clamp_min(0) % candidates.shape[0]  # j for the j-th dead code
    return torch.where(dead[:, None], candidates[order], codebook), dead


def restart_index_copy(codebook, counts, candidates, threshold=1.0):
    dead = counts.lt(threshold)
    rows = dead.nonzero().squeeze(1)
    repeats = max(1, -(-len(rows) // len(candidates)))
    return codebook.index_copy(0, rows, candidates.repeat(repeats, 1)[: len(rows)]), dead


def ema_bincount_index_add(cluster_size, embed_sum, z, indices, decay=0.99, eps=1e-5):
    K = cluster_size.numel()
    N = decay * cluster_size + (1 - decay) * torch.bincount(indices, minlength=K)
    m = decay * embed_sum + (1 - decay) * torch.zeros_like(embed_sum).index_add_(0, indices, z)
    n = N.sum()
    return N, m, m / ((N + eps) / (n + K * eps) * n).unsqueeze(1)


def ema_scatter_lerp(cluster_size, embed_sum, z, indices, decay=0.99, eps=1e-5):
    K, D = embed_sum.shape
    counts = torch.zeros_like(cluster_size).scatter_add_(0, indices, torch.ones_like(indices, dtype=z.dtype))
    sums = torch.zeros_like(embed_sum).scatter_add_(0, indices[:, None].expand(-1, D), z)
    N, m = torch.lerp(counts, cluster_size, decay), torch.lerp(sums, embed_sum, decay)
    n = N.sum()
    return N, m, m / ((N + eps) / (n + K * eps) * n)[:, None]


def ema_float64(cluster_size, embed_sum, z, indices, decay=0.99, eps=1e-5):
    K = cluster_size.shape[0]
    onehot = F.one_hot(indices, K).double()
    N = decay * cluster_size.double() + (1 - decay) * onehot.sum(0)
    m = decay * embed_sum.double() + (1 - decay) * onehot.T @ z.double()
    n = N.sum()
    return N.float(), m.float(), (m / ((N + eps) / (n + K * eps) * n)[:, None]).float()


def rq_running_residual(z, codebooks):
    rest, levels = z.clone(), []
    for codebook in codebooks:
        idx = ref.vq_lookup(rest, codebook)
        rest = rest - codebook[idx]
        levels.append(idx)
    return torch.stack(levels, -1), z - rest


def rq_cat_columns(z, codebooks):
    rest, z_hat, levels = z, torch.zeros_like(z), []
    for d in range(codebooks.shape[0]):
        idx = ref.vq_lookup(rest, codebooks[d])
        code = codebooks[d][idx]
        levels.append(idx[:, None])
        z_hat, rest = z_hat + code, rest - code
    return torch.cat(levels, 1), z_hat


def rq_own_lookup_embedding(z, codebooks):
    z_hat, levels = torch.zeros_like(z), []
    for codebook in codebooks:
        idx = torch.cdist(z - z_hat, codebook).argmin(1)
        z_hat = z_hat + F.embedding(idx, codebook)
        levels.append(idx)
    return torch.stack(levels, 1), z_hat


def phi_python_min(k, num_scales, num_phi):
    at = k / (num_scales - 1) if num_scales > 1 else 0
    m = 1 / (3 * num_phi)
    ticks = [m + i * (1 - 2 * m) / (num_phi - 1) if num_phi > 1 else 0.5 for i in range(num_phi)]
    return min(range(num_phi), key=lambda i: abs(ticks[i] - at))


def phi_numpy_float32(k, num_scales, num_phi):
    at = np.float32(k / (num_scales - 1) if num_scales > 1 else 0)
    m = 1 / (3 * num_phi)
    return np.int64(np.abs(np.linspace(m, 1 - m, num_phi, dtype=np.float32) - at).argmin())


def phi_rounded_formula(k, num_scales, num_phi):
    if num_phi == 1:
        return 0
    at = k / (num_scales - 1) if num_scales > 1 else 0.0
    m = 1 / (3 * num_phi)
    return min(max(round((at - m) * (num_phi - 1) / (1 - 2 * m)), 0), num_phi - 1)


def encode_always_resample(f, codebook, scales, phis):  # resampling to the same size changes nothing
    B, C, H, W = f.shape
    f_hat, out = torch.zeros_like(f), []
    for s, phi in zip(scales, phis):
        rest = F.adaptive_avg_pool2d(f - f_hat, s)
        idx = ref.vq_lookup(rest.permute(0, 2, 3, 1).reshape(-1, C), codebook).reshape(B, s, s)
        up = F.interpolate(F.embedding(idx, codebook).permute(0, 3, 1, 2), size=(H, W), mode="bicubic")
        f_hat = f_hat + phi(up)
        out.append(idx)
    return out


def encode_running_residual(f, codebook, scales, phis):
    B, C, H, _ = f.shape
    rest, out = f.clone(), []
    for s, phi in zip(scales, phis):
        small = F.interpolate(rest, size=(s, s), mode="area") if s != H else rest
        idx = torch.cdist(small.movedim(1, -1).flatten(0, 2), codebook).argmin(1).view(B, s, s)
        h = codebook[idx].movedim(-1, 1)
        rest = rest - phi(F.interpolate(h, size=(H, H), mode="bicubic") if s != H else h)
        out.append(idx)
    return out


def decode_sum_generator(indices, codebook, phis):
    H = indices[-1].shape[-1]
    return sum(phi(F.interpolate(F.embedding(i, codebook).permute(0, 3, 1, 2), size=(H, H), mode="bicubic"))
               for i, phi in zip(indices, phis))


def decode_one_hot_stack(indices, codebook, phis):
    H = indices[-1].shape[-1]
    parts = [phi(F.interpolate(torch.einsum("bhwk,kc->bchw", F.one_hot(i, len(codebook)).to(codebook.dtype),
                                            codebook), size=(H, H), mode="bicubic"))
             for i, phi in zip(indices, phis)]
    return torch.stack(parts).sum(0)


def teacher_forcing_adaptive_pool(indices, codebook, phis, device_of_inputs=True):
    H, out = indices[-1].shape[-1], []
    f_hat = torch.zeros(indices[0].shape[0], codebook.shape[1], H, H,
                        device=codebook.device if device_of_inputs else None)  # else on the CPU: wrong on a GPU
    for k in range(len(indices) - 1):
        f_hat = f_hat + phis[k](F.interpolate(codebook[indices[k]].permute(0, 3, 1, 2), size=(H, H),
                                              mode="bicubic"))
        out.append(F.adaptive_avg_pool2d(f_hat, indices[k + 1].shape[-1]))
    return out


def teacher_forcing_partial_sums(indices, codebook, phis):  # each input summed afresh from scales 0..k
    H = indices[-1].shape[-1]
    parts = [phi(F.interpolate(codebook[i].permute(0, 3, 1, 2), size=(H, H), mode="bicubic"))
             for i, phi in zip(indices, phis)]
    return [F.interpolate(sum(parts[: k + 1]), size=(i.shape[-1],) * 2, mode="area") for k, i in enumerate(indices[1:])]


@pytest.mark.parametrize("name, right", [
    ("vq_lookup", lookup_broadcast), ("vq_lookup", lookup_cdist), ("vq_lookup", lookup_row_loop),
    ("vq_lookup", lookup_without_the_z_term),
    ("straight_through", ste_custom_function), ("straight_through", ste_zq_plus_zero),
    ("straight_through", ste_no_grad_difference),
    ("vq_loss", loss_sums_over_numel), ("vq_loss", loss_float64), ("vq_loss", loss_dot_products),
    ("codebook_usage", usage_unique), ("codebook_usage", usage_counter), ("codebook_usage", usage_numpy),
    ("codebook_usage", usage_xlogy),
    ("dead_code_restart", restart_loop), ("dead_code_restart", restart_cumsum_where),
    ("dead_code_restart", restart_index_copy),
    ("ema_update", ema_bincount_index_add), ("ema_update", ema_scatter_lerp), ("ema_update", ema_float64),
    ("residual_quantize", rq_running_residual), ("residual_quantize", rq_cat_columns),
    ("residual_quantize", rq_own_lookup_embedding),
    ("phi_index", phi_python_min), ("phi_index", phi_numpy_float32), ("phi_index", phi_rounded_formula),
    ("multiscale_encode", encode_always_resample), ("multiscale_encode", encode_running_residual),
    ("multiscale_decode", decode_sum_generator), ("multiscale_decode", decode_one_hot_stack),
    ("teacher_forcing_inputs", teacher_forcing_adaptive_pool), ("teacher_forcing_inputs", teacher_forcing_partial_sums),
], ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_correct_answers_in_other_styles_pass(name, right):
    assert_passes(getattr(ch01, name), right)


# tensors made on the CPU inside a function fed tensors elsewhere: the checks run each once off the CPU ---------


def ema_sums_on_cpu(cluster_size, embed_sum, z, indices, decay=0.99, eps=1e-5):
    K, D = embed_sum.shape
    counts = torch.zeros(K).index_add_(0, indices, torch.ones(len(indices)))  # (K,) on the CPU
    sums = torch.zeros(K, D).index_add_(0, indices, z)  # (K, D) on the CPU
    N = decay * cluster_size + (1 - decay) * counts
    m = decay * embed_sum + (1 - decay) * sums
    return N, m, m / ((N + eps) / (N.sum() + K * eps) * N.sum())[:, None]


def residual_zeros_on_cpu(z, codebooks):
    z_hat, indices = torch.zeros(z.shape), []  # z_hat on the CPU
    for codebook in codebooks:
        idx = ref.vq_lookup(z - z_hat, codebook)
        z_hat = z_hat + codebook[idx]
        indices.append(idx)
    return torch.stack(indices, 1), z_hat


def test_tensors_made_on_the_cpu_are_caught():
    assert_fails(ch01.ema_update, ema_sums_on_cpu, contains="mixed devices")
    assert_fails(ch01.residual_quantize, residual_zeros_on_cpu, contains="mixed devices")
    assert_fails(ch01.teacher_forcing_inputs,
                 lambda indices, codebook, phis: teacher_forcing_adaptive_pool(indices, codebook, phis, False),
                 contains="mixed devices")
