"""A small convolutional VQ-VAE around any of the quantizers (VQ, RVQ, multi-scale VQ, FSQ, LFQ) or the continuous
KL-regularised bottleneck (``quantizer="kl"``: a small VAE), and the shipped pretrained tokenizers.

    config = VQVAEConfig(quantizer="msvq", num_codes=256, latent_dim=16)
    model = VQVAE(config)
    out = model(images)                   # images (B, 1, 32, 32) in [0, 1]
    out.loss.backward()                   # reconstruction MSE + quantizer loss
    tokens = model.encode_to_indices(images)
    images_back = model.decode_from_indices(tokens)

    tok = load_pretrained("mnist_vq")     # 8x8 = 64 tokens per MNIST digit (chapter 03)
    tok = load_pretrained("mnist_msvq")   # scales 1,2,3,4,6,8 = 130 tokens in 6 steps (chapter 04)
    tok = load_pretrained("mnist_kl")     # 8x8 continuous tokens of 4 channels (chapter 10)

``load_pretrained(name)`` is ``ar_course.checkpoint.load(name, kind="tokenizer")``; the shipped files are
``tokenizer_mnist_vq``, ``tokenizer_mnist_msvq`` and ``tokenizer_mnist_kl`` in :data:`ar_course.checkpoint.ASSETS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ar_course import checkpoint
from ar_course.tokenizers.continuous import GaussianBottleneck
from ar_course.tokenizers.implicit import FSQ, LFQ, LFQ_MAX_DIM
from ar_course.tokenizers.quantizers import (
    MSVQ_LOSSES, MultiScaleVQ, QuantizerOutput, ResidualVQ, VectorQuantizer,
)
from ar_course.tokenizers.functional import check_levels, check_scales, scale_sides
from ar_course.utils import check_bool, check_image_values, check_int, check_number

QUANTIZERS = ("vq", "rvq", "msvq", "fsq", "lfq", "kl")
PRETRAINED = ("mnist_vq", "mnist_msvq", "mnist_kl")
SWITCH_QUANTIZERS = {"ema": ("vq", "rvq"), "l2_norm": ("vq",), "rotation_trick": ("vq",), "kmeans_init": ("vq",),
                     "shared_codebook": ("rvq",)}
"""The on/off options of :class:`VQVAEConfig` -> the quantizers that implement them (turned on for another
quantizer, a switch is refused rather than ignored)."""
CHECKPOINT_KIND = "tokenizer"


@dataclass
class VQVAEConfig:
    """Hyper-parameters of :class:`VQVAE`, checked when made.

    Raises:
        TypeError: a size that is not an integer (``image_size=32.0``, a scale ``2.5``), a weight that is not a
            number (``beta="0.25"``) or an option that is not a bool (``ema="no"``).
        ValueError: a weight that is NaN, infinite or negative, ``decay`` outside ``[0, 1)``, ``phi_ratio``
            outside ``[0, 1]``, an unknown ``msvq_loss``, a size ``< 1`` (``in_channels``, ``image_size``,
            ``downsample``, ``width``, ``latent_dim``, ``num_codes`` of vq/rvq/msvq, ``depth``, ``usage_window``,
            ``num_phi``) or ``num_res_blocks < 0``, an unknown ``quantizer``, a ``downsample`` that is not a power
            of two or does not divide ``image_size``, msvq ``scales`` that decrease, leave ``[1, latent_side]`` or
            do not end at the latent side, fsq levels or an lfq ``latent_dim`` that do not fit, or a switch
            (``ema``, ``l2_norm``, ``rotation_trick``, ``kmeans_init``, ``shared_codebook``) turned on for a
            quantizer that lacks it (:data:`SWITCH_QUANTIZERS`).
    """

    in_channels: int = 1
    image_size: int = 32
    downsample: int = 4  # a power of two; the latent map is image_size / downsample on a side
    width: int = 16  # channels at full resolution, doubled at every downsampling
    num_res_blocks: int = 1
    latent_dim: int = 16
    quantizer: str = "vq"  # "vq", "rvq", "msvq", "fsq", "lfq" or "kl" (continuous)
    num_codes: int = 256  # fsq / lfq: derived, prod(fsq_levels) or 2**latent_dim
    beta: float = 0.25
    ema: bool = False  # vq / rvq only
    decay: float = 0.99
    l2_norm: bool = False  # vq only
    rotation_trick: bool = False  # vq only: gradient through the rotation onto the code, not straight through
    kmeans_init: bool = False  # vq only: k-means codebook from the first training batch
    dead_code_threshold: float = 0.0
    usage_window: int = 100
    depth: int = 4  # rvq
    shared_codebook: bool = False  # rvq
    scales: tuple[int, ...] = (1, 2, 3, 4, 6, 8)  # msvq
    phi_ratio: float = 0.5  # msvq
    num_phi: int = 4  # msvq
    msvq_loss: str = "every_scale"  # msvq: VAR's average over every scale's partial sum, or "final" only
    # msvq, "every_scale": extra weight on the complete reconstruction's term. VAR's plain average (0) leaves our
    # 8x8 tokenizer 2.1 dB behind single-scale VQ; 32 closes that to 0.8 dB with every partial sum improving
    # (benchmarks/results/msvq_loss.json).
    msvq_final_weight: float = 32.0
    fsq_levels: tuple[int, ...] = (8, 6, 5)  # fsq: levels per latent channel (latent_dim must be their number)
    lfq_entropy_weight: float = 0.1  # lfq: weight of the entropy loss (per-sample minus codebook entropy)
    kl_weight: float = 1e-4  # kl: weight of the mean KL of the latent to N(0, 1)

    def __post_init__(self) -> None:
        self.scales = scale_sides(self.scales)  # JSON gives lists back
        self.fsq_levels = tuple(self.fsq_levels)
        if not isinstance(self.quantizer, str) or self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        sizes = ["in_channels", "image_size", "downsample", "width", "latent_dim"]
        sizes += ["num_codes"] if self.quantizer in ("vq", "rvq", "msvq") else []  # fsq / lfq derive it
        for name in sizes:
            setattr(self, name, check_int(name, getattr(self, name), lo=1))
        self.num_res_blocks = check_int("num_res_blocks", self.num_res_blocks, lo=0)
        self.depth = check_int("depth", self.depth, lo=1)
        self.usage_window = check_int("usage_window", self.usage_window, lo=1)
        self.num_phi = check_int("num_phi", self.num_phi, lo=1)
        for name in ("beta", "dead_code_threshold", "msvq_final_weight", "lfq_entropy_weight", "kl_weight"):
            setattr(self, name, check_number(name, getattr(self, name), 0))
        self.decay = check_number("decay", self.decay, 0, 1, hi_open=True)
        self.phi_ratio = check_number("phi_ratio", self.phi_ratio, 0, 1)
        for name in ("ema", "l2_norm", "rotation_trick", "kmeans_init", "shared_codebook"):
            setattr(self, name, check_bool(name, getattr(self, name)))
        if not isinstance(self.msvq_loss, str) or self.msvq_loss not in MSVQ_LOSSES:
            raise ValueError(f"msvq_loss must be one of {MSVQ_LOSSES}, got {self.msvq_loss!r}")
        if self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by downsample {self.downsample}")
        if self.quantizer == "msvq":
            check_scales(self.scales, self.latent_side)
        if self.quantizer == "fsq":
            self.fsq_levels = check_levels(self.fsq_levels)
            if self.latent_dim != len(self.fsq_levels):
                raise ValueError(f"fsq needs latent_dim == len(fsq_levels) = {len(self.fsq_levels)}, got "
                                 f"{self.latent_dim}")
            self.num_codes = math.prod(self.fsq_levels)
        if self.quantizer == "lfq":
            if not 1 <= self.latent_dim <= LFQ_MAX_DIM:
                raise ValueError(f"lfq needs 1 <= latent_dim <= {LFQ_MAX_DIM}, got {self.latent_dim}")
            self.num_codes = 2**self.latent_dim
        for name, quantizers in SWITCH_QUANTIZERS.items():  # a switch turned on where it would be ignored
            if getattr(self, name) and self.quantizer not in quantizers:
                raise ValueError(f"{name} applies to quantizer {' / '.join(map(repr, quantizers))} only, got "
                                 f"quantizer={self.quantizer!r}")

    @property
    def latent_side(self) -> int:
        """Side of the latent map, ``image_size // downsample``."""
        return self.image_size // self.downsample

    @classmethod
    def from_dict(cls, d: dict) -> "VQVAEConfig":
        """Build from a dict such as a checkpoint's stored config: :func:`~ar_course.checkpoint.config_from_dict`
        (missing keys take their defaults, an unknown key is a ``ValueError``)."""
        return checkpoint.config_from_dict(cls, d)


