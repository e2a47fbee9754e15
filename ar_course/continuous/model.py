"""Class-conditional raster-order autoregression over continuous tokens with a flow-matching head (chapter 10).

The backbone is chapter 03's: the chapter 02 transformer blocks with 2-D rotary positions over the 8x8 map and a
class token first (class ``n_classes`` is the null class, learnt by condition dropout). Instead of an embedding
table and logits it reads each token through a linear layer and emits a condition vector ``z_i`` per position;
a small MLP head, trained by flow matching, models ``p(x_i | z_i)`` for the next continuous token ``x_i``
(NextStep-1's flow-matching head; MAR's diffusion loss is the same idea with a diffusion objective)::

    model, tokenizer = load_pretrained()
    images = generate_images(model, tokenizer, torch.arange(10), steps=16, cfg=1.0, seed=0)   # (10, 1, 32, 32)

Sampling runs the backbone once per position (a KV cache) and integrates the head's ODE in ``steps`` Euler
steps from noise of standard deviation ``temperature``; classifier-free guidance mixes the conditional and
null-class velocities, ``(1 + w) * v_cond - w * v_uncond``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ar_course import checkpoint
from ar_course import distributed as ddp
from ar_course.continuous.functional import euler_sample, flow_matching_loss, guided_velocity
from ar_course.raster.model import raster_config
from ar_course.sampling import check_generator
from ar_course.tokenizers import VQVAE
from ar_course.transformer.model import Block, GPTConfig, KVCache, RMSNorm, Rotary, check_cache_layout
from ar_course.utils import (
    check_bool, check_grid, check_ids, check_int, check_number, check_same_device, check_seed, generate_in_batches,
)

PRETRAINED_PATH = checkpoint.ASSETS / "continuous_ar_mnist.safetensors"
CHECKPOINT_KIND = "continuous_ar"
TIME_FEATURES = 32
"""Sinusoidal features of the flow time ``t`` that the head reads."""


@dataclass
class ContinuousARConfig:
    """Hyper-parameters of :class:`ContinuousAR`. Checked when made, with the backbone's
    (:class:`~ar_course.transformer.model.GPTConfig`) rules too.

    Raises:
        TypeError: a size that is not an integer, or a ``dropout`` that is not a number.
        ValueError: a size ``< 1``, a ``grid`` that is not two sides ``>= 1``, ``n_embd`` not divisible by
            ``n_head``, a head size the 2-D rotary embedding cannot split, or ``dropout`` outside ``[0, 1)``.
    """

    token_dim: int = 4  # channels of one continuous token (the tokenizer's latent_dim)
    grid: tuple[int, int] = (8, 8)  # (rows, cols) of the token map
    n_classes: int = 10  # class n_classes is the null class
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 96
    head_width: int = 128  # the flow-matching MLP head
    head_depth: int = 3  # residual blocks in the head
    head_repeats: int = 1  # flow times drawn per token in training (MAR draws 4; 1 keeps CPU training short)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("token_dim", "n_classes", "n_layer", "n_head", "n_embd", "head_width", "head_depth",
                     "head_repeats"):
            setattr(self, name, check_int(name, getattr(self, name), lo=1))
        self.grid = check_grid("grid", self.grid)
        self.dropout = check_number("dropout", self.dropout, lo=0, hi=1, hi_open=True)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        self.backbone_config()  # the transformer's own rules (e.g. the rotary head size)

    @property
    def seq_len(self) -> int:
        """Tokens per map, ``rows * cols`` (the sequence length, without the class token)."""
        return self.grid[0] * self.grid[1]

    def backbone_config(self) -> GPTConfig:
        """The chapter 03 raster configuration of the transformer blocks (its vocabulary is unused here)."""
        return raster_config(1, self.grid, n_classes=self.n_classes, n_layer=self.n_layer, n_head=self.n_head,
                             n_embd=self.n_embd, dropout=self.dropout)

    @classmethod
    def from_dict(cls, d: dict) -> "ContinuousARConfig":
        """The config of a dict such as a checkpoint records: a missing key takes its default, an unknown key is a
        ``ValueError`` (:func:`~ar_course.checkpoint.config_from_dict`)."""
        return checkpoint.config_from_dict(cls, d)


def _check_times(t: torch.Tensor, n: int | None = None) -> None:
    """``ValueError`` unless ``t`` is a float ``(N,)`` tensor of flow times (``N = n`` when given). Reads shapes
    only (no host sync: the head runs at every Euler step)."""
    ok = isinstance(t, torch.Tensor) and t.ndim == 1 and t.is_floating_point() and (n is None or t.shape[0] == n)
    if not ok:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"t must be a float ({'N' if n is None else n},) tensor of flow times, got {got}")


def time_features(t: torch.Tensor, dim: int = TIME_FEATURES) -> torch.Tensor:
    """Sinusoidal features ``(N, dim)`` of flow times ``t`` ``(N,)`` in [0, 1] (frequencies 1 .. 1000).
    ``ValueError`` when ``t`` is not a float ``(N,)`` tensor (a ``(N, 1)`` one would broadcast into a wrong
    shape)."""
    _check_times(t)
    freqs = torch.exp(torch.linspace(0, math.log(1000.0), dim // 2, device=t.device, dtype=t.dtype))  # (dim/2,)
    angles = t[:, None] * freqs[None, :]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (N, dim)


class HeadBlock(nn.Module):
    """``h + gate * mlp(norm(h) * (1 + scale) + shift)`` with ``shift, scale, gate`` from the condition (adaLN, as
    MAR's head); the modulation starts at zero, so a new block is the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Linear(width, 3 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``h`` ``(N, width)`` under the condition ``c`` ``(N, width)`` (or ``(1, width)``) -> ``(N, width)``."""
        shift, scale, gate = self.ada(F.silu(c)).chunk(3, dim=-1)  # 3 x (N, width)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class FlowHead(nn.Module):
    """The velocity ``v(x_t, t | z)``: noisy tokens ``(N, token_dim)``, times ``(N,)`` and conditions
    ``(N, cond_dim)`` (or ``(1, cond_dim)``, one for every row) -> ``(N, token_dim)``. ``ValueError`` for inputs of
    other shapes (checked from the shapes alone, no host sync), or times that are not float."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(token_dim, width)
        self.time = nn.Linear(TIME_FEATURES, width)
        self.cond = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList([HeadBlock(width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, token_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Velocity ``(N, token_dim)`` of ``x_t`` ``(N, token_dim)`` at times ``t`` ``(N,)`` under ``cond``
        ``(N, cond_dim)`` or ``(1, cond_dim)``."""
        D, C = self.inp.in_features, self.cond.in_features
        if not isinstance(x_t, torch.Tensor) or x_t.ndim != 2 or x_t.shape[1] != D:
            got = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must be a (N, {D}) tensor, got {got}")
        N = x_t.shape[0]
        _check_times(t, N)
        if not isinstance(cond, torch.Tensor) or cond.ndim != 2 or cond.shape[1] != C or cond.shape[0] not in (1, N):
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"cond must be a ({N}, {C}) tensor (or (1, {C}), shared by every row), got {got}")
        c = self.time(time_features(t)) + self.cond(cond)  # (N, width)
        h = self.inp(x_t)  # (N, width)
        for block in self.blocks:
            h = block(h, c)
        return self.out(self.norm(h))  # (N, token_dim)


