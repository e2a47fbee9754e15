"""Train a masked diffusion LM on the text corpus: ``python -m ar_course train diffusion_lm ...``.

The ``small`` preset has the shape, windows, batch and learning rate of chapter 02's ``small`` AR preset
(``python -m ar_course train lm --preset small``) and draws the same windows in the same order from the same
seed, but trains 40,000 steps (about 98 epochs of the corpus) to the AR preset's 1,500. Each of its batches uses
one block size drawn from ``DiffusionLMConfig.train_block_sizes`` (0: full-sequence diffusion), so that one
model serves full and block-wise generation.

The shipped ``diffusion_lm`` continues that run with a second schedule (``--init``): 28,000 steps on
full-sequence batches only (``--train-blocks 0``) from a peak learning rate of 1e-3, so 68,000 steps (about 166
epochs) in all. Masked diffusion keeps gaining from repeated data long after AR stops: stretched to 15,000 steps,
the AR run overfits the small corpus, and neither its best evaluation (with ``--eval-every 500 --keep-best``) nor
its last beats the 1,500-step model on held-out text. The second schedule lowers the full-sequence bound and
raises the block-wise ones (``benchmarks/bench_diffusion_lm.py`` measures both). Each run records its validation
measure along the way (``evals``; a continued run records the whole chain)::

    python -m ar_course train diffusion_lm --preset small --threads 2 --eval-every 500 \
        --out /tmp/diffusion_lm_40k.safetensors
    python -m ar_course train diffusion_lm --preset small --init /tmp/diffusion_lm_40k.safetensors \
        --train-blocks 0 --seed 1 --lr 1e-3 --steps 28000 --threads 1 --eval-every 2000 \
        --out ar_course/assets/diffusion_lm.safetensors
    python -m ar_course train lm --preset small --threads 1 --eval-every 100 --out ar_course/assets/lm_small.safetensors
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from ar_course import distributed as ddp
from ar_course.checkpoint import ASSETS, load
from ar_course.checkpoint import info as checkpoint_info
from ar_course.cli import ArgumentParser, checkpoint_arg, int_list, path_arg, positive_float, positive_int
from ar_course.diffusion_lm.model import DiffusionLM, DiffusionLMConfig
from ar_course.train import (
    TrainConfig, checkpoint_option, out_help, prepare_run, seed_int, train_loop, trainer_main,
)
from ar_course.transformer.train import PRESETS as LM_PRESETS
from ar_course.transformer.train import (
    add_text_trainer_options, apply_text_trainer_options, round_to_half, run_record, save_text_model,
)
from ar_course.utils import content_digest, get_device, kept_random_state, seed_everything

if TYPE_CHECKING:  # ar_course.data is imported where it is used
    from ar_course.data import CharTokenizer

KIND = "diffusion_lm"


@dataclass
class DiffusionPreset:
    """Model shape and training schedule of one preset."""

    model: DiffusionLMConfig
    batch_size: int
    steps: int
    lr: float
    ema: float = 0.0  # decay of the weight average the run evaluates and ends with (0: the last weights)


_AR = LM_PRESETS["small"]
PRESETS: dict[str, DiffusionPreset] = {
    "small": DiffusionPreset(
        DiffusionLMConfig(length=_AR.seq_len, n_layer=_AR.model.n_layer, n_head=_AR.model.n_head,
                          n_embd=_AR.model.n_embd),
        batch_size=_AR.batch_size, steps=40_000, lr=_AR.lr),
}


def diffusion_batches(ids: torch.Tensor, length: int, batch_size: int, block_sizes: tuple[int, ...], seed: int,
                      device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, int]]:
    """Endless ``(windows (batch_size, length), block_size)``: the ``x`` windows of
    :func:`~ar_course.data.text_batches` with a generator seeded ``seed + 1`` (the windows chapter 02's trainer
    draws with ``seed``) and a block size drawn from ``block_sizes`` (0 becomes ``length``) with one seeded
    ``seed + 2``. ``ValueError`` for ``block_sizes`` that is empty."""
    from ar_course.data import text_batches

    if len(block_sizes) == 0:
        raise ValueError("block_sizes must list at least one block size (0: the whole window)")

    windows = torch.Generator().manual_seed(seed + 1)
    picks = torch.Generator().manual_seed(seed + 2)
    for x, _ in text_batches(ids, length, batch_size, generator=windows, device=device):
        b = block_sizes[int(torch.randint(len(block_sizes), (1,), generator=picks))]
        yield x, b or length


def _load_init(model: DiffusionLM, init: str | Path) -> None:
    """Copy the weights of the ``diffusion_lm`` checkpoint ``init`` into ``model``; a checkpoint of another
    shape is a ``ValueError`` naming both shapes."""
    source = load(init, kind=KIND)
    want = replace(source.config, train_block_sizes=model.config.train_block_sizes)
    if want != model.config:
        raise ValueError(f"--init {init}: its model {source.config} is not the preset's {model.config}")
    model.load_state_dict(source.state_dict())


def continued_record(init: str, prior: dict, record: dict) -> dict:
    """The entries a run started from ``init`` (whose checkpoint recorded ``prior``) sets in its ``record``: the
    file name of the checkpoint it started from (not its path, which names a folder of the training machine), the
    steps before this run (``init_steps``, summed over a chain of runs), and the evaluations of the whole chain,
    with this run's steps (and ``best_step``) counted after ``init_steps``."""
    init_steps = prior.get("init_steps", 0) + prior["steps"]
    best = record["best_step"]
    return {"init": Path(init).name, "init_steps": init_steps, "best_step": None if best is None else best + init_steps,
            "evals": prior.get("evals", []) + [{**e, "step": e["step"] + init_steps} for e in record["evals"]]}


