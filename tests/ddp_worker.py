"""Run the course's trainers tiny and fast, alone or under torchrun (see test_distributed.py), each through
the ``main(argv)`` that ``python -m ar_course train WHAT`` calls (``ar_course.cli.TRAINERS``), in one process
group joined once (a group cannot be joined again after leaving it under torchrun's rendezvous). Every run
gets the same arguments either way: ``--batch-size`` is the global batch, so 2 processes take 2 examples per
step each where one process takes 4.

Usage: python ddp_worker.py OUT_DIR  (writes OUT_DIR/<run>.safetensors for every run in RUNS)"""

import importlib
import sys

import torch

from ar_course import distributed as ddp
from ar_course.cli import TRAINERS

TINY_GPT = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--eval-per-class", "0", "--train-images", "64"]
TINY_TOKENIZER = ["--num-codes", "16", "--usage-window", "2"]  # a window closes at step 2: dead codes restart
RUNS: dict[str, list[str]] = {
    "lm": ["lm", "--preset", "tiny", "--batch-size", "4", "--no-progress"],
    "ar": ["ar", "--batch-size", "4", *TINY_GPT],
    "var": ["var", "--batch-size", "4", *TINY_GPT],
    "tokenizer_msvq": ["tokenizer", "--quantizer", "msvq", "--batch-size", "4", *TINY_TOKENIZER],
    "tokenizer_rvq_ema": ["tokenizer", "--quantizer", "rvq", "--depth", "2", "--ema", "--batch-size", "4",
                          *TINY_TOKENIZER],
    # Adam turns the last-bit differences of a 2-process reduction (here SyncBatchNorm's sums too) into weight
    # differences up to the step size where a gradient is nearly zero: at the default lr (3e-3, full from the
    # first step of a 3-step run) one conv weight of 4608 differed by 6.7e-5. A small lr keeps such rounding under
    # the 1e-5 the weights are compared at, while a wrong gradient (moving weights by up to 3e-4) still shows.
    "classifier": ["classifier", "--batch-size", "8", "--lr", "1e-4"],
    # a loss term over the whole batch, not a mean over examples (the codebook entropy): ddp.global_batch_sum
    "tokenizer_lfq": ["tokenizer", "--quantizer", "lfq", "--batch-size", "4"],
    # losses that draw random numbers per example (masks, noise levels, noise): ddp.draw_rows
    "tokenizer_kl": ["tokenizer", "--quantizer", "kl", "--batch-size", "4"],
    "diffusion_lm": ["diffusion_lm", "--batch-size", "4", "--no-progress"],
    "maskgit": ["maskgit", "--batch-size", "4", *TINY_GPT],
    "continuous": ["continuous", "--batch-size", "4", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                   "--eval-per-class", "0", "--head-width", "16", "--head-depth", "1"],
}
STEPS = 3


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    ddp.init_distributed()
    try:
        for name, (what, *argv) in RUNS.items():
            module = importlib.import_module(TRAINERS[what][0])
            entry = getattr(module, "main", None) or getattr(module, "train_main")
            code = entry([*argv, "--steps", str(STEPS), "--seed", "0", "--out", f"{out_dir}/{name}.safetensors"])
            if code != 0:
                raise SystemExit(f"{name}: exit status {code}")
    finally:
        ddp.close_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
