"""Train a VQ-VAE tokenizer:
``python -m ar_course train tokenizer --quantizer {vq,rvq,msvq,fsq,lfq,kl} --dataset {mnist,shapes}``
(``kl``: the continuous KL-regularised autoencoder of chapter 10).

From a fixed seed, with a progress bar; writes a safetensors checkpoint with the held-out PSNR and
codebook usage in its metadata. The shipped tokenizers are made with the defaults::

    python -m ar_course train tokenizer --quantizer vq   --out ar_course/assets/tokenizer_mnist_vq.safetensors
    python -m ar_course train tokenizer --quantizer msvq --out ar_course/assets/tokenizer_mnist_msvq.safetensors
    python -m ar_course train tokenizer --quantizer kl   --out ar_course/assets/tokenizer_mnist_kl.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from ar_course import distributed as ddp
from ar_course import metrics
from ar_course.checkpoint import ASSETS, save_checkpoint
from ar_course.cli import (
    ArgumentParser, device_name, int_in, int_list, invalid, nonnegative_float, path_arg, positive_float, positive_int,
)
from ar_course.tokenizers.functional import check_levels
from ar_course.tokenizers.implicit import LFQ_MAX_DIM
from ar_course.tokenizers.quantizers import MSVQ_LOSSES
from ar_course.tokenizers.vqvae import CHECKPOINT_KIND, QUANTIZERS, SWITCH_QUANTIZERS, VQVAE, VQVAEConfig
from ar_course.train import (
    DEVICE_HELP, History, TrainConfig, add_run_options, apply_process_options, check_batch_size, finish_run, out_help,
    prepare_run, seed_int, train_loop, trainer_main,
)
from ar_course.utils import check_int, content_digest, eval_mode, get_device, kept_random_state, seed_everything

DATASETS = tuple(metrics.DATASETS)  # the image sets dataset_split loads: ("mnist", "shapes")
LFQ_DEFAULT_DIM = 8
"""``--latent-dim`` of an LFQ tokenizer unless given: 2^8 = 256 codes, the size of the VQ codebook."""
KL_DEFAULT_DIM = 4
"""``--latent-dim`` of the continuous (``kl``) tokenizer unless given: 4 channels per 8x8 position."""
CALIBRATION_IMAGES = 5000
"""Training images whose latents set the continuous tokenizer's per-channel shift and scale."""
MAX_CODES = 2**LFQ_MAX_DIM
"""Largest ``--num-codes``: the codebook of the largest LFQ tokenizer (65,536 codes)."""
MAX_DEPTH = 64
"""Largest residual ``--depth`` (rvq): each level quantizes what the levels before it left."""
MAX_LATENT_DIM = 1024
"""Largest ``--latent-dim``: channels per latent position."""


