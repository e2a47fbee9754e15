"""Class-conditional raster-order autoregression over VQ token maps (LlamaGen-style), on the chapter 02 GPT.

An image becomes a map of ``h x w`` codes from the tokenizer; read in raster order it is a sequence of
``h * w`` tokens that a :class:`~ar_course.transformer.GPT` with a class token models one token at a time.
Condition dropout during training teaches the same network the unconditional distribution (the null class),
so at sampling time classifier-free guidance needs no second model::

    model, tokenizer = load_pretrained()
    images = generate_images(model, tokenizer, torch.arange(10), cfg=1.0, seed=0)   # (10, 1, 32, 32)

Generating one image costs ``h * w`` forward passes (64 for the 8x8 MNIST maps) with a KV cache, each over
one new token, in a batch of ``2B`` when guided.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ar_course import checkpoint
from ar_course.raster.functional import condition_dropout, from_raster, make_training_pairs, to_raster
from ar_course.sampling import SamplingConfig
from ar_course.tokenizers import VQVAE
from ar_course.transformer.model import GPT, GPTConfig, StaticKVCache, check_causal
from ar_course.utils import (check_grid, check_ids, check_int, check_number, check_same_device, check_seed,
                              generate_in_batches)

PRETRAINED_PATH = checkpoint.ASSETS / "ar_mnist.safetensors"
CHECKPOINT_KIND = "raster_ar"


def raster_config(
    vocab_size: int,
    grid: tuple[int, int] = (8, 8),
    n_classes: int = 10,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    pos: str = "rope2d",
    dropout: float = 0.0,
) -> GPTConfig:
    """A :class:`GPTConfig` for a class-conditional model over ``grid`` token maps of ``vocab_size`` codes.

    ``block_size`` is ``1 + rows * cols`` (the class token and the map); ``pos`` is ``"rope2d"`` (rotary over
    the row and the column of each token) or ``"learned"``.

    Raises:
        TypeError: a side of ``grid`` is not an integer.
        ValueError: ``grid`` is not a pair, a side of it is ``< 1``, an unknown ``pos``, or as :class:`GPTConfig`.
    """
    if pos not in ("rope2d", "learned"):
        raise ValueError(f"pos must be 'rope2d' or 'learned', got {pos!r}")
    rows, cols = check_grid("grid", grid)
    return GPTConfig(vocab_size=vocab_size, block_size=1 + rows * cols, n_layer=n_layer, n_head=n_head,
                     n_embd=n_embd, pos=pos, grid=(rows, cols),
                     n_classes=n_classes, dropout=dropout)


def _check_model(model: GPT) -> None:
    """``model`` is a class-conditional :class:`GPT` (or its ``torch.compile``d wrapper); no values read.

    Raises:
        TypeError: ``model`` is not a GPT (the tokenizer passed first, say).
        ValueError: a GPT without classes (``n_classes = 0``): the class token fills position 0 of every sequence;
            or a bidirectional one (``causal=False``, a MaskGIT): raster AR predicts each token from those before.
    """
    if not isinstance(getattr(model, "_orig_mod", model), GPT):
        hint = " (pass the model first, then the tokenizer)" if isinstance(model, VQVAE) else ""
        raise TypeError(f"model must be a class-conditional GPT, got {type(model).__name__}{hint}")
    if model.config.n_classes < 1:
        raise ValueError("model must be a class-conditional GPT (raster_config(..., n_classes >= 1)), got one with "
                         "n_classes = 0: the class token fills position 0 of every sequence")
    check_causal(model, "raster AR")


def check_model_grid(model: GPT, name: str, shape: tuple[int, ...]) -> None:
    """``ValueError`` unless maps of ``shape`` ``(..., rows, cols)`` match the model's ``config.grid`` when it
    records one (:func:`raster_config` does): a ``pos="rope2d"`` model's 2-D rotary angles place token ``p`` at
    row ``p // cols`` of it, and a learned table's positions were learned for its cells. A model without a grid
    (1-D positions, or a learned one saved before grids were recorded for them) takes any map its ``block_size``
    holds, which the GPT checks. No values read."""
    grid = model.config.grid
    if grid is not None and tuple(shape[-2:]) != grid:
        raise ValueError(f"{name} must match the model's {grid[0]}x{grid[1]} grid, got {tuple(shape)}")


def check_tokenizer(tokenizer: VQVAE, model: GPT) -> int:
    """The side of the square code maps of ``tokenizer``, after checking that it is a :class:`VQVAE` giving one
    ``(B, h, w)`` map of codes per image (quantizer ``vq``, ``fsq`` or ``lfq``) with as many codes as the
    model's vocabulary, on the model's grid (:func:`check_model_grid`).

    Raises:
        TypeError: ``tokenizer`` is not a :class:`VQVAE` (its ``.quantizer``, say).
        ValueError: another kind of quantizer, another number of codes, maps of another size, or a tokenizer on
            another device than the model.
    """
    if not isinstance(tokenizer, VQVAE):
        raise TypeError(f"tokenizer must be a VQVAE, got {type(tokenizer).__name__}")
    tc, c = tokenizer.config, model.config
    if tc.quantizer not in ("vq", "fsq", "lfq"):
        raise ValueError(f"tokenizer must give one code map per image (quantizer 'vq', 'fsq' or 'lfq'), got "
                         f"{tc.quantizer!r}")
    if tc.num_codes != c.vocab_size:
        raise ValueError(f"tokenizer has {tc.num_codes} codes but the model a vocabulary of {c.vocab_size}")
    side = tc.latent_side
    check_model_grid(model, "tokenizer maps", (side, side))
    check_same_device("the tokenizer", tokenizer, model)
    return side


def raster_loss(
    model: GPT,
    token_maps: torch.Tensor,
    classes: torch.Tensor,
    p_uncond: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) of token maps ``(B, h, w)`` given ``classes`` ``(B,)``.

    With ``p_uncond > 0`` each class is first replaced by the null class with that probability (condition
    dropout, so the model also learns the unconditional distribution for guidance). The trainer draws the
    dropout in its batch stream instead (:func:`condition_dropout_batches`), for the global batch.

    Raises:
        TypeError: ``model`` is not a GPT, ``p_uncond`` not a number, or as :func:`condition_dropout`.
        ValueError: a GPT without classes, ``token_maps`` not a ``(B, rows, cols)`` long tensor on the model's
            grid (:func:`check_model_grid`), ``p_uncond`` outside ``[0, 1]``, classes outside ``[0, n_classes]``
            (checked before the dropout), or as :meth:`GPT.forward` (ids, classes).
    """
    _check_model(model)
    p_uncond = check_number("p_uncond", p_uncond, 0, 1)
    seq = to_raster(token_maps)  # (B, L)
    check_model_grid(model, "token_maps", token_maps.shape)
    inputs, targets = make_training_pairs(seq)  # (B, L - 1), (B, L)
    if p_uncond > 0:
        classes = condition_dropout(classes, p_uncond, model.null_class, generator)
    _, loss = model(inputs, targets=targets, classes=classes)
    return loss


