"""Checks of chapter 01, vector quantization: ``checks.ch01.vq_lookup(vq_lookup)`` and so on.

Each check runs the learner's function and the reference (from :mod:`ar_course.tokenizers.functional`, or
:mod:`ar_course.checks.reference.ch01` for what the quantizers do not call) on
seeded random inputs of awkward sizes and on edge cases (ties, unused codes, more dead codes than
candidates...), and compares values, shapes, dtypes and, where it matters, gradients.
"""

from __future__ import annotations

import functools
import numbers
from fractions import Fraction
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ar_course.checks.core import (Case, Chapter, CheckFailure, Mistake, call, compare, compare_cases,
                                   compare_explained, explain)
from ar_course.checks.reference import ch01 as answers
from ar_course.tokenizers import functional as ref

chapter = Chapter(1, "Vector quantization")
use = chapter.use
hint = chapter.hint


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------
# 1.1 nearest-code lookup


def _lookup_cases() -> Iterator[Case]:
    g = _gen(0)
    yield Case("random 37x8, 11 codes", (torch.randn(37, 8, generator=g), torch.randn(11, 8, generator=g)))
    scales = torch.linspace(0.1, 3.0, 9)[:, None]  # codes of very different lengths
    yield Case("codes of different norms", (torch.randn(50, 4, generator=g), torch.randn(9, 4, generator=g) * scales))
    ties = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    yield Case("ties (duplicate codes, points halfway)",
               (torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, -2.0], [0.0, 3.0], [-1.0, 0.0]]), ties))
    yield Case("a single code", (torch.randn(6, 3, generator=g), torch.randn(1, 3, generator=g)))
    yield Case("1000 vectors, 300 codes", (torch.randn(1000, 5, generator=g), torch.randn(300, 5, generator=g)))


LOOKUP_MISTAKES = [
    Mistake(lambda z, codebook: (z @ codebook.t()).argmax(1),
            "that is the code with the largest dot product z.e, which ignores how long each code is (the |e|^2 "
            "term of the distance)"),
    Mistake(lambda z, codebook: torch.cdist(z, codebook).argmax(1), "that is the farthest code, not the nearest"),
    Mistake(lambda z, codebook: (z[:, None] - codebook[None]).abs().sum(-1).argmin(1),
            "that is the nearest code by the L1 distance (the sum of |z - e|); nearest means the smallest Euclidean "
            "distance"),
    Mistake(lambda z, codebook: codebook.shape[0] - 1 - torch.cdist(z, codebook).flip(1).argmin(1),
            "on a tie that keeps the code with the highest index; the lowest index should win"),
    Mistake(lambda z, codebook: torch.cdist(z, codebook).argmin(0),
            "that takes the argmin over the vectors (dim 0), giving one index per code; it runs over the codes "
            "(dim 1), one index per vector"),
]


@chapter.exercise("1.1", reference=ref.vq_lookup, hints=(
    "for every vector, measure how far each code is and keep the position of the closest; broadcasting gives "
    "all N x K distances at once",
    "use squared Euclidean distances, |z|^2 - 2 z.e + |e|^2 (or ((z[:, None] - codebook[None]) ** 2).sum(-1)), "
    "and an argmin over the codes; on a tie the lowest index wins, which is what torch.argmin does",
    "d = z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.pow(2).sum(1); return d.argmin(1)",
))
def vq_lookup(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _lookup_cases(), mistakes=LOOKUP_MISTAKES, off_cpu=True)


# --------------------------------------------------------------------------------------------------------
# 1.2 straight-through estimator


STE_MISTAKES = [
    Mistake(lambda z, z_q: z.clone(), "the output has the value of z, not of z_q: the forward pass must give the "
            "quantized vectors; only the backward pass treats quantization as the identity"),
    Mistake(lambda z, z_q: 2 * z - z_q, "that is 2z - z_q: the detached correction points the wrong way (z - z_q); "
            "added to z it must give z_q"),
    Mistake(lambda z, z_q: z + z_q, "that is z + z_q: the correction added to z is z_q itself; it must be what "
            "turns z into z_q"),
]


