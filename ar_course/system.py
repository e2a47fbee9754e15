"""Chapter 07: the full system -- one image generator assembled from every chapter's finished modules.

    gen = Generator.from_pretrained("mnist")                    # tokenizers, VAR, raster AR, draft
    out = gen.generate(torch.arange(10), method="var", seed=0)  # out.images (10, 1, 32, 32) in [0, 1]
    print(out.stats.summary())                                  # forward passes, wall time, backends...

Pipeline: class labels -> a transformer samples tokens (chapter 04's VAR scale by scale, or chapter 03's
raster model token by token, optionally with chapter 05's speculative decoding) -> the chapter 01
tokenizer's decoder turns tokens into pixels. Attention can run on the chapter 06 kernels.

Guidance has one convention here for both methods: ``cfg = w`` samples from ``(1 + w) * cond - w * uncond``
logits, so ``cfg = 0`` is plain conditional sampling. (Chapter 03's ``cfg_scale`` is ``1 + w``; VAR ramps
``w`` from 0 at the first scale to ``cfg`` at the last, as the VAR paper does, unless ``ramp=False``.)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ar_course import checkpoint, raster, var
from ar_course.checkpoint import CheckpointError
from ar_course.raster.functional import from_raster
from ar_course.sampling import check_sampling
from ar_course.speculative import SpecStats, codebook_neighbors, sjd_generate, speculative_generate
from ar_course.tokenizers import VQVAE
from ar_course.transformer.counting import PassCounter
from ar_course.transformer.model import GPT, set_attention
from ar_course.utils import check_bool, check_ids, check_int, check_number, generate_in_batches, get_device

if TYPE_CHECKING:
    from ar_course.kernels import DispatchRecord

PRETRAINED = {
    "mnist": {"var_path": "var_mnist", "ar_path": "ar_mnist", "draft_path": "ar_mnist_draft"},
}
"""Shipped model sets: name -> the :func:`ar_course.checkpoint.available` names of their checkpoints (each
checkpoint names the tokenizer it was trained on)."""

METHODS = ("var", "ar")
SPECULATIVE = (None, "draft", "jacobi")
KERNELS = ("auto", "torch", "triton", "numba")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
DEFAULT_CFG = {"var": 2.0, "ar": 1.0}
"""Guidance strength ``w`` each shipped model was best at (class accuracy 0.99 and 0.98 in their checkpoints'
evaluations; the raster model's ``cfg_scale`` 2.0 is ``w = 1``)."""


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
    lists every kernel that failed and was answered by torch, with the reason; ``"compiled"`` is
    ``"torch.compile"`` or ``"no"``."""

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

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict:
        """A JSON-ready dict (the properties included)."""
        return {**asdict(self), "images_per_second": self.images_per_second}

    def summary(self) -> str:
        """One line for logs and the CLI."""
        spec = f" + {self.speculative}" if self.speculative else ""
        extra = f", acceptance {self.acceptance_rate:.2f}" if self.speculative else ""
        compiled = ", compiled" if self.backends.get("compiled", "no") != "no" else ""
        fallbacks = len(self.backends.get("fallbacks", []))
        compiled += f", {fallbacks} kernel fallback{'s' * (fallbacks > 1)}" if fallbacks else ""
        return (f"{self.images} images by {self.method}{spec} on {self.device} ({self.precision}, attention: "
                f"{self.backends['attention']}{compiled}): {self.seconds:.2f} s, "
                f"{self.images_per_second:.1f} images/s, {self.passes_per_image:.1f} forward passes per image{extra}")


@dataclass
class Generation:
    """Images ``(B, C, S, S)`` in [0, 1] (float32, on CPU), the ``classes`` ``(B,)`` they were asked for, and
    the call's :class:`GenerationStats`."""

    images: torch.Tensor
    classes: torch.Tensor
    stats: GenerationStats


class Generator:
    """Class-conditional image generation with the course's models.

    Args:
        var_model, var_tokenizer: a :class:`~ar_course.var.VAR` and its multi-scale tokenizer (optional).
        ar_model, ar_tokenizer: a chapter 03 raster-order :class:`~ar_course.transformer.GPT` and its VQ
            tokenizer (optional).
        ar_draft: a smaller raster model over the same tokens, for ``speculative="draft"`` (optional).
        dataset: what the models generate (``"mnist"``); names the evaluation classifier.
    """

    def __init__(
        self,
        var_model: var.VAR | None = None,
        var_tokenizer: VQVAE | None = None,
        ar_model: GPT | None = None,
        ar_tokenizer: VQVAE | None = None,
        ar_draft: GPT | None = None,
        dataset: str = "mnist",
    ) -> None:
        if (var_model is None) != (var_tokenizer is None) or (ar_model is None) != (ar_tokenizer is None):
            raise ValueError("pass each model together with its tokenizer")
        if var_model is None and ar_model is None:
            raise ValueError("a Generator needs a VAR model or a raster AR model")
        if ar_draft is not None and (ar_model is None or ar_draft.config.vocab_size != ar_model.config.vocab_size
                                     or ar_draft.config.n_classes != ar_model.config.n_classes):
            raise ValueError("the draft must model the raster model's tokens and classes")
        self.var, self.var_tokenizer = var_model, var_tokenizer
        self.ar, self.ar_tokenizer, self.ar_draft = ar_model, ar_tokenizer, ar_draft
        self.dataset = dataset
        self._neighbors: dict[int, torch.Tensor] = {}
        self._compiled: dict[str, Callable] = {}

    @classmethod
    def from_pretrained(cls, name: str = "mnist", device: str | torch.device = "auto") -> "Generator":
        """The shipped models of ``name`` (:data:`PRETRAINED`) on ``device`` (``"auto"``: CUDA if present)."""
        if name not in PRETRAINED:
            raise ValueError(f"unknown pretrained set {name!r}; choose from {sorted(PRETRAINED)}")
        return cls.from_checkpoints(**PRETRAINED[name], device=device, dataset=name)

    @classmethod
    def from_checkpoints(
        cls,
        var_path: str | Path | None = None,
        ar_path: str | Path | None = None,
        draft_path: str | Path | None = None,
        device: str | torch.device = "auto",
        dataset: str = "mnist",
    ) -> "Generator":
        """Models from checkpoints: shipped names (:func:`ar_course.checkpoint.available`) or files (safetensors +
        JSON metadata; tokenizers are found by the name or path each checkpoint records). A missing, corrupted
        or mismatched file raises :class:`~ar_course.checkpoint.CheckpointError` naming it."""
        dev = get_device(None if str(device) == "auto" else str(device))
        var_model = var_tok = ar_model = ar_tok = draft = None
        if var_path is not None:
            var_model, var_tok = checkpoint.load_with_tokenizer(var_path, dev, kind=var.CHECKPOINT_KIND)
        if ar_path is not None:
            ar_model, ar_tok = checkpoint.load_with_tokenizer(ar_path, dev, kind=raster.CHECKPOINT_KIND)
        if draft_path is not None:
            draft, draft_tok = checkpoint.load_with_tokenizer(draft_path, dev, kind=raster.CHECKPOINT_KIND)
            if ar_tok is not None and draft_tok.config != ar_tok.config:
                raise CheckpointError(f"{draft_path} was trained on a different tokenizer than {ar_path}")
        return cls(var_model, var_tok, ar_model, ar_tok, draft, dataset)

    @property
    def device(self) -> torch.device:
        model = self.var if self.var is not None else self.ar
        return next(model.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.var.config.n_classes if self.var is not None else self.ar.config.n_classes

    @torch.no_grad()
    def generate(
        self,
        classes: torch.Tensor | list[int],
        method: str = "var",
        cfg: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        speculative: str | None = None,
        relaxed_delta: float = 0.0,
        kernels: str = "auto",
        seed: int | None = 0,
        batch_size: int = 500,
        precision: str = "auto",
        ramp: bool = True,
        gamma: int = 4,
        window: int = 8,
        neighbors: int = 4,
        compile: bool = False,
        progress: bool = False,
    ) -> Generation:
        """Images of ``classes`` ``(B,)`` (ints in ``[0, num_classes)``).

        Args:
            method: ``"var"`` (next-scale prediction, S passes per batch) or ``"ar"`` (raster order, one pass
                per token).
            cfg: guidance strength ``w`` (see the module docstring); ``None``: :data:`DEFAULT_CFG`.
            top_k, top_p, temperature: sampling filters (``temperature=0`` is greedy).
            speculative: with ``method="ar"``: ``"draft"`` (speculative sampling with the draft model,
                ``gamma`` drafts per round) or ``"jacobi"`` (Speculative Jacobi Decoding, a window of
                ``window`` tokens). Both run one image at a time; both are exact unless ``relaxed_delta > 0``.
            relaxed_delta: with ``"jacobi"``: LANTERN-style relaxed acceptance over each code's ``neighbors``
                nearest codes, moving at most this much probability mass (0 = exact).
            kernels: ``"auto"`` runs attention on the chapter 06 kernels where they are faster on this
                device (on a GPU each kind of call is timed once, compiled Triton or numba.cuda against
                torch; on a CPU torch's fused attention is faster than the simulators, so torch);
                ``"torch"`` never uses them; ``"triton"`` / ``"numba"`` force one (on a CPU: the interpreter
                / simulator, slow, for checking agreement). ``stats.backends`` reports what really ran.
            seed: seeds one generator for the call (``None``: torch's global generator).
            batch_size: images per batched call; samples depend on it, so keep it fixed when comparing.
            precision: ``"auto"`` (bfloat16 autocast on CUDA, float32 on CPU) or a dtype name for autocast.
            compile: run the decode step (VAR's per-scale pass, the raster model's forward) through
                ``torch.compile(dynamic=True)``; attention then runs in torch (``kernels`` must be ``"auto"`` or
                ``"torch"``) and inductor fuses around it. Batched generation only (``speculative=None``). The
                first call compiles (tens of seconds on a CPU; needs a C++ compiler there), later calls reuse
                it. Same tokens as eager up to float rounding; on a 2-core CPU the raster decode ran 1.5-1.9x
                faster at batches 1-10, VAR's 1.15-1.25x (``benchmarks/bench_system.py``).
            progress: a ``tqdm`` bar over the images (useful for speculative decoding, one image at a time).

        Returns:
            A :class:`Generation`: images ``(B, C, S, S)`` float32 on CPU, classes, stats.

        Raises:
            ValueError: before any work, for ``classes`` that are empty (``classes is empty: ask for at least
                one class``), not 1-D, not ints (floats and bools are refused, even ``2.0``) or outside
                ``[0, num_classes)``; a number that is not finite or out of range (``cfg must be a finite
                number >= 0, got nan``); an unknown option name; or a combination of options that does not apply.
            TypeError: an argument of the wrong type: a number that is a string, ``None`` or a bool, a float
                where an integer is expected (``top_k``, ``batch_size``, ``seed``, ``gamma``, ``window``,
                ``neighbors``), a non-bool flag (``ramp``, ``compile``, ``progress``), or ``classes`` that
                torch cannot read as a sequence of numbers.
        """
        classes = self._check_classes(classes)
        relaxed_delta, compile = check_number("relaxed_delta", relaxed_delta, lo=0), check_bool("compile", compile)
        model = self._check_options(method, speculative, relaxed_delta, kernels, precision, compile, neighbors)
        cfg = DEFAULT_CFG[method] if cfg is None else check_number("cfg", cfg, lo=0)
        temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
        batch_size = check_int("batch_size", batch_size, lo=1)
        gamma, window = check_int("gamma", gamma, lo=0), check_int("window", window, lo=0)
        seed = None if seed is None else check_int("seed", seed, lo=-(2**63), hi=2**64 - 1)
        ramp, progress = check_bool("ramp", ramp), check_bool("progress", progress)
        device = self.device
        restore = self._attention_state()
        impl = self._set_kernels("torch" if compile else kernels, device)
        from ar_course.kernels import record_dispatch  # ar_course.kernels is imported by now (_set_kernels)
        precision = _resolve_precision(precision, device)
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        counter = self._install_compiled(method) if compile else PassCounter(model)
        draft_counter = PassCounter(self.ar_draft) if speculative == "draft" else None
        spec = SpecStats()
        weighted_passes = 0
        bar = tqdm(total=int(classes.numel()), desc=f"{method}{' + ' + speculative if speculative else ''}",
                   unit="img", disable=not progress)

        def images_of(chunk: torch.Tensor) -> torch.Tensor:
            """One chunk's images ``(b, C, S, S)``; every image of the chunk waits for all of its passes."""
            nonlocal weighted_passes
            before = counter.count
            if speculative is None:
                out = self._batched(method, chunk, cfg, top_k, top_p, temperature, generator, ramp)
            else:
                out = self._speculative(speculative, chunk, cfg, top_k, top_p, temperature, generator,
                                        relaxed_delta, gamma, window, neighbors, spec)
            weighted_passes += (counter.count - before) * chunk.numel()
            bar.update(chunk.numel())
            return out

        _sync(device)
        start = time.perf_counter()
        try:
            with _autocast(device, precision), record_dispatch() as dispatched:
                # speculative decoding runs one image at a time
                images = generate_in_batches(images_of, classes.to(device), 1 if speculative else batch_size)
            _sync(device)
        finally:
            bar.close()
            restore()  # the models' attention as it was before this call
            counter.remove()  # also takes a compiled step off the model
            if draft_counter is not None:
                draft_counter.remove()
        seconds = time.perf_counter() - start
        stats = GenerationStats(
            method=method, speculative=speculative, device=str(device), precision=precision,
            backends={**_attention_report(impl, dispatched), "compiled": "torch.compile" if compile else "no"},
            images=int(classes.numel()), seconds=seconds, forward_passes=counter.count,
            passes_per_image=weighted_passes / classes.numel(),
            draft_passes=draft_counter.count if draft_counter is not None else 0,
            accepted_hist=list(spec.accepted_hist),
            acceptance_rate=spec.acceptance_rate if speculative else float("nan"))
        return Generation(images.float().cpu(), classes.cpu(), stats)

    # -- pieces of generate --------------------------------------------------------------------------------

    def _check_classes(self, classes: torch.Tensor | list[int]) -> torch.Tensor:
        """``classes`` as a non-empty ``(B,)`` long tensor in ``[0, num_classes)`` (see :meth:`generate`)."""
        if isinstance(classes, (list, tuple)) and any(isinstance(c, (bool, np.bool_)) for c in classes):
            raise ValueError(f"classes must be a 1-D sequence of ints, got bools in {list(classes)}")
        try:
            classes = torch.as_tensor(classes)
        except (TypeError, ValueError, RuntimeError) as exc:  # strings, None, ragged lists, huge ints
            raise TypeError(f"classes must be a 1-D sequence of ints, got {classes!r} ({exc})") from None
        if classes.ndim == 1 and classes.numel() == 0:
            raise ValueError("classes is empty: ask for at least one class")
        if classes.ndim != 1 or classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
            raise ValueError(f"classes must be a 1-D sequence of ints, got shape {tuple(classes.shape)} "
                             f"{classes.dtype}")
        return check_ids("classes", classes.long(), self.num_classes, ("B",))

    def _check_options(self, method: str, speculative: str | None, relaxed_delta: float, kernels: str,
                       precision: str, compile: bool, neighbors: int) -> nn.Module:
        """The target model of ``method``, after checking the named options and their combination
        (``relaxed_delta`` and ``compile`` are checked numbers already)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if speculative not in SPECULATIVE:
            raise ValueError(f"speculative must be one of {SPECULATIVE}, got {speculative!r}")
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if speculative is not None and method != "ar":
            raise ValueError("speculative decoding applies to method='ar' (VAR already samples a whole "
                             "scale per pass)")
        if relaxed_delta > 0 and speculative != "jacobi":
            raise ValueError(f"relaxed_delta must be >= 0, and > 0 only with speculative='jacobi'; got "
                             f"{relaxed_delta} with speculative={speculative!r}")
        if compile and (speculative is not None or kernels not in ("auto", "torch")):
            raise ValueError("compile=True applies to batched generation (speculative=None) with torch attention "
                             f"(kernels 'auto' or 'torch'); got speculative={speculative!r}, kernels={kernels!r}")
        model = self.var if method == "var" else self.ar
        if model is None:
            raise ValueError(f"this Generator has no {method!r} model")
        if speculative == "draft" and self.ar_draft is None:
            raise ValueError("speculative='draft' needs a draft model (ar_draft)")
        max_neighbors = self.ar.config.vocab_size - 1 if self.ar is not None else None
        check_int("neighbors", neighbors, lo=0, hi=max_neighbors)
        return model

    def _attention_state(self):
        """A function that puts every attention layer's implementation (and the models' ``config.attn``) back
        as it is now."""
        from ar_course.transformer.model import SelfAttention

        models = [model for model in (self.var, self.ar, self.ar_draft) if model is not None]
        layers = [m for model in models for m in model.modules() if isinstance(m, SelfAttention)]
        saved = [(m, m.impl, m.kernel_backend) for m in layers]
        configs = [(model.config, model.config.attn) for model in models]

        def restore() -> None:
            for m, impl, backend in saved:
                m.impl, m.kernel_backend = impl, backend
            for config, attn in configs:
                config.attn = attn

        return restore

    def _set_kernels(self, kernels: str, device: torch.device) -> str:
        """Point every model's attention at torch's SDPA (``"sdpa"``) or at the kernel entry points with
        ``kernels`` as their backend (``"kernels"``: where some kernel may run here); returns which."""
        from ar_course.kernels import select_backend  # imported on use: it sets the simulator defaults

        may_run = {select_backend(op, device, kernels) for op in ("flash_attention", "decode_attention")}
        impl = "sdpa" if may_run == {"torch"} else "kernels"
        for model in (self.var, self.ar, self.ar_draft):
            if model is not None:
                set_attention(model, impl, kernels)
        return impl

    def _install_compiled(self, method: str) -> "_CompiledStep":
        """Route ``method``'s decode step through its ``torch.compile``d version (built once per Generator)."""
        model = self.var if method == "var" else self.ar
        name = "_run" if method == "var" else "forward"  # VAR.step calls _run once per scale
        if method not in self._compiled:
            self._compiled[method] = torch.compile(getattr(type(model), name).__get__(model), dynamic=True)
        return _CompiledStep(model, name, self._compiled[method])

    def _batched(self, method: str, classes: torch.Tensor, cfg: float, top_k: int | None, top_p: float | None,
                 temperature: float, generator: torch.Generator | None, ramp: bool) -> torch.Tensor:
        """One batch of images ``(b, C, S, S)`` without speculative decoding."""
        if method == "var":
            pyramid = var.sample_pyramid(self.var, self.var_tokenizer.quantizer, classes, cfg, top_k, top_p,
                                         temperature, generator, ramp)
            return self.var_tokenizer.decode_from_indices(pyramid)
        side = self.ar_tokenizer.config.latent_side
        maps = raster.generate_tokens(self.ar, classes, (side, side), 1.0 + cfg, temperature, top_k, top_p,
                                      generator)
        return self.ar_tokenizer.decode_from_indices(maps)

    def _speculative(self, kind: str, cls: torch.Tensor, cfg: float, top_k: int | None, top_p: float | None,
                     temperature: float, generator: torch.Generator | None, delta: float, gamma: int,
                     window: int, neighbors: int, spec: SpecStats) -> torch.Tensor:
        """One image ``(1, C, S, S)`` of class ``cls`` ``(1,)`` with speculative decoding; adds to ``spec``."""
        side = self.ar_tokenizer.config.latent_side
        n = side * side
        if kind == "draft":
            start = torch.zeros(1, 0, dtype=torch.long, device=cls.device)  # (1, 0): the class token starts
            seq, stats = speculative_generate(self.ar, self.ar_draft, start, n, gamma, temperature, top_k, top_p,
                                              generator, classes=cls, cfg_scale=1.0 + cfg)
        else:
            nbrs = self._codebook_neighbors(neighbors) if delta > 0 else None
            seq, stats = sjd_generate(self.ar, n, classes=cls, window=window, temperature=temperature,
                                      top_k=top_k, top_p=top_p, generator=generator, cfg_scale=1.0 + cfg,
                                      delta=delta, neighbors=nbrs)
        spec.merge(stats)
        return self.ar_tokenizer.decode_from_indices(from_raster(seq, side, side))

    def _codebook_neighbors(self, k: int) -> torch.Tensor:
        """``(V, k)`` nearest codes of every code of the raster tokenizer (cached per ``k``)."""
        if k not in self._neighbors:
            self._neighbors[k] = codebook_neighbors(self.ar_tokenizer.quantizer.codebook.detach(), k)
        return self._neighbors[k]


class _CompiledStep:
    """Shadows ``model.<name>`` with a compiled function and counts its calls (one per forward pass) until
    :meth:`remove`. A counting hook on a block would sit inside the compiled region and be traced."""

    def __init__(self, model: nn.Module, name: str, compiled: Callable) -> None:
        self.count, self._model, self._name = 0, model, name

        def step(*args, **kwargs):
            self.count += 1
            return compiled(*args, **kwargs)

        setattr(model, name, step)  # an instance attribute: found before the class's method

    def remove(self) -> None:
        self._model.__dict__.pop(self._name, None)


def _attention_report(impl: str, dispatched: DispatchRecord) -> dict[str, str | list[str]]:
    """What computed attention in one call: torch's SDPA for every call when the models ran ``impl="sdpa"``,
    else what the kernel entry points recorded they ran (``"none"`` for an op never called), and why any
    kernel fell back to torch."""
    if impl == "sdpa":
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
    """Mixed precision for the matmuls (weights, KV caches and sampling stay float32)."""
    if precision == "float32":
        yield
        return
    with torch.autocast(device.type, dtype=getattr(torch, precision)):
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
