"""Quantizers with an implicit codebook: nothing is looked up and nothing is learned in the quantizer.

* :class:`FSQ` -- finite scalar quantization ("Finite Scalar Quantization: VQ-VAE Made Simple"): each of the
  ``d = len(levels)`` channels is squashed and rounded to ``levels[i]`` values; the codebook is the grid of
  ``prod(levels)`` points. No auxiliary loss.
* :class:`LFQ` -- lookup-free quantization ("Language Model Beats Diffusion -- Tokenizer is Key to Visual
  Generation"): the sign of each of ``dim`` channels; the codebook is the ``2^dim`` sign patterns. Its loss is a
  commitment term plus the entropy loss (per-sample entropy down, batch entropy up).

Both take a feature map ``(B, d, h, w)`` and return a :class:`~ar_course.tokenizers.quantizers.QuantizerOutput`
with ``indices`` ``(B, h, w)``, like :class:`~ar_course.tokenizers.quantizers.VectorQuantizer`, so they plug
into :class:`~ar_course.tokenizers.vqvae.VQVAE`. Built from :mod:`ar_course.tokenizers.functional`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ar_course import distributed as ddp
from ar_course.tokenizers import functional as Fq
from ar_course.tokenizers.quantizers import QuantizerOutput, _check_map, _check_training_input, _flatten, _unflatten
from ar_course.utils import check_finite, check_ids, check_int, check_number

LFQ_MAX_DIM = 16
"""The largest :class:`LFQ` ``dim``: its entropy loss sums over all ``2^dim`` codes."""


class FSQ(nn.Module):
    """Finite scalar quantization with ``levels`` ``(L_0, ..., L_{d-1})``, each ``>= 2``.

    ``forward(z)``: ``z`` ``(B, d, h, w)`` -> codes on the grid ``{(k - L_i//2) / (L_i//2)}`` (straight-through
    rounding of :func:`~ar_course.tokenizers.functional.fsq_bound`), indices ``(B, h, w)`` in
    ``[0, num_codes)`` with ``num_codes = prod(levels)``, and a zero loss. In bfloat16 the codes of a level above
    256 are not all distinct numbers (neighbouring codes share an index): quantize in float32 there."""

    def __init__(self, levels: Sequence[int]) -> None:
        super().__init__()
        self.levels = Fq.check_levels(levels)
        self.dim = len(self.levels)
        self.num_codes = math.prod(self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, num_codes={self.num_codes}"

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, d, h, w)`` of ``z`` ``(B, d, h, w)``, with the straight-through gradient."""
        _check_map(z, self.dim, "FSQ")
        return Fq.fsq_quantize(z.movedim(1, -1), self.levels).movedim(-1, 1)  # channels last and back

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``(B, d, h, w)`` (see the class docstring).

        Raises:
            TypeError: ``z`` is not a tensor.
            ValueError: ``z`` is not a non-empty float ``(B, d, h, w)`` map, or (training mode only, as
                :meth:`~ar_course.tokenizers.quantizers.VectorQuantizer.forward`: one host sync) holds a NaN or
                infinity.
        """
        _check_map(z, self.dim, "FSQ")
        _check_training_input(self, "z", z)
        return self._forward(z)

    def _forward(self, z: torch.Tensor) -> QuantizerOutput:
        """:meth:`forward` on a checked map (no values read)."""
        z_q = self.quantize(z)  # (B, d, h, w)
        indices = Fq._fsq_codes_to_indices(z_q.detach().movedim(1, -1), self.levels)  # (B, h, w)
        return QuantizerOutput(z_q, indices, z.new_zeros(()))

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Index map ``(B, h, w)`` of a finite feature map ``(B, d, h, w)``."""
        _check_map(z, self.dim, "FSQ")
        check_finite("z", z)
        return self._forward(z).indices

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, d, h, w)`` of an integer index map ``(B, h, w)`` in ``[0, num_codes)``."""
        check_ids("indices", indices, self.num_codes, ("B", "h", "w"), dtype=None)
        return Fq._fsq_indices_to_codes(indices, self.levels).movedim(-1, 1)  # (B, h, w, d) -> (B, d, h, w)

    def codes(self) -> torch.Tensor:
        """The implicit codebook ``(num_codes, d)``, code ``k`` in row ``k`` (as ``VectorQuantizer.codes``)."""
        return Fq._fsq_indices_to_codes(torch.arange(self.num_codes), self.levels)


class LFQ(nn.Module):
    """Lookup-free quantization of ``dim`` channels (``1 <= dim <=`` :data:`LFQ_MAX_DIM`).

    ``forward(z)``: ``z`` ``(B, dim, h, w)`` -> codes ``sign(z)`` in ``{-1, +1}`` (``+1`` only where ``z > 0``)
    with a straight-through gradient, indices ``(B, h, w)`` whose bit ``i`` is channel ``i``'s sign, and the loss
    ``beta * mean((z - sg[codes])^2) + entropy_weight * (H_sample - diversity * H_codebook)`` from
    :func:`~ar_course.tokenizers.functional.lfq_entropy_terms` in training mode (``entropy_weight = 0`` drops
    the entropy terms; in eval mode the loss is the commitment term alone). :attr:`last_entropy` holds the two
    entropies of the last training batch."""

    def __init__(self, dim: int, beta: float = 0.25, entropy_weight: float = 0.1, diversity: float = 1.0,
                 temperature: float = 0.01) -> None:
        super().__init__()
        dim = check_int("LFQ dim", dim, 1, LFQ_MAX_DIM)
        beta = check_number("beta", beta, 0)
        entropy_weight = check_number("entropy_weight", entropy_weight, 0)
        diversity = check_number("diversity", diversity, 0)
        temperature = check_number("temperature", temperature, 0, lo_open=True)
        self.dim, self.num_codes, self.beta = dim, 2**dim, beta
        self.entropy_weight, self.diversity, self.temperature = entropy_weight, diversity, temperature
        self.last_entropy: dict[str, float] = {}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_codes={self.num_codes}, entropy_weight={self.entropy_weight}, "
                f"diversity={self.diversity}, temperature={self.temperature}")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``(B, dim, h, w)`` (see the class docstring).

        Raises:
            TypeError: ``z`` is not a tensor.
            ValueError: ``z`` is not a non-empty float ``(B, dim, h, w)`` map, or (training mode only, as
                :meth:`~ar_course.tokenizers.quantizers.VectorQuantizer.forward`: one host sync) holds a NaN or
                infinity.
        """
        _check_map(z, self.dim, "LFQ")
        _check_training_input(self, "z", z)
        b, _, h, w = z.shape
        flat = _flatten(z)  # (N, dim)
        codes = Fq.lfq_quantize(flat)  # (N, dim)
        loss = self.beta * F.mse_loss(flat, codes.detach())
        if self.entropy_weight > 0 and self.training:
            per_sample, codebook = Fq.lfq_entropy_terms(flat, self.temperature, batch_sum=ddp.global_batch_sum)
            loss = loss + self.entropy_weight * (per_sample - self.diversity * codebook)
            self.last_entropy = {"per_sample": float(per_sample.detach()), "codebook": float(codebook.detach())}
        indices = Fq.lfq_codes_to_indices(codes.detach()).view(b, h, w)
        return QuantizerOutput(_unflatten(codes, b, h, w), indices, loss)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Index map ``(B, h, w)`` of a finite feature map ``(B, dim, h, w)``."""
        _check_map(z, self.dim, "LFQ")
        check_finite("z", z)
        return Fq.lfq_codes_to_indices(z.movedim(1, -1))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Sign codes ``(B, dim, h, w)`` of an integer index map ``(B, h, w)`` in ``[0, 2^dim)``."""
        check_ids("indices", indices, self.num_codes, ("B", "h", "w"), dtype=None)
        return Fq._lfq_indices_to_codes(indices, self.dim).movedim(-1, 1)  # (B, h, w, dim) -> (B, dim, h, w)

    def codes(self) -> torch.Tensor:
        """The implicit codebook ``(2^dim, dim)`` of sign patterns, code ``k`` in row ``k``."""
        return Fq._lfq_indices_to_codes(torch.arange(self.num_codes), self.dim)
