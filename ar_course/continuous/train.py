"""Train the continuous-token AR model on MNIST: ``python -m ar_course train continuous``.

Encodes the MNIST training split with the shipped continuous tokenizer (``tokenizer_mnist_kl``: 8x8 maps of 4
standardised channels), trains the raster backbone and its flow-matching head with condition dropout from a
fixed seed, records the class accuracy of generated digits at a few guidance strengths with the shipped
classifier, and writes a float16 safetensors checkpoint (the shipped one is
``ar_course/assets/continuous_ar_mnist.safetensors``, made with the defaults).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ar_course import metrics
from ar_course import distributed as ddp
from ar_course.checkpoint import save_checkpoint, tokenizer_record
from ar_course.cli import ArgumentParser, checkpoint_arg, int_in, positive_int
from ar_course.continuous.model import (
    CHECKPOINT_KIND, PRETRAINED_PATH, ContinuousAR, ContinuousARConfig, generate_images, map_to_tokens,
)
from ar_course.data import image_batches, load_mnist
from ar_course.raster import train as raster_train
from ar_course.raster.model import condition_dropout_batches
from ar_course.tokenizers import VQVAE
from ar_course.train import (
    MAX_LAYERS, MAX_WIDTH, History, TrainConfig, add_conditional_model_options, add_output_options,
    apply_process_options, check_conditional_model_options, finish_run, format_accuracy, image_warmup, load_tokenizer,
    prepare_run, train_loop, trainer_main,
)
from ar_course.utils import check_ids, content_digest, get_device, kept_random_state, seed_everything

TOKENIZER = "tokenizer_mnist_kl"
EVAL_CFGS = (0.0, 1.0, 2.0)
"""Guidance strengths ``w`` at which the trainer records the class accuracy (``accuracy_by_cfg``)."""
MAX_HEAD_REPEATS = 256
"""Largest ``--head-repeats``: each repeat is another copy of every training token through the flow head."""


@torch.no_grad()
def encode_dataset(tokenizer: VQVAE, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Raster-order continuous tokens ``(N, h * w, latent_dim)`` of ``images`` ``(N, C, S, S)``, in chunks."""
    if tokenizer.config.quantizer != "kl":
        raise ValueError(f"a continuous ('kl') tokenizer is needed, got {tokenizer.config.quantizer!r}")
    return map_to_tokens(raster_train.encode_dataset(tokenizer, images, batch_size))  # (N, h * w, D)


def class_accuracy_at(model: ContinuousAR, tokenizer: VQVAE, cfg: float, per_class: int = 20, steps: int = 16,
                      seed: int = 0) -> float:
    """Class accuracy (shipped classifier) of ``per_class`` samples per class at guidance strength ``cfg = w``."""
    return metrics.generated_class_accuracy(
        lambda classes: generate_images(model, tokenizer, classes, steps=steps, cfg=cfg, seed=seed),
        model.config.n_classes, per_class)[0]


