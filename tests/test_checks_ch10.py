"""Chapter 10 checks: each accepts the reference, reports a stub as not attempted, and rejects plausible wrong answers
(rounding without a straight-through gradient, float32 codes for float64 input, a missing even-level offset, a reversed
or truncated mixed radix, swapped, base-2 or NaN entropies, straight-through in place of the rotation trick or a
gradient to the code, a code detached in place, a time broadcast along the channels, a reversed flow, a velocity read at
the data, a loss summed over the channels or detached from the head, late Euler steps, times from a float arange, steps
that overwrite the noise, guidance mixed the wrong way or on the conditions, two head calls per step where one batched
call does...)."""

import math

import torch
import torch.nn.functional as F

from ar_course.checks import ch10
from ar_course.checks.reference import ch10 as answers
from ar_course.continuous import functional as C
from ar_course.tokenizers import functional as Fq
from checks_helpers import assert_fails, assert_not_attempted, assert_passes, stub

# 10.1 ------------------------------------------------------------------------------------------------------


def fsq_round_only(z, levels):
    width = torch.tensor([n // 2 for n in levels], dtype=z.dtype)
    return Fq.fsq_bound(z, levels).round() / width


def fsq_st_on_z(z, levels):
    return z + (Fq.fsq_quantize(z, levels) - z).detach()


def fsq_clamp(z, levels):
    half = torch.tensor([(n - 1) / 2 for n in levels], dtype=z.dtype)
    b = torch.maximum(torch.minimum(z * half, half), -half)
    r = b + (b.round() - b).detach()
    return r / torch.tensor([n // 2 for n in levels], dtype=z.dtype)


def fsq_integers(z, levels):
    b = Fq.fsq_bound(z, levels)
    return b + (b.round() - b).detach()


def fsq_float32(z, levels):
    b = Fq.fsq_bound(z, levels)
    r = b + (b.round() - b).detach()
    return (r / torch.tensor([n // 2 for n in levels])).float()  # float64 input comes back as float32


def fsq_half_range(z, levels):  # divided by (L - 1) / 2: the same for odd levels, off the grid for even ones
    b = Fq.fsq_bound(z, levels)
    r = b + (b.round() - b).detach()
    return r / torch.tensor([(n - 1) / 2 for n in levels], dtype=z.dtype)


def test_10_1():
    check = ch10.fsq_quantize
    assert_passes(check, Fq.fsq_quantize)
    assert_not_attempted(check, stub)
    for wrong in (fsq_round_only, fsq_st_on_z, fsq_clamp, fsq_integers):
        assert_fails(check, wrong)
    assert_fails(check, fsq_round_only, contains="straight-through")
    assert_fails(check, fsq_integers, contains="divide dimension i")
    assert_fails(check, fsq_clamp, contains="hard clamp instead of fsq_bound's tanh")
    assert_fails(check, fsq_half_range, contains="divided by (L_i - 1) / 2")
    assert_fails(check, fsq_float32, contains="dtype torch.float32, expected torch.float64")


# 10.2 ------------------------------------------------------------------------------------------------------


def index_high_first(codes, levels):
    return Fq.fsq_codes_to_indices(codes.flip(-1), tuple(reversed(levels)))


def index_unshifted(codes, levels):
    width = torch.tensor([n // 2 for n in levels], dtype=codes.dtype)
    basis = torch.cumprod(torch.tensor((1,) + tuple(levels[:-1])), 0)
    return ((codes * width).round().long() * basis).sum(-1)


def index_truncates(codes, levels):
    width = torch.tensor([n // 2 for n in levels], dtype=codes.dtype)
    basis = torch.cumprod(torch.tensor((1,) + tuple(levels[:-1])), 0)
    return ((codes * width + width).long() * basis).sum(-1)  # float error: 2.9999 -> 2


def index_cumprod_inclusive(codes, levels):
    width = torch.tensor([n // 2 for n in levels], dtype=codes.dtype)
    basis = torch.cumprod(torch.tensor(levels), 0)
    return ((codes * width + width).round().long() * basis).sum(-1)


def index_floors(codes, levels):
    width = torch.tensor([n // 2 for n in levels], dtype=codes.dtype)
    basis = torch.cumprod(torch.tensor((1,) + tuple(levels[:-1])), 0)
    return ((codes * width + width).floor().long() * basis).sum(-1)


def test_10_2():
    check = ch10.fsq_codes_to_indices
    assert_passes(check, Fq.fsq_codes_to_indices)
    assert_not_attempted(check, stub)
    for wrong in (index_high_first, index_unshifted, index_cumprod_inclusive, index_truncates, index_floors):
        assert_fails(check, wrong)
    assert_fails(check, index_high_first, contains="wrong order")
    assert_fails(check, index_unshifted, contains="negative")
    assert_fails(check, index_truncates, contains="truncated")  # codes a little off the grid
    assert_fails(check, index_floors, contains="floored")
    assert_fails(check, index_cumprod_inclusive, contains="inclusive cumulative product")


# 10.3 ------------------------------------------------------------------------------------------------------


def entropy_swapped(z, temperature=0.01):
    a, b = answers.lfq_entropy_terms(z, temperature)
    return b, a


def entropy_log2(z, temperature=0.01):
    a, b = answers.lfq_entropy_terms(z, temperature)
    return a / torch.log(torch.tensor(2.0)), b / torch.log(torch.tensor(2.0))


def entropy_no_temperature(z, temperature=0.01):
    return answers.lfq_entropy_terms(z, 1.0)


def entropy_avg_of_entropies(z, temperature=0.01):
    a, _ = answers.lfq_entropy_terms(z, temperature)
    return a, a


def entropy_log_of_zero(z, temperature=0.01):
    d = z.shape[1]
    codes = Fq.lfq_indices_to_codes(torch.arange(2**d), d, z.dtype)
    p = torch.softmax(-torch.cdist(z, codes).pow(2) / temperature, dim=1)  # underflows to 0 for far codes
    q = p.mean(0)
    return -(p * p.log()).sum(1).mean(), -(q * q.log()).sum()


def entropy_times_temperature(z, temperature=0.01):  # -dist * temperature
    return answers.lfq_entropy_terms(z, 1 / temperature)


def test_10_3():
    check = ch10.lfq_entropy_terms
    assert_passes(check, answers.lfq_entropy_terms)
    assert_passes(check, Fq.lfq_entropy_terms)  # the library's factorised form gives the same numbers
    assert_not_attempted(check, stub)
    for wrong in (entropy_swapped, entropy_log2, entropy_no_temperature, entropy_avg_of_entropies,
                  entropy_log_of_zero):
        assert_fails(check, wrong)
    assert_fails(check, entropy_swapped, contains="swapped")
    assert_fails(check, entropy_log2, contains="bits")
    assert_fails(check, entropy_log_of_zero, contains="0 * log 0")
    assert_fails(check, entropy_no_temperature, contains="temperature was left out")
    assert_fails(check, entropy_times_temperature, contains="multiplied by the temperature")


# 10.4 ------------------------------------------------------------------------------------------------------


def rotation_straight_through(z, z_q):
    return z + (z_q - z).detach()


def rotation_not_detached(z, z_q):
    u, q = F.normalize(z, dim=1), F.normalize(z_q, dim=1)  # R and lambda built with gradients
    r = F.normalize(u + q, dim=1)
    lam = z_q.norm(dim=1, keepdim=True) / z.norm(dim=1, keepdim=True)
    moved = lam * (z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * q * (u * z).sum(1, keepdim=True))
    return z_q.detach() + (moved - moved.detach())


def rotation_transposed(z, z_q):
    with torch.no_grad():  # R^T = I - 2 r r^T + 2 u q^T: the rotation from z_q's direction back to z's
        u, q = F.normalize(z, dim=1), F.normalize(z_q, dim=1)
        r = F.normalize(u + q, dim=1)
        lam = z_q.norm(dim=1, keepdim=True) / z.norm(dim=1, keepdim=True)
    moved = lam * (z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * u * (q * z).sum(1, keepdim=True))
    return z_q.detach() + (moved - moved.detach())


def rotation_unscaled(z, z_q):
    with torch.no_grad():
        u, q = F.normalize(z, dim=1), F.normalize(z_q, dim=1)
        r = F.normalize(u + q, dim=1)
    moved = z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * q * (u * z).sum(1, keepdim=True)
    return z_q.detach() + (moved - moved.detach())


def rotation_code_not_detached(z, z_q):
    with torch.no_grad():
        u, q = F.normalize(z, dim=1), F.normalize(z_q, dim=1)
        r = F.normalize(u + q, dim=1)
        lam = z_q.norm(dim=1, keepdim=True) / z.norm(dim=1, keepdim=True)
    moved = lam * (z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * q * (u * z).sum(1, keepdim=True))
    return z_q + (moved - moved.detach())  # the decoder's gradient also reaches the code


def rotation_moves_code_too(z, z_q):
    return Fq.rotation_trick(z, z_q.detach()) + (z_q - z_q.detach())


def rotation_detaches_code_in_place(z, z_q):
    return Fq.rotation_trick(z, z_q.detach_())  # the caller's z_q loses its codebook gradient


def test_10_4():
    check = ch10.rotation_trick
    assert_passes(check, Fq.rotation_trick)
    assert_not_attempted(check, stub)
    for wrong in (rotation_straight_through, rotation_not_detached, rotation_transposed, rotation_unscaled):
        assert_fails(check, wrong)
    assert_fails(check, rotation_straight_through, contains="straight-through estimator")
    assert_fails(check, rotation_unscaled, contains="rescaling")
    assert_fails(check, rotation_not_detached, contains="constants")
    assert_fails(check, rotation_transposed, contains="rotation is transposed")
    assert_fails(check, rotation_code_not_detached, contains="reaches z_q")
    assert_fails(check, rotation_moves_code_too, contains="reaches z_q")
    assert_fails(check, rotation_detaches_code_in_place, contains="detached its argument `z_q` in place")


# 10.5 ------------------------------------------------------------------------------------------------------


def loss_t_on_channels(velocity, x1, x0, t):
    x_t = (1 - t) * x0 + t * x1  # t (N,) lines up with the channels; no error when N == D
    return (velocity(x_t, t) - (x1 - x0)).pow(2).mean()


def loss_reversed_velocity(velocity, x1, x0, t):
    tt = t[:, None]
    return (velocity((1 - tt) * x0 + tt * x1, t) - (x0 - x1)).pow(2).mean()


def loss_reversed_mix(velocity, x1, x0, t):
    tt = t[:, None]
    return (velocity(tt * x0 + (1 - tt) * x1, t) - (x1 - x0)).pow(2).mean()


def loss_data_target(velocity, x1, x0, t):
    tt = t[:, None]
    return (velocity((1 - tt) * x0 + tt * x1, t) - x1).pow(2).mean()


def loss_velocity_at_data(velocity, x1, x0, t):
    return (velocity(x1, t) - (x1 - x0)).pow(2).mean()


def loss_noise_level_time(velocity, x1, x0, t):
    tt = t[:, None]
    return (velocity((1 - tt) * x0 + tt * x1, 1 - t) - (x1 - x0)).pow(2).mean()


def loss_summed_channels(velocity, x1, x0, t):
    tt = t[:, None]
    return (velocity((1 - tt) * x0 + tt * x1, t) - (x1 - x0)).pow(2).sum(-1).mean()


def loss_time_column(velocity, x1, x0, t):
    tt = t[:, None]
    return (velocity((1 - tt) * x0 + tt * x1, tt) - (x1 - x0)).pow(2).mean()  # the head gets t as (N, 1)


def loss_detached(velocity, x1, x0, t):
    tt = t[:, None]
    return (velocity((1 - tt) * x0 + tt * x1, t).detach() - (x1 - x0)).pow(2).mean()


def loss_under_no_grad(velocity, x1, x0, t):
    with torch.no_grad():
        return answers.flow_matching_loss(velocity, x1, x0, t)


def test_10_5():
    check = ch10.flow_matching_loss
    assert_passes(check, answers.flow_matching_loss)
    assert_passes(check, lambda velocity, x1, x0, t: F.mse_loss(velocity(x0 + t.view(-1, 1) * (x1 - x0), t), x1 - x0))
    assert_not_attempted(check, stub)
    assert_fails(check, loss_t_on_channels, contains="broadcast along the channels")
    assert_fails(check, loss_reversed_velocity, contains="from the data to the noise")
    assert_fails(check, loss_reversed_mix, contains="wrong way round")
    assert_fails(check, loss_data_target, contains="the data itself")
    assert_fails(check, loss_velocity_at_data, contains="read at the data x1")
    assert_fails(check, loss_noise_level_time, contains="given 1 - t")
    assert_fails(check, loss_summed_channels, contains="summed over the channels")
    assert_fails(check, loss_time_column, contains="takes t as a (8,) tensor")
    assert_fails(check, loss_detached, contains="no gradient reaches the velocity")
    assert_fails(check, loss_under_no_grad, contains="no gradient reaches the velocity")


# 10.6 ------------------------------------------------------------------------------------------------------


def _guided(head, x, t, cond, uncond, w):
    if w == 0:
        return head(x, t, cond)
    v_c, v_u = head(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
    return (1 + w) * v_c - w * v_u


def sample_late(head, x0, cond, uncond, steps, *, w):
    x = x0
    for i in range(steps):
        x = x + _guided(head, x, torch.full((len(x),), (i + 1) / steps), cond, uncond, w) / steps
    return x


def sample_whole_velocity(head, x0, cond, uncond, steps, *, w):
    x = x0
    for i in range(steps):
        x = x + _guided(head, x, torch.full((len(x),), i / steps), cond, uncond, w)
    return x


def sample_time_zero(head, x0, cond, uncond, steps, *, w):
    x = x0
    for _ in range(steps):
        x = x + _guided(head, x, torch.zeros(len(x)), cond, uncond, w) / steps
    return x


def sample_in_place(head, x0, cond, uncond, steps, *, w):
    x = x0
    for i in range(steps):
        x += _guided(head, x, torch.full((len(x),), i / steps), cond, uncond, w) / steps  # x is x0
    return x


def sample_swapped(head, x0, cond, uncond, steps, *, w):
    return C.euler_sample(lambda x, t: _guided(head, x, t, uncond, cond, w), x0, steps)


def sample_scale_convention(head, x0, cond, uncond, steps, *, w):
    def velocity(x, t):
        v_u = head(x, t, uncond)
        return v_u + w * (head(x, t, cond) - v_u)
    return C.euler_sample(velocity, x0, steps)


def sample_mixed_conditions(head, x0, cond, uncond, steps, *, w):
    return C.euler_sample(lambda x, t: head(x, t, (1 + w) * cond - w * uncond), x0, steps)


def sample_two_calls(head, x0, cond, uncond, steps, *, w):
    return C.euler_sample(lambda x, t: (1 + w) * head(x, t, cond) - w * head(x, t, uncond), x0, steps)


def sample_always_doubled(head, x0, cond, uncond, steps, *, w):
    return C.euler_sample(lambda x, t: C.guided_velocity(head, x, t, cond, uncond, w=w), x0, steps)


def sample_time_column(head, x0, cond, uncond, steps, *, w):
    x = x0
    for i in range(steps):
        x = x + _guided(head, x, torch.full((len(x), 1), i / steps), cond, uncond, w) / steps
    return x


def sample_float_range(head, x0, cond, uncond, steps, *, w):
    x = x0
    for t in torch.arange(0, 1, 1 / steps):  # 50 times for 49 steps
        x = x + _guided(head, x, t.expand(len(x)), cond, uncond, w) / steps
    return x


def sample_linspace_times(head, x0, cond, uncond, steps, *, w):  # the interval starts, from a linspace: right
    x = x0
    for t in torch.linspace(0, 1, steps + 1)[:-1]:
        x = x + _guided(head, x, t.expand(len(x)), cond, uncond, w) / steps
    return x


def sample_linspace_to_one(head, x0, cond, uncond, steps, *, w):  # times i / (steps - 1): the last step at t = 1
    x = x0
    for t in torch.linspace(0, 1, steps):
        x = x + _guided(head, x, t.expand(len(x)), cond, uncond, w) / steps
    return x


def sample_skips_negative_guidance(head, x0, cond, uncond, steps, *, w):  # w <= 0 taken as plain sampling
    x = x0
    for i in range(steps):
        t = torch.full((len(x),), i / steps)
        x = x + (head(x, t, cond) if w <= 0 else _guided(head, x, t, cond, uncond, w)) / steps
    return x


def test_10_6_tells_skipped_negative_guidance_from_swapped_velocities():
    check = ch10.guided_euler_sample
    message = assert_fails(check, sample_skips_negative_guidance, contains="skipped for a negative w")
    assert "swapped" not in message and "w = -1" in message
    message = assert_fails(check, sample_swapped, contains="the two velocities are swapped")
    assert "skipped" not in message


def test_10_6():
    check = ch10.guided_euler_sample
    assert_passes(check, answers.guided_euler_sample)
    assert_passes(check, sample_linspace_times)
    assert_not_attempted(check, stub)
    assert_fails(check, sample_late, contains="end of its interval")
    assert_fails(check, sample_whole_velocity, contains="dt = 1 / steps")
    assert_fails(check, sample_time_zero, contains="velocity at t = 0")
    assert_fails(check, sample_linspace_to_one, contains="torch.linspace(0, 1, steps)")
    assert_fails(check, sample_swapped, contains="swapped")
    assert_fails(check, sample_scale_convention, contains="'scale' convention")
    assert_fails(check, sample_mixed_conditions, contains="mixes the conditions")
    assert_fails(check, sample_in_place, contains="changed its argument `x0` in place")
    assert_fails(check, sample_two_calls, contains="one batched call")
    assert_fails(check, sample_always_doubled, contains="at w = 0")
    assert_fails(check, sample_time_column, contains="t (R,)")
    assert_fails(check, sample_float_range, contains="torch.arange")


# right answers written in other styles than the reference: each must pass ------------------------------------


class _RoundStraightThrough(torch.autograd.Function):
    """round() forward, the identity backward."""

    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, grad):
        return grad


def fsq_per_dimension(z, levels):  # one dimension at a time, divided by a Python int, stacked
    b = Fq.fsq_bound(z, levels)
    r = b + (b.round() - b).detach()
    return torch.stack([r[..., i] / (n // 2) for i, n in enumerate(levels)], -1)


def fsq_autograd_function(z, levels):  # a custom straight-through Function; integer widths
    return _RoundStraightThrough.apply(Fq.fsq_bound(z, levels)) / (torch.tensor(levels) // 2)


def fsq_own_bound(z, levels):  # the bound written out from its formula, in a loop
    out = []
    for i, n in enumerate(levels):
        half, offset = (n - 1) * (1 + 1e-3) / 2, 0.5 if n % 2 == 0 else 0.0
        b = torch.tanh(z[..., i] + math.atanh(offset / half)) * half - offset
        out.append((b + (torch.round(b) - b).detach()) / (n // 2))
    return torch.stack(out, -1)


def test_10_1_other_styles():
    for right in (fsq_per_dimension, fsq_autograd_function, fsq_own_bound):
        assert_passes(ch10.fsq_quantize, right)


def index_by_loop(codes, levels):
    idx, place = torch.zeros(codes.shape[:-1], dtype=torch.long), 1
    for i, n in enumerate(levels):
        idx = idx + torch.round(codes[..., i] * (n // 2) + n // 2).long() * place
        place *= n
    return idx


def index_by_horner(codes, levels):  # from the highest digit down; nearest integer as floor(v + 0.5)
    idx = torch.zeros(codes.shape[:-1], dtype=torch.long)
    for i in reversed(range(len(levels))):
        n = levels[i]
        idx = idx * n + (codes[..., i] * (n // 2) + n // 2 + 0.5).floor().long()
    return idx


def index_by_float_matmul(codes, levels):  # float digits times float place values, cast at the end
    width = torch.tensor([n // 2 for n in levels], dtype=codes.dtype)
    places = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=codes.dtype)
    return ((codes * width + width).round() @ places).long()


def test_10_2_other_styles():
    for right in (index_by_loop, index_by_horner, index_by_float_matmul):
        assert_passes(ch10.fsq_codes_to_indices, right)


def _sign_codes(z):
    return Fq.lfq_indices_to_codes(torch.arange(2 ** z.shape[1]), z.shape[1], z.dtype)


def entropy_cdist_logsumexp(z, temperature=0.01):  # xlogy: right values, nan gradient where q = 0
    logits = -torch.cdist(z, _sign_codes(z)).pow(2) / temperature
    logp = logits - torch.logsumexp(logits, 1, keepdim=True)
    q = logp.exp().mean(0)
    return -(logp.exp() * logp).sum(1).mean(), -torch.special.xlogy(q, q).sum()


def entropy_categorical(z, temperature=0.01):
    dist = torch.distributions.Categorical(logits=-((z[:, None] - _sign_codes(z)[None]) ** 2).sum(-1) / temperature)
    return dist.entropy().mean(), torch.distributions.Categorical(probs=dist.probs.mean(0)).entropy()


def entropy_dot_products(z, temperature=0.01):  # softmax of 2 z.c (|z|^2 and d cancel); entr: nan gradient at p = 0
    p = torch.softmax(2 * z @ _sign_codes(z).T / temperature, 1)
    return torch.special.entr(p).sum(1).mean(), torch.special.entr(p.mean(0)).sum()


def entropy_in_float64(z, temperature=0.01):
    per_sample, codebook = answers.lfq_entropy_terms(z.double(), temperature)
    return per_sample.to(z.dtype), codebook.to(z.dtype)


def entropy_no_grad(z, temperature=0.01):
    with torch.no_grad():
        return answers.lfq_entropy_terms(z, temperature)


def test_10_3_other_styles():
    for right in (entropy_categorical, entropy_in_float64):
        assert_passes(ch10.lfq_entropy_terms, right)
    # right values, but xlogy / entr differentiate to 0 * (-inf) = nan where a probability is exactly 0
    for nan_gradient in (entropy_cdist_logsumexp, entropy_dot_products):
        assert_fails(ch10.lfq_entropy_terms, nan_gradient, contains="with respect to z is not finite")
    assert_fails(ch10.lfq_entropy_terms, entropy_no_grad, contains="carries no gradient back to z")


def entropy_coarse_clamp(z, temperature=0.01):  # log clamped at 1e-3; with 2^16 codes every q is ~1.5e-5
    p = torch.softmax(-(z[:, None] - _sign_codes(z)[None]).pow(2).sum(-1) / temperature, 1)
    q = p.mean(0)
    return -(p * p.clamp_min(1e-3).log()).sum(1).mean(), -(q * q.clamp_min(1e-3).log()).sum()


def test_10_3_rejects_an_entropy_with_a_coarse_log_clamp():
    """10.3's tolerance is tight enough for an entropy whose log is clamped too coarsely (the codebook entropy of
    LFQ's 2^16 codes is then badly biased)."""
    assert_fails(ch10.lfq_entropy_terms, entropy_coarse_clamp)


def rotation_by_matrix(z, z_q):  # R built as a (N, D, D) matrix
    with torch.no_grad():
        u, q = z / z.norm(dim=1, keepdim=True), z_q / z_q.norm(dim=1, keepdim=True)
        r = (u + q) / (u + q).norm(dim=1, keepdim=True)
        R = torch.eye(z.shape[1]) - 2 * torch.einsum("ni,nj->nij", r, r) + 2 * torch.einsum("ni,nj->nij", q, u)
        lam = z_q.norm(dim=1) / z.norm(dim=1)
    moved = lam[:, None] * torch.einsum("nij,nj->ni", R, z)
    return moved + (z_q - moved).detach()


def rotation_by_detach(z, z_q):  # constants by .detach() instead of torch.no_grad()
    zd, qd = z.detach(), z_q.detach()
    u, q = F.normalize(zd, dim=1), F.normalize(qd, dim=1)
    r = F.normalize(u + q, dim=1)
    moved = qd.norm(dim=1, keepdim=True) / zd.norm(dim=1, keepdim=True) * (
        z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * q * (u * z).sum(1, keepdim=True))
    return moved - moved.detach() + qd


def rotation_by_row(z, z_q):
    out = []
    for zi, qi in zip(z, z_q):
        with torch.no_grad():
            u, q = zi / zi.norm(), qi / qi.norm()
            r = (u + q) / (u + q).norm()
            lam = qi.norm() / zi.norm()
        moved = lam * (zi - 2 * r * torch.dot(r, zi) + 2 * q * torch.dot(u, zi))
        out.append(qi.detach() + moved - moved.detach())
    return torch.stack(out)


def test_10_4_other_styles():
    for right in (rotation_by_matrix, rotation_by_detach, rotation_by_row):
        assert_passes(ch10.rotation_trick, right)


def loss_lerp_mse(velocity, x1, x0, t):
    return F.mse_loss(velocity(torch.lerp(x0, x1, t[:, None]), t), x1 - x0)


def loss_view_mean_of_means(velocity, x1, x0, t):
    x_t = x0 + t.view(-1, 1) * (x1 - x0)
    return ((velocity(x_t, t) - (x1 - x0)) ** 2).mean(-1).mean()


def loss_einsum_sum_over_count(velocity, x1, x0, t):
    err = velocity(torch.einsum("n,nd->nd", 1 - t, x0) + torch.einsum("n,nd->nd", t, x1), t) - x1 + x0
    return (err * err).sum() / err.numel()


def test_10_5_other_styles():
    for right in (loss_lerp_mse, loss_view_mean_of_means, loss_einsum_sum_over_count):
        assert_passes(ch10.flow_matching_loss, right)


def loss_value_rewrapped(velocity, x1, x0, t):  # the right value in a fresh leaf: no gradient to the weights
    return answers.flow_matching_loss(velocity, x1, x0, t).detach().requires_grad_()


def loss_half_gradient(velocity, x1, x0, t):  # the right value, half the gradient
    tt = t[:, None]
    err = velocity((1 - tt) * x0 + tt * x1, t) - (x1 - x0)
    return (err * err.detach()).mean()


def test_10_5_compares_the_gradient_to_the_weights():
    """10.5 compares the gradient that reaches the velocity's weights with the reference's, not only the loss
    value: the right value with half the gradient, or with none, fails."""
    assert_fails(ch10.flow_matching_loss, loss_half_gradient, contains="gradient")
    assert_fails(ch10.flow_matching_loss, loss_value_rewrapped)


def sample_repeat_and_slices(head, x0, cond, uncond, steps, *, w):  # times from a linspace; rows by repeat and slices
    x, n = x0, len(x0)
    for t in torch.linspace(0, 1, steps + 1, dtype=x0.dtype)[:-1]:
        tt = t.repeat(n)
        if w == 0:
            v = head(x, tt, cond)
        else:
            both = head(x.repeat(2, 1), tt.repeat(2), torch.cat([cond, uncond]))
            v = (1 + w) * both[:n] - w * both[n:]
        x = x + v * (1.0 / steps)
    return x


def sample_in_place_on_a_copy(head, x0, cond, uncond, steps, *, w):  # x += on a clone; time accumulated by dt
    x, t, dt = x0.clone(), 0.0, 1.0 / steps
    for _ in range(steps):
        tt = torch.full_like(x[:, 0], t)
        if w == 0:
            v = head(x, tt, cond)
        else:
            v_c, v_u = torch.chunk(head(torch.cat((x, x)), torch.cat((tt, tt)), torch.cat((cond, uncond))), 2)
            v = v_c + w * (v_c - v_u)
        x += dt * v
        t += dt
    return x


def sample_lerp_mix(head, x0, cond, uncond, steps, *, w):  # (1 + w) v_c - w v_u as a lerp; x.add(alpha=)
    x, n = x0, len(x0)
    for i in range(steps):
        t = torch.ones(n, dtype=x.dtype) * i / steps
        if w:
            out = head(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]))
            v = torch.lerp(out[n:], out[:n], 1 + w)
        else:
            v = head(x, t, cond)
        x = x.add(v, alpha=1 / steps)
    return x


def test_10_6_other_styles():
    for right in (sample_repeat_and_slices, sample_in_place_on_a_copy, sample_lerp_mix):
        assert_passes(ch10.guided_euler_sample, right)
