"""The ``python -m ar_course`` command line.

Sub-commands: ``generate`` (images from the shipped models), ``doctor`` (check the machine), ``grade``
(grade a notebook), ``bench`` (run the benchmarks), ``train <what>`` (the chapters' trainers).
``python -m ar_course <command> --help`` describes each.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# what -> (module with main(argv) -> int, one-line description)
TRAINERS: dict[str, tuple[str, str]] = {
    "tokenizer": ("ar_course.tokenizers.train", "VQ / residual VQ / multi-scale VQ tokenizer (chapter 01)"),
    "lm": ("ar_course.transformer.train", "character-level GPT on the offline text corpus (chapter 02)"),
    "classifier": ("ar_course.metrics", "the evaluation classifier for an image set (chapter 03)"),
    "ar": ("ar_course.raster.train", "class-conditional raster-order AR over VQ tokens (chapter 03)"),
    "var": ("ar_course.var.train", "VAR next-scale prediction over multi-scale VQ tokens (chapter 04)"),
}

COMMANDS = {
    "generate": ("ar_course.generate", "generate images with the shipped models and write a PNG grid"),
    "doctor": ("ar_course.doctor", "check that this machine can run the course"),
    "grade": ("ar_course.grade", "execute a notebook's exercises and print which pass"),
    "bench": ("ar_course.bench", "run the benchmarks in benchmarks/ and print their summary table"),
}


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line: ``error: ... (see PROG --help)``, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _available_trainers() -> dict[str, tuple[str, str]]:
    out = {}
    for what, (module, desc) in TRAINERS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, "main") or hasattr(mod, "train_main"):
            out[what] = (module, desc)
    return out


def _train(argv: list[str]) -> int:
    trainers = _available_trainers()
    listing = "\n".join(f"  {k:<12} {d}" for k, (_, d) in trainers.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m ar_course train WHAT [options]\n\nWHAT is one of:\n{listing}\n\n"
              "python -m ar_course train WHAT --help lists its options.")
        return 0 if argv else 2
    what, rest = argv[0], argv[1:]
    if what not in trainers:
        print(f"error: unknown trainer {what!r}; choose from: {', '.join(trainers)}", file=sys.stderr)
        return 2
    from ar_course.distributed import close_distributed, init_distributed

    init_distributed()  # joins the process group when launched by torchrun; no-op otherwise
    try:
        mod = importlib.import_module(trainers[what][0])
        entry = getattr(mod, "main", None) or getattr(mod, "train_main")
        return int(entry(rest) or 0)
    finally:
        close_distributed()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m ar_course",
        description="Autoregressive generation from scratch: the course's command line.",
        epilog="Run `python -m ar_course COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, desc) in COMMANDS.items():
        sub.add_parser(name, help=desc, add_help=False)
    sub.add_parser("train", help="train a model of the course from a fixed seed", add_help=False)
    if not argv:
        parser.print_help()
        return 2
    if argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return _train(rest)
    if command not in COMMANDS:
        parser.print_usage(sys.stderr)
        print(f"error: unknown command {command!r}; choose from: {', '.join([*COMMANDS, 'train'])}", file=sys.stderr)
        return 2
    mod = importlib.import_module(COMMANDS[command][0])
    return int(mod.main(rest) or 0)
