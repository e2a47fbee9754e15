"""Chapter 07: the full system -- one image generator assembled from every chapter's finished modules.

    gen = Generator.from_pretrained("mnist")                    # tokenizers, VAR, raster AR, draft
    out = gen.generate(torch.arange(10), method="var", seed=0)  # out.images (10, 1, 32, 32) in [0, 1]
    print(out.stats.summary())                                  # forward passes, wall time, backends...

Pipeline: class labels -> a transformer samples tokens (chapter 04's VAR scale by scale, or chapter 03's
raster model token by token, optionally with chapter 05's speculative decoding) -> the chapter 01
tokenizer's decoder turns tokens into pixels. Attention can run on the chapter 06 kernels.

A call is a :class:`GenerationRequest` (checked when made); each way of generating is a strategy object
(:class:`VARStrategy`, :class:`RasterStrategy`, :class:`DraftSpeculativeStrategy`, :class:`JacobiStrategy`)
holding the models it needs. A call never changes the models: the attention function is chosen for the call
with :func:`ar_course.transformer.model.use_attention` (this thread only), a compiled decode step is passed to
the sampling loop rather than installed on the model, and the passes are counted by the call itself. So two
threads, or two Generators sharing models, can generate at once with different options.

Sampling and guidance follow the package's conventions (:mod:`ar_course.sampling`): ``sampling=``
:class:`~ar_course.sampling.SamplingConfig`, and ``cfg = w`` samples from ``(1 + w) * cond - w * uncond``
logits, so ``cfg = 0`` is plain conditional sampling; VAR ramps ``w`` from 0 at the first scale to ``cfg`` at
the last, as the VAR paper does, unless ``ramp=False``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from ar_course import checkpoint, raster, var
from ar_course.checkpoint import CheckpointError
from ar_course.raster.functional import from_raster
from ar_course.sampling import SamplingConfig, check_sampling
from ar_course.speculative import SpecStats, codebook_neighbors, sjd_generate, speculative_generate
from ar_course.tokenizers import VQVAE
from ar_course.transformer.graphs import CUDAGraphStep
from ar_course.transformer.model import (
    CACHE_KINDS, GPT, AttentionFn, KernelAttention, SelfAttention, StaticKVCache, plain_attention, sdpa_attention,
    use_attention,
)
from ar_course.utils import (
    check_bool, check_ids, check_int, check_number, check_same_device, check_seed, generate_in_batches, get_device,
    is_integer_tensor, progress_bar,
)

if TYPE_CHECKING:
    from ar_course.kernels import DispatchRecord

PRETRAINED = {
    "mnist": {"var_path": "var_mnist", "ar_path": "ar_mnist", "draft_path": "ar_mnist_draft"},
}
"""Shipped model sets: name -> the :func:`ar_course.checkpoint.available` names of their checkpoints (each
checkpoint names the tokenizer it was trained on)."""

AR_VARIANTS = {"mnist": {"base": "ar_mnist", "grpo": "ar_mnist_grpo", "cca": "ar_mnist_cca"}}
"""Shipped raster models of each set: the pre-trained one and chapter 11's fine-tuned ones (GRPO with the
classifier reward; condition-contrastive alignment), which sample without guidance (their Generator's default
``cfg`` is 0: :data:`ALIGNED_METHODS`)."""

VAR_VARIANTS = {"mnist": {"base": "var_mnist", "cca": "var_mnist_cca"}}
"""Shipped VAR models of each set: the pre-trained one and chapter 11's condition-contrastive aligned one, which
samples without guidance (its Generator's default ``cfg`` is 0)."""

AUTO_KERNEL_DEVICES = ("cuda",)
"""Device types where ``kernels="auto"`` may run a chapter 06 attention kernel
(:func:`ar_course.kernels.ops.backend_rule`); elsewhere it is torch's SDPA without importing
:mod:`ar_course.kernels`."""

METHODS = ("var", "ar")
SPECULATIVE = (None, "draft", "jacobi")
KERNELS = ("auto", "torch", "triton", "numba")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
DEFAULT_CFG = {"var": 2.0, "ar": 1.0}
"""Guidance strength ``w`` each shipped model was best at (class accuracy 0.99 and 0.98 in their checkpoints'
evaluations; the raster checkpoint recorded its accuracy by the scale ``s = 1 + w``, best at ``s = 2``)."""
ALIGNED_METHODS = ("cca", "grpo")
"""The ``method`` a chapter 11 trainer records in its checkpoint: such a model samples without guidance, so
:meth:`Generator.from_checkpoints` makes 0 its default strength."""


@dataclass
class GenerationStats:
    """What one :meth:`Generator.generate` call did.

    ``forward_passes`` counts target-model passes (a batched pass counts once); ``passes_per_image`` is how
    many passes each image waited for (a batch of 10 VAR images: 6; speculative decoding runs one image at
    a time, so its passes add up). ``accepted_hist[k]``: speculative rounds that accepted ``k`` drafts.

    ``backends`` says what actually computed attention, never what was merely asked for: ``"attention"``
    (multi-token passes) and ``"decode_attention"`` (one-token steps over the KV cache) are ``"torch"``,
    ``"triton"`` or ``"numba"``, several with their call counts (``"triton x30, torch x6"``) when the
    choice differed by kind of call, or ``"none"`` when the kernel path made no such call; ``"fallbacks"``
    lists every kernel that failed and was answered by torch, with the reason (and a CUDA-graph capture that
    failed and ran eagerly); ``"compiled"`` is ``"torch.compile"``, ``"cuda graphs"`` or ``"no"``.
    ``capture_seconds``: time this call spent warming up and capturing CUDA graphs (0 when it replayed graphs
    captured by an earlier call)."""

    method: str
    speculative: str | None
    device: str
    precision: str
    backends: dict[str, str | list[str]]
    images: int
    seconds: float
    forward_passes: int
    passes_per_image: float
    draft_passes: int = 0
    accepted_hist: list[int] = field(default_factory=list)
    acceptance_rate: float = float("nan")
    capture_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """``images / seconds`` (``inf`` when the clock read 0)."""
        return self.images / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict:
        """A JSON-ready dict (the properties included)."""
        return {**asdict(self), "images_per_second": self.images_per_second}

    def _attention(self) -> str:
        """What computed attention, in a few words: one back-end, or the multi-token and the one-token ones."""
        multi, one = self.backends["attention"], self.backends.get("decode_attention", "none")
        if one in ("none", multi):
            return multi
        return one if multi == "none" else f"{multi}, decode {one}"

    def summary(self) -> str:
        """One line for logs and the CLI."""
        spec = f" + {self.speculative}" if self.speculative else ""
        extra = f", acceptance {self.acceptance_rate:.2f}" if self.speculative else ""
        compiled = ", compiled" if self.backends.get("compiled", "no") != "no" else ""
        fallbacks = len(self.backends.get("fallbacks", []))
        compiled += f", {fallbacks} kernel fallback{'s' * (fallbacks > 1)}" if fallbacks else ""
        rate = self.images_per_second
        rate_text = f"{rate:.1f}" if rate >= 10 else f"{rate:.3g}"  # one image in a minute: 0.0167, not 0.0
        return (f"{self.images} image{'s' * (self.images != 1)} by {self.method}{spec} on {self.device} "
                f"({self.precision}, attention: {self._attention()}{compiled}): {self.seconds:.2f} s, "
                f"{rate_text} images/s, {self.passes_per_image:.1f} forward passes per image{extra}")


@dataclass
class Generation:
    """Images ``(B, C, S, S)`` in [0, 1] (float32, on CPU), the ``classes`` ``(B,)`` they were asked for, and
    the call's :class:`GenerationStats`."""

    images: torch.Tensor
    classes: torch.Tensor
    stats: GenerationStats


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """One generation call, checked when made: every option alone and in combination (the
    :class:`Generator` then checks it against its models). :meth:`Generator.generate` takes the same options as
    keywords.

    Attributes:
        classes: the class of each image, ``(B,)`` ints (a tensor or a sequence); stored as a long tensor.
        method: ``"var"`` (next-scale prediction, S passes per batch) or ``"ar"`` (raster order, one pass per
            token).
        sampling: temperature, top-k, top-p (:class:`~ar_course.sampling.SamplingConfig`; temperature 0 is greedy).
        cfg: guidance strength ``w >= 0`` (logits ``(1 + w) cond - w uncond``); ``None``: :data:`DEFAULT_CFG`
            of the method (the stored request holds the number, and ``cfg_defaulted`` is True: :meth:`Generator.run`
            then uses that Generator's ``default_cfg``, 0 for an aligned model).
        ramp: with ``"var"``, VAR's ramp of the strength from 0 at the first scale to ``cfg`` at the last.
        speculative: with ``method="ar"``: ``"draft"`` (speculative sampling with the draft model, ``gamma``
            drafts per round) or ``"jacobi"`` (Speculative Jacobi Decoding, a window of ``window`` tokens). Both
            run one image at a time; both are exact unless ``relaxed_delta > 0``.
        relaxed_delta: with ``"jacobi"``: LANTERN-style relaxed acceptance over each code's ``neighbors``
            nearest codes, moving at most this much probability mass (0 = exact).
        gamma: with ``"draft"``: draft tokens proposed per round (an integer ``>= 0``).
        window: with ``"jacobi"``: draft tokens in the window of each pass (an integer ``>= 0``).
        neighbors: with ``relaxed_delta > 0``: nearest codes each code may borrow from (an integer ``>= 0``; at
            most the codebook size minus one, checked by :meth:`Generator.run`).
        kernels: ``"auto"`` runs attention on the chapter 06 kernels where they are faster on this device (on a
            GPU each kind of call is timed once, compiled Triton or numba.cuda against torch; on a CPU torch's
            fused attention is faster than the simulators, so torch); ``"torch"`` never uses them;
            ``"triton"`` / ``"numba"`` force one (on a CPU: the interpreter / simulator, slow, for checking
            agreement). ``stats.backends`` reports what really ran.
        precision: ``"auto"`` (bfloat16 autocast on CUDA, float32 on CPU) or a dtype name for autocast.
        cache: the KV cache of the sampling loops: ``"dynamic"`` (lengths are Python ints, the plain path) or
            ``"static"`` (:class:`~ar_course.transformer.model.StaticKVCache`: preallocated, positions and the
            mask of unused positions computed on the device, so that with torch attention a step never waits
            for the host; kernel attention checks that dense mask on the host in each layer, except inside a
            graph capture, where it is trusted); ``None``:
            ``"static"`` with ``graphs``, else ``"dynamic"`` (the stored request holds the name). Same tokens
            up to float rounding.
        graphs: replay the decode step (VAR's per-scale pass, the raster model's step) from CUDA graphs
            (:class:`~ar_course.transformer.graphs.CUDAGraphStep`) over a static cache: one graph per scale or
            step shape and chunk size, captured at the first call that needs it (``stats.capture_seconds``) and
            replayed by later calls; the 4 chunk sizes used last keep their cache and graphs (an older size
            is captured again). CUDA only; batched generation (``speculative=None``); not with
            ``compile``. Calls with graphs on one Generator take turns (they share the graphs' caches).
        compile: run the decode step (VAR's per-scale pass, the raster model's forward) through
            ``torch.compile(dynamic=True)``; attention then runs in torch (``kernels`` must be ``"auto"`` or
            ``"torch"``; the trace runs each layer's own function, SDPA in the shipped models, and a model with
            another in any layer is refused at :meth:`Generator.run`) and inductor fuses
            around it, one graph per step shape. Batched generation only (``speculative=None``). The first
            call compiles (tens of seconds on a CPU; needs a C++ compiler there), later calls reuse it. Same
            tokens as eager up to float rounding; what it gains is measured by ``benchmarks/bench_system.py``
            (the README's full-system rows).
        seed: seeds one generator for the call (``None``: torch's global generator).
        batch_size: images per batched call; samples depend on it, so keep it fixed when comparing.
        progress: a ``tqdm`` bar over the images (useful for speculative decoding, one image at a time).

    Raises:
        ValueError: ``classes`` that are empty (``classes is empty: ask for at least one class``), not 1-D or
            not ints (floats and bools are refused, even ``2.0``); a number that is not finite or out of range
            (``cfg must be a finite number >= 0, got nan``); an unknown method, speculative kind, kernels or
            precision; or a combination of options that does not apply.
        TypeError: an argument of the wrong type: a number that is a string, ``None`` or a bool, a float where
            an integer is expected (``batch_size``, ``seed``, ``gamma``, ``window``, ``neighbors``), ``sampling``
            that is not a ``SamplingConfig``, a non-bool flag (``ramp``, ``graphs``, ``compile``, ``progress``), or
            ``classes`` that torch cannot read as a sequence of numbers.
    """

    classes: torch.Tensor | Sequence[int]
    method: str = "var"
    sampling: SamplingConfig = SamplingConfig()
    cfg: float | None = None
    ramp: bool = True
    speculative: str | None = None
    relaxed_delta: float = 0.0
    gamma: int = 4
    window: int = 8
    neighbors: int = 4
    kernels: str = "auto"
    precision: str = "auto"
    cache: str | None = None
    graphs: bool = False
    compile: bool = False
    seed: int | None = 0
    batch_size: int = 500
    progress: bool = False
    cfg_defaulted: bool = field(init=False, repr=False)  # cfg was None: Generator.run uses its default_cfg

    def __post_init__(self) -> None:
        checked = {
            "classes": _as_classes(self.classes),
            "sampling": check_sampling(self.sampling),
            "relaxed_delta": check_number("relaxed_delta", self.relaxed_delta, lo=0),
            **{name: check_int(name, getattr(self, name), lo=0) for name in ("gamma", "window", "neighbors")},
            "batch_size": check_int("batch_size", self.batch_size, lo=1),
            "seed": None if self.seed is None else check_seed(self.seed),
            **{name: check_bool(name, getattr(self, name)) for name in ("ramp", "graphs", "compile", "progress")},
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        self._check_choices()
        object.__setattr__(self, "cfg_defaulted", self.cfg is None)
        cfg = DEFAULT_CFG[self.method] if self.cfg is None else check_number("cfg", self.cfg, lo=0)
        object.__setattr__(self, "cfg", cfg)
        if self.cache is None:
            object.__setattr__(self, "cache", "static" if self.graphs else "dynamic")

    def _check_choices(self) -> None:
        """The named options and the combinations that cannot work (the numbers are checked already)."""
        for name, allowed in (("method", METHODS), ("speculative", SPECULATIVE), ("kernels", KERNELS),
                              ("precision", PRECISIONS), ("cache", (None, *CACHE_KINDS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.speculative is not None and self.method != "ar":
            raise ValueError("speculative decoding applies to method='ar' (VAR already samples a whole "
                             "scale per pass)")
        if self.relaxed_delta > 0 and self.speculative != "jacobi":
            raise ValueError(f"relaxed_delta must be >= 0, and > 0 only with speculative='jacobi'; got "
                             f"{self.relaxed_delta} with speculative={self.speculative!r}")
        if self.compile and (self.speculative is not None or self.kernels not in ("auto", "torch")):
            raise ValueError("compile=True applies to batched generation (speculative=None) with torch attention "
                             f"(kernels 'auto' or 'torch'); got speculative={self.speculative!r}, "
                             f"kernels={self.kernels!r}")
        if self.compile and self.cache == "static":
            raise ValueError("compile=True runs the dynamic cache; the static cache's fast path is graphs=True")
        if self.graphs and (self.speculative is not None or self.compile or self.cache == "dynamic"):
            raise ValueError("graphs=True applies to batched generation (speculative=None) over the static cache, "
                             f"without compile; got speculative={self.speculative!r}, compile={self.compile}, "
                             f"cache={self.cache!r}")


REQUEST_OPTIONS = tuple(f.name for f in fields(GenerationRequest) if f.init and f.name != "classes")
"""The keyword options of :meth:`Generator.generate` (the fields of :class:`GenerationRequest`)."""


def _as_classes(classes: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``classes`` as a non-empty ``(B,)`` long tensor of its own (a copy, never the caller's tensor or array;
    range not checked: see :class:`GenerationRequest`)."""
    if isinstance(classes, (list, tuple)) and any(isinstance(c, (bool, np.bool_)) for c in classes):
        raise ValueError(f"classes must be a 1-D sequence of ints, got bools in {list(classes)}")
    try:
        classes = torch.as_tensor(classes)
    except (TypeError, ValueError, RuntimeError) as exc:  # strings, None, ragged lists, huge ints
        raise TypeError(f"classes must be a 1-D sequence of ints, got {classes!r} ({exc})") from None
    if classes.ndim == 1 and classes.numel() == 0:
        raise ValueError("classes is empty: ask for at least one class")
    if classes.ndim != 1 or not is_integer_tensor(classes):
        raise ValueError(f"classes must be a 1-D sequence of ints, got shape {tuple(classes.shape)} "
                         f"{classes.dtype}")
    if classes.dtype == getattr(torch, "uint64", None):  # .long() would wrap 2**63 and up to negative numbers
        wrapped = classes.long()
        if bool((wrapped < 0).any()):
            raise ValueError(f"classes must be ints that fit in int64, got {int(wrapped[wrapped < 0][0]) + 2**64}")
        return wrapped
    return classes.to(torch.long, copy=True)  # the request's own: a buffer the caller refills cannot relabel it


# -- strategies: one per way of generating ------------------------------------------------------------------


@dataclass
class Tally:
    """The counters of one call, filled in chunk by chunk by its strategy: target forward passes, the passes
    each image waited for (summed over images), draft passes, and speculative rounds."""

    forward_passes: int = 0
    waited: int = 0
    draft_passes: int = 0
    spec: SpecStats = field(default_factory=SpecStats)
    capture_seconds: float = 0.0
    graph_failure: str | None = None
    compile_failure: str | None = None

    def add_speculative(self, stats: SpecStats) -> None:
        """Count one speculative generation: a target pass per round, a draft pass per drafted token."""
        self.forward_passes += stats.target_calls
        self.draft_passes += stats.draft_calls
        self.spec.merge(stats)


class Strategy(Protocol):
    """How one method turns a chunk of classes ``(b,)`` into images ``(b, C, S, S)``.

    ``label`` names it (the progress bar); ``one_at_a_time``: it takes chunks of one image (speculative
    decoding), else chunks of ``request.batch_size``. :meth:`run` adds what it did to ``tally``."""

    label: str
    one_at_a_time: bool

    def run(self, chunk: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None,
            tally: Tally) -> torch.Tensor:
        """Images ``(b, C, S, S)`` of the classes ``chunk`` ``(b,)``, drawn with ``generator``."""
        ...


class _DecodeStep:
    """A model's decode step for the batched strategies: eager over the dynamic or the static cache,
    ``torch.compile``d, or replayed from CUDA graphs (compiled or captured on first use, then reused), wrapped
    per call so that the call counts its own passes. Nothing is installed on the model.

    ``dynamic`` / ``static``: the eager step over a :class:`~ar_course.transformer.model.KVCache` / a
    :class:`StaticKVCache` (the latter is what :class:`CUDAGraphStep` captures); ``compilable``: the dynamic step
    as ``torch.compile`` takes it; ``model``: whose ``make_cache(rows, static=True)`` makes the caches the graphs
    write into, kept here, one per number of rows, so calls with graphs take turns. At most
    :attr:`GRAPH_ROW_COUNTS` row counts keep their cache and graphs; the least recently used is dropped (a service
    answering requests of many sizes would otherwise hold a cache and graphs per size, without bound)."""

    GRAPH_ROW_COUNTS = 4

    def __init__(self, model: GPT | var.VAR, dynamic: Callable, static: Callable, compilable: Callable) -> None:
        self.model, self.dynamic, self.static, self.compilable = model, dynamic, static, compilable
        self._compiled: Callable | None = None
        self._graphed: CUDAGraphStep | None = None
        self._caches: OrderedDict[int, StaticKVCache] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def open(self, request: GenerationRequest, tally: Tally, rows: int
             ) -> Iterator[tuple[Callable, str | StaticKVCache]]:
        """The step to run and the ``cache`` option of the sampling loop for a chunk of ``rows`` rows (the
        doubled batch when guided); with graphs, the static cache the graphs were captured over, held by this
        call until the block ends. Each call of the step adds one to ``tally.forward_passes`` (one call = one
        forward pass; a hook on a block would sit inside the compiled region)."""
        if not request.graphs:
            fn = self.static if request.cache == "static" else self.dynamic
            if not request.compile:
                yield _counted(fn, tally), request.cache
                return
            _check_torch_layers(self.model)
            if self._compiled is None:
                self._compiled = torch.compile(self.compilable, dynamic=True)
            config = torch._dynamo.config  # the limit raises (older torch: no such option), for the whole chunk
            strict = {"fail_on_recompile_limit_hit": True} if hasattr(config, "fail_on_recompile_limit_hit") else {}
            with config.patch(**strict):
                yield _counted(_compiled_or_eager(self._compiled, self.compilable, tally), tally), request.cache
            return
        with self._lock:
            if self._graphed is None:
                self._graphed = CUDAGraphStep(self.static)
            cache = self._caches.pop(rows, None)
            if cache is None:
                cache = self.model.make_cache(rows, static=True)
                if len(self._caches) >= self.GRAPH_ROW_COUNTS:
                    self._graphed.forget(self._caches.popitem(last=False)[1])
            self._caches[rows] = cache  # the most recently used, last
            before = self._graphed.capture_seconds
            yield _counted(self._graphed, tally), cache
            tally.capture_seconds += self._graphed.capture_seconds - before
            tally.graph_failure = self._graphed.failure


def _check_torch_layers(model: torch.nn.Module) -> None:
    """Every attention layer of ``model`` computes attention with torch (its own function is
    :func:`sdpa_attention` or :func:`plain_attention`): a ``torch.compile`` trace runs the layer's own function,
    not the call's, and the stats would name torch for whatever ran. ``ValueError`` naming the first other layer."""
    others = [(name, m.attention) for name, m in model.named_modules()
              if isinstance(m, SelfAttention) and m.attention not in (sdpa_attention, plain_attention)]
    if others:
        name, fn = others[0]
        raise ValueError(f"compile=True traces each layer's own attention function, and {len(others)} layer(s) of "
                         f"the {type(model).__name__} run one other than sdpa_attention or plain_attention (first: "
                         f"{name} runs {getattr(fn, '__name__', type(fn).__name__)}): set_attention(model, 'sdpa') "
                         "first, or generate without compile")


def _compiled_or_eager(compiled: Callable, eager: Callable, tally: Tally) -> Callable:
    """``compiled``, or ``eager`` from the step where torch.compile would need one more graph than its recompile
    limit allows (every model and Generator of a process shares the traced function's budget: a third precision
    or device can reach it): torch would then run the step eagerly in silence; with
    ``fail_on_recompile_limit_hit`` on (:meth:`_DecodeStep.open`) it raises, and here that is noted in
    ``tally.compile_failure``, which the stats report."""

    def step(*args, **kwargs):
        if tally.compile_failure is None:
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.FailOnRecompileLimitHit:  # raised before the step ran: nothing half done
                tally.compile_failure = "torch.compile: recompile limit reached"
        return eager(*args, **kwargs)

    return step


def _counted(fn: Callable, tally: Tally) -> Callable:
    """``fn``, adding one to ``tally.forward_passes`` per call."""

    def step(*args, **kwargs):
        tally.forward_passes += 1
        return fn(*args, **kwargs)

    return step


class VARStrategy:
    """Next-scale prediction (chapter 04): :func:`ar_course.var.sample_pyramid`, ``S`` passes per chunk."""

    label, one_at_a_time = "var", False

    def __init__(self, model: var.VAR, tokenizer: VQVAE) -> None:
        self.model, self.tokenizer = model, tokenizer
        # VAR.step calls it once per scale; the pass handles both caches
        self._step = _DecodeStep(model, model._run, model._run, model._run)

    def run(self, chunk: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None,
            tally: Tally) -> torch.Tensor:
        """Images ``(b, C, S, S)`` of ``chunk`` ``(b,)``: sample pyramids (``S`` passes), decode."""
        with self._step.open(request, tally, _rows(chunk, request)) as (step, cache):
            pyramid = var.sample_pyramid(self.model, self.tokenizer.quantizer, chunk, sampling=request.sampling,
                                         cfg=request.cfg, ramp=request.ramp, generator=generator, cache=cache,
                                         run=step)
        return self.tokenizer.decode_from_indices(pyramid)  # (b, C, S, S)


class RasterStrategy:
    """Raster order (chapter 03): :func:`ar_course.raster.generate_tokens`, one pass per token per chunk."""

    label, one_at_a_time = "ar", False

    def __init__(self, model: GPT, tokenizer: VQVAE) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._step = _DecodeStep(model, model, model.decode_step, model.forward)

    def run(self, chunk: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None,
            tally: Tally) -> torch.Tensor:
        """Images ``(b, C, S, S)`` of ``chunk`` ``(b,)``: sample token maps (one pass per token), decode."""
        side = self.tokenizer.config.latent_side
        with self._step.open(request, tally, _rows(chunk, request)) as (step, cache):
            maps = raster.generate_tokens(self.model, chunk, (side, side), sampling=request.sampling,
                                          cfg=request.cfg, generator=generator, cache=cache, forward=step)
        return self.tokenizer.decode_from_indices(maps)  # (b, C, S, S)


def _rows(chunk: torch.Tensor, request: GenerationRequest) -> int:
    """Rows of a chunk's batch: one per image, twice that with guidance (the null-class rows)."""
    return chunk.numel() * (1 + (request.cfg != 0))


class DraftSpeculativeStrategy:
    """Raster order with speculative sampling (chapter 05): the draft proposes ``request.gamma`` tokens per
    round, the target verifies them; one image at a time."""

    label, one_at_a_time = "ar + draft", True

    def __init__(self, target: GPT, draft: GPT, tokenizer: VQVAE) -> None:
        self.target, self.draft, self.tokenizer = target, draft, tokenizer

    def run(self, chunk: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None,
            tally: Tally) -> torch.Tensor:
        """The image ``(1, C, S, S)`` of ``chunk`` ``(1,)`` by speculative sampling with the draft model."""
        side = self.tokenizer.config.latent_side
        start = torch.zeros(1, 0, dtype=torch.long, device=chunk.device)  # (1, 0): the class token starts
        seq, stats = speculative_generate(self.target, self.draft, start, side * side, gamma=request.gamma,
                                          sampling=request.sampling, cfg=request.cfg, classes=chunk,
                                          generator=generator, cache=request.cache)
        tally.add_speculative(stats)
        return self.tokenizer.decode_from_indices(from_raster(seq, side, side))  # (1, C, S, S)


class JacobiStrategy:
    """Raster order with Speculative Jacobi Decoding (chapter 05): a window of ``request.window`` tokens refined
    by the model itself, optionally with relaxed acceptance; one image at a time."""

    label, one_at_a_time = "ar + jacobi", True

    def __init__(self, model: GPT, tokenizer: VQVAE) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._neighbors: dict[int, torch.Tensor] = {}

    def run(self, chunk: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None,
            tally: Tally) -> torch.Tensor:
        """The image ``(1, C, S, S)`` of ``chunk`` ``(1,)`` by Speculative Jacobi Decoding."""
        side = self.tokenizer.config.latent_side
        nbrs = self.codebook_neighbors(request.neighbors) if request.relaxed_delta > 0 else None
        seq, stats = sjd_generate(self.model, side * side, classes=chunk, window=request.window,
                                  sampling=request.sampling, cfg=request.cfg, generator=generator,
                                  delta=request.relaxed_delta, neighbors=nbrs, cache=request.cache)
        tally.add_speculative(stats)
        return self.tokenizer.decode_from_indices(from_raster(seq, side, side))  # (1, C, S, S)

    def codebook_neighbors(self, k: int) -> torch.Tensor:
        """``(V, k)`` nearest codes of every code of the tokenizer, as its lookup sees them (a VQ codebook, FSQ's
        grid, LFQ's sign patterns; computed once per ``k``)."""
        if k not in self._neighbors:
            codes = self.tokenizer.quantizer.codes().detach()  # (V, d); FSQ and LFQ make theirs on the CPU
            self._neighbors[k] = codebook_neighbors(codes, k).to(next(self.model.parameters()).device)
        return self._neighbors[k]


class Generator:
    """Class-conditional image generation with the course's models.

    Args:
        var_model, var_tokenizer: a :class:`~ar_course.var.VAR` and its multi-scale tokenizer (optional).
        ar_model, ar_tokenizer: a chapter 03 raster-order :class:`~ar_course.transformer.GPT` and its VQ
            tokenizer (optional).
        ar_draft: a smaller raster model over the same tokens, for ``speculative="draft"`` (optional).
        default_cfg: guidance strengths by method that :meth:`generate` uses when no ``cfg`` is given, over
            :data:`DEFAULT_CFG` (``{"ar": 0.0}`` for a raster model aligned with CCA or GRPO, which samples without
            guidance; :meth:`from_checkpoints` reads that from the checkpoints).

    ``strategies`` maps ``(method, speculative)`` to the strategy that generates that way with these models.
    Generating never changes the models, so Generators may share them, and threads may share a Generator.

    Raises:
        TypeError: a model or tokenizer of another class (``Generator(ar_model, ar_tokenizer)`` passes them as
            ``var_model, var_tokenizer``: name them).
        ValueError: a model without its tokenizer or none at all, a tokenizer whose quantizer, codes, scales or
            grid do not fit its model (``var_model does not fit var_tokenizer: ...``), a raster model or draft
            that is not causal and class-conditional, a VAR and a raster model of different numbers of classes, a
            draft of other classes or without ``ar_model``, or a ``default_cfg`` of another method or a strength
            that is not a finite number ``>= 0``.
    """

    def __init__(
        self,
        var_model: var.VAR | None = None,
        var_tokenizer: VQVAE | None = None,
        ar_model: GPT | None = None,
        ar_tokenizer: VQVAE | None = None,
        ar_draft: GPT | None = None,
        *,
        default_cfg: dict[str, float] | None = None,
    ) -> None:
        if (var_model is None) != (var_tokenizer is None) or (ar_model is None) != (ar_tokenizer is None):
            raise ValueError("pass each model together with its tokenizer")
        if ar_draft is not None and ar_model is None:
            raise ValueError("ar_draft needs the raster model it drafts for (ar_model)")
        if var_model is None and ar_model is None:
            raise ValueError("a Generator needs a VAR model or a raster AR model")
        if var_model is not None:
            _check_models("var_model", var_model, var.VAR, "var_tokenizer", var_tokenizer)
            try:
                var.check_tokenizer(var_tokenizer.quantizer, var_model.config)
            except (TypeError, ValueError) as exc:  # a VQVAE of another quantizer: it does not fit, like the rest
                raise ValueError(f"var_model does not fit var_tokenizer: {exc}") from None
            check_same_device("var_tokenizer", var_tokenizer, var_model, "var_model")
        if ar_model is not None:
            _check_models("ar_model", ar_model, GPT, "ar_tokenizer", ar_tokenizer)
            _check_raster_pair("ar_model", ar_model, ar_tokenizer)
        if var_model is not None and ar_model is not None and var_model.config.n_classes != ar_model.config.n_classes:
            raise ValueError(f"var_model models {var_model.config.n_classes} classes, ar_model "
                             f"{ar_model.config.n_classes}: one Generator's models must share their classes")
        if ar_draft is not None:
            _check_models("ar_draft", ar_draft, GPT)
            _check_raster_pair("ar_draft", ar_draft, ar_tokenizer)
            if ar_draft.config.n_classes != ar_model.config.n_classes:
                raise ValueError(f"ar_draft models {ar_draft.config.n_classes} classes, ar_model "
                                 f"{ar_model.config.n_classes}: the draft must model the raster model's classes")
        unknown = sorted(set(default_cfg or {}) - set(METHODS))
        if unknown:
            raise ValueError(f"default_cfg's keys must be methods {METHODS}, got {unknown}")
        self.var, self.var_tokenizer = var_model, var_tokenizer
        self.ar, self.ar_tokenizer, self.ar_draft = ar_model, ar_tokenizer, ar_draft
        self.default_cfg = {**DEFAULT_CFG, **{m: check_number(f"default_cfg[{m!r}]", w, lo=0)
                                              for m, w in (default_cfg or {}).items()}}
        self.strategies: dict[tuple[str, str | None], Strategy] = {}
        if var_model is not None:
            self.strategies["var", None] = VARStrategy(var_model, var_tokenizer)
        if ar_model is not None:
            self.strategies["ar", None] = RasterStrategy(ar_model, ar_tokenizer)
            self.strategies["ar", "jacobi"] = JacobiStrategy(ar_model, ar_tokenizer)
        if ar_draft is not None:
            self.strategies["ar", "draft"] = DraftSpeculativeStrategy(ar_model, ar_draft, ar_tokenizer)

    @classmethod
    def from_pretrained(cls, name: str = "mnist", device: str | torch.device = "auto", *,
                        ar: str = "base", var: str = "base") -> "Generator":
        """The shipped models of ``name`` (:data:`PRETRAINED`) on ``device`` (``"auto"``: ``AR_COURSE_DEVICE``,
        else CUDA if present), with the raster model ``ar`` of :data:`AR_VARIANTS` (``"base"``, or chapter 11's
        ``"grpo"`` / ``"cca"``) and the VAR model ``var`` of :data:`VAR_VARIANTS` (``"base"`` or chapter 11's
        ``"cca"``).

        Raises ``ValueError`` for an unknown ``name``, ``ar`` or ``var``, and as :meth:`from_checkpoints`."""
        if name not in PRETRAINED:
            raise ValueError(f"unknown pretrained set {name!r}; choose from {sorted(PRETRAINED)}")
        if ar not in AR_VARIANTS[name]:
            raise ValueError(f"unknown raster model {ar!r} for {name!r}; choose from {sorted(AR_VARIANTS[name])}")
        if var not in VAR_VARIANTS[name]:
            raise ValueError(f"unknown VAR model {var!r} for {name!r}; choose from {sorted(VAR_VARIANTS[name])}")
        paths = {**PRETRAINED[name], "ar_path": AR_VARIANTS[name][ar], "var_path": VAR_VARIANTS[name][var]}
        return cls.from_checkpoints(**paths, device=device)

    @classmethod
    def from_checkpoints(
        cls,
        var_path: str | Path | None = None,
        ar_path: str | Path | None = None,
        draft_path: str | Path | None = None,
        device: str | torch.device = "auto",
    ) -> "Generator":
        """Models from checkpoints: shipped names (:func:`ar_course.checkpoint.available`) or files (safetensors +
        JSON metadata; tokenizers are found by the name or path each checkpoint records). A model whose checkpoint
        records a chapter 11 alignment (:data:`ALIGNED_METHODS`) gets a default guidance of 0. A missing, corrupted
        or mismatched file, or files whose models do not go together (the ``ValueError`` of the constructor: a VAR
        and a raster model of different classes), raise :class:`~ar_course.checkpoint.CheckpointError` naming
        them."""
        dev = get_device(str(device))
        var_model = var_tok = ar_model = ar_tok = draft = None
        if var_path is not None:
            var_model, var_tok = checkpoint.load_with_tokenizer(var_path, dev, kind=var.CHECKPOINT_KIND)
        if ar_path is not None:
            ar_model, ar_tok = checkpoint.load_with_tokenizer(ar_path, dev, kind=raster.CHECKPOINT_KIND)
        if draft_path is not None:
            draft, draft_tok = checkpoint.load_with_tokenizer(draft_path, dev, kind=raster.CHECKPOINT_KIND)
            if ar_tok is not None and draft_tok.config != ar_tok.config:
                raise CheckpointError(f"{draft_path} was trained on a different tokenizer than {ar_path}")
        aligned = {method: 0.0 for method, path in (("var", var_path), ("ar", ar_path))
                   if path is not None and checkpoint.info(path).get("method") in ALIGNED_METHODS}
        try:
            return cls(var_model, var_tok, ar_model, ar_tok, draft, default_cfg=aligned)
        except ValueError as exc:
            given = ", ".join(str(p) for p in (var_path, ar_path, draft_path) if p is not None)
            raise CheckpointError(f"{given}: {exc}") from None

    @property
    def device(self) -> torch.device:
        """The device of the models (the VAR's, else the raster model's)."""
        model = self.var if self.var is not None else self.ar
        return next(model.parameters()).device

    @property
    def num_classes(self) -> int:
        """Number of classes of the models (the null class not counted): valid classes are ``0 .. num_classes - 1``."""
        return self.var.config.n_classes if self.var is not None else self.ar.config.n_classes

    def generate(self, classes: torch.Tensor | Sequence[int], **options: Any) -> Generation:
        """Images of ``classes`` ``(B,)`` (ints in ``[0, num_classes)``): :meth:`run` of
        ``GenerationRequest(classes, **options)``.

        ``options`` are keywords, all optional: ``method`` (``"var"`` or ``"ar"``), ``sampling``
        (a :class:`~ar_course.sampling.SamplingConfig`), ``cfg`` (guidance strength ``w``; none or ``None``: this
        Generator's :attr:`default_cfg` of the method, 0 for a CCA or GRPO model, as :meth:`run` applies it),
        ``ramp``,
        ``speculative`` (``"draft"``, ``"jacobi"``), ``relaxed_delta``, ``gamma``, ``window``, ``neighbors``,
        ``kernels``, ``precision``, ``cache``, ``graphs``, ``compile``, ``seed``, ``batch_size``, ``progress``: see
        :class:`GenerationRequest`.

        Returns:
            A :class:`Generation`: images ``(B, C, S, S)`` float32 on CPU, classes, stats.

        Raises:
            TypeError: an unknown option name, or as :class:`GenerationRequest` for an option of the wrong type.
            ValueError: as :class:`GenerationRequest` and :meth:`run`, before any work.
        """
        unknown = sorted(set(options) - set(REQUEST_OPTIONS))
        if unknown:
            hint = (" (temperature, top_k and top_p go in sampling=SamplingConfig(...))"
                    if set(unknown) & {"temperature", "top_k", "top_p"} else "")
            raise TypeError(f"unknown option(s) {', '.join(unknown)}{hint}; the options are "
                            f"{', '.join(REQUEST_OPTIONS)}")
        return self.run(GenerationRequest(classes, **options))

    @torch.no_grad()
    def run(self, request: GenerationRequest) -> Generation:
        """Carry out ``request``: its strategy generates the images chunk by chunk, with the call's attention
        function (:func:`~ar_course.transformer.model.use_attention`), autocast and seeded generator. A request
        made without ``cfg`` runs at this Generator's :attr:`default_cfg` for its method (0 for an aligned model).

        Raises ``ValueError`` before any work for classes outside ``[0, num_classes)``, a method or
        speculative kind whose models this Generator lacks, more ``neighbors`` than the raster model's codebook
        has other codes (``vocab_size - 1``), ``graphs=True`` on a Generator that is not on a CUDA device, or
        ``compile=True`` with a layer whose own attention function is not torch's (the trace would run it);
        ``TypeError`` for a ``request`` that is not a :class:`GenerationRequest` (:meth:`generate` takes the options
        as keywords)."""
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"request must be a GenerationRequest (or call generate(classes, **options)), got "
                            f"{type(request).__name__}")
        if request.cfg_defaulted and request.cfg != self.default_cfg[request.method]:  # 0 for an aligned model
            request = replace(request, cfg=self.default_cfg[request.method])
        strategy = self._strategy(request)
        device, n = self.device, int(request.classes.numel())
        if request.graphs and device.type != "cuda":
            raise ValueError(f"graphs=True needs the models on a CUDA device, this Generator is on {device}")
        attention = _attention_for("torch" if request.compile else request.kernels, device)
        recording: contextlib.AbstractContextManager = contextlib.nullcontext()
        if attention is not sdpa_attention:  # what the kernel entry points run is recorded (and reported)
            from ar_course.kernels import record_dispatch  # ar_course.kernels is imported by now (_attention_for)

            recording = record_dispatch()

        precision = _resolve_precision(request.precision, device)
        generator = torch.Generator(device=device).manual_seed(request.seed) if request.seed is not None else None
        tally = Tally()
        bar = progress_bar(total=n, desc=strategy.label, unit="img", disable=not request.progress)

        def images_of(chunk: torch.Tensor) -> torch.Tensor:
            """One chunk's images ``(b, C, S, S)``; every image of the chunk waits for all of its passes."""
            before = tally.forward_passes
            out = strategy.run(chunk, request, generator, tally)
            tally.waited += (tally.forward_passes - before) * chunk.numel()
            bar.update(chunk.numel())
            return out

        with bar, use_attention(attention), _autocast(device, precision), recording as dispatched:
            _sync(device)
            start = time.perf_counter()
            # speculative decoding runs one image at a time
            images = generate_in_batches(images_of, request.classes.to(device),
                                         1 if strategy.one_at_a_time else request.batch_size)
            _sync(device)
            seconds = time.perf_counter() - start
        backends = {**_attention_report(attention, dispatched), "compiled": _compiled_report(request, tally)}
        if tally.graph_failure is not None:
            backends["fallbacks"] = [*backends["fallbacks"], f"cuda graphs: {tally.graph_failure} (ran eagerly)"]
        if tally.compile_failure is not None:
            backends["fallbacks"] = [*backends["fallbacks"], f"{tally.compile_failure} (ran eagerly)"]
        stats = _stats(request, str(device), precision, backends, tally, seconds)
        return Generation(images.float().cpu(), request.classes.to("cpu", copy=True), stats)  # not the request's

    def _strategy(self, request: GenerationRequest) -> Strategy:
        """The strategy of ``request``, after checking it against this Generator's models."""
        check_ids("classes", request.classes, self.num_classes, ("B",))
        strategy = self.strategies.get((request.method, request.speculative))
        if strategy is None:
            if (request.method, None) not in self.strategies:
                raise ValueError(f"this Generator has no {request.method!r} model")
            raise ValueError("speculative='draft' needs a draft model (ar_draft)")
        max_neighbors = self.ar.config.vocab_size - 1 if self.ar is not None else None
        check_int("neighbors", request.neighbors, lo=0, hi=max_neighbors)
        return strategy


def _check_models(name: str, model: object, expected: type, tokenizer_name: str | None = None,
                  tokenizer: object = None) -> None:
    """``model`` is an ``expected`` module and ``tokenizer`` (when named) a :class:`VQVAE` (``TypeError``)."""
    if not isinstance(model, expected):
        raise TypeError(f"{name} must be a {expected.__name__}, got {type(model).__name__}")
    if tokenizer_name is not None and not isinstance(tokenizer, VQVAE):
        raise TypeError(f"{tokenizer_name} must be a VQVAE, got {type(tokenizer).__name__}")


def _check_raster_pair(name: str, model: GPT, tokenizer: VQVAE) -> None:
    """A chapter 03 raster model fits ``tokenizer``: causal, class-conditional, and on the tokenizer's codes and
    grid (:func:`ar_course.raster.check_tokenizer`); ``ValueError`` naming ``name`` otherwise."""
    c = model.config
    if not c.causal or c.n_classes < 1:
        raise ValueError(f"{name} must be a causal, class-conditional raster model (chapter 03), got causal="
                         f"{c.causal}, n_classes={c.n_classes}")
    try:
        raster.check_tokenizer(tokenizer, model)
    except ValueError as exc:
        raise ValueError(f"{name} does not fit ar_tokenizer: {exc}") from None


def _stats(request: GenerationRequest, device: str, precision: str, backends: dict, tally: Tally,
           seconds: float) -> GenerationStats:
    """The :class:`GenerationStats` of a finished call."""
    n = int(request.classes.numel())
    return GenerationStats(
        method=request.method, speculative=request.speculative, device=device, precision=precision,
        backends=backends, images=n, seconds=seconds, forward_passes=tally.forward_passes,
        passes_per_image=tally.waited / n, draft_passes=tally.draft_passes,
        accepted_hist=list(tally.spec.accepted_hist),
        acceptance_rate=tally.spec.acceptance_rate if request.speculative else float("nan"),
        capture_seconds=tally.capture_seconds)


def _compiled_report(request: GenerationRequest, tally: Tally) -> str:
    """How the decode step ran: ``"torch.compile"``, ``"cuda graphs"`` or ``"no"`` (eager, a failed capture or
    a compile past torch's recompile limit included)."""
    if request.graphs and tally.graph_failure is None:
        return "cuda graphs"
    return "torch.compile" if request.compile and tally.compile_failure is None else "no"


def _attention_for(kernels: str, device: torch.device) -> AttentionFn:
    """The attention function of a call: torch's SDPA where no kernel may run on ``device`` for ``kernels``,
    else the kernel entry points with ``kernels`` as their backend (they record what really ran). ``"torch"``,
    and ``"auto"`` off CUDA (where it always picks torch for attention), leave :mod:`ar_course.kernels` unimported
    (and the simulators' environment variables unset: every process started afterwards would see them)."""
    if kernels == "torch" or (kernels == "auto" and device.type not in AUTO_KERNEL_DEVICES):
        return sdpa_attention
    from ar_course.kernels import select_backend  # imported on use: it sets the simulator defaults

    may_run = {select_backend(op, device, kernels) for op in ("flash_attention", "decode_attention")}
    return sdpa_attention if may_run == {"torch"} else KernelAttention(kernels)


def _attention_report(attention: AttentionFn, dispatched: DispatchRecord | None) -> dict[str, str | list[str]]:
    """What computed attention in one call: torch's SDPA for every call when the models ran
    :func:`~ar_course.transformer.model.sdpa_attention` (nothing recorded: ``dispatched`` None), else what the kernel
    entry points recorded they ran (``"none"`` for an op never called), and why any kernel fell back to torch."""
    if attention is sdpa_attention or dispatched is None:
        return {"attention": "torch", "decode_attention": "torch", "fallbacks": []}
    ran = dispatched.summary("flash_attention", "decode_attention")
    return {"attention": ran["flash_attention"], "decode_attention": ran["decode_attention"],
            "fallbacks": ran["fallbacks"]}


def _resolve_precision(precision: str, device: torch.device) -> str:
    """The dtype name ``precision`` (one of :data:`PRECISIONS`, checked by the caller) means on ``device``."""
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return precision


@contextlib.contextmanager
def _autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for the matmuls (weights, KV caches and sampling stay float32); ``"float32"`` turns off any
    autocast the caller has entered, so the precision asked for is the one that runs (and is reported)."""
    if precision == "float32":
        if not torch.amp.is_autocast_available(device.type):  # nothing to turn off (MPS before torch 2.5)
            yield
            return
        with torch.autocast(device.type, enabled=False):
            yield
        return
    with torch.autocast(device.type, dtype=getattr(torch, precision)):
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
