"""The data-constrained study, scaled down: AR and masked diffusion of one size, repeating a small text budget.

"Diffusion Beats Autoregressive in Data-Constrained Settings" trains both kinds of model on a fixed set of unique
tokens for many epochs: AR overfits early, masked diffusion (which sees a new masking of each sequence every
epoch) keeps improving for longer. :func:`data_constrained` reruns that at character level: the first ``budget``
training characters of the corpus, repeated for ``epochs`` epochs, with the validation loss (AR: NLL; diffusion:
its NLL bound, an upper bound) on the usual held-out text after every ``eval_every_epochs`` epochs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ar_course.diffusion_lm.model import DiffusionLM, DiffusionLMConfig
from ar_course.diffusion_lm.train import diffusion_batches, evaluate_bound
from ar_course.train import TrainConfig, train_loop
from ar_course.transformer.model import GPT, GPTConfig
from ar_course.transformer.train import evaluate_lm
from ar_course.utils import check_int, check_number, check_seed, kept_random_state, seed_everything


@dataclass
class StudyConfig:
    """One scaled-down data-constrained run (both models share every field). ``ValueError`` for a count ``< 1``,
    ``lr <= 0``, a ``budget`` under two windows or a seed out of range; ``TypeError`` for a non-number."""

    budget: int = 8192  # unique training characters
    epochs: int = 150
    length: int = 64
    batch_size: int = 16
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    lr: float = 2e-3
    eval_every_epochs: int = 10
    val_windows: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("budget", "epochs", "length", "batch_size", "eval_every_epochs", "val_windows"):
            check_int(name, getattr(self, name), lo=1)
        check_number("lr", self.lr, 0, lo_open=True)
        check_seed(self.seed)
        if self.budget < 2 * self.length:
            raise ValueError(f"budget ({self.budget}) must hold at least two windows of {self.length} characters")

    @property
    def steps_per_epoch(self) -> int:
        """Optimisation steps that draw ``budget`` characters (one epoch, in expectation)."""
        return max(1, round(self.budget / (self.batch_size * self.length)))


@kept_random_state()
def data_constrained(config: StudyConfig | None = None, progress: bool = True) -> dict:
    """Train an AR GPT and a full-sequence masked diffusion LM of the same shape on the first ``config.budget``
    training characters for ``config.epochs`` epochs (same windows, same steps); ``config`` None: a
    :class:`StudyConfig` of its defaults.

    Returns ``{"config", "steps", "steps_per_epoch", "epochs": [...], "ar": [val NLL...], "diffusion": [val
    bound...], "seconds": {...}, "params": {...}}`` (nats/char at each evaluated epoch).
    The caller's global random generators are left as they were (:func:`~ar_course.utils.kept_random_state`).
    ``ValueError`` before any training for a ``budget`` or validation windows longer than the text."""
    from ar_course.data import load_text_dataset, text_batches

    config = StudyConfig() if config is None else config
    tokenizer, train_ids, val_ids = load_text_dataset()
    # a slice past the text would train on fewer characters than the epochs are counted for
    if config.budget > len(train_ids):
        raise ValueError(f"budget ({config.budget}) is more than the training text holds ({len(train_ids)} "
                         "characters)")
    if config.val_windows * config.length + 1 > len(val_ids):
        raise ValueError(f"val_windows * length + 1 ({config.val_windows * config.length + 1}) is more than the "
                         f"validation text holds ({len(val_ids)} characters)")
    unique = train_ids[: config.budget]
    val = val_ids[: config.val_windows * config.length + 1]
    steps = config.steps_per_epoch * config.epochs
    every = config.steps_per_epoch * config.eval_every_epochs
    tc = TrainConfig(steps=steps, lr=config.lr, warmup=min(100, steps // 10), eval_every=every, checkpoint_every=0)
    shape = dict(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd)
    out: dict = {"config": vars(config).copy(), "steps": steps, "steps_per_epoch": config.steps_per_epoch,
                 "seconds": {}, "params": {}}

    seed_everything(config.seed)
    ar = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=config.length, **shape))
    windows = torch.Generator().manual_seed(config.seed + 1)  # the windows diffusion_batches draws too
    start = time.perf_counter()
    hist = train_loop(ar, lambda m, b: m(b[0], targets=b[1])[1],
                      text_batches(unique, config.length, config.batch_size, generator=windows), tc,
                      eval_fn=lambda m: {"val": evaluate_lm(m, val, config.length)}, progress=progress,
                      desc="AR")
    out["seconds"]["ar"] = time.perf_counter() - start
    out["ar"] = [e["val"] for e in hist.evals]

    seed_everything(config.seed)
    dlm = DiffusionLM(DiffusionLMConfig(vocab_size=tokenizer.vocab_size, length=config.length,
                                        train_block_sizes=(0,), **shape))
    start = time.perf_counter()
    hist = train_loop(dlm, lambda m, b: m(b[0], block_size=b[1]).mean(),
                      diffusion_batches(unique, config.length, config.batch_size, (0,), config.seed), tc,
                      eval_fn=lambda m: {"val": evaluate_bound(m, val, max_windows=config.val_windows)},
                      progress=progress, desc="diffusion")
    out["seconds"]["diffusion"] = time.perf_counter() - start
    out["diffusion"] = [e["val"] for e in hist.evals]
    out["epochs"] = [s / config.steps_per_epoch for s in hist.eval_steps]
    out["params"] = {"ar": ar.num_params(), "diffusion": dlm.num_params()}
    return out


def crossing(result: dict) -> dict:
    """Where the two curves of :func:`data_constrained` stand: each one's best validation loss and its epoch, and
    the first evaluated epoch (if any) at which diffusion's loss is below AR's best so far."""
    ar, dm, epochs = result["ar"], result["diffusion"], result["epochs"]
    best_ar, best_dm = min(ar), min(dm)
    passes = next((e for i, e in enumerate(epochs) if dm[i] < min(ar[: i + 1])), None)
    return {"ar_best": best_ar, "ar_best_epoch": epochs[ar.index(best_ar)], "diffusion_best": best_dm,
            "diffusion_best_epoch": epochs[dm.index(best_dm)], "diffusion_best_below_ar_best": best_dm < best_ar,
            "first_epoch_diffusion_below_ar_best_so_far": passes}
