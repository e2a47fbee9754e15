"""The library leaves its caller's process as it found it: trainers, checkpoint loading and exercise checks give
the global random generators (Python's, NumPy's, torch's) back as they were, and training runs with gradients on
even inside a caller's ``torch.no_grad()``."""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import pytest
import torch

from ar_course import checkpoint
from ar_course.align import CCAConfig, train_cca
from ar_course.checks.core import Chapter
from ar_course.raster import raster_config
from ar_course.raster.train import train_ar
from ar_course.tokenizers import VQVAE, VQVAEConfig
from ar_course.train import TrainConfig, train_loop
from ar_course.transformer import GPT
from ar_course.utils import kept_random_state, seed_everything


def _next_draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def _draws_after(call: Callable[[], object], seed: int) -> tuple[float, float, float]:
    """The next draw of each global generator after seeding them all with ``seed`` and running ``call``."""
    seed_everything(seed)
    call()
    return _next_draws()


def _policy() -> GPT:
    with kept_random_state():
        torch.manual_seed(0)
        return GPT(raster_config(5, grid=(2, 2), n_classes=3, n_layer=1, n_head=2, n_embd=16))


def _train_ar() -> None:
    with kept_random_state():
        torch.manual_seed(0)
        tok = VQVAE(VQVAEConfig(image_size=32, downsample=4, width=4, latent_dim=4, num_codes=16)).eval()
    maps = torch.randint(0, 16, (16, 8, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 10
    train_ar(tok, maps, labels, steps=2, batch_size=8, n_layer=1, n_embd=16, n_head=2, progress=False, seed=7)


def _train_cca() -> None:
    maps = torch.randint(0, 5, (4, 2, 2), generator=torch.Generator().manual_seed(0))
    train_cca(_policy(), _policy(), maps, torch.tensor([0, 1, 2, 0]), CCAConfig(steps=1, batch_size=2, seed=5),
              progress=False)


@pytest.mark.parametrize("call", [
    pytest.param(_train_ar, id="train_ar"),
    pytest.param(_train_cca, id="train_cca"),
    pytest.param(lambda: checkpoint.load("ar_mnist"), id="checkpoint.load"),
])
def test_the_callers_random_numbers_go_on_as_if_the_call_had_not_run(call):
    """Before: a trainer seeded every global generator with its own seed (the caller's seed no longer mattered),
    and loading a checkpoint drew a random initialisation from torch's."""
    want = _draws_after(lambda: None, 123)
    assert _draws_after(call, 123) == want
    assert _draws_after(call, 999) != want  # the caller's seed still decides what comes next


def test_kept_random_state_gives_back_every_generator_after_an_error():
    seed_everything(3)
    want = _next_draws()
    seed_everything(3)
    with pytest.raises(RuntimeError, match="boom"), kept_random_state():
        seed_everything(99)
        _next_draws()
        raise RuntimeError("boom")
    assert _next_draws() == want


def test_training_inside_the_callers_no_grad_trains():
    """train_loop and train_cca turn gradients on for the run (they failed with "does not require grad" inside a
    caller's torch.no_grad())."""
    model = torch.nn.Linear(3, 1)
    before = model.weight.detach().clone()
    with torch.no_grad():
        history = train_loop(model, lambda m, b: m(b).pow(2).mean(), iter([torch.ones(4, 3)] * 2),
                             TrainConfig(steps=2, lr=0.1, warmup=0, checkpoint_every=0), progress=False)
        _train_cca()
    assert len(history.loss) == 2 and not torch.equal(model.weight, before)
    assert torch.is_grad_enabled()


def test_an_exercise_check_leaves_the_learners_random_numbers_alone():
    """A check that seeds and draws (as the sampling checks do) no longer resets the learner's generator."""
    chapter = Chapter(99, "test")

    @chapter.exercise("99.1", reference=lambda: None, hints=["h1", "h2"])
    def seeded(fn, ref):
        torch.manual_seed(0)
        torch.rand(10)
        random.seed(0)
        np.random.seed(0)
        fn()

    seed_everything(1234)
    want = _next_draws()
    seed_everything(1234)
    seeded(lambda: None)
    assert _next_draws() == want
