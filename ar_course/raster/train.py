"""Train the class-conditional raster-order AR model on MNIST tokens: ``python -m ar_course train ar``.

Encodes the MNIST training split with the shipped ``mnist_vq`` tokenizer (8x8 maps of 256 codes), trains a
small GPT with a class token and condition dropout from a fixed seed, measures the class accuracy of
generated digits at a few guidance strengths with the shipped classifier, and writes a float16 safetensors
checkpoint (the shipped one is ``ar_course/assets/ar_mnist.safetensors``, made with the defaults).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ar_course import distributed as ddp
from ar_course import metrics
from ar_course.checkpoint import save_checkpoint, tokenizer_record
from ar_course.cli import ArgumentParser, checkpoint_arg
from ar_course.data import image_batches, load_mnist
from ar_course.raster.model import (
    CHECKPOINT_KIND, PRETRAINED_PATH, condition_dropout_batches, generate_images, raster_config,
    raster_loss,
)
from ar_course.tokenizers import VQVAE
from ar_course.train import (
    History, TrainConfig, add_conditional_model_options, add_output_options, apply_process_options,
    check_conditional_model_options, finish_run, format_accuracy, load_tokenizer, prepare_run, image_warmup, train_loop,
    trainer_main,
)
from ar_course.transformer.model import GPT
from ar_course.utils import check_ids, check_int, content_digest, get_device, kept_random_state, seed_everything

EVAL_CFGS = (0.0, 1.0, 2.0, 3.0)
"""Guidance strengths ``w`` at which the trainer records the class accuracy (``accuracy_by_cfg``)."""
SINGLE_SCALE = ("vq", "fsq", "lfq")
"""The quantizers whose tokens are one ``(h, w)`` map per image, which raster AR and MaskGIT model."""
SINGLE_SCALE_NEEDED = "a single-scale ('vq', 'fsq' or 'lfq')"


@torch.no_grad()
def encode_dataset(tokenizer: VQVAE, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Token maps ``(N, h, w)`` long of ``images`` ``(N, C, S, S)``, encoded in chunks on the tokenizer's device
    (``(N, depth, h, w)`` for a residual VQ, float latents ``(N, D, h, w)`` for the continuous ``kl`` tokenizer).

    Raises:
        ValueError: a multi-scale (``msvq``) tokenizer, whose tokens are a pyramid of maps, not one map
            (:func:`ar_course.var.train.encode_pyramids` encodes those).
    """
    if tokenizer.config.quantizer == "msvq":
        raise ValueError("encode_dataset needs a one-map tokenizer, got quantizer='msvq' (a pyramid of maps: "
                         "ar_course.var.train.encode_pyramids encodes it)")
    device = next(tokenizer.parameters()).device
    return torch.cat([tokenizer.encode_to_indices(chunk.to(device)).cpu() for chunk in images.split(batch_size)])


def class_accuracy_at(model: GPT, tokenizer: VQVAE, cfg: float, per_class: int = 20, seed: int = 0) -> float:
    """Class accuracy (shipped classifier) of ``per_class`` samples per class at guidance strength ``cfg = w``."""
    return metrics.generated_class_accuracy(
        lambda classes: generate_images(model, tokenizer, classes, cfg=cfg, seed=seed),
        model.config.n_classes, per_class)[0]


