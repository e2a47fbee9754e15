"""The ``python -m ar_course`` command line.

Sub-commands: ``generate`` (images from the shipped models), ``doctor`` (check the machine), ``grade``
(grade a notebook), ``bench`` (run the benchmarks), ``serve`` (a text model over HTTP), ``train <what>`` (the
chapters' trainers).
``python -m ar_course <command> --help`` describes each.

Errors: whatever goes wrong, the command prints one line ``error: ...`` on stderr and exits with 2 for bad
input (arguments, input files: :class:`UsageError` and argparse errors) or 1 for a failure while working;
Ctrl-C exits 130 (a trainer with a training state writes it and exits 1 with the ``--resume`` line instead).
``--debug`` anywhere on the command line (or ``AR_COURSE_DEBUG=1``) shows the traceback instead. A command's
parser is an :class:`ArgumentParser`; its options check their values with the ``type=`` helpers here
(:func:`finite_float`, :func:`float_in`, :func:`int_in`...), so a bad number is refused before any work with
``error: --cfg must be a finite number in [0, 1000], got nan``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

from ar_course.project import install_command

# what -> (module with main(argv) -> int, or "module:function", one-line description)
TRAINERS: dict[str, tuple[str, str]] = {
    "tokenizer": ("ar_course.tokenizers.train", "VQ / residual VQ / multi-scale VQ tokenizer (chapter 01)"),
    "lm": ("ar_course.transformer.train", "character-level GPT on the offline text corpus (chapter 02)"),
    "classifier": ("ar_course.metrics", "the evaluation classifier for an image set (chapter 03)"),
    "ar": ("ar_course.raster.train", "class-conditional raster-order AR over VQ tokens (chapter 03)"),
    "var": ("ar_course.var.train", "VAR next-scale prediction over multi-scale VQ tokens (chapter 04)"),
    "maskgit": ("ar_course.masked.train", "MaskGIT: masked parallel decoding over VQ tokens (chapter 08)"),
    "diffusion_lm": ("ar_course.diffusion_lm.train", "masked diffusion LM on the offline text corpus (chapter 08)"),
    "continuous": ("ar_course.continuous.train",
                   "raster AR over continuous tokens with a flow-matching head (chapter 10)"),
    "grpo": ("ar_course.align.train:grpo_main", "GRPO fine-tuning of the raster AR model with a reward (chapter 11)"),
    "cca": ("ar_course.align.train:cca_main",
            "CCA of the raster AR model or VAR for guidance-free sampling (chapter 11)"),
}

COMMANDS = {
    "generate": ("ar_course.generate", "generate images with the shipped models and write a PNG grid"),
    "doctor": ("ar_course.doctor", "check that this machine can run the course"),
    "grade": ("ar_course.grade", "execute a notebook's exercises and print which pass"),
    "bench": ("ar_course.bench", "run the benchmarks in benchmarks/ and print their summary table"),
    "serve": ("ar_course.serving.server", "serve a text model over HTTP: OpenAI-style completions, streaming"),
}

EXTRAS = {"grade": "course"}
"""The optional dependencies (``pyproject.toml``'s extras) a command imports beyond the library's own."""

PROG = "python -m ar_course"
"""How the command line is named in usage lines, unless it runs as the ``ar-course`` script (:func:`prog`)."""
DEBUG_FLAG = "--debug"
DEBUG_ENV = "AR_COURSE_DEBUG"
EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


def missing_extra(command: str, extra: str, exc: ModuleNotFoundError) -> str:
    """The one line for ``command`` run where the ``extra`` it imports (``exc``: the failed import) is missing."""
    return f"{command} needs the {extra!r} extra, which is not installed ({exc}): {install_command(extra)}"


def prog(command: str = "") -> str:
    """The command line's name as the user typed it, followed by ``command`` when given: ``ar-course generate``
    when run as the ``ar-course`` console script, else ``python -m ar_course generate``."""
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    base = "ar-course" if os.path.splitext(name)[0] in ("ar-course", "ar-course-script") else PROG
    return f"{base} {command}" if command else base


class UsageError(Exception):
    """Bad arguments or a bad input file, found after parsing (a path, a class id, a notebook):
    :func:`main` prints ``error: <message>`` and exits with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line: ``error: ... (see PROG --help)``, exit status 2.

    A value refused by a ``type=`` helper of this module reads ``--cfg must be ...`` rather than argparse's
    ``argument --cfg: must be ...``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As argparse's, with a ``prog`` of ``python -m ar_course ...`` renamed by :func:`prog`."""
        name = kwargs.get("prog")
        if isinstance(name, str) and (name == PROG or name.startswith(PROG + " ")):
            kwargs["prog"] = prog(name[len(PROG):].strip())
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        """Print ``message`` as one ``error:`` line on stderr and exit with status 2 (``SystemExit``); under
        torchrun, a process of rank other than 0 exits with status 2 without printing."""
        if os.environ.get("RANK", "0") != "0":  # under torchrun every process parses: rank 0 alone speaks
            self.exit(EXIT_USAGE)
        message = re.sub(r"^argument (\S+): (must )", r"\1 \2", " ".join(message.splitlines()))
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


# -- type= helpers for numeric options ---------------------------------------------------------------------


def _number(text: str) -> float | None:
    """``text`` as a float (``nan`` and ``inf`` included), or None when it is not a number."""
    try:
        return float(text)
    except ValueError:
        return None


def invalid(requirement: str, text: str) -> argparse.ArgumentTypeError:
    """The error a ``type=`` function raises for ``text``: ``must be <requirement>, got <text>`` (the value quoted
    unless it reads as a number, shortened when long)."""
    shown = text.strip() if _number(text) is not None else repr(text)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return argparse.ArgumentTypeError(f"must be {requirement}, got {shown}")


def path_arg(text: str) -> Path:
    """argparse ``type=`` for a file or folder option: the path with a leading ``~`` expanded as a shell would
    (``--out=~/x.png`` and a quoted ``'~/x.png'`` reach the program unexpanded: not a folder named ``~`` here).
    The empty text is refused (``Path("")`` would be the current folder: ``--notebooks "$UNSET"``)."""
    if not text:
        raise invalid("a path", text)
    return Path(os.path.expanduser(text))


def checkpoint_arg(text: str) -> str:
    """argparse ``type=`` for a checkpoint option: a file or a shipped name (as
    :func:`ar_course.checkpoint.resolve` reads it: ``var_mnist_cca`` is a name, ``runs/var.safetensors`` a path),
    a leading ``~`` expanded as :func:`path_arg` does; only the empty text is refused here."""
    if not text:
        raise invalid("a checkpoint file or a shipped checkpoint name", text)
    return os.path.expanduser(text)


def finite_float(text: str) -> float:
    """argparse ``type=``: a finite float (``nan``, ``inf`` and non-numbers are refused)."""
    value = _number(text)
    if value is None or not math.isfinite(value):
        raise invalid("a finite number", text)
    return value


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    if hi == math.inf:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False
             ) -> Callable[[str], float]:
    """argparse ``type=``: a finite float in ``[lo, hi]`` (an end excluded with ``lo_open`` / ``hi_open``; ``hi``
    may be inf): ``--top-p must be a finite number in [1e-06, 1], got 1.5``."""
    requirement = f"a finite number {_interval(lo, hi, lo_open, hi_open)}"

    def parse(text: str) -> float:
        value = _number(text)
        if value is None or not math.isfinite(value) or not (
                (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)):
            raise invalid(requirement, text)
        return value

    return parse


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse ``type=``: an integer ``>= lo`` (and ``<= hi`` when given): ``--zoom must be an integer in [1,
    64], got 0``."""
    requirement = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise invalid(requirement, text) from None
        if value < lo or (hi is not None and value > hi):
            raise invalid(requirement, text)
        return value

    return parse


def int_list(lo: int) -> Callable[[str], tuple[int, ...]]:
    """argparse ``type=``: comma-separated integers, each ``>= lo``, such as ``1,2,4,8``: ``--scales must be
    comma-separated integers >= 1, got '1,x'``."""
    requirement = f"comma-separated integers >= {lo}"

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(s) for s in text.split(","))
        except ValueError:
            raise invalid(requirement, text) from None
        if min(values) < lo:
            raise invalid(requirement, text)
        return values

    return parse


def float_list(lo: float = -math.inf, *, allow_empty: bool = False) -> Callable[[str], tuple[float, ...]]:
    """argparse ``type=``: comma-separated finite numbers, each ``>= lo`` (any finite number when ``lo`` is -inf),
    such as ``0,0.5,1``; the empty text is the empty tuple when ``allow_empty``: ``--cfgs must be comma-separated
    finite numbers, got '0,x'``."""
    requirement = "comma-separated finite numbers" + ("" if lo == -math.inf else f" >= {lo:g}")

    def parse(text: str) -> tuple[float, ...]:
        if allow_empty and not text.strip():
            return ()
        try:
            values = tuple(float(s) for s in text.split(","))
        except ValueError:
            raise invalid(requirement, text) from None
        if any(not math.isfinite(v) or v < lo for v in values):
            raise invalid(requirement, text)
        return values

    return parse


def device_name(text: str) -> str:
    """argparse ``type=``: ``auto`` or a device of this machine: ``cpu``, ``cuda``, ``cuda:N`` (a GPU that is
    there) or ``mps``: ``--device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'``, ``--device must be a device
    of this machine, which has no CUDA GPU, got 'cuda'``."""
    if text == "auto":
        return text
    import torch  # not at import: ``python -m ar_course --help`` stays fast

    requirement = "auto, cpu, cuda, cuda:N or mps"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise invalid(requirement, text)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            has = f"cuda:0 to cuda:{count - 1}" if count else "no CUDA GPU"
            raise invalid(f"a device of this machine, which has {has}", text)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise invalid("a device of this machine, which has no MPS device", text)
    return text


# ready-made type= helpers: an integer >= 1 or >= 0, a finite float > 0 or >= 0, a probability in [0, 1]
positive_int = int_in(1)
nonnegative_int = int_in(0)
positive_float = float_in(0.0, lo_open=True)
nonnegative_float = float_in(0.0)
probability = float_in(0.0, 1.0)


# -- dispatch ----------------------------------------------------------------------------------------------


def _available_trainers() -> dict[str, tuple[str, str]]:
    out = {}
    for what, (target, desc) in TRAINERS.items():
        module, _, function = target.partition(":")
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, function or "main") or (not function and hasattr(mod, "train_main")):
            out[what] = (target, desc)
    return out


def _train(argv: list[str]) -> int:
    trainers = _available_trainers()
    listing = "\n".join(f"  {k:<12} {d}" for k, (_, d) in trainers.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog()} train WHAT [options]\n\nWHAT is one of:\n{listing}\n\n"
              f"{prog()} train WHAT --help lists its options.")
        if argv:
            return 0
        raise UsageError(f"train needs WHAT to train, one of: {', '.join(trainers)}")
    what, rest = argv[0], argv[1:]
    if what not in trainers:
        raise UsageError(f"unknown trainer {what!r}; choose from: {', '.join(trainers)}")
    from ar_course.distributed import close_distributed, init_distributed

    init_distributed()  # joins the process group when launched by torchrun; no-op otherwise
    try:
        module, _, function = trainers[what][0].partition(":")
        mod = importlib.import_module(module)
        entry = getattr(mod, function) if function else getattr(mod, "main", None) or getattr(mod, "train_main")
        return int(entry(rest) or 0)
    finally:
        close_distributed()


def _dispatch(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog=PROG,
        description="Autoregressive generation from scratch: the course's command line.",
        epilog=f"Run `{prog()} COMMAND --help` for a command's options; add {DEBUG_FLAG} to any command to see "
               "the traceback of an error.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, desc) in COMMANDS.items():
        sub.add_parser(name, help=desc, add_help=False)
    sub.add_parser("train", help="train a model of the course from a fixed seed", add_help=False)
    if not argv:
        parser.print_help()
        raise UsageError(f"no command given; choose from: {', '.join([*COMMANDS, 'train'])}")
    if argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return _train(rest)
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}; choose from: {', '.join([*COMMANDS, 'train'])} "
                         f"(see {prog()} --help)")
    try:
        mod = importlib.import_module(COMMANDS[command][0])
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get(command)
        if extra is None or (exc.name or "").split(".")[0] == "ar_course":
            raise
        if any(arg in ("-h", "--help") for arg in rest):  # the help a user asks for, with what to install first
            print(f"usage: {prog()} {command} ...\n\n{COMMANDS[command][1]}\n\nIts options are listed once the "
                  f"{extra!r} extra is installed: {install_command(extra)}")
            return 0
        raise SystemExit(missing_extra(command, extra, exc)) from None  # status 1
    return int(mod.main(rest) or 0)


def first_line(text: str) -> str:
    """The first non-blank line of ``text``, stripped ("" when there is none): an error message for one line."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """``exc`` as ``Type: message`` on one line: the first line of its message, cut to ``limit`` characters
    (``...`` marks a cut)."""
    text = first_line(str(exc))
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _describe(exc: BaseException) -> str:
    """One line for an unexpected exception: its message, after its type's name unless that adds nothing."""
    message = first_line(str(exc))
    if isinstance(exc, (ValueError, RuntimeError, OSError)) and message:
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _error(message: str, status: int) -> int:
    """Print ``error: <message>`` as one line on stderr (line breaks inside become spaces); return ``status``."""
    print(f"error: {' '.join(message.splitlines())}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m ar_course ARGV`` and return its exit status (0 ok, 1 failure, 2 bad input, 130 Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return _dispatch(argv)
    except SystemExit as exc:  # argparse (--help, usage errors) and sys.exit() inside a command
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        return _error(first_line(str(exc.code)), EXIT_FAILURE)
    except UsageError as exc:
        if debug:
            raise
        return _error(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        if debug:
            raise
        return _error("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - the safety net: one line instead of a traceback
        if debug:
            raise
        return _error(f"{_describe(exc)} (rerun with {DEBUG_FLAG} for the traceback)", EXIT_FAILURE)
