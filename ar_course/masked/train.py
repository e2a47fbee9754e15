"""Train MaskGIT on MNIST tokens: ``python -m ar_course train maskgit``.

Encodes the MNIST training split with the shipped ``mnist_vq`` tokenizer (8x8 maps of 256 codes), trains a
bidirectional GPT of the raster AR model's size (:func:`~.model.maskgit_config`) from a fixed seed with the
masked loss (mask ratio drawn from the schedule, loss on masked positions only) and class dropout to the null
class, records the class accuracy of 8-step samples at a few guidance strengths, and writes a float16
safetensors checkpoint (the shipped one is ``ar_course/assets/maskgit_mnist.safetensors``, made with the
defaults).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ar_course import metrics
from ar_course import distributed as ddp
from ar_course.checkpoint import save_checkpoint, tokenizer_record
from ar_course.cli import ArgumentParser, checkpoint_arg
from ar_course.data import image_batches, load_mnist
from ar_course.masked.functional import SCHEDULES, random_mask
from ar_course.masked.model import (
    CHECKPOINT_KIND, DEFAULT_NOISE, PRETRAINED_PATH, MaskGIT, generate_images, maskgit_config, maskgit_loss,
)
from ar_course.raster.model import condition_dropout_batches
from ar_course.raster.train import SINGLE_SCALE, SINGLE_SCALE_NEEDED, class_count, encode_dataset
from ar_course.train import (
    EVAL_HELP, History, TrainConfig, add_conditional_model_options, add_output_options, apply_process_options,
    check_conditional_model_options, finish_run, format_accuracy, load_tokenizer, prepare_run, image_warmup, train_loop,
    trainer_main,
)
from ar_course.utils import check_ids, content_digest, get_device, kept_random_state, seed_everything

EVAL_CFGS = (0.0, 1.0, 2.0)
"""Guidance strengths ``w`` at which the trainer records the class accuracy of 8-step samples."""


def masked_batches(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], schedule: str,
                   generator: torch.Generator | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(maps (B, h, w), classes (B,), mask (B, h * w))``: each batch of ``batches`` with its training mask drawn
    right after it from ``generator`` (:func:`~.functional.random_mask`), so every random draw is in the batch
    stream (a resumed run replays it)."""
    for maps, classes in batches:
        yield maps, classes, random_mask(maps.shape[0], maps[0].numel(), schedule, generator)


