"""Checks for chapter 07, the full system: ``checks.ch07.var_pipeline(var_pipeline)`` etc.

References live in :mod:`ar_course.checks.reference.ch07`, except 7.4's, which is the library's own
:func:`ar_course.utils.generate_in_batches`. The pipeline check runs the learner's function next to the
reference under identically seeded generators, on the shipped MNIST models and on a tiny random tokenizer +
VAR with another schedule and three colour channels, and counts the forward passes. The other checks are
pure bookkeeping and run on hand-made tables whose answers differ between the right rule and
the usual slips (a ragged last chunk, a tie, a "min" objective, a floor met exactly); 7.3 and 7.5-7.7 also
check that the set, lists and table they are given come back unchanged (no in-place sort or remove). Every check
names the slip it recognises: a sign, the scale read as the strength, a ramp off, off by one or in raster order, the
finest scale left out, draws not from the generator, a CPU stand-in or numba picked first, torch.chunk, chunks
reversed, an average over chunks or a pass counted per image, "min" read as "max", equal rows knocking each other
out, a sum of objectives, the best quality or the first row taken.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from ar_course import utils
from ar_course.checks.core import (Case, Chapter, CheckFailure, Mistake, call, check_unchanged, compare,
                                   compare_explained, describe, explain)
from ar_course.checks.reference import ch07 as ref
from ar_course.tokenizers import VQVAE
from ar_course.tokenizers.vqvae import VQVAEConfig
from ar_course.var.model import VAR, VARConfig

chapter = Chapter(7, "The full system")
use = chapter.use
hint = chapter.hint


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------
# 7.1 the VAR pipeline


def _tiny_models(seed: int = 0) -> tuple[VAR, VQVAE]:
    """A random 3-channel 16x16 multi-scale tokenizer (scales 1, 2, 4; 13 codes) and a VAR over its tokens
    with randomised adaptive norms and a sharp head, so that guidance and the class change the samples."""
    torch.manual_seed(seed)
    tok = VQVAE(VQVAEConfig(in_channels=3, image_size=16, downsample=4, width=8, latent_dim=4, quantizer="msvq",
                            num_codes=13, scales=(1, 2, 4), num_phi=2)).eval()
    model = VAR(VARConfig(vocab_size=13, latent_dim=4, scales=(1, 2, 4), n_classes=3, n_layer=2, n_head=2,
                          n_embd=16)).eval()
    with torch.no_grad():
        tok.quantizer.quantizer.codebook.normal_()
        for name, p in model.named_parameters():
            if "ada" in name:
                p.normal_(std=0.5)
        model.head.weight.mul_(40)
    return model, tok


def _pipeline_cases() -> Iterator[tuple[str, VAR, VQVAE, torch.Tensor, float]]:
    from ar_course import var

    model, tok = _tiny_models()
    yield "tiny random VAR, scales (1, 2, 4), 3 channels, cfg 0", model, tok, torch.tensor([0, 2, 1, 2, 0]), 0.0
    yield "tiny random VAR, scales (1, 2, 4), 3 channels, cfg 1.5", model, tok, torch.tensor([1, 0, 2]), 1.5
    model, tok = var.load_pretrained("cpu")
    yield "shipped MNIST VAR, cfg 2", model, tok, torch.tensor([3, 1, 4, 1, 5, 9, 2]), 2.0


def _pipeline_with(model: VAR, tokenizer: VQVAE, classes: torch.Tensor, *, cfg: float = 0.0, generator=None,
                   cfg_plus_one: bool = False, ramp: bool = True, scales_kept: slice = slice(None)) -> torch.Tensor:
    """The pipeline with one slip: cfg + 1 passed as the strength (``cfg_plus_one``), the ramp off (``ramp``),
    or only part of the pyramid decoded (``scales_kept``). It draws from its own generator, seeded as the
    check's (``generator`` is ignored)."""
    from ar_course.var import sample_pyramid

    classes = classes.to(next(model.parameters()).device)
    pyramid = sample_pyramid(model, tokenizer.quantizer, classes, cfg=cfg + 1.0 if cfg_plus_one else cfg, ramp=ramp,
                             generator=_gen(7))
    return tokenizer.decode_from_indices(pyramid[scales_kept]).float().cpu()


