"""Fine-tune the shipped raster model: ``python -m ar_course train grpo`` and ``python -m ar_course train cca``;
and the shipped VAR: ``python -m ar_course train cca --model var``.

All start from a shipped model (``--base``: ``ar_mnist``, or ``var_mnist`` with ``--model var``), keep a frozen
copy as the reference, run from a fixed seed, and write a float16 checkpoint of the base model's kind
(``raster_ar`` or ``var``, so every loader of chapter 03 or 04 models reads it) that records the run's options
and curves. The shipped ones are ``ar_mnist_grpo``, ``ar_mnist_cca`` and ``var_mnist_cca`` in
``ar_course/assets/``, made with the defaults (``train cca --model var`` for ``var_mnist_cca``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path


from ar_course import checkpoint, raster, var
from ar_course.align.cca import CCAConfig, train_cca, var_log_probs
from ar_course.align.grpo import GRPOConfig, evaluate, train_grpo
from ar_course.align.rewards import REWARDS
from ar_course.cli import (
    ArgumentParser, checkpoint_arg, device_name, int_in, nonnegative_float, nonnegative_int, path_arg, positive_float,
    positive_int,
)
from ar_course.train import (
    DEVICE_HELP, NOT_MEASURED, add_process_options, apply_process_options, check_batch_size, check_out,
    checkpoint_option, out_help, per_class_int, seed_int, trainer_main,
)
from ar_course.utils import get_device

GRPO_PATH = checkpoint.ASSETS / "ar_mnist_grpo.safetensors"
CCA_PATH = checkpoint.ASSETS / "ar_mnist_cca.safetensors"
VAR_CCA_PATH = checkpoint.ASSETS / "var_mnist_cca.safetensors"
CCA_MODELS = {"ar": (raster.CHECKPOINT_KIND, "ar_mnist", CCA_PATH, {}),
              "var": (var.CHECKPOINT_KIND, "var_mnist", VAR_CCA_PATH, {"lr": 3e-4, "lam": 3.0})}
"""``train cca --model``: (checkpoint kind, default ``--base``, default ``--out``, the defaults that differ from
:class:`CCAConfig`'s: VAR took a larger step and a stronger weight on the negatives to reach the class accuracy
of its best guidance)."""


def _common(parser: ArgumentParser, out: Path | None, base: str | None = "ar_mnist", what: str = "raster",
            shipped: str | None = None) -> None:
    """``--base``, ``--seed``, ``--device``, ``--out`` (``None`` defaults: set by the trainer from ``--model``) and the
    process options of every trainer (:func:`~ar_course.train.add_process_options`: ``--threads``,
    ``--no-progress``)."""
    parser.add_argument("--base", type=checkpoint_arg, default=base,
                        help=f"{what} checkpoint to start from (name or path)")
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--device", type=device_name, default=None, help=DEVICE_HELP)
    parser.add_argument("--out", type=path_arg, default=out,
                        help=out_help(f"the shipped {shipped or out.name}"))
    add_process_options(parser)


def _load(args: argparse.Namespace, parser: ArgumentParser, kind: str = raster.CHECKPOINT_KIND):
    """``(policy, reference, tokenizer, device)`` after checking ``--out`` (:func:`~ar_course.train.check_out`: not
    the ``--base`` file either); ``--base`` must be of ``kind`` and a model of MNIST's 10 classes over a tokenizer of
    32-pixel, 1-channel images, what these trainers fine-tune on (a usage error, before any data is read)."""
    check_out(parser, args.out, {"--base": args.base})
    device = get_device(args.device)
    with checkpoint_option(parser, "--base"):
        policy, tokenizer = checkpoint.load_with_tokenizer(args.base, device, kind=kind)
    tc = tokenizer.config
    if policy.config.n_classes != 10 or tc.in_channels != 1 or tc.image_size != 32:
        recorded = checkpoint.info(args.base).get("dataset")
        where = f" (the {recorded!r} set)" if recorded else ""
        parser.error(f"--base {args.base} is a model of {policy.config.n_classes} classes over "
                     f"{tc.in_channels}-channel {tc.image_size}-pixel images{where}; {parser.prog} fine-tunes on "
                     "MNIST digits only (10 classes, 1 channel, 32 pixels)")
    return policy, copy.deepcopy(policy), tokenizer, device


def _save(args: argparse.Namespace, policy, tokenizer_name: str | Path, method: str, config, curves: dict,
          eval_per_class: int, tokenizer, kind: str = raster.CHECKPOINT_KIND) -> None:
    """Write ``policy`` (float16, kind ``kind``) with the run's record and its class accuracy at guidance 0 on
    ``eval_per_class`` samples per class (fixed seed; ``0``: not measured). ``tokenizer_name``: the base's
    tokenizer (:func:`~ar_course.checkpoint.recorded_tokenizer`), recorded relative to ``--out``."""
    if not eval_per_class:
        accuracy = None
    elif kind == var.CHECKPOINT_KIND:
        from ar_course.var.train import class_accuracy_at

        accuracy = class_accuracy_at(policy, tokenizer, 0.0, eval_per_class, seed=1234)
    else:
        accuracy = evaluate(policy, tokenizer, eval_per_class)[0]
    state = {k: v.half() for k, v in policy.state_dict().items()}
    out = checkpoint.save_checkpoint(args.out, state, policy.config, kind=kind,
                                     **checkpoint.tokenizer_record(tokenizer, tokenizer_name, args.out),
                                     base=str(args.base), method=method,
                                     options=dataclasses.asdict(config), curves=curves,
                                     accuracy_cfg0=accuracy, eval_per_class=eval_per_class)
    shown = NOT_MEASURED if accuracy is None else f"{accuracy:.1%}"
    print(f"class accuracy at guidance 0: {shown}\nsaved {out} ({out.stat().st_size / 1024:.0f} KB)")


MAX_GROUP = 1024
"""Largest ``--group-size``: a GRPO step samples ``group_size`` images of each class."""


@trainer_main
def grpo_main(argv: list[str] | None = None) -> int:
    """``python -m ar_course train grpo [--steps N] [--reward classifier|brightness] [--kl-coef B] ...``"""
    d = GRPOConfig()
    parser = ArgumentParser(prog="python -m ar_course train grpo",
                            description="Fine-tune the raster AR model with GRPO against a reward, with a KL "
                                        "penalty to the frozen base model.")
    parser.add_argument("--steps", type=positive_int, default=d.steps)
    parser.add_argument("--group-size", type=int_in(2, MAX_GROUP), default=d.group_size,
                        help=f"samples per class and step, 2 to {MAX_GROUP} [%(default)s]")
    parser.add_argument("--lr", type=positive_float, default=d.lr)
    parser.add_argument("--clip", type=positive_float, default=d.clip)
    parser.add_argument("--kl-coef", type=nonnegative_float, default=d.kl_coef,
                        help="weight of the k3 KL penalty [%(default)s]")
    parser.add_argument("--inner-steps", type=positive_int, default=d.inner_steps)
    parser.add_argument("--reward", choices=sorted(REWARDS), default=d.reward)
    parser.add_argument("--eval-every", type=nonnegative_int, default=d.eval_every)
    parser.add_argument("--eval-per-class", type=per_class_int, default=d.eval_per_class)
    _common(parser, GRPO_PATH)
    args = parser.parse_args(argv)
    try:
        config = GRPOConfig(steps=args.steps, group_size=args.group_size, lr=args.lr, clip=args.clip,
                            kl_coef=args.kl_coef, inner_steps=args.inner_steps, reward=args.reward, seed=args.seed,
                            eval_every=args.eval_every if args.eval_per_class else 0,
                            eval_per_class=args.eval_per_class)
    except ValueError as exc:
        parser.error(str(exc))
    policy, reference, tokenizer, _ = _load(args, parser)
    log = train_grpo(policy, reference, tokenizer, config, progress=apply_process_options(args))
    _save(args, policy, checkpoint.recorded_tokenizer(args.base), "grpo", config, log.as_dict(),
          args.eval_per_class, tokenizer)
    return 0


@trainer_main
def cca_main(argv: list[str] | None = None) -> int:
    """``python -m ar_course train cca [--model ar|var] [--steps N] [--lam L] [--beta B] ...``"""
    d = CCAConfig()
    parser = ArgumentParser(prog="python -m ar_course train cca",
                            description="Fine-tune the raster AR model (or VAR, --model var) with Condition "
                                        "Contrastive Alignment on MNIST tokens, for sampling without guidance.")
    parser.add_argument("--model", choices=tuple(CCA_MODELS), default="ar",
                        help="raster AR (chapter 03, base ar_mnist) or VAR (chapter 04, base var_mnist)")
    parser.add_argument("--steps", type=positive_int, default=d.steps)
    parser.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    parser.add_argument("--lr", type=positive_float, default=None,
                        help=f"learning rate (default: {d.lr:g}; {CCA_MODELS['var'][3]['lr']:g} with --model var)")
    parser.add_argument("--beta", type=positive_float, default=d.beta)
    parser.add_argument("--lam", type=nonnegative_float, default=None,
                        help=f"weight of the negative pairs, >= 0 (default: {d.lam:g}; "
                             f"{CCA_MODELS['var'][3]['lam']:g} with --model var)")
    parser.add_argument("--train-images", type=positive_int, default=10_000, metavar="N",
                        help="use the first N training digits [%(default)s]")
    parser.add_argument("--eval-per-class", type=per_class_int, default=20)
    _common(parser, None, base=None, what="raster or VAR (default: ar_mnist or var_mnist by --model)",
            shipped=f"{CCA_PATH.name} or {VAR_CCA_PATH.name} by --model")
    args = parser.parse_args(argv)
    check_batch_size(parser, args.batch_size, "mnist", args.train_images)
    kind, base, out, defaults = CCA_MODELS[args.model]
    args.base = base if args.base is None else args.base
    args.out = out if args.out is None else args.out
    lr = defaults.get("lr", d.lr) if args.lr is None else args.lr
    lam = defaults.get("lam", d.lam) if args.lam is None else args.lam
    try:
        config = CCAConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, beta=args.beta, lam=lam,
                           seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    policy, reference, tokenizer, _ = _load(args, parser, kind)
    progress = apply_process_options(args)
    from ar_course.data import load_mnist

    images, labels = load_mnist("train", size=32)
    if args.model == "var":
        from ar_course.var.functional import flatten_pyramids
        from ar_course.var.train import encode_pyramids

        tokens = flatten_pyramids(encode_pyramids(tokenizer, images[:args.train_images]))  # (N, L)
        log = train_cca(policy, reference, tokens, labels[:args.train_images], config,
                        log_probs=var_log_probs(tokenizer.quantizer), progress=progress)
    else:
        from ar_course.raster.train import encode_dataset

        maps = encode_dataset(tokenizer, images[:args.train_images])  # (N, 8, 8)
        log = train_cca(policy, reference, maps, labels[:args.train_images], config, progress=progress)
    _save(args, policy, checkpoint.recorded_tokenizer(args.base), "cca", config, log.as_dict(),
          args.eval_per_class, tokenizer, kind)
    return 0
