"""Train a character-level GPT on the offline text corpus: ``python -m ar_course train lm ...``.

Presets:

* ``target``: the model chapter 05 speeds up (12 layers, width 128, context 384). At batch 1 on a CPU the
  cost of a token is mostly per-layer overhead, so depth, not width, sets the target's latency.
* ``draft``: its 1-layer, width-128 draft, trained to match the target's next-character distributions
  (distillation: the loss is the cross-entropy against the target's probabilities, as in "DistillSpec" and
  "Direct Alignment of Draft Model"), which raises how often the target accepts its proposals.
* ``tiny``: a 2-layer model small enough to train inside the chapter 02 notebook.
* ``small``: 4 layers, width 128, context 64: chapter 08's autoregressive baseline.

The checkpoint (safetensors, weights rounded to float16 by default) stores the :class:`GPTConfig`, the
vocabulary and the validation loss measured after rounding::

    python -m ar_course train lm --dataset text --preset target --out ar_course/assets/lm_target.safetensors
    python -m ar_course train lm --dataset text --preset draft --out ar_course/assets/lm_draft.safetensors
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ar_course import distributed as ddp
from ar_course import checkpoint
from ar_course.checkpoint import ASSETS, save_checkpoint
from ar_course.cli import (
    ArgumentParser, checkpoint_arg, device_name, float_in, nonnegative_int, path_arg, positive_float, positive_int,
)
from ar_course.train import (
    DEVICE_HELP, TrainConfig, add_run_options, apply_process_options, checkpoint_option, finish_run, out_help,
    prepare_run, seed_int, train_loop, trainer_main,
)
from ar_course.transformer.model import GPT, GPTConfig
from ar_course.utils import (
    check_int, content_digest, count_parameters, eval_mode, get_device, kept_random_state, seed_everything,
)

if TYPE_CHECKING:  # ar_course.data is imported where it is used
    from ar_course.data import CharTokenizer

KIND = "lm"


@dataclass
class LMPreset:
    """Model shape and training schedule of one preset."""

    model: GPTConfig
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    teacher: str | None = None  # path of a checkpoint to distil from
    ema: float = 0.0  # decay of the weight average the run evaluates and ends with (0: the last weights)


PRESETS: dict[str, LMPreset] = {
    "target": LMPreset(GPTConfig(n_layer=12, n_head=4, n_embd=128, block_size=384),
                       seq_len=384, batch_size=8, steps=820, lr=2e-3),
    "draft": LMPreset(GPTConfig(n_layer=1, n_head=4, n_embd=128, block_size=384),
                      seq_len=384, batch_size=8, steps=1000, lr=4e-3, teacher=str(ASSETS / "lm_target.safetensors")),
    "tiny": LMPreset(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128),
                     seq_len=128, batch_size=16, steps=400, lr=5e-3),
    "small": LMPreset(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64),  # chapter 08's AR baseline
                      seq_len=64, batch_size=16, steps=1500, lr=2e-3),
}


@torch.no_grad()
def evaluate_lm(
    model: GPT, ids: torch.Tensor, seq_len: int, batch_size: int = 16, max_windows: int | None = None
) -> float:
    """Mean next-token cross-entropy (nats/char) over consecutive windows of ``ids`` ``(N,)``.

    The windows of ``seq_len + 1`` tokens start every ``seq_len`` tokens (each shares its last token with the
    next one's first, so no token is predicted twice) and are scored in batches; ``max_windows`` evaluates an
    evenly spaced subset instead. Deterministic.

    Raises:
        TypeError: ``max_windows`` not an integer (or None).
        ValueError: ``max_windows`` below 1, or ``ids`` too short for one window."""
    if max_windows is not None:
        max_windows = check_int("max_windows", max_windows, lo=1)
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(ids)} tokens are too few for windows of {seq_len + 1}")
    starts = torch.arange(n) * seq_len
    if max_windows is not None and max_windows < n:
        starts = starts[torch.linspace(0, n - 1, max_windows).long()]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(starts), batch_size):
            s = starts[i : i + batch_size]
            win = torch.stack([ids[j : j + seq_len + 1] for j in s.tolist()]).to(device)  # (b, seq_len+1)
            _, loss = model(win[:, :-1], targets=win[:, 1:])
            total += float(loss) * len(s)
            count += len(s)
    return total / count


def check_teacher(teacher: GPT, seq_len: int, vocab_size: int) -> None:
    """``ValueError`` unless ``teacher`` reads windows of ``seq_len`` characters (its context is at least that) of
    the corpus's ``vocab_size`` characters: distillation runs it on the student's training windows."""
    c = teacher.config
    if c.block_size < seq_len:
        raise ValueError(f"the teacher's context of {c.block_size} positions is shorter than the preset's "
                         f"{seq_len}-character windows")
    if c.vocab_size != vocab_size:
        raise ValueError(f"the teacher models {c.vocab_size} characters, the corpus has {vocab_size}")


def distill_loss(student: GPT, teacher: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's next-token probabilities on ``x`` ``(B, T)``.

    Minimising it minimises KL(teacher || student) (the teacher's entropy is a constant). ``y``, the data's
    targets, is not used: it is there so that a batch ``(x, y)`` can be passed as it comes."""
    with torch.no_grad():
        p = torch.softmax(teacher(x)[0].float(), dim=-1)  # (B, T, V)
    logits, _ = student(x)
    return F.cross_entropy(logits.flatten(0, 1), p.flatten(0, 1))


def round_to_half(model: torch.nn.Module) -> None:
    """Round every parameter to float16 precision in place (what a float16 checkpoint will hold)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


@kept_random_state()
def train_lm(
    preset: LMPreset,
    seed: int = 0,
    device: torch.device | str = "cpu",
    teacher: GPT | None = None,
    progress: bool = True,
    eval_every: int = 0,
    checkpoint_every: int = TrainConfig.checkpoint_every,
    state_path: Path | None = None,
    resume: bool = False,
    keep_best: bool = False,
    train_ids: torch.Tensor | None = None,
    val_ids: torch.Tensor | None = None,
    tokenizer: CharTokenizer | None = None,
) -> tuple[GPT, dict]:
    """Train a character-level GPT with ``preset`` on the text corpus (or on ``train_ids`` ``(N,)``); return
    ``(model, info)``.

    ``preset.batch_size`` is the global batch (split across processes under ``torchrun``). ``keep_best``: end
    with the weights of the evaluation (every ``eval_every`` steps) with the lowest validation loss.
    ``checkpoint_every`` / ``state_path`` / ``resume``: see :func:`~ar_course.train.train_loop`. ``info``
    holds the tokenizer, the loss history, the training time, the tokens seen and the validation token ids.
    The caller's global random generators are left as they were (:func:`~ar_course.utils.kept_random_state`).
    Text of your own: ``tokenizer`` (e.g. ``CharTokenizer.from_text(text)``) sets the vocabulary, ``train_ids`` /
    ``val_ids`` are its ids (:func:`~ar_course.data.text_training_data`, whose ``ValueError`` it raises).
    ``ValueError`` before training for a ``teacher`` that does not fit (:func:`check_teacher`)."""
    from ar_course.data import text_batches, text_training_data

    tokenizer, train_ids, val_ids = text_training_data(train_ids, val_ids, tokenizer,
                                                       evaluates=bool(eval_every or keep_best))
    if teacher is not None:
        check_teacher(teacher, preset.seq_len, tokenizer.vocab_size)
    seed_everything(seed)
    config = replace(preset.model, vocab_size=tokenizer.vocab_size)
    device = get_device(device)  # "auto", "cuda:1"...; an unknown or missing device in one line
    model = GPT(config).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    batches: Iterator = text_batches(train_ids, preset.seq_len, preset.batch_size, generator=gen, device=device)
    if teacher is not None:
        teacher = teacher.to(device).eval()
        loss_fn = lambda m, b: distill_loss(m, teacher, *b)  # noqa: E731
    else:
        loss_fn = lambda m, b: m(b[0], targets=b[1])[1]  # noqa: E731
    eval_fn = lambda m: {"val_loss": evaluate_lm(m, val_ids, preset.seq_len, max_windows=24)}  # noqa: E731
    tc = TrainConfig(steps=preset.steps, lr=preset.lr, warmup=min(100, preset.steps // 10),
                     eval_every=eval_every, checkpoint_every=checkpoint_every,
                     keep_best="val_loss" if keep_best else "", ema=preset.ema)
    history = train_loop(model, loss_fn, batches, tc, eval_fn=eval_fn if eval_every else None,
                         progress=progress, desc="train lm", state_path=state_path, resume=resume,
                         settings={"seed": seed, "batch_size": preset.batch_size, "data": content_digest(train_ids),
                                   "teacher": content_digest(teacher) if teacher is not None else None})
    info = {
        "tokenizer": tokenizer,
        "history": history,
        "train_seconds": history.seconds,  # every process of a resumed run
        "tokens_seen": preset.steps * preset.batch_size * preset.seq_len,
        "val_ids": val_ids,
    }
    return model, info


def add_text_trainer_options(parser: argparse.ArgumentParser, *, measure: str) -> None:
    """The options the text-model trainers (``train lm``, ``train diffusion_lm``) share after their own:
    ``--float32``, ``--eval-every`` (the ``measure`` every N steps), ``--keep-best``, ``--ema``, ``--device``,
    and the run options (:func:`~ar_course.train.add_run_options`: ``--threads``, ``--no-progress``, ``--resume``,
    ``--checkpoint-every``)."""
    parser.add_argument("--float32", action="store_true", help="store float32 weights (default: float16)")
    parser.add_argument("--eval-every", type=nonnegative_int, default=0,
                        help=f"{measure} every N steps (0: at the end)")
    parser.add_argument("--keep-best", action="store_true",
                        help=f"save the weights of the evaluation with the lowest {measure}, not the last ones "
                             "(early stopping; use with --eval-every)")
    parser.add_argument("--ema", type=float_in(0.0, 1.0, hi_open=True), default=None, metavar="DECAY",
                        help="evaluate and save a moving average of the weights with this decay (0: the last "
                             "weights; default: the preset's)")
    parser.add_argument("--device", type=device_name, default=None, help=DEVICE_HELP)
    add_run_options(parser)


def apply_text_trainer_options(parser: argparse.ArgumentParser, args: argparse.Namespace, presets: dict,
                               seq_len: Callable[[Any], int]) -> Any:
    """Check ``--keep-best`` (it needs ``--eval-every``), apply ``--threads``, and return the preset
    ``args.preset`` of ``presets`` with the ``--steps``, ``--batch-size``, ``--lr`` and ``--ema`` given on the command
    line in place of its own. Its batch must not hold more windows (of ``seq_len(preset)`` characters) than the
    training text has: a usage error."""
    if args.keep_best and not args.eval_every:
        parser.error("--keep-best needs --eval-every N: the evaluations it chooses from")
    apply_process_options(args)
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema}
    preset = replace(presets[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    from ar_course.data import load_text_dataset

    windows = len(load_text_dataset()[1]) // seq_len(preset)
    if preset.batch_size > windows:
        parser.error(f"--batch-size {preset.batch_size} is larger than the {windows} windows of {seq_len(preset)} "
                     f"characters in the training text")
    return preset


def run_record(args: argparse.Namespace, preset: LMPreset, model: torch.nn.Module, info: dict) -> dict:
    """What every text-model checkpoint records of its run: vocabulary, preset, seed, schedule, characters seen,
    training time, the mean of the last 50 training losses, parameters and the evaluations along the way."""
    history = info["history"]
    tail = history.loss[-50:]
    return {"vocab": info["tokenizer"].chars, "preset": args.preset, "seed": args.seed, "steps": preset.steps,
            "batch_size": preset.batch_size, "lr": preset.lr, "ema": preset.ema, "tokens_seen": info["tokens_seen"],
            "train_seconds": round(info["train_seconds"], 1), "train_loss_last50": round(sum(tail) / len(tail), 4),
            "params": count_parameters(model), "best_step": history.best_step,
            "evals": [{"step": s, **e} for s, e in zip(history.eval_steps, history.evals)]}


def save_text_model(model: torch.nn.Module, out: Path, *, kind: str, float32: bool, state_path: Path,
                    extra: dict) -> None:
    """The end of a text-model trainer: write ``model`` to ``out`` (float16 unless ``float32``) with the
    recorded ``extra``, remove the run's training state, and print what was saved."""
    state = {k: (v.half() if not float32 and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    save_checkpoint(out, state, model.config, kind=kind, **extra)
    finish_run(state_path)
    summary = {k: v for k, v in extra.items() if k not in ("vocab", "evals")}
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB): {json.dumps(summary)}")


@trainer_main
def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course train lm [--preset target|draft|tiny|small] [--steps N] [--out PATH] ...``."""
    parser = ArgumentParser(
        prog="python -m ar_course train lm",
        description="Train a character-level GPT on the offline text corpus (pydoc_data.topics).",
    )
    parser.add_argument("--dataset", choices=["text"], default="text", help="training corpus (default: text)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="target", help="model size and schedule")
    parser.add_argument("--steps", type=positive_int, default=None, help="optimisation steps (default: the preset's)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="global batch of windows, split across processes under torchrun (default: the preset's)")
    parser.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", type=path_arg, default=None,
                        help=out_help("ar_course/assets/lm_<preset>.safetensors"))
    parser.add_argument("--teacher", type=checkpoint_arg, default=None,
                        help="lm checkpoint to distil from, a shipped name or a path (default: the preset's; 'draft' "
                             "uses lm_target)")
    parser.add_argument("--no-distill", action="store_true", help="train on the data only, even for 'draft'")
    add_text_trainer_options(parser, measure="validation loss")
    args = parser.parse_args(argv)
    if args.teacher is not None and args.no_distill:
        parser.error("--teacher and --no-distill conflict: distil from --teacher, or train on the data only")
    preset = apply_text_trainer_options(parser, args, PRESETS, lambda p: p.seq_len)
    out = args.out or ASSETS / f"lm_{args.preset}.safetensors"
    teacher_path = None if args.no_distill else (args.teacher or preset.teacher)
    state_path = prepare_run(parser, out, args.resume, preset.batch_size, {"--teacher": teacher_path})
    device = get_device(args.device)
    with checkpoint_option(parser, "--teacher"):
        teacher = checkpoint.load(teacher_path, kind=KIND) if teacher_path else None
    if teacher is not None:
        from ar_course.data import TEXT_ALPHABET

        try:  # before the corpus is read and the student built, not in the first distillation step
            check_teacher(teacher, preset.seq_len, len(TEXT_ALPHABET))
        except ValueError as exc:
            parser.error(f"--teacher {teacher_path}: {exc}")

    model, info = train_lm(preset, args.seed, device, teacher, not args.no_progress, args.eval_every,
                           checkpoint_every=args.checkpoint_every, state_path=state_path, resume=args.resume,
                           keep_best=args.keep_best)
    if not ddp.is_main_process():
        return 0
    model = model.cpu()
    if not args.float32:
        round_to_half(model)
    val_loss = evaluate_lm(model, info["val_ids"], preset.seq_len)
    extra = {**run_record(args, preset, model, info), "seq_len": preset.seq_len, "val_loss": round(val_loss, 4),
             "distilled_from": str(Path(teacher_path).name) if teacher_path else None}
    save_text_model(model, out, kind=KIND, float32=args.float32, state_path=state_path, extra=extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
