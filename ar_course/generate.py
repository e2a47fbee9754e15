"""``python -m ar_course generate``: class-conditional images from the shipped models, saved as a PNG grid.

    python -m ar_course generate --out samples.png                      # VAR, one digit of each class
    python -m ar_course generate --method ar --speculative jacobi --classes 3 7 --per-class 4 --out s.png

The grid has one column per requested class and ``--per-class`` rows. A one-line summary (forward passes,
wall time, backends) is printed; ``--stats-json PATH`` writes the full stats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys

import numpy as np
import torch

from ar_course.checkpoint import CheckpointError
from ar_course.cli import (ArgumentParser, UsageError, checkpoint_arg, device_name, finite_float, float_in, int_in,
                           invalid, nonnegative_int, path_arg, positive_int)
from ar_course.files import atomic_path, check_output_path
from ar_course.images import encode_png, to_grid
from ar_course.sampling import SamplingConfig
from ar_course.system import KERNELS, METHODS, PRECISIONS, GenerationRequest, Generator
from ar_course.utils import SEED_RANGE, check_finite, check_int, get_device

MIN_TEMPERATURE = 1e-6
"""Smallest positive ``--temperature``: anything this small is greedy decoding (``--temperature 0``) except that
exact ties are split at random (the sampler itself handles any temperature > 0 without overflow), so a smaller
value is more likely a typo than a wish."""
MIN_TOP_P = 1e-6
"""Smallest ``--top-p``: any p below 1 / vocabulary size keeps just the most likely token (the sampler handles any
p > 0), so a smaller value is more likely a typo."""
MAX_PER_CLASS = 1000
"""Largest ``--per-class``: 1,000 rows of 32-pixel images already make a PNG over 34,000 pixels tall; a grid of
millions (a typo) would exhaust memory before anything is written."""
MAX_CFG = 1000.0
"""Largest ``--cfg``: useful strengths are a few units, and near 1e38 the guided logits overflow float32."""


def _temperature(text: str) -> float:
    """argparse ``type=``: 0 (greedy) or a finite number >= :data:`MIN_TEMPERATURE`."""
    try:
        value = finite_float(text)
    except argparse.ArgumentTypeError:
        value = math.nan
    if value != 0 and not value >= MIN_TEMPERATURE:
        raise invalid(f"0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}", text)
    return value


def build_parser() -> ArgumentParser:
    """The argument parser of ``python -m ar_course generate`` (each option's value is checked as it is parsed;
    combinations are checked after parsing)."""
    p = ArgumentParser(prog="python -m ar_course generate",
                       description="Generate class-conditional images with the course's models and save a PNG grid "
                                   "(one column per class).")
    p.add_argument("--out", type=path_arg, required=True, help="PNG file to write")
    p.add_argument("--method", choices=METHODS, default="var", help="next-scale (var) or raster-order (ar) [var]")
    p.add_argument("--classes", type=nonnegative_int, nargs="+", default=None, help="class ids (default: every class)")
    p.add_argument("--per-class", type=int_in(1, MAX_PER_CLASS), default=1,
                   help=f"samples of each class: rows of the grid, 1 to {MAX_PER_CLASS} [1]")
    p.add_argument("--cfg", type=float_in(0.0, MAX_CFG), default=None,
                   help="guidance strength w in [0, 1000], logits (1+w) cond - w uncond; 0 = conditional "
                        "(default: per method, 0 for a model aligned in chapter 11, as its checkpoint records)")
    p.add_argument("--temperature", type=_temperature, default=1.0,
                   help=f"0 = greedy, else >= {MIN_TEMPERATURE:g} [1.0]")
    p.add_argument("--top-k", type=positive_int, default=None, help="keep the k most likely tokens (k >= 1)")
    p.add_argument("--top-p", type=float_in(MIN_TOP_P, 1.0), default=None,
                   help=f"nucleus sampling, p in [{MIN_TOP_P:g}, 1]")
    p.add_argument("--speculative", choices=("draft", "jacobi"), default=None,
                   help="speculative decoding for --method ar: a draft model, or Speculative Jacobi Decoding")
    p.add_argument("--relaxed-delta", type=float_in(0.0, 1.0), default=0.0,
                   help="relaxed acceptance for --speculative jacobi: probability mass in [0, 1] that may move "
                        "(0 = exact) [0]")
    p.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="attention implementation; auto takes a chapter 06 kernel only where it is faster (on a CPU: "
                        "torch); triton and numba force one, which on a CPU runs in a simulator, many times "
                        "slower [auto]")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="[auto: bfloat16 on CUDA, else float32]")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (first call compiles for tens of seconds; needs torch "
                        "attention: --kernels auto or torch)")
    p.add_argument("--graphs", action="store_true",
                   help="replay the batched decode step from CUDA graphs over a static KV cache (CUDA only; the "
                        "first call at a batch size captures them)")
    p.add_argument("--seed", type=int_in(0, SEED_RANGE[1]), default=0)
    p.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, cuda:N, mps or auto [auto]")
    p.add_argument("--var-checkpoint", type=checkpoint_arg, default=None,
                   help="a VAR checkpoint instead of the shipped one: a file, or a shipped name (var_mnist_cca)")
    p.add_argument("--ar-checkpoint", type=checkpoint_arg, default=None,
                   help="a raster AR checkpoint instead of the shipped one: a file, or a shipped name (ar_mnist_grpo)")
    p.add_argument("--ar-model", choices=("base", "grpo", "cca"), default="base",
                   help="which shipped raster model: pre-trained, or aligned by GRPO or CCA (chapter 11; these "
                        "default to --cfg 0, no guidance) [base]")
    p.add_argument("--var-model", choices=("base", "cca"), default="base",
                   help="which shipped VAR model: pre-trained, or aligned by CCA (chapter 11; defaults to --cfg 0, "
                        "no guidance) [base]")
    p.add_argument("--zoom", type=int_in(1, 64), default=2, help="pixel repeat factor of the PNG, 1 to 64 [2]")
    p.add_argument("--stats-json", type=path_arg, default=None,
                   help="also write the generation stats to this .json file")
    return p


def png_bytes(images: torch.Tensor, ncol: int, zoom: int = 1) -> bytes:
    """``images`` ``(N, C, S, S)`` in [0, 1] as a PNG of a grid of ``ncol`` columns, each pixel ``zoom`` x
    ``zoom`` (written by :func:`ar_course.images.encode_png`: no Pillow needed). Values slightly outside [0, 1]
    are clipped; values far outside it are refused (as :func:`ar_course.images.to_grid`).

    Raises:
        TypeError: ``images`` is not a tensor, ``ncol`` or ``zoom`` not an integer.
        ValueError: ``images`` not a non-empty ``(N, C, H, W)`` floating-point tensor with ``C`` 1 or 3 (a uint8
            image in 0..255 is refused: divide it by 255 first), holding NaN or inf or values far outside [0, 1]
            (above 1.5 or below -0.5), or ``ncol`` / ``zoom`` ``< 1``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (N, C, H, W) in [0, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[0] == 0 or not images.is_floating_point():
        raise ValueError(f"images must be a non-empty (N, C, H, W) floating-point tensor in [0, 1] (divide uint8 "
                         f"images by 255), got {tuple(images.shape)} {images.dtype}")
    ncol, zoom = check_int("ncol", ncol, lo=1), check_int("zoom", zoom, lo=1)
    check_finite("images", images)
    grid = to_grid(images, nrow=ncol)  # (H, W, C) float in [0, 1]
    return encode_png((grid * 255).round().astype(np.uint8).repeat(zoom, axis=0).repeat(zoom, axis=1))


def _check_options(args: argparse.Namespace) -> None:
    """Combinations of options that cannot work (each option's own value was checked by the parser)."""
    if args.speculative is not None and args.method != "ar":
        raise UsageError("--speculative applies to --method ar (VAR already samples a whole scale per pass)")
    if args.relaxed_delta > 0 and args.speculative != "jacobi":
        raise UsageError(f"--relaxed-delta {args.relaxed_delta:g} applies to --speculative jacobi only")
    if args.compile and (args.speculative is not None or args.kernels not in ("auto", "torch")):
        raise UsageError("--compile applies to batched generation (no --speculative) with torch attention "
                         "(--kernels auto or torch)")
    if args.graphs and (args.speculative is not None or args.compile):
        raise UsageError("--graphs applies to batched generation (no --speculative), without --compile")
    if args.ar_model != "base" and (args.method != "ar" or args.ar_checkpoint):
        raise UsageError(f"--ar-model {args.ar_model} picks a shipped raster model: use it with --method ar and "
                         "without --ar-checkpoint")
    if args.var_model != "base" and (args.method != "var" or args.var_checkpoint):
        raise UsageError(f"--var-model {args.var_model} picks a shipped VAR model: use it with --method var and "
                         "without --var-checkpoint")
    try:
        device = get_device(args.device)
    except RuntimeError as exc:
        raise UsageError(f"--device {args.device}: {exc}") from None
    if args.graphs and device.type != "cuda":
        raise UsageError(f"--graphs needs a CUDA device, got {device}")


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse ``--out`` and ``--stats-json`` paths that cannot be written, before any work."""
    try:
        check_output_path(args.out, suffix=".png", what="--out")
        if args.stats_json is not None:
            check_output_path(args.stats_json, suffix=".json", what="--stats-json")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _load(args: argparse.Namespace) -> Generator:
    """The shipped models, or the checkpoints given; a bad checkpoint file is a :class:`UsageError`."""
    try:
        if args.var_checkpoint or args.ar_checkpoint:
            return Generator.from_checkpoints(args.var_checkpoint, args.ar_checkpoint, device=args.device)
        return Generator.from_pretrained("mnist", device=args.device, ar=args.ar_model, var=args.var_model)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None


def _check_against_models(args: argparse.Namespace, gen: Generator) -> list[int]:
    """The class ids to generate, after checking them and the method against the loaded models."""
    if args.method == "var" and gen.var is None:
        raise UsageError("--method var (the default) needs a VAR model: add --var-checkpoint, or use --method ar")
    if args.method == "ar" and gen.ar is None:
        raise UsageError("--method ar needs a raster AR model: add --ar-checkpoint, or use --method var")
    if args.speculative == "draft" and gen.ar_draft is None:
        raise UsageError("--speculative draft needs a draft model, which only the shipped models have; use "
                         "--speculative jacobi with --ar-checkpoint")
    n = gen.num_classes
    if args.classes is None:
        return list(range(n))
    wrong = [c for c in args.classes if not 0 <= c < n]
    if wrong:
        raise UsageError(f"--classes must lie in [0, {n - 1}] for this model, got {' '.join(map(str, wrong))}")
    return args.classes


def _stats_json(stats: dict) -> str:
    """``stats`` as JSON; a NaN (e.g. no acceptance rate without speculative decoding) becomes ``null``."""
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in stats.items()}
    return json.dumps(clean, indent=2, allow_nan=False)


def _request(args: argparse.Namespace, classes: list[int], gen: Generator) -> GenerationRequest:
    """The :class:`GenerationRequest` of the command line: ``--per-class`` rows of ``classes``; without ``--cfg``
    the Generator's default for the method (0 for a model aligned in chapter 11, whichever flag loaded it)."""
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    cfg = gen.default_cfg[args.method] if args.cfg is None else args.cfg
    return GenerationRequest(torch.tensor(classes).repeat(args.per_class), method=args.method, sampling=sampling,
                             cfg=cfg, speculative=args.speculative, relaxed_delta=args.relaxed_delta,
                             kernels=args.kernels, seed=args.seed, precision=args.precision, compile=args.compile,
                             graphs=args.graphs, progress=sys.stderr.isatty())


def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course generate``: checks every option and output path, loads the models, generates, and
    writes the PNG (and the stats JSON) atomically."""
    args = build_parser().parse_args(argv)
    _check_options(args)
    _check_outputs(args)
    gen = _load(args)
    classes = _check_against_models(args, gen)
    if args.compile:
        print("compiling the decode step with torch.compile (tens of seconds the first time)...", flush=True)
    request = _request(args, classes, gen)
    out = gen.run(request)
    png = png_bytes(out.images, len(classes), args.zoom)
    with contextlib.ExitStack() as stack:  # each written atomically; neither appears if a write fails
        png_tmp = stack.enter_context(atomic_path(args.out))
        png_tmp.write_bytes(png)
        if args.stats_json is not None:
            stats = {**out.stats.as_dict(), "cfg": request.cfg}  # the strength used, a default included
            stack.enter_context(atomic_path(args.stats_json)).write_text(_stats_json(stats))
    print(f"{out.stats.summary()}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    from ar_course.cli import main as cli_main

    raise SystemExit(cli_main(["generate", *sys.argv[1:]]))