PIPELINE_MISTAKES = [
    Mistake(lambda *args, **kwargs: _pipeline_with(*args, **kwargs, cfg_plus_one=True),
            "that samples with cfg + 1, LlamaGen's scale s = 1 + w of uncond + s * (cond - uncond); "
            "sample_pyramid's cfg is the strength w itself, and 0 means no guidance"),
    Mistake(lambda *args, **kwargs: _pipeline_with(*args, **kwargs, ramp=False),
            "that turns VAR's ramp off (ramp=False), so every scale gets the full cfg; the pipeline keeps the ramp, "
            "from no guidance at the first scale to cfg at the last"),
    Mistake(lambda *args, **kwargs: _pipeline_with(*args, **kwargs, scales_kept=slice(None, -1)),
            "that decodes the pyramid without its finest scale; the decoder needs every scale, coarse to fine"),
]


@chapter.exercise("7.1", reference=ref.var_pipeline, hints=(
    "two library calls make an image batch: sample the token pyramid for all classes at once, then decode the "
    "whole pyramid with the tokenizer",
    "var.sample_pyramid on the tokenizer's quantizer for the whole batch (cfg is the strength w, with VAR's "
    "ramp on), then tokenizer.decode_from_indices on the pyramid; return float images on the CPU",
    "one call var.sample_pyramid(model, tokenizer.quantizer, classes, cfg=cfg, generator=generator) for the "
    "whole batch, then tokenizer.decode_from_indices(pyramid) on the whole pyramid, .float().cpu()",
))
def var_pipeline(fn: Callable, ref_fn: Callable) -> None:
    for where, model, tok, classes, cfg in _pipeline_cases():
        with torch.no_grad():
            expected = ref_fn(model, tok, classes, cfg=cfg, generator=_gen(7))
        steps: list[int] = []
        step = model.step

        def counted_step(k, *args, **kwargs):
            steps.append(k)
            return step(k, *args, **kwargs)

        model.step = counted_step  # type: ignore[method-assign]
        try:
            with torch.no_grad():
                got = call(fn, model, tok, classes.clone(), cfg=cfg, generator=_gen(7), where=where)
        finally:
            del model.step
        S = model.config.num_scales
        if len(steps) != S:
            raise CheckFailure(f"on {where}, the model ran {len(steps)} scale steps for {classes.numel()} images; "
                               f"one batched sampling loop takes exactly {S} (one per scale)")
        try:
            compare(got, expected, where=where, name="images", atol=1e-5)
        except CheckFailure as exc:
            with torch.no_grad():
                again = call(fn, model, tok, classes.clone(), cfg=cfg, generator=_gen(7), where=where) \
                    if isinstance(got, torch.Tensor) else got
                if isinstance(again, torch.Tensor) and (got.shape != again.shape or not torch.equal(got, again)):
                    raise CheckFailure(f"{exc}; two runs with identically seeded generators gave different images: "
                                       "the tokens were drawn from the global random state, not all from "
                                       "`generator`") from None
                raise explain(exc, PIPELINE_MISTAKES, Case(where, (model, tok, classes.clone()), {"cfg": cfg}), got,
                              atol=1e-5) from None


# --------------------------------------------------------------------------------------------------------
# 7.2 the guidance convention


def _guidance_cases() -> Iterator[Case]:
    yield Case("w=2, var, 6 scales", (2.0, "var", 6))
    yield Case("w=1, ar, 64 tokens", (1.0, "ar", 64))
    yield Case("w=1.5, var, 4 scales, ramp=False", (1.5, "var", 4), {"ramp": False})
    yield Case("w=0.5, ar, 5 tokens, ramp=True (no ramp for raster order)", (0.5, "ar", 5), {"ramp": True})
    yield Case("w=3, var, 1 scale", (3.0, "var", 1))
    yield Case("w=0, var, 6 scales", (0.0, "var", 6))


def _pairs_of(strengths: list[float]) -> list[tuple[float, float]]:
    return [(1 + t, -t) for t in strengths]


def _ramped(w: float, method: str, num_steps: int, ramp: bool) -> bool:
    return method == "var" and ramp and num_steps > 1


def _guidance_sign_flipped(w, method, num_steps, ramp=True):
    return [(a, -b) for a, b in ref.guidance_weights(w, method, num_steps, ramp)]


def _guidance_w_as_scale(w, method, num_steps, ramp=True):
    return [(-b, 1 + b) for _, b in ref.guidance_weights(w, method, num_steps, ramp)]  # (t, 1 - t)


def _guidance_ramp_everywhere(w, method, num_steps, ramp=True):
    return ref.guidance_weights(w, "var" if method == "ar" else method, num_steps, ramp)


