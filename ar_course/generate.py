"""``python -m ar_course generate``: class-conditional images from the shipped models, saved as a PNG grid.

    python -m ar_course generate --out samples.png                      # VAR, one digit of each class
    python -m ar_course generate --method ar --speculative jacobi --classes 3 7 --per-class 4 --out s.png

The grid has one column per requested class and ``--per-class`` rows. A one-line summary (forward passes,
wall time, backends) is printed; ``--stats-json PATH`` writes the full stats.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from ar_course.checkpoint import CheckpointError
from ar_course.cli import ArgumentParser
from ar_course.system import KERNELS, METHODS, PRECISIONS, Generator
from ar_course.viz import to_grid


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ar_course generate",
                       description="Generate class-conditional images with the course's models and save a PNG grid "
                                   "(one column per class).")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--method", choices=METHODS, default="var", help="next-scale (var) or raster-order (ar) [var]")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class ids (default: every class)")
    p.add_argument("--per-class", type=int, default=1, help="samples of each class: rows of the grid [1]")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance strength w, logits (1+w) cond - w uncond; 0 = conditional (default: per method)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy [1.0]")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--speculative", choices=("draft", "jacobi"), default=None,
                   help="speculative decoding for --method ar: a draft model, or Speculative Jacobi Decoding")
    p.add_argument("--relaxed-delta", type=float, default=0.0,
                   help="relaxed acceptance budget for --speculative jacobi (0 = exact) [0]")
    p.add_argument("--kernels", choices=KERNELS, default="auto", help="attention implementation [auto]")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="[auto: bfloat16 on CUDA, else float32]")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (first call compiles for tens of seconds; needs torch "
                        "attention: --kernels auto or torch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto [auto]")
    p.add_argument("--var-checkpoint", type=Path, default=None, help="a VAR checkpoint instead of the shipped one")
    p.add_argument("--ar-checkpoint", type=Path, default=None,
                   help="a raster AR checkpoint instead of the shipped one")
    p.add_argument("--dataset", choices=("mnist", "shapes"), default="mnist",
                   help="what custom checkpoints generate (names the classifier) [mnist]")
    p.add_argument("--zoom", type=int, default=2, help="pixel repeat factor of the PNG [2]")
    p.add_argument("--stats-json", type=Path, default=None, help="also write the generation stats as JSON")
    return p


def save_png(images: torch.Tensor, ncol: int, path: Path, zoom: int = 1) -> Path:
    """Write ``images`` ``(N, C, S, S)`` in [0, 1] as a grid of ``ncol`` columns to ``path`` (PNG)."""
    from PIL import Image

    grid = to_grid(images, nrow=ncol)  # (H, W, C) float in [0, 1]
    pixels = (grid * 255).round().astype(np.uint8).repeat(zoom, axis=0).repeat(zoom, axis=1)
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.zoom < 1:
        parser.error("--per-class and --zoom must be >= 1")
    if args.out.suffix.lower() != ".png":
        parser.error(f"--out must name a .png file, got {str(args.out)!r}")
    if args.dataset != "mnist" and not (args.var_checkpoint or args.ar_checkpoint):
        parser.error(f"the shipped models generate mnist; --dataset {args.dataset} needs --var-checkpoint or "
                     "--ar-checkpoint")
    try:
        if args.var_checkpoint or args.ar_checkpoint:
            gen = Generator.from_checkpoints(args.var_checkpoint, args.ar_checkpoint, device=args.device,
                                             dataset=args.dataset)
        else:
            gen = Generator.from_pretrained("mnist", device=args.device)
        classes = list(range(gen.num_classes)) if args.classes is None else args.classes
        if args.compile:
            print("compiling the decode step with torch.compile (tens of seconds the first time)...", flush=True)
        out = gen.generate(torch.tensor(classes).repeat(args.per_class), method=args.method, cfg=args.cfg,
                           top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                           speculative=args.speculative, relaxed_delta=args.relaxed_delta, kernels=args.kernels,
                           seed=args.seed, precision=args.precision, compile=args.compile,
                           progress=sys.stderr.isatty())
    except (ValueError, RuntimeError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    save_png(out.images, len(classes), args.out, args.zoom)
    if args.stats_json:
        args.stats_json.write_text(json.dumps(out.stats.as_dict(), indent=2))
    print(f"{out.stats.summary()}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
