"""Checks for chapter 03, autoregressive images: ``checks.ch03.to_raster(to_raster)`` etc.

References live in :mod:`ar_course.raster.functional`, :mod:`ar_course.sampling`, :mod:`ar_course.metrics`
and, for the sampling loop the library runs inside ``GPT.generate``, :mod:`ar_course.checks.reference.ch03`.
The sampling check runs the learner's loop on a tiny seeded GPT and compares the sampled tokens with the
reference under the same generator seed; it also records every forward pass, so a loop that ignores the KV
cache is named.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from scipy import linalg

from ar_course import metrics
from ar_course.checks.core import (Case, Chapter, CheckFailure, Mistake, call, clone_args, compare, compare_cases,
                                   explain)
from ar_course.checks.reference import ch03 as answers
from ar_course.raster import functional as ref
from ar_course.raster.model import raster_config
from ar_course.sampling import GREEDY, SamplingConfig
from ar_course.transformer.model import GPT

chapter = Chapter(3, "Autoregressive images")
use = chapter.use
hint = chapter.hint


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _maps(g: torch.Generator, B: int, h: int, w: int, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (B, h, w), generator=g)


# --------------------------------------------------------------------------------------------------------
# 3.1 raster order / 3.2 back to a map from any generation order


def _to_raster_cases() -> Iterator[Case]:
    g = _gen(0)
    yield Case("2x3x5 map (3 rows, 5 columns)", (_maps(g, 2, 3, 5),))
    yield Case("1x8x8 map", (_maps(g, 1, 8, 8),))
    yield Case("4x6x1 map (one column)", (_maps(g, 4, 6, 1),))


@chapter.exercise("3.1", reference=ref.to_raster, hints=(
    "raster order reads a map the way you read a page: along the first row, then along the next one",
    "token (i, j) of an h x w map goes to position i * w + j; a (B, h, w) tensor is stored row by row, so no "
    "element has to move",
    "return maps.reshape(B, h * w)",
))
def to_raster(fn, ref_fn):
    compare_cases(fn, ref_fn, _to_raster_cases(), mistakes=[
        Mistake(lambda maps: maps.transpose(1, 2).reshape(maps.shape[0], -1),
                "that reads the map column by column; raster order reads it row by row")])


def _neighbour_order(h: int, w: int) -> torch.Tensor:
    """Raster positions in the neighbour (anti-diagonal) order of section 9: ``(h*w,)`` long."""
    return torch.tensor([i * w + j for d in range(h + w - 1) for i in range(h) for j in range(w) if i + j == d])


def _from_order_cases() -> Iterator[Case]:
    g = _gen(1)
    yield Case("raster order, (2, 15) -> 3x5", (torch.randint(0, 50, (2, 15), generator=g), torch.arange(15), 3, 5))
    yield Case("a random order, (2, 15) -> 3x5",
               (torch.randint(0, 50, (2, 15), generator=g), torch.randperm(15, generator=g), 3, 5))
    yield Case("a random order, (2, 15) -> 5x3",
               (torch.randint(0, 50, (2, 15), generator=g), torch.randperm(15, generator=g), 5, 3))
    yield Case("neighbour (anti-diagonal) order, (3, 20) -> 4x5",
               (torch.randint(0, 50, (3, 20), generator=g), _neighbour_order(4, 5), 4, 5))
    yield Case("a random order, (1, 64) -> 8x8",
               (torch.randint(0, 50, (1, 64), generator=g), torch.randperm(64, generator=g), 8, 8))


FROM_ORDER_MISTAKES = [
    Mistake(lambda seq, order, h, w: seq[:, order].reshape(seq.shape[0], h, w),
            "that is seq[:, order], the order applied a second time; the map needs its inverse: the token of "
            "step k goes to raster position order[k]"),
    Mistake(lambda seq, order, h, w: seq.reshape(seq.shape[0], h, w),
            "that ignores the order; it is only right for raster order, order = arange(h * w)"),
    Mistake(lambda seq, order, h, w: answers.from_order(seq, order, w, h).transpose(1, 2),
            "that fills the map column by column; raster position p is row p // w, column p % w"),
]


@chapter.exercise("3.2", reference=answers.from_order, hints=(
    "ask where each token goes: step k of the sequence generated raster position order[k]",
    "build the raster sequence first, a (B, h * w) tensor whose position order[k] holds seq[:, k] (an indexed "
    "assignment, or index with the inverse permutation torch.argsort(order)); then it is a reshape",
    "flat = torch.empty_like(seq); flat[:, order] = seq; return flat.reshape(B, h, w)",
))
def from_order(fn, ref_fn):
    compare_cases(fn, ref_fn, _from_order_cases(), mistakes=FROM_ORDER_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 3.3 training pairs


def _pairs_cases() -> Iterator[Case]:
    g = _gen(2)
    yield Case("4 sequences of 9 tokens", (torch.randint(0, 20, (4, 9), generator=g),))
    yield Case("3 sequences of 64 tokens (8x8 maps)", (torch.randint(0, 256, (3, 64), generator=g),))
    yield Case("2 sequences of 2 tokens", (torch.tensor([[5, 6], [7, 5]]),))
    yield Case("1 sequence of 1 token (the model reads only the class)", (torch.tensor([[3]]),))


@chapter.exercise("3.3", reference=ref.make_training_pairs, hints=(
    "write down what the model reads at each position and what it must predict there; position 0 holds the "
    "class, not a token",
    "the class embedding fills position 0 and predicts t_0, so the targets are all L tokens (no shift); the "
    "inputs are the tokens read after the class, t_0 .. t_{L-2}: the last token is never read",
    "return tokens[:, :-1], tokens",
))
def make_training_pairs(fn, ref_fn):
    compare_cases(fn, ref_fn, _pairs_cases(), mistakes=[
        Mistake(lambda tokens: (tokens[:, :-1], tokens[:, 1:]),
                "that is a text model's shift (targets t_1 .. t_{L-1}); here the class position predicts t_0, so "
                "the targets are all L tokens")])


# --------------------------------------------------------------------------------------------------------
# 3.4 condition dropout


def _dropout_cases() -> Iterator[tuple[str, torch.Tensor, float, int, int]]:
    yield "1000 classes 0..9, p = 0.1, null 10", torch.arange(1000) % 10, 0.1, 10, 0
    yield "7 classes, p = 0.5, null 4", torch.tensor([0, 1, 2, 3, 0, 1, 2]), 0.5, 4, 1
    yield "50 classes, p = 0 (nothing dropped)", torch.arange(50) % 10, 0.0, 10, 2
    yield "50 classes, p = 1 (everything dropped)", torch.arange(50) % 10, 1.0, 10, 3


def _dropout_where_above(classes: torch.Tensor, p: float, null: int, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(classes.shape, generator=generator, device=classes.device)
    return torch.where(u >= p, torch.full_like(classes, null), classes)


@chapter.exercise("3.4", reference=ref.condition_dropout, hints=(
    "each class is replaced by the null class with probability p, independently, using random numbers from "
    "the generator you are given",
    "draw one uniform number per class with a single torch.rand call on the generator, replace the class where "
    "the number is below p, and build a new tensor instead of writing into classes",
    "u = torch.rand(classes.shape, generator=generator); return torch.where(u < p, torch.full_like(classes, "
    "null), classes)",
))
def condition_dropout(fn, ref_fn):
    for name, classes, p, null, seed in _dropout_cases():
        original = classes.clone()
        got = call(fn, classes, p, null, _gen(seed), where=name)
        if not torch.equal(classes, original):
            raise CheckFailure(f"your function changed its input classes on input {name!r}; return a new tensor")
        expected = ref_fn(original, p, null, _gen(seed))
        try:
            compare(got, expected, where=name)
        except CheckFailure as exc:
            upside_down = Mistake(_dropout_where_above, "that drops where the number is at least p, i.e. with "
                                  "probability 1 - p")
            raise explain(exc, [upside_down], Case(name, (original, p, null, _gen(seed))), got) from None


# --------------------------------------------------------------------------------------------------------
# 3.5 the sampling loop, with the guidance mix


def tiny_model(seed: int = 0, class_scale: float = 50.0) -> GPT:
    """A tiny class-conditional GPT (13 codes, 3x4 maps, 5 classes) whose class token matters a lot (with
    ``class_scale = 1``, a mild one: flat next-token distributions, where mixing probabilities instead of
    logits shows)."""
    torch.manual_seed(seed)
    model = GPT(raster_config(13, (3, 4), n_classes=5, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():
        model.wce.weight.mul_(class_scale)
    return model.eval()


def _sampling_cases() -> Iterator[tuple[str, dict]]:
    classes = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4])
    yield "8 classes, 12 tokens, w 2, top_k 6", dict(classes=classes, num_tokens=12, cfg=2.0,
                                                     sampling=SamplingConfig(top_k=6))
    yield "8 classes, 12 tokens, w -1 (unconditional)", dict(classes=classes, num_tokens=12, cfg=-1.0)
    yield "3 classes, 7 tokens, w 0 (conditional)", dict(classes=classes[:3], num_tokens=7, cfg=0.0)
    yield "8 classes, 12 tokens, w 1, greedy", dict(classes=classes, num_tokens=12, cfg=1.0, sampling=GREEDY)
    yield "a mild class token, 8 classes, 12 tokens, w 3", dict(classes=classes, num_tokens=12, cfg=3.0, model="mild")


def _with_cfg(transform):
    """The reference sampler run with guidance strength ``transform(w)``: the tokens a mis-written mix gives."""
    def sampler(model, classes, num_tokens, *, cfg=0.0, sampling=SamplingConfig(), generator=None):
        return answers.sample_tokens(model, classes, num_tokens, cfg=transform(cfg), sampling=sampling,
                                     generator=_gen(11))
    return sampler


SAMPLER_MISTAKES = [
    # u + s (c - u) with s = w is (1 + (w - 1)) c - (w - 1) u: the reference at w - 1
    Mistake(_with_cfg(lambda w: w - 1), "that reads w as the papers' scale s = 1 + w (uncond + w * (cond - uncond)); "
                                        "here w = 0 must give the conditional logits exactly"),
    # (1 + w) u - w c is the reference at -1 - w
    Mistake(_with_cfg(lambda w: -1 - w), "the halves are swapped: rows 0..B-1 carry the classes (cond), rows B..2B-1 "
                                         "the null class (uncond)"),
]


@chapter.exercise("3.5", reference=answers.sample_tokens, hints=(
    "one forward pass per token, each over the new token only (the KV cache remembers the rest), on one batch "
    "that holds both the conditional and the unconditional half",
    "run [classes; null classes] as one batch of 2B with model.make_cache(2B); the first pass takes an empty "
    "(2B, 0) input, every later pass the last sampled token repeated for both halves; mix the two halves' "
    "logits, (1 + w) * cond - w * uncond (logits, not probabilities), before sampling",
    "per step: logits = last-position logits of the 2B rows; mixed = sampling.cfg_mix(logits[:B], logits[B:], "
    "cfg); tok = sampling.sample(mixed, sampling=sampling, generator=generator); feed tok.repeat(2)[:, None] "
    "next",
))
def sample_tokens(fn, ref_fn):
    models = {"sharp": tiny_model(), "mild": tiny_model(1, class_scale=1.0)}
    for name, kw in _sampling_cases():
        model = models[kw.pop("model", "sharp")]
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
        try:
            compare(got, expected, where=name, name="sampled tokens")
        except CheckFailure as exc:
            case = Case(name, (model, kw["classes"].clone(), kw["num_tokens"]),
                        {k: v for k, v in kw.items() if k not in ("classes", "num_tokens")})
            raise explain(exc, SAMPLER_MISTAKES, case, got) from None


# --------------------------------------------------------------------------------------------------------
# 3.6 the Frechet distance


def _frechet_cases() -> Iterator[Case]:
    g = _gen(5)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(150, 6, generator=g, dtype=torch.float64) @ mix * 0.7 + 0.5
    yield Case("200 vs 150 features of 6 dims, shifted and correlated", (a, b))
    yield Case("a set against itself (distance ~0)", (a, a.clone()))
    yield Case("40 vs 40 features of 3 dims", (torch.randn(40, 3, generator=g, dtype=torch.float64) @ mix[:3, :3],
                                                torch.randn(40, 3, generator=g, dtype=torch.float64) * 2))


def _frechet_variant(a: torch.Tensor, b: torch.Tensor, *, ddof: int = 1, elementwise: bool = False) -> float:
    """The Frechet distance with one thing changed: biased covariances or an elementwise square root."""
    x, y = a.double().numpy(), b.double().numpy()
    s_a, s_b = np.cov(x, rowvar=False, ddof=ddof), np.cov(y, rowvar=False, ddof=ddof)
    prod = s_a @ s_b
    with np.errstate(invalid="ignore"):  # an entry-wise root of a negative entry is NaN, as the learner's is
        root = np.sqrt(prod) if elementwise else linalg.sqrtm(prod).real
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root))


FRECHET_MISTAKES = [
    Mistake(lambda a, b: _frechet_variant(a, b, ddof=0),
            "those covariances divide by N; the unbiased ones divide by N - 1"),
    Mistake(lambda a, b: _frechet_variant(a, b, elementwise=True),
            "that takes the square root of each entry of S_a S_b; the formula needs the matrix square root"),
]


@chapter.exercise("3.6", reference=metrics.frechet_distance_from_features, hints=(
    "fit a Gaussian (a mean and a covariance) to each set of features and measure how far apart the two "
    "Gaussians are",
    "||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr(sqrtm(S_a S_b)), with unbiased covariances (divide by N - 1, "
    "as np.cov does) and a matrix square root, not an elementwise one",
    "s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False); root = scipy.linalg.sqrtm(s_a @ s_b).real; "
    "return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * root))",
))
def frechet_distance(fn, ref_fn):
    for case in _frechet_cases():
        expected = ref_fn(*clone_args(case.args))
        got = call(fn, *clone_args(case.args), where=case.name)
        try:
            compare(got, expected, where=case.name, name="distance", atol=1e-6, rtol=1e-5)
        except CheckFailure as exc:
            raise explain(exc, FRECHET_MISTAKES, case, got, atol=1e-6, rtol=1e-5) from None
