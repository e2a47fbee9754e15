"""Train VAR on token pyramids: ``python -m ar_course train var [--dataset mnist|shapes]``.

Encodes the MNIST training split with the shipped ``mnist_msvq`` tokenizer (scales 1,2,3,4,6,8 = 130 tokens
of 256 codes), trains a small class-conditional VAR with condition dropout from a fixed seed, measures the
class accuracy of generated digits at a few guidance strengths with the shipped classifier, and writes a
float16 safetensors checkpoint (the shipped one is ``ar_course/assets/var_mnist.safetensors``, made with
the defaults). ``--dataset shapes --tokenizer PATH`` trains on the coloured shapes (4 classes) with a
multi-scale tokenizer you trained with ``python -m ar_course train tokenizer --quantizer msvq --dataset shapes``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ar_course import distributed as ddp
from ar_course import metrics
from ar_course.checkpoint import tokenizer_record
from ar_course.cli import ArgumentParser, checkpoint_arg, prog
from ar_course.data import image_batches
from ar_course.raster.model import condition_dropout_batches
from ar_course.tokenizers import VQVAE
from ar_course.train import (
    History, TrainConfig, add_conditional_model_options, add_output_options, apply_process_options,
    check_conditional_model_options, finish_run, format_accuracy, load_tokenizer, prepare_run, image_warmup, train_loop,
    trainer_main,
)
from ar_course.utils import check_ids, content_digest, get_device, kept_random_state, seed_everything
from ar_course.var.functional import flatten_pyramids, unflatten_pyramids
from ar_course.var.model import PRETRAINED_PATH, VAR, VARConfig, generate_images, save_pretrained

EVAL_CFGS = (0.0, 1.0, 2.0, 4.0)
TOKENIZER = "mnist_msvq"


@torch.no_grad()
def encode_pyramids(tokenizer: VQVAE, images: torch.Tensor, batch_size: int = 1000) -> list[torch.Tensor]:
    """Token pyramids of ``images`` ``(N, C, S, S)``: one ``(N, s_k, s_k)`` long map per scale (on the CPU)."""
    device = next(tokenizer.parameters()).device
    chunks = [tokenizer.encode_to_indices(chunk.to(device)) for chunk in images.split(batch_size)]
    return [torch.cat([c[k] for c in chunks]).cpu() for k in range(len(chunks[0]))]


def class_accuracy_at(model: VAR, tokenizer: VQVAE, cfg: float, per_class: int = 20, seed: int = 0,
                      dataset: str = "mnist") -> float:
    """Class accuracy (shipped classifier of ``dataset``) of ``per_class`` samples per class at guidance ``cfg``."""
    return metrics.generated_class_accuracy(
        lambda classes: generate_images(model, tokenizer, classes, cfg=cfg, seed=seed),
        model.config.n_classes, per_class, dataset)[0]


@kept_random_state()
def train_var(
    tokenizer: VQVAE,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    config: VARConfig,
    steps: int = 1200,
    seed: int = 0,
    batch_size: int = 48,
    lr: float = 3e-3,
    p_uncond: float = 0.1,
    device: torch.device | str = "cpu",
    progress: bool = True,
    checkpoint_every: int = TrainConfig.checkpoint_every,
    state_path: Path | None = None,
    resume: bool = False,
) -> tuple[VAR, History]:
    """Train a :class:`VAR` on flattened pyramids ``tokens`` ``(N, L)`` with ``labels`` ``(N,)`` from ``seed``.

    ``batch_size`` is the global batch (split across processes under ``torchrun``); the condition dropout
    is drawn in the batch stream. ``checkpoint_every`` / ``state_path`` / ``resume``: see
    :func:`~ar_course.train.train_loop`. Returns the model (eval mode) and the loss history.
    The caller's global random generators are left as they were (:func:`~ar_course.utils.kept_random_state`).
    Raises ``ValueError`` for labels outside ``[0, config.n_classes)`` (the id ``n_classes`` is the null class)."""
    check_ids("labels", labels, config.n_classes, (len(tokens),))  # the id n_classes is the null class
    g = seed_everything(seed)
    device = get_device(device)  # "auto", "cuda:1"...; an unknown or missing device in one line
    model = VAR(config).to(device)
    vq = tokenizer.quantizer
    batches = condition_dropout_batches(image_batches(tokens, labels, batch_size, generator=g), p_uncond,
                                        model.null_class, g)

    def loss_fn(m: VAR, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        flat, ys = batch
        pyramid = unflatten_pyramids(flat.to(device), config.scales)
        return m.loss(vq, pyramid, ys.to(device))[0]

    history = train_loop(model, loss_fn, batches,
                         TrainConfig(steps=steps, lr=lr, warmup=image_warmup(steps), weight_decay=0.01,
                                     checkpoint_every=checkpoint_every),
                         progress=progress, desc="VAR", state_path=state_path, resume=resume,
                         settings={"seed": seed, "batch_size": batch_size, "p_uncond": p_uncond,
                                   "examples": int(labels.shape[0]), "data": content_digest(tokens, labels),
                                   "tokenizer": content_digest(tokenizer)})  # the loss embeds codes with it
    return model, history


@trainer_main
def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course train var [--steps N] [--seed S] [--out PATH] [--resume] ...``"""
    parser = ArgumentParser(prog="python -m ar_course train var",
                            description="Train VAR (next-scale prediction) on token pyramids of a multi-scale "
                                        "tokenizer (default: MNIST with the shipped mnist_msvq).")
    parser.add_argument("--dataset", choices=tuple(metrics.DATASETS), default="mnist")
    parser.add_argument("--tokenizer", type=checkpoint_arg, default=None,
                        help=f"shipped tokenizer name or path of a msvq tokenizer checkpoint trained on the dataset "
                             f"(default for mnist: {TOKENIZER}; required for shapes)")
    add_conditional_model_options(parser, steps=1200, batch_size=48, lr=3e-3, n_embd=64)
    parser.add_argument("--cond", choices=("ada", "token"), default="ada",
                        help="class conditioning: adaptive norms (VAR) or the start token only")
    add_output_options(parser, out=PRETRAINED_PATH)
    args = parser.parse_args(argv)
    check_conditional_model_options(parser, args, args.dataset)
    state_path = prepare_run(parser, args.out, args.resume, args.batch_size, {"--tokenizer": args.tokenizer})
    progress = apply_process_options(args)
    if args.tokenizer is None:
        if args.dataset != "mnist":
            parser.error(f"--dataset {args.dataset} needs --tokenizer PATH (train one with: "
                         f"{prog('train tokenizer')} --quantizer msvq --dataset {args.dataset} --out PATH)")
        args.tokenizer = TOKENIZER
    device = get_device(args.device)
    channels, n_classes = metrics.DATASETS[args.dataset]
    tokenizer = load_tokenizer(parser, args.tokenizer, device, ("msvq",), "a multi-scale ('msvq')", channels)
    tc = tokenizer.config
    if tc.scales[0] != 1:  # VARConfig's rule, said of the option that brought the scales
        parser.error(f"--tokenizer {args.tokenizer} has scales {','.join(map(str, tc.scales))}: VAR's start token "
                     "predicts a 1x1 first map, so they must start at 1 (train the tokenizer with --scales 1,...)")
    config = VARConfig(vocab_size=tc.num_codes, latent_dim=tc.latent_dim, scales=tc.scales, n_classes=n_classes,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, cond=args.cond)
    images, labels = metrics.dataset_split(args.dataset, "train")
    images, labels = images[:args.train_images], labels[:args.train_images]
    tokens = flatten_pyramids(encode_pyramids(tokenizer, images))  # (N, L)
    model, history = train_var(tokenizer, tokens, labels, config, steps=args.steps, seed=args.seed,
                               batch_size=args.batch_size, lr=args.lr, p_uncond=args.p_uncond, device=device,
                               checkpoint_every=args.checkpoint_every, state_path=state_path, resume=args.resume,
                               progress=progress)
    if not ddp.is_main_process():
        return 0
    test_images, test_labels = metrics.dataset_split(args.dataset, "test")
    test_pyr = [p.to(device) for p in encode_pyramids(tokenizer, test_images[:1000])]
    with torch.no_grad():
        test_loss, per_scale = model.loss(tokenizer.quantizer, test_pyr, test_labels[:1000].to(device))
    accuracy = {str(c): class_accuracy_at(model, tokenizer, c, args.eval_per_class, args.seed, args.dataset)
                for c in EVAL_CFGS} if args.eval_per_class else {}
    tail = history.loss[-50:]
    out = save_pretrained(model, args.out, **tokenizer_record(tokenizer, args.tokenizer, args.out),
                          dataset=args.dataset, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                          lr=args.lr, p_uncond=args.p_uncond, train_images=len(labels),
                          final_train_loss=sum(tail) / len(tail), test_loss=float(test_loss),
                          test_loss_per_scale=[round(float(v), 4) for v in per_scale],
                          accuracy_by_cfg=accuracy, eval_per_class=args.eval_per_class,
                          num_params=model.num_params())
    finish_run(state_path)
    print(f"test loss {float(test_loss):.4f} nats/token (per scale {[round(float(v), 3) for v in per_scale]}); "
          f"class accuracy by guidance strength {format_accuracy(accuracy)}")
    print(f"saved {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