def condition_dropout_batches(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    p_uncond: float,
    null_class: int,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(inputs, classes (B,))`` batches of ``batches`` with condition dropout applied to the classes.

    Drawing the dropout with the batch (:func:`~ar_course.raster.functional.condition_dropout`, right after
    the batch from the same ``generator``) keeps every random draw in the batch stream: under ``torchrun``
    each process draws it for the global batch before taking its slice, and a resumed run replays it.

    Raises (when called, before any batch is drawn):
        TypeError / ValueError: ``p_uncond`` not a finite number in ``[0, 1]``.
    """
    p_uncond = check_number("p_uncond", p_uncond, 0, 1)
    return ((inputs, condition_dropout(classes, p_uncond, null_class, generator) if p_uncond > 0 else classes)
            for inputs, classes in batches)


@torch.no_grad()
def token_losses(model: GPT, token_maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats) of every token of ``token_maps`` ``(B, h, w)``: ``(B, h, w)``.

    Shows where in the image the model is unsure (the first rows are the blank border of MNIST). Raises as
    :func:`raster_loss`."""
    _check_model(model)
    seq = to_raster(token_maps)  # (B, L)
    check_model_grid(model, "token_maps", token_maps.shape)
    B, h, w = token_maps.shape
    inputs, targets = make_training_pairs(seq)  # (B, L - 1), (B, L)
    logits, _ = model(inputs, classes=classes)  # (B, L, V)
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B*L,)
    return nll.view(B, h, w)  # (B, h, w)


