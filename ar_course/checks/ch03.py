"""Checks for chapter 03, autoregressive images: ``checks.ch03.from_order(from_order)`` etc.

References live in :mod:`ar_course.metrics`, :mod:`ar_course.raster.orders` and, for what the library runs
inside other functions (the training loss of its trainer, the sampling loop of ``GPT.generate``),
:mod:`ar_course.checks.reference.ch03`. The training-loss check records the classes the model receives, so
the condition dropout is checked statistically (its rate, its null class, its generator), and follows the
gradient back to the model's weights. The sampling check runs the learner's loop on a tiny seeded GPT and
compares the sampled tokens with the reference under the same generator seed; it also records every forward
pass, so a loop that ignores the KV cache, or hands the work to ``GPT.generate``, is named. Checks whose
learner function gets tensors also fail a function that changes them in place. The training loss also runs once
off the CPU (:func:`~ar_course.checks.core.check_off_cpu`): its dropout draws, made on the CPU, must move to the
classes' device.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch
from scipy import linalg

from ar_course import metrics
from ar_course.checks.core import (Case, Chapter, CheckFailure, Mistake, call, check_draws_follow_generator,
                                   check_off_cpu, check_unchanged, clone_args, compare, compare_cases,
                                   compare_explained, describe, explain, running)
from ar_course.checks.reference import ch03 as answers
from ar_course.raster import orders
from ar_course.raster.model import raster_config
from ar_course.sampling import GREEDY, SamplingConfig, sample
from ar_course.transformer.model import GPT

chapter = Chapter(3, "Autoregressive images")
use = chapter.use
hint = chapter.hint


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _maps(g: torch.Generator, B: int, h: int, w: int, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (B, h, w), generator=g)


# --------------------------------------------------------------------------------------------------------
# 3.1 back to a map from any generation order


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


@chapter.exercise("3.1", reference=answers.from_order, hints=(
    "ask where each token goes: step k of the sequence generated raster position order[k]",
    "build the raster sequence first, a (B, h * w) tensor whose position order[k] holds seq[:, k] (an indexed "
    "assignment, or index with the inverse permutation torch.argsort(order)); then it is a reshape",
    "flat = torch.empty_like(seq); flat[:, order] = seq; return flat.reshape(B, h, w)",
))
def from_order(fn, ref_fn):
    compare_cases(fn, ref_fn, _from_order_cases(), mistakes=FROM_ORDER_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 3.2 the training loss: raster order, the class position, condition dropout


def _loss_cases() -> Iterator[Case]:
    g = _gen(2)
    yield Case("6 maps of 3x4, p_uncond 0", (_maps(g, 6, 3, 4, 13), torch.tensor([0, 1, 2, 3, 4, 0])),
               {"p_uncond": 0.0})
    yield Case("1 map of 3x4, p_uncond 0", (_maps(g, 1, 3, 4, 13), torch.tensor([3])), {"p_uncond": 0.0})
    yield Case("5 maps of 3x4, p_uncond 1 (every class dropped)", (_maps(g, 5, 3, 4, 13), torch.arange(5)),
               {"p_uncond": 1.0})


def _text_shift_loss(model, maps, classes, *, p_uncond, generator=None):
    """The mistake: a text model's shift, the output at position i scored against token i + 1."""
    seq = maps.reshape(maps.shape[0], -1)  # (B, L)
    logits, _ = model(seq[:, :-1], classes=classes)  # (B, L, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))


def _loss_with(*, p=None, null=None):
    """The reference loss with the dropout rate ``p(p_uncond)`` or the dropped classes' value ``null`` changed."""
    def loss(model, maps, classes, *, p_uncond, generator=None):
        rate = p_uncond if p is None else p(p_uncond)
        dropped = torch.where(torch.rand(classes.shape[0], generator=generator) < rate,
                              torch.full_like(classes, model.null_class if null is None else null), classes)
        return answers.training_loss(model, maps, dropped, p_uncond=0.0)
    return loss