class ResBlock(nn.Module):
    """``x + conv1x1(silu(conv3x3(silu(x))))``, same shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, channels, h, w)`` -> ``(B, channels, h, w)``."""
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Encoder(nn.Module):
    """Images ``(B, C, S, S)`` in [0, 1] -> continuous latents ``(B, latent_dim, S/f, S/f)`` (``quantizer="kl"``:
    ``(B, 2 * latent_dim, S/f, S/f)``, means then log-variances)."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        n_down = int(math.log2(config.downsample))
        widths = [config.width * 2**i for i in range(n_down + 1)]
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, widths[0], 3, padding=1)]
        for i in range(n_down):
            layers += [nn.SiLU(), nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1)]  # halves the side
        layers += [ResBlock(widths[-1]) for _ in range(config.num_res_blocks)]
        out = config.latent_dim * (2 if config.quantizer == "kl" else 1)  # kl: means and log-variances
        layers += [nn.SiLU(), nn.Conv2d(widths[-1], out, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, S, S)`` in [0, 1] -> latents (shapes in the class docstring)."""
        return self.net(x * 2 - 1)


class Decoder(nn.Module):
    """Quantized latents ``(B, latent_dim, s, s)`` -> images ``(B, C, s*f, s*f)``, trained towards [0, 1]
    (a linear output: a sigmoid saturates on MNIST's black background and stalls training)."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        n_down = int(math.log2(config.downsample))
        widths = [config.width * 2**i for i in range(n_down + 1)]
        layers: list[nn.Module] = [nn.Conv2d(config.latent_dim, widths[-1], 3, padding=1)]
        layers += [ResBlock(widths[-1]) for _ in range(config.num_res_blocks)]
        for i in reversed(range(n_down)):
            layers += [nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"),  # doubles the side
                       nn.Conv2d(widths[i + 1], widths[i], 3, padding=1)]
        layers += [nn.SiLU(), nn.Conv2d(widths[0], config.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, latent_dim, s, s)`` -> images ``(B, C, s*f, s*f)``."""
        return self.net(z)


