"""VAR: a class-conditional transformer that predicts a multi-scale token pyramid one whole scale at a time.

Follows "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction", scaled down::

    model, tokenizer = load_pretrained()
    images = generate_images(model, tokenizer, torch.arange(10), cfg=2.0, seed=0)   # (10, 1, 32, 32)

* Sequence: a start token (the class embedding plus a learned vector) predicts scale 0; the tokenizer's
  canvas after scales ``< k``, area-downsampled to ``s_k`` and linearly embedded, predicts scale ``k``. Every
  position gets a level (scale) embedding and a learned position embedding.
* Training uses the block-causal mask (:func:`~ar_course.var.functional.block_causal_mask`); generation runs
  one forward pass per scale over that scale's ``s_k^2`` positions with a KV cache and no mask, which is the
  same computation.
* Class conditioning: ``cond="ada"`` (VAR) feeds the class embedding to adaptive RMSNorms in every block and
  before the head; ``cond="token"`` is the simpler alternative where only the start token carries the class.
  Class ``n_classes`` is the null class of classifier-free guidance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ar_course import checkpoint
from ar_course.raster.functional import condition_dropout
from ar_course.sampling import SamplingConfig, cfg_mix, check_cfg, check_generator, check_sampling, sample
from ar_course.tokenizers import VQVAE, MultiScaleVQ
from ar_course.transformer.model import Block, GPTConfig, KVCache, RMSNorm, StaticKVCache, check_cache
from ar_course.utils import (check_bool, check_ids, check_int, check_number, check_same_device, check_seed,
                              generate_in_batches)
from ar_course.var import functional as ref

PRETRAINED_PATH = checkpoint.ASSETS / "var_mnist.safetensors"
CHECKPOINT_KIND = "var"


@dataclass
class VARConfig:
    """Hyper-parameters of :class:`VAR`.

    Raises:
        TypeError: a size, ``n_classes`` or a scale that is not an integer (``2.5``, ``"3"``).
        ValueError: a size ``< 1``, scales that do not increase or do not start at 1, an unknown ``cond``,
            ``n_classes < 1``, or as :class:`GPTConfig` (``n_embd`` not divisible by ``n_head``...).
    """

    vocab_size: int = 256  # codebook size of the tokenizer
    latent_dim: int = 16  # channels of the tokenizer's latent map (the teacher-forcing inputs)
    scales: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    n_classes: int = 10  # class n_classes is the null class
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp: str = "swiglu"
    dropout: float = 0.0
    cond: str = "ada"  # "ada" (adaptive norms, as VAR) or "token" (class only in the start token)
    attn: str = "sdpa"  # "sdpa" or "plain" (reference attention)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "latent_dim", "n_layer", "n_head", "n_embd"):
            setattr(self, name, check_int(name, getattr(self, name), lo=1))
        if isinstance(self.scales, (str, bytes)) or not hasattr(self.scales, "__iter__"):
            raise TypeError(f"scales must be a sequence of increasing integer sides, got {self.scales!r}")
        # a tuple of ints (JSON gives lists back); a side 2.5 is refused, not truncated to 2
        self.scales = tuple(check_int(f"scales[{i}]", s) for i, s in enumerate(self.scales))
        if not self.scales or any(a >= b for a, b in zip(self.scales, self.scales[1:])) or self.scales[0] < 1:
            raise ValueError(f"scales must be increasing sides >= 1, got {self.scales}")
        if self.scales[0] != 1:  # the start token's one position predicts the first map
            raise ValueError(f"scales must start at 1 (the start token predicts the 1x1 first map), got {self.scales}")
        if self.cond not in ("ada", "token"):
            raise ValueError(f"cond must be 'ada' or 'token', got {self.cond!r}")
        self.n_classes = check_int("n_classes", self.n_classes)
        if self.n_classes < 1:
            raise ValueError(f"VAR is class-conditional: n_classes must be >= 1, got {self.n_classes}")
        self.gpt_config()  # validates n_embd / n_head / mlp / attn

    @property
    def num_tokens(self) -> int:
        """``L = sum_k s_k^2``."""
        return sum(s * s for s in self.scales)

    @property
    def num_scales(self) -> int:
        """``S``, the number of scales."""
        return len(self.scales)

    def gpt_config(self) -> GPTConfig:
        """The :class:`GPTConfig` the transformer blocks are built from (no positional rotation: VAR adds
        learned embeddings instead)."""
        return GPTConfig(vocab_size=self.vocab_size, block_size=self.num_tokens, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, mlp=self.mlp, pos="none",
                         dropout=self.dropout, attn=self.attn)

    @classmethod
    def from_dict(cls, d: dict) -> "VARConfig":
        """Build from a dict such as a checkpoint's stored config: :func:`~ar_course.checkpoint.config_from_dict`
        (missing keys take their defaults, an unknown key is a ``ValueError``)."""
        return checkpoint.config_from_dict(cls, d)

    def to_dict(self) -> dict:
        """The fields as a plain dict (what a checkpoint stores; :meth:`from_dict` reads it back)."""
        return asdict(self)


class HeadNorm(nn.Module):
    """RMSNorm before the output head; adaptive (shift and scale from the condition) when ``cond_dim > 0``."""

    def __init__(self, dim: int, cond_dim: int = 0, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps, affine=cond_dim == 0)
        self.ada = nn.Linear(cond_dim, 2 * dim) if cond_dim else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T, C)``, ``cond`` ``(B, cond_dim)`` -> ``(B, T, C)``."""
        if self.ada is None:
            return self.norm(x)
        shift, scale = self.ada(F.silu(cond))[:, None, :].chunk(2, dim=-1)  # 2 x (B, 1, C)
        return self.norm(x) * (1 + scale) + shift