@chapter.exercise("1.2", reference=ref.straight_through, hints=(
    "the forward value must be z_q, but the backward pass should treat quantization as the identity: the "
    "gradient arriving at the output goes to z as it is",
    "build the output from z plus a correction whose value turns it into z_q; stop autograd from seeing the "
    "correction (.detach()), so that only the z term carries a gradient",
    "return z + (z_q - z).detach()",
))
def straight_through(fn: Callable, reference: Callable) -> None:
    g = _gen(1)
    for name, shape in [("vectors 13x6", (13, 6)), ("feature map 2x4x3x5", (2, 4, 3, 5))]:
        z = torch.randn(shape, generator=g)
        z_q = torch.randn(shape, generator=g)
        w = torch.randn(shape, generator=g)
        z_in, zq_in = z.clone().requires_grad_(True), z_q.clone().requires_grad_(True)
        out = call(fn, z_in, zq_in, where=name)
        compare_explained(out, reference(z, z_q), STE_MISTAKES, Case(name, (z, z_q)), atol=1e-6)
        if not out.requires_grad:
            raise CheckFailure(f"no gradient can flow through your output on input {name!r} (is everything detached?)")
        (out * w).sum().backward()
        grad = z_in.grad
        if grad is None or not bool(grad.any()):
            raise CheckFailure(f"no gradient reaches z (the encoder) on input {name!r}: your output has the right "
                               "value, but its gradient path to z is cut or cancels out, so the encoder would "
                               "never learn")
        if torch.allclose(grad, -w, atol=1e-6):
            raise CheckFailure(f"the gradient reaching z on input {name!r} is the output's gradient with its sign "
                               "flipped: the encoder would move the wrong way")
        try:
            compare(grad, w, where=name, atol=1e-6, name="the gradient reaching z (the encoder)")
        except CheckFailure as exc:
            raise CheckFailure(f"{exc}; it should be the output's gradient passed through unchanged") from None
        if zq_in.grad is not None and zq_in.grad.abs().max() > 0:
            raise CheckFailure(f"z_q (the codebook) receives a gradient through your output on input {name!r}; "
                               "only z should")


# --------------------------------------------------------------------------------------------------------
# 1.3 codebook + commitment loss


def _loss_cases() -> Iterator[Case]:
    g = _gen(2)
    yield Case("vectors 19x5, beta 0.25", (torch.randn(19, 5, generator=g), torch.randn(19, 5, generator=g), 0.25))
    yield Case("feature map 2x3x4x4, beta 0.5",
               (torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g), 0.5))


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).mean()


LOSS_MISTAKES = [
    Mistake(lambda z, z_q, beta: beta * _mse(z_q, z.detach()) + _mse(z, z_q.detach()),
            "beta weighs the codebook term there; it belongs to the commitment term, the one that moves z"),
    Mistake(lambda z, z_q, beta: (1 + beta) * _mse(z, z_q),
            "without stop-gradients both terms move both z and z_q; each term should move only one of them"),
    Mistake(lambda z, z_q, beta: ((z_q - z.detach()) ** 2).sum() + beta * ((z - z_q.detach()) ** 2).sum(),
            "that sums the squared errors; both terms are means over all elements"),
]


@chapter.exercise("1.3", reference=ref.vq_loss, hints=(
    "two squared-error terms pull z and z_q towards each other; in each, one side is held fixed, and "
    "which side decides what the term trains",
    "the codebook term moves z_q only (hold z fixed with .detach()), the commitment term moves z only (hold "
    "z_q fixed) and is the one weighted by beta; both are means over all elements",
    "return ((z_q - z.detach()) ** 2).mean() + beta * ((z - z_q.detach()) ** 2).mean()",
))
def vq_loss(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _loss_cases(), grad_wrt=(0, 1), mistakes=LOSS_MISTAKES, off_cpu=True)


# --------------------------------------------------------------------------------------------------------
# 1.4 usage and perplexity