LOSS_MISTAKES = [
    Mistake(_loss_with(p=lambda p: 0.0), "no class was dropped: replace it by model.null_class where "
                                         "torch.rand(B, generator=generator) < p_uncond"),
    Mistake(_loss_with(p=lambda p: 1 - p), "that drops with probability 1 - p: replace the class where the number "
                                           "is below p_uncond"),
    Mistake(_loss_with(null=0), "a dropped class became 0, a real digit class; it must become the null class, "
                                "model.null_class"),
    Mistake(lambda model, maps, classes, **kw: answers.training_loss(model, maps.transpose(1, 2), classes, **kw),
            "that reads the map column by column; raster order reads it row by row, token (i, j) at i * w + j"),
    Mistake(_text_shift_loss, "that is a text model's shift (output i scored against token i + 1); here the class "
                              "position predicts t_0, so output i predicts token i and every token is a target"),
]


def _classes_seen(model: GPT) -> tuple[list, Callable[[], None]]:
    """Record the ``classes`` every forward pass of ``model`` receives; returns (records, remove)."""
    seen: list = []

    def hook(module, args, kwargs):
        seen.append(kwargs["classes"] if "classes" in kwargs else (args[2] if len(args) > 2 else None))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True).remove


def _dropped_classes(fn, model: GPT, classes: torch.Tensor, p: float, seed: int, where: str) -> torch.Tensor:
    """The classes the learner's loss hands the model for 2000 maps at dropout rate ``p``."""
    maps = _maps(_gen(20), classes.shape[0], 1, 2, 13)  # short maps: only the classes the model gets matter here
    original = classes.clone()
    seen, remove = _classes_seen(model)
    try:
        call(fn, model, maps, classes, p_uncond=p, generator=_gen(seed), where=where)
    finally:
        remove()
    check_unchanged(("classes",), (original,), (classes,), where)
    given = [c for c in seen if c is not None]
    if len(given) != 1:
        raise CheckFailure(f"on input {where!r} the model got classes in {len(given)} forward passes, expected one "
                           "pass: model(inputs, targets=targets, classes=dropped_classes)")
    return given[0].cpu()


def _check_dropout(fn) -> None:
    """The dropped fraction follows p, only dropped classes change, they become the null class, and the draws
    come from the generator given."""
    model, B, p = tiny_model(), 2000, 0.3
    classes = torch.arange(B) % 5
    where = f"{B} maps, p_uncond {p}"
    got = _dropped_classes(fn, model, classes, p, 7, where)
    changed = got != classes
    if bool((got[changed] != model.null_class).any()):
        bad = int(got[changed][got[changed] != model.null_class][0])
        raise CheckFailure(f"on input {where!r} a dropped class became {bad}; it must become the null class, "
                           f"model.null_class = {model.null_class}")
    rate, tol = float(changed.float().mean()), 4 * (p * (1 - p) / B) ** 0.5
    if abs(rate - p) > tol:
        flipped = " (that drops with probability 1 - p: keep the class where the number is >= p)" \
            if abs(rate - (1 - p)) <= tol else ""
        raise CheckFailure(f"on input {where!r} {rate:.1%} of the classes were dropped, expected {p:.0%} "
                           f"+- {tol:.1%}{flipped}")
    again = _dropped_classes(fn, model, classes, p, 7, where)
    other = _dropped_classes(fn, model, classes, p, 8, where)
    if not torch.equal(got, again):
        raise CheckFailure(f"on input {where!r} the dropped classes do not follow the generator: draw them with "
                           "torch.rand(B, generator=generator); two runs with identically seeded generators "
                           "dropped different classes, so the draws come from elsewhere, such as the global random "
                           "state")
    if torch.equal(got, other):
        raise CheckFailure(f"on input {where!r} the dropped classes do not follow the generator: draw them with "
                           "torch.rand(B, generator=generator); generators seeded 7 and 8 dropped the same "
                           "classes, so the generator given is not used (a fixed seed, or a generator made inside "
                           "the function, repeats the same draws)")