class ContinuousAR(nn.Module):
    """The chapter 03 raster backbone over continuous tokens, with a flow-matching head.

    ``conditions(tokens, classes)``: tokens ``(B, T, token_dim)`` -> conditions ``(B, 1 + T, n_embd)``, where
    position ``i`` has seen the class and tokens ``< i`` and conditions token ``i``. ``loss(tokens, classes)``:
    the flow-matching loss of token maps read in raster order ``(B, rows * cols, token_dim)``."""

    def __init__(self, config: ContinuousARConfig) -> None:
        if not isinstance(config, ContinuousARConfig):
            raise TypeError(f"config must be a ContinuousARConfig, got {type(config).__name__} "
                            f"(ContinuousARConfig.from_dict(d) makes one of a dict)")
        super().__init__()
        self.config = config
        bc = self.backbone = config.backbone_config()
        C = config.n_embd
        self.inp = nn.Linear(config.token_dim, C)
        self.wce = nn.Embedding(config.n_classes + 1, C)
        self.rotary = Rotary(bc.head_dim, bc.block_size, bc.rope_base, bc.grid, bc.n_prefix)
        self.blocks = nn.ModuleList([Block(bc) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(C, bc.norm_eps)
        self.head = FlowHead(config.token_dim, C, config.head_width, config.head_depth)
        for name, p in self.named_parameters():  # GPT-2: small residual projections, scaled by depth
            if name.startswith("blocks.") and name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @property
    def null_class(self) -> int:
        """The null class id, ``n_classes`` (the unconditional model of classifier-free guidance)."""
        return self.config.n_classes

    def make_cache(self, batch_size: int) -> KVCache:
        """An empty :class:`~ar_course.transformer.model.KVCache` for ``batch_size`` sequences."""
        p = self.inp.weight
        bc = self.backbone
        return KVCache(bc.n_layer, batch_size, bc.n_head, bc.block_size, bc.head_dim, p.device, p.dtype)

    def conditions(self, tokens: torch.Tensor, classes: torch.Tensor | None = None,
                   cache: KVCache | None = None) -> torch.Tensor:
        """Condition vectors ``(B, T_out, n_embd)`` of ``tokens`` ``(B, T, token_dim)`` (``T`` may be 0), after the
        class token of ``classes`` ``(B,)`` when the sequence starts (no cache, or an empty one; ``T_out = T + 1``,
        else ``T``; ``classes`` is not read otherwise). With a ``cache`` (``make_cache(B)``) the positions continue
        it and it is advanced. Tokens of any floating dtype are cast to the model's.

        Raises:
            ValueError: ``tokens`` not a float ``(B, T, token_dim)`` tensor; ``classes`` missing when the sequence
                starts, or not a ``(B,)`` long tensor in ``[0, n_classes]`` (one host sync); a ``cache`` that is not
                a :class:`KVCache` of ``B`` rows made by :meth:`make_cache`; more positions than ``1 + rows * cols``.
        """
        starts = cache is None or (isinstance(cache, KVCache) and cache.length == 0)
        if starts and classes is None:
            raise ValueError("classes must be given when the sequence starts (no cache, or an empty one)")
        self._check_tokens(tokens, classes if starts else None, length=None)
        if cache is not None:
            B = tokens.shape[0]
            if not isinstance(cache, KVCache) or cache.batch_size != B:
                got = f"batch size {cache.batch_size}" if isinstance(cache, KVCache) else type(cache).__name__
                raise ValueError(f"cache must be None or a KVCache of batch size {B} (model.make_cache({B})), "
                                 f"got {got}")
            check_cache_layout(cache, self.backbone, self.inp.weight)
        return self._conditions(tokens.to(self.inp.weight.dtype), classes, cache)

    def _conditions(self, tokens: torch.Tensor, classes: torch.Tensor | None, cache: KVCache | None
                    ) -> torch.Tensor:
        """:meth:`conditions` without the argument checks (for callers that checked them)."""
        start = cache.length if cache is not None else 0
        T_out = tokens.shape[1] + int(start == 0)
        if start + T_out > self.backbone.block_size:
            raise ValueError(f"{start + T_out} positions exceed the {self.backbone.block_size} of this model")
        x = self.inp(tokens)  # (B, T, C)
        if start == 0:
            x = torch.cat([self.wce(classes)[:, None, :], x], dim=1)  # (B, 1 + T, C)
        positions = torch.arange(start, start + x.shape[1], device=x.device)  # (T_out,)
        rope = self.rotary(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, rope=rope, mask=None, causal=True, cache=cache, layer=i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm_f(x)  # (B, T_out, C)

    def _check_tokens(self, tokens: torch.Tensor, classes: torch.Tensor | None, length: int | None) -> None:
        """``ValueError`` unless ``tokens`` is a float ``(B, length, token_dim)`` tensor (``length`` None: any ``T``,
        and ``B`` may be 0; else ``B >= 1``) and ``classes`` (unless None) a ``(B,)`` long tensor in
        ``[0, n_classes]`` (one host sync)."""
        c = self.config
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[2] != c.token_dim \
                or (length is not None and (tokens.shape[1] != length or tokens.shape[0] == 0)) \
                or not tokens.is_floating_point():
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            what = f"non-empty float (B, {length}," if length is not None else "a float (B, T,"
            raise ValueError(f"tokens must be {what} {c.token_dim}), got {got}")
        if classes is not None:
            check_ids("classes", classes, c.n_classes + 1, (tokens.shape[0],), allow_empty=length is None)

    def loss(self, tokens: torch.Tensor, classes: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        """Flow-matching loss (mean squared velocity error) of token sequences ``(B, L, token_dim)`` given ``classes``
        ``(B,)``, each token drawn at ``head_repeats`` noise levels (``generator``: torch's global one if None).
        Tokens of any floating dtype are cast to the model's (as the tokenizers do).

        Raises:
            ValueError: ``tokens`` not a non-empty float ``(B, rows * cols, token_dim)`` tensor, or ``classes``
                not a ``(B,)`` long tensor in ``[0, n_classes]``.
        """
        self._check_tokens(tokens, classes, length=self.config.seq_len)
        tokens = tokens.to(self.inp.weight.dtype)
        cond = self._conditions(tokens[:, :-1], classes, None)  # (B, L, C): position i conditions token i
        r = self.config.head_repeats
        x1 = tokens.reshape(-1, tokens.shape[-1]).repeat(r, 1)  # (r*B*L, D)
        cond = cond.reshape(-1, cond.shape[-1]).repeat(r, 1)  # (r*B*L, C)
        # (r, B*L, ...) draws hold the same numbers as (r*B*L, ...) ones; under torchrun, in training, each process
        # takes its examples' columns of the global batch's draws (ddp.draw_rows)
        kw = {"generator": generator, "device": x1.device, "dtype": x1.dtype}
        rows, D = tokens.shape[0] * tokens.shape[1], x1.shape[-1]
        x0 = ddp.draw_rows(lambda m: torch.randn((r, m, D), **kw), rows, dim=1).reshape(-1, D)  # (r*B*L, D)
        t = ddp.draw_rows(lambda m: torch.rand((r, m), **kw), rows, dim=1).reshape(-1)  # (r*B*L,)
        return flow_matching_loss(lambda x_t, t: self.head(x_t, t, cond), x1, noise=(x0, t))


def _check_model(model: object) -> None:
    if not isinstance(model, ContinuousAR):
        raise TypeError(f"model must be a ContinuousAR, got {type(model).__name__}")


def _check_sampling(steps: int, temperature: float, cfg: float) -> tuple[int, float, float]:
    steps = check_int("steps", steps, lo=1)
    temperature = check_number("temperature", temperature, lo=0.0)
    cfg = check_number("cfg", cfg)
    return steps, temperature, cfg


@torch.no_grad()
def generate_tokens(
    model: ContinuousAR,
    classes: torch.Tensor,
    *,
    steps: int = 16,
    temperature: float = 1.0,
    cfg: float = 0.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Sample token sequences ``(B, rows * cols, token_dim)`` for ``classes`` ``(B,)``.

    Each token integrates the head's ODE in ``steps`` Euler steps from noise ``temperature * N(0, I)``
    (``temperature = 0``: the deterministic path from 0). Guidance ``cfg = w`` runs the conditional and null-class
    sequences in one doubled batch and integrates ``(1 + w) * v_cond - w * v_uncond``
    (:func:`~ar_course.continuous.functional.guided_velocity`; ``w = 0``: plain conditional sampling, and no doubled
    batch).
    ``use_cache=False`` recomputes the whole prefix at every position (the plain path, same tokens).

    Raises ``ValueError`` for ``classes`` that are not a non-empty ``(B,)`` long tensor in ``[0, n_classes]`` on
    the model's device, ``steps < 1``, a negative or non-finite ``temperature`` or a non-finite ``cfg``, and for
    sampled tokens that come out NaN or inf (a finite ``temperature`` or ``cfg`` too large for the model's
    numbers, such as ``temperature=1e20`` or ``cfg=1e30``, or a model whose weights are not finite: as the
    discrete samplers refuse NaN logits; one host sync per call); ``TypeError`` for non-numbers, ``classes`` that
    are not a tensor, a ``model`` that is not a :class:`ContinuousAR` or a ``use_cache`` that is not a bool."""
    _check_model(model)
    c = model.config
    check_same_device("classes", classes, model)
    check_ids("classes", classes, c.n_classes + 1, ("B",))
    steps, temperature, cfg = _check_sampling(steps, temperature, cfg)
    use_cache = check_bool("use_cache", use_cache)
    check_generator(generator)
    B = classes.shape[0]
    guided = cfg != 0
    ys = torch.cat([classes, torch.full_like(classes, model.null_class)]) if guided else classes  # (B or 2B,)
    nb = ys.shape[0]
    p = model.inp.weight
    seq = torch.zeros(nb, 0, c.token_dim, device=p.device, dtype=p.dtype)  # (nb, 0, D)
    cache = model.make_cache(nb) if use_cache else None
    cond = model._conditions(seq, ys, cache)[:, -1]  # (nb, C): the class token's condition
    for i in range(c.seq_len):
        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not guided:
                return model.head(x, t, cond)
            return guided_velocity(model.head, x, t, cond[:B], cond[B:], w=cfg)

        x0 = temperature * torch.randn(B, c.token_dim, generator=generator, device=p.device, dtype=p.dtype)
        x = euler_sample(velocity, x0, steps)  # (B, D)
        x = x.repeat(2, 1) if guided else x  # (nb, D): both halves continue from the same token
        seq = torch.cat([seq, x[:, None, :]], dim=1)  # (nb, i + 1, D)
        if i + 1 < c.seq_len:
            cond = (model._conditions(x[:, None, :], None, cache) if use_cache
                    else model._conditions(seq, ys, None))[:, -1]  # (nb, C)
    _check_finite_tokens(seq[:B], temperature, cfg)
    return seq[:B]  # (B, L, D)


def _check_finite_tokens(tokens: torch.Tensor, temperature: float, cfg: float) -> None:
    """``ValueError`` naming the first sample and position whose token ``tokens`` ``(B, L, D)`` holds NaN or inf
    (one host sync)."""
    finite = torch.isfinite(tokens).all(dim=-1)  # (B, L)
    if bool(finite.all()):
        return
    sample, position = (int(i) for i in (~finite).nonzero()[0])
    dtype = str(tokens.dtype).removeprefix("torch.")
    raise ValueError(f"sampled token {position} (of {tokens.shape[1]}) of sample {sample} is NaN or inf: "
                     f"temperature={temperature:g} or cfg={cfg:g} overflows the model's {dtype} numbers (lower "
                     f"it), or the model's weights are not finite")


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Raster-order tokens ``(B, rows * cols, D)`` -> a latent map ``(B, D, rows, cols)`` for the tokenizer.
    ``ValueError`` for tokens of another shape or a ``grid`` that is not two sides ``>= 1``."""
    rows, cols = check_grid("grid", grid)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[1] != rows * cols:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a (B, {rows * cols}, D) tensor for a {rows}x{cols} grid, got {got}")
    B, _, D = tokens.shape
    return tokens.reshape(B, rows, cols, D).permute(0, 3, 1, 2)  # (B, D, rows, cols)


def map_to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """A latent map ``(B, D, rows, cols)`` -> raster-order tokens ``(B, rows * cols, D)``; ``ValueError`` for a
    tensor that is not 4-D."""
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a (B, D, rows, cols) tensor, got {got}")
    return latents.permute(0, 2, 3, 1).flatten(1, 2)  # (B, rows * cols, D)


@torch.no_grad()
def generate_images(
    model: ContinuousAR,
    tokenizer: VQVAE,
    classes: torch.Tensor,
    *,
    steps: int = 16,
    temperature: float = 1.0,
    cfg: float = 0.0,
    seed: int | None = 0,
    batch_size: int = 500,
) -> torch.Tensor:
    """Images ``(B, C, S, S)`` in [0, 1] of ``classes`` ``(B,)``: :func:`generate_tokens`, then the continuous
    tokenizer's decoder. ``seed`` seeds one generator for the whole call (``None``: torch's global one); work runs
    in chunks of ``batch_size`` classes (samples depend on the chunking). The default ``cfg=0`` samples without
    guidance (the shipped model's accuracy by guidance strength is in its :func:`pretrained_info`).

    Raises as :func:`generate_tokens`, and ``TypeError`` for a ``tokenizer`` that is not a :class:`VQVAE`,
    ``ValueError`` for one that is not continuous (``'kl'``) or whose latent map (side, channels) does not match
    the model's grid and ``token_dim``."""
    _check_model(model)
    check_ids("classes", classes, model.config.n_classes + 1, ("B",))
    batch_size = check_int("batch_size", batch_size, lo=1)
    seed = None if seed is None else check_seed(seed)
    if not isinstance(tokenizer, VQVAE):
        raise TypeError(f"tokenizer must be a VQVAE, got {type(tokenizer).__name__}")
    tc, c = tokenizer.config, model.config
    if tc.quantizer != "kl" or (tc.latent_side, tc.latent_side, tc.latent_dim) != (*c.grid, c.token_dim):
        raise ValueError(f"the tokenizer ({tc.quantizer!r}, {tc.latent_side}x{tc.latent_side} latents of "
                         f"{tc.latent_dim} channels) does not match the model ({c.grid[0]}x{c.grid[1]} tokens of "
                         f"{c.token_dim} channels, decoded by a continuous 'kl' tokenizer)")
    check_same_device("the tokenizer", tokenizer, model)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def images_of(chunk: torch.Tensor) -> torch.Tensor:
        tokens = generate_tokens(model, chunk, steps=steps, temperature=temperature, cfg=cfg, generator=generator)
        return tokenizer.decode_from_indices(tokens_to_map(tokens, model.config.grid))  # (b, C, S, S)

    return generate_in_batches(images_of, classes.to(device), batch_size)  # (B, C, S, S)


def load_pretrained(device: torch.device | str = "cpu", path: str | Path | None = None
                    ) -> tuple[ContinuousAR, VQVAE]:
    """The shipped MNIST model (or ``path``: a file or a shipped checkpoint name) and its continuous tokenizer:
    ``(model, tokenizer)``, both in eval mode (:func:`ar_course.checkpoint.load_with_tokenizer`)."""
    return checkpoint.load_with_tokenizer(PRETRAINED_PATH if path is None else path, device,
                                          kind=CHECKPOINT_KIND)


def pretrained_info(path: str | Path | None = None) -> dict:
    """What the trainer recorded with the checkpoint: steps, seed, losses, class accuracy by guidance strength...
    (:func:`ar_course.checkpoint.info`)."""
    return checkpoint.info(PRETRAINED_PATH if path is None else path)