@torch.no_grad()
def evaluate_bound(model: DiffusionLM, ids: torch.Tensor, max_windows: int = 64, samples: int = 2,
                   block_size: int | None = None, seed: int = 0) -> float:
    """The NLL bound (nats/char) on up to ``max_windows`` evenly spaced windows of ``ids`` ``(N,)``; seeded.
    ``ValueError`` unless ``ids`` is a 1-D token stream holding at least one window of ``model.config.length``."""
    L = model.config.length
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or len(ids) < L:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a 1-D tensor of token ids holding at least one window of {L}, got {shape}")
    n = len(ids) // L
    rows = torch.linspace(0, n - 1, min(max_windows, n)).long()
    windows = ids[: n * L].view(n, L)[rows]  # (min(max_windows, n), L)
    return model.nll_bound(windows, block_size=block_size, samples=samples,
                           generator=torch.Generator().manual_seed(seed))


@kept_random_state()
def train_diffusion_lm(
    preset: DiffusionPreset,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    eval_every: int = 0,
    train_ids: torch.Tensor | None = None,
    val_ids: torch.Tensor | None = None,
    checkpoint_every: int = TrainConfig.checkpoint_every,
    state_path: Path | None = None,
    resume: bool = False,
    keep_best: bool = False,
    init: str | Path | None = None,
    train_block_sizes: tuple[int, ...] | None = None,
    tokenizer: CharTokenizer | None = None,
) -> tuple[DiffusionLM, dict]:
    """Train a :class:`DiffusionLM` with ``preset`` on the text corpus (or on ``train_ids`` ``(N,)``); return
    ``(model, info)`` with the tokenizer, the loss history (evals: the NLL bound on ``val_ids``), the training
    time, the characters seen and the validation ids. ``keep_best``: end with the weights of the evaluation
    (every ``eval_every`` steps) with the lowest bound. ``init``: start from the weights of a ``diffusion_lm``
    checkpoint of the preset's shape (a second schedule after a first run); ``train_block_sizes``: the block
    sizes batches draw from, in place of the preset's.

    Text of your own: ``tokenizer`` (e.g. ``CharTokenizer.from_text(text)``) sets the vocabulary, and
    ``train_ids`` / ``val_ids`` are its ids (:func:`~ar_course.data.text_training_data`, whose ``ValueError``
    it raises: a ``tokenizer`` without ``train_ids``, ids outside its vocabulary, or ``eval_every`` /
    ``keep_best`` with ``train_ids`` but no ``val_ids``).
    The caller's global random generators are left as they were (:func:`~ar_course.utils.kept_random_state`)."""
    from ar_course.data import text_training_data

    tokenizer, train_ids, val_ids = text_training_data(train_ids, val_ids, tokenizer,
                                                       evaluates=bool(eval_every or keep_best))
    seed_everything(seed)
    config = replace(preset.model, vocab_size=tokenizer.vocab_size)
    if train_block_sizes is not None:
        config = replace(config, train_block_sizes=tuple(train_block_sizes))
    model = DiffusionLM(config)
    if init is not None:
        _load_init(model, init)
    initial = content_digest(model) if init is not None else None  # a resume starts from the same weights
    device = get_device(device)  # "auto", "cuda:1"...; an unknown or missing device in one line
    model = model.to(device)
    batches = diffusion_batches(train_ids, config.length, preset.batch_size, config.train_block_sizes, seed, device)
    loss_fn = lambda m, batch: m(batch[0], block_size=batch[1]).mean()  # noqa: E731
    eval_fn = lambda m: {"val_bound": evaluate_bound(m, val_ids, max_windows=24)}  # noqa: E731
    tc = TrainConfig(steps=preset.steps, lr=preset.lr, warmup=min(100, preset.steps // 10), eval_every=eval_every,
                     checkpoint_every=checkpoint_every, keep_best="val_bound" if keep_best else "", ema=preset.ema)
    history = train_loop(model, loss_fn, batches, tc, eval_fn=eval_fn if eval_every else None, progress=progress,
                         desc="train diffusion_lm", state_path=state_path, resume=resume,
                         settings={"seed": seed, "batch_size": preset.batch_size, "data": content_digest(train_ids),
                                   "init": initial})
    info = {"tokenizer": tokenizer, "history": history, "train_seconds": history.seconds,  # every process
            "tokens_seen": preset.steps * preset.batch_size * config.length, "val_ids": val_ids}
    return model, info


@trainer_main
def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course train diffusion_lm [--preset small] [--steps N] [--init CHECKPOINT] [--train-blocks
    B,B,...] [--out PATH] ...``"""
    parser = ArgumentParser(prog="python -m ar_course train diffusion_lm",
                            description="Train a masked diffusion LM on the offline text corpus (pydoc_data.topics).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size and schedule")
    parser.add_argument("--steps", type=positive_int, default=None, help="optimisation steps (default: the preset's)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="batch of windows (default: the preset's)")
    parser.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", type=path_arg, default=None,
                        help=out_help("ar_course/assets/diffusion_lm.safetensors"))
    parser.add_argument("--init", type=checkpoint_arg, default=None, metavar="CHECKPOINT",
                        help="start from the weights of a diffusion_lm checkpoint (a file or a shipped name) of the "
                             "preset's shape instead of a random init: a second schedule after a first run")
    parser.add_argument("--train-blocks", type=int_list(0), default=None, metavar="B,B,...",
                        help="block sizes a training batch draws from, 0 for full-sequence diffusion "
                             "(default: the preset's, 0,0,1,4,16)")
    add_text_trainer_options(parser, measure="validation bound")
    args = parser.parse_args(argv)
    preset = apply_text_trainer_options(parser, args, PRESETS, lambda p: p.model.length)
    if args.train_blocks is not None:
        try:
            replace(preset.model, train_block_sizes=args.train_blocks)
        except ValueError as exc:
            parser.error(f"--train-blocks: {exc}")
    with checkpoint_option(parser, "--init"):
        prior = checkpoint_info(args.init) if args.init else None  # read before --out may overwrite it
    if prior is not None and prior["kind"] != KIND:
        parser.error(f"--init {args.init} holds a {prior['kind']!r} checkpoint, expected {KIND!r}")
    out = args.out or ASSETS / "diffusion_lm.safetensors"
    state_path = prepare_run(parser, out, args.resume, preset.batch_size)
    model, info = train_diffusion_lm(preset, args.seed, get_device(args.device), not args.no_progress,
                                     args.eval_every, checkpoint_every=args.checkpoint_every,
                                     state_path=state_path, resume=args.resume, keep_best=args.keep_best,
                                     init=args.init, train_block_sizes=args.train_blocks)
    if not ddp.is_main_process():
        return 0
    model = model.cpu()
    if not args.float32:
        round_to_half(model)
    extra = {**run_record(args, preset, model, info), "seq_len": model.config.length,
             "val_bound": round(evaluate_bound(model, info["val_ids"]), 4)}
    if prior is not None:
        extra.update(continued_record(args.init, prior, extra))
    save_text_model(model, out, kind=KIND, float32=args.float32, state_path=state_path, extra=extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
