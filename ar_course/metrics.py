"""Evaluation tools shared by every generative chapter: a small judge classifier per image set and the
numbers computed with it. Images are float ``(N, C, 32, 32)`` (or 28x28, zero-padded) with values in [0, 1].

What each number means, and how noisy it is
-------------------------------------------
``class_accuracy``
    Fraction of images that the classifier assigns to the class they were generated for: conditioning
    fidelity, not diversity (one perfect digit per class scores 100%). Sampling noise with ``n`` images is
    about ``sqrt(p (1 - p) / n)``: 0.7 points at p = 0.95, n = 1000. The shipped classifiers score 99.2%
    (MNIST test split) and 100% (held-out shapes) on real images, so real data is the ceiling.
``frechet_distance`` (FID-style)
    Fit a Gaussian to each set's penultimate classifier features (128 dims, ``classifier_features``) and
    take the Frechet distance ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. Lower is better; it
    mixes quality and diversity. It is biased upward for finite sets (the bias shrinks roughly as 1/n), so
    compare numbers only at equal ``n`` against the same reference set. The features are not Inception's:
    the values are not comparable with published FIDs. MNIST scale, measured against 2000 test digits:
    two disjoint real sets 0.27 +- 0.07 (n = 2000), 0.43 +- 0.09 (n = 1000), 0.94 +- 0.12 (n = 500);
    3x3 blur 24; only half of the classes 22; Gaussian pixel noise of std 0.2: 116.
``precision_recall`` (Kynkaanniemi et al., 2019)
    Precision: fraction of generated samples inside the real manifold (union of balls around real features,
    radius = distance to the k-th nearest real neighbour); it drops when samples look wrong. Recall: fraction
    of real samples inside the generated manifold; it drops when modes are missed. Even real vs real gives
    about 0.88 (MNIST) and 0.92 (shapes) with k = 3 and n = 2000 (std < 0.01): that is the ceiling, not 1.0.
    Half of the classes missing: precision 0.84, recall 0.45; 3x3 blur: 0.53, 0.02.
``data_baseline``
    The numbers above between two disjoint random sets of real held-out images of equal size, averaged over
    random splits, with their standard deviation: the noise floor to print next to every generated-vs-real
    number (same ``n``). Differences within a couple of baseline standard deviations are noise.
``psnr`` / ``codebook_usage``
    Reconstruction quality in dB (higher is better; identical images give ``inf``) and how much of a VQ
    codebook is used (fraction of codes seen; perplexity = effective number of equally used codes).

The classifiers are trained by ``python -m ar_course train classifier --dataset mnist|shapes`` (entry point
:func:`train_main`; about 100 CPU seconds each on one core) and shipped as
``ar_course/assets/classifier_{dataset}.safetensors``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ar_course import checkpoint
from ar_course import distributed as ddp
from ar_course.checkpoint import save_checkpoint
from ar_course.cli import ArgumentParser, device_name, path_arg, positive_float, positive_int
from ar_course.project import install_command
from ar_course.train import (
    DEVICE_HELP, History, TrainConfig, add_run_options, apply_process_options, check_batch_size, finish_run, out_help,
    image_warmup, prepare_run, seed_int, train_loop, trainer_main,
)
from ar_course.utils import (
    check_finite, check_ids, check_image_values, check_int, check_number, check_seed, get_device, is_integer_tensor,
    kept_random_state, seed_everything,
)

DATASETS = {"mnist": (1, 10), "shapes": (3, 4)}  # name -> (in_channels, num_classes)
SHAPES_TRAIN = (20_000, 0)  # (n, seed) of the procedural training set
SHAPES_TEST = (5_000, 1)  # (n, seed) of the held-out set, a different seed from training
MAX_SHIFT = {"mnist": 2, "shapes": 0}  # training augmentation; shapes already sit anywhere in the image


# ----------------------------------------------------------------------------------------------------
# The judge classifier


@dataclass
class ClassifierConfig:
    """Hyper-parameters of :class:`Classifier` (not checked: the trainer and the checkpoints make them)."""

    in_channels: int = 1
    num_classes: int = 10
    width: int = 16  # channels of the first conv, doubled at each of the 4 blocks; features: 8 * width


class Classifier(nn.Module):
    """Four conv blocks at 32, 16, 8 and 4 pixels, then global average pooling (like Inception's pool3).

    Takes images ``(N, C, 32, 32)`` in [0, 1]; 28x28 inputs are zero-padded to 32x32 first. Its batch norms
    use the global batch's statistics under ``torchrun`` (:class:`ar_course.distributed.SyncBatchNorm2d`)."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), ddp.SyncBatchNorm2d(c_out),
                                 nn.ReLU())

        self.body = nn.Sequential(
            block(config.in_channels, w), nn.MaxPool2d(2),  # (N, w, 16, 16)
            block(w, 2 * w), nn.MaxPool2d(2),  # (N, 2w, 8, 8)
            block(2 * w, 4 * w), nn.MaxPool2d(2),  # (N, 4w, 4, 4)
            block(4 * w, 8 * w),  # (N, 8w, 4, 4)
        )
        self.head = nn.Linear(8 * w, config.num_classes)

    @property
    def feature_dim(self) -> int:
        """Size ``F = 8 * width`` of the penultimate features (128 for the shipped classifiers)."""
        return 8 * self.config.width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, 8 * width)``: globally average-pooled last conv activations.

        ``images`` of any floating dtype are cast to the classifier's (as
        :meth:`~ar_course.tokenizers.vqvae.VQVAE.encode` casts)."""
        _check_images(images, self.config.in_channels)
        images = images.to(self.head.weight.dtype)
        if images.shape[-1] == 28:
            images = F.pad(images, (2, 2, 2, 2))  # (N, C, 32, 32)
        return self.body(images).mean(dim=(2, 3))  # (N, 8w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)``."""
        return self.head(self.features(images))


