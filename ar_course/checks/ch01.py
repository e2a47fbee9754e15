"""Checks of chapter 01, vector quantization: ``checks.ch01.vq_lookup(vq_lookup)`` and so on.

Each check runs the learner's function and the reference (from :mod:`ar_course.tokenizers.functional`, or
:mod:`ar_course.checks.reference.ch01` for what the quantizers do not call) on
seeded random inputs of awkward sizes and on edge cases (ties, unused codes, more dead codes than
candidates...), and compares values, shapes, dtypes and, where it matters, gradients.
"""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import Callable, Iterator

import torch

from ar_course.checks.core import Case, Chapter, CheckFailure, call, compare, compare_cases
from ar_course.checks.reference import ch01 as answers
from ar_course.tokenizers import functional as ref

chapter = Chapter(1, "Vector quantization")
use = chapter.use


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


@chapter.exercise("1.1", reference=ref.vq_lookup,
                  hint="argmin over codes of the squared distance |z|^2 - 2 z.e + |e|^2; torch.argmin breaks ties "
                       "towards the lowest index and returns int64")
def vq_lookup(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _lookup_cases())


# --------------------------------------------------------------------------------------------------------
# 1.2 straight-through estimator


@chapter.exercise("1.2", reference=ref.straight_through,
                  hint="return z + (z_q - z).detach(): the value of z_q, the gradient of the identity to z")
def straight_through(fn: Callable, reference: Callable) -> None:
    g = _gen(1)
    for name, shape in [("vectors 13x6", (13, 6)), ("feature map 2x4x3x5", (2, 4, 3, 5))]:
        z = torch.randn(shape, generator=g)
        z_q = torch.randn(shape, generator=g)
        w = torch.randn(shape, generator=g)
        z_in, zq_in = z.clone().requires_grad_(True), z_q.clone().requires_grad_(True)
        out = call(fn, z_in, zq_in, where=name)
        compare(out, reference(z, z_q), where=name, atol=1e-6)
        if not out.requires_grad:
            raise CheckFailure(f"no gradient can flow through your output on input {name!r} (is everything detached?)")
        (out * w).sum().backward()
        if z_in.grad is None or not torch.allclose(z_in.grad, w, atol=1e-6):
            raise CheckFailure(f"the gradient reaching z (the encoder) on input {name!r} is not the output's "
                               "gradient passed through unchanged")
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


@chapter.exercise("1.3", reference=ref.vq_loss,
                  hint="mean((z_q - z.detach())**2) + beta * mean((z - z_q.detach())**2): the codebook term moves "
                       "z_q only, the commitment term (weighted by beta) moves z only")
def vq_loss(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _loss_cases(), grad_wrt=(0, 1))


# --------------------------------------------------------------------------------------------------------
# 1.4 usage and perplexity


def _usage_cases() -> Iterator[Case]:
    g = _gen(3)
    yield Case("index map 4x5x5, 40 codes (some unused, top ones too)",
               (torch.randint(0, 30, (4, 5, 5), generator=g), 40))
    yield Case("skewed use of 16 codes", ((torch.rand(500, generator=g) ** 3 * 16).long(), 16))
    yield Case("one code used", (torch.full((7,), 3), 10))
    yield Case("every code equally", (torch.arange(12).repeat(5), 12))


@chapter.exercise("1.4", reference=answers.codebook_usage,
                  hint="counts = torch.bincount(indices.flatten(), minlength=num_codes); fraction = (counts > 0) / "
                       "num_codes; perplexity = exp(-sum p log p) over the codes with p > 0")
def codebook_usage(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _usage_cases())


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


@chapter.exercise("1.5", reference=ref.dead_code_restart,
                  hint="dead = counts < threshold; copy the codebook (clone) and give the j-th dead code "
                       "candidates[j % len(candidates)]")
