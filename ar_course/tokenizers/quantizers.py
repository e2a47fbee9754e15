"""Vector quantizers as ``nn.Module``s: plain VQ (VQ-VAE), residual VQ (RQ-VAE) and VAR's multi-scale
residual VQ. Each takes a feature map ``(B, D, h, w)`` and returns a :class:`QuantizerOutput`.

Built from the pure functions in :mod:`ar_course.tokenizers.functional`:

* :class:`VectorQuantizer` -- nearest-code lookup, straight-through output, codebook + commitment loss or
  EMA codebook updates, optional l2-normalised codes, dead-code restart and usage statistics over a window.
* :class:`ResidualVQ` -- ``depth`` quantizers in a row, each coding the previous residual.
* :class:`MultiScaleVQ` -- one shared codebook across scales ``1 .. h``; coarse scales code an
  area-downsampled residual, their code maps are upsampled bicubically and refined by ``phi`` convs.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ar_course import distributed as ddp
from ar_course.tokenizers import functional as Fq
from ar_course.utils import check_bool, check_finite, check_ids, check_int, check_number


MSVQ_LOSSES = ("final", "every_scale")
"""What :class:`MultiScaleVQ`'s loss measures: the complete reconstruction, or every partial sum (VAR)."""


class QuantizerOutput(NamedTuple):
    """What every quantizer's ``forward`` returns."""

    z_q: torch.Tensor  # (B, D, h, w) quantized map; its gradient flows straight through to the input
    # (B, h, w), (B, depth, h, w), one (B, s, s) per scale, or (GaussianBottleneck) float (B, D, h, w) tokens
    indices: torch.Tensor | list[torch.Tensor]
    # scalar quantizer loss: codebook + commitment (commitment only with EMA); FSQ 0; LFQ commitment + entropy
    # terms; GaussianBottleneck the weighted KL
    loss: torch.Tensor


def _check_map(z: torch.Tensor, dim: int, who: str) -> None:
    """A non-empty floating-point feature map ``(B, dim, h, w)`` (no values read); ``TypeError`` for a
    non-tensor, else ``ValueError``."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{who} expects a feature map (B, {dim}, h, w) tensor, got {type(z).__name__}")
    if z.ndim != 4:
        raise ValueError(f"{who} expects a feature map (B, {dim}, h, w), got {tuple(z.shape)}")
    if z.shape[1] != dim:
        raise ValueError(f"{who} expects {dim} channels, got {z.shape[1]} (input shape {tuple(z.shape)})")
    if not z.is_floating_point():
        raise ValueError(f"{who} expects a floating-point feature map, got {z.dtype}")
    if z.numel() == 0:
        raise ValueError(f"{who} got an empty feature map {tuple(z.shape)}")


def _check_training_input(module: nn.Module, name: str, z: torch.Tensor) -> None:
    """In training mode, ``ValueError`` for a non-finite input (one host sync), which would spoil the codebook
    statistics. Eval mode reads nothing."""
    if module.training:
        check_finite(name, z)


def _flatten(z: torch.Tensor) -> torch.Tensor:
    """``(B, D, h, w) -> (B*h*w, D)``."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, D)