def _check_images(images: torch.Tensor, channels: int, name: str = "images") -> None:
    """``TypeError`` / ``ValueError`` naming ``name`` unless ``images`` is a float ``(N, channels, 32 or 28, ...)``
    tensor with ``N >= 1`` (values not read)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a floating-point tensor (N, C, H, W) with values in [0, 1], got "
                        f"{type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (N, C, H, W) with values in [0, 1], got "
                         f"{images.dtype} (divide uint8 images by 255)")
    if (images.ndim != 4 or images.shape[0] == 0 or images.shape[1] != channels
            or tuple(images.shape[2:]) not in ((28, 28), (32, 32))):
        raise ValueError(f"expected {name} of shape (N, {channels}, 32, 32) or (N, {channels}, 28, 28) with "
                         f"N >= 1, got {tuple(images.shape)}")


def _check_dataset(dataset: str) -> tuple[int, int]:
    if not isinstance(dataset, str):
        raise TypeError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r} ({type(dataset).__name__})")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[dataset]


def checkpoint_path(dataset: str) -> Path:
    """Where the shipped classifier for ``dataset`` lives (``classifier_<dataset>`` in
    :data:`ar_course.checkpoint.ASSETS`)."""
    _check_dataset(dataset)
    return checkpoint.ASSETS / f"classifier_{dataset}.safetensors"


@functools.lru_cache(maxsize=8)
def _cached_classifier(dataset: str, device: str) -> Classifier:
    return checkpoint.load(checkpoint_path(dataset), device, kind="classifier").requires_grad_(False)


def load_classifier(dataset: str = "mnist", device: str | torch.device = "cpu") -> Classifier:
    """The shipped classifier for ``dataset`` in eval mode, frozen. Cached: do not modify it in place.

    Raises:
        TypeError: ``dataset`` is not a string.
        ValueError: an unknown ``dataset`` or ``device`` (as :func:`ar_course.utils.get_device`).
        RuntimeError: a CUDA device on a machine without one (as :func:`ar_course.utils.get_device`).
    """
    _check_dataset(dataset)
    return _cached_classifier(dataset, str(get_device(device)))


def _prepare(images: torch.Tensor, dataset: str) -> tuple[Classifier, torch.Tensor]:
    channels, _ = _check_dataset(dataset)
    _check_images(images, channels)
    check_image_values("images", images)
    return load_classifier(dataset, images.device), images.clamp(0, 1)


@torch.no_grad()
def classifier_features(images: torch.Tensor, dataset: str = "mnist", batch_size: int = 1000) -> torch.Tensor:
    """Penultimate features ``(N, F)`` (F = 128 for the shipped classifiers) of ``images`` ``(N, C, H, W)``
    in [0, 1], on the images' device, without gradients.

    Values slightly outside [0, 1] are clamped; a range that looks like [-1, 1] or 0..255 raises ``ValueError``.
    Any floating dtype is accepted (cast to the classifier's).

    Raises:
        TypeError: ``images`` is not a tensor, or ``dataset`` not a string.
        ValueError: as :func:`classify`.
    """
    batch_size = check_int("batch_size", batch_size, lo=1)
    model, images = _prepare(images, dataset)
    return torch.cat([model.features(chunk) for chunk in images.split(batch_size)])


@torch.no_grad()
def classify(images: torch.Tensor, dataset: str = "mnist", batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels ``(N,)`` (int64) for ``images`` ``(N, C, H, W)`` in [0, 1].

    Raises:
        TypeError: ``images`` is not a tensor, ``dataset`` not a string, ``batch_size`` not an integer.
        ValueError: an unknown dataset, images of the wrong shape, dtype (integers: divide uint8 images by 255) or
            range or holding NaN, ``batch_size < 1``.
    """
    batch_size = check_int("batch_size", batch_size, lo=1)
    model, images = _prepare(images, dataset)
    return torch.cat([model(chunk).argmax(dim=1) for chunk in images.split(batch_size)])


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, dataset: str = "mnist") -> float:
    """Fraction of ``images`` ``(N, C, H, W)`` that the classifier assigns to ``labels`` ``(N,)`` (integers, the
    dataset's classes).

    Raises:
        TypeError: ``labels`` is not a tensor.
        ValueError: as :func:`classify`, or ``labels`` of another length, not integers, or not a class.
    """
    channels, num_classes = _check_dataset(dataset)
    _check_images(images, channels)
    check_ids("labels", labels, num_classes, (images.shape[0],), dtype=None)
    return float((classify(images, dataset).cpu() == labels.cpu()).float().mean())