@kept_random_state()
def train_maskgit(
    tokenizer: torch.nn.Module,
    token_maps: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 2000,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    p_uncond: float = 0.1,
    schedule: str = "cosine",
    n_layer: int = 4,
    n_embd: int = 96,
    n_head: int = 4,
    device: torch.device | str = "cpu",
    progress: bool = True,
    checkpoint_every: int = TrainConfig.checkpoint_every,
    state_path: Path | None = None,
    resume: bool = False,
    n_classes: int | None = None,
) -> tuple[MaskGIT, History]:
    """Train a class-conditional MaskGIT on ``token_maps`` ``(N, h, w)`` with ``labels`` ``(N,)`` from ``seed``.

    Class dropout (``p_uncond``) and the masks are drawn in the batch stream. ``n_classes``: as
    :func:`~ar_course.raster.train.train_ar`. Returns the model (eval mode) and the loss history.
    The caller's global random generators are left as they were (:func:`~ar_course.utils.kept_random_state`)."""
    check_ids("token_maps", token_maps, tokenizer.config.num_codes, ("N", "h", "w"))
    g = seed_everything(seed)
    h, w = token_maps.shape[1:]
    config = maskgit_config(tokenizer.config.num_codes, (h, w), n_classes=class_count(labels, n_classes),
                            n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    device = get_device(device)  # "auto", "cuda:1"...; an unknown or missing device in one line
    model = MaskGIT(config).to(device)
    batches = masked_batches(condition_dropout_batches(image_batches(token_maps, labels, batch_size, generator=g),
                                                       p_uncond, model.null_class, g), schedule, g)

    def loss_fn(m: MaskGIT, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        maps, ys, mask = (t.to(device) for t in batch)
        loss = maskgit_loss(m, maps, ys, mask=mask)  # the mean over this process's masked tokens
        return loss * ddp.share_of_global_mean(mask.sum())  # processes hide different numbers of tokens

    history = train_loop(model, loss_fn, batches,
                         TrainConfig(steps=steps, lr=lr, warmup=image_warmup(steps), weight_decay=0.01,
                                     checkpoint_every=checkpoint_every),
                         progress=progress, desc="MaskGIT", state_path=state_path, resume=resume,
                         settings={"seed": seed, "batch_size": batch_size, "p_uncond": p_uncond,
                                   "examples": int(labels.shape[0]), "schedule": schedule,
                                   "data": content_digest(token_maps, labels)})
    return model, history


@trainer_main
def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course train maskgit [--steps N] [--seed S] [--out PATH] [--resume] ...``"""
    parser = ArgumentParser(prog="python -m ar_course train maskgit",
                            description="Train the class-conditional MaskGIT (bidirectional, masked tokens) on MNIST "
                                        "tokens of the shipped mnist_vq tokenizer.")
    add_conditional_model_options(parser, steps=2000, batch_size=64, lr=3e-3)
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="mask-ratio schedule")
    parser.add_argument("--tokenizer", type=checkpoint_arg, default="mnist_vq",
                        help="a shipped tokenizer's name or a checkpoint path")
    add_output_options(parser, out=PRETRAINED_PATH, eval_help="8-step " + EVAL_HELP)
    args = parser.parse_args(argv)
    check_conditional_model_options(parser, args)
    state_path = prepare_run(parser, args.out, args.resume, args.batch_size, {"--tokenizer": args.tokenizer})
    progress = apply_process_options(args)
    device = get_device(args.device)
    tokenizer = load_tokenizer(parser, args.tokenizer, device, SINGLE_SCALE, SINGLE_SCALE_NEEDED)
    images, labels = load_mnist("train", size=32)
    images, labels = images[:args.train_images], labels[:args.train_images]
    token_maps = encode_dataset(tokenizer, images)  # (N, 8, 8)
    model, history = train_maskgit(tokenizer, token_maps, labels, steps=args.steps, seed=args.seed,
                                   batch_size=args.batch_size, lr=args.lr, p_uncond=args.p_uncond,
                                   schedule=args.schedule, n_layer=args.n_layer, n_embd=args.n_embd,
                                   n_head=args.n_head, device=device, checkpoint_every=args.checkpoint_every,
                                   state_path=state_path, resume=args.resume, progress=progress,
                                   n_classes=metrics.DATASETS["mnist"][1])
    if not ddp.is_main_process():
        return 0
    test_images, test_labels = load_mnist("test", size=32)
    test_maps = encode_dataset(tokenizer, test_images[:1000]).to(device)
    with torch.no_grad():
        test_loss = float(maskgit_loss(model, test_maps, test_labels[:1000].to(device), args.schedule,
                                       torch.Generator().manual_seed(args.seed)))
    classes = torch.arange(10).repeat_interleave(args.eval_per_class)
    accuracy = {str(w): metrics.class_accuracy(generate_images(model, tokenizer, classes, steps=8, cfg=w,
                                                               seed=args.seed).cpu(), classes)
                for w in EVAL_CFGS} if args.eval_per_class else {}
    state = {k: v.half() for k, v in model.state_dict().items()}
    tail = history.loss[-50:]
    out = save_checkpoint(args.out, state, model.config, kind=CHECKPOINT_KIND,
                          **tokenizer_record(tokenizer, args.tokenizer, args.out), steps=args.steps, seed=args.seed,
                          batch_size=args.batch_size, lr=args.lr, p_uncond=args.p_uncond, schedule=args.schedule,
                          train_images=len(labels), final_train_loss=sum(tail) / len(tail), test_loss=test_loss,
                          accuracy_by_cfg_8_steps=accuracy, eval_noise=DEFAULT_NOISE,
                          eval_per_class=args.eval_per_class)
    finish_run(state_path)
    print(f"test loss {test_loss:.4f} nats/masked token; 8-step class accuracy by guidance strength "
          f"{format_accuracy(accuracy)}")
    print(f"saved {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0
