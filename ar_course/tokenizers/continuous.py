"""A continuous bottleneck for :class:`~ar_course.tokenizers.vqvae.VQVAE`: the KL-regularised (Gaussian) latent of
a VAE, so the same encoder and decoder make a continuous tokenizer (``VQVAEConfig(quantizer="kl")``, chapter 10).

The encoder emits a mean and a log-variance per latent channel; training decodes a sample
``mu + sigma * eps`` and adds ``kl_weight * KL(N(mu, sigma^2) || N(0, 1))`` (a mean over latent elements) to the
reconstruction loss; evaluation decodes the mean. The "tokens" are the means, standardised per channel with a
shift and scale measured on training latents (:meth:`GaussianBottleneck.calibrate`, as latent diffusion scales its
VAE latents), so an autoregressive model sees ``(B, dim, h, w)`` maps of roughly unit variance.
"""

from __future__ import annotations

import torch
from torch import nn

from ar_course import distributed as ddp
from ar_course.tokenizers.quantizers import QuantizerOutput, _check_map, _flatten
from ar_course.utils import check_finite, check_int, check_number


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(mean, exp(logvar)) || N(0, 1)) = (mean^2 + exp(logvar) - 1 - logvar) / 2``, same shape."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar)


class GaussianBottleneck(nn.Module):
    """The KL-regularised latent of ``dim`` channels.

    ``forward(h)``: ``h`` ``(B, 2 * dim, h, w)`` (means, then log-variances, clamped to [-30, 20]) ->
    :class:`~ar_course.tokenizers.quantizers.QuantizerOutput` with ``z_q`` ``(B, dim, h, w)`` (a reparameterised
    sample in training mode, the mean in eval mode), ``indices`` the standardised means ``(B, dim, h, w)`` and
    the loss ``kl_weight * mean KL``. ``encode`` / ``decode`` map to and from the standardised tokens."""

    def __init__(self, dim: int, kl_weight: float = 1e-4) -> None:
        super().__init__()
        dim = check_int("GaussianBottleneck dim", dim, 1)
        kl_weight = check_number("kl_weight", kl_weight)
        if not kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.dim, self.kl_weight = dim, float(kl_weight)
        self.register_buffer("shift", torch.zeros(dim))  # (dim,) per-channel mean of training latents
        self.register_buffer("scale", torch.ones(dim))  # (dim,) per-channel standard deviation

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kl_weight={self.kl_weight}"

    def split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)``, each ``(B, dim, h, w)``, of an encoder output ``(B, 2 * dim, h, w)``."""
        _check_map(h, 2 * self.dim, "GaussianBottleneck")
        mean, logvar = h.chunk(2, dim=1)  # 2 x (B, dim, h, w)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, h: torch.Tensor) -> QuantizerOutput:
        """Encoder output ``h`` ``(B, 2 * dim, h, w)`` -> ``(z_q, indices, loss)`` as the class docstring says
        (``ValueError`` / ``TypeError`` for a map of the wrong shape or dtype; values are not read)."""
        mean, logvar = self.split(h)
        if self.training:  # the reparameterised sample; its noise the global batch's under torchrun
            noise = ddp.draw_rows(lambda n: torch.randn((n, *mean.shape[1:]), dtype=mean.dtype, device=mean.device),
                                  mean.shape[0])  # (B, dim, h, w)
            z = mean + noise * (0.5 * logvar).exp()
        else:
            z = mean
        loss = self.kl_weight * gaussian_kl(mean, logvar).mean()
        return QuantizerOutput(z, self.normalize(mean.detach()), loss)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised tokens ``(B, dim, h, w)`` of latents ``(B, dim, h, w)``: ``(z - shift) / scale`` per channel."""
        return (z - self.shift[:, None, None]) / self.scale[:, None, None]

    @torch.no_grad()
    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Standardised mean latents ``(B, dim, h, w)`` of a finite encoder output ``(B, 2 * dim, h, w)``."""
        check_finite("h", h)
        return self.normalize(self.split(h)[0])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, dim, h, w)`` for the decoder from standardised tokens ``(B, dim, h, w)``."""
        _check_map(tokens, self.dim, "GaussianBottleneck.decode")
        return tokens * self.scale[:, None, None] + self.shift[:, None, None]

    @torch.no_grad()
    def calibrate(self, h: torch.Tensor) -> None:
        """Set ``shift`` / ``scale`` to the per-channel mean and standard deviation of the means of encoder outputs
        ``h`` ``(B, 2 * dim, h, w)`` (training images), so :meth:`encode` gives tokens of zero mean, unit variance.

        Raises:
            TypeError: ``h`` is not a tensor.
            ValueError: ``h`` is not a float ``(B, 2 * dim, h, w)`` map of at least 2 positions (``B*h*w``: a
                standard deviation needs two), or holds a NaN or infinity.
        """
        mean = self.split(h)[0]
        if mean.shape[0] * mean.shape[2] * mean.shape[3] < 2:
            raise ValueError(f"calibrate needs h with at least 2 positions (B*h*w) to measure a spread, got shape "
                             f"{tuple(h.shape)}")
        check_finite("h", h)
        flat = _flatten(mean)  # (B*h*w, dim)
        self.shift.copy_(flat.mean(0))
        self.scale.copy_(flat.std(0).clamp_min(1e-6))