@chapter.exercise("3.2", reference=answers.training_loss, hints=(
    "three steps: the maps as raster sequences, the classes some of which become the null class, and the "
    "inputs/targets of a model whose position 0 holds the class",
    "the class position predicts t_0, so the targets are all L tokens and the inputs are t_0 .. t_{L-2}; drop a "
    "class where torch.rand(B, generator=generator) < p_uncond, into a new tensor",
    "seq = maps.reshape(B, -1); drop = (torch.rand(B, generator=generator) < p_uncond).to(classes.device); "
    "cls = torch.where(drop, torch.full_like(classes, model.null_class), classes); "
    "return model(seq[:, :-1], targets=seq, classes=cls)[1]",
))
def training_loss(fn, ref_fn):
    model = tiny_model()
    weights = list(model.parameters())
    for case in _loss_cases():
        expected = ref_fn(model, *clone_args(case.args), generator=_gen(3), **case.kwargs)
        args = clone_args(case.args)
        got = call(fn, model, *args, generator=_gen(3), where=case.name, **case.kwargs)
        check_unchanged(("maps", "classes"), case.args, args, case.name)
        if not isinstance(got, torch.Tensor) or not got.requires_grad:
            raise CheckFailure(f"on input {case.name!r} return the loss as a tensor autograd can differentiate (got "
                               f"{describe(got)}); training calls loss.backward()")
        if got.grad_fn is None or all(g is None for g in torch.autograd.grad(got.sum(), weights, allow_unused=True)):
            raise CheckFailure(f"on input {case.name!r} no gradient flows from your loss back to the model's weights: "
                               "it was rebuilt from a number (.item(), .detach(), torch.tensor(...)), so "
                               "loss.backward() would train nothing")
        # tight tolerances: with every class dropped, the loss moves by only ~1e-4 with the class the model gets,
        # so another real class would pass (or be named as class 0) at the default ones
        try:
            compare(got, expected, where=case.name, name="loss", atol=1e-6, rtol=1e-5)
        except CheckFailure as failure:
            explained = explain(failure, LOSS_MISTAKES, Case(case.name, (model, *case.args), case.kwargs), got,
                                atol=1e-6, rtol=1e-5)
            if explained is failure:  # no mistake named: the dropout check may say which class the model got
                _check_dropout(fn)
            raise explained from None
    _check_confident_model(fn, ref_fn)
    _check_dropout(fn)
    # the notebook trains on DEVICE with a CPU generator: the dropout draws must move to the classes' device
    check_off_cpu(fn, Case("4 maps of 3x4, p_uncond 0.5", (model, _maps(_gen(4), 4, 3, 4, 13), torch.arange(4)),
                           {"p_uncond": 0.5, "generator": _gen(3)}))


def _check_confident_model(fn, ref_fn) -> None:
    """A model with logits in the hundreds (its tied output head scaled 300x): most target probabilities underflow
    float32, so a loss taken as the log of a softmax is inf where the cross-entropy of the logits is finite."""
    where = "4 maps of 3x4, p_uncond 0, a confident model (logits in the hundreds)"
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(300.0)
    maps, classes = _maps(_gen(31), 4, 3, 4, 13), torch.arange(4)
    expected = ref_fn(model, maps.clone(), classes.clone(), p_uncond=0.0, generator=_gen(3))
    got = call(fn, model, maps.clone(), classes.clone(), p_uncond=0.0, generator=_gen(3), where=where)
    if isinstance(got, torch.Tensor) and got.numel() == 1 and bool(torch.isinf(got).all()):
        raise CheckFailure(f"the loss is inf on input {where!r}: a target whose softmax probability underflows to 0 "
                           "gives -log 0; score the logits with F.cross_entropy (or log_softmax), never the log of a "
                           "softmax")
    compare(got, expected, where=where, name="loss", atol=1e-4)


# --------------------------------------------------------------------------------------------------------
# 3.3 the sampling loop, with the guidance mix


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
    yield "a mild class token, 8 classes, 12 tokens, w 1.5, temperature 0.6, top_p 0.9", dict(
        classes=classes, num_tokens=12, cfg=1.5, sampling=SamplingConfig(temperature=0.6, top_p=0.9), model="mild")


_LIBRARY_LOOP = inspect.unwrap(GPT.generate).__code__


def _with_cfg(transform):
    """The reference sampler run with guidance strength ``transform(w)``: the tokens a mis-written mix gives."""
    def sampler(model, classes, num_tokens, *, cfg=0.0, sampling=SamplingConfig(), generator=None):
        return answers.sample_tokens(model, classes, num_tokens, cfg=transform(cfg), sampling=sampling,
                                     generator=_gen(11))
    return sampler