def default_config(quantizer: str = "vq", dataset: str = "mnist", **overrides: Any) -> VQVAEConfig:
    """The configuration of the shipped tokenizers: 32x32 images, downsample 4 (8x8 latents), 256 codes of
    16 dimensions, dead-code restart; ``overrides`` replace any field. Unless ``latent_dim`` is given, FSQ gets one
    channel per level, LFQ :data:`LFQ_DEFAULT_DIM` channels and the continuous ``kl`` :data:`KL_DEFAULT_DIM`."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    base = VQVAEConfig(in_channels=1 if dataset == "mnist" else 3, image_size=32, downsample=4, width=16,
                       latent_dim=16, quantizer="vq", num_codes=256, dead_code_threshold=1.0,
                       usage_window=50)
    if quantizer == "fsq":
        overrides.setdefault("latent_dim", len(overrides.get("fsq_levels", base.fsq_levels)))
    elif quantizer == "lfq":
        overrides.setdefault("latent_dim", LFQ_DEFAULT_DIM)
    elif quantizer == "kl":
        overrides.setdefault("latent_dim", KL_DEFAULT_DIM)
    return dataclasses.replace(base, quantizer=quantizer, **overrides)


def load_images(dataset: str, split: str) -> torch.Tensor:
    """The images ``(N, C, 32, 32)`` in [0, 1] of :func:`~ar_course.metrics.dataset_split` (MNIST, 20k train / 5k
    test, or the coloured shapes), without their labels."""
    return metrics.dataset_split(dataset, split)[0]


@torch.no_grad()
def evaluate(model: VQVAE, images: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Held-out ``psnr`` (dB, mean over images), ``mse``, and the codebook's ``fraction_used`` and
    ``perplexity`` over all the tokens of ``images`` ``(N, C, S, S)`` (not for the continuous ``kl``, which has no
    codebook). An ``rvq`` with a codebook per level reports the mean over levels, as
    :meth:`~ar_course.tokenizers.quantizers.ResidualVQ.usage` does (code 5 of two levels is two vectors)."""
    device = next(model.parameters()).device
    per_level = model.config.quantizer == "rvq" and not model.config.shared_codebook
    recons, tokens = [], []
    with eval_mode(model):
        for chunk in images.split(batch_size):
            idx = model.encode_to_indices(chunk.to(device))
            recons.append(model.decode_from_indices(idx).cpu())
            if per_level:  # (B, depth, h, w) -> (depth, B * h * w)
                tokens.append(idx.transpose(0, 1).flatten(1).cpu())
            else:
                tokens.append(torch.cat([i.flatten() for i in idx]) if isinstance(idx, list) else idx.flatten())
    recon = torch.cat(recons)
    result = {"psnr": metrics.psnr(recon, images.cpu()), "mse": float((recon - images.cpu()).pow(2).mean())}
    if model.config.quantizer == "kl":
        return result
    codes = torch.cat(tokens, dim=-1).cpu()  # (T,), or (depth, T) per level
    stats = [metrics.codebook_usage(level, model.config.num_codes) for level in (codes if per_level else [codes])]
    return result | {key: sum(s[key] for s in stats) / len(stats) for key in ("fraction_used", "perplexity")}