@torch.no_grad()
def generate_tokens(
    model: GPT,
    classes: torch.Tensor,
    grid: tuple[int, int] | None = None,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    cfg: float = 0.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    cache: str | StaticKVCache = "dynamic",
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> torch.Tensor:
    """Sample token maps ``(B, rows, cols)`` for ``classes`` ``(B,)`` with classifier-free guidance of strength
    ``cfg = w`` (``0``: plain conditional sampling; see :func:`~ar_course.sampling.cfg_mix`). ``grid``: the map's
    ``(rows, cols)``; ``None`` takes the model's ``config.grid`` (a model without one needs it given).

    ``use_cache=False`` recomputes the whole prefix at every step (the slow reference path: the same tokens up
    to float rounding, which can flip a near-tie between two tokens and so change the rest of that map);
    ``cache`` picks the KV cache (``"dynamic"``, ``"static"`` or a :class:`StaticKVCache` to reuse) and
    ``forward`` replaces the model's forward pass at every step (both as in :meth:`GPT.generate`).

    Raises ``ValueError`` for ``classes`` that are not a non-empty ``(B,)`` long tensor in ``[0, n_classes]``,
    a ``grid`` that is not two sides ``>= 1`` or does not fit the model (:func:`check_model_grid`), a GPT without
    classes (``n_classes = 0``) or a bidirectional one (a MaskGIT), and as :meth:`GPT.generate` for the rest;
    ``TypeError`` for arguments of the wrong type (a ``model`` that is not a GPT, a non-tensor ``classes``)."""
    _check_model(model)
    check_ids("classes", classes, model.config.n_classes + 1, ("B",))
    if grid is None:
        if model.config.grid is None:
            raise ValueError("grid is needed: this model has no config.grid to take the map's (rows, cols) from")
        grid = model.config.grid
    rows, cols = check_grid("grid", grid)
    check_model_grid(model, "grid", (rows, cols))
    start = torch.zeros(classes.shape[0], 0, dtype=torch.long, device=classes.device)  # (B, 0)
    seq = model.generate(start, rows * cols, sampling=sampling, cfg=cfg, classes=classes, generator=generator,
                         use_cache=use_cache, cache=cache, forward=forward)
    return from_raster(seq, rows, cols)  # (B, rows, cols)


@torch.no_grad()
def generate_images(
    model: GPT,
    tokenizer: VQVAE,
    classes: torch.Tensor,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    cfg: float = 0.0,
    seed: int | None = 0,
    batch_size: int = 500,
    cache: str = "dynamic",
) -> torch.Tensor:
    """Images ``(B, C, S, S)`` in [0, 1] of the requested ``classes`` ``(B,)``: sample token maps (guidance
    ``cfg = w``, ``sampling``, KV ``cache`` ``"dynamic"`` or ``"static"``: same images up to float rounding),
    decode.

    ``seed`` seeds one generator (on the model's device) for the whole call; ``None`` uses torch's global
    generator. Work runs in chunks of ``batch_size`` classes, and the samples depend on the chunking, so
    keep ``batch_size`` fixed when comparing runs. The default ``cfg=0`` samples without guidance: the shipped
    ``ar_mnist`` is best at ``cfg=1`` (``ar_course.system.DEFAULT_CFG``, what :class:`~ar_course.system.Generator`
    uses; ``ar_mnist_cca`` is aligned to sample at 0).

    Raises as :func:`generate_tokens` and :func:`check_tokenizer`
    (a ``tokenizer`` that is not a :class:`VQVAE` of the model's codes and grid), for a ``model`` that is not a
    GPT (``TypeError``, e.g. the arguments swapped), and for a ``seed`` or ``batch_size`` that is not an integer
    (``TypeError``) or a ``batch_size < 1`` (``ValueError``)."""
    _check_model(model)
    check_ids("classes", classes, model.config.n_classes + 1, ("B",))
    side = check_tokenizer(tokenizer, model)
    batch_size = check_int("batch_size", batch_size, lo=1)
    seed = None if seed is None else check_seed(seed)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def images_of(chunk: torch.Tensor) -> torch.Tensor:
        maps = generate_tokens(model, chunk, (side, side), sampling=sampling, cfg=cfg, generator=generator,
                               cache=cache)
        return tokenizer.decode_from_indices(maps)  # (b, C, S, S)

    return generate_in_batches(images_of, classes.to(device), batch_size)  # (B, C, S, S)


def load_pretrained(device: torch.device | str = "cpu", path: str | Path | None = None) -> tuple[GPT, VQVAE]:
    """The shipped MNIST model (or ``path``: a file, or a shipped name such as ``"ar_mnist_cca"``) and the
    tokenizer it was trained on: ``(model, tokenizer)``, both in eval mode
    (:func:`ar_course.checkpoint.load_with_tokenizer`).

    Weights are stored in float16 and loaded into float32 modules."""
    return checkpoint.load_with_tokenizer(PRETRAINED_PATH if path is None else path, device,
                                          kind=CHECKPOINT_KIND)


def pretrained_info(path: str | Path | None = None) -> dict:
    """What the trainer recorded with the checkpoint: steps, seed, losses, ``accuracy_by_cfg`` (class accuracy
    by guidance strength ``w``)... (:func:`ar_course.checkpoint.info`).

    Checkpoints trained before the guidance convention was ``w`` (the shipped ``ar_mnist`` among them) recorded
    ``accuracy_by_scale`` by the scale ``s = 1 + w``; their ``accuracy_by_cfg`` is derived from it (the recorded
    field stays as it was)."""
    info = checkpoint.info(PRETRAINED_PATH if path is None else path)
    if "accuracy_by_cfg" not in info and "accuracy_by_scale" in info:
        info["accuracy_by_cfg"] = {str(float(s) - 1): acc for s, acc in info["accuracy_by_scale"].items()}
    return info