def build_quantizer(config: VQVAEConfig) -> nn.Module:
    """The quantizer a config names: :class:`VectorQuantizer`, :class:`ResidualVQ`, :class:`MultiScaleVQ`,
    :class:`FSQ`, :class:`LFQ` or the continuous :class:`GaussianBottleneck`."""
    if config.quantizer == "kl":
        return GaussianBottleneck(config.latent_dim, config.kl_weight)
    if config.quantizer == "fsq":
        return FSQ(config.fsq_levels)
    if config.quantizer == "lfq":
        return LFQ(config.latent_dim, beta=config.beta, entropy_weight=config.lfq_entropy_weight)
    common = dict(beta=config.beta, dead_code_threshold=config.dead_code_threshold, usage_window=config.usage_window)
    if config.quantizer == "vq":
        return VectorQuantizer(config.num_codes, config.latent_dim, ema=config.ema, decay=config.decay,
                               l2_norm=config.l2_norm, rotation_trick=config.rotation_trick,
                               kmeans_init=config.kmeans_init, **common)
    if config.quantizer == "rvq":
        return ResidualVQ(config.num_codes, config.latent_dim, depth=config.depth,
                          shared_codebook=config.shared_codebook, ema=config.ema, decay=config.decay, **common)
    return MultiScaleVQ(config.num_codes, config.latent_dim, scales=config.scales, phi_ratio=config.phi_ratio,
                        num_phi=config.num_phi, loss=config.msvq_loss,
                        final_weight=config.msvq_final_weight if config.msvq_loss == "every_scale" else 0.0, **common)


