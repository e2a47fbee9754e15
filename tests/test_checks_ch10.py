"""Chapter 10 checks: each accepts the reference, reports a stub as not attempted, and rejects plausible wrong
answers (rounding without a straight-through gradient, a missing even-level offset, a reversed or truncated mixed
radix, swapped, base-2 or NaN entropies, straight-through in place of the rotation trick or a gradient to the code, a
reversed flow, late Euler steps or ones that overwrite the noise, guidance mixed the wrong way or on the
conditions...)."""

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


def test_10_1():
    check = ch10.fsq_quantize
    assert_passes(check, Fq.fsq_quantize)
    assert_not_attempted(check, stub)
    for wrong in (fsq_round_only, fsq_st_on_z, fsq_clamp, fsq_integers):
        assert_fails(check, wrong)
    assert_fails(check, fsq_round_only, contains="straight-through")
    assert_fails(check, fsq_integers, contains="divide dimension i")


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


def test_10_4():
    check = ch10.rotation_trick
    assert_passes(check, Fq.rotation_trick)
    assert_not_attempted(check, stub)
    for wrong in (rotation_straight_through, rotation_not_detached, rotation_transposed, rotation_unscaled):
        assert_fails(check, wrong)
    assert_fails(check, rotation_straight_through, contains="straight-through estimator")
    assert_fails(check, rotation_unscaled, contains="rescaling")
    assert_fails(check, rotation_not_detached, contains="constants")
    assert_fails(check, rotation_code_not_detached, contains="reaches z_q")
    assert_fails(check, rotation_moves_code_too, contains="reaches z_q")


# 10.5 ------------------------------------------------------------------------------------------------------


def pair_reversed_velocity(x0, x1, t):
    tt = t[:, None]
    return (1 - tt) * x0 + tt * x1, x0 - x1


def pair_reversed_mix(x0, x1, t):
    tt = t[:, None]
    return tt * x0 + (1 - tt) * x1, x1 - x0


def pair_data_target(x0, x1, t):
    tt = t[:, None]
    return (1 - tt) * x0 + tt * x1, x1


def pair_no_broadcast(x0, x1, t):
    return (1 - t[None, :]).T * x0 + t * x1, x1 - x0  # t broadcast over the tokens in the second term


def test_10_5():
    check = ch10.flow_matching_pair
    assert_passes(check, C.flow_matching_pair)
    assert_not_attempted(check, stub)
    for wrong in (pair_reversed_velocity, pair_reversed_mix, pair_data_target, pair_no_broadcast):
        assert_fails(check, wrong)
    assert_fails(check, pair_reversed_velocity, contains="from data to noise")
    assert_fails(check, pair_reversed_mix, contains="wrong way round")


# 10.6 ------------------------------------------------------------------------------------------------------


def euler_late(velocity, x0, steps):
    x = x0
    for i in range(steps):
        x = x + velocity(x, torch.full((x.shape[0],), (i + 1) / steps)) / steps
    return x


def euler_whole_velocity(velocity, x0, steps):
    x = x0
    for i in range(steps):
        x = x + velocity(x, torch.full((x.shape[0],), i / steps))
    return x


def euler_time_zero(velocity, x0, steps):
    x = x0
    for _ in range(steps):
        x = x + velocity(x, torch.zeros(x.shape[0])) / steps
    return x


def euler_from_x0_each_step(velocity, x0, steps):
    x = x0
    for i in range(steps):
        x = x + velocity(x0, torch.full((x.shape[0],), i / steps)) / steps  # the velocity read at the start point
    return x


def euler_in_place(velocity, x0, steps):
    x = x0
    for i in range(steps):
        x += velocity(x, torch.full((x.shape[0],), i / steps)) / steps  # x is x0: the caller's noise changes
    return x


def euler_add_(velocity, x0, steps):
    for i in range(steps):
        x0.add_(velocity(x0, torch.full((x0.shape[0],), i / steps)), alpha=1 / steps)
    return x0


def test_10_6():
    check = ch10.euler_sample
    assert_passes(check, C.euler_sample)
    assert_not_attempted(check, stub)
    for wrong in (euler_late, euler_whole_velocity, euler_time_zero, euler_from_x0_each_step):
        assert_fails(check, wrong)
    assert_fails(check, euler_late, contains="end of its interval")
    assert_fails(check, euler_whole_velocity, contains="dt = 1 / steps")
    assert_fails(check, euler_in_place, contains="changed x0 in place")
    assert_fails(check, euler_add_, contains="changed x0 in place")


# 10.7 ------------------------------------------------------------------------------------------------------


def guide_swapped(head, x, t, cond, uncond, *, w):
    return (1 + w) * head(x, t, uncond) - w * head(x, t, cond)


def guide_scale_convention(head, x, t, cond, uncond, *, w):
    v_u = head(x, t, uncond)
    return v_u + w * (head(x, t, cond) - v_u)


def guide_on_conditions(head, x, t, cond, uncond, *, w):
    return head(x, t, (1 + w) * cond - w * uncond)


def guide_conditional_only(head, x, t, cond, uncond, *, w):
    return head(x, t, cond)


def test_10_7():
    check = ch10.guided_velocity
    assert_passes(check, C.guided_velocity)
    assert_passes(check, lambda head, x, t, cond, uncond, *, w: (1 + w) * head(x, t, cond) - w * head(x, t, uncond))
    assert_not_attempted(check, stub)
    for wrong in (guide_swapped, guide_scale_convention, guide_on_conditions, guide_conditional_only):
        assert_fails(check, wrong)
    assert_fails(check, guide_swapped, contains="swapped")
    assert_fails(check, guide_on_conditions, contains="mixes the conditions")