@kept_random_state()
def train_tokenizer(
    config: VQVAEConfig,
    dataset: str = "mnist",
    steps: int = 1500,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    device: str | torch.device | None = None,
    progress: bool = True,
    train_images: torch.Tensor | None = None,
    test_images: torch.Tensor | None = None,
    eval_every: int = 0,
    checkpoint_every: int = TrainConfig.checkpoint_every,
    state_path: Path | None = None,
    resume: bool = False,
) -> tuple[VQVAE, dict[str, float], History]:
    """Train a :class:`VQVAE` from ``seed``; return it (eval mode), its held-out metrics and the history.

    ``train_images`` / ``test_images`` ``(N, C, H, W)`` float in [0, 1] default to the ``dataset``'s train and
    test splits (images of your own need both: the metrics are measured on ``test_images``); ``eval_every``
    adds held-out evaluations during training (``history.eval_steps`` / ``history.evals``). ``batch_size``
    is the global batch (split across processes under ``torchrun``, where only rank 0 evaluates: the
    metrics are ``{}`` elsewhere). ``checkpoint_every`` / ``state_path`` / ``resume``: see
    :func:`~ar_course.train.train_loop`.

    Raises:
        ValueError: ``batch_size`` is not in [1, the number of training images] (no batch could be drawn);
            ``train_images`` without ``test_images``, or test images of another shape than the training ones.
        TypeError: ``train_images`` or ``test_images`` is not a tensor.

    The caller's global random generators are left as they were (:func:`~ar_course.utils.kept_random_state`).
    """
    generator = seed_everything(seed)
    device = get_device(device)  # None or "auto": a GPU when there is one; an unknown device in one line
    for name, given in (("train_images", train_images), ("test_images", test_images)):
        if given is not None and not isinstance(given, torch.Tensor):
            raise TypeError(f"{name} must be a (N, C, H, W) float tensor, got {type(given).__name__}")
    if train_images is not None and test_images is None:
        raise ValueError("train_images of your own need test_images too (held-out images like them: the metrics "
                         f"are measured on them; the default is {dataset}'s test split)")
    train_images = load_images(dataset, "train") if train_images is None else train_images
    test_images = load_images(dataset, "test") if test_images is None else test_images
    if test_images.shape[1:] != train_images.shape[1:]:
        raise ValueError(f"test_images must be images like train_images {tuple(train_images.shape[1:])}, got "
                         f"{tuple(test_images.shape[1:])}")
    check_int("batch_size", batch_size, 1, train_images.shape[0])
    model = VQVAE(config).to(device)

    def batches():
        while True:
            for idx in torch.randperm(train_images.shape[0], generator=generator).split(batch_size):
                if idx.numel() == batch_size:
                    yield train_images[idx].to(device)

    history = train_loop(
        model, lambda m, x: m(x).loss, batches(),
        TrainConfig(steps=steps, lr=lr, warmup=min(50, steps // 10 + 1), grad_clip=1.0, eval_every=eval_every,
                    checkpoint_every=checkpoint_every),
        eval_fn=lambda m: evaluate(m, test_images), progress=progress,
        desc=f"tokenizer/{config.quantizer}/{dataset}", state_path=state_path, resume=resume,
        settings={"seed": seed, "batch_size": batch_size, "dataset": dataset, "examples": int(train_images.shape[0]),
                  "data": content_digest(train_images)},
    )
    if config.quantizer == "kl":  # standardise the continuous tokens on training latents
        with torch.no_grad():
            model.eval()
            model.quantizer.calibrate(torch.cat([model.encode(chunk.to(device))
                                                 for chunk in train_images[:CALIBRATION_IMAGES].split(1000)]))
    return model.eval(), history.evals[-1] if history.evals else {}, history


def _levels(text: str) -> tuple[int, ...]:
    """An argparse ``type``: comma-separated FSQ levels, each >= 2, such as ``8,6,5``."""
    try:
        return check_levels(tuple(int(s) for s in text.split(",")))
    except ValueError:
        raise invalid("comma-separated integers >= 2 such as 8,6,5", text) from None


OPTION_QUANTIZERS = {
    "num_codes": ("vq", "rvq", "msvq"), "depth": ("rvq",), "scales": ("msvq",), "msvq_loss": ("msvq",),
    "msvq_final_weight": ("msvq",), "dead_code_threshold": ("vq", "rvq", "msvq"),
    "usage_window": ("vq", "rvq", "msvq"), "fsq_levels": ("fsq",), "kl_weight": ("kl",), "lfq_entropy_weight": ("lfq",),
    **{k: v for k, v in SWITCH_QUANTIZERS.items() if k != "shared_codebook"},  # no option for a shared codebook
}
"""Options of ``train tokenizer`` that only some quantizers read -> those quantizers (given for another, an option
would be ignored: it is refused instead)."""


def _check_applies(parser: ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error for an option set away from its default that ``--quantizer`` does not read."""
    for name, quantizers in OPTION_QUANTIZERS.items():
        if args.quantizer not in quantizers and getattr(args, name) != parser.get_default(name):
            parser.error(f"--{name.replace('_', '-')} does not apply to --quantizer {args.quantizer} (only to "
                         f"{', '.join(quantizers)})")


def _parser() -> ArgumentParser:
    """The options of ``python -m ar_course train tokenizer``."""
    parser = ArgumentParser(prog="python -m ar_course train tokenizer",
                            description="Train a VQ / residual VQ / multi-scale VQ (chapter 01) or FSQ / LFQ / "
                                        "continuous KL (chapter 10) tokenizer.")
    parser.add_argument("--quantizer", choices=QUANTIZERS, default="vq")
    parser.add_argument("--dataset", choices=DATASETS, default="mnist")
    parser.add_argument("--steps", type=positive_int, default=1500)
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="global batch, split across processes under torchrun; at most the training images "
                             "[%(default)s]")
    parser.add_argument("--lr", type=positive_float, default=2e-3)
    parser.add_argument("--num-codes", type=int_in(1, MAX_CODES), default=256,
                        help="codebook size (vq, rvq, msvq; fsq has prod(levels) codes, lfq 2^latent-dim) [256]")
    parser.add_argument("--latent-dim", type=int_in(1, MAX_LATENT_DIM), default=None,
                        help=f"latent channels [16; fsq: the number of levels; lfq: {LFQ_DEFAULT_DIM}; "
                             f"kl: {KL_DEFAULT_DIM}]")
    parser.add_argument("--depth", type=int_in(1, MAX_DEPTH), default=4, help="residual depth (rvq)")
    parser.add_argument("--scales", type=int_list(1), default=(1, 2, 3, 4, 6, 8),
                        help="comma-separated sides (msvq) [1,2,3,4,6,8]")
    parser.add_argument("--msvq-loss", choices=MSVQ_LOSSES, default=VQVAEConfig.msvq_loss,
                        help="msvq: quantizer loss averaged over every scale's partial sum as in VAR, or on the "
                             "complete reconstruction only [%(default)s]")
    parser.add_argument("--msvq-final-weight", type=nonnegative_float, default=VQVAEConfig.msvq_final_weight,
                        help="msvq, every_scale: extra weight on the complete reconstruction's term; 0 is VAR's "
                             "plain average [%(default)s]")
    parser.add_argument("--dead-code-threshold", type=nonnegative_float, default=1.0,
                        help="restart codes hit fewer times per window (0 disables)")
    parser.add_argument("--usage-window", type=positive_int, default=default_config().usage_window,
                        help="steps per codebook-usage window, at whose end dead codes restart [%(default)s]")
    parser.add_argument("--ema", action="store_true", help="EMA codebook updates (vq, rvq)")
    parser.add_argument("--l2-norm", action="store_true", help="l2-normalised codes (vq)")
    parser.add_argument("--rotation-trick", action="store_true",
                        help="vq: encoder gradient through the rotation onto the code instead of straight through")
    parser.add_argument("--kmeans-init", action="store_true", help="vq: k-means codebook from the first batch")
    parser.add_argument("--fsq-levels", type=_levels, default=VQVAEConfig.fsq_levels,
                        help="fsq: comma-separated levels per latent channel [8,6,5]")
    parser.add_argument("--kl-weight", type=nonnegative_float, default=VQVAEConfig.kl_weight,
                        help="kl: weight of the latent's mean KL to N(0, 1) [%(default)s]")
    parser.add_argument("--lfq-entropy-weight", type=nonnegative_float, default=VQVAEConfig.lfq_entropy_weight,
                        help="lfq: weight of the entropy loss [%(default)s]")
    parser.add_argument("--device", type=device_name, default=None, help=DEVICE_HELP)
    parser.add_argument("--out", type=path_arg, default=None,
                        help=out_help("ar_course/assets/tokenizer_<dataset>_<quantizer>.safetensors"))
    add_run_options(parser)
    return parser


@trainer_main
def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course train tokenizer [--quantizer Q] [--dataset D] [--steps N] [--out PATH] ...``."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_applies(parser, args)
    try:
        config = default_config(
            args.quantizer, args.dataset, num_codes=args.num_codes, depth=args.depth,
            scales=args.scales, dead_code_threshold=args.dead_code_threshold, usage_window=args.usage_window,
            ema=args.ema, l2_norm=args.l2_norm, msvq_loss=args.msvq_loss, msvq_final_weight=args.msvq_final_weight,
            rotation_trick=args.rotation_trick, kmeans_init=args.kmeans_init, fsq_levels=args.fsq_levels,
            lfq_entropy_weight=args.lfq_entropy_weight, kl_weight=args.kl_weight,
            **({} if args.latent_dim is None else {"latent_dim": args.latent_dim}),
        )
    except ValueError as exc:
        parser.error(str(exc))
    check_batch_size(parser, args.batch_size, args.dataset)
    out = args.out or ASSETS / f"tokenizer_{args.dataset}_{args.quantizer}.safetensors"
    state_path = prepare_run(parser, out, args.resume, args.batch_size)
    progress = apply_process_options(args)
    model, result, history = train_tokenizer(config, args.dataset, args.steps, args.seed, args.batch_size, args.lr,
                                              device=args.device, checkpoint_every=args.checkpoint_every,
                                              state_path=state_path, resume=args.resume, progress=progress)
    if not ddp.is_main_process():
        return 0
    save_checkpoint(out, model, config, kind=CHECKPOINT_KIND, dataset=args.dataset, steps=args.steps,
                    seed=args.seed, batch_size=args.batch_size, lr=args.lr, final_loss=history.smoothed()[-1],
                    held_out=result)
    finish_run(state_path)
    usage = (f", codebook usage {result['fraction_used']:.1%} (perplexity {result['perplexity']:.1f})"
             if "fraction_used" in result else "")
    print(f"{args.dataset}/{args.quantizer}: held-out PSNR {result['psnr']:.2f} dB{usage}; saved {out} "
          f"({Path(out).stat().st_size / 1024:.0f} KB)")
    return 0