@torch.no_grad()
def generated_class_accuracy(generate: Callable[[torch.Tensor], torch.Tensor], n_classes: int, per_class: int,
                             dataset: str = "mnist") -> tuple[float, torch.Tensor]:
    """How often the classifier of ``dataset`` recognises the class a model was asked for: ``generate(classes)``
    makes images ``(N, C, 32, 32)`` for ``classes`` ``(N,)``, ``per_class`` of each of the ``n_classes`` in turn.
    Returns ``(accuracy, images on the CPU)``; ``TypeError`` / ``ValueError`` for a ``generate`` that is not
    callable or counts that are not integers ``>= 1``, and as :func:`class_accuracy`."""
    if not callable(generate):
        raise TypeError(f"generate must be a function of the classes, got {type(generate).__name__}")
    n_classes, per_class = check_int("n_classes", n_classes, lo=1), check_int("per_class", per_class, lo=1)
    classes = torch.arange(n_classes).repeat_interleave(per_class)  # (n_classes * per_class,)
    images = generate(classes).cpu()  # (N, C, 32, 32)
    return class_accuracy(images, classes, dataset), images


# ----------------------------------------------------------------------------------------------------
# Frechet distance


def _as_float64(name: str, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """``x`` as a float64 array; ``ValueError`` naming ``name`` if a value is NaN or infinite."""
    out = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    finite = np.isfinite(out)
    if not finite.all():
        raise ValueError(f"{name} must be finite, got {out[~finite][0]}")
    return out


def _rounding(x: torch.Tensor | np.ndarray) -> float:
    """The relative rounding a covariance given in ``x``'s precision may carry: 1e-6 in float64, 1e-2 in a lower
    precision (a float32 E[x x^T] - m m^T of 2048 features, mean 5, had an eigenvalue of -1.1e-3 of its
    largest). Far below what a matrix that is no covariance shows (-I: -1)."""
    if isinstance(x, torch.Tensor):
        low = x.is_floating_point() and x.element_size() < 8
    else:
        dtype = np.asarray(x).dtype
        low = np.issubdtype(dtype, np.floating) and dtype.itemsize < 8
    return 1e-2 if low else 1e-6


def _check_covariance(name: str, cov: np.ndarray, rounding: float) -> None:
    """``ValueError`` naming ``name`` unless ``cov`` is symmetric and positive semi-definite up to ``rounding``
    (relative to its largest entry and eigenvalue): ``eigh`` reads one triangle only, and a clipped negative
    eigenvalue would give a distance for a matrix that is no covariance."""
    scale = max(1.0, float(np.abs(cov).max(initial=0.0)))
    if not np.allclose(cov, cov.T, rtol=rounding, atol=rounding * 1e-3 * scale):
        raise ValueError(f"{name} must be a symmetric covariance matrix, got one that differs from its transpose "
                         f"by up to {float(np.abs(cov - cov.T).max()):.3g}")
    low, high = (float(e) for e in np.linalg.eigvalsh(cov)[[0, -1]]) if cov.size else (0.0, 0.0)
    if low < -rounding * max(1.0, abs(high)):
        raise ValueError(f"{name} must be positive semi-definite (a covariance), got an eigenvalue of {low:.3g}")


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (tiny negative eigenvalues clipped to 0)."""
    vals, vecs = np.linalg.eigh(matrix)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance_gaussians(mu1: torch.Tensor | np.ndarray, cov1: torch.Tensor | np.ndarray,
                               mu2: torch.Tensor | np.ndarray, cov2: torch.Tensor | np.ndarray,
                               method: str = "eigh") -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2): means ``(F,)``, covariances ``(F, F)``.

    ``||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))``. ``method="eigh"`` computes the
    trace term as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``cov1^(1/2) cov2 cov1^(1/2)`` (same eigenvalues as ``cov1 cov2``), which stays real and handles singular
    covariances. ``method="sqrtm"`` is the usual FID code path: ``scipy.linalg.sqrtm(cov1 @ cov2)``, retried
    with ``1e-6`` added to the diagonals when not finite, and its small imaginary part dropped (it needs SciPy,
    ``pip install ar-course[course]``; ``"eigh"`` needs only NumPy). Never negative: rounding can take the formula
    a little below 0 for equal distributions (``-8e-07`` for a set against itself), and a distance is clamped at 0.

    Raises:
        ValueError: shapes that do not fit, a value that is NaN or infinite, a covariance that is not symmetric
            or not positive semi-definite (beyond rounding), or an unknown ``method``.
    """
    rounding = {"cov1": _rounding(cov1), "cov2": _rounding(cov2)}
    mu1, cov1, mu2, cov2 = (_as_float64(name, x) for name, x in
                            (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2)))
    if mu1.ndim != 1 or mu1.shape != mu2.shape or cov1.shape != (mu1.size,) * 2 or cov2.shape != cov1.shape:
        raise ValueError(f"expected means (F,) and covariances (F, F) of one size F, got {mu1.shape}, "
                         f"{cov1.shape}, {mu2.shape}, {cov2.shape}")
    if method not in ("eigh", "sqrtm"):
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    _check_covariance("cov1", cov1, rounding["cov1"])
    _check_covariance("cov2", cov2, rounding["cov2"])
    if method == "eigh":
        root1 = _psd_sqrt(cov1)
        eig = np.linalg.eigvalsh(root1 @ cov2 @ root1)
        trace_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    else:  # "sqrtm"
        try:
            import scipy.linalg  # imported here: the library's core does not depend on SciPy
        except ModuleNotFoundError:
            raise ModuleNotFoundError(f"method='sqrtm' needs SciPy ({install_command('course')}); "
                                      "method='eigh' needs only NumPy") from None
        covmean = scipy.linalg.sqrtm(cov1 @ cov2)
        if not np.isfinite(covmean).all():
            offset = np.eye(cov1.shape[0]) * 1e-6
            covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"matrix square root has a large imaginary part "
                                 f"({np.abs(covmean.imag).max():.3g}); are the covariances PSD?")
            covmean = covmean.real
        trace_sqrt = float(np.trace(covmean))
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)
    return 0.0 if distance < 0 else distance  # rounding: never < 0 (NaN stays NaN: max(0.0, nan) would be 0.0)