def _loop_with(mix: str):
    """A sampling loop as a learner writes it, with the guidance step ``mix`` done wrong: "unmixed" (each half
    sampled from its own logits), "probabilities" (the probabilities mixed, not the logits) or
    "temperature_twice" (the mix divided by the temperature before ``sample``, which divides again)."""
    @torch.no_grad()
    def sampler(model, classes, num_tokens, *, cfg=0.0, sampling=SamplingConfig(), generator=None):
        generator, B = _gen(11), classes.shape[0]
        cls = torch.cat([classes, torch.full_like(classes, model.null_class)])  # (2B,)
        seq = torch.zeros(2 * B, 0, dtype=torch.long, device=classes.device)  # (2B, 0)
        cache = model.make_cache(2 * B)
        for t in range(num_tokens):
            logits = model(seq[:, -1:] if t else seq, classes=None if t else cls, cache=cache)[0][:, -1]  # (2B, V)
            cond, uncond = logits[:B], logits[B:]
            if mix == "unmixed":
                nxt = sample(logits, sampling=sampling, generator=generator)  # (2B,)
            else:
                if mix == "probabilities":
                    mixed = ((1 + cfg) * cond.softmax(-1) - cfg * uncond.softmax(-1)).clamp_min(1e-30).log()
                else:
                    mixed = (1 + cfg) * cond - cfg * uncond
                if mix == "temperature_twice" and sampling.temperature > 0:
                    mixed = mixed / sampling.temperature
                nxt = sample(mixed, sampling=sampling, generator=generator).repeat(2)  # (2B,)
            seq = torch.cat([seq, nxt[:, None]], 1)
        return seq[:B]
    return sampler


SAMPLER_MISTAKES = [
    # u + s (c - u) with s = w is (1 + (w - 1)) c - (w - 1) u: the reference at w - 1
    Mistake(_with_cfg(lambda w: w - 1), "that reads w as LlamaGen's scale s = 1 + w (uncond + w * (cond - uncond)); "
                                        "here w = 0 must give the conditional logits exactly"),
    # (1 + w) u - w c is the reference at -1 - w
    Mistake(_with_cfg(lambda w: -1 - w), "the halves are swapped: rows 0..B-1 carry the classes (cond), rows B..2B-1 "
                                         "the null class (uncond)"),
    Mistake(_with_cfg(lambda w: 0.0), "those are the tokens of w = 0, with no guidance: the guidance cancels when "
                                      "both halves carry the classes (the second half needs model.null_class), or "
                                      "when w is left out of the mix"),
    Mistake(_loop_with("unmixed"), "each half was sampled from its own logits; the two halves' logits must be mixed "
                                   "into one distribution, and the one token drawn from it fed to both halves"),
    Mistake(_loop_with("probabilities"), "that mixes the probabilities, (1 + w) p_cond - w p_uncond; guidance mixes "
                                         "the logits, which gives another distribution"),
    Mistake(_loop_with("temperature_twice"), "the logits were divided by the temperature twice: sample(...) already "
                                             "divides by sampling.temperature"),
]


@chapter.exercise("3.3", reference=answers.sample_tokens, hints=(
    "one forward pass per token, each over the new token only (the KV cache remembers the rest), on one batch "
    "that holds both the conditional and the unconditional half",
    "run [classes; null classes] as one batch of 2B with model.make_cache(2B); the first pass takes an empty "
    "(2B, 0) input, every later pass the last sampled token repeated for both halves; mix the two halves' "
    "logits, (1 + w) * cond - w * uncond (logits, not probabilities), before sampling",
    "per step: logits = last-position logits of the 2B rows; mixed = (1 + cfg) * logits[:B] - cfg * logits[B:]; "
    "tok = sample(mixed, sampling=sampling, generator=generator) (the function `sample`: inside the loop the name "
    "`sampling` is the SamplingConfig argument, not the module); feed tok.repeat(2)[:, None] next",
))
def sample_tokens(fn, ref_fn):
    models = {"sharp": tiny_model(), "mild": tiny_model(1, class_scale=1.0)}
    for name, kw in _sampling_cases():
        model = models[kw.pop("model", "sharp")]
        lengths: list[int] = []
        library = [False]  # whether a pass ran inside the library's loop

        def record(module, args, kwargs):
            lengths.append(args[0].shape[1] if args else kwargs["idx"].shape[1])
            library[0] = library[0] or running(_LIBRARY_LOOP)

        hook = model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            got = call(fn, model, kw["classes"].clone(), kw["num_tokens"], where=name,
                       generator=_gen(11), **{k: v for k, v in kw.items() if k not in ("classes", "num_tokens")})
        finally:
            hook.remove()
        expected = ref_fn(model, kw["classes"].clone(), kw["num_tokens"], generator=_gen(11),
                          **{k: v for k, v in kw.items() if k not in ("classes", "num_tokens")})
        if library[0] and fn is not ref_fn:  # the answer key is that loop
            raise CheckFailure(f"on input {name!r} your function runs model.generate, the library's version of this "
                               "loop: the exercise is to write it")
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
            _check_follows_generator(fn, case, got, exc)
            raise explain(exc, SAMPLER_MISTAKES, case, got) from None


