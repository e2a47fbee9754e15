"""MaskGIT over VQ token maps: a bidirectional chapter 02 GPT that fills in masked tokens, decoded in a few steps.

:class:`MaskGIT` is a :class:`~ar_course.transformer.GPT` built with ``causal=False`` whose last vocabulary id is
the ``[MASK]`` token. A class token starts every sequence (class ``n_classes`` is the null class, for
classifier-free guidance); the ``rows * cols`` positions after it are the token map in raster order, some
replaced by ``[MASK]``. Training (:func:`maskgit_loss`) hides a schedule-drawn fraction of each map and scores
the predictions at the hidden positions only. Decoding (:meth:`MaskGIT.generate`) starts from an all-masked map
and runs exactly ``steps`` forward passes, each revealing the most confident of its sampled tokens
(:func:`~.functional.confidence_step`); :meth:`MaskGIT.generate_in_order` reveals a fixed order instead, e.g.
the next-neighbour anti-diagonals (``2n - 1`` passes for an ``n x n`` map)::

    model, tokenizer = load_pretrained()
    maps = model.generate(torch.arange(10), steps=8, cfg=1.0, generator=torch.Generator().manual_seed(0))
    images = tokenizer.decode_from_indices(maps)                                   # (10, 1, 32, 32)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ar_course import checkpoint
from ar_course.masked import functional as ref
from ar_course.sampling import SamplingConfig, cfg_mix, check_cfg, check_sampling, sample
from ar_course.tokenizers import VQVAE
from ar_course.transformer.model import GPT, GPTConfig
from ar_course.utils import (check_grid, check_ids, check_int, check_number, check_same_device, check_seed,
                              generate_in_batches)

PRETRAINED_PATH = checkpoint.ASSETS / "maskgit_mnist.safetensors"
CHECKPOINT_KIND = "maskgit"
DEFAULT_NOISE = 3.0
"""Default weight of the Gumbel noise on the confidences at the first step (annealed linearly to 0). MaskGIT uses
4.5; the course's smaller default is a choice for the shipped MNIST model, not a measured optimum (no script in
``benchmarks/`` compares noise weights; ``benchmarks/bench_parallel_images.py`` records the one it used)."""

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def maskgit_config(
    num_codes: int,
    grid: tuple[int, int] = (8, 8),
    n_classes: int = 10,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 96,
    dropout: float = 0.0,
) -> GPTConfig:
    """The :class:`GPTConfig` of a class-conditional MaskGIT over ``grid`` maps of ``num_codes`` codes: vocabulary
    ``num_codes + 1`` (the last id is ``[MASK]``), ``block_size = 1 + rows * cols``, 2D rotary positions,
    ``causal=False``. ``ValueError`` for a ``grid`` that is not two sides ``>= 1``, ``TypeError`` for non-integers."""
    num_codes = check_int("num_codes", num_codes, lo=1)
    rows, cols = check_grid("grid", grid)
    return GPTConfig(vocab_size=num_codes + 1, block_size=1 + rows * cols, n_layer=n_layer, n_head=n_head,
                     n_embd=n_embd, pos="rope2d", grid=(rows, cols), n_classes=n_classes, dropout=dropout,
                     causal=False)


class MaskGIT(GPT):
    """A bidirectional, class-conditional :class:`GPT` over token maps whose last id, :attr:`mask_id`, is
    ``[MASK]``. ``config`` must have ``causal=False``, ``n_classes > 0`` and a ``grid`` (see
    :func:`maskgit_config`)."""

    def __init__(self, config: GPTConfig):
        if config.causal or config.n_classes < 1 or config.grid is None:
            raise ValueError("MaskGIT needs a GPTConfig with causal=False, n_classes > 0 and a grid "
                             "(use maskgit_config)")
        if config.block_size != 1 + config.grid[0] * config.grid[1]:
            raise ValueError(f"block_size must be 1 + rows * cols = {1 + config.grid[0] * config.grid[1]}, got "
                             f"{config.block_size}")
        if config.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (at least one code, then [MASK]), got {config.vocab_size}")
        super().__init__(config)

    @property
    def mask_id(self) -> int:
        """The ``[MASK]`` token id (the last of the vocabulary)."""
        return self.config.vocab_size - 1

    @property
    def num_codes(self) -> int:
        """Codes of the tokenizer (the vocabulary without ``[MASK]``)."""
        return self.config.vocab_size - 1

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the token maps (``config.grid``); a map has ``rows * cols`` positions."""
        return self.config.grid

    def map_logits(self, tokens: torch.Tensor, classes: torch.Tensor, forward: Forward | None = None
                   ) -> torch.Tensor:
        """Logits over the codes (``[MASK]`` excluded) at every map position: ``tokens`` ``(B, N)`` with
        ``[MASK]`` where hidden, ``classes`` ``(B,)`` -> ``(B, N, num_codes)``. One forward pass (``forward``,
        default the model itself)."""
        logits, _ = (self if forward is None else forward)(tokens, classes=classes)  # (B, 1 + N, V)
        return logits[:, 1:, : self.num_codes]  # (B, N, num_codes): the class token's output is not used

    def _guided_logits(self, tokens: torch.Tensor, classes: torch.Tensor, cfg: float, forward: Forward | None
                       ) -> torch.Tensor:
        """:meth:`map_logits` under guidance ``(1 + w) * cond - w * uncond`` (one doubled batch when ``w != 0``)."""
        if cfg == 0:
            return self.map_logits(tokens, classes, forward)
        B = tokens.shape[0]
        both = self.map_logits(torch.cat([tokens, tokens]),
                               torch.cat([classes, torch.full_like(classes, self.null_class)]), forward)  # (2B, N, V)
        return cfg_mix(both[:B], both[B:], cfg)  # (B, N, V)

    def _check_generate(self, classes: torch.Tensor, sampling: SamplingConfig, cfg: float) -> tuple:
        check_same_device("classes", classes, self)
        check_ids("classes", classes, self.config.n_classes + 1, ("B",))
        return check_sampling(sampling), check_cfg(cfg)

    @torch.no_grad()
    def generate(
        self,
        classes: torch.Tensor,
        *,
        steps: int = 8,
        sampling: SamplingConfig = SamplingConfig(),
        cfg: float = 0.0,
        schedule: str = "cosine",
        noise: float = DEFAULT_NOISE,
        generator: torch.Generator | None = None,
        forward: Forward | None = None,
        trace: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token maps ``(B, rows, cols)`` for ``classes`` ``(B,)`` in exactly ``steps`` forward passes.

        Starts from an all-``[MASK]`` map. Each step predicts every position in one pass (guidance of strength
        ``cfg = w``, ``(1 + w) * cond - w * uncond``, in a doubled batch), samples a token for each masked one
        with ``sampling`` (temperature 0: the most likely), and keeps those whose log-probability under the model
        (before ``sampling``'s temperature and filters) plus
        ``noise * (1 - (t + 1) / steps)`` times Gumbel noise is highest, re-masking the rest so that
        :func:`~.functional.masked_after` ``(steps, N, schedule)`` stay masked. ``generator`` draws every random
        number (seeded: the same maps). ``forward`` replaces the model's pass (e.g. a wrapper that counts
        passes); ``trace``, when a list, receives the ``(B, N)`` tokens after each step with ``[MASK]`` where
        still hidden.

        Raises:
            TypeError: a number of the wrong type (``steps=2.0``), ``sampling`` not a ``SamplingConfig``, or
                ``classes`` not a tensor.
            ValueError: ``classes`` not a non-empty ``(B,)`` long tensor in ``[0, n_classes]`` on the model's
                device, ``steps`` outside ``[1, rows * cols]``, an unknown ``schedule``, ``noise < 0`` or a
                non-finite ``cfg``.
        """
        sampling, cfg = self._check_generate(classes, sampling, cfg)
        N = self.grid[0] * self.grid[1]
        counts = ref.masked_after(steps, N, schedule)
        noise = check_number("noise", noise, lo=0)
        B = classes.shape[0]
        tokens = torch.full((B, N), self.mask_id, dtype=torch.long, device=classes.device)  # (B, N)
        mask = torch.ones(B, N, dtype=torch.bool, device=classes.device)  # (B, N)
        for t, n_masked in enumerate(counts):
            logits = self._guided_logits(tokens, classes, cfg, forward)  # (B, N, num_codes)
            sampled = sample(logits, sampling=sampling, generator=generator)  # (B, N)
            # confidence: the model's own log-probability (before temperature and filters, which would give
            # every token log-probability 0 under top_k=1 or a tiny temperature, and leave the order to ties)
            log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, N, num_codes)
            scale = ref.annealed_noise_scale(noise, t, steps)
            gumbel = ref.gumbel_noise((B, N), generator, tokens.device) if scale > 0 else None
            tokens, mask = ref.confidence_step(tokens, mask, log_probs, sampled, n_masked, gumbel, scale)
            if trace is not None:
                trace.append(tokens.clone())
        return tokens.view(B, *self.grid)  # (B, rows, cols)

    @torch.no_grad()
    def generate_in_order(
        self,
        classes: torch.Tensor,
        order: list[torch.Tensor],
        *,
        sampling: SamplingConfig = SamplingConfig(),
        cfg: float = 0.0,
        generator: torch.Generator | None = None,
        forward: Forward | None = None,
        trace: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token maps ``(B, rows, cols)`` revealed in a fixed ``order``: a list of ``(N,)`` bool maps (raster
        order) that partition the map, one forward pass each (e.g. :func:`~.functional.neighbour_steps`, the
        next-neighbour anti-diagonals: ``rows + cols - 1`` passes). Step ``k`` samples the positions of
        ``order[k]`` given every token revealed before. ``sampling``, ``cfg``, ``generator``, ``forward``,
        ``trace``: as :meth:`generate`.

        Raises as :meth:`generate`, and ``ValueError`` when ``order`` does not cover every position exactly once."""
        sampling, cfg = self._check_generate(classes, sampling, cfg)
        N = self.grid[0] * self.grid[1]
        if (not isinstance(order, (list, tuple)) or not order
                or any(not isinstance(s, torch.Tensor) or s.dtype != torch.bool or s.shape != (N,) for s in order)
                or not torch.equal(torch.stack([s.cpu() for s in order]).sum(0), torch.ones(N, dtype=torch.long))):
            raise ValueError(f"order must be a non-empty list of ({N},) bool maps covering every position once")
        B = classes.shape[0]
        tokens = torch.full((B, N), self.mask_id, dtype=torch.long, device=classes.device)  # (B, N)
        for step in order:
            step = step.to(tokens.device)
            logits = self._guided_logits(tokens, classes, cfg, forward)[:, step]  # (B, k, num_codes)
            tokens[:, step] = sample(logits, sampling=sampling, generator=generator)  # (B, k)
            if trace is not None:
                trace.append(tokens.clone())
        return tokens.view(B, *self.grid)  # (B, rows, cols)


def maskgit_loss(
    model: MaskGIT,
    token_maps: torch.Tensor,
    classes: torch.Tensor,
    schedule: str = "cosine",
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MaskGIT's training loss on token maps ``(B, rows, cols)`` with ``classes`` ``(B,)`` (null class allowed):
    hide the positions of ``mask`` ``(B, rows * cols)`` bool (None: draw it by :func:`~.functional.random_mask`
    with ``schedule``, random numbers from ``generator`` on the CPU), predict them in one bidirectional pass,
    :func:`~.functional.masked_cross_entropy` (nats per masked token).

    Raises:
        TypeError: ``model`` is not a :class:`MaskGIT`, or ``token_maps`` or ``mask`` not a tensor.
        ValueError: ``token_maps`` not a non-empty ``(B, rows, cols)`` long tensor of the model's grid with codes in
            ``[0, num_codes)`` (``[MASK]`` excluded; one host sync), ``mask`` not ``(B, rows * cols)`` bool or
            masking nothing, an unknown ``schedule``, or ``classes`` refused by the model.
    """
    if not isinstance(model, MaskGIT):
        raise TypeError(f"model must be a MaskGIT, got {type(model).__name__}")
    check_ids("token_maps", token_maps, model.num_codes, ("B", *model.grid))
    B, N = token_maps.shape[0], model.grid[0] * model.grid[1]
    targets = token_maps.reshape(B, N)  # (B, N)
    if mask is None:
        mask = ref.random_mask(B, N, schedule, generator, targets.device)  # (B, N)
    elif not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be None or a ({B}, {N}) bool tensor, got {type(mask).__name__}")
    elif mask.dtype != torch.bool or mask.shape != (B, N):
        raise ValueError(f"mask must be a ({B}, {N}) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    inputs = targets.masked_fill(mask, model.mask_id)  # (B, N)
    # token_maps were range-checked above and map_logits gives (B, N, num_codes) float: no second check
    return ref.masked_cross_entropy_unchecked(model.map_logits(inputs, classes), targets, mask)


@torch.no_grad()
def generate_images(
    model: MaskGIT,
    tokenizer: torch.nn.Module,
    classes: torch.Tensor,
    *,
    steps: int = 8,
    order: str = "confidence",
    cfg: float = 0.0,
    sampling: SamplingConfig = SamplingConfig(),
    noise: float = DEFAULT_NOISE,
    seed: int | None = 0,
    batch_size: int = 500,
) -> torch.Tensor:
    """Images ``(B, C, S, S)`` in [0, 1] for ``classes`` ``(B,)``: decode token maps, then the tokenizer.

    ``order``: ``"confidence"`` (:meth:`MaskGIT.generate` in ``steps`` passes) or ``"neighbour"``
    (:meth:`MaskGIT.generate_in_order` over the anti-diagonals; ``steps`` is ignored). ``seed`` seeds one
    generator for the whole call (``None``: torch's global one); work runs in chunks of ``batch_size``. The
    default ``cfg=0`` samples without guidance (the shipped model's accuracy by guidance strength is in its
    :func:`pretrained_info`).

    Raises as :meth:`MaskGIT.generate`, and ``TypeError`` for a ``model`` that is not a :class:`MaskGIT` or a
    ``tokenizer`` that is not a :class:`~ar_course.tokenizers.VQVAE`, ``ValueError`` for an unknown ``order`` or
    a tokenizer whose maps do not match the model (its quantizer, side or number of codes)."""
    if order not in ("confidence", "neighbour"):
        raise ValueError(f"order must be 'confidence' or 'neighbour', got {order!r}")
    if not isinstance(model, MaskGIT):
        raise TypeError(f"model must be a MaskGIT, got {type(model).__name__}")
    _check_tokenizer(tokenizer, model)
    check_ids("classes", classes, model.config.n_classes + 1, ("B",))
    batch_size = check_int("batch_size", batch_size, lo=1)
    seed = None if seed is None else check_seed(seed)
    device = model.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    neighbours = ref.neighbour_steps(*model.grid)

    def images_of(chunk: torch.Tensor) -> torch.Tensor:
        if order == "confidence":
            maps = model.generate(chunk, steps=steps, cfg=cfg, sampling=sampling, noise=noise, generator=generator)
        else:
            maps = model.generate_in_order(chunk, neighbours, cfg=cfg, sampling=sampling, generator=generator)
        return tokenizer.decode_from_indices(maps)  # (b, C, S, S)

    return generate_in_batches(images_of, classes.to(device), batch_size)  # (B, C, S, S)


def _check_tokenizer(tokenizer: VQVAE, model: MaskGIT) -> None:
    """``tokenizer`` decodes the model's maps: one ``(rows, cols)`` map of ``num_codes`` codes per image."""
    if not isinstance(tokenizer, VQVAE):
        raise TypeError(f"tokenizer must be a VQVAE, got {type(tokenizer).__name__}")
    c, side = tokenizer.config, tokenizer.config.latent_side
    if c.quantizer not in ("vq", "fsq", "lfq") or (side, side) != model.grid or c.num_codes != model.num_codes:
        raise ValueError(f"the tokenizer ({c.quantizer!r}, {side}x{side} maps of {c.num_codes} codes) does not match "
                         f"the model ({model.grid[0]}x{model.grid[1]} maps of {model.num_codes} codes, decoded by a "
                         f"'vq', 'fsq' or 'lfq' tokenizer)")
    check_same_device("the tokenizer", tokenizer, model)


def load_pretrained(device: torch.device | str = "cpu", path: str | Path | None = None
                    ) -> tuple[MaskGIT, torch.nn.Module]:
    """The shipped MNIST MaskGIT (or ``path``: a file or a shipped checkpoint name) and its tokenizer:
    ``(model, tokenizer)``, in eval mode."""
    return checkpoint.load_with_tokenizer(PRETRAINED_PATH if path is None else path, device,
                                          kind=CHECKPOINT_KIND)


def pretrained_info(path: str | Path | None = None) -> dict:
    """What the trainer recorded with the checkpoint (steps, seed, losses, accuracy...)."""
    return checkpoint.info(PRETRAINED_PATH if path is None else path)