@kept_random_state()
def train_ar(
    tokenizer: VQVAE,
    token_maps: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 1500,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 3e-3,
    p_uncond: float = 0.1,
    n_layer: int = 4,
    n_embd: int = 96,
    n_head: int = 4,
    device: torch.device | str = "cpu",
    progress: bool = True,
    checkpoint_every: int = TrainConfig.checkpoint_every,
    state_path: Path | None = None,
    resume: bool = False,
    n_classes: int | None = None,
) -> tuple[GPT, History]:
    """Train a class-conditional GPT on ``token_maps`` ``(N, h, w)`` with ``labels`` ``(N,)`` from ``seed``.

    ``batch_size`` is the global batch (split across processes under ``torchrun``); the condition dropout
    is drawn in the batch stream. ``checkpoint_every`` / ``state_path`` / ``resume``: see
    :func:`~ar_course.train.train_loop`. ``n_classes``: the classes the model conditions on (default: the largest
    label + 1; give the dataset's count when ``labels`` is a subset that may miss a class). Returns the model (eval
    mode) and the loss history.
    The caller's global random generators are left as they were (:func:`~ar_course.utils.kept_random_state`)."""
    check_ids("token_maps", token_maps, tokenizer.config.num_codes, ("N", "h", "w"))
    g = seed_everything(seed)
    h, w = token_maps.shape[1:]
    config = raster_config(tokenizer.config.num_codes, (h, w), n_classes=class_count(labels, n_classes),
                           n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    device = get_device(device)  # "auto", "cuda:1"...; an unknown or missing device in one line
    model = GPT(config).to(device)
    batches = condition_dropout_batches(image_batches(token_maps, labels, batch_size, generator=g), p_uncond,
                                        model.null_class, g)

    def loss_fn(m: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        maps, ys = batch
        return raster_loss(m, maps.to(device), ys.to(device))

    history = train_loop(model, loss_fn, batches,
                         TrainConfig(steps=steps, lr=lr, warmup=image_warmup(steps), weight_decay=0.01,
                                     checkpoint_every=checkpoint_every),
                         progress=progress, desc="raster AR", state_path=state_path, resume=resume,
                         settings={"seed": seed, "batch_size": batch_size, "p_uncond": p_uncond,
                                   "examples": int(labels.shape[0]), "data": content_digest(token_maps, labels)})
    return model, history


def class_count(labels: torch.Tensor, n_classes: int | None) -> int:
    """``n_classes``, or the largest label + 1 when it is None; ``ValueError`` for a label outside
    ``0..n_classes - 1``."""
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be class ids >= 0, got {int(labels.min())}")
    top = int(labels.max()) + 1
    if n_classes is None:
        return top
    if top > check_int("n_classes", n_classes, lo=1):
        raise ValueError(f"labels must lie in [0, {n_classes - 1}] (n_classes={n_classes}), got {top - 1}")
    return n_classes


@trainer_main
def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course train ar [--steps N] [--seed S] [--out PATH] [--resume] ...``"""
    parser = ArgumentParser(prog="python -m ar_course train ar",
                            description="Train the class-conditional raster-order AR model on MNIST tokens of the "
                                        "shipped mnist_vq tokenizer.")
    add_conditional_model_options(parser, steps=1500, batch_size=32, lr=3e-3)
    parser.add_argument("--tokenizer", type=checkpoint_arg, default="mnist_vq",
                        help="a shipped tokenizer's name or a checkpoint path")
    add_output_options(parser, out=PRETRAINED_PATH)
    args = parser.parse_args(argv)
    check_conditional_model_options(parser, args)
    state_path = prepare_run(parser, args.out, args.resume, args.batch_size, {"--tokenizer": args.tokenizer})
    progress = apply_process_options(args)
    device = get_device(args.device)
    tokenizer = load_tokenizer(parser, args.tokenizer, device, SINGLE_SCALE, SINGLE_SCALE_NEEDED)
    images, labels = load_mnist("train", size=32)
    images, labels = images[:args.train_images], labels[:args.train_images]
    token_maps = encode_dataset(tokenizer, images)  # (N, 8, 8)
    model, history = train_ar(tokenizer, token_maps, labels, steps=args.steps, seed=args.seed,
                              batch_size=args.batch_size, lr=args.lr, p_uncond=args.p_uncond,
                              n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, device=device,
                              checkpoint_every=args.checkpoint_every, state_path=state_path, resume=args.resume,
                              progress=progress, n_classes=metrics.DATASETS["mnist"][1])
    if not ddp.is_main_process():
        return 0
    test_images, test_labels = load_mnist("test", size=32)
    test_maps = encode_dataset(tokenizer, test_images[:1000]).to(device)
    with torch.no_grad():
        test_loss = float(raster_loss(model, test_maps, test_labels[:1000].to(device)))
    accuracy = {str(w): class_accuracy_at(model, tokenizer, w, args.eval_per_class, seed=args.seed)
                for w in EVAL_CFGS} if args.eval_per_class else {}
    state = {k: v.half() for k, v in model.state_dict().items()}
    tail = history.loss[-50:]
    out = save_checkpoint(args.out, state, model.config, kind=CHECKPOINT_KIND,
                          **tokenizer_record(tokenizer, args.tokenizer, args.out), steps=args.steps, seed=args.seed,
                          batch_size=args.batch_size, lr=args.lr, p_uncond=args.p_uncond, train_images=len(labels),
                          final_train_loss=sum(tail) / len(tail), test_loss=test_loss, accuracy_by_cfg=accuracy,
                          eval_per_class=args.eval_per_class)
    finish_run(state_path)
    print(f"test loss {test_loss:.4f} nats/token; class accuracy by guidance strength {format_accuracy(accuracy)}")
    print(f"saved {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0