def dead_code_restart(fn: Callable, reference: Callable) -> None:
    for case in _restart_cases():
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in case.args)
        got = call(fn, *args, where=case.name)
        compare(got, reference(*case.args), where=case.name)
        if not torch.equal(args[0], case.args[0]):
            raise CheckFailure(f"your function changed the codebook passed in on input {case.name!r}; "
                               "return a new tensor (codebook.clone()) instead")


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


@chapter.exercise("1.6", reference=ref.ema_update,
                  hint="N = decay*N + (1-decay)*counts; m = decay*m + (1-decay)*(sum of assigned z); smoothed "
                       "N' = (N + eps) / (sum(N) + K*eps) * sum(N); codebook = m / N'")
def ema_update(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _ema_cases(), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------
# 1.7 residual quantization


def _residual_cases() -> Iterator[Case]:
    g = _gen(6)
    yield Case("30 vectors, depth 3, 9 codes each",
               (torch.randn(30, 4, generator=g), torch.randn(3, 9, 4, generator=g)))
    shared = torch.randn(1, 16, 2, generator=g) * 0.7
    yield Case("shared codebook, depth 4", (torch.randn(25, 2, generator=g), shared.expand(4, 16, 2).contiguous()))
    yield Case("depth 1", (torch.randn(10, 3, generator=g), torch.randn(1, 5, 3, generator=g)))


@chapter.exercise("1.7", reference=ref.residual_quantize,
                  hint="keep a running z_hat; level d looks up z - z_hat in codebooks[d] and adds the chosen code; "
                       "stack the indices as (N, depth)")
def residual_quantize(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _residual_cases())


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


@chapter.exercise("1.8", reference=ref.phi_index,
                  hint="ticks = torch.linspace(1/(3n), 1 - 1/(3n), n); at = k / (num_scales - 1) (0 for one scale); "
                       "return the index of the nearest tick as a Python int")
def phi_index(fn: Callable, reference: Callable) -> None:
    for num_scales, num_phi in [(6, 4), (10, 4), (5, 4), (13, 4), (8, 8), (7, 3), (4, 2), (6, 1), (1, 4)]:
        for k in range(num_scales):
            if _has_exact_tie(k, num_scales, num_phi):  # floating point decides those; skip them
                continue
            where = f"k={k}, num_scales={num_scales}, num_phi={num_phi}"
            got = call(fn, k, num_scales, num_phi, where=where)
            if isinstance(got, torch.Tensor):
                got = got.item()
            compare(int(got) if isinstance(got, (int, float)) else got, reference(k, num_scales, num_phi), where=where)


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


@chapter.exercise("1.9", reference=ref.multiscale_encode,
                  hint="per scale: rest = f - f_hat; area-downsample it (F.interpolate(..., mode='area')) unless "
                       "s == H; look up codes; upsample the code map with mode='bicubic'; f_hat += phis[k](that)")
def multiscale_encode(fn: Callable, reference: Callable) -> None:
    cases = [Case(name, (f, cb, scales, phis)) for name, f, cb, scales, phis in _pyramid_settings()]
    compare_cases(fn, reference, cases)


def _decode_cases() -> Iterator[Case]:
    for name, f, cb, scales, phis in _pyramid_settings():
        yield Case(name, (ref.multiscale_encode(f, cb, scales, phis), cb, phis))


@chapter.exercise("1.10", reference=answers.multiscale_decode,
                  hint="f_hat = sum over scales of phis[k](bicubic upsample of codebook[indices[k]] to the last "
                       "scale's side), codes laid out as (B, C, s, s)")
def multiscale_decode(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _decode_cases())


@chapter.exercise("1.11", reference=ref.teacher_forcing_inputs,
                  hint="accumulate f_hat scale by scale as in the decoder; after scale k (k < S-1) append "
                       "f_hat area-downsampled to the side of scale k+1: S-1 maps in all")
def teacher_forcing_inputs(fn: Callable, reference: Callable) -> None:
    compare_cases(fn, reference, _decode_cases())
