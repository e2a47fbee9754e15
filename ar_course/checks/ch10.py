"""Checks for chapter 10, continuous tokens: ``checks.ch10.fsq_quantize(fsq_quantize)`` and so on.

Every check compares with the library (:mod:`ar_course.tokenizers.functional`, :mod:`ar_course.continuous`, through the
thin wrappers of :mod:`ar_course.checks.reference.ch10` where the signature differs) on seeded random inputs and edge
cases (even and odd levels, float64 input, the corners of the FSQ grid, a code equal to its vector, codes a little off
the grid, probabilities that underflow, as many tokens as channels, a time-dependent velocity field, 49 Euler steps,
guidance strengths 0 and -1), values and, where the exercise is about them, gradients; and names the usual mistakes:
rounding without a straight-through gradient, a grid shifted for even levels, a reversed or truncated mixed radix,
swapped or NaN entropies, the straight-through estimator in place of the rotation, times broadcast along the channels, a
reversed flow, a velocity read off the path, a loss summed over channels, Euler steps evaluated at the wrong times or
counted by a float range, guidance mixed the wrong way round, skipped for a negative strength or applied to the
conditions. Rules are checked beyond the values: no gradient reaches the code in the rotation trick, which leaves the
caller's code attached to its codebook, the flow-matching loss sends its gradient to the velocity's parameters, and the
guided sampler leaves its x0 as it was and runs the head once per step, on the doubled batch (the conditional rows alone
at w = 0)."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ar_course.checks.core import Case, Chapter, CheckFailure, Mistake, call, compare, compare_cases
from ar_course.checks.reference import ch10 as answers
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
    yield Case("float64 input, levels (6, 3)", (torch.randn(7, 2, generator=g, dtype=torch.float64), (6, 3)))


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


def _fsq_clamped(z, levels):
    half = torch.tensor([(n - 1) / 2 for n in levels], dtype=z.dtype)
    bounded = torch.maximum(torch.minimum(z * half, half), -half)  # a hard clamp in place of the tanh
    rounded = bounded + (bounded.round() - bounded).detach()
    return rounded / torch.tensor([n // 2 for n in levels], dtype=z.dtype)


def _fsq_half_range(z, levels):
    bounded = ref.fsq_bound(z, levels)
    rounded = bounded + (bounded.round() - bounded).detach()
    return rounded / torch.tensor([(n - 1) / 2 for n in levels], dtype=z.dtype)


FSQ_MISTAKES = [
    Mistake(_fsq_no_st, "round() has a zero gradient almost everywhere: the encoder would learn nothing "
                        "without the straight-through trick"),
    Mistake(_fsq_identity_st, "the straight-through trick was applied to z itself, skipping the bound: the "
                              "gradient must still pass through tanh"),
    Mistake(_fsq_no_offset, "for an even number of levels, tanh(z) * (L - 1) / 2 rounds to L + 1 values (or "
                            "L - 1 symmetric ones): even levels need the half-step offset and its shift"),
    Mistake(_fsq_unscaled, "the codes are integers; divide dimension i by L_i // 2 so they lie in [-1, 1]"),
    Mistake(_fsq_clamped, "that bounds z with a hard clamp instead of fsq_bound's tanh: the clamp passes no gradient "
                          "once z is outside the box, and it sends z to other codes than the tanh does"),
    Mistake(_fsq_half_range, "the codes were divided by (L_i - 1) / 2, not L_i // 2: for an even L_i they leave the "
                             "grid (the lowest code falls below -1)"),
]


@chapter.exercise("10.1", reference=ref.fsq_quantize, hints=(
    "three steps per dimension: squash into a bounded interval, round to the nearest integer, rescale; the "
    "rounding must not block the gradient",
    "use Fq.fsq_bound(z, levels) (given) for the squashing; round with the straight-through trick "
    "(b + (b.round() - b).detach()) and divide each dimension by L_i // 2",
    "b = Fq.fsq_bound(z, levels); r = b + (b.round() - b).detach(); "
    "return r / torch.tensor([n // 2 for n in levels], dtype=z.dtype, device=z.device)",
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


def _index_inclusive_basis(codes, levels):
    width = torch.tensor([n // 2 for n in levels], dtype=codes.dtype)
    digits = (codes * width + width).round().long()
    basis = torch.cumprod(torch.tensor(levels), 0)  # L_0, L_0 L_1, ...: one place too high
    return (digits * basis).sum(-1)


INDEX_MISTAKES = [
    Mistake(_index_reversed, "the digits are in the wrong order: dimension 0 is the lowest digit (place value 1), "
                             "dimension 1 has place value L_0, and so on"),
    Mistake(_index_no_shift, "the digits are negative for codes below 0: shift each digit by L_i // 2 so it lies "
                             "in [0, L_i)"),
    Mistake(_index_same_base, "every dimension used the same base: the place value of dimension i is "
                              "L_0 * ... * L_{i-1}, so indices fill [0, prod(levels)) with no gaps"),
    Mistake(_index_inclusive_basis, "the place values are L_0, L_0 * L_1, ... (an inclusive cumulative product): "
                                    "dimension 0 has place value 1 and dimension i the product of the levels before "
                                    "it, so the indices leave gaps and overshoot prod(levels)"),
    Mistake(_index_truncated, "the digits were truncated (.long() cuts 2.9997 down to 2): a code carries float "
                              "error, so turn code_i * (L_i // 2) + L_i // 2 into the nearest integer"),
    Mistake(_index_floored, "the digits were floored (2.9997 becomes 2): a code carries float error, so take the "
                            "nearest integer"),
]


@chapter.exercise("10.2", reference=ref.fsq_codes_to_indices, hints=(
    "a code is a tuple of digits, one per dimension, digit i in base L_i: the index is that mixed-radix number",
    "digit_i = code_i * (L_i // 2) + L_i // 2, rounded to the nearest integer (in [0, L_i)); place values 1, "
    "L_0, L_0 L_1, ...",
    "w = torch.tensor([n // 2 for n in levels], device=codes.device); digits = (codes * w + w).round().long(); "
    "basis = torch.cumprod(torch.tensor((1,) + tuple(levels[:-1]), device=codes.device), 0); "
    "return (digits * basis).sum(-1)",
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


def _entropy_times_temperature(z, temperature=0.01):
    return answers.lfq_entropy_terms(z, 1 / temperature)


ENTROPY_MISTAKES = [
    Mistake(_entropy_swapped, "the two terms are swapped: the first is the mean of each vector's entropy, the "
                              "second the entropy of the batch-averaged distribution"),
    Mistake(_entropy_plus_distance, "the softmax favours far codes: the logits are minus the squared distance over "
                                    "the temperature"),
    Mistake(_entropy_bits, "those are bits: use the natural log (nats)"),
    Mistake(lambda z, temperature=0.01: answers.lfq_entropy_terms(z, 1.0),
            "the temperature was left out: the logits are minus the squared distances divided by the temperature, "
            "which sets how sharp each vector's assignment is"),
    Mistake(_entropy_times_temperature, "the squared distances were multiplied by the temperature; the logits are "
                                        "minus the squared distances divided by it"),
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
    "codes = Fq.lfq_indices_to_codes(torch.arange(2**d, device=z.device), d, z.dtype); "
    "p = softmax(-|z - c|^2 / temperature) over the codes (N, 2^d); per_sample = mean over rows of -sum p log p; "
    "codebook = -sum q log q with q = p.mean(0)",
    "d = z.shape[1]; codes = Fq.lfq_indices_to_codes(torch.arange(2**d, device=z.device), d, z.dtype); "
    "dist = (z[:, None] - codes[None]).pow(2).sum(-1); p = torch.softmax(-dist / temperature, 1); "
    "q = p.mean(0); return -(p * p.clamp_min(1e-12).log()).sum(1).mean(), -(q * q.clamp_min(1e-12).log()).sum()",
))
def lfq_entropy_terms(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _entropy_cases(), mistakes=ENTROPY_MISTAKES, atol=1e-5)
    # the two terms are a training loss: gradients must reach z, and stay finite where probabilities are 0
    for case in _entropy_cases():
        z = case.args[0].clone().requires_grad_(True)
        terms = call(fn, z, **case.kwargs, where=case.name)
        for name, term in zip(("per_sample", "codebook"), terms):
            if not term.requires_grad:
                raise CheckFailure(f"{name} on input {case.name!r} carries no gradient back to z: the two terms are "
                                   "a training loss, so compute them with autograd on (no no_grad, detach or .item())")
            (grad,) = torch.autograd.grad(term, z, retain_graph=True, allow_unused=True)
            if grad is not None and not bool(torch.isfinite(grad).all()):
                raise CheckFailure(f"the gradient of {name} with respect to z is not finite on input {case.name!r}: "
                                   "where a probability is exactly 0 the derivative of p log p is 0 * (-inf) = nan "
                                   "through the softmax; keep log away from 0 for the gradient too (clamp_min, or "
                                   "log_softmax of the logits)")


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


def _rot_transposed(z, z_q, eps=1e-8):
    with torch.no_grad():
        u, q = F.normalize(z, dim=1), F.normalize(z_q, dim=1)
        r = F.normalize(u + q, dim=1)
        lam = z_q.norm(dim=1, keepdim=True) / z.norm(dim=1, keepdim=True)
    moved = lam * (z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * u * (q * z).sum(1, keepdim=True))  # R^T z
    return z_q.detach() + (moved - moved.detach())


ROTATION_MISTAKES = [
    Mistake(_rot_straight_through, "that is the straight-through estimator (the gradient copied unchanged); the "
                                   "rotation trick rotates and rescales it"),
    Mistake(_rot_no_scale, "the rescaling lambda = |z_q| / |z| is missing"),
    Mistake(_rot_transposed, "that rotation is transposed (2 u (q.z) in place of 2 q (u.z)): it turns z_q's "
                             "direction onto z's, while R must turn z's direction u onto z_q's direction q"),
    Mistake(_rot_not_detached, "R and lambda must be constants (computed under no_grad): the gradient flows through "
                               "R z only, not through the rotation's construction"),
]


@chapter.exercise("10.4", reference=ref.rotation_trick, hints=(
    "the forward value is z_q, exactly; only the gradient changes: it flows through lambda * R z where R rotates "
    "z's direction onto z_q's and lambda rescales, both treated as constants",
    "u = z/|z|, q = z_q/|z_q|, r = (u + q)/|u + q| (under no_grad); R z = z - 2 r (r.z) + 2 q (u.z); "
    "moved = lambda * R z; return z_q.detach() + (moved - moved.detach())",
    "F = torch.nn.functional; with torch.no_grad(): u, q = F.normalize(z, dim=1), F.normalize(z_q, dim=1); "
    "r = F.normalize(u + q, dim=1); lam = z_q.norm(dim=1, keepdim=True) / z.norm(dim=1, keepdim=True); then, "
    "outside no_grad: moved = lam * (z - 2*r*(r*z).sum(1, keepdim=True) + 2*q*(u*z).sum(1, keepdim=True)); "
    "return z_q.detach() + (moved - moved.detach())",
))
def rotation_trick(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _rotation_cases(), grad_wrt=(0,), mistakes=ROTATION_MISTAKES)
    g = _gen(1040)
    where = "z_q looked up in a codebook that requires grad"
    z = torch.randn(6, 4, generator=g).requires_grad_(True)
    codebook = torch.randn(9, 4, generator=g).requires_grad_(True)
    z_q = codebook[torch.randint(0, 9, (6,), generator=g)]  # (6, 4), a non-leaf that carries the codebook's gradient
    out = call(fn, z, z_q, where=where)
    if not z_q.requires_grad:
        raise CheckFailure(f"your function detached its argument `z_q` in place on input {where!r}: the caller's "
                           "z_q lost its link to the codebook, so the codebook loss computed from it afterwards trains "
                           "nothing (detach a copy, never the argument)")
    out.sum().backward()
    if codebook.grad is not None and bool(codebook.grad.any()):
        raise CheckFailure(f"a gradient reaches z_q on input {where!r}: the output's value is z_q, but only z may "
                           "receive a gradient through it (the codebook is trained by its own loss)")


# --------------------------------------------------------------------------------------------------------
# 10.5 the flow-matching loss


class _Field:
    """A velocity ``v(x, t) = x W + t b`` with parameters ``W`` ``(D, D)`` and ``b`` ``(D,)`` that need gradients,
    as a head's do, and that refuses what a head could not read: ``x`` other than ``(N, D)``, ``t`` other than
    ``(N,)`` (a ``(N, 1)`` time would broadcast into a wrong loss without an error)."""

    def __init__(self, n: int, d: int, seed: int) -> None:
        g = _gen(seed)
        self.n, self.d = n, d
        self.weight = (torch.randn(d, d, generator=g) / d**0.5).requires_grad_(True)
        self.bias = torch.randn(d, generator=g).requires_grad_(True)

    def __repr__(self) -> str:
        return f"velocity(x ({self.n}, {self.d}), t ({self.n},))"

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (self.n, self.d):
            raise ValueError(f"the velocity takes x as a ({self.n}, {self.d}) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (self.n,):
            raise ValueError(f"the velocity takes t as a ({self.n},) tensor of times, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        return x @ self.weight + t[:, None] * self.bias  # (N, D)


def _loss_cases() -> Iterator[Case]:
    g = _gen(105)
    for n, d, name in ((8, 8, "8 tokens of 8 dims (as many tokens as channels)"), (16, 4, "16 tokens of 4 dims"),
                       (5, 3, "5 tokens of 3 dims")):
        yield Case(name, (_Field(n, d, 1050 + n), 2 + torch.randn(n, d, generator=g), torch.randn(n, d, generator=g),
                          torch.rand(n, generator=g)))
    yield Case("t = 0 and t = 1 (x_t is the noise, then the data)",
               (_Field(2, 3, 1051), torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g),
                torch.tensor([0.0, 1.0])))
    yield Case("one token of 1 dim", (_Field(1, 1, 1052), torch.tensor([[-2.0]]), torch.tensor([[0.5]]),
                                      torch.tensor([0.25])))


def _loss_of(velocity, x_t, t, target):
    return (velocity(x_t, t) - target).pow(2).mean()


LOSS_MISTAKES = [
    Mistake(lambda v, x1, x0, t: _loss_of(v, (1 - t) * x0 + t * x1, t, x1 - x0),
            "t was broadcast along the channels: t of shape (N,) lines up with the last axis of an (N, D) tensor, "
            "so with N == D nothing raises but token i's time scales channel i of every token"),
    Mistake(lambda v, x1, x0, t: _loss_of(v, (1 - t[:, None]) * x0 + t[:, None] * x1, t, x0 - x1),
            "the target velocity points from the data to the noise: time runs from the noise x0 (t = 0) to the data "
            "x1 (t = 1)"),
    Mistake(lambda v, x1, x0, t: _loss_of(v, t[:, None] * x0 + (1 - t[:, None]) * x1, t, x1 - x0),
            "x_t mixes the wrong way round: at t = 0 it must be the noise x0, at t = 1 the data x1"),
    Mistake(lambda v, x1, x0, t: _loss_of(v, (1 - t[:, None]) * x0 + t[:, None] * x1, t, x1),
            "the target is the data itself; a flow-matching head regresses the velocity along the path"),
    Mistake(lambda v, x1, x0, t: _loss_of(v, x1, t, x1 - x0),
            "the velocity was read at the data x1: the head must see the point x_t on the path (at sampling time "
            "it never sees the data)"),
    Mistake(lambda v, x1, x0, t: _loss_of(v, x0, t, x1 - x0),
            "the velocity was read at the noise x0: the head must see the point x_t on the path, and t with it"),
    Mistake(lambda v, x1, x0, t: _loss_of(v, (1 - t[:, None]) * x0 + t[:, None] * x1, 1 - t, x1 - x0),
            "the velocity was given 1 - t: in this chapter t = 0 is the noise and t = 1 the data, and the head must "
            "see the time that built x_t"),
    Mistake(lambda v, x1, x0, t: (v((1 - t[:, None]) * x0 + t[:, None] * x1, t) - (x1 - x0)).pow(2).sum(-1).mean(),
            "the squared error was summed over the channels: the loss is the mean over tokens and channels (the "
            "same minimiser, but D times larger, which changes the step size the optimiser takes)"),
]


@chapter.exercise("10.5", reference=answers.flow_matching_loss, hints=(
    "three steps: the point x_t on the straight line from x0 (t = 0) to x1 (t = 1), the speed along that line, "
    "and how far the velocity read at (x_t, t) is from it; each token has its own t",
    "x_t = (1 - t) x0 + t x1 with t given a channel axis (t[:, None], or t.view(-1, 1)); target = d x_t / dt; "
    "the loss is the mean squared difference between velocity(x_t, t) and the target, t passed as (N,)",
    "tt = t[:, None]; x_t = (1 - tt) * x0 + tt * x1; return (velocity(x_t, t) - (x1 - x0)).pow(2).mean()",
))
def flow_matching_loss(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _loss_cases(), mistakes=LOSS_MISTAKES)
    case = next(_loss_cases())
    field = case.args[0]
    ref_fn(*case.args).backward()
    expected = (field.weight.grad.clone(), field.bias.grad.clone())
    field.weight.grad = field.bias.grad = None
    loss = call(fn, *case.args, where=case.name)
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        raise CheckFailure(f"no gradient reaches the velocity's parameters on input {case.name!r}: the loss must be "
                           "a tensor built from velocity(x_t, t), not detached, not computed under torch.no_grad()")
    loss.backward()
    compare((field.weight.grad, field.bias.grad), expected, where=case.name, name="gradient of the velocity's W, b")


# --------------------------------------------------------------------------------------------------------
# 10.6 the head's sampler: Euler steps along the guided velocity


class _Head:
    """A head ``v(x, t, cond)`` that records how many rows each call had and refuses inputs a ``FlowHead`` could
    not read (``x`` not ``(R, D)``, ``t`` not ``(R,)``, ``cond`` not ``(R, C)``)."""

    def __init__(self, fn: Callable, token_dim: int, cond_dim: int) -> None:
        self.fn, self.token_dim, self.cond_dim = fn, token_dim, cond_dim
        self.rows: list[int] = []

    def __repr__(self) -> str:
        return f"head(x (R, {self.token_dim}), t (R,), cond (R, {self.cond_dim}))"

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in (x, t, cond)]
        rows = shapes[0][0] if isinstance(x, torch.Tensor) and x.ndim == 2 else None
        if rows is None or shapes != [(rows, self.token_dim), (rows,), (rows, self.cond_dim)]:
            raise ValueError(f"the head takes x (R, {self.token_dim}), t (R,) and cond (R, {self.cond_dim}) with one "
                             f"R, got x {shapes[0]}, t {shapes[1]}, cond {shapes[2]}")
        self.rows.append(rows)
        return self.fn(x, t, cond)


def _toy_head(seed: int, token_dim: int = 3, cond_dim: int = 5) -> _Head:
    from ar_course.continuous.model import FlowHead

    torch.manual_seed(seed)
    head = FlowHead(token_dim, cond_dim, width=16, depth=2)
    for p in head.parameters():  # the modulations start at zero: give them values so the condition matters
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.4)
    return _Head(head.eval(), token_dim, cond_dim)


def _field_head(token_dim: int = 3, cond_dim: int = 5) -> _Head:
    mix = torch.randn(cond_dim, token_dim, generator=_gen(1061))  # (C, D)
    # depends on t (catches steps at the wrong times) and on the condition (catches a wrong guidance mix)
    return _Head(lambda x, t, c: 2 * t[:, None] - 0.5 * x + c @ mix, token_dim, cond_dim)


def _sampler_cases() -> Iterator[Case]:
    g = _gen(106)

    def inputs(n):
        return torch.randn(n, 3, generator=g), torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)

    yield Case("v = 2t - x/2 + cond M, w = 1.5, 10 steps", (_field_head(), *inputs(6), 10), {"w": 1.5})
    yield Case("toy head, w = 0 (plain conditional sampling), 5 steps", (_toy_head(0), *inputs(4), 5), {"w": 0.0})
    yield Case("toy head, w = 4, 7 steps", (_toy_head(1), *inputs(5), 7), {"w": 4.0})
    yield Case("toy head, w = -1 (the null class's own flow), 3 steps", (_toy_head(2), *inputs(3), 3), {"w": -1.0})
    yield Case("v = 2t - x/2 + cond M, w = 2, one step", (_field_head(), *inputs(4), 1), {"w": 2.0})
    yield Case("v = 2t - x/2 + cond M, w = 1, 49 steps", (_field_head(), *inputs(2), 49), {"w": 1.0})


def _euler(velocity, x0, steps, time=lambda i, steps: i / steps, dt=lambda steps: 1 / steps, n=lambda steps: steps):
    """Euler steps with a (possibly wrong) time per step, step size and number of steps: the mistakes below."""
    x = x0
    for i in range(n(steps)):
        x = x + dt(steps) * velocity(x, torch.full((x.shape[0],), time(i, steps), dtype=x.dtype))
    return x


def _euler_float_range(velocity, x0, steps):
    """Euler steps at the times of ``torch.arange(0, 1, 1 / steps)``: ``steps + 1`` of them for 49 steps."""
    x = x0
    for t in torch.arange(0, 1, 1 / steps, dtype=x0.dtype):
        x = x + velocity(x, t.expand(x.shape[0])) / steps
    return x


def _mixed(head, cond, uncond, w, mix):
    return lambda x, t: mix(head(x, t, cond), head(x, t, uncond), w)


def _cfg(v_c, v_u, w):
    return (1 + w) * v_c - w * v_u


SAMPLER_MISTAKES = [
    Mistake(lambda head, x0, cond, uncond, steps, *, w: _euler(
        _mixed(head, cond, uncond, w, _cfg), x0, steps, time=lambda i, s: 0.0),
        "every step reads the velocity at t = 0: the time must move with the steps, t = i / steps at step i"),
    Mistake(lambda head, x0, cond, uncond, steps, *, w: _euler(
        _mixed(head, cond, uncond, w, _cfg), x0, steps, time=lambda i, s: i / (s - 1)),
        "the times run from 0 to 1 included (as torch.linspace(0, 1, steps) gives): step i starts at i / steps, "
        "so the last one starts at 1 - 1 / steps"),
    Mistake(lambda head, x0, cond, uncond, steps, *, w: _euler(
        _mixed(head, cond, uncond, w, _cfg), x0, steps, time=lambda i, s: (i + 1) / s),
        "each step reads the velocity at the end of its interval: Euler evaluates it at the start, t = i / steps"),
    Mistake(lambda head, x0, cond, uncond, steps, *, w: _euler(
        _mixed(head, cond, uncond, w, _cfg), x0, steps, dt=lambda s: 1.0),
        "each step moves by the whole velocity: multiply it by dt = 1 / steps"),
    Mistake(lambda head, x0, cond, uncond, steps, *, w: _euler(
        _mixed(head, cond, uncond, w, _cfg), x0, steps, time=lambda i, s: i / (s - 1), dt=lambda s: 1 / (s - 1),
        n=lambda s: s - 1),
        "that takes steps - 1 steps; the path from t = 0 to t = 1 needs steps of them"),
    Mistake(lambda head, x0, cond, uncond, steps, *, w: _euler_float_range(_mixed(head, cond, uncond, w, _cfg), x0,
                                                                           steps),
            "the times came from torch.arange(0, 1, 1 / steps): with a float step, rounding can give one time too many "
            "(50 for 49 steps); count the steps with integers, t = i / steps"),
    Mistake(lambda head, x0, cond, uncond, steps, *, w: _euler(
        _mixed(head, cond, uncond, w, lambda v_c, v_u, w: v_c if w < 0 else _cfg(v_c, v_u, w)), x0, steps),
        "guidance was skipped for a negative w (the conditional velocity alone): (1 + w) v_c - w v_u holds for every "
        "w, and only w = 0 leaves the conditional velocity; at w = -1 it is the null class's own"),
    Mistake(lambda head, x0, cond, uncond, steps, *, w: _euler(
        _mixed(head, cond, uncond, w, lambda v_c, v_u, w: _cfg(v_u, v_c, w)), x0, steps),
        "the two velocities are swapped: guidance extrapolates from the null class's velocity through the class's"),
    Mistake(lambda head, x0, cond, uncond, steps, *, w: _euler(
        _mixed(head, cond, uncond, w, lambda v_c, v_u, w: v_u + w * (v_c - v_u)), x0, steps),
        "that is the 'scale' convention uncond + w * (cond - uncond); the course's w is neutral at 0: "
        "(1 + w) * cond - w * uncond"),
    Mistake(lambda head, x0, cond, uncond, steps, *, w: _euler(
        lambda x, t: head(x, t, (1 + w) * cond - w * uncond), x0, steps),
        "that mixes the conditions before the head; guidance mixes the head's outputs, the velocities"),
]


@chapter.exercise("10.6", reference=answers.guided_euler_sample, hints=(
    "two ideas in one loop: equal Euler steps from t = 0 to t = 1, each reading the velocity at the start of its "
    "interval, and at each step a guided velocity from one head call that sees both conditions",
    "dt = 1 / steps; at step i, t = i / steps as a (N,) tensor; v = head(cat([x, x]), cat([t, t]), "
    "cat([cond, uncond])) split into v_c, v_u; x = x + dt * ((1 + w) v_c - w v_u) (a new tensor, not x +=); "
    "at w = 0 only head(x, t, cond)",
    "both = torch.cat([cond, uncond]); x = x0; for i in range(steps): t = torch.full((len(x),), i / steps, "
    "dtype=x.dtype, device=x.device); if w == 0: v = head(x, t, cond); else: v_c, v_u = head(torch.cat([x, x]), "
    "torch.cat([t, t]), both).chunk(2); v = (1 + w) * v_c - w * v_u; then x = x + v / steps; after the loop, "
    "return x",
))
def guided_euler_sample(fn: Callable, ref_fn: Callable) -> None:
    with torch.no_grad():
        compare_cases(fn, ref_fn, _sampler_cases(), mistakes=SAMPLER_MISTAKES)
        for case in _sampler_cases():
            head, x0, cond, uncond, steps = case.args
            head.rows.clear()
            call(fn, *case.args, where=case.name, **case.kwargs)  # compare_cases has held x0 unchanged
            n, w = x0.shape[0], case.kwargs["w"]
            want = [n if w == 0 else 2 * n] * steps
            if head.rows == want:
                continue
            seen = f"the head ran {len(head.rows)} times on {sorted(set(head.rows))} rows for {steps} steps of {n} rows"
            if w == 0:
                raise CheckFailure(f"{seen} on input {case.name!r}: at w = 0 the guided velocity is the conditional "
                                   f"one, so one call per step on the {n} conditional rows is all it needs")
            raise CheckFailure(f"{seen} on input {case.name!r}: each step should run the head once on the {2 * n} "
                               "rows of the class and the null class together (one batched call, not two)")