class VQVAEOutput(NamedTuple):
    """What :meth:`VQVAE.forward` returns."""

    recon: torch.Tensor  # (B, C, S, S) clamped to [0, 1]
    indices: torch.Tensor | list[torch.Tensor]  # the quantizer's indices
    loss: torch.Tensor  # recon_loss + quant_loss
    recon_loss: torch.Tensor  # mean squared error of the unclamped output
    quant_loss: torch.Tensor


class VQVAE(nn.Module):
    """Conv encoder -> quantizer -> conv decoder. Images are ``(B, in_channels, image_size, image_size)``
    with values in [0, 1]; tokens are what the quantizer's ``encode`` gives: ``(B, h, w)`` for ``vq``, ``fsq``, ``lfq``,
    ``(B, depth, h, w)`` for ``rvq``, a list of ``(B, s_k, s_k)`` for ``msvq``, float ``(B, latent_dim, h, w)``
    (standardised continuous latents) for ``kl``."""

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = build_quantizer(config)
        self.decoder = Decoder(config)

    @property
    def tokens_per_image(self) -> int:
        """Tokens per image: ``sum(s_k^2)`` for ``msvq``, ``depth * latent_side^2`` for ``rvq``, else
        ``latent_side^2`` (``kl``: positions, each a ``latent_dim`` vector)."""
        c = self.config
        if c.quantizer == "msvq":
            return self.quantizer.num_tokens
        return c.latent_side**2 * (c.depth if c.quantizer == "rvq" else 1)

    def _check_images(self, x: torch.Tensor) -> None:
        """Non-empty float images ``(B, C, S, S)`` of this model's ``C`` and ``S`` (no values read)."""
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a float (B, {c.in_channels}, {c.image_size}, {c.image_size}) tensor, "
                            f"got {type(x).__name__}")
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"expected float images (B, {c.in_channels}, {c.image_size}, {c.image_size}), got "
                             f"{tuple(x.shape)} {x.dtype}")
        if x.shape[1] != c.in_channels:
            raise ValueError(f"this VQ-VAE takes {c.in_channels}-channel images, got {x.shape[1]} channels")
        if tuple(x.shape[2:]) != (c.image_size, c.image_size):
            raise ValueError(f"this VQ-VAE takes {c.image_size}x{c.image_size} images, got "
                             f"{x.shape[2]}x{x.shape[3]}")
        if x.shape[0] == 0:
            raise ValueError(f"images is an empty batch {tuple(x.shape)}")

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype; ``encode`` and ``decode`` cast their input to it."""
        return next(self.parameters()).dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latents ``(B, latent_dim, h, w)`` (``kl``: ``(B, 2 * latent_dim, h, w)``) of images
        ``(B, C, S, S)`` of any floating dtype."""
        self._check_images(x)
        return self.encoder(x.to(self.dtype))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, S, S)`` in [0, 1] from (quantized) latents ``(B, latent_dim, s, s)`` on this model's
        latent grid, ``s = latent_side`` (non-empty, float; ``ValueError`` otherwise)."""
        c = self.config
        if (not isinstance(z_q, torch.Tensor) or z_q.ndim != 4 or z_q.shape[1] != c.latent_dim
                or tuple(z_q.shape[2:]) != (c.latent_side, c.latent_side)
                or not z_q.is_floating_point() or z_q.numel() == 0):
            got = f"{tuple(z_q.shape)} {z_q.dtype}" if isinstance(z_q, torch.Tensor) else type(z_q).__name__
            raise ValueError(f"expected non-empty float latents (B, {c.latent_dim}, {c.latent_side}, "
                             f"{c.latent_side}), got {got}")
        return self.decoder(z_q.to(self.dtype)).clamp(0, 1)

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        """Reconstruct images ``(B, C, S, S)`` in [0, 1] of any floating dtype; see :class:`VQVAEOutput`.

        The images' values are read at entry (one host sync; in training mode the quantizer reads its input's
        once more to refuse non-finite latents).

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: images of the wrong shape, dtype or size, an empty batch, or (values read as above)
                images holding NaN or infinity or outside [0, 1] (0..255 or [-1, 1] images), or latents the
                encoder made non-finite.
        """
        z = self.encode(x)
        check_image_values("images", x)
        q: QuantizerOutput = self.quantizer(z)
        out = self.decoder(q.z_q)  # (B, C, S, S), unclamped
        recon_loss = F.mse_loss(out, x)
        return VQVAEOutput(out.clamp(0, 1), q.indices, recon_loss + q.loss, recon_loss, q.loss)

    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Tokens of finite images ``(B, C, S, S)`` (see the class docstring for their shape). ``ValueError``
        for images of the wrong shape, dtype or size, an empty batch or a non-finite value; ``TypeError`` for a
        non-tensor. Images outside [0, 1] (0..255 or [-1, 1]) are refused too; the values are read once."""
        self._check_images(x)
        check_image_values("images", x)
        return self.quantizer.encode(self.encoder(x.to(self.dtype)))

    @torch.no_grad()
    def decode_from_indices(self, indices: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Images ``(B, C, S, S)`` in [0, 1] from tokens (for ``msvq`` the first ``n <= S`` scales suffice:
        fewer scales give a coarser image).

        Raises:
            TypeError: as the quantizer's ``decode`` (a non-tensor, or for ``msvq`` a non-list).
            ValueError: as the quantizer's ``decode`` (codes out of range, wrong shapes or dtypes), or maps
                whose ``h, w`` are not this tokenizer's ``latent_side x latent_side`` grid.
        """
        side = self.config.latent_side  # every tensor of tokens ends with (h, w); msvq's list is checked by scale
        if isinstance(indices, torch.Tensor) and indices.ndim >= 3 and tuple(indices.shape[-2:]) != (side, side):
            raise ValueError(f"indices must be maps of this tokenizer's {side}x{side} latent grid, got shape "
                             f"{tuple(indices.shape)}")
        return self.decode(self.quantizer.decode(indices))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Encode and decode images ``(N, C, S, S)`` in chunks of ``batch_size``; returns ``(N, C, S, S)``.

        Raises:
            TypeError: ``x`` is not a tensor, ``batch_size`` is not an integer.
            ValueError: ``batch_size < 1``, or images as :meth:`encode_to_indices` refuses them.
        """
        self._check_images(x)
        batch_size = check_int("batch_size", batch_size, lo=1)
        return torch.cat([self.decode_from_indices(self.encode_to_indices(chunk)) for chunk in x.split(batch_size)])


def pretrained_path(name: str) -> Path:
    """Where the shipped tokenizer ``name`` (one of :data:`PRETRAINED`, or the checkpoint name
    :func:`ar_course.checkpoint.available` lists for it, ``"tokenizer_mnist_vq"``) lives."""
    if isinstance(name, str) and name.removeprefix("tokenizer_") in PRETRAINED:
        name = name.removeprefix("tokenizer_")
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained tokenizer {name!r}; choose from {PRETRAINED}")
    return checkpoint.ASSETS / f"{checkpoint.ALIASES.get(name, f'tokenizer_{name}')}.safetensors"


def load_pretrained(name: str, device: str | torch.device = "cpu") -> VQVAE:
    """The shipped tokenizer ``name`` as a :class:`VQVAE` in eval mode.

    ``"mnist_vq"``: single-scale VQ, 8x8 = 64 tokens per 32x32 digit. ``"mnist_msvq"``: VAR's multi-scale
    VQ with scales 1,2,3,4,6,8 = 130 tokens in 6 steps. Both share the encoder/decoder configuration and
    the codebook size. ``"mnist_kl"``: the continuous KL-regularised autoencoder, 8x8 tokens of 4 standardised
    channels (chapter 10). Build them again with ``python -m ar_course train tokenizer``."""
    return checkpoint.load(pretrained_path(name), device, kind=CHECKPOINT_KIND)


def pretrained_info(name: str) -> dict:
    """What was recorded when the shipped tokenizer was trained (steps, seed, held-out PSNR, usage...):
    :func:`ar_course.checkpoint.info`."""
    return checkpoint.info(pretrained_path(name))
