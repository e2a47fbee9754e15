"""Fine-tune the shipped raster model: ``python -m ar_course train grpo`` and ``python -m ar_course train cca``.

Both start from the shipped ``ar_mnist`` model (``--base``), keep a frozen copy as the reference, run from a
fixed seed, and write a float16 raster checkpoint (kind ``raster_ar``, so every loader of chapter 03 models
reads it) that records the run's options and curves. The shipped ones are ``ar_mnist_grpo`` and
``ar_mnist_cca`` in ``ar_course/assets/``, made with the defaults.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import torch

from ar_course import checkpoint, raster
from ar_course.align.cca import CCAConfig, train_cca
from ar_course.align.grpo import GRPOConfig, evaluate, train_grpo
from ar_course.align.rewards import REWARDS
from ar_course.cli import ArgumentParser, nonnegative_int, positive_float, positive_int
from ar_course.files import check_output_path
from ar_course.train import trainer_main
from ar_course.utils import get_device

GRPO_PATH = checkpoint.ASSETS / "ar_mnist_grpo.safetensors"
CCA_PATH = checkpoint.ASSETS / "ar_mnist_cca.safetensors"


def _common(parser: ArgumentParser, out: Path) -> None:
    parser.add_argument("--base", default="ar_mnist", help="raster checkpoint to start from (name or path)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, default=out, help=f"checkpoint path (default: the shipped {out.name})")


def _load(args: argparse.Namespace, parser: ArgumentParser):
    """``(policy, reference, tokenizer, device)`` after checking ``--out``."""
    try:
        check_output_path(args.out, suffix=".safetensors")
    except ValueError as exc:
        parser.error(str(exc))
    device = get_device(args.device)
    policy, tokenizer = checkpoint.load_with_tokenizer(args.base, device, kind=raster.CHECKPOINT_KIND)
    return policy, copy.deepcopy(policy), tokenizer, device


def _save(args: argparse.Namespace, policy, tokenizer_name: str, method: str, config, curves: dict,
          eval_per_class: int, tokenizer) -> None:
    accuracy = evaluate(policy, tokenizer, eval_per_class)[0] if eval_per_class else None
    state = {k: v.half() for k, v in policy.state_dict().items()}
    out = checkpoint.save_checkpoint(args.out, state, policy.config, kind=raster.CHECKPOINT_KIND,
                                     tokenizer=tokenizer_name, base=str(args.base), method=method,
                                     options=dataclasses.asdict(config), curves=curves,
                                     accuracy_cfg0=accuracy, eval_per_class=eval_per_class)
    print(f"class accuracy at guidance 0: {accuracy}\nsaved {out} ({out.stat().st_size / 1024:.0f} KB)")


@trainer_main
def grpo_main(argv: list[str] | None = None) -> int:
    """``python -m ar_course train grpo [--steps N] [--reward classifier|brightness] [--kl-coef B] ...``"""
    d = GRPOConfig()
    parser = ArgumentParser(prog="python -m ar_course train grpo",
                            description="Fine-tune the raster AR model with GRPO against a reward, with a KL "
                                        "penalty to the frozen base model.")
    parser.add_argument("--steps", type=positive_int, default=d.steps)
    parser.add_argument("--group-size", type=int, default=d.group_size, help="samples per class and step (>= 2)")
    parser.add_argument("--lr", type=positive_float, default=d.lr)
    parser.add_argument("--clip", type=positive_float, default=d.clip)
    parser.add_argument("--kl-coef", type=float, default=d.kl_coef, help="weight of the k3 KL penalty (>= 0)")
    parser.add_argument("--inner-steps", type=positive_int, default=d.inner_steps)
    parser.add_argument("--reward", choices=sorted(REWARDS), default=d.reward)
    parser.add_argument("--eval-every", type=nonnegative_int, default=d.eval_every)
    parser.add_argument("--eval-per-class", type=nonnegative_int, default=d.eval_per_class)
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
    log = train_grpo(policy, reference, tokenizer, config)
    _save(args, policy, checkpoint.info(args.base)["tokenizer"], "grpo", config, log.as_dict(),
          args.eval_per_class, tokenizer)
    return 0


@trainer_main
def cca_main(argv: list[str] | None = None) -> int:
    """``python -m ar_course train cca [--steps N] [--lam L] [--beta B] ...``"""
    d = CCAConfig()
    parser = ArgumentParser(prog="python -m ar_course train cca",
                            description="Fine-tune the raster AR model with Condition Contrastive Alignment on "
                                        "MNIST tokens, for sampling without guidance.")
    parser.add_argument("--steps", type=positive_int, default=d.steps)
    parser.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    parser.add_argument("--lr", type=positive_float, default=d.lr)
    parser.add_argument("--beta", type=positive_float, default=d.beta)
    parser.add_argument("--lam", type=float, default=d.lam, help="weight of the negative pairs (>= 0)")
    parser.add_argument("--train-images", type=positive_int, default=10_000, metavar="N",
                        help="use the first N training digits [%(default)s]")
    parser.add_argument("--eval-per-class", type=nonnegative_int, default=20)
    _common(parser, CCA_PATH)
    args = parser.parse_args(argv)
    try:
        config = CCAConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, beta=args.beta, lam=args.lam,
                           seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    policy, reference, tokenizer, _ = _load(args, parser)
    from ar_course.data import load_mnist
    from ar_course.raster.train import encode_dataset

    images, labels = load_mnist("train", size=32)
    maps = encode_dataset(tokenizer, images[:args.train_images])  # (N, 8, 8)
    log = train_cca(policy, reference, maps, labels[:args.train_images], config)
    _save(args, policy, checkpoint.info(args.base)["tokenizer"], "cca", config, log.as_dict(),
          args.eval_per_class, tokenizer)
    return 0