@kept_random_state()
def train_continuous(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    config: ContinuousARConfig,
    steps: int = 1500,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 2e-3,
    p_uncond: float = 0.1,
    device: torch.device | str = "cpu",
    progress: bool = True,
    checkpoint_every: int = TrainConfig.checkpoint_every,
    state_path: Path | None = None,
    resume: bool = False,
) -> tuple[ContinuousAR, History]:
    """Train a :class:`ContinuousAR` on raster-order ``tokens`` ``(N, L, D)`` with ``labels`` ``(N,)`` from
    ``seed``; the condition dropout is drawn in the batch stream. Returns the model (eval mode) and its history.
    The caller's global random generators are left as they were (:func:`~ar_course.utils.kept_random_state`).
    Raises ``ValueError`` for labels outside ``[0, config.n_classes)`` (the id ``n_classes`` is the null class)."""
    check_ids("labels", labels, config.n_classes, (len(tokens),))  # the id n_classes is the null class
    g = seed_everything(seed)
    device = get_device(device)  # "auto", "cuda:1"...; an unknown or missing device in one line
    model = ContinuousAR(config).to(device)
    batches = condition_dropout_batches(image_batches(tokens, labels, batch_size, generator=g), p_uncond,
                                        model.null_class, g)

    def loss_fn(m: ContinuousAR, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, ys = batch
        return m.loss(x.to(device), ys.to(device))

    history = train_loop(model, loss_fn, batches,
                         TrainConfig(steps=steps, lr=lr, warmup=image_warmup(steps), weight_decay=0.01,
                                     checkpoint_every=checkpoint_every),
                         progress=progress, desc="continuous AR", state_path=state_path, resume=resume,
                         settings={"seed": seed, "batch_size": batch_size, "p_uncond": p_uncond,
                                   "examples": int(labels.shape[0]), "data": content_digest(tokens, labels)})
    return model.eval(), history


@trainer_main
def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course train continuous [--steps N] [--seed S] [--out PATH] [--resume] ...``"""
    parser = ArgumentParser(prog="python -m ar_course train continuous",
                            description="Train the class-conditional raster AR model with a flow-matching head on "
                                        "continuous MNIST tokens of the shipped tokenizer_mnist_kl (chapter 10).")
    d = ContinuousARConfig()
    add_conditional_model_options(parser, steps=1500, batch_size=32, lr=2e-3, n_layer=d.n_layer, n_embd=d.n_embd,
                                  n_head=d.n_head)
    parser.add_argument("--head-width", type=int_in(1, MAX_WIDTH), default=d.head_width)
    parser.add_argument("--head-depth", type=int_in(1, MAX_LAYERS), default=d.head_depth)
    parser.add_argument("--head-repeats", type=int_in(1, MAX_HEAD_REPEATS), default=d.head_repeats,
                        help="flow times drawn per token in training [%(default)s]")
    parser.add_argument("--eval-steps", type=positive_int, default=16, help="head Euler steps for the accuracy")
    parser.add_argument("--tokenizer", type=checkpoint_arg, default=TOKENIZER,
                        help="a continuous tokenizer's name or checkpoint path")
    add_output_options(parser, out=PRETRAINED_PATH, train_images=False)
    args = parser.parse_args(argv)
    check_conditional_model_options(parser, args)
    device = get_device(args.device)
    tokenizer = load_tokenizer(parser, args.tokenizer, device, ("kl",), "a continuous ('kl')")
    state_path = prepare_run(parser, args.out, args.resume, args.batch_size, {"--tokenizer": args.tokenizer})
    progress = apply_process_options(args)
    images, labels = load_mnist("train", size=32)
    tokens = encode_dataset(tokenizer, images)  # (N, 64, D)
    side = tokenizer.config.latent_side
    config = ContinuousARConfig(token_dim=tokenizer.config.latent_dim, grid=(side, side),
                                n_classes=int(labels.max()) + 1, n_layer=args.n_layer, n_head=args.n_head,
                                n_embd=args.n_embd, head_width=args.head_width, head_depth=args.head_depth,
                                head_repeats=args.head_repeats)
    model, history = train_continuous(tokens, labels, config, steps=args.steps, seed=args.seed,
                                      batch_size=args.batch_size, lr=args.lr, p_uncond=args.p_uncond,
                                      device=device, checkpoint_every=args.checkpoint_every,
                                      state_path=state_path, resume=args.resume, progress=progress)
    if not ddp.is_main_process():
        return 0
    test_images, test_labels = load_mnist("test", size=32)
    test_tokens = encode_dataset(tokenizer, test_images[:1000]).to(device)
    with torch.no_grad():
        torch.manual_seed(args.seed)
        test_loss = float(model.loss(test_tokens, test_labels[:1000].to(device)))
    accuracy = {str(w): class_accuracy_at(model, tokenizer, w, args.eval_per_class, args.eval_steps, args.seed)
                for w in EVAL_CFGS} if args.eval_per_class else {}
    state = {k: v.half() for k, v in model.state_dict().items()}
    tail = history.loss[-50:]
    out = save_checkpoint(args.out, state, config, kind=CHECKPOINT_KIND,
                          **tokenizer_record(tokenizer, args.tokenizer, args.out), steps=args.steps, seed=args.seed,
                          batch_size=args.batch_size, lr=args.lr, p_uncond=args.p_uncond,
                          final_train_loss=sum(tail) / len(tail), test_loss=test_loss, accuracy_by_cfg=accuracy,
                          eval_per_class=args.eval_per_class, eval_steps=args.eval_steps)
    finish_run(state_path)
    print(f"test flow-matching loss {test_loss:.4f}; class accuracy by guidance strength {format_accuracy(accuracy)}")
    print(f"saved {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0
