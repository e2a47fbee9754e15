"""Checks for chapter 03, autoregressive images: ``checks.ch03.to_raster(to_raster)`` etc.

References live in :mod:`ar_course.raster.functional`, :mod:`ar_course.sampling`, :mod:`ar_course.metrics`
and, for the sampling loop the library runs inside ``GPT.generate``, :mod:`ar_course.checks.reference.ch03`.
The sampling check runs the learner's loop on a tiny seeded GPT and compares the sampled tokens with the
reference under the same generator seed; it also records every forward pass, so a loop that ignores the KV
cache is named.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ar_course import metrics, sampling
from ar_course.checks.core import Case, Chapter, CheckFailure, call, clone_args, compare, compare_cases
from ar_course.checks.reference import ch03 as answers
from ar_course.raster import functional as ref
from ar_course.raster.model import raster_config
from ar_course.sampling import GREEDY, SamplingConfig
from ar_course.transformer.model import GPT

chapter = Chapter(3, "Autoregressive images")
use = chapter.use


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _maps(g: torch.Generator, B: int, h: int, w: int, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (B, h, w), generator=g)


# --------------------------------------------------------------------------------------------------------
# 3.1 / 3.2 raster order


def _to_raster_cases() -> Iterator[Case]:
    g = _gen(0)
    yield Case("2x3x5 map (3 rows, 5 columns)", (_maps(g, 2, 3, 5),))
    yield Case("1x8x8 map", (_maps(g, 1, 8, 8),))
    yield Case("4x6x1 map (one column)", (_maps(g, 4, 6, 1),))


@chapter.exercise("3.1", reference=ref.to_raster,
                  hint="raster order reads row 0 left to right, then row 1...: token (i, j) goes to i * w + j, "
                       "which is what reshape(B, h * w) does on a (B, h, w) tensor")
def to_raster(fn, ref_fn):
    compare_cases(fn, ref_fn, _to_raster_cases())


def _from_raster_cases() -> Iterator[Case]:
    g = _gen(1)
    yield Case("(2, 15) -> 3x5", (torch.randint(0, 50, (2, 15), generator=g), 3, 5))
    yield Case("(2, 15) -> 5x3", (torch.randint(0, 50, (2, 15), generator=g), 5, 3))
    yield Case("(3, 64) -> 8x8", (torch.randint(0, 50, (3, 64), generator=g), 8, 8))


@chapter.exercise("3.2", reference=ref.from_raster,
                  hint="position p of the sequence is row p // w, column p % w; reshape to (B, h, w), "
                       "in that order of h and w")
def from_raster(fn, ref_fn):
    compare_cases(fn, ref_fn, _from_raster_cases())


# --------------------------------------------------------------------------------------------------------
# 3.3 training pairs


def _pairs_cases() -> Iterator[Case]:
    g = _gen(2)
    yield Case("4 sequences of 9 tokens", (torch.randint(0, 20, (4, 9), generator=g),))
    yield Case("3 sequences of 64 tokens (8x8 maps)", (torch.randint(0, 256, (3, 64), generator=g),))
    yield Case("2 sequences of 2 tokens", (torch.tensor([[5, 6], [7, 5]]),))
    yield Case("1 sequence of 1 token (the model reads only the class)", (torch.tensor([[3]]),))


@chapter.exercise("3.3", reference=ref.make_training_pairs,
                  hint="the class embedding fills position 0 and predicts t_0, so the targets are all L tokens "
                       "[t_0, ..., t_{L-1}] (no shift) and the inputs are the L - 1 tokens [t_0, ..., t_{L-2}]: the "
                       "last token is never read")
def make_training_pairs(fn, ref_fn):
    compare_cases(fn, ref_fn, _pairs_cases())


# --------------------------------------------------------------------------------------------------------
# 3.4 condition dropout


def _dropout_cases() -> Iterator[tuple[str, torch.Tensor, float, int, int]]:
    yield "1000 classes 0..9, p = 0.1, null 10", torch.arange(1000) % 10, 0.1, 10, 0
    yield "7 classes, p = 0.5, null 4", torch.tensor([0, 1, 2, 3, 0, 1, 2]), 0.5, 4, 1
    yield "50 classes, p = 0 (nothing dropped)", torch.arange(50) % 10, 0.0, 10, 2
    yield "50 classes, p = 1 (everything dropped)", torch.arange(50) % 10, 1.0, 10, 3


@chapter.exercise("3.4", reference=ref.condition_dropout,
                  hint="draw u = torch.rand(B, generator=generator) once, drop where u < p, and build a new "
                       "tensor (torch.where) instead of writing into classes")
def condition_dropout(fn, ref_fn):
    for name, classes, p, null, seed in _dropout_cases():
        original = classes.clone()
        got = call(fn, classes, p, null, _gen(seed), where=name)
        if not torch.equal(classes, original):
            raise CheckFailure(f"your function changed its input classes on input {name!r}; return a new tensor")
        expected = ref_fn(original, p, null, _gen(seed))
        compare(got, expected, where=name)


# --------------------------------------------------------------------------------------------------------
# 3.5 the guidance mix


def _cfg_cases() -> Iterator[Case]:
    g = _gen(4)
    cond, uncond = torch.randn(4, 11, generator=g), torch.randn(4, 11, generator=g)
    for w in (0.0, 1.0, 3.0, 0.5):
        yield Case(f"4x11 logits, w {w}", (cond, uncond, w))
    yield Case("2x3x7 logits, w 2", (torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g), 2.0))


@chapter.exercise("3.5", reference=sampling.cfg_mix,
                  hint="mix the logits, not the probabilities: (1 + w) * cond - w * uncond, so that w = 0 gives "
                       "cond exactly and a larger w moves further away from uncond")
def cfg_logits(fn, ref_fn):
    compare_cases(fn, ref_fn, _cfg_cases())


# --------------------------------------------------------------------------------------------------------
# 3.6 the sampling loop


def tiny_model(seed: int = 0) -> GPT:
    """A tiny class-conditional GPT (13 codes, 3x4 maps, 5 classes) whose class token matters a lot."""
    torch.manual_seed(seed)
    model = GPT(raster_config(13, (3, 4), n_classes=5, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():
        model.wce.weight.mul_(50)
    return model.eval()


def _sampling_cases() -> Iterator[tuple[str, dict]]:
    classes = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4])
    yield "8 classes, 12 tokens, w 2, top_k 6", dict(classes=classes, num_tokens=12, cfg=2.0,
                                                     sampling=SamplingConfig(top_k=6))
    yield "8 classes, 12 tokens, w -1 (unconditional)", dict(classes=classes, num_tokens=12, cfg=-1.0)
    yield "3 classes, 7 tokens, w 0 (conditional)", dict(classes=classes[:3], num_tokens=7, cfg=0.0)
    yield "8 classes, 12 tokens, w 1, greedy", dict(classes=classes, num_tokens=12, cfg=1.0, sampling=GREEDY)


@chapter.exercise("3.6", reference=answers.sample_tokens,
                  hint="run [classes; null classes] as one batch of 2B with model.make_cache(2B); the first "
                       "pass takes an empty (2B, 0) input, every later pass the last sampled token (repeated for "
                       "both halves); mix logits[:B] and logits[B:] with (1 + w) * cond - w * uncond")
def sample_tokens(fn, ref_fn):
    model = tiny_model()
    for name, kw in _sampling_cases():
        lengths: list[int] = []
        hook = model.register_forward_pre_hook(
            lambda m, args, kwargs: lengths.append(args[0].shape[1] if args else kwargs["idx"].shape[1]),
            with_kwargs=True)
        try:
            got = call(fn, model, kw["classes"].clone(), kw["num_tokens"], where=name,
                       generator=_gen(11), **{k: v for k, v in kw.items() if k not in ("classes", "num_tokens")})
        finally:
            hook.remove()
        expected = ref_fn(model, kw["classes"].clone(), kw["num_tokens"], generator=_gen(11),
                          **{k: v for k, v in kw.items() if k not in ("classes", "num_tokens")})
        if len(lengths) != kw["num_tokens"] or any(n > 1 for n in lengths[1:]):
            shown = lengths if len(lengths) <= 14 else lengths[:14] + ["..."]
            raise CheckFailure(f"on input {name!r} the model ran {len(lengths)} forward passes over inputs of "
                               f"lengths {shown}; expected {kw['num_tokens']} passes, each after the first over "
                               "one new token (use the KV cache)")
        compare(got, expected, where=name, name="sampled tokens")


# --------------------------------------------------------------------------------------------------------
# 3.7 the Frechet distance


def _frechet_cases() -> Iterator[Case]:
    g = _gen(5)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(150, 6, generator=g, dtype=torch.float64) @ mix * 0.7 + 0.5
    yield Case("200 vs 150 features of 6 dims, shifted and correlated", (a, b))
    yield Case("a set against itself (distance ~0)", (a, a.clone()))
    yield Case("40 vs 40 features of 3 dims", (torch.randn(40, 3, generator=g, dtype=torch.float64) @ mix[:3, :3],
                                                torch.randn(40, 3, generator=g, dtype=torch.float64) * 2))


@chapter.exercise("3.7", reference=metrics.frechet_distance_from_features,
                  hint="||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr(sqrtm(S_a @ S_b)) with the unbiased "
                       "covariances (divide by N - 1, as np.cov does) and a matrix square root "
                       "(scipy.linalg.sqrtm, real part), not an elementwise one")
def frechet_distance(fn, ref_fn):
    for case in _frechet_cases():
        expected = ref_fn(*clone_args(case.args))
        got = call(fn, *clone_args(case.args), where=case.name)
        compare(got, expected, where=case.name, name="distance", atol=1e-6, rtol=1e-5)