class VAR(nn.Module):
    """Next-scale prediction over a token pyramid of ``config.scales``.

    ``forward(inputs, classes)``: teacher-forced logits of every position, ``(B, L, V)``, under the
    block-causal mask. ``step(k, x, classes, cache)``: logits of scale ``k`` alone, ``(B, s_k^2, V)``, reading
    earlier scales from a :class:`KVCache`. ``generate(vq, classes, ...)``: a token pyramid in ``S`` passes."""

    def __init__(self, config: VARConfig) -> None:
        if not isinstance(config, VARConfig):
            hint = " (build one with VARConfig(**d) or VARConfig.from_dict(d))" if isinstance(config, dict) else ""
            raise TypeError(f"config must be a VARConfig, got {type(config).__name__}{hint}")
        super().__init__()
        self.config = config
        C, gpt = config.n_embd, config.gpt_config()
        cond_dim = C if config.cond == "ada" else 0
        self.class_emb = nn.Embedding(config.n_classes + 1, C)
        self.start = nn.Parameter(torch.zeros(C))  # added to the class embedding to form the start token
        self.word_embed = nn.Linear(config.latent_dim, C)
        self.level_emb = nn.Embedding(config.num_scales, C)
        self.pos_emb = nn.Parameter(torch.zeros(config.num_tokens, C))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(gpt, cond_dim=cond_dim) for _ in range(config.n_layer)])
        self.head_norm = HeadNorm(C, cond_dim)
        self.head = nn.Linear(C, config.vocab_size)
        self.register_buffer("mask", ref.block_causal_mask(config.scales), persistent=False)  # (L, L)
        self.bounds = ref.scale_bounds(config.scales)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ada." in name or name.startswith("head_norm.ada"):
                nn.init.zeros_(p)  # adaptive norms start as the identity (adaLN-zero)
            elif name.endswith("proj.weight"):  # residual projections, scaled by depth as in GPT-2
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.ndim >= 2 or name in ("start",):
                nn.init.normal_(p, std=0.02)

    @property
    def null_class(self) -> int:
        """Class index meaning "no class" (classifier-free guidance)."""
        return self.config.n_classes

    def num_params(self) -> int:
        """Number of parameters (all of them, trainable or not)."""
        return sum(p.numel() for p in self.parameters())

    def make_cache(self, batch_size: int, static: bool = False) -> KVCache | StaticKVCache:
        """An empty :class:`KVCache` (``static=True``: :class:`StaticKVCache`) for ``L`` positions on this
        model's device and dtype."""
        c, p = self.config, self.pos_emb
        kind = StaticKVCache if static else KVCache
        return kind(c.n_layer, batch_size, c.n_head, c.num_tokens, c.n_embd // c.n_head, p.device, p.dtype)

    def _check_classes(self, classes: torch.Tensor, B: int | str = "B", on_device: bool = True) -> None:
        """``classes``: a non-empty ``(B,)`` long tensor in ``[0, n_classes]`` (``n_classes`` = the null class), on
        the model's device unless ``on_device`` is False (a caller that moves them)."""
        if on_device:
            check_same_device("classes", classes, self)
        check_ids("classes", classes, self.null_class + 1, (B,))

    def _run(self, x: torch.Tensor, cond: torch.Tensor, start: int, mask: torch.Tensor | None,
             cache: KVCache | StaticKVCache | None) -> torch.Tensor:
        """Embeddings of positions ``start .. start+T-1`` ``(B, T, C)`` -> logits ``(B, T, V)``.

        With a :class:`StaticKVCache` (``mask`` None) the keys are the whole cache and the positions past
        the new ones are masked on the device (:meth:`StaticKVCache.visible`): no host sync, so a CUDA graph
        per scale can capture the pass."""
        if isinstance(cache, StaticKVCache):
            mask = cache.visible(cache.positions(x.shape[1]), causal=False)  # (T, L)
        x = ref.embed_levels_positions(x, self.level_emb.weight, self.pos_emb, self.config.scales, start)
        x = self.drop(x)
        block_cond = cond if self.config.cond == "ada" else None
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, causal=False, cache=cache, layer=i, cond=block_cond)
        return self.head(self.head_norm(x, cond))  # (B, T, V)

    def start_token(self, classes: torch.Tensor) -> torch.Tensor:
        """The start token ``(B, 1, C)`` of ``classes`` ``(B,)`` (``n_classes`` = the null class).

        Raises:
            TypeError: ``classes`` is not a tensor.
            ValueError: ``classes`` not a non-empty ``(B,)`` long tensor in ``[0, n_classes]`` on the model's device
                (one host sync).
        """
        self._check_classes(classes)
        return self._start_token(classes)

    def _start_token(self, classes: torch.Tensor) -> torch.Tensor:
        """:meth:`start_token` of classes already checked."""
        return (self.class_emb(classes) + self.start)[:, None, :]  # (B, 1, C)

    def _embed_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing inputs ``(B, T, latent_dim)`` of any float dtype (cast to the model's, as the
        tokenizers cast their input) -> embeddings ``(B, T, C)``."""
        return self.word_embed(x.to(self.word_embed.weight.dtype))

    def forward(self, inputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(B, L, V)``.

        ``inputs``: ``(B, L - 1, latent_dim)`` floats (any float dtype, cast to the model's) from
        :func:`~ar_course.var.functional.teacher_forcing_sequence`; ``classes``: ``(B,)`` long (``n_classes`` =
        null).

        Raises:
            TypeError: ``inputs`` or ``classes`` is not a tensor.
            ValueError: ``inputs`` of another shape or not floating-point, or bad ``classes``.
        """
        c = self.config
        want = f"inputs must be a float (B, {c.num_tokens - 1}, {c.latent_dim}) tensor"
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"{want}, got {type(inputs).__name__}")
        if (inputs.ndim != 3 or tuple(inputs.shape[1:]) != (c.num_tokens - 1, c.latent_dim)
                or not inputs.is_floating_point()):
            raise ValueError(f"{want}, got {tuple(inputs.shape)} {inputs.dtype}")
        self._check_classes(classes, inputs.shape[0])
        x = torch.cat([self._start_token(classes), self._embed_inputs(inputs)], dim=1)  # (B, L, C)
        return self._run(x, self.class_emb(classes), 0, self.mask, None)

    def step(self, k: int, x: torch.Tensor | None, classes: torch.Tensor, cache: KVCache | StaticKVCache, *,
             run: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of scale ``k`` ``(B, s_k^2, V)``: one forward pass over that scale's positions.

        ``x``: ``None`` for ``k = 0`` (the start token is built from ``classes``), else the scale's input
        ``(B, s_k^2, latent_dim)`` (see :func:`~ar_course.var.functional.scale_step`). ``cache`` must hold
        exactly scales ``0 .. k-1`` (checked for a :class:`KVCache`; a :class:`StaticKVCache`'s length lives
        on the device and is not read back); it is advanced by ``s_k^2``. No mask: the cache holds only earlier
        scales (a static cache masks its unused positions itself).
        ``run``: what computes the pass, called like ``self._run`` (default; e.g. its ``torch.compile``d version,
        or a wrapper that counts the passes).

        Raises:
            TypeError: ``k`` not an integer, ``cache`` not a :class:`KVCache` or :class:`StaticKVCache`
                (``model.make_cache(B)``), ``classes`` not a tensor.
            ValueError: ``k`` outside ``[0, S)``, a cache that does not hold scales ``0 .. k-1`` or holds another
                number of rows than ``classes``, bad ``classes`` or ``x``.
        """
        k = check_int("k", k, 0, self.config.num_scales - 1)
        if not isinstance(cache, (KVCache, StaticKVCache)):
            raise TypeError(f"cache must be a KVCache or StaticKVCache (model.make_cache(batch_size)), got "
                            f"{type(cache).__name__}")
        begin, end = self.bounds[k]
        if isinstance(cache, KVCache) and cache.length != begin:
            raise ValueError(f"scale {k} starts at position {begin} but the cache holds {cache.length}")
        self._check_classes(classes)
        B = classes.shape[0]
        if cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} rows but classes has {B}: build it with "
                             f"model.make_cache({B})")
        if k == 0:
            h = self._start_token(classes)  # (B, 1, C)
        else:
            if (not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, end - begin, self.config.latent_dim)
                    or not x.is_floating_point()):
                got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"scale {k} needs float inputs ({B}, {end - begin}, {self.config.latent_dim}), "
                                 f"got {got}")
            h = self._embed_inputs(x)  # (B, s_k^2, C)
        logits = (self._run if run is None else run)(h, self.class_emb(classes), begin, None, cache)
        cache.advance(end - begin)
        return logits

    def loss(self, vq: MultiScaleVQ, indices: list[torch.Tensor], classes: torch.Tensor, p_uncond: float = 0.0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over all tokens of a pyramid and per scale ``(S,)``; with ``p_uncond > 0`` each
        class is replaced by the null class with that probability (condition dropout, for guidance). The
        trainer draws the dropout in its batch stream instead, for the global batch
        (:func:`ar_course.raster.model.condition_dropout_batches`).

        ``vq``: the tokenizer's :class:`MultiScaleVQ` (``tokenizer.quantizer``); ``indices``: its pyramid, one
        ``(B, s_k, s_k)`` long map per scale. Checking the ids costs one host sync per map on CUDA.

        Raises:
            TypeError: ``vq`` is not a :class:`MultiScaleVQ` (a whole VQVAE, say), ``indices`` not a list of
                tensors, ``classes`` not a tensor, or ``p_uncond`` not a number.
            ValueError: a tokenizer whose scales, codebook or latent size differ from the model's, maps of the
                wrong number, shape or dtype or with ids outside ``[0, vocab_size)``, bad ``classes``, or
                ``p_uncond`` outside ``[0, 1]``.
        """
        p_uncond = check_number("p_uncond", p_uncond, 0, 1)
        check_tokenizer(vq, self.config)
        check_pyramid("indices", indices, self.config)
        with torch.no_grad():
            inputs, targets = ref.teacher_forcing_sequence(vq, indices)
        if p_uncond > 0:
            classes = condition_dropout(classes, p_uncond, self.null_class, generator)
        return ref.var_loss(self(inputs, classes), targets, self.config.scales)

    @torch.no_grad()
    def generate(self, vq: MultiScaleVQ, classes: torch.Tensor, **options: Any) -> list[torch.Tensor]:
        """A token pyramid (one ``(B, s_k, s_k)`` map per scale) for ``classes`` ``(B,)``: :func:`sample_pyramid`
        with the same keyword ``options`` (``sampling``, ``cfg``, ``ramp``, ``generator``, ``known``...)."""
        return sample_pyramid(self, vq, classes, **options)


@torch.no_grad()
def sample_pyramid(
    model: VAR,
    vq: MultiScaleVQ,
    classes: torch.Tensor,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    cfg: float = 0.0,
    ramp: bool = True,
    generator: torch.Generator | None = None,
    known: list[torch.Tensor] | None = None,
    known_mask: torch.Tensor | list[torch.Tensor] | None = None,
    cache: str | StaticKVCache = "dynamic",
    run: Callable[..., torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """VAR's sampling loop: ``S`` forward passes, one per scale, with a KV cache.

    Guidance of strength ``cfg = w`` (``0``: the conditional model): the conditional rows and null-class rows
    run in one doubled batch and scale ``k`` samples from ``(1 + t) cond - t uncond``
    (:func:`~ar_course.sampling.cfg_mix`) with ``t = w * k / (S - 1)`` (``ramp=True``, VAR's schedule) or
    ``t = w``. Then ``sampling`` (temperature, top-k, top-p: :func:`ar_course.sampling.sample`), all tokens
    of a scale drawn at once from ``generator``. ``cache``: ``"dynamic"`` (:class:`KVCache`), ``"static"``
    (:class:`StaticKVCache`: passes without host sync, same tokens up to float rounding), or a
    :class:`StaticKVCache` of ``L`` positions and ``B`` rows (``2B`` guided) to reset and reuse (its buffers
    stay put, so CUDA graphs captured over them replay). ``run`` replaces the
    model's pass (as in :meth:`VAR.step`; e.g. a CUDA-graph replay per scale).

    Zero-shot inpainting/outpainting: ``known`` is a pyramid (e.g. of a real image) and ``known_mask`` a
    ``(B, H, H)`` bool map at the finest scale (``True`` = keep) or one ``(B, s_k, s_k)`` map per scale; the
    kept tokens replace the sampled ones at every scale before the canvas is updated.

    Returns one ``(B, s_k, s_k)`` long map per scale.

    Raises:
        TypeError: ``model`` is not a :class:`VAR`, ``vq`` not a :class:`MultiScaleVQ`, ``sampling`` not a
            ``SamplingConfig``, ``generator`` not a ``torch.Generator`` (a seed), ``known`` not a list,
            ``known_mask`` neither a tensor nor a list, or a number or flag of the wrong type.
        ValueError: ``classes`` not a non-empty ``(B,)`` long tensor in ``[0, n_classes]`` on the model's device,
            a tokenizer whose scales, codebook or latent size differ from the model's, a non-finite ``cfg``, an
            unknown ``cache`` (or a StaticKVCache of another size), or inpainting maps of the wrong number, shape,
            dtype or range."""
    _check_model(model)
    c = model.config
    check_tokenizer(vq, c)
    model._check_classes(classes)
    B = classes.shape[0]
    sampling, cfg, ramp = check_sampling(sampling), check_cfg(cfg), check_bool("ramp", ramp)
    generator = check_generator(generator)
    masks = _check_inpainting(known, known_mask, B, c)
    guided = cfg != 0
    check_cache(cache, B * (1 + guided), c.num_tokens)
    cls = torch.cat([classes, torch.full_like(classes, model.null_class)]) if guided else classes  # (B or 2B,)
    kv = cache if isinstance(cache, StaticKVCache) else model.make_cache(cls.shape[0], static=cache == "static")
    kv.reset()
    f_hat, x, pyramid = None, None, []
    for k, s in enumerate(c.scales):
        logits = model.step(k, x, cls, kv, run=run)  # (B or 2B, s*s, V)
        if guided:
            t = ref.guidance_strength(cfg, k, c.num_scales, ramp=ramp)
            logits = cfg_mix(logits[:B], logits[B:], t)  # (B, s*s, V)
        tokens = sample(logits, sampling=sampling, generator=generator)  # (B, s*s)
        if masks is not None:
            tokens = torch.where(masks[k].flatten(1), known[k].flatten(1).to(tokens.device), tokens)
        pyramid.append(tokens.view(B, s, s))
        f_hat, x = ref.scale_step(vq, f_hat, k, tokens)
        if guided and x is not None:
            x = torch.cat([x, x])  # (2B, s'^2, D)
    return pyramid


def _check_model(model: VAR) -> None:
    """``TypeError`` unless ``model`` is a :class:`VAR` (or its ``torch.compile``d wrapper); no values read."""
    if not isinstance(getattr(model, "_orig_mod", model), VAR):
        hint = " (pass the model first, then the tokenizer)" if isinstance(model, (VQVAE, MultiScaleVQ)) else ""
        raise TypeError(f"model must be a VAR, got {type(model).__name__}{hint}")


def check_tokenizer(vq: MultiScaleVQ, c: VARConfig) -> None:
    """``vq`` is a :class:`MultiScaleVQ` with the scales, codebook size and latent size of the model of config ``c``.

    Raises:
        TypeError: ``vq`` is not a :class:`MultiScaleVQ` (a whole :class:`VQVAE`, say: pass its ``.quantizer``).
        ValueError: its scales, number of codes or code size differ from the model's.
    """
    ref.check_vq(vq)
    if (tuple(vq.scales), vq.num_codes, vq.dim) != (c.scales, c.vocab_size, c.latent_dim):
        raise ValueError(f"the tokenizer (scales {tuple(vq.scales)}, {vq.num_codes} codes of size {vq.dim}) does "
                         f"not match the model (scales {c.scales}, {c.vocab_size} codes of size {c.latent_dim})")


def check_pyramid(name: str, pyramid: list[torch.Tensor], c: VARConfig, B: int | str = "B",
                  dtype: torch.dtype | None = torch.long) -> None:
    """``pyramid`` (called ``name`` in messages) is a list of ``S`` maps ``(B, s_k, s_k)`` of codes in
    ``[0, vocab_size)`` for the model of config ``c`` (``dtype``: ``None`` for any integer dtype); one host sync
    per map on CUDA.

    Raises:
        TypeError: ``pyramid`` is not a list or a map not a tensor.
        ValueError: another number of maps, a map of the wrong shape or dtype, or an id out of range.
    """
    if not isinstance(pyramid, (list, tuple)):
        raise TypeError(f"{name} must be a list of {c.num_scales} maps (B, s, s) for scales {c.scales}, got "
                        f"{type(pyramid).__name__}")
    if len(pyramid) != c.num_scales:
        raise ValueError(f"{name} must hold {c.num_scales} maps for scales {c.scales}, got {len(pyramid)}")
    for k, (tokens, s) in enumerate(zip(pyramid, c.scales)):
        check_ids(f"{name}[{k}]", tokens, c.vocab_size, (B, s, s), dtype=dtype)
        B = tokens.shape[0]


def _check_inpainting(known: list[torch.Tensor] | None, known_mask: torch.Tensor | list[torch.Tensor] | None,
                      B: int, c: VARConfig) -> list[torch.Tensor] | None:
    """The per-scale ``(B, s_k, s_k)`` bool masks of :func:`sample_pyramid`'s inpainting input (``None``
    without it), after checking ``known`` (``S`` maps of codes) and ``known_mask``."""
    if known is None and known_mask is None:
        return None
    if known is None or known_mask is None:
        raise ValueError("inpainting needs both known (a token pyramid) and known_mask")
    check_pyramid("known", known, c, B, dtype=None)
    if isinstance(known_mask, torch.Tensor):
        masks = ref.scale_masks(known_mask, c.scales)
    elif isinstance(known_mask, (list, tuple)):
        masks = list(known_mask)
    else:
        raise TypeError(f"known_mask must be a (B, {c.scales[-1]}, {c.scales[-1]}) bool tensor or a list of one "
                        f"(B, s, s) bool map per scale, got {type(known_mask).__name__}")
    if len(masks) != c.num_scales:
        raise ValueError(f"known_mask must hold {c.num_scales} maps for scales {c.scales}, got {len(masks)}")
    for k, (s, mask) in enumerate(zip(c.scales, masks)):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, s, s):
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"known_mask at scale {k} must be a ({B}, {s}, {s}) bool tensor, got {got}")
    return masks


@torch.no_grad()
def generate_images(
    model: VAR,
    tokenizer: VQVAE,
    classes: torch.Tensor,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    cfg: float = 0.0,
    ramp: bool = True,
    seed: int | None = 0,
    batch_size: int = 500,
    cache: str = "dynamic",
) -> torch.Tensor:
    """Images ``(B, C, S, S)`` in [0, 1] for ``classes`` ``(B,)``: sample pyramids (``sampling``, guidance
    ``cfg = w`` with or without the ``ramp``, KV ``cache`` ``"dynamic"`` or ``"static"``: same images up to float
    rounding), decode.

    ``seed`` seeds one generator for the whole call (``None``: torch's global one); work runs in chunks of
    ``batch_size``, and samples depend on the chunking. The default ``cfg=0`` samples without guidance: the
    shipped ``var_mnist`` is best at ``cfg=2`` (``ar_course.system.DEFAULT_CFG``, what
    :class:`~ar_course.system.Generator` uses; ``var_mnist_cca`` is aligned to sample at 0).

    Raises as :func:`sample_pyramid`, for a ``tokenizer``
    that is not a :class:`VQVAE` (``TypeError``; its ``.quantizer`` goes to :func:`sample_pyramid`), and for a
    ``seed`` or ``batch_size`` that is not an integer (``TypeError``) or a ``batch_size < 1`` (``ValueError``),
    and for a ``model`` that is not a :class:`VAR` (``TypeError``)."""
    _check_model(model)
    model._check_classes(classes, on_device=False)  # moved to the model's device below
    if not isinstance(tokenizer, VQVAE):
        raise TypeError(f"tokenizer must be a VQVAE, got {type(tokenizer).__name__}")
    check_tokenizer(tokenizer.quantizer, model.config)
    check_same_device("the tokenizer", tokenizer, model)
    batch_size = check_int("batch_size", batch_size, lo=1)
    seed = None if seed is None else check_seed(seed)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def images_of(chunk: torch.Tensor) -> torch.Tensor:
        pyramid = sample_pyramid(model, tokenizer.quantizer, chunk, sampling=sampling, cfg=cfg, ramp=ramp,
                                 generator=generator, cache=cache)
        return tokenizer.decode_from_indices(pyramid)  # (b, C, S, S)

    return generate_in_batches(images_of, classes.to(device), batch_size)  # (B, C, S, S)


def save_pretrained(model: VAR, path: str | Path, **extra: Any) -> Path:
    """Write ``model`` as a float16 safetensors checkpoint with its config and ``extra`` metadata (load it with
    :func:`ar_course.checkpoint.load`)."""
    state = {k: v.half() for k, v in model.state_dict().items()}
    return checkpoint.save_checkpoint(path, state, model.config, kind=CHECKPOINT_KIND, **extra)


def load_pretrained(device: torch.device | str = "cpu", path: str | Path | None = None) -> tuple[VAR, VQVAE]:
    """The shipped MNIST VAR (or ``path``: a file or a shipped checkpoint name) and the tokenizer it was trained on
    (``mnist_msvq``): ``(model, tokenizer)``, both in eval mode (:func:`ar_course.checkpoint.load_with_tokenizer`)."""
    return checkpoint.load_with_tokenizer(PRETRAINED_PATH if path is None else path, device,
                                          kind=CHECKPOINT_KIND)


def pretrained_info(path: str | Path | None = None) -> dict:
    """What the trainer recorded with the checkpoint: steps, seed, losses, accuracy per guidance scale...
    (:func:`ar_course.checkpoint.info`)."""
    return checkpoint.info(PRETRAINED_PATH if path is None else path)
