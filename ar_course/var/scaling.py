"""A miniature of VAR's scaling experiment: test loss against parameter count for a family of small VARs.

VAR's paper fits a power law, loss = c * N^slope, with a correlation of -0.998 on a log-log plot. Here every
model has 2 layers and differs only in width, all are trained for the same number of steps from the same seed
on the same digits, and the test loss is measured on held-out digits. ``benchmarks/bench_var_scaling.py`` runs
the full study; chapter 04 runs a smaller one live.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ar_course.data import load_mnist
from ar_course.tokenizers import VQVAE
from ar_course.var.model import VARConfig
from ar_course.var.functional import flatten_pyramids
from ar_course.utils import check_int, progress_bar
from ar_course.var.train import encode_pyramids, train_var

BATCH_SIZE = 48
"""Digits per training step of every model of the study (so ``n_train`` is at least this)."""


def scaling_study(
    tokenizer: VQVAE,
    base: VARConfig,
    widths: Sequence[int],
    *,
    steps: int = 300,
    n_train: int = 10000,
    n_test: int = 500,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train one 2-layer VAR per width for ``steps`` steps on ``n_train`` MNIST training digits and measure its
    test loss (nats per token) on ``n_test`` held-out digits.

    ``base`` gives the vocabulary, latent size and scales (those of ``tokenizer``); the models train on the
    tokenizer's device. Returns ``{"widths",
    "params", "test_loss", "slope", "intercept", "correlation"}``: the last three fit ``log(loss)`` against
    ``log(params)`` by least squares (``slope``: the power-law exponent).

    Raises ``ValueError`` for fewer than two different widths or one that is odd or ``< 2``, ``n_train`` outside
    ``[BATCH_SIZE, 20000]`` (the training digits; a batch at least) or ``n_test`` outside ``[1, 5000]`` (the test
    digits): a larger count would silently use fewer digits; ``TypeError`` for a count or width that is not an
    integer."""
    widths = [check_int(f"widths[{i}]", w) for i, w in enumerate(widths)]
    if len(widths) < 2 or len(set(widths)) != len(widths) or any(w < 2 or w % 2 for w in widths):
        raise ValueError(f"widths must list at least two different even widths >= 2 (2 heads each), got {widths}")
    device = next(tokenizer.parameters()).device
    train_images, train_labels = load_mnist("train", size=32)
    test_images, test_labels = load_mnist("test", size=32)
    n_train = check_int("n_train", n_train, lo=BATCH_SIZE, hi=len(train_images))
    n_test = check_int("n_test", n_test, lo=1, hi=len(test_images))
    train_tokens = flatten_pyramids(encode_pyramids(tokenizer, train_images[:n_train]))  # (n_train, L)
    test_pyramid = [m.to(device) for m in encode_pyramids(tokenizer, test_images[:n_test])]  # (n_test, s, s) per scale
    params, losses = [], []
    for width in progress_bar(widths, desc="VAR sizes", disable=not progress):
        config = VARConfig(vocab_size=base.vocab_size, latent_dim=base.latent_dim, scales=base.scales,
                           n_layer=2, n_head=2, n_embd=width)
        model, _ = train_var(tokenizer, train_tokens, train_labels[:n_train], config, steps=steps, seed=seed,
                             batch_size=BATCH_SIZE, device=device, progress=False)
        with torch.no_grad():
            loss, _ = model.loss(tokenizer.quantizer, test_pyramid, test_labels[:n_test].to(device))
        params.append(model.num_params())
        losses.append(float(loss))
    slope, intercept = np.polyfit(np.log(params), np.log(losses), 1)
    corr = float(np.corrcoef(np.log(params), np.log(losses))[0, 1])
    return {"widths": list(widths), "params": params, "test_loss": losses, "slope": float(slope),
            "intercept": float(intercept), "correlation": corr}
