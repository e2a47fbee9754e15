"""Pure functions of vector quantization that the modules in :mod:`ar_course.tokenizers.quantizers` are built
from; most of chapter 01's exercises are checked against them, so the package and the exercises cannot drift.

Every function here is stateless (it never modifies its inputs) and works on any device.

Shapes use ``N`` for a number of vectors, ``D`` (or ``C``) for their dimension, ``K`` for the number of codes,
``B`` for a batch of feature maps ``(B, C, H, W)`` and ``s`` for the side of one square scale.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ar_course.utils import check_finite, check_ids, check_int, check_number

Refinement = Callable[[torch.Tensor], torch.Tensor]


def _check_vectors(z: torch.Tensor, codebook: torch.Tensor) -> None:
    if z.ndim != 2 or codebook.ndim != 2:
        raise ValueError(f"expected z (N, D) and codebook (K, D), got shapes {tuple(z.shape)} and "
                         f"{tuple(codebook.shape)}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z has dimension {z.shape[1]} but the codes have dimension {codebook.shape[1]}")
    if codebook.shape[0] == 0:
        raise ValueError("the codebook is empty")


# --------------------------------------------------------------------------------------------------------
# single-codebook VQ (VQ-VAE)


def vq_lookup(z: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Index of the nearest code (squared Euclidean distance) for every row of ``z``.

    ``z``: ``(N, D)``; ``codebook``: ``(K, D)``. Returns ``(N,)`` int64. Ties go to the lowest index. The
    distances ``|z|^2 - 2 z.e + |e|^2`` are computed for ``chunk_size`` rows at a time, so memory stays at
    ``chunk_size * K`` floats however large ``N`` is. The expansion loses distance gaps smaller than float32's
    resolution of ``|z|^2``: latents and codes far from the origin compared with their spread can get a farther
    code (centre them first, or search in float64). A ``z`` of another dtype is cast to the codebook's. The values
    are not read (the quantizers call this in training without a host sync): a row holding NaN gets index 0, so
    callers that cannot rule NaN out check ``z`` first, as the quantizers' ``encode`` does.

    Raises:
        ValueError: shapes that do not match (``z (N, D)``, ``codebook (K, D)``, ``K >= 1``), ``chunk_size < 1``.
        TypeError: ``chunk_size`` is not an integer.
    """
    _check_vectors(z, codebook)
    chunk_size = check_int("chunk_size", chunk_size, lo=1)
    z = z.to(codebook.dtype)  # a no-op when the dtypes agree
    e_sq = codebook.pow(2).sum(1)  # (K,)
    out = []
    for chunk in z.split(chunk_size):
        d = chunk.pow(2).sum(1, keepdim=True) - 2 * chunk @ codebook.t() + e_sq  # (n, K)
        out.append(d.argmin(dim=1))  # argmin returns the first minimum: ties go to the lowest index
    if not out:
        return torch.zeros(0, dtype=torch.long, device=z.device)
    return torch.cat(out)


def straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of ``z_q`` with the gradient of the identity to ``z``.

    ``z``, ``z_q``: same shape. Returns ``z + (z_q - z).detach()``: the decoder sees the quantized vectors,
    the encoder receives the decoder's gradient unchanged, and the codebook receives none from this path."""
    if z.shape != z_q.shape:
        raise ValueError(f"z and z_q must have the same shape, got {tuple(z.shape)} and {tuple(z_q.shape)}")
    return z + (z_q - z).detach()


def vq_loss(z: torch.Tensor, z_q: torch.Tensor, beta: float = 0.25) -> torch.Tensor:
    """VQ-VAE's codebook + commitment loss, a scalar.

    ``mean((z_q - sg[z])^2) + beta * mean((z - sg[z_q])^2)``: the first term moves the codes towards the
    encoder outputs, the second (weighted by ``beta``) keeps the encoder close to its codes."""
    if z.shape != z_q.shape:
        raise ValueError(f"z and z_q must have the same shape, got {tuple(z.shape)} and {tuple(z_q.shape)}")
    codebook_loss = F.mse_loss(z_q, z.detach())
    commitment = F.mse_loss(z, z_q.detach())
    return codebook_loss + beta * commitment


