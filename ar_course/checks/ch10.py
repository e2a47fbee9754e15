"""Checks for chapter 10, continuous tokens: ``checks.ch10.fsq_quantize(fsq_quantize)`` and so on.

Every check compares with the library (:mod:`ar_course.tokenizers.functional`, :mod:`ar_course.continuous`) on
seeded random inputs and edge cases (even and odd levels, the corners of the FSQ grid, a code equal to its
vector, codes a little off the grid, probabilities that underflow, a time-dependent velocity field), values and,
where the exercise is about them, gradients; and names the usual mistakes: rounding without a straight-through
gradient, a grid shifted for even levels, a reversed or truncated mixed radix, swapped or NaN entropies, the
straight-through estimator in place of the rotation, a reversed flow, Euler steps evaluated at the wrong times,
guidance mixed the wrong way round or applied to the conditions. Two rules are checked beyond the values: no
gradient reaches the code in the rotation trick, and the Euler sampler leaves its x0 as it was."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ar_course.checks.core import Case, Chapter, CheckFailure, Mistake, call, compare_cases
from ar_course.checks.reference import ch10 as answers
from ar_course.continuous import functional as cref
from ar_course.tokenizers import functional as ref

chapter = Chapter(10, "Continuous tokens")
use = chapter.use
hint = chapter.hint


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------
# 10.1 FSQ: bound, round, straight through


def _fsq_cases() -> Iterator[Case]:
    g = _gen(101)
    yield Case("odd levels (5, 3), 40 vectors", (torch.randn(40, 2, generator=g), (5, 3)))
    yield Case("even and odd levels (8, 6, 5), large inputs", (3 * torch.randn(30, 3, generator=g), (8, 6, 5)))
    yield Case("levels (4, 4), a batch of maps", (torch.randn(2, 5, 2, generator=g), (4, 4)))
    yield Case("zero input lands on code 0", (torch.zeros(3, 3), (7, 8, 2)))


def _fsq_no_st(z, levels):
    bounded = ref.fsq_bound(z, levels)
    width = torch.tensor([n // 2 for n in levels], dtype=z.dtype)
    return bounded.round() / width


def _fsq_identity_st(z, levels):
    codes = ref.fsq_quantize(z, levels)
    return z + (codes - z).detach()


def _fsq_no_offset(z, levels):
    lv = torch.tensor(levels, dtype=z.dtype)
    bounded = torch.tanh(z) * (lv - 1) * (1 + 1e-3) / 2
    rounded = bounded + (bounded.round() - bounded).detach()
    return rounded / (lv // 2)


def _fsq_unscaled(z, levels):
    bounded = ref.fsq_bound(z, levels)
    return bounded + (bounded.round() - bounded).detach()


FSQ_MISTAKES = [
    Mistake(_fsq_no_st, "round() has a zero gradient almost everywhere: the encoder would learn nothing "
                        "without the straight-through trick"),
    Mistake(_fsq_identity_st, "the straight-through trick was applied to z itself, skipping the bound: the "
                              "gradient must still pass through tanh"),
    Mistake(_fsq_no_offset, "for an even number of levels, tanh(z) * (L - 1) / 2 rounds to L + 1 values (or "
                            "L - 1 symmetric ones): even levels need the half-step offset and its shift"),
    Mistake(_fsq_unscaled, "the codes are integers; divide dimension i by L_i // 2 so they lie in [-1, 1]"),
]


@chapter.exercise("10.1", reference=ref.fsq_quantize, hints=(
    "three steps per dimension: squash into a bounded interval, round to the nearest integer, rescale; the "
    "rounding must not block the gradient",
    "use fsq_bound(z, levels) (given) for the squashing; round with the straight-through trick "
    "(b + (b.round() - b).detach()) and divide each dimension by L_i // 2",
    "b = fsq_bound(z, levels); r = b + (b.round() - b).detach(); "
    "return r / torch.tensor([n // 2 for n in levels], dtype=z.dtype)",
))
def fsq_quantize(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _fsq_cases(), grad_wrt=(0,), mistakes=FSQ_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 10.2 FSQ: codes -> indices (a mixed-radix number)


def _index_cases() -> Iterator[Case]:
    for levels in ((5, 3), (8, 6, 5), (2, 2, 2, 2), (7,)):
        every = ref.fsq_indices_to_codes(torch.arange(torch.tensor(levels).prod()), levels)  # the whole grid
        yield Case(f"every code of levels {levels}", (every, levels))
    g = _gen(102)
    codes = ref.fsq_quantize(torch.randn(3, 4, 3, generator=g), (8, 6, 5))
    yield Case("a (3, 4) map of codes, levels (8, 6, 5)", (codes, (8, 6, 5)))
    every = ref.fsq_indices_to_codes(torch.arange(240), (8, 6, 5))  # (240, 3)
    wobble = 1e-3 * (2 * torch.rand(every.shape, generator=g) - 1)  # float error, far below half a step
    yield Case("every code of levels (8, 6, 5), each off the grid by up to 0.001", (every + wobble, (8, 6, 5)))


def _index_reversed(codes, levels):
    return ref.fsq_codes_to_indices(codes.flip(-1), tuple(reversed(levels)))


def _index_no_shift(codes, levels):
    width = torch.tensor([n // 2 for n in levels], dtype=codes.dtype)
    digits = (codes * width).round().long()
    basis = torch.cumprod(torch.tensor((1,) + tuple(levels[:-1])), 0)
    return (digits * basis).sum(-1)


def _index_truncated(codes, levels):
    width = torch.tensor([n // 2 for n in levels], dtype=codes.dtype)
    digits = (codes * width + width).long()  # truncates towards 0: 2.9997 -> 2
    basis = torch.cumprod(torch.tensor((1,) + tuple(levels[:-1])), 0)
    return (digits * basis).sum(-1)


def _index_floored(codes, levels):
    width = torch.tensor([n // 2 for n in levels], dtype=codes.dtype)
    digits = (codes * width + width).floor().long()
    basis = torch.cumprod(torch.tensor((1,) + tuple(levels[:-1])), 0)
    return (digits * basis).sum(-1)


def _index_same_base(codes, levels):
    width = torch.tensor([n // 2 for n in levels], dtype=codes.dtype)
    digits = (codes * width + width).round().long()
    basis = max(levels) ** torch.arange(len(levels))
    return (digits * basis).sum(-1)


INDEX_MISTAKES = [
    Mistake(_index_reversed, "the digits are in the wrong order: dimension 0 is the lowest digit (place value 1), "
                             "dimension 1 has place value L_0, and so on"),
    Mistake(_index_no_shift, "the digits are negative for codes below 0: shift each digit by L_i // 2 so it lies "
                             "in [0, L_i)"),
    Mistake(_index_same_base, "every dimension used the same base: the place value of dimension i is "
                              "L_0 * ... * L_{i-1}, so indices fill [0, prod(levels)) with no gaps"),
    Mistake(_index_truncated, "the digits were truncated (.long() cuts 2.9997 down to 2): a code carries float "
                              "error, so turn code_i * (L_i // 2) + L_i // 2 into the nearest integer"),
    Mistake(_index_floored, "the digits were floored (2.9997 becomes 2): a code carries float error, so take the "
                            "nearest integer"),
]


@chapter.exercise("10.2", reference=ref.fsq_codes_to_indices, hints=(
    "a code is a tuple of digits, one per dimension, digit i in base L_i: the index is that mixed-radix number",
    "digit_i = code_i * (L_i // 2) + L_i // 2, rounded to the nearest integer (in [0, L_i)); place values 1, "
    "L_0, L_0 L_1, ...",
    "w = torch.tensor([n // 2 for n in levels]); digits = (codes * w + w).round().long(); "
    "basis = torch.cumprod(torch.tensor((1,) + tuple(levels[:-1])), 0); return (digits * basis).sum(-1)",
))
def fsq_codes_to_indices(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _index_cases(), mistakes=INDEX_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 10.3 LFQ's entropy terms


def _entropy_cases() -> Iterator[Case]:
    g = _gen(103)
    yield Case("32 vectors of 4 dims, temperature 0.1", (0.3 * torch.randn(32, 4, generator=g),), {"temperature": 0.1})
    yield Case("confident vectors (far from 0)", (torch.randn(16, 3, generator=g).sign() * 2,), {"temperature": 0.5})
    yield Case("all vectors alike (a collapsed batch)", (torch.full((10, 5), 0.05),), {"temperature": 0.2})
    yield Case("one vector of 2 dims, default temperature", (torch.tensor([[0.004, -0.002]]),))
    confident = torch.randn(12, 3, generator=g).sign() * (0.8 + 0.4 * torch.rand(12, 3, generator=g))
    yield Case("12 confident vectors, default temperature (most p underflow to 0)", (confident,))


def _entropy_swapped(z, temperature=0.01):
    per_sample, codebook = answers.lfq_entropy_terms(z, temperature)
    return codebook, per_sample


def _entropy_plus_distance(z, temperature=0.01):
    d = z.shape[1]
    codes = ref.lfq_indices_to_codes(torch.arange(2**d), d, z.dtype)
    p = torch.softmax(torch.cdist(z, codes).pow(2) / temperature, dim=1)
    avg = p.mean(0)
    return -(p * p.clamp_min(1e-12).log()).sum(1).mean(), -(avg * avg.clamp_min(1e-12).log()).sum()


def _entropy_bits(z, temperature=0.01):
    per_sample, codebook = answers.lfq_entropy_terms(z, temperature)
    return per_sample / torch.log(torch.tensor(2.0)), codebook / torch.log(torch.tensor(2.0))


def _entropy_mean_of_entropies(z, temperature=0.01):
    per_sample, _ = answers.lfq_entropy_terms(z, temperature)
    return per_sample, per_sample


def _entropy_unclamped_log(z, temperature=0.01):
    d = z.shape[1]
    codes = ref.lfq_indices_to_codes(torch.arange(2**d), d, z.dtype)
    p = torch.softmax(-(z[:, None, :] - codes[None, :, :]).pow(2).sum(-1) / temperature, dim=1)
    avg = p.mean(0)
    return -(p * p.log()).sum(1).mean(), -(avg * avg.log()).sum()


ENTROPY_MISTAKES = [
    Mistake(_entropy_swapped, "the two terms are swapped: the first is the mean of each vector's entropy, the "
                              "second the entropy of the batch-averaged distribution"),
    Mistake(_entropy_plus_distance, "the softmax favours far codes: the logits are minus the squared distance over "
                                    "the temperature"),
    Mistake(_entropy_bits, "those are bits: use the natural log (nats)"),
    Mistake(_entropy_unclamped_log, "a probability that underflows to 0 gives 0 * log 0 = 0 * -inf = nan: a term "
                                    "with p = 0 adds nothing to an entropy, so keep log away from 0 (clamp_min, "
                                    "or log_softmax of the logits)"),
    Mistake(_entropy_mean_of_entropies, "the codebook entropy is the entropy of the average distribution, not the "
                                        "average of the entropies (it is large only when the batch spreads over "
                                        "many codes)"),
]


@chapter.exercise("10.3", reference=answers.lfq_entropy_terms, hints=(
    "soft-assign each vector to all 2^d sign codes with a softmax over (minus) distances, then measure two "
    "entropies: of each vector's assignment, and of the batch's average assignment",
    "codes = lfq_indices_to_codes(torch.arange(2**d), d); p = softmax(-|z - c|^2 / temperature) over the codes "
    "(N, 2^d); per_sample = mean over rows of -sum p log p; codebook = -sum q log q with q = p.mean(0)",
    "dist = (z[:, None] - codes[None]).pow(2).sum(-1); p = torch.softmax(-dist / temperature, 1); "
    "q = p.mean(0); return -(p * p.clamp_min(1e-12).log()).sum(1).mean(), -(q * q.clamp_min(1e-12).log()).sum()",
))
def lfq_entropy_terms(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _entropy_cases(), mistakes=ENTROPY_MISTAKES, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# 10.4 the rotation trick


def _rotation_cases() -> Iterator[Case]:
    g = _gen(104)
    z = torch.randn(12, 5, generator=g)
    yield Case("12 vectors of 5 dims, nearby codes", (z, z + 0.3 * torch.randn(12, 5, generator=g)))
    yield Case("codes of other lengths and directions", (torch.randn(8, 3, generator=g),
                                                         3 * torch.randn(8, 3, generator=g)))
    yield Case("a code equal to its vector (R = I, lambda = 1)",
               (torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]])))


def _rot_straight_through(z, z_q):
    return z + (z_q - z).detach()


def _rot_no_scale(z, z_q, eps=1e-8):
    with torch.no_grad():
        u = z / z.norm(dim=1, keepdim=True)
        q = z_q / z_q.norm(dim=1, keepdim=True)
        r = F.normalize(u + q, dim=1)
    rotated = z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * q * (u * z).sum(1, keepdim=True)
    return z_q.detach() + (rotated - rotated.detach())


def _rot_not_detached(z, z_q, eps=1e-8):
    u = z / z.norm(dim=1, keepdim=True)
    q = z_q / z_q.norm(dim=1, keepdim=True)
    r = F.normalize(u + q, dim=1)
    moved = (z_q.norm(dim=1, keepdim=True) / z.norm(dim=1, keepdim=True)) * (
        z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * q * (u * z).sum(1, keepdim=True))
    return z_q.detach() + (moved - moved.detach())


ROTATION_MISTAKES = [
    Mistake(_rot_straight_through, "that is the straight-through estimator (the gradient copied unchanged); the "
                                   "rotation trick rotates and rescales it"),
    Mistake(_rot_no_scale, "the rescaling lambda = |z_q| / |z| is missing"),
    Mistake(_rot_not_detached, "R and lambda must be constants (computed under no_grad): the gradient flows through "
                               "R z only, not through the rotation's construction"),
]


@chapter.exercise("10.4", reference=ref.rotation_trick, hints=(
    "the forward value is z_q, exactly; only the gradient changes: it flows through lambda * R z where R rotates "
    "z's direction onto z_q's and lambda rescales, both treated as constants",
    "u = z/|z|, q = z_q/|z_q|, r = (u + q)/|u + q| (under no_grad); R z = z - 2 r (r.z) + 2 q (u.z); "
    "moved = lambda * R z; return z_q.detach() + (moved - moved.detach())",
    "with torch.no_grad(): u, q = F.normalize(z, dim=1), F.normalize(z_q, dim=1); r = F.normalize(u + q, dim=1); "
    "lam = z_q.norm(dim=1, keepdim=True) / z.norm(dim=1, keepdim=True)  -- then moved = lam * (z - 2*r*(r*z).sum(1, "
    "keepdim=True) + 2*q*(u*z).sum(1, keepdim=True))",
))
def rotation_trick(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _rotation_cases(), grad_wrt=(0,), mistakes=ROTATION_MISTAKES)
    g = _gen(1040)
    z, z_q = torch.randn(6, 4, generator=g).requires_grad_(True), torch.randn(6, 4, generator=g).requires_grad_(True)
    out = call(fn, z, z_q, where="z_q that requires grad")
    out.sum().backward()
    if z_q.grad is not None and bool(z_q.grad.any()):
        raise CheckFailure("a gradient reaches z_q on input 'z_q that requires grad': the output's value is z_q, but "
                           "only z may receive a gradient through it (the codebook is trained by its own loss)")


# --------------------------------------------------------------------------------------------------------
# 10.5 the flow-matching training pair


def _pair_cases() -> Iterator[Case]:
    g = _gen(105)
    yield Case("16 tokens of 4 dims", (torch.randn(16, 4, generator=g), 2 + torch.randn(16, 4, generator=g),
                                       torch.rand(16, generator=g)))
    yield Case("t = 0 and t = 1", (torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g),
                                   torch.tensor([0.0, 1.0])))
    yield Case("one token of 1 dim", (torch.tensor([[0.5]]), torch.tensor([[-2.0]]), torch.tensor([0.25])))


PAIR_MISTAKES = [
    Mistake(lambda x0, x1, t: ((1 - t[:, None]) * x0 + t[:, None] * x1, x0 - x1),
            "the velocity points from data to noise: time runs from the noise x0 (t = 0) to the data x1 (t = 1), "
            "so d x_t / dt = x1 - x0"),
    Mistake(lambda x0, x1, t: (t[:, None] * x0 + (1 - t[:, None]) * x1, x1 - x0),
            "x_t mixes the wrong way round: at t = 0 it must be the noise x0, at t = 1 the data x1"),
    Mistake(lambda x0, x1, t: ((1 - t[:, None]) * x0 + t[:, None] * x1, x1),
            "the target is the data itself; a flow-matching head learns the velocity x1 - x0"),
]


@chapter.exercise("10.5", reference=cref.flow_matching_pair, hints=(
    "a straight line from the noise x0 (t = 0) to the data x1 (t = 1); the target is the speed along it",
    "x_t = (1 - t) x0 + t x1 with t broadcast over the channels (t[:, None]); target = d x_t / dt",
    "tt = t[:, None]; return (1 - tt) * x0 + tt * x1, x1 - x0",
))
def flow_matching_pair(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _pair_cases(), grad_wrt=(1,), mistakes=PAIR_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 10.6 the Euler sampler


def _time_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 2 * t[:, None] * torch.ones_like(x) - 0.5 * x  # depends on t: catches steps at the wrong times


def _rotation_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.stack([-x[:, 1], x[:, 0]], dim=1) * (1 + t[:, None])


def _euler_cases() -> Iterator[Case]:
    g = _gen(106)
    yield Case("v = 2t - x/2, 10 steps", (_time_field, torch.randn(6, 3, generator=g), 10))
    yield Case("a rotating field, 7 steps", (_rotation_field, torch.randn(5, 2, generator=g), 7))
    yield Case("one step", (_time_field, torch.randn(4, 2, generator=g), 1))


def _euler_late(velocity, x0, steps):
    x = x0
    for i in range(steps):
        x = x + velocity(x, torch.full((x.shape[0],), (i + 1) / steps)) / steps
    return x


def _euler_no_dt(velocity, x0, steps):
    x = x0
    for i in range(steps):
        x = x + velocity(x, torch.full((x.shape[0],), i / steps))
    return x


def _euler_one_short(velocity, x0, steps):
    x = x0
    for i in range(steps - 1):
        x = x + velocity(x, torch.full((x.shape[0],), i / (steps - 1))) / (steps - 1) if steps > 1 else x
    return x


EULER_MISTAKES = [
    Mistake(_euler_late, "each step reads the velocity at the end of its interval: Euler evaluates it at the "
                         "start, t = i / steps"),
    Mistake(_euler_no_dt, "each step moves by the whole velocity: multiply by dt = 1 / steps"),
    Mistake(_euler_one_short, "that takes steps - 1 steps; the path from t = 0 to t = 1 needs steps of them"),
]


@chapter.exercise("10.6", reference=cref.euler_sample, hints=(
    "start at the noise and walk to t = 1 in equal steps, each along the velocity the field gives where you are",
    "dt = 1 / steps; for i in range(steps): t = i * dt as a (N,) tensor; x = x + dt * velocity(x, t)",
    "x = x0; for i in range(steps): x = x + velocity(x, torch.full((x.shape[0],), i / steps)) / steps; return x",
))
def euler_sample(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _euler_cases(), mistakes=EULER_MISTAKES)
    x0 = torch.randn(4, 3, generator=_gen(1060))
    kept = x0.clone()
    call(fn, _time_field, x0, 5, where="v = 2t - x/2, 5 steps")
    if not torch.equal(x0, kept):
        raise CheckFailure("your function changed x0 in place on input 'v = 2t - x/2, 5 steps' (x += ... or "
                           "x.add_ on the x0 it was given): the caller's noise is gone, and a second sampler call "
                           "from the same x0 starts elsewhere; build a new tensor each step")


# --------------------------------------------------------------------------------------------------------
# 10.7 classifier-free guidance on velocities


def _toy_head(seed: int, token_dim: int = 3, cond_dim: int = 5):
    from ar_course.continuous.model import FlowHead

    torch.manual_seed(seed)
    head = FlowHead(token_dim, cond_dim, width=16, depth=2)
    for p in head.parameters():  # the modulations start at zero: give them values so the condition matters
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.4)
    return head.eval()


def _guidance_cases() -> Iterator[Case]:
    g = _gen(107)
    for seed, w in ((0, 1.5), (1, 0.0), (2, -1.0), (3, 4.0)):
        head = _toy_head(seed)
        n = 6
        yield Case(f"toy head {seed}, w = {w:g}", (head, torch.randn(n, 3, generator=g), torch.rand(n, generator=g),
                                                   torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)),
                   {"w": w})


def _guide_swapped(head, x, t, cond, uncond, *, w):
    return (1 + w) * head(x, t, uncond) - w * head(x, t, cond)


def _guide_scale(head, x, t, cond, uncond, *, w):
    v_u = head(x, t, uncond)
    return v_u + w * (head(x, t, cond) - v_u)


def _guide_conditions(head, x, t, cond, uncond, *, w):
    return head(x, t, (1 + w) * cond - w * uncond)


GUIDANCE_MISTAKES = [
    Mistake(_guide_swapped, "the two velocities are swapped: guidance moves away from the unconditional one"),
    Mistake(_guide_scale, "that is the 'scale' convention uncond + w * (cond - uncond); the course's w is neutral at "
                          "0: (1 + w) * cond - w * uncond"),
    Mistake(_guide_conditions, "that mixes the conditions before the head; guidance mixes the head's outputs, the "
                               "velocities"),
]


@chapter.exercise("10.7", reference=cref.guided_velocity, hints=(
    "run the head twice, once with the class's condition and once with the null class's, and extrapolate from "
    "the second through the first",
    "v_c = head(x, t, cond), v_u = head(x, t, uncond); return (1 + w) * v_c - w * v_u (one head call on the "
    "doubled batch torch.cat([x, x]) ... is faster and gives the same numbers)",
    "v = head(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])); v_c, v_u = v.chunk(2); "
    "return (1 + w) * v_c - w * v_u",
))
def guided_velocity(fn: Callable, ref_fn: Callable) -> None:
    with torch.no_grad():
        compare_cases(fn, ref_fn, _guidance_cases(), mistakes=GUIDANCE_MISTAKES)