def _check_follows_generator(fn: Callable, case: Case, got: torch.Tensor, failure: CheckFailure) -> None:
    """Run the learner's sampler once more with an identically seeded generator: different tokens mean its draws
    do not all come from ``generator``."""
    model, classes, num_tokens = case.args
    again = call(fn, model, classes.clone(), num_tokens, where=case.name, generator=_gen(11), **case.kwargs)
    check_draws_follow_generator(failure, got, again)


# --------------------------------------------------------------------------------------------------------
# 3.4 the Frechet distance


def _frechet_cases() -> Iterator[Case]:
    g = _gen(5)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(150, 6, generator=g, dtype=torch.float64) @ mix * 0.7 + 0.5
    yield Case("200 vs 150 features of 6 dims, shifted and correlated", (a, b))
    yield Case("a set against itself (distance ~0)", (a, a.clone()))
    yield Case("40 vs 40 features of 3 dims", (torch.randn(40, 3, generator=g, dtype=torch.float64) @ mix[:3, :3],
                                                torch.randn(40, 3, generator=g, dtype=torch.float64) * 2))


def _frechet_variant(a: torch.Tensor, b: torch.Tensor, *, ddof: int = 1, elementwise: bool = False,
                     separate: bool = False, entrywise_product: bool = False, no_root: bool = False,
                     mean_term: bool = True) -> float:
    """The Frechet distance with one thing changed: biased covariances, an elementwise square root, the
    product of the two covariances' square roots, the root of their entrywise product, no square root at all, or
    no mean term."""
    x, y = a.double().numpy(), b.double().numpy()
    s_a, s_b = np.cov(x, rowvar=False, ddof=ddof), np.cov(y, rowvar=False, ddof=ddof)
    if no_root:
        root = s_a @ s_b
    elif entrywise_product:
        root = np.sqrt(np.abs(s_a * s_b))  # its trace only sees the diagonals, sum sqrt(var_a * var_b)
    elif separate:
        root = linalg.sqrtm(s_a).real @ linalg.sqrtm(s_b).real
    elif elementwise:
        with np.errstate(invalid="ignore"):  # an entry-wise root of a negative entry is NaN, as the learner's is
            root = np.sqrt(s_a @ s_b)
    else:
        root = linalg.sqrtm(s_a @ s_b).real
    means = ((x.mean(0) - y.mean(0)) ** 2).sum() if mean_term else 0.0
    return float(means + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root))


FRECHET_MISTAKES = [
    Mistake(lambda a, b: _frechet_variant(a, b, ddof=0),
            "those covariances divide by N; the unbiased ones divide by N - 1"),
    Mistake(lambda a, b: _frechet_variant(a, b, elementwise=True),
            "that takes the square root of each entry of S_a S_b; the formula needs the matrix square root"),
    Mistake(lambda a, b: _frechet_variant(a, b, separate=True),
            "that multiplies the square roots of S_a and S_b; the formula takes the square root of their product "
            "(two covariances rarely commute, so the two differ)"),
    Mistake(lambda a, b: _frechet_variant(a, b, no_root=True),
            "the square root is missing: the formula has 2 tr((S_a S_b)^(1/2)), not 2 tr(S_a S_b) (without the root "
            "the 'distance' can even come out negative)"),
    Mistake(lambda a, b: _frechet_variant(a, b, mean_term=False),
            "the term ||mu_a - mu_b||^2 is missing: that compares only the covariances, so two sets that differ by "
            "a shift would be at distance 0"),
    Mistake(lambda a, b: _frechet_variant(a, b, entrywise_product=True),
            "that takes the root of the entrywise product s_a * s_b, whose trace only sees each dimension's "
            "variance; the formula needs the matrix product S_a @ S_b and its matrix square root"),
]