def _guidance_ramp_over_s(w, method, num_steps, ramp=True):
    if not _ramped(w, method, num_steps, ramp):
        return ref.guidance_weights(w, method, num_steps, ramp)
    return _pairs_of([w * k / num_steps for k in range(num_steps)])


def _guidance_ramp_from_first(w, method, num_steps, ramp=True):
    if not _ramped(w, method, num_steps, ramp):
        return ref.guidance_weights(w, method, num_steps, ramp)
    return _pairs_of([w * (k + 1) / num_steps for k in range(num_steps)])


GUIDANCE_MISTAKES = [
    Mistake(_guidance_sign_flipped, "the unconditional weight has the wrong sign: guidance pushes away from the "
                                    "unconditional prediction, so a_uncond is -t and the pair sums to 1"),
    Mistake(_guidance_w_as_scale, "that reads the strength as the scale s of uncond + s * (cond - uncond), which "
                                  "gives (s, 1 - s); a strength t is the scale s = 1 + t"),
    Mistake(_guidance_ramp_everywhere, "that ramps the strength in raster order too; only VAR ramps it over its "
                                       "scales, raster order guides every token with the full w"),
    Mistake(_guidance_ramp_over_s, "the ramp w * k / S never reaches w: it must run from 0 at the first scale to "
                                   "w at the last"),
    Mistake(_guidance_ramp_from_first, "the ramp w * (k + 1) / S starts above 0: the first scale gets no "
                                       "guidance and the last gets the full w"),
]