def ema_update(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    z: torch.Tensor,
    indices: torch.Tensor,
    decay: float = 0.99,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One exponential-moving-average codebook update (VQ-VAE, appendix A.1) with Laplace smoothing.

    ``cluster_size``: ``(K,)`` running count per code; ``embed_sum``: ``(K, D)`` running sum of the vectors
    assigned to each code; ``z``: ``(N, D)`` this batch's vectors; ``indices``: ``(N,)`` their codes.

    ``N_k <- decay N_k + (1 - decay) n_k`` and ``m_k <- decay m_k + (1 - decay) sum_{i: idx_i = k} z_i``;
    the smoothed counts ``(N_k + eps) / (n + K eps) * n`` (``n = sum_k N_k``) keep unused codes from dividing
    by zero, and the new codebook is ``m_k / smoothed N_k``. Returns ``(cluster_size, embed_sum, codebook)``,
    all new tensors. With ``decay = 0`` this is one k-means step.

    Raises:
        TypeError: ``decay`` or ``eps`` is not a number, ``indices`` is not a tensor.
        ValueError: shapes that do not match, ``decay`` outside ``[0, 1)``, ``eps < 0``, or ``indices`` not an
            integer ``(N,)`` tensor of codes in ``[0, K)`` (read with one host sync on CUDA).
    """
    decay = check_number("decay", decay, 0, 1, hi_open=True)
    eps = check_number("eps", eps, 0)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a (N,) integer tensor, got {type(indices).__name__}")
    _check_ema_shapes(cluster_size, embed_sum, z, indices)
    check_ids("indices", indices, cluster_size.shape[0], (z.shape[0],), dtype=None, allow_empty=True)
    return _ema_update(cluster_size, embed_sum, z, indices, decay, eps)


def _check_ema_shapes(cluster_size: torch.Tensor, embed_sum: torch.Tensor, z: torch.Tensor,
                      indices: torch.Tensor) -> None:
    """The shapes :func:`ema_update` needs (no values read)."""
    if cluster_size.ndim != 1 or embed_sum.ndim != 2 or embed_sum.shape[0] != cluster_size.shape[0]:
        raise ValueError(f"expected cluster_size (K,) and embed_sum (K, D), got {tuple(cluster_size.shape)} "
                         f"and {tuple(embed_sum.shape)}")
    _check_vectors(z, embed_sum)
    if indices.shape != (z.shape[0],):
        raise ValueError(f"indices must have shape ({z.shape[0]},), got {tuple(indices.shape)}")


def _ema_update(cluster_size: torch.Tensor, embed_sum: torch.Tensor, z: torch.Tensor, indices: torch.Tensor,
                decay: float, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`ema_update` on checked input (the quantizers' training step: no values read, no host sync)."""
    k = cluster_size.shape[0]
    onehot = F.one_hot(indices.long(), k).to(z.dtype)  # (N, K)
    new_size = decay * cluster_size + (1 - decay) * onehot.sum(0)  # (K,)
    new_sum = decay * embed_sum + (1 - decay) * onehot.t() @ z  # (K, D)
    n = new_size.sum()
    smoothed = (new_size + eps) / (n + k * eps) * n  # (K,)
    return new_size, new_sum, new_sum / smoothed[:, None]


def dead_code_restart(
    codebook: torch.Tensor, counts: torch.Tensor, candidates: torch.Tensor, threshold: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the codes used fewer than ``threshold`` times by vectors from the data.

    ``codebook``: ``(K, D)``; ``counts``: ``(K,)`` how often each code was picked over the last window;
    ``candidates``: ``(M, D)`` data vectors in random order. The dead codes are those with
    ``counts < threshold``; the j-th dead code (in increasing index order) becomes ``candidates[j % M]``.
    Returns ``(new_codebook, dead)`` with ``dead`` a ``(K,)`` bool mask; the input is left unchanged."""
    _check_vectors(candidates, codebook)
    if counts.shape != (codebook.shape[0],):
        raise ValueError(f"counts must have shape ({codebook.shape[0]},), got {tuple(counts.shape)}")
    if candidates.shape[0] == 0:
        raise ValueError("candidates is empty")
    dead = counts < threshold  # (K,)
    new = codebook.clone()
    n_dead = int(dead.sum())
    if n_dead:
        pick = torch.arange(n_dead, device=codebook.device) % candidates.shape[0]
        new[dead] = candidates[pick].to(new.dtype)
    return new, dead


def usage_from_counts(counts: torch.Tensor) -> tuple[float, float]:
    """How much of a codebook per-code counts ``(K,)`` show in use: ``(fraction_used, perplexity)``.

    ``fraction_used`` is the fraction of the ``K`` codes counted at least once; ``perplexity`` is
    ``exp(entropy)`` of the empirical code distribution (natural log), the effective number of codes: 1 when
    a single code is used, ``K`` when all are used equally often. All-zero counts give ``(0.0, 0.0)``.

    Raises:
        TypeError: ``counts`` is not a tensor.
        ValueError: ``counts`` is not a non-empty ``(K,)`` tensor, or holds a negative or non-finite count.
    """
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"counts must be a non-empty (K,) tensor, got {type(counts).__name__}")
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty (K,) tensor, got shape {tuple(counts.shape)}")
    bad = ~(counts.double() >= 0) | ~torch.isfinite(counts.double())  # NaN fails `>= 0`
    if bool(bad.any()):
        raise ValueError(f"counts must be finite and >= 0, got {float(counts[bad][0])}")
    total = counts.double().sum()
    if total <= 0:
        return 0.0, 0.0
    p = counts.double() / total
    p = p[p > 0]
    entropy = -(p * p.log()).sum()
    return float((counts > 0).sum()) / counts.numel(), float(entropy.exp())


# --------------------------------------------------------------------------------------------------------
# residual quantization (RQ-VAE)


def residual_quantize(z: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``z`` with a stack of codebooks, each one coding what the previous ones left over.

    ``z``: ``(N, D)``; ``codebooks``: ``(depth, K, D)`` (pass the same codebook ``depth`` times for a shared
    one). Level ``d`` quantizes the residual ``z - z_hat_{d-1}`` and adds its code to ``z_hat``.
    Returns ``(indices (N, depth) int64, z_hat (N, D))``."""
    if codebooks.ndim != 3:
        raise ValueError(f"codebooks must be (depth, K, D), got shape {tuple(codebooks.shape)}")
    _check_vectors(z, codebooks[0])
    z_hat = torch.zeros_like(z)
    indices = []
    for codebook in codebooks:
        idx = vq_lookup(z - z_hat, codebook)  # (N,)
        z_hat = z_hat + codebook[idx]
        indices.append(idx)
    return torch.stack(indices, dim=1), z_hat  # (N, depth), (N, D)


# --------------------------------------------------------------------------------------------------------
# multi-scale residual quantization (VAR)


def scale_sides(scales: Sequence[int]) -> tuple[int, ...]:
    """``scales`` (a tuple or list, as JSON gives it back) as a tuple of ints, each ``>= 1``.

    Raises:
        TypeError: ``scales`` is a string or not a sequence, or a side is not an integer (``2.5``, even ``2.0``).
        ValueError: a side ``< 1``: ``scale must be an integer >= 1, got -2``.
    """
    if isinstance(scales, (str, bytes)) or not isinstance(scales, (Sequence, torch.Tensor)):
        raise TypeError(f"scales must be a sequence of integers >= 1, got {scales!r} ({type(scales).__name__})")
    return tuple(check_int("scale", s, lo=1) for s in scales)


def token_count(scales: Sequence[int]) -> int:
    """Tokens in a multi-scale pyramid: ``sum(s * s)`` (VAR's 1,2,3,4,5,6,8,10,13,16 gives 680). Raises as
    :func:`scale_sides`."""
    return sum(s**2 for s in scale_sides(scales))


def phi_refine(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ratio: float = 0.5) -> torch.Tensor:
    """VAR's refinement ``phi(h) = (1 - r) h + r conv3x3(h)`` of an upsampled code map.

    ``h``: ``(B, C, H, W)``; ``weight``: ``(C, C, 3, 3)``; ``bias``: ``(C,)`` or None. Zero padding keeps the size."""
    return h * (1 - ratio) + F.conv2d(h, weight, bias, padding=1) * ratio


def phi_index(k: int, num_scales: int, num_phi: int) -> int:
    """Which of ``num_phi`` shared refinements scale ``k`` (0-based, of ``num_scales``) uses.

    The refinements sit at ticks ``linspace(1/(3n), 1 - 1/(3n), n)`` on [0, 1] and scale ``k`` sits at
    ``k / (num_scales - 1)`` (0 when there is one scale); the nearest tick wins. For VAR's default ``n = 4``
    these are VAR's ticks (its code uses ``1/(2n)`` margins for other ``n``). Distances are float64 as in
    VAR's NumPy code, so its exact ties (scales 2 and 7 of its 10) fall the same way: 10 scales map to
    ``0,0,1,1,1,2,2,3,3,3``.

    Raises:
        TypeError: an argument that is not an integer.
        ValueError: ``num_phi < 1``, ``num_scales < 1`` or ``k`` outside ``[0, num_scales)``.
    """
    k, num_scales, num_phi = check_int("k", k), check_int("num_scales", num_scales), check_int("num_phi", num_phi)
    if num_phi < 1 or num_scales < 1 or not 0 <= k < num_scales:
        raise ValueError(f"need num_phi >= 1, num_scales >= 1 and 0 <= k < num_scales, got k={k}, "
                         f"num_scales={num_scales}, num_phi={num_phi}")
    at = k / (num_scales - 1) if num_scales > 1 else 0.0
    margin = 1 / (3 * num_phi)
    ticks = torch.linspace(margin, 1 - margin, num_phi, dtype=torch.float64)
    return int((ticks - at).abs().argmin())


def _check_pyramid(f: torch.Tensor, codebook: torch.Tensor, scales: Sequence[int], phis: Sequence[Refinement]) -> int:
    if f.ndim != 4:
        raise ValueError(f"f must be a feature map (B, C, H, W), got shape {tuple(f.shape)}")
    if f.shape[-1] != f.shape[-2]:
        raise ValueError(f"multi-scale quantization needs a square map, got {f.shape[-2]}x{f.shape[-1]}")
    if codebook.ndim != 2 or codebook.shape[1] != f.shape[1]:
        raise ValueError(f"f has {f.shape[1]} channels but the codebook is {tuple(codebook.shape)}")
    side = f.shape[-1]
    check_scales(scales, side)
    if len(phis) != len(scales):
        raise ValueError(f"need one refinement per scale: {len(scales)} scales, {len(phis)} refinements")
    return side


def check_scales(scales: Sequence[int], side: int) -> None:
    """Raise ``ValueError`` unless every scale lies in ``[1, side]``, none is smaller than the one before (coarse
    to fine; a repeated side is allowed) and the last one equals ``side``; ``TypeError`` for a side that is not
    an integer (:func:`scale_sides`)."""
    scale_sides(scales)
    if len(scales) == 0:
        raise ValueError("scales is empty")
    for s in scales:
        if not 1 <= int(s) <= side:
            raise ValueError(f"scale {s} does not fit a {side}x{side} latent map (scales {tuple(scales)})")
    if int(scales[-1]) != side:
        raise ValueError(f"the last scale must equal the latent side {side}, got scales {tuple(scales)}")
    if any(int(a) > int(b) for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales must not decrease (coarse to fine), got scales {tuple(scales)}")


def upsample_bicubic(h: torch.Tensor, side: int) -> torch.Tensor:
    """Bicubic upsampling of a code map ``(B, C, s, s)`` to ``(B, C, side, side)``; identity when s == side."""
    return h if h.shape[-1] == side else F.interpolate(h, size=(side, side), mode="bicubic")


def downsample_area(f: torch.Tensor, s: int) -> torch.Tensor:
    """Area (average-pooling) downsampling of ``(B, C, H, H)`` to ``(B, C, s, s)``; identity when s == H.
    ``ValueError`` for ``f`` that is not 4-d or ``s`` outside ``[1, H]``, ``TypeError`` for a non-integer ``s``."""
    if not isinstance(f, torch.Tensor) or f.ndim != 4:
        got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"f must be a (B, C, H, H) tensor, got {got}")
    s = check_int("s", s, lo=1, hi=f.shape[-1])
    return f if f.shape[-1] == s else F.interpolate(f, size=(s, s), mode="area")


def embed_indices(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The codes ``codebook`` ``(K, C)`` of an index map ``(B, s, s)`` as a feature map ``(B, C, s, s)``.

    Raises:
        TypeError: ``indices`` is not a tensor.
        ValueError: ``codebook`` is not ``(K, C)``, or ``indices`` is not a 3-d integer map of codes in ``[0, K)``
            (read with one host sync on CUDA).
    """
    if not isinstance(codebook, torch.Tensor) or codebook.ndim != 2:
        got = tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__
        raise ValueError(f"codebook must be a (K, C) tensor, got {got}")
    check_ids("indices", indices, codebook.shape[0], ("B", "s", "s"), dtype=None)
    return _embed_indices(indices, codebook)


def _embed_indices(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """:func:`embed_indices` on indices known to be valid (no values read; any integer dtype: torch indexes
    with int64, and would read a uint8 tensor as a mask)."""
    return codebook[indices.long()].permute(0, 3, 1, 2)  # (B, s, s, C) -> (B, C, s, s)


def multiscale_encode(
    f: torch.Tensor, codebook: torch.Tensor, scales: Sequence[int], phis: Sequence[Refinement]
) -> list[torch.Tensor]:
    """VAR's multi-scale residual quantization of a feature map ``f`` ``(B, C, H, H)``.

    ``codebook``: ``(K, C)``, shared by every scale; ``scales``: sides ``s_1 <= ... <= s_S = H``; ``phis``: one
    refinement per scale. At scale ``k`` the residual ``f - f_hat`` is area-downsampled to ``s_k``, each
    vector is replaced by its nearest code, the code map is upsampled bicubically to ``H``, refined by
    ``phis[k]`` and added to ``f_hat``. Returns one ``(B, s_k, s_k)`` int64 index map per scale."""
    side = _check_pyramid(f, codebook, scales, phis)
    b, c = f.shape[:2]
    f_hat = torch.zeros_like(f)
    out = []
    for s, phi in zip(scales, phis):
        rest = downsample_area(f - f_hat, s)  # (B, C, s, s)
        idx = vq_lookup(rest.permute(0, 2, 3, 1).reshape(-1, c), codebook).view(b, s, s)  # (B, s, s)
        f_hat = f_hat + phi(upsample_bicubic(_embed_indices(idx, codebook), side))
        out.append(idx)
    return out


def check_index_maps(indices: Sequence[torch.Tensor], codebook: torch.Tensor, phis: Sequence[Refinement]) -> None:
    """Raise ``ValueError`` unless ``indices`` is a non-empty list of square ``(B, s, s)`` maps, one refinement
    per map in ``phis``, and ``codebook`` is ``(K, C)``."""
    if len(indices) == 0 or any(i.ndim != 3 or i.shape[-1] != i.shape[-2] for i in indices):
        raise ValueError("indices must be a non-empty list of square (B, s, s) index maps")
    if len(phis) != len(indices):
        raise ValueError(f"need one refinement per scale: {len(indices)} scales, {len(phis)} refinements")
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be (K, C), got shape {tuple(codebook.shape)}")


def teacher_forcing_inputs(
    indices: Sequence[torch.Tensor], codebook: torch.Tensor, phis: Sequence[Refinement]
) -> list[torch.Tensor]:
    """What VAR's transformer reads when predicting scale ``k + 1`` from the ground-truth scales ``<= k``.

    For ``k = 0 .. S-2``: the cumulative ``f_hat`` after scale ``k`` (the sum of the refined, upsampled codes
    of scales ``0 .. k``), area-downsampled to the side of scale ``k + 1``. Returns ``S - 1`` maps
    ``(B, C, s_{k+1}, s_{k+1})`` (the first scale is predicted from the class token alone, so it has no entry)."""
    check_index_maps(indices, codebook, phis)
    side = indices[-1].shape[-1]
    f_hat = 0
    out = []
    for k in range(len(indices) - 1):
        f_hat = f_hat + phis[k](upsample_bicubic(_embed_indices(indices[k], codebook), side))
        out.append(downsample_area(f_hat, indices[k + 1].shape[-1]))
    return out


# --------------------------------------------------------------------------------------------------------
# the rotation trick and k-means initialisation (VQ)


def rotation_trick(z: torch.Tensor, z_q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The value of ``z_q`` with the gradient of ``z -> sg[lambda R] z``, where ``R`` is the rotation taking
    the direction of ``z`` to that of ``z_q`` and ``lambda = |z_q| / |z|`` ("Restructuring Vector Quantization
    with the Rotation Trick").

    ``z``, ``z_q``: ``(N, D)``. With ``u = z/|z|``, ``q = z_q/|z_q|`` and ``r = (u + q) / |u + q|``,
    ``R = I - 2 r r^T + 2 q u^T`` (a Householder reflection about ``u + q`` composed with one about ``q``),
    applied without forming ``R``: ``R z = z - 2 r (r.z) + 2 q (u.z)``. ``R`` and ``lambda`` are constants for
    autograd, so the encoder receives ``lambda R^T g`` for an upstream gradient ``g`` and the codebook
    receives nothing from this path. The returned value is exactly ``z_q`` (the rotated vector only carries
    the gradient)."""
    if z.shape != z_q.shape or z.ndim != 2:
        raise ValueError(f"z and z_q must be (N, D) of one shape, got {tuple(z.shape)} and {tuple(z_q.shape)}")
    with torch.no_grad():
        z_norm = z.norm(dim=1, keepdim=True).clamp_min(eps)  # (N, 1)
        q_norm = z_q.norm(dim=1, keepdim=True)  # (N, 1)
        u, q = z / z_norm, z_q / q_norm.clamp_min(eps)  # (N, D) each
        r = F.normalize(u + q, dim=1, eps=eps)  # (N, D)
        scale = q_norm / z_norm  # (N, 1)
    rotated = z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * q * (u * z).sum(1, keepdim=True)  # (N, D): R z
    moved = scale * rotated  # (N, D), equal to z_q up to rounding
    return z_q.detach() + (moved - moved.detach())


def kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` centroids ``(k, D)`` of the vectors ``x`` ``(N, D)`` by Lloyd's algorithm.

    Starts from ``k`` distinct rows of ``x`` picked at random (with replacement when ``N < k``), then
    ``iters`` rounds of assigning every vector to its nearest centroid and moving each centroid to the mean
    of its vectors; a centroid that loses all its vectors stays where it is. Uses ``generator`` (or torch's
    global one) for the start."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty (N, D) tensor, got {tuple(x.shape)}")
    k, iters = check_int("k", k), check_int("iters", iters)
    if k < 1 or iters < 0:
        raise ValueError(f"need k >= 1 and iters >= 0, got {k} and {iters}")
    n = x.shape[0]
    device = x.device
    if n >= k:
        start = torch.randperm(n, generator=generator, device="cpu")[:k]
    else:
        start = torch.randint(n, (k,), generator=generator, device="cpu")
    centroids = x[start.to(device)].clone()  # (k, D)
    for _ in range(iters):
        assign = vq_lookup(x, centroids)  # (N,)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # (k, D)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


# --------------------------------------------------------------------------------------------------------
# finite scalar quantization (FSQ) and lookup-free quantization (LFQ): implicit codebooks


def check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """``levels`` as a tuple of ints, each ``>= 2``.

    Raises:
        TypeError: ``levels`` is not a sequence (``None``, a string) or holds a non-integer (a float, even
            ``8.0``; a bool; a string; ``None``).
        ValueError: it is empty or holds a level below 2.
    """
    what = "levels must be a non-empty sequence of integers >= 2"
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise TypeError(f"{what}, got {levels!r} ({type(levels).__name__})")
    if len(levels) == 0:
        raise ValueError(f"{what}, got {levels!r}")
    if any(isinstance(level, bool) or not isinstance(level, numbers.Integral) for level in levels):
        raise TypeError(f"every level must be an integer >= 2, got {tuple(levels)}")
    if any(level < 2 for level in levels):
        raise ValueError(f"every level must be an integer >= 2, got {tuple(levels)}")
    return tuple(int(level) for level in levels)


def fsq_bound(z: torch.Tensor, levels: Sequence[int], eps: float = 1e-3) -> torch.Tensor:
    """FSQ's squashing ``(..., d) -> (..., d)`` before rounding ("Finite Scalar Quantization: VQ-VAE Made
    Simple"): dimension ``i`` becomes ``tanh(z + shift) * h - offset`` with ``h = (L_i - 1)(1 + eps) / 2``,
    ``offset = 0.5`` for even ``L_i`` (else 0) and ``shift = atanh(offset / h)``, so that rounding gives exactly
    ``L_i`` integers, ``-(L_i // 2) .. (L_i - 1) // 2``, and ``z = 0`` lands on the integer 0."""
    lv = torch.tensor(check_levels(levels), dtype=z.dtype, device=z.device)  # (d,)
    if z.shape[-1] != lv.numel():
        raise ValueError(f"z has {z.shape[-1]} dimensions but there are {lv.numel()} levels")
    half = (lv - 1) * (1 + eps) / 2  # (d,)
    offset = torch.where(lv % 2 == 0, 0.5, 0.0).to(z.dtype)  # (d,)
    shift = torch.atanh(offset / half)  # (d,)
    return torch.tanh(z + shift) * half - offset


def fsq_quantize(z: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """FSQ codes ``(..., d)`` of ``z`` ``(..., d)``: bound, round with a straight-through gradient, and divide
    dimension ``i`` by ``L_i // 2`` so the codes lie in ``[-1, 1]`` on the grid
    ``{(k - L_i // 2) / (L_i // 2) : k = 0 .. L_i - 1}`` (the rounded value is clamped to it)."""
    lv = check_levels(levels)
    bounded = fsq_bound(z, lv)  # (..., d)
    # the bound's eps lets a value round one step past the grid once (L_i - 1) * eps / 2 >= 0.5 (L_i > 1000)
    lo = torch.tensor([-(n // 2) for n in lv], dtype=z.dtype, device=z.device)  # (d,)
    hi = torch.tensor([(n - 1) // 2 for n in lv], dtype=z.dtype, device=z.device)  # (d,)
    on_grid = bounded.round().clamp(lo, hi)  # (..., d)
    rounded = bounded + (on_grid - bounded).detach()  # straight-through rounding
    width = torch.tensor([n // 2 for n in lv], dtype=z.dtype, device=z.device)  # (d,)
    return rounded / width


def _fsq_basis(levels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Mixed-radix place values ``(d,)``: ``1, L_0, L_0 L_1, ...``."""
    return torch.cumprod(torch.tensor((1,) + levels[:-1], device=device), 0)


def fsq_codes_to_indices(codes: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """Indices ``(...,)`` in ``[0, prod(levels))`` of FSQ codes ``(..., d)`` (values on the grid of
    :func:`fsq_quantize`): digit ``k_i = code_i * (L_i // 2) + L_i // 2`` in base ``L_i``, dimension 0 lowest.
    Raises as :func:`check_levels` for bad levels, and ``ValueError`` for codes holding NaN or infinity (read
    with one host sync on CUDA)."""
    lv = check_levels(levels)
    check_finite("codes", codes)
    return _fsq_codes_to_indices(codes, lv)


def _fsq_codes_to_indices(codes: torch.Tensor, lv: tuple[int, ...]) -> torch.Tensor:
    """:func:`fsq_codes_to_indices` on checked levels, without reading the codes (``FSQ.forward``). The digits
    are computed in float32 (bfloat16 holds no odd integer above 256) and clamped to ``[0, L_i)``."""
    width = torch.tensor([n // 2 for n in lv], dtype=torch.float32, device=codes.device)  # (d,)
    top = torch.tensor([n - 1 for n in lv], device=codes.device)  # (d,)
    digits = (codes.float() * width + width).round().long()  # (..., d)
    digits = digits.clamp(min=0).minimum(top)  # (..., d) in [0, L_i)
    return (digits * _fsq_basis(lv, codes.device)).sum(-1)


def fsq_indices_to_codes(indices: torch.Tensor, levels: Sequence[int],
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FSQ codes ``(..., d)`` of indices ``(...,)``: the inverse of :func:`fsq_codes_to_indices`. Raises as
    :func:`check_levels` for bad levels, and ``ValueError`` for indices that are not integers in
    ``[0, prod(levels))`` (read with one host sync on CUDA)."""
    lv = check_levels(levels)
    _check_any_ids(indices, math.prod(lv))
    return _fsq_indices_to_codes(indices, lv, dtype)


def _check_any_ids(indices: torch.Tensor, high: int) -> None:
    """``indices``, of any shape, must be an integer tensor of values in ``[0, high)`` (:func:`check_ids`)."""
    shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else ("...",)
    check_ids("indices", indices, high, shape, dtype=None, allow_empty=True)


def _fsq_indices_to_codes(indices: torch.Tensor, lv: tuple[int, ...],
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`fsq_indices_to_codes` on checked input (no values read)."""
    lv_t = torch.tensor(lv, device=indices.device)  # (d,)
    digits = (indices.long()[..., None] // _fsq_basis(lv, indices.device)) % lv_t  # (..., d)
    width = (lv_t // 2).to(dtype)  # (d,)
    return (digits.to(dtype) - width) / width


def lfq_quantize(z: torch.Tensor) -> torch.Tensor:
    """LFQ codes ``(..., d)`` of ``z`` ``(..., d)``: ``+1`` where ``z > 0``, else ``-1`` ("Language Model Beats
    Diffusion -- Tokenizer is Key to Visual Generation"), with a straight-through gradient."""
    codes = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
    return z + (codes - z).detach()


def lfq_codes_to_indices(codes: torch.Tensor) -> torch.Tensor:
    """Indices ``(...,)`` in ``[0, 2^d)`` of sign codes ``(..., d)``: bit ``i`` is 1 where ``code_i > 0``."""
    bits = (codes > 0).long()  # (..., d)
    return (bits << torch.arange(codes.shape[-1], device=codes.device)).sum(-1)


def lfq_indices_to_codes(indices: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sign codes ``(..., dim)`` of indices ``(...,)``: the inverse of :func:`lfq_codes_to_indices`.
    ``TypeError`` for a ``dim`` that is not an integer; ``ValueError`` for ``dim`` outside ``[1, 62]`` or indices
    that are not integers in ``[0, 2^dim)`` (read with one host sync on CUDA)."""
    dim = check_int("dim", dim, lo=1, hi=62)  # the bits of an int64 index
    _check_any_ids(indices, 2**dim)
    return _lfq_indices_to_codes(indices, dim, dtype)


def _lfq_indices_to_codes(indices: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`lfq_indices_to_codes` on checked input (no values read)."""
    bits = (indices.long()[..., None] >> torch.arange(dim, device=indices.device)) & 1  # (..., dim)
    return bits.to(dtype) * 2 - 1


def lfq_entropy_terms(z: torch.Tensor, temperature: float = 0.01, chunk_size: int = 1024,
                      batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """LFQ's two entropies of ``p(c | z) = softmax_c(-|z - c|^2 / temperature)`` over the ``2^d`` sign codes.

    ``z``: ``(N, d)``. Returns ``(per_sample, codebook)``: the mean over vectors of ``H(p(. | z))`` (low when each
    vector is confidently assigned) and ``H(mean_z p(. | z))`` (high when the batch spreads over the codes).
    The distance splits over dimensions, so ``p(c | z)`` is a product of ``d`` independent signs with
    ``P(+1) = sigmoid(4 z_i / temperature)`` and the per-sample entropy is a sum of ``d`` binary entropies; the
    batch average does not factorise, so the codebook entropy sums ``N x 2^d`` probabilities, ``chunk_size``
    vectors at a time. Natural log. ``batch_sum`` turns this batch's sums (of the probabilities, and the count)
    into the global batch's under data-parallel training (:func:`ar_course.distributed.global_batch_sum`)."""
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"z must be a non-empty (N, d) tensor, got {tuple(z.shape)}")
    temperature = check_number("temperature", temperature, 0, lo_open=True)
    chunk_size = check_int("chunk_size", chunk_size, lo=1)
    logit = 4 * z / temperature  # (N, d): log P(+1) - log P(-1)
    p_pos = torch.sigmoid(logit)
    binary = F.softplus(logit) - p_pos * logit  # (N, d): entropy of each sign, in a stable form
    per_sample = binary.sum(1).mean()
    d = z.shape[1]
    codes = _lfq_indices_to_codes(torch.arange(2**d, device=z.device), d, z.dtype)  # (2^d, d)
    total = z.new_zeros(2**d)
    for chunk in z.split(chunk_size):
        # -|z - c|^2 = 2 z.c - |z|^2 - d: the last two terms are the same for every code and cancel in the softmax
        total = total + torch.softmax(2 * chunk @ codes.t() / temperature, dim=1).sum(0)  # (2^d,)
    count = z.new_tensor(float(z.shape[0]))
    if batch_sum is not None:
        total, count = batch_sum(total), batch_sum(count)
    avg = total / count
    codebook = -(avg * avg.clamp_min(1e-12).log()).sum()
    return per_sample, codebook