def _gaussian_fit(name: str, features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` (float64) of ``features`` ``(N, F)``, N >= 2; ``ValueError``
    naming the argument ``name`` unless it is ``(N, F)`` with ``N >= 2``, every value finite."""
    feats = _as_float64(name, features)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"{name} must have shape (N, F) with N >= 2, got {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance_from_features(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray,
                                   method: str = "eigh") -> float:
    """Frechet distance between Gaussians fitted to ``feats_a`` ``(N, F)`` and ``feats_b`` ``(M, F)``.

    Use N, M well above F (the covariance needs them); the estimate shrinks towards its limit as ~1/N. Never
    negative (clamped at 0 as :func:`frechet_distance_gaussians` says).

    Raises:
        ValueError: features not ``(N, F)`` with ``N >= 2``, of different ``F``, or holding NaN or infinity.
    """
    mu_a, cov_a = _gaussian_fit("feats_a", feats_a)
    mu_b, cov_b = _gaussian_fit("feats_b", feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b, method=method)


def frechet_distance(images_a: torch.Tensor, images_b: torch.Tensor, dataset: str = "mnist") -> float:
    """FID-style distance between two image sets ``(N, C, H, W)`` and ``(M, C, H, W)`` in [0, 1], on the
    ``dataset`` classifier's features. Compare only at equal sizes and with :func:`data_baseline`. Never negative:
    a set against itself gives 0, not rounding's ``-8e-07`` (clamped as in :func:`frechet_distance_gaussians`).

    Raises ``ValueError`` for a set of fewer than 2 images (a covariance needs two), and as
    :func:`classifier_features` for images it refuses."""
    channels, _ = _check_dataset(dataset)
    for name, images in (("images_a", images_a), ("images_b", images_b)):
        _check_images(images, channels, name)
        if images.shape[0] < 2:
            raise ValueError(f"{name} must hold at least 2 images (a covariance needs two), got {images.shape[0]}")
    return frechet_distance_from_features(classifier_features(images_a, dataset),
                                          classifier_features(images_b, dataset))


# ----------------------------------------------------------------------------------------------------
# Precision and recall (k-NN manifolds)


def _kth_neighbour_radius(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each row of ``feats`` ``(N, F)`` to its k-th nearest other row: ``(N,)``."""
    return torch.cat([
        torch.cdist(part, feats, compute_mode="donot_use_mm_for_euclid_dist").kthvalue(k + 1, dim=1).values
        for part in feats.split(chunk)  # k + 1: the row itself is its own nearest neighbour
    ])


def _fraction_inside(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of ``query`` rows within ``radii[j]`` of at least one ``support[j]``."""
    inside = [
        (torch.cdist(part, support, compute_mode="donot_use_mm_for_euclid_dist") <= radii).any(dim=1)
        for part in query.split(chunk)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(feats_real: torch.Tensor, feats_fake: torch.Tensor, k: int = 3,
                     chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) of ``feats_fake`` ``(M, F)`` against
    ``feats_real`` ``(N, F)``.

    Each set's manifold is the union of balls around its points with radius the distance to the point's
    k-th nearest neighbour in the same set. Precision: fraction of fake points inside the real manifold.
    Recall: fraction of real points inside the fake manifold. A set against itself gives (1.0, 1.0); two
    disjoint real sets give less (about 0.88 for MNIST features, k = 3), see :func:`data_baseline`. Distances
    are computed in float32, or in float64 when either set is float64.

    Raises:
        TypeError: features that are not tensors, ``k`` or ``chunk`` not an integer.
        ValueError: features not ``(N, F)`` and ``(M, F)`` or holding NaN or infinity, ``k < 1`` or not below
            both set sizes, ``chunk < 1``.
    """
    for name, feats in (("feats_real", feats_real), ("feats_fake", feats_fake)):
        if not isinstance(feats, torch.Tensor):
            raise TypeError(f"{name} must be a (N, F) tensor, got {type(feats).__name__}")
    k, chunk = check_int("k", k), check_int("chunk", chunk, lo=1)
    if feats_real.ndim != 2 or feats_fake.ndim != 2 or feats_real.shape[1] != feats_fake.shape[1]:
        images = " (for images, pass metrics.classifier_features(images) of each set)" if max(
            feats_real.ndim, feats_fake.ndim) == 4 else ""
        raise ValueError(f"expected features (N, F) and (M, F), got {tuple(feats_real.shape)} and "
                         f"{tuple(feats_fake.shape)}{images}")
    if k < 1 or min(feats_real.shape[0], feats_fake.shape[0]) <= k:
        raise ValueError(f"k must be >= 1 and below both set sizes, got k={k} for sizes "
                         f"{feats_real.shape[0]} and {feats_fake.shape[0]}")
    check_finite("feats_real", feats_real)
    check_finite("feats_fake", feats_fake)
    dtype = torch.float64 if torch.float64 in (feats_real.dtype, feats_fake.dtype) else torch.float32
    real, fake = feats_real.detach().to(dtype), feats_fake.detach().to(feats_real.device, dtype)
    precision = _fraction_inside(fake, real, _kth_neighbour_radius(real, k, chunk), chunk)
    recall = _fraction_inside(real, fake, _kth_neighbour_radius(fake, k, chunk), chunk)
    return precision, recall


# ----------------------------------------------------------------------------------------------------
# Reconstruction and codebook metrics


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, reduction: str = "mean") -> float | torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``, per image.

    ``x`` and ``y``: ``(N, C, H, W)`` (or one image ``(C, H, W)``). The MSE is taken over each image;
    ``reduction="mean"`` returns the mean of the per-image PSNRs as a float, ``"none"`` a tensor ``(N,)``.
    Identical images give ``inf`` (so the mean is ``inf`` if any pair is identical).

    The images are floats in ``[0, data_range]`` (values up to half a ``data_range`` outside are accepted:
    decoder outputs overshoot a little); one min/max read per image set.

    Raises:
        TypeError: ``x`` or ``y`` is not a tensor, or ``data_range`` not a number.
        ValueError: shapes that differ or are not images, an empty batch, integer images (divide uint8 images
            by 255), a NaN or infinite value, values far outside ``[0, data_range]`` (0..255 images with
            ``data_range = 1``), ``[0, 1]`` images with ``data_range >= 10`` (every value at most 1.5, not all
            0), ``data_range <= 0`` or an unknown ``reduction``.
    """
    for name, images in (("x", x), ("y", y)):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{name} must be a float tensor (N, C, H, W) or (C, H, W), got {type(images).__name__}")
        if not images.is_floating_point():
            raise ValueError(f"{name} must be a float tensor of images in [0, data_range], got {images.dtype} "
                             "(divide uint8 images by 255)")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim not in (3, 4):
        raise ValueError(f"expected images (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    data_range = check_number("data_range", data_range, lo=0, lo_open=True)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if x.numel() == 0:
        raise ValueError(f"x and y are empty (shape {tuple(x.shape)})")
    for name, images in (("x", x), ("y", y)):
        check_image_values(name, images, data_range)
    if data_range >= 10:  # [0, 1] images scored as 0..255 would come out 20 log10(data_range) dB too high
        hi = float(torch.maximum(x.amax(), y.amax()))
        if 0 < hi <= 1.5:
            raise ValueError(f"x and y hold values only up to {hi:.2f}, far below data_range={data_range:g}: images "
                             f"in [0, 1] take data_range=1 (with {data_range:g} the PSNR would be "
                             f"{20 * math.log10(data_range):.1f} dB too high)")
    if x.ndim == 3:
        x, y = x[None], y[None]  # (1, C, H, W)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)  # (N,)
    values = 10 * torch.log10(data_range**2 / mse)  # mse == 0 -> inf
    return float(values.mean()) if reduction == "mean" else values


def codebook_usage(indices: torch.Tensor | list[torch.Tensor], num_codes: int) -> dict[str, float]:
    """Usage of a codebook of ``num_codes`` entries by integer code ``indices`` (any shape), or by a list of
    index maps (a multi-scale pyramid, one ``(B, s_k, s_k)`` map per scale: all its codes are counted).

    Returns ``fraction_used`` (codes seen at least once / num_codes), ``num_used``, and ``perplexity``
    ``exp(-sum_c p_c log p_c)`` of the empirical code distribution: between 1 (one code) and ``num_codes``
    (all codes equally often).

    Raises:
        TypeError: ``indices`` is not a tensor or a list of tensors, or ``num_codes`` not an integer.
        ValueError: ``num_codes < 1``, indices not integers, empty, or outside ``[0, num_codes)``.
    """
    num_codes = check_int("num_codes", num_codes, lo=1)
    maps = list(indices) if isinstance(indices, (list, tuple)) else [indices]
    for i, m in enumerate(maps):
        name = f"indices[{i}]" if isinstance(indices, (list, tuple)) else "indices"
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{name} must be an integer tensor (or indices a list of them), got {type(m).__name__}")
        if not is_integer_tensor(m):
            raise ValueError(f"{name} must be an integer tensor, got {m.dtype}")
    if sum(m.numel() for m in maps) == 0:
        raise ValueError("indices is empty")
    flat = torch.cat([m.flatten().long().cpu() for m in maps])
    if int(flat.min()) < 0 or int(flat.max()) >= num_codes:
        raise ValueError(f"indices must lie in [0, {num_codes}), got [{int(flat.min())}, {int(flat.max())}]")
    counts = torch.unique(flat, return_counts=True)[1].double()  # (codes used,): no num_codes-long table
    p = counts / counts.sum()
    entropy = -(p * p.log()).sum()
    used = counts.numel()
    return {"fraction_used": used / num_codes, "num_used": used, "perplexity": float(entropy.exp())}


# ----------------------------------------------------------------------------------------------------
# Data sets, noise floor and training


def dataset_split(dataset: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, C, 32, 32)`` in [0, 1] and labels ``(N,)`` of an image set of :data:`DATASETS`: ``"train"``
    (MNIST's 20,000, or the 20,000 shapes of :data:`SHAPES_TRAIN`) or ``"test"`` (:func:`held_out_set`).
    ``ValueError`` for an unknown ``dataset`` or ``split``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split == "test":
        return held_out_set(dataset)
    from ar_course.data import load_mnist, make_shapes

    _check_dataset(dataset)
    if dataset == "mnist":
        return load_mnist("train", size=32)
    return make_shapes(SHAPES_TRAIN[0], size=32, seed=SHAPES_TRAIN[1])


def held_out_set(dataset: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """Real held-out images ``(N, C, 32, 32)`` and labels ``(N,)`` the classifier never trained on:
    the MNIST test split (5,000) or 5,000 shapes drawn with a seed other than the training one."""
    from ar_course.data import load_mnist, make_shapes

    _check_dataset(dataset)
    if dataset == "mnist":
        return load_mnist("test", size=32)
    return make_shapes(SHAPES_TEST[0], size=32, seed=SHAPES_TEST[1])


def data_baseline(dataset: str = "mnist", n: int = 2000, repeats: int = 5, k: int = 3,
                  seed: int = 0) -> dict[str, float]:
    """Noise floor: metrics between two disjoint random halves of ``2 n`` held-out real images.

    Repeated over ``repeats`` random splits; returns the means (``frechet``, ``precision``, ``recall``),
    the standard deviation of each (``*_std``) and ``n``. Compare with generated-vs-real at the same ``n``.

    Raises:
        TypeError: ``n``, ``repeats``, ``k`` or ``seed`` not an integer, ``dataset`` not a string.
        ValueError: an unknown ``dataset``, ``n`` outside ``[2, held-out size / 2]``, ``repeats < 1``, ``k < 1``
            or ``k >= n``.
    """
    n, repeats = check_int("n", n, lo=2), check_int("repeats", repeats, lo=1)
    k, seed = check_int("k", k, lo=1), check_seed(seed)
    images, _ = held_out_set(dataset)
    if n < 2 or 2 * n > images.shape[0]:
        raise ValueError(f"n must be in [2, {images.shape[0] // 2}] for {dataset!r}, got {n}")
    feats = classifier_features(images, dataset)
    g = torch.Generator().manual_seed(seed)
    results: dict[str, list[float]] = {"frechet": [], "precision": [], "recall": []}
    for _ in range(repeats):
        perm = torch.randperm(images.shape[0], generator=g)
        a, b = feats[perm[:n]], feats[perm[n:2 * n]]
        precision, recall = precision_recall(a, b, k=k)
        results["frechet"].append(frechet_distance_from_features(a, b))
        results["precision"].append(precision)
        results["recall"].append(recall)
    summary: dict[str, float] = {"n": n}
    for name, values in results.items():
        summary[name] = float(np.mean(values))
        summary[f"{name}_std"] = float(np.std(values))
    return summary


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image ``(N, C, H, W)`` by its own random integer offset in [-max_shift, max_shift]."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)  # (N, C, H + 2s, W + 2s)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(images.shape[1])[None, :, None, None],
                  rows, cols]


@kept_random_state()
def train_classifier(dataset: str = "mnist", steps: int = 1500, seed: int = 0, batch_size: int = 128,
                     progress: bool = True, lr: float = 3e-3, device: torch.device | str = "cpu",
                     checkpoint_every: int = TrainConfig.checkpoint_every, state_path: Path | None = None,
                     resume: bool = False) -> tuple[Classifier, float | None, History]:
    """Train a classifier for ``dataset`` from ``seed`` (MNIST: random +-2 pixel shifts as augmentation, drawn
    in the batch stream for the whole global batch; ``batch_size`` is split across processes under
    ``torchrun``). ``checkpoint_every`` / ``state_path`` / ``resume``: see :func:`~ar_course.train.train_loop`.

    Returns the model (eval mode), its accuracy on :func:`held_out_set` (``None`` on processes other than
    rank 0, which alone evaluates) and the training history.
    The caller's global random generators are left as they were (:func:`~ar_course.utils.kept_random_state`)."""
    from ar_course.data import image_batches

    channels, num_classes = _check_dataset(dataset)
    g = seed_everything(seed)
    images, labels = dataset_split(dataset, "train")
    config = ClassifierConfig(in_channels=channels, num_classes=num_classes)
    device = get_device(device)  # "auto", "cuda:1"...; an unknown or missing device in one line
    model = Classifier(config).to(device)
    shift = MAX_SHIFT[dataset]

    def batches():
        for x, y in image_batches(images, labels, batch_size, generator=g):
            yield (_random_shift(x, shift, g) if shift else x), y

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(m(x.to(device)), y.to(device))

    def evaluate(m: nn.Module) -> dict[str, float]:
        x, y = held_out_set(dataset)
        pred = torch.cat([m(chunk.to(device)).argmax(1).cpu() for chunk in x.split(1000)])
        return {"accuracy": float((pred == y).float().mean())}

    history = train_loop(model, loss_fn, batches(),
                         TrainConfig(steps=steps, lr=lr, weight_decay=1e-4, warmup=image_warmup(steps, most=50),
                                     checkpoint_every=checkpoint_every),
                         eval_fn=evaluate, progress=progress, desc=f"classifier/{dataset}", state_path=state_path,
                         resume=resume, settings={"seed": seed, "batch_size": batch_size, "dataset": dataset})
    return model, history.evals[-1]["accuracy"] if history.evals else None, history


@trainer_main
def train_main(argv: list[str] | None = None) -> int:
    """``python -m ar_course train classifier --dataset mnist|shapes [--steps N] [--seed S] [--out PATH] ...``."""
    parser = ArgumentParser(prog="python -m ar_course train classifier",
                            description="Train the judge classifier used by ar_course.metrics.")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    parser.add_argument("--steps", type=positive_int, default=1500)
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=128,
                        help="global batch, split across processes under torchrun; at most the training images "
                             "[%(default)s]")
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    parser.add_argument("--device", type=device_name, default=None, help=DEVICE_HELP)
    parser.add_argument("--out", type=path_arg, default=None,
                        help=out_help("the shipped ar_course/assets/classifier_<dataset>.safetensors"))
    add_run_options(parser)
    args = parser.parse_args(argv)
    check_batch_size(parser, args.batch_size, args.dataset)
    out = args.out or checkpoint_path(args.dataset)
    state_path = prepare_run(parser, out, args.resume, args.batch_size)
    progress = apply_process_options(args)
    model, accuracy, history = train_classifier(args.dataset, args.steps, args.seed, args.batch_size, lr=args.lr,
                                       device=get_device(args.device), checkpoint_every=args.checkpoint_every,
                                       state_path=state_path, resume=args.resume, progress=progress)
    if not ddp.is_main_process():
        return 0
    out = save_checkpoint(out, model, model.config, kind="classifier", dataset=args.dataset, steps=args.steps,
                          seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                          final_train_loss=history.smoothed(50)[-1], test_accuracy=accuracy)
    finish_run(state_path)
    _cached_classifier.cache_clear()
    print(f"{args.dataset}: held-out accuracy {accuracy:.4f}; saved {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0