@chapter.exercise("3.4", reference=metrics.frechet_distance_from_features, hints=(
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
        args = clone_args(case.args)
        got = call(fn, *args, where=case.name)
        check_unchanged(("feats_a", "feats_b"), case.args, args, case.name)
        compare_explained(got, expected, FRECHET_MISTAKES, case, name="distance", atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# 3.5 precision and recall


def _pr_cases() -> Iterator[Case]:
    g = _gen(6)
    real = torch.randn(300, 5, generator=g)
    yield Case("300 real vs 200 shifted, narrower fakes of 5 dims, k 3",
               (real, torch.randn(200, 5, generator=g) * 0.5 + 0.8), {"k": 3})
    yield Case("a set against itself, k 3", (real, real.clone()), {"k": 3})
    yield Case("300 real vs 120 noisy copies of 60 real points (a mode collapse), k 3",
               (real, real[:60].repeat(2, 1) + 0.05 * torch.randn(120, 5, generator=g)), {"k": 3})
    yield Case("150 vs 100 points on a 4x4 integer grid (many ties: a radius can be 0), k 3",
               (torch.randint(0, 4, (150, 2), generator=g).float(), torch.randint(0, 4, (100, 2), generator=g).float()),
               {"k": 3})
    yield Case("40 vs 30 points of 2 dims, k 1", (torch.randn(40, 2, generator=g),
                                                  torch.randn(30, 2, generator=g) * 1.5), {"k": 1})


def _pr_variant(real: torch.Tensor, fake: torch.Tensor, k: int = 3, *, self_count: bool = False,
                swap: bool = False, strict: bool = False, mean_radius: bool = False) -> tuple[float, float]:
    """Precision and recall with one thing changed (the wrong answers of exercise 3.5)."""
    def radii(x):  # distance of each row to its k-th nearest other row (k-th including itself if self_count)
        r = torch.cdist(x, x).kthvalue(k if self_count else k + 1, dim=1).values
        return r.mean().expand_as(r) if mean_radius else r

    def inside(query, support, r):
        d = torch.cdist(query, support)
        return float(((d < r) if strict else (d <= r)).any(dim=1).double().mean())

    precision, recall = inside(fake, real, radii(real)), inside(real, fake, radii(fake))
    return (recall, precision) if swap else (precision, recall)


PR_MISTAKES = [Mistake(partial(_pr_variant, **{slip: True}), says) for slip, says in [
    ("self_count", "each radius counts the point as its own nearest neighbour (distance 0): the k-th nearest *other* "
                   "point is the (k + 1)-th smallest distance in its row"),
    ("swap", "precision and recall are swapped: precision asks how many generated points lie on the real manifold, "
             "recall how many real points lie on the generated one"),
    ("strict", "a point exactly on a ball's boundary was left out (distance < radius); it is inside (<=), which "
               "matters where points coincide and a radius is 0"),
    ("mean_radius", "every ball got the same radius, the mean of the radii; each point's ball has its own radius, "
                    "the distance to its own k-th nearest neighbour"),
]]


@chapter.exercise("3.5", reference=metrics.precision_recall, hints=(
    "each set stands for a manifold: the union of balls around its points; precision tests the generated points "
    "against the real manifold, recall the real points against the generated one",
    "a point's radius is the distance to its k-th nearest neighbour in its own set, itself excluded (torch.cdist, "
    "then the (k + 1)-th smallest value of its row); a query point is inside when its distance to at "
    "least one support point is <= that point's radius",
    "def inside(qry, sup, r): return float((torch.cdist(qry, sup) <= r).any(1).double().mean()); "
    "radius(x) = torch.cdist(x, x).kthvalue(k + 1, dim=1).values; return inside(fake, real, radius(real)), "
    "inside(real, fake, radius(fake))",
))
def precision_recall(fn, ref_fn):
    for case in _pr_cases():
        expected = ref_fn(*clone_args(case.args), **case.kwargs)
        got = call(fn, *clone_args(case.args), where=case.name, **case.kwargs)
        try:
            compare(tuple(got) if isinstance(got, list) else got, expected, where=case.name,
                    name="(precision, recall)", atol=1e-6)
        except CheckFailure as exc:
            raise explain(exc, PR_MISTAKES, case, got, atol=1e-6) from None


# --------------------------------------------------------------------------------------------------------
# 3.6 the neighbour schedule


def _sorted_steps(steps, h: int, w: int, where: str) -> list[torch.Tensor]:
    """Each step's positions sorted by raster position (the order inside a step is free); checks the types."""
    if not isinstance(steps, (list, tuple)) or not all(isinstance(s, torch.Tensor) for s in steps):
        raise CheckFailure(f"on input {where!r} return a list of tensors, one per step, got {describe(steps)}")
    out = []
    for t, s in enumerate(steps):
        if s.ndim != 2 or s.shape[1] != 2 or s.dtype != torch.long:
            raise CheckFailure(f"on input {where!r} step {t} is {describe(s)}; each step is a (k, 2) long tensor "
                               "of (row, col) positions")
        out.append(s[torch.argsort(s[:, 0] * w + s[:, 1])])
    return out


def _steps_from(groups: dict[int, list[tuple[int, int]]]) -> list[torch.Tensor]:
    return [torch.tensor(groups[key], dtype=torch.long).reshape(-1, 2) for key in sorted(groups)]


def _main_diagonals(h: int, w: int) -> list[torch.Tensor]:
    groups: dict[int, list[tuple[int, int]]] = {}
    for i in range(h):
        for j in range(w):
            groups.setdefault(i - j, []).append((i, j))
    return _steps_from(groups)


SCHEDULE_MISTAKES = [
    ("the diagonals i - j = const", _main_diagonals,
     "those are the diagonals i - j = const; a token's upper neighbour (i - 1, j) sits on the same one, so it would "
     "not be known yet: step k holds the anti-diagonal i + j = k"),
    ("raster order", lambda h, w: [torch.tensor([[i, j]]) for i in range(h) for j in range(w)],
     "that is one token per step (raster order); the neighbour order generates a whole anti-diagonal per step"),
    ("(col, row) pairs", lambda h, w: [s.flip(1) for s in _neighbour_reference(h, w)],
     "each position is written (col, row); write (row, col)"),
]


def _neighbour_reference(h: int, w: int) -> list[torch.Tensor]:
    """The neighbour order's schedule, :func:`ar_course.raster.orders.schedule`, as the exercise's signature."""
    return orders.schedule("neighbour", h, w)


@chapter.exercise("3.6", reference=_neighbour_reference, hints=(
    "a token can be generated once its upper and left neighbours exist; which tokens become possible together?",
    "the tokens with i + j = k only need tokens with i + j = k - 1: group the positions by i + j; an h x w map "
    "has h + w - 1 such groups, from (0, 0) to (h - 1, w - 1)",
    "pos = [(i, j) for i in range(h) for j in range(w)]; return [torch.tensor([p for p in pos if sum(p) == k]) "
    "for k in range(h + w - 1)]",
))
def neighbour_schedule(fn, ref_fn):
    for h, w in [(3, 5), (5, 3), (1, 4), (4, 1), (1, 1), (8, 8)]:
        where = f"a {h}x{w} map"
        got = _sorted_steps(call(fn, h, w, where=where), h, w, where)
        expected = ref_fn(h, w)
        try:
            compare(got, expected, where=where, name="schedule")
        except CheckFailure as exc:
            for _, mistake, says in SCHEDULE_MISTAKES:
                wrong = _sorted_steps(mistake(h, w), h, w, where)
                if len(wrong) == len(got) and all(torch.equal(a, b) for a, b in zip(wrong, got)):
                    raise CheckFailure(f"{exc}; {says}") from None
            raise