@chapter.exercise("7.2", reference=ref.guidance_weights, hints=(
    "every step mixes a_cond * cond + a_uncond * uncond; write both methods' mixes in one convention, a "
    "guidance strength t, and see how t changes from step to step",
    "strength t gives the pair (1 + t, -t); raster order uses t = w at every token; VAR ramps t from 0 at the "
    "first scale to w at the last (t = w throughout when ramp=False or S == 1); an unknown method is a "
    "ValueError",
    "t_k = w * k / (S - 1) for VAR with the ramp (S > 1), else w; return [(1 + t_k, -t_k) for each step]",
))
def guidance_weights(fn: Callable, ref_fn: Callable) -> None:
    for case in _guidance_cases():
        expected = torch.tensor(ref_fn(*case.args, **case.kwargs), dtype=torch.float64)  # (S, 2)
        got = call(fn, *case.args, where=case.name, **case.kwargs)
        try:
            got_t = torch.as_tensor(got, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise CheckFailure(f"on input {case.name!r}, return a list of (a_cond, a_uncond) pairs, got "
                               f"{describe(got)}") from None
        if tuple(got_t.shape) != tuple(expected.shape):
            raise CheckFailure(f"on input {case.name!r}, expected {expected.shape[0]} pairs (one per step), got "
                               f"shape {tuple(got_t.shape)}")
        bad = ~torch.isclose(got_t, expected, atol=1e-6, rtol=1e-6)  # float32 pairs (torch.linspace) are fine too
        if bool(bad.any()):
            k = int(bad.any(dim=1).nonzero()[0])
            failure = CheckFailure(f"on input {case.name!r}, step {k} has (a_cond, a_uncond) = "
                                   f"({got_t[k, 0]:.6g}, {got_t[k, 1]:.6g}), expected ({expected[k, 0] + 0.0:.6g}, "
                                   f"{expected[k, 1] + 0.0:.6g})")  # + 0.0: -0.0 prints as 0
            raise explain(failure, GUIDANCE_MISTAKES, case, got_t.tolist(), atol=1e-6, rtol=1e-6)
    _expect_error(fn, (1.0, "raster", 4), {}, ValueError, "an unknown method 'raster'")


# --------------------------------------------------------------------------------------------------------
# 7.3 choosing a backend


def _expect_error(fn: Callable, args: tuple, kwargs: dict, error: type, why: str) -> None:
    """The learner's function must raise ``error`` on these arguments."""
    shown = ", ".join([_show(a) for a in args] + [f"{k}={_show(v)}" for k, v in kwargs.items()])
    try:
        got = fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except error:
        return
    except Exception as exc:  # noqa: BLE001 - any other error is the wrong one
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckFailure(f"your function raised {type(exc).__name__} on ({shown}): {msg}; expected "
                           f"{error.__name__} for {why}") from None
    raise CheckFailure(f"your function returned {_show(got)} on ({shown}); expected a {error.__name__} for {why}")


def _show(x: Any) -> str:
    """Short text for an argument or result: literals as written, anything else described."""
    if isinstance(x, (str, int, float, bool, type(None))):
        return repr(x)
    if isinstance(x, (set, frozenset)):
        return repr(set(x)) if x else "set()"
    if isinstance(x, (list, tuple)) and len(repr(x)) < 80:
        return repr(x)
    return describe(x) if not callable(x) else "generate_fn"


def _backend_cases() -> Iterator[tuple[str, frozenset, str]]:
    subsets = [frozenset(), frozenset({"numba"}), frozenset({"triton"}), frozenset({"triton", "numba"})]
    for device in ("cuda", "cpu", "mps"):
        for available in subsets:
            for requested in ("auto", "torch", "triton", "numba"):
                yield device, available, requested


def _backend_auto(pick: Callable[[str, set], str]) -> Callable:
    """The reference with ``"auto"`` decided by ``pick(device_type, available)`` instead."""
    def choose(device_type, available, requested="auto"):
        return pick(device_type, available) if requested == "auto" else ref.choose_backend(device_type, available,
                                                                                            requested)
    return choose


BACKEND_MISTAKES = [
    Mistake(_backend_auto(lambda device, available: next((b for b in ("triton", "numba") if b in available), "torch")),
            "that lets 'auto' pick triton or numba off cuda; there they are only CPU stand-ins (an interpreter, a "
            "simulator), far slower than torch"),
    Mistake(_backend_auto(lambda device, available: "triton" if device == "cuda" else "torch"),
            "that takes 'triton' on cuda without looking at available; 'auto' may only pick a backend that can run "
            "here"),
    Mistake(_backend_auto(lambda device, available: next((b for b in ("numba", "triton") if b in available), "torch")
                          if device == "cuda" else "torch"),
            "that prefers numba to triton on cuda; Triton is the faster one there and comes first"),
    Mistake(_backend_auto(lambda device, available: "triton" if device == "cuda" and "triton" in available
                          else "torch"),
            "'auto' on cuda passed over numba although it is available; without triton, numba still comes before "
            "torch"),
]


@chapter.exercise("7.3", reference=ref.choose_backend, hints=(
    "separate the two kinds of request: a forced backend must run or fail loudly, while 'auto' picks the "
    "fastest backend that can run on this device",
    "'torch' is always allowed; a forced 'triton' or 'numba' must be in available, else RuntimeError; 'auto' "
    "on 'cuda' prefers triton, then numba, then torch, and on every other device takes torch (the CPU "
    "simulator and interpreter are far slower than torch); an unknown request is a ValueError",
    "if requested == 'auto': return next((b for b in ('triton', 'numba') if b in available), 'torch') if "
    "device == 'cuda' else 'torch'; a forced backend is returned when it is 'torch' or in available",
))
def choose_backend(fn: Callable, ref_fn: Callable) -> None:
    for device, available, requested in _backend_cases():
        shown = f"choose_backend({device!r}, {set(available) or 'set()'}, {requested!r})"
        try:
            expected = ref_fn(device, set(available), requested)
        except RuntimeError:
            _expect_error(fn, (device, set(available), requested), {}, RuntimeError,
                          f"a forced backend that is not available on {device}")
            continue
        given = set(available)
        got = call(fn, device, given, requested, where=shown)
        check_unchanged(("available",), (set(available),), (given,), shown)
        if not isinstance(got, str):  # a numpy string array would make `got != expected` raise
            raise CheckFailure(f"{shown} returned {describe(got)}; return the back-end's name, a str such as "
                               f"{expected!r}")
        if got != expected:
            raise explain(CheckFailure(f"{shown} returned {got!r}, expected {expected!r}"), BACKEND_MISTAKES,
                          Case(shown, (device, set(available), requested)), got)
    _expect_error(fn, ("cuda", {"triton"}, "flash"), {}, ValueError, "an unknown request 'flash'")


# --------------------------------------------------------------------------------------------------------
# 7.4 batched generation


class _Recorder:
    """A stand-in generator: records every chunk and returns one (1, 1, 3) "image" per class holding
    (class, call number, position in the chunk)."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __repr__(self) -> str:  # how a failure message lists it among the arguments
        return "generate_fn"

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        self.calls.append(chunk.detach().clone())
        b = chunk.shape[0]
        call_no = torch.full((b,), float(len(self.calls) - 1))
        pos = torch.arange(b, dtype=torch.float32)
        return torch.stack([chunk.float(), call_no, pos], dim=1).view(b, 1, 1, 3)  # (b, 1, 1, 3)


def _batch_cases() -> Iterator[tuple[str, torch.Tensor, int]]:
    g = _gen(74)
    yield "23 classes, batch_size 5 (ragged last chunk)", torch.randint(0, 10, (23,), generator=g), 5
    yield "20 classes, batch_size 5", torch.arange(10).repeat(2), 5
    yield "7 classes, batch_size 10", torch.tensor([9, 8, 7, 6, 5, 4, 3]), 10
    yield "1 class, batch_size 1", torch.tensor([4]), 1
    yield "11 classes, batch_size 3", torch.randint(0, 10, (11,), generator=g), 3


def _with_recorder(fn: Callable) -> Callable:
    """``fn(generate_fn, classes, batch_size)`` run with a fresh :class:`_Recorder` (its call numbers start at 0)."""
    return lambda generate_fn, classes, batch_size: fn(_Recorder(), classes, batch_size)


BATCH_MISTAKES = [
    Mistake(_with_recorder(lambda gen, classes, bs: torch.cat([gen(c) for c in classes.split(bs)][::-1])),
            "the chunks' images are put together in reverse order; they must follow the classes, first chunk first"),
    Mistake(_with_recorder(lambda gen, classes, bs: torch.cat([gen(c) for c in torch.chunk(classes, bs)])),
            "that is torch.chunk, whose second argument is the number of chunks, not their size"),
]


@chapter.exercise("7.4", reference=utils.generate_in_batches, hints=(
    "cut the classes into consecutive chunks of at most batch_size, generate each chunk with one call, and put "
    "the images back together in order",
    "classes.split(batch_size) gives full chunks with a shorter last one (torch.chunk takes a number of chunks "
    "instead); call generate_fn on each in order and concatenate along dim 0; batch_size < 1 is a ValueError",
    "if batch_size < 1: raise ValueError(...) (split itself would raise a RuntimeError); return "
    "torch.cat([generate_fn(chunk) for chunk in classes.split(batch_size)], dim=0)",
))
def generate_in_batches(fn: Callable, ref_fn: Callable) -> None:
    for where, classes, bs in _batch_cases():
        expected_rec, got_rec = _Recorder(), _Recorder()
        expected = ref_fn(expected_rec, classes.clone(), bs)
        got = call(fn, got_rec, classes.clone(), bs, where=where)
        sizes = [c.numel() for c in got_rec.calls]
        if any(s > bs for s in sizes):
            raise CheckFailure(f"on {where}, generate_fn got a chunk of {max(sizes)} classes, more than batch_size "
                               f"{bs} (chunk sizes {sizes})")
        seen = torch.cat(got_rec.calls) if got_rec.calls else torch.empty(0, dtype=torch.long)
        if not torch.equal(seen, classes):
            raise CheckFailure(f"on {where}, the chunks passed to generate_fn (sizes {sizes}), concatenated, are not "
                               f"the {classes.numel()} classes in order")
        want = [c.numel() for c in expected_rec.calls]
        case = Case(where, (_Recorder(), classes.clone(), bs))
        if sizes != want:
            raise explain(CheckFailure(f"on {where}, generate_fn was called with chunks of {sizes}; expected full "
                                       f"chunks {want} (each call is one batched forward loop: fewer calls are "
                                       "faster)"), BATCH_MISTAKES, case, got)
        compare_explained(got, expected, BATCH_MISTAKES, case, name="images")
    for bad in (0, -1):  # every batch_size < 1, not just 0
        _expect_error(fn, (_Recorder(), torch.arange(3), bad), {}, ValueError, f"batch_size {bad}")


# --------------------------------------------------------------------------------------------------------
# 7.5 accounting


def _accounting_cases() -> Iterator[Case]:
    yield Case("VAR, 1037 images in chunks of 500", ([500, 500, 37], [6, 6, 6], [1.5, 1.25, 0.5]))
    yield Case("two chunks with different pass counts", ([8, 2], [6, 12], [0.25, 0.5]))
    yield Case("speculative, one image per chunk", ([1, 1, 1, 1, 1], [30, 25, 41, 28, 33], [0.1, 0.1, 0.2, 0.1, 0.5]))
    yield Case("raster AR, one chunk", ([64], [64], [0.8]))
    yield Case("raster AR, ragged chunks", ([10, 3], [64, 64], [0.5, 0.25]))


def _accounting_with(**changes: Callable) -> Callable:
    """The reference with some keys computed by ``changes[key](chunk_images, chunk_passes, chunk_seconds)``."""
    def accounting(chunk_images, chunk_passes, chunk_seconds):
        out = ref.generation_accounting(chunk_images, chunk_passes, chunk_seconds)
        return {**out, **{k: f(chunk_images, chunk_passes, chunk_seconds) for k, f in changes.items()}}
    return accounting


ACCOUNTING_MISTAKES = [
    Mistake(_accounting_with(passes_per_image=lambda n, p, s: sum(p) / sum(n)),
            "that divides the forward passes by the images, as if each pass made one image; every image of a chunk "
            "waits for all of that chunk's passes"),
    Mistake(_accounting_with(passes_per_image=lambda n, p, s: sum(p) / len(p)),
            "that is the mean of the chunks' pass counts, which weighs a small chunk like a big one; each image "
            "counts once"),
    Mistake(_accounting_with(images_per_second=lambda n, p, s: sum(x / t for x, t in zip(n, s)) / len(n)),
            "that is the mean of the per-chunk rates, which weighs a short chunk like a long one; the rate is all "
            "the images over all the seconds"),
    Mistake(_accounting_with(images_per_second=lambda n, p, s: sum(s) / sum(n)),
            "that is seconds per image; images per second is the images over the seconds"),
    Mistake(_accounting_with(forward_passes=lambda n, p, s: sum(x * y for x, y in zip(n, p))),
            "that counts each batched pass once per image; one pass runs the whole chunk, so it counts once"),
]


@chapter.exercise("7.5", reference=ref.generation_accounting, hints=(
    "add up totals first (images, passes, seconds) and divide at the end; an average of per-chunk rates "
    "weighs a small chunk like a big one",
    "each image of a chunk waited for all of that chunk's passes, so passes per image is a size-weighted "
    "average; the model ran each chunk's passes once, so forward passes are a plain sum; images per second is "
    "total images over total seconds",
    "passes_per_image = sum(p * n) / sum(n); forward_passes = sum(p); images_per_second = sum(n) / sum(seconds)",
))
def generation_accounting(fn: Callable, ref_fn: Callable) -> None:
    for case in _accounting_cases():
        expected = ref_fn(*case.args)
        given = [list(a) for a in case.args]
        got = call(fn, *given, where=case.name)
        check_unchanged(("chunk_images", "chunk_passes", "chunk_seconds"), case.args, given, case.name)
        compare_explained(got, expected, ACCOUNTING_MISTAKES, case, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------------------------
# 7.6 the Pareto front, 7.7 the fastest configuration meeting a quality floor


def _rows(*specs: tuple) -> list[dict[str, Any]]:
    """Rows ``{"name", "speed", "acc", "fd"}`` from tuples."""
    return [{"name": n, "speed": s, "acc": a, "fd": f} for n, s, a, f in specs]


TABLE = _rows(("A", 180.0, 0.96, 3.1), ("B", 175.0, 0.99, 2.4), ("C", 12.0, 0.97, 2.3), ("D", 16.0, 0.98, 2.2),
              ("E", 19.0, 0.93, 2.9), ("F", 14.0, 0.94, 3.6), ("G", 70.0, 0.99, 2.8))


def _front_cases() -> Iterator[Case]:
    yield Case("speed and accuracy (both max)", (TABLE, {"speed": "max", "acc": "max"}))
    yield Case("speed max, Frechet min", (TABLE, {"speed": "max", "fd": "min"}))
    yield Case("accuracy max, Frechet min, speed max", (TABLE, {"acc": "max", "fd": "min", "speed": "max"}))
    ties = _rows(("P", 10.0, 0.9, 1.0), ("Q", 10.0, 0.9, 1.0), ("R", 10.0, 0.8, 1.0), ("S", 5.0, 0.95, 1.0),
                 ("T", 5.0, 0.95, 2.0))
    yield Case("ties: equal rows, equal speed", (ties, {"speed": "max", "acc": "max"}))
    yield Case("ties, three objectives", (ties, {"speed": "max", "acc": "max", "fd": "min"}))
    yield Case("one row", (TABLE[:1], {"speed": "max", "fd": "min"}))
    yield Case("no rows", ([], {"speed": "max"}))


def _names(rows: Any, where: str) -> list:
    if not isinstance(rows, (list, tuple)):
        raise CheckFailure(f"on input {where!r}, return a list of rows, got {describe(rows)}")
    try:
        return [r["name"] for r in rows]
    except (TypeError, KeyError, IndexError):
        raise CheckFailure(f"on input {where!r}, return the rows themselves (dicts), got {describe(rows)}") from None


def _front_all_max(rows, objectives):
    return ref.pareto_front(rows, {k: "max" for k in objectives})


def _front_equal_dominates(rows, objectives):
    return [b for i, b in enumerate(rows)
            if not any(ref._at_least_as_good(a, b, objectives)[0] for j, a in enumerate(rows) if j != i)]


def _front_strict_in_all(rows, objectives):
    def beats_everywhere(a, b):
        return all(ref._at_least_as_good(a, b, {k: s})[1] for k, s in objectives.items())
    return [b for b in rows if not any(beats_everywhere(a, b) for a in rows)]


def _front_deduplicated(rows, objectives):
    kept = []
    for r in ref.pareto_front(rows, objectives):
        if not any(all(r[k] == f[k] for k in objectives) for f in kept):
            kept.append(r)
    return kept


def _front_sweep_sum(rows, objectives):
    (k0, s0), *rest = objectives.items()
    best, kept = None, []
    for r in sorted(rows, key=lambda r: -r[k0] if s0 == "max" else r[k0]):
        score = sum(r[k] if s == "max" else -r[k] for k, s in rest)
        if best is None or score > best:
            kept.append(r)
            best = score
    return [r for r in rows if any(r is k for k in kept)]


FRONT_MISTAKES = [
    Mistake(_front_all_max, "that treats every objective as 'max'; a 'min' objective (such as the Frechet distance) "
                            "is better when lower, so its comparisons flip"),
    Mistake(_front_equal_dominates, "that drops a row when another is merely as good on every objective, so equal "
                                    "rows knock each other out; to dominate, a row must also be strictly better "
                                    "on one"),
    Mistake(_front_strict_in_all, "that drops a row only when another is strictly better on every objective; a row "
                                  "beaten on some objectives and tied on the rest is dominated too"),
    Mistake(_front_deduplicated, "that keeps only the first of rows equal on every objective; equal rows do not "
                                 "dominate one another, so each of them stays on the front"),
    Mistake(_front_sweep_sum, "that sweeps the rows sorted on the first objective and keeps those that beat the "
                              "best sum of the other objectives so far; a sum of objectives is not dominance, and "
                              "a row no other row beats can still lose on that sum"),
]


@chapter.exercise("7.6", reference=ref.pareto_front, hints=(
    "a row belongs to the front unless another row beats it; be precise about what 'beats' means when some "
    "objectives tie",
    "drop row b only when some row a is at least as good on every objective and strictly better on at least "
    "one (flip the comparison for 'min'); rows equal on everything stay; keep the input order",
    "keep b unless any(all(better_or_equal(a, b, k)) and any(strictly_better(a, b, k)) for a in rows), with "
    "the comparisons flipped for 'min' objectives",
))
def pareto_front(fn: Callable, ref_fn: Callable) -> None:
    for case in _front_cases():
        rows, objectives = case.args
        expected = _names(ref_fn([dict(r) for r in rows], dict(objectives)), case.name)
        given = [dict(r) for r in rows]
        out = call(fn, given, dict(objectives), where=case.name)
        got = _names(out, case.name)
        check_unchanged(("rows",), (rows,), (given,), case.name)
        if got != expected:
            extra = [n for n in got if n not in expected]
            missing = [n for n in expected if n not in got]
            why = (f"kept the dominated rows {extra}" if extra else "") + (" and " if extra and missing else "") + \
                  (f"dropped the non-dominated rows {missing}" if missing else "")
            failure = CheckFailure(f"on input {case.name!r}, the front is {got}, expected {expected}"
                                   + (f": you {why}" if why else " (keep the input order)"))
            raise explain(failure, FRONT_MISTAKES, case, list(out))


def _fastest_cases() -> Iterator[Case]:
    yield Case("accuracy >= 0.97", (TABLE, "speed", "acc", 0.97))
    yield Case("accuracy >= 0.99 (met exactly)", (TABLE, "speed", "acc", 0.99))
    yield Case("Frechet <= 2.8 (lower is better)", (TABLE, "speed", "fd", 2.8), {"higher_is_better": False})
    yield Case("Frechet <= 2.35 (lower is better)", (TABLE, "speed", "fd", 2.35), {"higher_is_better": False})
    yield Case("Frechet <= 2.4 (met exactly)", (TABLE, "speed", "fd", 2.4), {"higher_is_better": False})
    yield Case("accuracy >= 0.999 (nobody)", (TABLE, "speed", "acc", 0.999))
    ties = _rows(("P", 10.0, 0.9, 1.0), ("Q", 12.0, 0.95, 1.0), ("R", 12.0, 0.97, 1.0), ("S", 12.0, 0.8, 1.0))
    yield Case("a tie in speed: the earlier row", (ties, "speed", "acc", 0.9))
    yield Case("no rows", ([], "speed", "acc", 0.5))


def _meets(row, quality, floor, higher_is_better, strict=False):
    q = row[quality]
    if strict:
        return q > floor if higher_is_better else q < floor
    return q >= floor if higher_is_better else q <= floor


def _fastest_best_quality(rows, speed, quality, floor, higher_is_better=True):
    ok = [r for r in rows if _meets(r, quality, floor, higher_is_better)]
    return max(ok, key=lambda r: r[quality] if higher_is_better else -r[quality]) if ok else None


def _fastest_first_meeting(rows, speed, quality, floor, higher_is_better=True):
    return next((r for r in rows if _meets(r, quality, floor, higher_is_better)), None)


def _fastest_ignores_direction(rows, speed, quality, floor, higher_is_better=True):
    return ref.fastest_meeting(rows, speed, quality, floor, True)


def _fastest_strict_floor(rows, speed, quality, floor, higher_is_better=True):
    ok = [r for r in rows if _meets(r, quality, floor, higher_is_better, strict=True)]
    return max(ok, key=lambda r: r[speed]) if ok else None


def _fastest_last_on_tie(rows, speed, quality, floor, higher_is_better=True):
    ok = [r for r in rows if _meets(r, quality, floor, higher_is_better)]
    return max(reversed(ok), key=lambda r: r[speed]) if ok else None


FASTEST_MISTAKES = [  # the slips the edge cases target first: there the broader ones can give the same row
    Mistake(_fastest_strict_floor, "a row exactly at the floor was refused; a quality equal to the floor meets it"),
    Mistake(_fastest_ignores_direction, "that treats the floor as a minimum; with higher_is_better=False a row "
                                        "meets it when its quality is at most the floor"),
    Mistake(_fastest_last_on_tie, "on a tie in speed that is the later row; the earlier row wins a tie"),
    Mistake(_fastest_best_quality, "that is the row of best quality among those meeting the floor; the floor only "
                                   "sorts out the rows that are good enough, and the fastest of them wins"),
    Mistake(_fastest_first_meeting, "that is the first row in table order that meets the floor; of the rows that "
                                    "meet it, the fastest wins"),
]


@chapter.exercise("7.7", reference=ref.fastest_meeting, hints=(
    "two steps: keep the rows good enough, then take the fastest of them",
    "a row meets the floor when its quality is >= floor, or <= floor when lower is better (a row exactly at "
    "the floor meets it); of those, take the largest speed, the first one on a tie; None when no row qualifies",
    "ok = [r for r in rows if (r[quality] >= floor if higher_is_better else r[quality] <= floor)]; return "
    "max(ok, key=lambda r: r[speed]) if ok else None (max keeps the first on a tie)",
))
def fastest_meeting(fn: Callable, ref_fn: Callable) -> None:
    for case in _fastest_cases():
        rows = case.args[0]
        expected = ref_fn([dict(r) for r in rows], *case.args[1:], **case.kwargs)
        given = [dict(r) for r in rows]
        got = call(fn, given, *case.args[1:], where=case.name, **case.kwargs)
        check_unchanged(("rows",), (rows,), (given,), case.name)
        exp_name = None if expected is None else expected["name"]
        if got is None or expected is None:
            if (got is None) != (expected is None):
                failure = CheckFailure(f"on input {case.name!r}, returned "
                                       f"{describe(got) if got is not None else None}, "
                                       f"expected {'None' if expected is None else 'row ' + repr(exp_name)}")
                raise explain(failure, FASTEST_MISTAKES, case, got)
            continue
        try:
            got_name = got["name"]
        except (TypeError, KeyError, IndexError):
            raise CheckFailure(f"on input {case.name!r}, return the row itself (a dict), got {describe(got)}") from None
        if got_name != exp_name:
            failure = CheckFailure(f"on input {case.name!r}, chose row {got_name!r} ({case.args[1]} "
                                   f"{got[case.args[1]]:g}, {case.args[2]} {got[case.args[2]]:g}), expected row "
                                   f"{exp_name!r}")
            raise explain(failure, FASTEST_MISTAKES, case, got)
