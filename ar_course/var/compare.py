"""VAR next to the chapter 03 raster-order model: forward passes, wall-clock per batch (on the models' device),
class accuracy and Frechet distance, measured the same way for both. Used by the chapter 04 notebook and
``benchmarks/bench_var.py``.

    rows = compare_generators({"VAR": var_sampler(model, tok, cfg=2.0),
                               "raster AR": raster_sampler(ar, ar_tok, cfg=1.0)}, per_class=50)
    fig = plot_comparison(rows)
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable

import matplotlib.pyplot as plt
import torch
from torch import nn

from ar_course import metrics
from ar_course.tokenizers import VQVAE
from ar_course.utils import generate_in_batches
from ar_course.transformer.counting import count_forward_passes
from ar_course.var.model import VAR, generate_images


@dataclass
class Sampler:
    """An image generator under test: ``sample(classes (B,), seed) -> images (B, C, S, S)`` in [0, 1], and the
    transformer whose forward passes are counted (it must have ``blocks``)."""

    model: nn.Module
    sample: Callable[[torch.Tensor, int], torch.Tensor]


def var_sampler(model: VAR, tokenizer: VQVAE, cfg: float = 0.0, **kwargs) -> Sampler:
    """VAR at guidance ``cfg`` (0 = conditional); ``kwargs`` go to :func:`~ar_course.var.generate_images`."""
    return Sampler(model, lambda classes, seed: generate_images(model, tokenizer, classes, cfg=cfg, seed=seed,
                                                                **kwargs))


def raster_sampler(model: nn.Module, tokenizer: VQVAE, cfg: float = 0.0, **kwargs) -> Sampler:
    """The chapter 03 raster model at guidance ``cfg`` (0 = conditional); ``kwargs`` go to
    :func:`~ar_course.raster.generate_images`."""
    from ar_course.raster import generate_images as raster_generate

    return Sampler(model, lambda classes, seed: raster_generate(model, tokenizer, classes, cfg=cfg, seed=seed,
                                                                **kwargs))


def seconds_per_batch(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best-of-``repeats`` wall-clock seconds of ``fn()`` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_seconds_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` wall-clock seconds of every ``fns[name]()``, after a warm-up call of each, timed in
    turn (one call of each per repeat) so that a burst of load on a shared machine hits every one alike."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


@torch.no_grad()
def compare_generators(
    samplers: dict[str, Sampler],
    per_class: int = 50,
    n_classes: int = 10,
    batch_size: int = 100,
    timing_batch: int = 10,
    repeats: int = 3,
    seed: int = 0,
    reference: torch.Tensor | None = None,
) -> list[dict]:
    """One row per sampler: ``forward_passes`` and ``seconds_per_batch`` (best of ``repeats``) for a batch of
    ``timing_batch`` images of mixed classes, ``images_per_second``, and the ``class_accuracy`` and
    ``frechet_distance`` of ``per_class * n_classes`` samples (generated in chunks of ``batch_size``) against as
    many held-out MNIST test images (or ``reference``), and the ``device`` the sampler's model is on (``"cpu"``,
    ``"cuda"``: where the seconds were measured).

    On a CPU the time per batch depends on the batch size: small batches pay mostly a fixed cost per forward
    pass (VAR's advantage), large ones pay per token processed (VAR processes 130 tokens per digit, raster
    order 64)."""
    n = per_class * n_classes
    if reference is None:
        reference = metrics.held_out_set("mnist")[0][:n]
    classes = torch.arange(n_classes).repeat(per_class)  # (n,) mixed classes in every batch
    batch = classes[:timing_batch]
    rows = []
    for name, sampler in samplers.items():
        passes = count_forward_passes(sampler.model, lambda: sampler.sample(batch, seed))
        secs = seconds_per_batch(lambda: sampler.sample(batch, seed), repeats)
        seeds = itertools.count(seed)  # chunk i is sampled with seed + i
        images = generate_in_batches(lambda chunk: sampler.sample(chunk, next(seeds)), classes, batch_size)
        device = next(sampler.model.parameters(), torch.empty(0)).device.type
        rows.append({"name": name, "device": device, "forward_passes": passes, "batch_size": int(batch.numel()),
                     "seconds_per_batch": secs, "images_per_second": batch.numel() / secs,
                     "class_accuracy": metrics.class_accuracy(images.cpu(), classes),
                     "frechet_distance": metrics.frechet_distance(images.cpu(), reference.cpu()), "n": n})
    return rows


def plot_comparison(rows: list[dict], device: str | None = None) -> plt.Figure:
    """Bar charts of forward passes, seconds per batch, class accuracy and Frechet distance.

    ``device`` (e.g. ``"cpu"``, ``"cuda"``) names where the seconds were measured in that panel's title; default:
    the rows' ``device`` (:func:`compare_generators` records it) when every row has the same one, else none."""
    if device is None:
        devices = {r.get("device") for r in rows}
        device = devices.pop() if len(devices) == 1 else None
    seconds = f"seconds per batch ({device})" if device else "seconds per batch"
    keys = [("forward_passes", "forward passes per batch"), ("seconds_per_batch", seconds),
            ("class_accuracy", "class accuracy"), ("frechet_distance", "Frechet distance (lower is better)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    names = [r["name"] for r in rows]
    for ax, (key, title) in zip(axes, keys):
        values = [r[key] for r in rows]
        ax.bar(names, values, color=["tab:blue", "tab:orange", "tab:green", "tab:red"][:len(rows)])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.2)
    fig.tight_layout()
    return fig
