"""Image tokenizers: vector quantizers (VQ-VAE, RQ-VAE, VAR's multi-scale VQ) and a small conv VQ-VAE.

* :mod:`.functional` -- the pure functions the quantizers are built from (lookup, straight-through, losses,
  EMA, restart, usage, residual and multi-scale quantization, the rotation trick, k-means, FSQ and LFQ);
  chapter 01's exercises are checked against them.
* :class:`VectorQuantizer`, :class:`ResidualVQ`, :class:`MultiScaleVQ` -- the quantizers as modules.
* :class:`FSQ`, :class:`LFQ` -- finite scalar and lookup-free quantization, implicit codebooks (chapter 10).
* :class:`~ar_course.tokenizers.continuous.GaussianBottleneck` -- no quantization: the KL-regularised latent of a
  small VAE (``VQVAEConfig(quantizer="kl")``), continuous tokens for :mod:`ar_course.continuous` (chapter 10).
* :class:`VQVAE` / :class:`VQVAEConfig` -- encoder + quantizer + decoder; :func:`load_pretrained` gives the
  shipped MNIST tokenizers (``"mnist_vq"``, ``"mnist_msvq"``, ``"mnist_kl"``).
"""

from ar_course.tokenizers import functional
from ar_course.tokenizers.functional import token_count
from ar_course.tokenizers.implicit import FSQ, LFQ
from ar_course.tokenizers.quantizers import MultiScaleVQ, Phi, QuantizerOutput, ResidualVQ, VectorQuantizer
from ar_course.tokenizers.vqvae import (
    PRETRAINED, VQVAE, VQVAEConfig, VQVAEOutput, load_pretrained, pretrained_info, pretrained_path,
)

__all__ = [
    "functional", "token_count", "VectorQuantizer", "ResidualVQ", "MultiScaleVQ", "FSQ", "LFQ", "Phi",
    "QuantizerOutput",
    "VQVAE", "VQVAEConfig", "VQVAEOutput", "load_pretrained", "pretrained_info", "pretrained_path", "PRETRAINED",
]