def _usage_cases() -> Iterator[Case]:
    g = _gen(3)
    yield Case("index map 4x5x5, 40 codes (some unused, top ones too)",
               (torch.randint(0, 30, (4, 5, 5), generator=g), 40))
    yield Case("skewed use of 16 codes", ((torch.rand(500, generator=g) ** 3 * 16).long(), 16))
    yield Case("one code used", (torch.full((7,), 3), 10))
    yield Case("every code equally", (torch.arange(12).repeat(5), 12))


def _usage_with_zero_terms(indices: torch.Tensor, num_codes: int) -> tuple[float, float]:
    counts = torch.bincount(indices.flatten(), minlength=num_codes).double()
    p = counts / counts.sum()
    return float((counts > 0).sum()) / num_codes, float((-(p * p.log()).sum()).exp())


def _usage_over_seen_range(indices: torch.Tensor, num_codes: int) -> tuple[float, float]:
    counts = torch.bincount(indices.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float((counts > 0).sum()) / len(counts), float((-(p * p.log()).sum()).exp())


def _usage_base_two(indices: torch.Tensor, num_codes: int) -> tuple[float, float]:
    counts = torch.bincount(indices.flatten(), minlength=num_codes).double()
    p = counts[counts > 0] / counts.sum()
    return float((counts > 0).sum()) / num_codes, float(2 ** (-(p * p.log()).sum()))


def _usage_entropy(indices: torch.Tensor, num_codes: int) -> tuple[float, float]:
    counts = torch.bincount(indices.flatten(), minlength=num_codes).double()
    p = counts[counts > 0] / counts.sum()
    return float((counts > 0).sum()) / num_codes, float(-(p * p.log()).sum())


def _usage_over_tokens(indices: torch.Tensor, num_codes: int) -> tuple[float, float]:
    return indices.unique().numel() / indices.numel(), answers.codebook_usage(indices, num_codes)[1]


USAGE_MISTAKES = [
    Mistake(_usage_with_zero_terms, "the perplexity is NaN: an unused code adds 0 * log 0 = NaN to the entropy; "
            "its term is 0"),
    Mistake(_usage_over_seen_range, "the fraction divides by the largest index seen + 1 (bincount's length), "
            "not by num_codes: unused codes at the top are missed"),
    Mistake(_usage_base_two, "that is the perplexity in base 2 (2 ** entropy); the perplexity is exp of the "
            "entropy in nats"),
    Mistake(_usage_entropy, "the second value is the entropy itself; the perplexity is its exp, the effective "
            "number of codes"),
    Mistake(_usage_over_tokens, "the fraction divides the number of codes used by the number of tokens; it is "
            "a share of the num_codes codes"),
]


@chapter.exercise("1.4", reference=answers.codebook_usage, hints=(
    "count how often each of the num_codes codes appears; both numbers follow from those counts",
    "the fraction is (codes counted at least once) / num_codes, with bincount's minlength so that unused top "
    "codes are counted as 0; the perplexity is exp of the entropy of the counts normalised to probabilities, "
    "leaving out the codes with probability 0",
    "counts = torch.bincount(indices.flatten(), minlength=num_codes); p = counts[counts > 0] / counts.sum(); "
    "return (counts > 0).sum().item() / num_codes, torch.exp(-(p * p.log()).sum()).item()",
))
def codebook_usage(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _usage_cases(), mistakes=USAGE_MISTAKES)
    case = next(_usage_cases())
    for i, value in enumerate(call(fn, *case.args, where=case.name)):
        if not isinstance(value, numbers.Real):
            raise CheckFailure(f"output[{i}] on input {case.name!r} is a {type(value).__name__}, not a number: "
                               "return the two values as Python floats")


# --------------------------------------------------------------------------------------------------------
# 1.5 dead-code restart


def _restart_cases() -> Iterator[Case]:
    g = _gen(4)
    counts = torch.tensor([3.0, 0.0, 7.0, 1.0, 0.0, 2.0, 0.5, 9.0, 0.0, 1.0, 4.0])
    yield Case("11 codes, 4 dead, threshold 1",
               (torch.randn(11, 3, generator=g), counts, torch.randn(6, 3, generator=g), 1.0))
    yield Case("threshold 2 (codes hit exactly twice survive)",
               (torch.randn(11, 3, generator=g), counts, torch.randn(20, 3, generator=g), 2.0))
    yield Case("more dead codes than candidates",
               (torch.randn(8, 2, generator=g), torch.zeros(8), torch.randn(3, 2, generator=g), 1.0))
    yield Case("no dead code",
               (torch.randn(5, 4, generator=g), torch.full((5,), 10.0), torch.randn(2, 4, generator=g), 1.0))


def _restart_by_code_index(codebook: torch.Tensor, counts: torch.Tensor, candidates: torch.Tensor,
                           threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    dead = counts < threshold
    new, where = codebook.clone(), dead.nonzero().flatten()
    new[where] = candidates[where % len(candidates)]
    return new, dead


RESTART_MISTAKES = [
    Mistake(lambda codebook, counts, candidates, threshold: ref.dead_code_restart(codebook, counts, candidates,
                                                                                  threshold + 1e-6),
            "codes hit exactly threshold times were restarted too; a code is dead only below the threshold"),
    Mistake(_restart_by_code_index, "dead code k got candidates[k], by its index in the codebook; the candidates "
            "go to the dead codes in turn, the j-th dead code getting candidates[j]"),
    Mistake(lambda codebook, counts, candidates, threshold: ref.dead_code_restart(codebook, counts, candidates,
                                                                                  min(threshold, 1e-12)),
            "only codes never picked (count 0) were restarted; a code picked fewer than threshold times is dead "
            "too"),
]


@chapter.exercise("1.5", reference=ref.dead_code_restart, hints=(
    "a code is dead when it was picked fewer than threshold times; each dead code gets a vector from the data "
    "(the candidates), and the codebook passed in must stay as it was",
    "dead = counts < threshold (strictly: a code hit exactly threshold times survives); work on a copy of the "
    "codebook and give the j-th dead code, in index order, candidates[j], wrapping around when there are more "
    "dead codes than candidates; return the copy and the dead mask",
    "new = codebook.clone(); dead = counts < threshold; new[dead] = candidates[torch.arange(int(dead.sum())) % "
    "len(candidates)]; return new, dead",
))
def dead_code_restart(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _restart_cases(), mistakes=RESTART_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 1.6 EMA codebook update


def _ema_cases() -> Iterator[Case]:
    g = _gen(5)
    k, d = 7, 3
    idx = torch.randint(0, 5, (40,), generator=g)  # codes 5 and 6 unused
    yield Case("7 codes, 40 vectors, decay 0.99", (torch.rand(k, generator=g) * 5, torch.randn(k, d, generator=g),
                                                   torch.randn(40, d, generator=g), idx, 0.99, 1e-5))
    yield Case("decay 0.5, eps 0.1", (torch.rand(k, generator=g) * 5, torch.randn(k, d, generator=g),
                                      torch.randn(40, d, generator=g), idx, 0.5, 0.1))
    yield Case("fresh statistics (all zeros) with unused codes",
               (torch.zeros(k), torch.zeros(k, d), torch.randn(40, d, generator=g), idx, 0.9, 1e-5))


def _ema_with(cluster_size: torch.Tensor, embed_sum: torch.Tensor, z: torch.Tensor, indices: torch.Tensor,
              decay: float, eps: float, *, old: float | None = None, new: float | None = None,
              smoothing: str = "laplace") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The EMA update with the old statistics weighted by ``old``, the batch's by ``new`` (by default decay and
    1 - decay) and the counts smoothed as ``smoothing`` says: "laplace" (right), "none" or "plus eps"."""
    k = cluster_size.shape[0]
    old, new = decay if old is None else old, 1 - decay if new is None else new
    onehot = F.one_hot(indices, k).to(z.dtype)
    size, total = old * cluster_size + new * onehot.sum(0), old * embed_sum + new * onehot.t() @ z
    n = size.sum()
    denom = {"laplace": (size + eps) / (n + k * eps) * n, "none": size, "plus eps": size + eps}[smoothing]
    return size, total, total / denom[:, None]


EMA_MISTAKES = [
    Mistake(lambda *a: _ema_with(*a, old=1 - a[4], new=a[4]),
            "decay weighs the new batch there and 1 - decay the running statistics; the old values keep the "
            "weight decay"),
    Mistake(lambda *a: _ema_with(*a, new=1.0), "the batch counts and sums are added without the (1 - decay) "
            "factor, so the running statistics keep growing"),
    Mistake(lambda *a: _ema_with(*a, smoothing="none"), "the codebook divides by the running counts N without "
            "smoothing them, so an unused code divides by (almost) zero"),
    Mistake(lambda *a: _ema_with(*a, smoothing="plus eps"), "the codebook divides by N + eps; the smoothed counts "
            "(N + eps) / (n + K eps) * n also keep the total count n"),
]


@chapter.exercise("1.6", reference=ref.ema_update, hints=(
    "keep two running averages per code, how many vectors it was given and their sum; the code is their "
    "ratio, with a little smoothing so that an unused code does not divide by zero",
    "counts n_k and sums s_k of this batch come from indices (bincount with minlength=K, so unused top codes "
    "count 0; index_add_); blend them into the running N and m with weight decay on the old value; smooth N "
    "as (N + eps) / (n + K eps) * n with n = sum(N); the codebook is m / smoothed N; return (N, m, codebook)",
    "counts = torch.bincount(indices, minlength=K); N = decay * N + (1 - decay) * counts; m = decay * m + "
    "(1 - decay) * torch.zeros_like(m).index_add_(0, indices, z); n = N.sum(); codebook = m / ((N + eps) / "
    "(n + K * eps) * n)[:, None]",
))
def ema_update(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _ema_cases(), atol=1e-5, rtol=1e-4, mistakes=EMA_MISTAKES, off_cpu=True)


# --------------------------------------------------------------------------------------------------------
# 1.7 residual quantization


def _residual_cases() -> Iterator[Case]:
    g = _gen(6)
    yield Case("30 vectors, depth 3, 9 codes each",
               (torch.randn(30, 4, generator=g), torch.randn(3, 9, 4, generator=g)))
    shared = torch.randn(1, 16, 2, generator=g) * 0.7
    yield Case("shared codebook, depth 4", (torch.randn(25, 2, generator=g), shared.expand(4, 16, 2).contiguous()))
    yield Case("depth 1", (torch.randn(10, 3, generator=g), torch.randn(1, 5, 3, generator=g)))


def _residual_with(z: torch.Tensor, codebooks: torch.Tensor, *, rest: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual quantization where each level codes ``rest``: "z" (z itself) or "z - last" (z minus the last
    code chosen only)."""
    z_hat, last, levels = torch.zeros_like(z), torch.zeros_like(z), []
    for codebook in codebooks:
        idx = ref.vq_lookup(z if rest == "z" else z - last, codebook)
        last = codebook[idx]
        z_hat = z_hat + last
        levels.append(idx)
    return torch.stack(levels, 1), z_hat


RESIDUAL_MISTAKES = [
    Mistake(functools.partial(_residual_with, rest="z"), "every level codes z itself; each level should code the "
            "residual z - z_hat that the levels before it left"),
    Mistake(functools.partial(_residual_with, rest="z - last"), "each level codes z minus the previous level's "
            "code only; the residual is z minus the sum of all the codes chosen so far"),
]


@chapter.exercise("1.7", reference=ref.residual_quantize, hints=(
    "each level codes what the levels before it left over, so keep the running reconstruction z_hat",
    "start from z_hat = 0; level d looks up the residual z - z_hat in codebooks[d] with Fq.vq_lookup and adds the "
    "chosen codes to z_hat; return the indices stacked as (N, depth) and the final z_hat",
    "for codebook in codebooks: idx = Fq.vq_lookup(z - z_hat, codebook); z_hat = z_hat + codebook[idx]; "
    "indices.append(idx); return torch.stack(indices, 1), z_hat",
))
def residual_quantize(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _residual_cases(), mistakes=RESIDUAL_MISTAKES, off_cpu=True)


# --------------------------------------------------------------------------------------------------------
# 1.8 which phi a scale uses


def _has_exact_tie(k: int, num_scales: int, num_phi: int) -> bool:
    if num_phi == 1:
        return False
    at = Fraction(k, num_scales - 1) if num_scales > 1 else Fraction(0)
    m = Fraction(1, 3 * num_phi)
    ticks = [m + i * (1 - 2 * m) / (num_phi - 1) for i in range(num_phi)]
    dists = sorted(abs(t - at) for t in ticks)
    return dists[0] == dists[1]


def _nearest_tick(at: float, ticks: torch.Tensor) -> int:
    return int((ticks - at).abs().argmin())


PHI_MISTAKES = [
    Mistake(lambda k, num_scales, num_phi: _nearest_tick(k / (num_scales - 1) if num_scales > 1 else 0.0,
                                                         torch.linspace(0, 1, num_phi, dtype=torch.float64)),
            "that spreads the refinements' ticks evenly from 0 to 1 (i / (num_phi - 1)); they run from "
            "1/(3 num_phi) to 1 - 1/(3 num_phi)"),
    Mistake(lambda k, num_scales, num_phi: _nearest_tick(
        k / num_scales, torch.linspace(1 / (3 * num_phi), 1 - 1 / (3 * num_phi), num_phi, dtype=torch.float64)),
            "that places scale k at k / num_scales; it sits at k / (num_scales - 1), so that the last scale is at 1"),
]


@chapter.exercise("1.8", reference=ref.phi_index, hints=(
    "place the num_phi refinements and the scale on the same axis [0, 1] and pick the nearest refinement",
    "the refinements sit at num_phi evenly spaced ticks from 1/(3 num_phi) to 1 - 1/(3 num_phi); scale k sits at "
    "k / (num_scales - 1), or 0 when there is a single scale; return the nearest tick's index as an int",
    "n = num_phi; ticks = torch.linspace(1 / (3 * n), 1 - 1 / (3 * n), n, dtype=torch.float64); at = k / "
    "(num_scales - 1) if num_scales > 1 else 0.0; return int((ticks - at).abs().argmin())",
))
def phi_index(fn: Callable, reference: Callable) -> None:
    seen, answers_seen = [], []  # every input so far and the learner's answers: a mistake must give them all
    for num_scales, num_phi in [(6, 4), (10, 4), (5, 4), (13, 4), (8, 8), (7, 3), (4, 2), (6, 1), (1, 4)]:
        for k in range(num_scales):
            if _has_exact_tie(k, num_scales, num_phi):  # floating point decides those; skip them
                continue
            where = f"k={k}, num_scales={num_scales}, num_phi={num_phi}"
            got = call(fn, k, num_scales, num_phi, where=where)
            if isinstance(got, torch.Tensor) and got.numel() == 1:
                got = got.item()
            if isinstance(got, bool) or not isinstance(got, numbers.Integral):
                raise CheckFailure(f"your function returned a {type(got).__name__} ({got!r}) on input {where!r}; it "
                                   "should return an int, the position of a refinement in the list phis")
            seen.append((k, num_scales, num_phi))
            answers_seen.append(int(got))
            try:
                compare(int(got), reference(k, num_scales, num_phi), where=where)
            except CheckFailure as exc:
                # one input alone cannot tell the mistakes apart (several give the same index there): match a
                # mistake on every input seen so far
                on_all = [Mistake(lambda *inputs, m=m: [m.fn(*i) for i in inputs], m.says) for m in PHI_MISTAKES]
                raise explain(exc, on_all, Case(where, tuple(seen)), answers_seen) from None


# --------------------------------------------------------------------------------------------------------
# 1.9 - 1.11 VAR's multi-scale quantizer


def _phis(num_scales: int, channels: int, num_phi: int, ratio: float, g: torch.Generator) -> list:
    """One refinement per scale, ``num_phi`` random 3x3 convs shared as VAR shares them."""
    weight = torch.randn(num_phi, channels, channels, 3, 3, generator=g) * 0.2
    bias = torch.randn(num_phi, channels, generator=g) * 0.1
    return [functools.partial(ref.phi_refine, weight=weight[i], bias=bias[i], ratio=ratio)
            for i in (ref.phi_index(k, num_scales, num_phi) for k in range(num_scales))]


def _pyramid_settings() -> Iterator[tuple[str, torch.Tensor, torch.Tensor, tuple[int, ...], list]]:
    g = _gen(7)
    scales = (1, 2, 3, 4, 6, 8)
    yield ("2 maps 4x8x8, scales 1,2,3,4,6,8, 4 shared phis", torch.randn(2, 4, 8, 8, generator=g),
           torch.randn(20, 4, generator=g), scales, _phis(6, 4, 4, 0.5, g))
    yield ("1 map 3x5x5, scales 1,3,5, phi ratio 0.3", torch.randn(1, 3, 5, 5, generator=g),
           torch.randn(13, 3, generator=g) * 0.6, (1, 3, 5), _phis(3, 3, 2, 0.3, g))
    yield ("3 maps 2x7x7, scales 2,4,7, no refinement", torch.randn(3, 2, 7, 7, generator=g),
           torch.randn(9, 2, generator=g), (2, 4, 7), [lambda h: h] * 3)


def _resize(x: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    return x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode=mode)


def _encode_with(f: torch.Tensor, codebook: torch.Tensor, scales: tuple[int, ...], phis: list, *,
                 down: str = "area", up: str = "bicubic", residual: bool = True,
                 refine: bool = True) -> list[torch.Tensor]:
    """The multi-scale encoder with the resampling modes, the residual and the refinement as given."""
    b, c, side, _ = f.shape
    f_hat, out = torch.zeros_like(f), []
    for s, phi in zip(scales, phis):
        rest = _resize(f - f_hat if residual else f, s, down)
        idx = ref.vq_lookup(rest.permute(0, 2, 3, 1).reshape(-1, c), codebook).view(b, s, s)
        h = _resize(codebook[idx].permute(0, 3, 1, 2), side, up)
        f_hat = f_hat + (phi(h) if refine else h)
        out.append(idx)
    return out


ENCODE_MISTAKES = [
    Mistake(functools.partial(_encode_with, residual=False), "every scale codes f itself; each scale should code "
            "the residual f - f_hat that the coarser scales left"),
    Mistake(functools.partial(_encode_with, refine=False), "the upsampled code maps are added to f_hat without "
            "being refined by phis[k]"),
    Mistake(functools.partial(_encode_with, up="nearest"), "the code maps are upsampled with nearest-neighbour "
            "interpolation, not bicubically"),
    Mistake(functools.partial(_encode_with, up="bilinear"), "the code maps are upsampled bilinearly, not "
            "bicubically"),
    Mistake(functools.partial(_encode_with, down="bilinear"), "the residual is shrunk with bilinear "
            "interpolation, which reads only the few pixels nearest each output; area averaging uses them all"),
]


def _contributions(indices: list, codebook: torch.Tensor, phis: list, *, up: str = "bicubic",
                   refine: bool = True) -> list[torch.Tensor]:
    """What each scale adds to f_hat: its code map, upsampled to the last map's side (and refined)."""
    side = indices[-1].shape[-1]
    maps = [_resize(codebook[idx].permute(0, 3, 1, 2), side, up) for idx in indices]
    return [phi(h) if refine else h for h, phi in zip(maps, phis)]


DECODE_MISTAKES = [
    Mistake(lambda *a: sum(_contributions(*a, refine=False)), "the upsampled code maps are summed without being "
            "refined by phis[k]"),
    Mistake(lambda *a: sum(_contributions(*a, up="bilinear")), "the code maps are upsampled bilinearly; the "
            "encoder upsampled them bicubically, and decoding must do the same"),
    Mistake(lambda *a: sum(_contributions(*a, up="nearest")), "the code maps are upsampled with nearest-neighbour "
            "interpolation; the encoder upsampled them bicubically, and decoding must do the same"),
    Mistake(lambda *a: _contributions(*a)[-1], "that is the last scale's contribution alone; f_hat is the sum of "
            "the contributions of every scale"),
]


def _teacher_inputs_with(indices: list, codebook: torch.Tensor, phis: list, *, cumulative: bool = True,
                         down: str = "area", next_scale: bool = True) -> list[torch.Tensor]:
    parts = _contributions(indices, codebook, phis)
    out, f_hat = [], 0
    for k in range(len(indices) - 1):
        f_hat = f_hat + parts[k] if cumulative else parts[k]
        out.append(_resize(f_hat, indices[k + 1 if next_scale else k].shape[-1], down))
    return out


TEACHER_MISTAKES = [
    Mistake(functools.partial(_teacher_inputs_with, cumulative=False), "each input holds scale k's contribution "
            "alone; it should be f_hat accumulated over scales 0..k"),
    Mistake(functools.partial(_teacher_inputs_with, down="bilinear"), "f_hat is shrunk with bilinear "
            "interpolation, which reads only the few pixels nearest each output; area averaging uses them all"),
    Mistake(functools.partial(_teacher_inputs_with, next_scale=False), "each input is shrunk to the side of "
            "scale k; it is read to predict scale k+1, so it takes the side of scale k+1"),
]


@chapter.exercise("1.9", reference=ref.multiscale_encode, hints=(
    "go from the coarsest scale to the finest; each scale codes what the coarser ones have not explained yet, "
    "so keep a running reconstruction f_hat at full size",
    "per scale: shrink the residual f - f_hat to s x s with area averaging, look up the nearest code of every "
    "position (as (B*s*s, C) vectors), turn the code map back to (B, C, s, s), upsample it bicubically to full "
    "size, refine it with phis[k] and add it to f_hat",
    "rest = F.interpolate(f - f_hat, size=(s, s), mode='area'); idx = Fq.vq_lookup(rest.permute(0, 2, 3, "
    "1).reshape(-1, C), codebook).view(B, s, s); up = F.interpolate(codebook[idx].permute(0, 3, 1, 2), size=(H, "
    "H), mode='bicubic'); f_hat = f_hat + phis[k](up)",
))
def multiscale_encode(fn: Callable, reference: Callable) -> None:
    cases = [Case(name, (f, cb, scales, phis)) for name, f, cb, scales, phis in _pyramid_settings()]
    compare_cases(fn, reference, cases, mistakes=ENCODE_MISTAKES, off_cpu=True)


def _decode_cases() -> Iterator[Case]:
    for name, f, cb, scales, phis in _pyramid_settings():
        yield Case(name, (ref.multiscale_encode(f, cb, scales, phis), cb, phis))


@chapter.exercise("1.10", reference=answers.multiscale_decode, hints=(
    "decoding replays the encoder's additions: every scale contributes one refined, upsampled code map",
    "the output side is the last index map's side; for each scale, look up the codes, lay them out as "
    "(B, C, s, s), upsample bicubically to that side, apply phis[k], and sum the contributions",
    "f_hat = sum(phis[k](F.interpolate(codebook[idx].permute(0, 3, 1, 2), size=(H, H), mode='bicubic')) for "
    "k, idx in enumerate(indices))",
))
def multiscale_decode(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _decode_cases(), mistakes=DECODE_MISTAKES, off_cpu=True)


@chapter.exercise("1.11", reference=ref.teacher_forcing_inputs, hints=(
    "the transformer predicts scale k+1 from everything scales 0..k have built, seen at the resolution of "
    "scale k+1",
    "accumulate f_hat scale by scale as the decoder does; after adding scale k (for k < S-1) append f_hat "
    "area-downsampled to the side of scale k+1, so S-1 maps in all (the first scale has no input)",
    "for k in range(S - 1): f_hat = f_hat + phis[k](F.interpolate(codebook[indices[k]].permute(0, 3, 1, 2), "
    "size=(H, H), mode='bicubic')); out.append(F.interpolate(f_hat, size=(s_next, s_next), mode='area')) with "
    "s_next = indices[k + 1].shape[-1] and H = indices[-1].shape[-1]",
))
def teacher_forcing_inputs(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _decode_cases(), mistakes=TEACHER_MISTAKES, off_cpu=True)