def _unflatten(flat: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """``(B*h*w, D) -> (B, D, h, w)``."""
    return flat.view(b, h, w, -1).permute(0, 3, 1, 2)  # (B, D, h, w)


class VectorQuantizer(nn.Module):
    """A codebook of ``num_codes`` vectors of size ``dim`` and the machinery to train and watch it.

    * ``forward(z)``: ``z`` ``(B, dim, h, w)`` -> :class:`QuantizerOutput` with ``indices`` ``(B, h, w)``.
      Loss: ``mean((z_q - sg[z])^2) + beta * mean((z - sg[z_q])^2)``, or only the commitment term with
      ``ema=True`` (the codebook then follows running means of its assigned vectors, ``decay``/``eps``).
    * ``l2_norm=True`` normalises vectors and codes to unit length before the lookup (LlamaGen/ViT-VQGAN).
    * In training mode it counts code hits; every ``usage_window`` steps the counts of that window become
      :meth:`usage`, and with ``dead_code_threshold > 0`` the codes hit fewer times than that are
      replaced by random vectors of the current batch (dead-code restart).
    * ``rotation_trick=True``: the same forward value, but the encoder's gradient goes through the rotation and
      rescaling that maps each vector onto its code (:func:`~ar_course.tokenizers.functional.rotation_trick`)
      instead of straight through.
    * ``kmeans_init=True``: the first training batch replaces the codebook by ``kmeans_iters`` rounds of
      k-means on its vectors (:func:`~ar_course.tokenizers.functional.kmeans`); the ``initialized`` buffer
      records that it happened.
    * Under ``torchrun`` these statistics are global: hit counts are summed over processes and EMA updates
      and restarts use every process's vectors in rank order (:mod:`ar_course.distributed`), so each process
      makes the update one process would make on the global batch.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        l2_norm: bool = False,
        dead_code_threshold: float = 0.0,
        usage_window: int = 100,
        rotation_trick: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        num_codes, dim = check_int("num_codes", num_codes, lo=1), check_int("dim", dim, lo=1)
        beta = check_number("beta", beta, 0)
        ema, l2_norm = check_bool("ema", ema), check_bool("l2_norm", l2_norm)
        decay = check_number("decay", decay, 0, 1, hi_open=True)
        eps = check_number("eps", eps, 0)
        dead_code_threshold = check_number("dead_code_threshold", dead_code_threshold, 0)
        usage_window = check_int("usage_window", usage_window, lo=1)
        rotation_trick = check_bool("rotation_trick", rotation_trick)
        kmeans_init = check_bool("kmeans_init", kmeans_init)
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema, self.decay, self.eps, self.l2_norm = ema, decay, eps, l2_norm
        self.dead_code_threshold, self.usage_window = dead_code_threshold, usage_window
        kmeans_iters = check_int("kmeans_iters", kmeans_iters)
        if kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {kmeans_iters}")
        self.rotation_trick, self.kmeans_init, self.kmeans_iters = rotation_trick, kmeans_init, kmeans_iters
        init = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)  # uniform(+-1/K)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_cluster_size", torch.ones(num_codes))
            self.register_buffer("ema_embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("hits", torch.zeros(num_codes))  # code hits in the current window
        self.register_buffer("last_hits", torch.zeros(num_codes))  # hits over the last complete window
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_restarted", torch.zeros((), dtype=torch.long))  # codes restarted so far
        if kmeans_init:  # only then, so that the state dicts of the other quantizers keep their keys
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, ema={self.ema}, "
                f"l2_norm={self.l2_norm}, dead_code_threshold={self.dead_code_threshold}, "
                f"rotation_trick={self.rotation_trick}, kmeans_init={self.kmeans_init}")

    # -- lookup -------------------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The code vectors as the lookup sees them ``(K, D)`` (unit length with ``l2_norm``)."""
        if not self.l2_norm:
            return self.codebook
        # in training, normalise a copy: a dead-code restart later in the same forward rewrites the codebook in
        # place, and the backward of normalize must see the vectors it normalised
        return F.normalize(self.codebook.clone() if self.training else self.codebook, dim=1)

    def lookup(self, flat: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices ``(N,)`` of vectors ``(N, D)`` (normalised first with ``l2_norm``)."""
        if self.l2_norm:
            flat = F.normalize(flat, dim=1)
        return Fq.vq_lookup(flat.detach(), self.codes().detach())

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Index map ``(B, h, w)`` of a non-empty, finite feature map ``(B, D, h, w)`` of any floating dtype (the
        lookup runs in the codebook's); ``ValueError`` otherwise, ``TypeError`` for a non-tensor."""
        _check_map(z, self.dim, "VectorQuantizer")
        check_finite("z", z)
        b, _, h, w = z.shape
        return self.lookup(_flatten(z.to(self.codebook.dtype))).view(b, h, w)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Feature map ``(B, D, h, w)`` of a non-empty integer index map ``(B, h, w)`` of codes in
        ``[0, num_codes)`` (``ValueError`` otherwise; ``TypeError`` for a non-tensor)."""
        check_ids("indices", indices, self.num_codes, ("B", "h", "w"), dtype=None)
        return Fq._embed_indices(indices, self.codes())  # (B, D, h, w)

    # -- training -----------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``(B, dim, h, w)`` of any floating dtype (cast to the codebook's, as :meth:`encode`
        does; ``z_q`` has the codebook's dtype) (see the class docstring); in training mode, also update the
        codebook statistics.

        Raises:
            TypeError: ``z`` is not a tensor.
            ValueError: ``z`` is not a non-empty float ``(B, dim, h, w)`` map, or (training mode only: one host
                sync) holds a NaN or infinity, which would spoil the codebook.
        """
        _check_map(z, self.dim, "VectorQuantizer")
        _check_training_input(self, "z", z)
        z = z.to(self.codebook.dtype)  # a no-op when the dtypes agree
        b, _, h, w = z.shape
        flat = _flatten(z)  # (N, D)
        if self.l2_norm:
            flat = F.normalize(flat, dim=1)
        if self.training and self.kmeans_init and not bool(self.initialized):
            self.init_codebook(flat.detach())
        codes = self.codes()  # (K, D)
        idx = Fq.vq_lookup(flat.detach(), codes.detach())  # (N,)
        z_q = codes[idx]  # (N, D); carries the codebook gradient unless EMA
        if self.ema:
            loss = self.beta * F.mse_loss(flat, z_q.detach())
        else:
            loss = Fq.vq_loss(flat, z_q, self.beta)
        out = Fq.rotation_trick(flat, z_q) if self.rotation_trick else Fq.straight_through(flat, z_q)
        if self.training:
            if self.ema:
                self.ema_step(flat.detach(), idx)
            self.record(idx, flat.detach())
        return QuantizerOutput(_unflatten(out, b, h, w), idx.view(b, h, w), loss)

    @torch.no_grad()
    def init_codebook(self, flat: torch.Tensor) -> None:
        """Set the codebook to k-means centroids of the vectors ``(N, D)`` (under ``torchrun``, of every
        process's, in rank order, so every process computes the same codebook) and mark it initialised.
        Uses torch's global random generator for the starting centroids."""
        flat = ddp.gather_in_rank_order(flat)  # (world * N, D)
        centroids = Fq.kmeans(flat.to(self.codebook.dtype), self.num_codes, self.kmeans_iters)  # (K, D)
        self.codebook.data.copy_(centroids)
        if self.ema:
            self.ema_cluster_size.fill_(1.0)
            self.ema_embed_sum.copy_(centroids)
        if self.kmeans_init:
            self.initialized.fill_(True)

    @torch.no_grad()
    def ema_step(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        """Move the codebook to the running means of the vectors ``(N, D)`` assigned to it by ``idx`` ``(N,)``
        (``ema=True``); under ``torchrun``, of every process's vectors."""
        if not self.ema:
            raise RuntimeError("ema_step needs a quantizer built with ema=True")
        flat, idx = ddp.gather_in_rank_order(flat), ddp.gather_in_rank_order(idx)  # (world * N, D), (world * N,)
        size, total, codebook = Fq._ema_update(self.ema_cluster_size, self.ema_embed_sum, flat, idx,
                                               self.decay, self.eps)  # idx from the lookup: no check needed
        self.ema_cluster_size.copy_(size)
        self.ema_embed_sum.copy_(total)
        self.codebook.copy_(codebook)

    @torch.no_grad()
    def record(self, idx: torch.Tensor, candidates: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Count the hits ``idx`` ``(N,)``; at the end of a window, publish usage and restart dead codes
        from ``candidates``: the data vectors of this batch, ``(M, D)`` or a list of ``(M_i, D)`` pieces.

        Under ``torchrun`` the hits are summed over processes and each piece is gathered from every process
        in rank order before the pieces are concatenated, so the candidates are those of the global batch in
        the order one process would have them."""
        self.hits += ddp.sum_across_processes(torch.bincount(idx, minlength=self.num_codes).to(self.hits.dtype))
        self.window_steps += 1
        if int(self.window_steps) < self.usage_window:
            return
        self.last_hits.copy_(self.hits)
        if self.dead_code_threshold > 0:
            pieces = [candidates] if isinstance(candidates, torch.Tensor) else candidates
            self.restart_dead_codes(self.hits, torch.cat([ddp.gather_in_rank_order(p) for p in pieces]))
        self.hits.zero_()
        self.window_steps.zero_()

    @torch.no_grad()
    def restart_dead_codes(self, counts: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Replace codes with ``counts < dead_code_threshold`` by randomly chosen ``candidates`` ``(M, D)``.

        Returns the ``(K,)`` bool mask of restarted codes. Uses torch's global random generator."""
        shuffled = candidates[torch.randperm(candidates.shape[0], device=candidates.device)]  # (M, D)
        new, dead = Fq.dead_code_restart(self.codebook.detach(), counts, shuffled, self.dead_code_threshold)
        self.codebook.data.copy_(new)
        if self.ema:
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = new[dead]
        self.num_restarted += int(dead.sum())
        return dead

    def usage(self) -> dict[str, float]:
        """``fraction_used`` and ``perplexity`` of the codes hit during the last complete training window
        (the current, incomplete one before the first window closes)."""
        counts = self.last_hits if bool(self.last_hits.any()) else self.hits
        fraction, perplexity = Fq.usage_from_counts(counts)
        return {"fraction_used": fraction, "perplexity": perplexity}


class ResidualVQ(nn.Module):
    """RQ-VAE's residual quantizer: ``depth`` codes per position, level ``d`` coding ``z - z_hat_{d-1}``.

    ``forward(z)``: ``z`` ``(B, dim, h, w)`` -> :class:`QuantizerOutput` with ``indices`` ``(B, depth, h, w)``.
    With ``shared_codebook=True`` every level uses one codebook. The loss averages over levels
    ``beta * mean((z - sg[z_hat_d])^2) + mean((z_hat_d - sg[z])^2)`` (the second term only without EMA),
    the cumulative form RQ-VAE and VAR use."""

    def __init__(
        self,
        num_codes: int,
        dim: int,
        depth: int = 4,
        shared_codebook: bool = False,
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        dead_code_threshold: float = 0.0,
        usage_window: int = 100,
    ) -> None:
        super().__init__()
        depth, beta = check_int("depth", depth, lo=1), check_number("beta", beta, 0)
        ema, shared_codebook = check_bool("ema", ema), check_bool("shared_codebook", shared_codebook)
        self.num_codes, self.dim, self.depth, self.beta, self.ema = num_codes, dim, depth, beta, ema
        self.shared_codebook = shared_codebook
        self.layers = nn.ModuleList(
            VectorQuantizer(num_codes, dim, beta, ema=ema, decay=decay, dead_code_threshold=dead_code_threshold,
                            usage_window=usage_window)
            for _ in range(1 if shared_codebook else depth)
        )

    def layer(self, d: int) -> VectorQuantizer:
        """The quantizer of level ``d``."""
        return self.layers[0 if self.shared_codebook else d]

    def codebooks(self) -> torch.Tensor:
        """All levels' codebooks ``(depth, K, D)`` (the same one repeated when shared)."""
        return torch.stack([self.layer(d).codes() for d in range(self.depth)])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``(B, dim, h, w)`` (see the class docstring); in training mode, also update the codebook
        statistics. Raises as :meth:`VectorQuantizer.forward` (and casts ``z`` to the codebooks' dtype as it does)."""
        _check_map(z, self.dim, "ResidualVQ")
        _check_training_input(self, "z", z)
        z = z.to(self.layers[0].codebook.dtype)  # a no-op when the dtypes agree
        b, _, h, w = z.shape
        flat = _flatten(z)  # (N, D)
        target = flat.detach()
        z_hat = torch.zeros_like(target)
        loss = flat.new_zeros(())
        seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.layers]
        indices = []
        for d in range(self.depth):
            layer = self.layer(d)
            rest = target - z_hat.detach()  # (N, D)
            idx = layer.lookup(rest)
            z_hat = z_hat + layer.codes()[idx]
            loss = loss + self.beta * F.mse_loss(z_hat.detach(), flat)
            if not self.ema:
                loss = loss + F.mse_loss(z_hat, target)
            seen[0 if self.shared_codebook else d].append((idx, rest))
            indices.append(idx.view(b, h, w))
        if self.training:
            for layer, pairs in zip(self.layers, seen):
                idx, rest = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
                if self.ema:
                    layer.ema_step(rest, idx)
                layer.record(idx, [p[1] for p in pairs])
        out = Fq.straight_through(flat, z_hat)
        return QuantizerOutput(_unflatten(out, b, h, w), torch.stack(indices, dim=1), loss / self.depth)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Index maps ``(B, depth, h, w)`` of a non-empty, finite feature map ``(B, D, h, w)`` of any floating
        dtype (the lookup runs in the codebooks'); ``ValueError`` otherwise, ``TypeError`` for a non-tensor."""
        _check_map(z, self.dim, "ResidualVQ")
        check_finite("z", z)
        b, _, h, w = z.shape
        codebooks = self.codebooks()  # (depth, K, D)
        idx, _ = Fq.residual_quantize(_flatten(z.to(codebooks.dtype)), codebooks)  # (B*h*w, depth)
        return idx.view(b, h, w, self.depth).permute(0, 3, 1, 2)  # (B, depth, h, w)

    def decode(self, indices: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Feature map ``(B, D, h, w)`` from ``(B, depth, h, w)`` integer indices in ``[0, num_codes)``, using the
        first ``depth`` levels (an integer in ``[1, depth]``; ``None``: all). ``ValueError`` for bad indices or
        ``depth``; ``TypeError`` for a non-tensor or a non-integer ``depth``."""
        check_ids("indices", indices, self.num_codes, ("B", self.depth, "h", "w"), dtype=None)
        n = self.depth if depth is None else check_int("depth", depth, lo=1, hi=self.depth)
        return sum(self.layer(d).decode(indices[:, d]) for d in range(n))

    def usage(self) -> dict[str, float]:
        """Mean over levels of :meth:`VectorQuantizer.usage`."""
        stats = [layer.usage() for layer in self.layers]
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}


class Phi(nn.Conv2d):
    """VAR's refinement of an upsampled code map: ``(1 - ratio) h + ratio conv3x3(h)``, same shape
    (PyTorch's default conv initialisation, as in VAR)."""

    def __init__(self, dim: int, ratio: float = 0.5) -> None:
        super().__init__(dim, dim, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` ``(B, dim, s, s)`` -> refined ``(B, dim, s, s)``."""
        return Fq.phi_refine(h, self.weight, self.bias, self.ratio)


class MultiScaleVQ(nn.Module):
    """VAR's multi-scale residual quantizer (``VectorQuantizer2`` in the VAR code).

    One codebook is shared by every scale. For scale ``k`` of side ``s_k``: the residual ``f - f_hat`` is
    area-downsampled to ``s_k``, quantized, the code map upsampled bicubically back to the full side,
    refined by ``phi`` and added to ``f_hat``. ``num_phi`` refinements are shared across scales (scale ``k``
    picks one with :func:`~ar_course.tokenizers.functional.phi_index`); ``phi_ratio = 0`` turns them off.
    The last scale is the full map and skips the resampling.

    * ``forward(f)``: ``f`` ``(B, dim, H, H)`` with ``H == scales[-1]`` -> :class:`QuantizerOutput` whose
      ``indices`` is a list of ``(B, s_k, s_k)``. Loss: VAR's average over the partial sums ``f_hat_k``
      after every scale of ``beta*|sg[f_hat_k] - f|^2 + |f_hat_k - sg[f]|^2`` (``loss="every_scale"``), plus
      ``final_weight`` times that term for the complete reconstruction; or the complete reconstruction's term
      only (``loss="final"``). On MNIST at 1,500 steps (``benchmarks/bench_msvq_loss.py``) VAR's plain
      average leaves the full reconstruction 2.1 dB behind single-scale VQ (25.58 vs 27.67 dB held-out PSNR);
      ``"final"`` comes within 0.5 dB but its partial sums stop improving scale by scale (PSNR falls at scales
      2 and 3), which coarse-to-fine generation relies on; ``final_weight`` 32 (what
      ``VQVAEConfig.msvq_final_weight`` ships) comes within 0.8 dB with every partial sum improving.
    * ``encode`` / ``decode`` / ``teacher_forcing_inputs``, and ``accumulate`` / ``next_input`` for
      generating one scale at a time.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        scales: Sequence[int] = (1, 2, 3, 4, 6, 8),
        beta: float = 0.25,
        phi_ratio: float = 0.5,
        num_phi: int = 4,
        dead_code_threshold: float = 0.0,
        usage_window: int = 100,
        loss: str = "every_scale",
        final_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.scales = Fq.scale_sides(scales)
        Fq.check_scales(self.scales, max(self.scales, default=0))
        num_phi = check_int("num_phi", num_phi, lo=1)
        beta, phi_ratio = check_number("beta", beta, 0), check_number("phi_ratio", phi_ratio, 0, 1)
        if not isinstance(loss, str) or loss not in MSVQ_LOSSES:
            raise ValueError(f"loss must be one of {MSVQ_LOSSES}, got {loss!r}")
        final_weight = check_number("final_weight", final_weight)
        if final_weight < 0 or (loss == "final" and final_weight != 0):
            raise ValueError(f"final_weight must be >= 0 and only adds to loss='every_scale', got {final_weight} "
                             f"with loss={loss!r}")
        self.loss, self.final_weight = loss, float(final_weight)
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.phi_ratio, self.num_phi = phi_ratio, num_phi
        self.quantizer = VectorQuantizer(num_codes, dim, beta, dead_code_threshold=dead_code_threshold,
                                         usage_window=usage_window)
        self.phis = nn.ModuleList(Phi(dim, phi_ratio) if phi_ratio != 0 else nn.Identity() for _ in range(num_phi))

    def extra_repr(self) -> str:
        return (f"scales={self.scales}, phi_ratio={self.phi_ratio}, num_phi={self.num_phi}, loss={self.loss!r}, "
                f"final_weight={self.final_weight}")

    @property
    def side(self) -> int:
        """Side of the full latent map (the last scale)."""
        return self.scales[-1]

    @property
    def num_tokens(self) -> int:
        """Tokens per image, ``sum(s_k^2)``."""
        return Fq.token_count(self.scales)

    def phi(self, k: int) -> nn.Module:
        """The refinement scale ``k`` uses."""
        return self.phis[Fq.phi_index(k, len(self.scales), self.num_phi)]

    def refinements(self) -> list[nn.Module]:
        """One refinement per scale (shared modules repeat)."""
        return [self.phi(k) for k in range(len(self.scales))]

    def _check_input(self, f: torch.Tensor) -> None:
        _check_map(f, self.dim, "MultiScaleVQ")
        if f.shape[-1] != f.shape[-2]:
            raise ValueError(f"MultiScaleVQ needs a square latent map, got {f.shape[-2]}x{f.shape[-1]}")
        Fq.check_scales(self.scales, f.shape[-1])

    def _check_indices(self, indices: Sequence[torch.Tensor], exact: bool) -> None:
        """A list of ``n`` (``== S`` if ``exact``, else ``1 <= n <= S``) non-empty integer maps ``(B, s_k, s_k)``
        with codes in ``[0, num_codes)`` and one batch size; ``TypeError`` for a non-sequence, else ``ValueError``."""
        if not isinstance(indices, (list, tuple)):
            raise TypeError(f"indices must be a list of index maps, one (B, s_k, s_k) per scale; got "
                            f"{type(indices).__name__}")
        n = len(indices)
        if n == 0 or n > len(self.scales) or (exact and n != len(self.scales)):
            raise ValueError(f"expected {'' if exact else 'up to '}{len(self.scales)} index maps, got {n}")
        B = indices[0].shape[0] if isinstance(indices[0], torch.Tensor) and indices[0].ndim else "B"
        for k, idx in enumerate(indices):
            check_ids(f"index map {k}", idx, self.num_codes, (B, self.scales[k], self.scales[k]), dtype=None)

    def forward(self, f: torch.Tensor) -> QuantizerOutput:
        """Quantize ``f`` ``(B, dim, H, H)`` scale by scale (see the class docstring); in training mode, also
        update the codebook statistics. Raises as :meth:`VectorQuantizer.forward` (and for a non-square map or
        one the scales do not fit; casts ``f`` to the codebook's dtype as it does)."""
        self._check_input(f)
        _check_training_input(self, "f", f)
        f = f.to(self.quantizer.codebook.dtype)  # a no-op when the dtypes agree
        b, c, side, _ = f.shape
        target = f.detach()
        rest = target.clone()
        f_hat = torch.zeros_like(target)
        loss = f.new_zeros(())
        indices, hits, candidates = [], [], []
        for k, s in enumerate(self.scales):
            r = _flatten(Fq.downsample_area(rest, s))  # (B*s*s, C)
            idx = self.quantizer.lookup(r)  # (B*s*s,)
            z_k = _unflatten(self.quantizer.codebook[idx], b, s, s)  # (B, C, s, s)
            h = self.phi(k)(Fq.upsample_bicubic(z_k, side))  # (B, C, H, H)
            f_hat = f_hat + h
            rest = rest - h.detach()
            if self.loss == "every_scale":
                loss = loss + (self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, target)) / len(self.scales)
            indices.append(idx.view(b, s, s))
            hits.append(idx)
            candidates.append(r)
        final = self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, target)
        if self.loss == "final":
            loss = final
        elif self.final_weight:
            loss = loss + self.final_weight * final
        if self.training:
            self.quantizer.record(torch.cat(hits), candidates)
        return QuantizerOutput(Fq.straight_through(f, f_hat), indices, loss)

    def encode(self, f: torch.Tensor) -> list[torch.Tensor]:
        """One index map ``(B, s_k, s_k)`` per scale for a non-empty, finite feature map ``(B, D, H, H)`` of any
        floating dtype (the lookup runs in the codebook's); ``ValueError`` otherwise, ``TypeError`` for a
        non-tensor."""
        self._check_input(f)
        check_finite("f", f)
        codebook = self.quantizer.codebook
        return Fq.multiscale_encode(f.to(codebook.dtype), codebook, self.scales, self.refinements())

    def accumulate(self, f_hat: torch.Tensor | None, k: int, indices_k: torch.Tensor) -> torch.Tensor:
        """``f_hat + phi_k(upsample(codes of indices_k))``: add scale ``k`` ``(B, s_k, s_k)`` to ``f_hat``
        ``(B, D, H, H)`` (``None`` means zeros). ``ValueError`` for a ``k`` outside ``[0, S)``, bad indices or an
        ``f_hat`` of another shape; ``TypeError`` for a non-integer ``k`` or non-tensor indices."""
        k = check_int("k", k, lo=0, hi=len(self.scales) - 1)
        s = self.scales[k]
        check_ids(f"indices of scale {k}", indices_k, self.num_codes, ("B", s, s), dtype=None)
        want = (indices_k.shape[0], self.dim, self.side, self.side)
        if f_hat is not None and (not isinstance(f_hat, torch.Tensor) or tuple(f_hat.shape) != want):
            raise ValueError(f"f_hat must be None or a {want} tensor, got "
                             f"{tuple(f_hat.shape) if isinstance(f_hat, torch.Tensor) else type(f_hat).__name__}")
        return self._accumulate(f_hat, k, indices_k)

    def _accumulate(self, f_hat: torch.Tensor | None, k: int, indices_k: torch.Tensor) -> torch.Tensor:
        """:meth:`accumulate` on checked input."""
        codes = Fq._embed_indices(indices_k, self.quantizer.codes())  # (B, D, s, s), indices checked
        h = self.phi(k)(Fq.upsample_bicubic(codes, self.side))  # (B, D, H, H)
        return h if f_hat is None else f_hat + h

    def next_input(self, f_hat: torch.Tensor, k: int) -> torch.Tensor:
        """``f_hat`` ``(B, D, H, H)`` after scale ``k`` area-downsampled to scale ``k + 1``: what the VAR
        transformer reads to predict scale ``k + 1``. Returns ``(B, D, s_{k+1}, s_{k+1})``.

        Raises:
            TypeError: ``f_hat`` is not a tensor or ``k`` is not an integer.
            ValueError: ``k`` outside ``[0, S - 2]``, or ``f_hat`` not a non-empty float ``(B, D, H, H)`` map of
                this quantizer's ``D`` and full side ``H`` (no values read).
        """
        if len(self.scales) < 2:
            raise ValueError(f"next_input needs at least two scales, got scales {self.scales}")
        k = check_int("k", k, lo=0, hi=len(self.scales) - 2)
        want = f"(B, {self.dim}, {self.side}, {self.side})"
        if not isinstance(f_hat, torch.Tensor):
            raise TypeError(f"f_hat must be a float {want} tensor, got {type(f_hat).__name__}")
        if (f_hat.ndim != 4 or tuple(f_hat.shape[1:]) != (self.dim, self.side, self.side)
                or not f_hat.is_floating_point() or f_hat.shape[0] == 0):
            raise ValueError(f"f_hat must be a non-empty float {want} tensor (the full side), got "
                             f"{tuple(f_hat.shape)} {f_hat.dtype}")
        return Fq.downsample_area(f_hat, self.scales[k + 1])

    def decode(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """``f_hat`` ``(B, D, H, H)`` from the index maps of the first ``n <= S`` scales (all of them
        reconstructs the input; fewer gives the coarse-to-fine partial sums). ``ValueError`` for maps of the
        wrong number, shape, dtype, batch size or codes; ``TypeError`` when ``indices`` is not a list."""
        self._check_indices(indices, exact=False)
        f_hat = None
        for k, idx in enumerate(indices):
            f_hat = self._accumulate(f_hat, k, idx)
        return f_hat

    def teacher_forcing_inputs(self, indices: Sequence[torch.Tensor],
                               flatten: bool = False) -> list[torch.Tensor] | torch.Tensor:
        """For ``k = 0 .. S-2`` the cumulative ``f_hat`` after scale ``k`` area-downsampled to scale ``k+1``:
        a list of ``(B, D, s_{k+1}, s_{k+1})``, or with ``flatten=True`` one ``(B, num_tokens - s_0^2, D)`` tensor
        (``num_tokens - 1`` when the first scale is 1, as in VAR) in VAR's token order (scale by scale,
        row-major)."""
        self._check_indices(indices, exact=True)
        maps = Fq.teacher_forcing_inputs(indices, self.quantizer.codebook, self.refinements())
        if not flatten:
            return maps
        if not maps:  # a single scale: nothing to feed
            return self.quantizer.codebook.new_zeros(indices[0].shape[0], 0, self.dim)
        return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)  # (B, L - s_0^2, D)

    def usage(self) -> dict[str, float]:
        """Usage of the shared codebook over the last training window, all scales together."""
        return self.quantizer.usage()
