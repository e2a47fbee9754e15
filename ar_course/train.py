"""A small, generic training loop: AdamW, warmup + cosine schedule, gradient clipping, ``tqdm`` progress,
loss history, periodic evaluation, and a training state to resume from. Chapters' trainers
(``python -m ar_course train ...``) build on it.

Usage::

    history = train_loop(model, loss_fn=lambda m, b: m(*b)[1], batches=iter_batches(), config=TrainConfig(steps=500))

Resuming: with ``state_path`` the loop writes a training state every ``config.checkpoint_every`` steps, at the
end, and when SIGTERM or SIGINT arrives (it finishes the current step, writes the state and raises
:class:`TrainingInterrupted`). The file (safetensors, written atomically) holds the model's weights and buffers
(in their own dtype), the optimizer state, the step, the history, torch's random state, the schedule
(:class:`TrainConfig`) and the run's ``settings`` (what else shapes the run: the trainers give their seed, global
batch size and a :func:`~ar_course.utils.content_digest` of their data and of any model they learn from; the
loop adds the model's config dataclass, ``model.config``, where it has one); ``resume=True`` refuses a
state whose schedule or settings differ, loads it and fast-forwards ``batches`` by drawing the batches already
trained on, so every random draw of a run must come from the batch stream (rebuilt from its seed) or from torch's
global generator: then a resumed run ends with the weights of an uninterrupted one.

The second half of this module is the command-line contract the trainers share: argparse value types,
``--threads`` / ``--no-progress``, ``--resume`` / ``--checkpoint-every``, checking ``--out`` before any work, and
:func:`trainer_main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterable, Iterator

import torch

from ar_course import distributed as ddp
from ar_course.checkpoint import (
    ASSETS, CheckpointError, NonFiniteWeightsError, first_and_more, load, load_checkpoint, load_error_problems,
    resolve, save_checkpoint, state_dict_problems,
)
from ar_course.cli import (
    device_name, exception_line, int_in, nonnegative_int, path_arg, positive_float, positive_int, probability,
)
from ar_course.files import check_output_path
from ar_course.project import is_source_checkout
from ar_course.utils import check_int, check_number, progress_bar

STATE_KIND = "train-state"
STATE_SUFFIX = ".train-state.safetensors"
# TrainConfig fields a resumed run must share with the run that wrote the state (they shape the trajectory)
_SCHEDULE_FIELDS = ("steps", "lr", "weight_decay", "warmup", "min_lr_ratio", "grad_clip", "betas", "keep_best", "ema")
DIVERGED_HINT = "rerun with a lower --lr"
"""What the error of a run that diverged (a NaN or inf loss, or weights) says to do."""


@dataclass
class TrainConfig:
    """The schedule and bookkeeping of :func:`train_loop`, checked when it is made.

    ``weight_decay`` is AdamW's decoupled decay on every trainable parameter, norm gains, biases, embeddings and
    codebooks included (the image generators' trainers use 0.01, the classifier 1e-4, the others 0). nanoGPT
    decays only the 2-D matmul weights; for that, pass :func:`train_loop` an ``optimizer`` with two parameter
    groups.

    Raises:
        TypeError: a field of the wrong type (``lr="3e-3"``, ``steps=2.5``, ``keep_best=None``...).
        ValueError: a field out of range: ``steps``, ``log_every`` < 1; ``lr`` <= 0; ``weight_decay``,
            ``warmup``, ``grad_clip``, ``eval_every``, ``checkpoint_every`` < 0; ``min_lr_ratio`` outside
            [0, 1]; ``betas`` not two numbers in [0, 1); NaN or inf anywhere. (``ema`` outside [0, 1) is a
            :class:`TrainingError` of :func:`train_loop`.)
    """

    steps: int = 1000
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0  # the largest gradient norm (0 or None: no clipping)
    betas: tuple[float, float] = (0.9, 0.99)
    eval_every: int = 0  # 0: evaluate only at the end (if an eval_fn is given)
    log_every: int = 10
    checkpoint_every: int = 200  # training-state writes (with a state_path); 0: only when interrupted and at the end
    keep_best: str = ""  # an eval metric to minimise: end with the weights of its lowest evaluation ("": the last)
    ema: float = 0.0  # decay of a moving average of the weights that evaluations and the end use (0: none)

    def __post_init__(self) -> None:
        self.steps = check_int("steps", self.steps, lo=1)
        self.lr = check_number("lr", self.lr, 0, lo_open=True)
        self.weight_decay = check_number("weight_decay", self.weight_decay, 0)
        self.warmup = check_int("warmup", self.warmup, lo=0)
        self.min_lr_ratio = check_number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        if self.grad_clip is not None:  # a negative norm would turn clipping into gradient ascent
            self.grad_clip = check_number("grad_clip", self.grad_clip, 0)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(check_number(f"betas[{i}]", b, 0, 1, hi_open=True) for i, b in enumerate(self.betas))
        self.eval_every = check_int("eval_every", self.eval_every, lo=0)
        self.log_every = check_int("log_every", self.log_every, lo=1)
        self.checkpoint_every = check_int("checkpoint_every", self.checkpoint_every, lo=0)
        if not isinstance(self.keep_best, str):
            raise TypeError(f"keep_best must be the name of an eval metric (a str, '' for none), "
                            f"got {self.keep_best!r} ({type(self.keep_best).__name__})")
        self.ema = check_number("ema", self.ema)  # its range is train_loop's TrainingError


@dataclass
class History:
    """Loss per step and evaluation results per evaluation step."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None  # with ``TrainConfig.keep_best``: the evaluation whose weights the run ended with
    best_value: float | None = None
    # wall-clock seconds in the loop (steps, evaluations, state writes), summed over the processes of a resumed run;
    # not compared: a resumed run equals an uninterrupted one in everything else
    seconds: float = field(default=0.0, compare=False)

    def smoothed(self, window: int = 20) -> list[float]:
        """Running mean of the training loss over ``window`` steps (an integer >= 1, else TypeError or
        ValueError)."""
        window = check_int("window", window, lo=1)
        out, acc = [], 0.0
        for i, v in enumerate(self.loss):
            acc += v
            if i >= window:
                acc -= self.loss[i - window]
            out.append(acc / min(i + 1, window))
        return out


class TrainingError(RuntimeError):
    """A training run cannot start or go on; the message is one line for the user."""


class TrainingInterrupted(TrainingError):
    """SIGTERM or SIGINT stopped :func:`train_loop` after ``step`` completed steps, whose state is at ``path``."""

    def __init__(self, step: int, path: Path) -> None:
        super().__init__(f"interrupted at step {step}; the training state is in {path}")
        self.step, self.path = step, path


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of step ``step`` (0-based): linear warmup over the first ``warmup`` steps (``lr / warmup``
    at step 0, ``lr`` at step ``warmup - 1``), then cosine decay that reaches ``min_lr_ratio * lr`` at step
    ``steps`` (one past the last step trained, which therefore runs a little above the floor)."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cos)


def image_warmup(steps: int, most: int = 100) -> int:
    """The image trainers' warmup (raster AR, VAR, MaskGIT, continuous AR: ``most=100``; the classifier: 50):
    ``most`` steps, or a third of a run shorter than ``3 * most``, so that a short run reaches its learning rate
    and decays to the floor (a fixed 100-step warmup left a 60-step run at 0.6 lr, never decayed)."""
    return min(most, steps // 3)


class _LossModule(torch.nn.Module):
    """``forward(batch) = loss_fn(model, batch)``: what DistributedDataParallel wraps, so that the loss
    function always receives the model itself (its attributes and methods) while the forward pass still
    goes through DDP, which then averages the gradients of ``model``'s parameters."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class _StopSignals:
    """While active, SIGTERM and SIGINT set :attr:`received` instead of stopping the process; the same signal
    a second time stops it at once (through the handler that was there before: Ctrl-C twice). The other
    signal is ignored then (torchrun answers a Ctrl-C by sending its workers SIGTERM). A no-op outside the
    main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None  # the first signal that arrived
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signum:  # asked twice: stop now, the last state written is intact
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
        self.received = self.received or signum

    def __enter__(self) -> "_StopSignals":
        if self.enabled:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging, as diffusion models are trained
    with): update ``n`` (0, 1, ...) sets ``avg = d * avg + (1 - d) * weights`` with ``d = min(decay, (1 + n) /
    (10 + n))``, a short memory while the weights still move fast. Buffers that are not floating point are
    copied. ``state``: the averages to continue from (a resumed run's), else the model's weights now."""

    def __init__(self, model: torch.nn.Module, decay: float, state: dict[str, torch.Tensor] | None = None) -> None:
        self.decay = decay
        self.state = state if state is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, n: int) -> None:
        """Fold ``model``'s weights into the average as update number ``n``."""
        d = min(self.decay, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            avg = self.state[k]
            if avg.is_floating_point():
                avg.lerp_(v.detach().to(avg.dtype), 1.0 - d)
            else:
                avg.copy_(v)

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``model`` holds the averaged weights inside the ``with`` block and its own again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield model
        finally:
            model.load_state_dict(own)


def _run_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """``settings`` as a training state stores them (JSON: tuples become lists; ``None``: ``{}``).

    Raises:
        TypeError: ``settings`` is not a dict, or holds a value JSON cannot store.
        ValueError: ``settings`` holds NaN or inf.
    """
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise TypeError(f"settings must be a dict of the run's settings (such as seed and batch_size), got "
                        f"{type(settings).__name__}")
    try:
        return json.loads(json.dumps(settings, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"settings must hold numbers, strings, bools, None and lists of them: {exc}") from None


def save_train_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                     history: History, config: TrainConfig, best: dict[str, torch.Tensor] | None = None,
                     average: dict[str, torch.Tensor] | None = None, settings: dict[str, Any] | None = None) -> Path:
    """Write what :func:`train_loop` needs to continue after ``step`` completed steps (rank 0 only, atomic).

    Tensors: ``model/<name>`` (weights and buffers as they are, in their own dtype), ``best/<name>`` (the weights of the
    best evaluation so far, with ``keep_best``), ``ema/<name>`` (the :class:`WeightAverage`, with ``ema``),
    ``optimizer/<i>/<name>`` and ``rng/cpu`` (``rng/cuda`` too when CUDA is in use); JSON metadata: the step, the
    history, the optimizer's hyper-parameters, the :class:`TrainConfig` and the run's ``settings`` (see
    :func:`train_loop`; TypeError or ValueError as in :func:`train_loop` when they cannot be stored)."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"best/{k}": v for k, v in (best or {}).items()})
    tensors.update({f"ema/{k}": v for k, v in (average or {}).items()})
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for i, state in opt["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer/{i}/{k}"] = v
            else:
                scalars.setdefault(str(i), {})[k] = v
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    return save_checkpoint(path, tensors, config, kind=STATE_KIND, step=step, history=dataclasses.asdict(history),
                           param_groups=opt["param_groups"], optimizer_scalars=scalars,
                           settings=_run_settings(settings))


def read_train_state(path: str | Path, config: TrainConfig,
                     settings: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a state written by :func:`save_train_state`; :class:`TrainingError`
    when it is missing, damaged, or was written with a different schedule than ``config`` or other run
    ``settings`` (one line naming each change, ``seed 0 -> 7``; a setting only one side has shows ``None``; the
    model's config, which :func:`train_loop` adds as ``settings["model"]``, field by field: ``n_embd 16 -> 32``,
    where both sides have one). A state written before states recorded settings (or the model's config) has none
    to compare, and is accepted. A state whose contents are not what :func:`save_train_state` writes (a step that
    is not an int in ``0..config.steps``, a missing or malformed optimizer state, history, settings or ``rng/cpu``)
    is a :class:`TrainingError` naming the file and the field.

    Raises:
        TypeError, ValueError: ``settings`` that :func:`train_loop` refuses.
        TrainingError: see above.
    """
    settings = _run_settings(settings)
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no training state at {path} to resume from")
    try:
        tensors, meta = load_checkpoint(path)
    except CheckpointError as exc:
        raise TrainingError(str(exc)) from None
    if meta["kind"] != STATE_KIND:
        raise TrainingError(f"{path} is not a training state (it holds a {meta['kind']!r} checkpoint)")
    _check_state(path, tensors, meta, config)
    now = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as JSON lists, like the stored config
    then = {**json.loads(json.dumps(dataclasses.asdict(TrainConfig()))), **meta["config"]}  # older states: defaults
    # with keep_best the evaluations choose the final weights: their interval shapes the result too
    changed = _changes(then, now, _SCHEDULE_FIELDS + (("eval_every",) if then["keep_best"] or now["keep_best"] else ()))
    stored = meta["extra"].get("settings", settings)  # older states recorded none: nothing to compare
    then_model, now_model = stored.get("model"), settings.get("model")
    by_field = isinstance(then_model, dict) and isinstance(now_model, dict)  # the model's config, field by field
    if by_field or then_model is None or now_model is None:  # (or an older state, a caller without the model)
        stored, settings = ({k: v for k, v in d.items() if k != "model"} for d in (stored, settings))
    foreign = sorted(set(then_model) - set(now_model)) if by_field else []
    if foreign:  # another kind of model (a VAR's state resumed by the raster trainer): not a list of changes
        raise TrainingError(f"the training state at {path} was written by a run of another kind of model (its "
                            f"config has {', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}, which this "
                            f"run's model has not): resume with the command that wrote it, or give this run "
                            f"another --out")
    changed += _changes(stored, settings)
    if by_field:
        changed += _changes(then_model, now_model)
    if changed:
        older = any(not recorded for _, recorded in changed)  # e.g. a state of an older ar_course
        raise TrainingError(f"the training state at {path} comes from a run with other settings "
                            f"({', '.join(text for text, _ in changed)}); resume with the options of that run"
                            + ("; a state that does not record a setting (one written by an older ar_course) "
                               "cannot be resumed: start the run again without --resume" if older else ""))
    return tensors, meta


def _check_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], config: TrainConfig) -> None:
    """:class:`TrainingError` naming ``path`` unless the state's metadata and generator state are what
    :func:`save_train_state` writes, ``step`` an int in ``0..steps`` of the run that wrote it (checked before any
    batch is replayed; a run resumed with other ``steps`` is told so by the settings comparison)."""
    extra = meta["extra"]
    def bad(what: str) -> TrainingError:
        return TrainingError(f"the training state at {path} is damaged: {what}")

    step = extra.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise bad(f"step must be an int, got {step!r:.80}" if "step" in extra else "it records no step")
    steps = meta["config"].get("steps", config.steps)  # the run that wrote it (older states: this run's)
    if isinstance(steps, int) and not 0 <= step <= steps:
        raise bad(f"step must be in 0..{steps} (the steps of the run that wrote it), got {step}")
    for key, kind in (("optimizer_scalars", dict), ("param_groups", list), ("history", dict)):
        if not isinstance(extra.get(key), kind):
            raise bad(f"{key} must be a JSON {'object' if kind is dict else 'array'}, got {extra.get(key)!r:.80}")
    if not all(isinstance(v, dict) and k.isdigit() for k, v in extra["optimizer_scalars"].items()):
        raise bad("optimizer_scalars must map parameter numbers to objects")
    if not all(isinstance(group, dict) for group in extra["param_groups"]):
        raise bad("param_groups must be a list of objects")
    unknown = sorted(set(extra["history"]) - {f.name for f in dataclasses.fields(History)})
    if unknown:
        raise bad(f"history has unknown field(s) {unknown}")
    if not isinstance(extra.get("settings", {}), dict):
        raise bad(f"settings must be a JSON object, got {extra['settings']!r:.80}")
    rng, expected = tensors.get("rng/cpu"), torch.get_rng_state()
    if rng is None or rng.dtype != expected.dtype or rng.shape != expected.shape:
        got = "none" if rng is None else f"{rng.dtype} of shape {tuple(rng.shape)}"
        raise bad(f"rng/cpu must be a {expected.dtype} tensor of shape {tuple(expected.shape)}, got {got}")


def _changes(then: dict[str, Any], now: dict[str, Any], keys: Iterable[str] | None = None
             ) -> list[tuple[str, bool]]:
    """``("key old -> new", recorded)`` for each of ``keys`` (default: every key of either side) whose values
    differ; a key ``now`` lacks shows ``None`` there, a key ``then`` (the stored state) lacks reads
    ``"key not recorded -> new"`` with ``recorded`` False."""
    return [(f"{k} {repr(then[k]) if k in then else 'not recorded'} -> {now.get(k)!r}", k in then)
            for k in ({**now, **then} if keys is None else keys) if then.get(k) != now.get(k)]


def _model_settings(model: torch.nn.Module) -> dict[str, Any]:
    """``{"model": config}`` for a model whose ``config`` is a dataclass of JSON values (every model of the
    library), else ``{}`` (a model of your own: nothing to compare)."""
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return {}
    try:
        return {"model": _run_settings(dataclasses.asdict(config))}
    except (TypeError, ValueError):  # a value JSON cannot hold (a dtype, a path): not compared
        return {}


def _restore(tensors: dict[str, torch.Tensor], meta: dict, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, path: Path) -> History:
    """Load a state read by :func:`read_train_state` into ``model``, ``optimizer`` and torch's generators
    (:func:`_resume` takes the best weights, ``best/<name>``)."""
    extra = meta["extra"]
    weights = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in extra["optimizer_scalars"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, i, name = key.split("/", 2)
            state.setdefault(int(i), {})[name] = value
    problems = state_dict_problems(model.state_dict(), weights)
    if not problems:
        try:
            model.load_state_dict(weights, strict=True)
            optimizer.load_state_dict({"state": state, "param_groups": extra["param_groups"]})
        except (RuntimeError, ValueError, KeyError) as exc:
            problems = load_error_problems(exc)
    if problems:
        raise TrainingError(f"the training state at {path} does not fit this model: "
                            f"{first_and_more(problems)}") from None
    torch.set_rng_state(tensors["rng/cpu"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return History(**extra["history"])


def _resume(state_path: str | Path | None, config: TrainConfig, settings: dict[str, Any], batches: Iterator[Any],
            model: torch.nn.Module, optimizer: torch.optim.Optimizer
            ) -> tuple[History, int, dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """Load the state at ``state_path`` (of the same schedule and ``settings``) after replaying ``batches`` up to
    its step; return the history, the step to continue from, the best weights so far and the weight average
    (``None`` when the state holds none)."""
    if state_path is None:
        raise TrainingError("resume=True needs a state_path")
    tensors, meta = read_train_state(state_path, config, settings)
    start = int(meta["extra"]["step"])
    for step in range(start):  # the batch stream's random draws, up to the saved step (before torch's RNG is set)
        _next_batch(batches, step, config.steps)
    history = _restore(tensors, meta, model, optimizer, Path(state_path))
    best = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")}
    average = {k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")}
    return history, start, best or None, average or None


def _next_batch(batches: Iterator[Any], step: int, steps: int) -> Any:
    """The batch of ``step`` (0-based) from ``batches``; a one-line ValueError when the stream has run out."""
    try:
        return next(batches)
    except StopIteration:
        raise ValueError(f"batches ran out at step {step + 1} (after {step} batches): it must yield at least "
                         f"steps={steps} batches (an endless stream such as text_batches or image_batches)") from None


@contextmanager
def _diverged_weights_named(model: torch.nn.Module, step: int) -> Iterator[None]:
    """An error raised by the forward pass of ``step`` becomes the divergence :class:`TrainingError` when the
    previous steps left NaN or inf in the weights (a finite loss whose update overflowed: a model's own input check,
    ``z must be finite``, would otherwise speak first); other errors pass as they are. Reads the weights only after
    an error."""
    try:
        yield
    except Exception as exc:
        bad = nonfinite_parameter(model)
        if bad is None:
            raise
        failure = exception_line(exc)
        raise TrainingError(f"training diverged: the weights hold NaN or inf after step {step} ({bad} first; step "
                            f"{step + 1} failed: {failure}) ({DIVERGED_HINT})") from None


def nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of ``model``'s first parameter holding NaN or inf, None when all are finite (a host sync per
    parameter: for after an error, or once per step of a small model)."""
    return next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)


def _check_loss(loss: object) -> None:
    """A one-line error unless ``loss`` (what ``loss_fn`` returned) is a 0-d tensor that requires grad; reads
    only its type and shape (no host sync)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a scalar tensor (0-d) that requires grad, got {type(loss).__name__}")
    if loss.ndim != 0 or not loss.requires_grad:
        grad = "" if loss.requires_grad else " that does not require grad"
        raise ValueError(f"loss_fn must return a scalar tensor (0-d) that requires grad, got a tensor of shape "
                         f"{tuple(loss.shape)}{grad} (average a per-example loss with .mean())")


def _track_best(config: TrainConfig, history: History, metrics: dict[str, float], step: int,
                model: torch.nn.Module, best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """With ``config.keep_best``: a copy of ``model``'s weights when ``metrics`` beats the best evaluation so
    far (recorded in ``history``), else ``best`` unchanged."""
    if not config.keep_best:
        return best
    if config.keep_best not in metrics:
        raise TrainingError(f"keep_best={config.keep_best!r} is not among the evaluation's metrics "
                            f"({', '.join(sorted(metrics)) or 'none'})")
    value = float(metrics[config.keep_best])
    if not math.isfinite(value):  # never keep the weights of an evaluation that cannot be compared
        raise TrainingError(f"keep_best={config.keep_best!r}: the evaluation at step {step} gave {value}, not a "
                            f"finite number to compare (the run diverged? {DIVERGED_HINT})")
    if history.best_value is not None and not value < history.best_value:
        return best
    history.best_step, history.best_value = step, value
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.enable_grad()
def train_loop(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    config: TrainConfig,
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
    desc: str = "train",
    state_path: str | Path | None = None,
    resume: bool = False,
    settings: dict[str, Any] | None = None,
) -> History:
    """Train ``model`` for ``config.steps`` steps on ``batches``; return the :class:`History`.

    ``batches``: an iterator of batches (or an iterable: it is iterated once), yielding at least
    ``config.steps`` of them (the trainers' streams are endless). ``loss_fn(model, batch)`` returns a scalar
    loss tensor (0-d, a mean over the batch) that requires grad. ``eval_fn(model)`` (called in
    eval mode under ``torch.no_grad``) returns named metrics; it runs every ``eval_every`` steps and at
    the end. ``config.keep_best`` names one of them: the run then ends with the weights of the evaluation
    where it was lowest (early stopping without stopping; ``history.best_step`` says which), not the last
    ones. ``config.ema > 0`` keeps a :class:`WeightAverage` of the weights with that decay: evaluations (and
    ``keep_best``) see the average, and the run ends with it (or with the best evaluation's average).
    ``state_path`` / ``resume``: see the module docstring (``resume`` without a state raises
    :class:`TrainingError`). ``settings``: what else determines the run besides ``config`` (JSON values by
    name, such as ``{"seed": 0, "batch_size": 16}``, the global batch); the state records them, and ``resume``
    refuses a state written with other values (:func:`read_train_state`). ``optimizer``: one of your own over
    ``model``'s parameters (its parameter groups keep their weight decay and betas; the schedule sets every
    group's lr), else AdamW with ``config``'s ``lr``, ``weight_decay`` and ``betas`` over every trainable parameter.

    Inside a process group (``torchrun``, see :mod:`ar_course.distributed`) each process trains on its
    contiguous slice of every global batch from ``batches`` (so the global batch size must divide by the
    number of processes) through ``DistributedDataParallel``, which wraps ``loss_fn``: it still receives
    ``model`` itself. The recorded loss is averaged over processes; only rank 0 shows progress, evaluates
    (the other processes' history has no evals) and writes the state. All processes stop at the same step
    when a signal reaches any of them; with ``keep_best`` only rank 0 ends with the best weights. ``model`` is
    updated in place either way, and left in eval mode. Gradients are on for the run, even inside a caller's
    ``torch.no_grad()``.

    Raises:
        TypeError: ``config`` is not a :class:`TrainConfig`, ``batches`` is not iterable, ``settings`` is not
            a dict of JSON values, or ``loss_fn`` returns something other than a tensor.
        ValueError: ``batches`` runs out before ``config.steps`` batches, ``settings`` holds NaN or inf, or
            ``loss_fn`` returns a tensor that is not 0-d or does not require grad.
        TrainingError: ``keep_best`` without ``eval_fn``, ``ema`` outside [0, 1), a state to resume that is
            missing or does not fit, a loss that is NaN or inf (the run diverged; it stops at that step), or a
            ``keep_best`` metric that ``eval_fn`` does not return or that is NaN or inf.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not hasattr(batches, "__next__"):  # an iterable (a list, a DataLoader): iterate it once
        try:
            batches = iter(batches)
        except TypeError:
            raise TypeError(f"batches must be an iterator or an iterable of batches, got "
                            f"{type(batches).__name__}") from None
    if config.keep_best and eval_fn is None:
        raise TrainingError(f"keep_best={config.keep_best!r} needs an eval_fn to measure it")
    if not 0.0 <= config.ema < 1.0:
        raise TrainingError(f"ema is the decay of the weight average, in [0, 1); got {config.ema}")
    settings = _run_settings(settings)
    if "model" not in settings:
        settings = {**settings, **_model_settings(model)}  # resume compares the model's config too
    opt = optimizer or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr, weight_decay=config.weight_decay, betas=config.betas,
    )
    history, start, best, averaged = _resume(state_path, config, settings, batches, model, opt) if resume else \
        (History(), 0, None, None)
    average = WeightAverage(model, config.ema, averaged) if config.ema else None
    train_model: torch.nn.Module = _LossModule(model, loss_fn)
    if ddp.is_distributed():
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)
        progress = progress and ddp.is_main_process()
    model.train()
    bar = progress_bar(range(start, config.steps), desc=desc, disable=not progress, mininterval=1.0, initial=start,
               total=config.steps)
    clock, seconds_before = time.perf_counter(), history.seconds
    try:
        with _StopSignals(enabled=state_path is not None) as signals:
            for step in bar:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, config)
                # random numbers the loss draws: the global batch's (ddp.draw_rows)
                with ddp.global_batch_draws(), _diverged_weights_named(model, step):
                    loss = train_model(ddp.shard_batch(_next_batch(batches, step, config.steps)))
                _check_loss(loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                opt.step()
                if average is not None:
                    average.update(model, step)
                # one reduction: the mean loss over processes, and whether any process was asked to stop
                stop = loss.new_tensor(float(signals.received is not None), dtype=torch.float64)
                loss_sum, stops = ddp.sum_across_processes(torch.stack([loss.detach().double(), stop])).tolist()
                history.steps.append(step)
                history.loss.append(loss_sum / ddp.world_size())
                if not math.isfinite(history.loss[-1]):  # NaN or inf: every later step and the weights are lost
                    raise TrainingError(f"training diverged: the loss is {history.loss[-1]} at step {step + 1} "
                                        f"({DIVERGED_HINT})")
                if step % config.log_every == 0:
                    recent = history.loss[-20:]  # history.smoothed()[-1], without the whole curve at every log
                    bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
                done = step + 1
                if eval_fn is not None and ddp.is_main_process() and (
                        (config.eval_every and done % config.eval_every == 0) or done == config.steps):
                    model.eval()
                    with torch.no_grad(), average.applied(model) if average else nullcontext():
                        metrics = eval_fn(model)
                        history.eval_steps.append(done)
                        history.evals.append(metrics)
                        best = _track_best(config, history, metrics, done, model, best)
                    model.train()
                periodic = config.checkpoint_every and done % config.checkpoint_every == 0
                history.seconds = seconds_before + time.perf_counter() - clock
                if state_path is not None and (stops or periodic or done == config.steps):
                    save_train_state(state_path, model, opt, done, history, config, best, average and average.state,
                                     settings)
                if stops:
                    raise TrainingInterrupted(done, Path(state_path))
            # a signal after the last step's check (during the last evaluation or write): the state is complete
            if signals.received is not None:
                raise TrainingInterrupted(config.steps, Path(state_path))
    finally:
        model.eval()  # an interrupted or failed run too
    if best is not None or average is not None:
        model.load_state_dict(best if best is not None else average.state)
    return history


# ----------------------------------------------------------------------------------------------------
# The command-line contract of ``python -m ar_course train <what>``


MAX_THREADS = 4 * (os.cpu_count() or 1)
"""Largest ``--threads``: four per CPU (thousands of threads make OpenMP fail, or crash)."""


def add_process_options(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--no-progress``, the options of every trainer, whatever its loop (:func:`train_loop`, or
    its own for ``train grpo`` and ``train cca``); :func:`apply_process_options` applies them."""
    parser.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None,
                        help=f"torch CPU threads, at most {MAX_THREADS} (default: torch's choice; 1 is faster on a "
                             "busy machine)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def apply_process_options(args: argparse.Namespace) -> bool:
    """Apply ``--threads`` (torch's CPU threads for the rest of the process; without it, torch's choice stays) and
    return whether to show a progress bar (the ``progress`` of the trainer's loop: not ``--no-progress``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return not args.no_progress


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every trainer shares with :func:`train_loop`: :func:`add_process_options` (``--threads``,
    ``--no-progress``), ``--resume`` and ``--checkpoint-every``."""
    add_process_options(parser)
    parser.add_argument("--resume", action="store_true",
                        help=f"continue an interrupted run from its training state (the --out path with "
                             f"{STATE_SUFFIX!r} for '.safetensors'); use the options of that run")
    parser.add_argument("--checkpoint-every", type=nonnegative_int, default=TrainConfig.checkpoint_every,
                        metavar="N", help="write the training state every N steps (0: only when interrupted and "
                                          "at the end; it is removed once the checkpoint is written) [%(default)s]")


EVAL_HELP = "samples per class for the accuracy recorded at each guidance strength (0: skip)"
MAX_SEED = 2**63 - 1
"""Largest ``--seed``: torch seeds are unsigned 64-bit integers, and trainers also seed ``seed + 1``, ``seed + 2``."""
MAX_PER_CLASS = 1000
"""Largest ``--eval-per-class``: samples per class a trainer generates for each accuracy it records."""
MAX_LAYERS, MAX_WIDTH = 128, 8192
"""Largest ``--n-layer`` and ``--n-embd`` (and a flow head's depth and width): far beyond what a CPU trains."""
seed_int = int_in(0, MAX_SEED)
"""argparse ``type=`` of every trainer's ``--seed``."""
per_class_int = int_in(0, MAX_PER_CLASS)
"""argparse ``type=`` of ``--eval-per-class``."""
DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto [auto: $AR_COURSE_DEVICE if set, else cuda when there is a GPU]"


def add_conditional_model_options(parser: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float,
                                  n_layer: int = 4, n_embd: int = 96, n_head: int = 4) -> None:
    """The options of every trainer of a class-conditional model over image tokens (``train ar``, ``var``,
    ``maskgit``, ``continuous``), with that trainer's defaults: ``--steps``, ``--seed``, ``--batch-size`` (the
    global batch), ``--lr``, ``--p-uncond`` and the transformer's ``--n-layer``, ``--n-embd``, ``--n-head``
    (checked after parsing by :func:`check_conditional_model_options`)."""
    parser.add_argument("--steps", type=positive_int, default=steps)
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help="global batch, split across processes under torchrun; at most the training images "
                             "[%(default)s]")
    parser.add_argument("--lr", type=positive_float, default=lr)
    parser.add_argument("--p-uncond", type=probability, default=0.1, help="condition dropout probability")
    parser.add_argument("--n-layer", type=int_in(1, MAX_LAYERS), default=n_layer)
    parser.add_argument("--n-embd", type=int_in(1, MAX_WIDTH), default=n_embd)
    parser.add_argument("--n-head", type=positive_int, default=n_head)


def add_output_options(parser: argparse.ArgumentParser, *, out: Path, train_images: bool = True,
                       eval_help: str = EVAL_HELP) -> None:
    """The rest of those trainers' options: ``--train-images`` (when ``train_images``), ``--eval-per-class``,
    ``--device``, ``--out`` (default: the shipped checkpoint ``out``, in a source checkout only: see
    :func:`prepare_run`) and :func:`add_run_options`."""
    if train_images:
        parser.add_argument("--train-images", type=positive_int, default=None, metavar="N",
                            help="train on the first N training images only (default: all)")
    parser.add_argument("--eval-per-class", type=per_class_int, default=20, help=eval_help)
    parser.add_argument("--device", type=device_name, default=None, help=DEVICE_HELP)
    parser.add_argument("--out", type=path_arg, default=out, help=out_help(f"the shipped {out.name}"))
    add_run_options(parser)


def check_conditional_model_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                                    dataset: str = "mnist") -> None:
    """Usage errors (exit 2) for parsed options of :func:`add_conditional_model_options` and
    :func:`add_output_options`: heads that do not divide the width, fewer training images (of ``dataset``) than
    one batch (:func:`check_batch_size`)."""
    if args.n_embd % args.n_head:
        parser.error(f"--n-embd {args.n_embd} must divide by --n-head {args.n_head}")
    check_batch_size(parser, args.batch_size, dataset, getattr(args, "train_images", None))


def training_images(dataset: str) -> int:
    """The number of training images of ``dataset`` (``"mnist"`` or ``"shapes"``), without making them."""
    from ar_course.data import load_mnist
    from ar_course.metrics import SHAPES_TRAIN

    return len(load_mnist("train")[1]) if dataset == "mnist" else SHAPES_TRAIN[0]


def check_batch_size(parser: argparse.ArgumentParser, batch_size: int, dataset: str,
                     train_images: int | None = None) -> None:
    """A usage error (exit 2) when ``--batch-size`` is larger than the training set: the ``dataset``'s training
    images, or the first ``--train-images`` of them."""
    if train_images is not None and train_images < batch_size:
        parser.error(f"--train-images {train_images} is smaller than --batch-size {batch_size}")
    if batch_size > (n := training_images(dataset)):
        parser.error(f"--batch-size {batch_size} is larger than the {n} training images of {dataset}")


@contextmanager
def checkpoint_option(parser: argparse.ArgumentParser, option: str) -> Iterator[None]:
    """Inside the block, a :class:`~ar_course.checkpoint.CheckpointError` (the checkpoint given as ``option`` is
    missing, damaged or of the wrong kind) is a usage error naming the option (exit 2), as in ``generate``."""
    try:
        yield
    except CheckpointError as exc:
        parser.error(f"{option}: {exc}")


def load_tokenizer(parser: argparse.ArgumentParser, name: str, device: torch.device, quantizers: tuple[str, ...],
                   needed: str, channels: int = 1, image_size: int = 32) -> torch.nn.Module:
    """The tokenizer ``--tokenizer name`` on ``device``; a usage error (exit 2) when it is not a tokenizer
    checkpoint, its quantizer is not one of ``quantizers`` (``needed`` describes them: ``"a multi-scale
    ('msvq')"``) or it takes images of other than ``channels`` channels and ``image_size`` pixels a side (the
    trainers' images are 32x32)."""
    with checkpoint_option(parser, "--tokenizer"):
        tokenizer = load(name, device, kind="tokenizer")
    config = tokenizer.config
    if config.quantizer not in quantizers:
        parser.error(f"--tokenizer {name} is a {config.quantizer!r} tokenizer; {needed} one is needed")
    if config.in_channels != channels:
        parser.error(f"--tokenizer {name} takes {config.in_channels}-channel images but the training images have "
                     f"{channels}")
    if config.image_size != image_size:
        parser.error(f"--tokenizer {name} takes {config.image_size}x{config.image_size} images but the training "
                     f"images are {image_size}x{image_size}")
    return tokenizer


def state_path_for(out: Path) -> Path:
    """Where the training state of a run writing ``out`` lives: ``NAME.train-state.safetensors`` beside it."""
    return out.with_name(out.name.removesuffix(".safetensors") + STATE_SUFFIX)


def out_help(default: str) -> str:
    """A trainer's ``--out`` help: ``default`` (a file in :data:`~ar_course.checkpoint.ASSETS`) is the default in a
    source checkout only (:func:`refuse_installed_assets`)."""
    return f"checkpoint path (default in a source checkout: {default}; required when ar_course is installed as a " \
           f"package)"


def refuse_installed_assets(parser: argparse.ArgumentParser, out: Path) -> None:
    """A usage error (exit 2) when ``out`` lies in the package's :data:`~ar_course.checkpoint.ASSETS` and ar_course
    is installed as a package, not a source checkout (:func:`is_source_checkout`): every trainer's default
    ``--out`` lies there, and would replace a shipped checkpoint in site-packages."""
    if out.resolve().parent == ASSETS and not is_source_checkout():
        effect = f"replace its shipped {out.name}" if out.is_file() else f"write {out.name} inside it"
        parser.error(f"--out is required: ar_course is installed as a package, and the default would {effect}")


def check_out(parser: argparse.ArgumentParser, out: Path, inputs: dict[str, str | Path | None] | None = None
              ) -> None:
    """A usage error (exit 2) unless a trainer's ``out`` is a writable ``.safetensors`` path, outside the package's
    :data:`~ar_course.checkpoint.ASSETS` unless ar_course runs from a source checkout (:func:`is_source_checkout`;
    where the default ``--out`` of every trainer lies, so ``--out`` is required in an installed package), and not
    the file of one of the checkpoints the run reads, ``inputs`` (option -> name or path, e.g.
    ``{"--tokenizer": args.tokenizer}``: saving would replace it)."""
    refuse_installed_assets(parser, out)
    try:
        check_output_path(out, suffix=".safetensors", what="--out")
    except ValueError as exc:
        parser.error(str(exc))
    for option, name_or_path in (inputs or {}).items():
        try:
            source = resolve(name_or_path) if name_or_path is not None else None
        except CheckpointError:  # loading it reports that, in its own words
            continue
        if source is not None and source.resolve() == Path(out).resolve():
            parser.error(f"--out {str(out)!r} is the {option} checkpoint this run reads: saving would replace it; "
                         f"choose another --out")


def prepare_run(parser: argparse.ArgumentParser, out: Path, resume: bool, batch_size: int | None,
                inputs: dict[str, str | Path | None] | None = None) -> Path:
    """Check a trainer's arguments before any work: ``out`` and ``inputs`` as :func:`check_out` says, and
    ``batch_size`` (the global batch) must divide by the number of processes (usage errors, exit 2); with
    ``resume`` the training state must exist (:class:`TrainingError`). Returns the training state's path."""
    check_out(parser, out, inputs)
    if batch_size is not None and batch_size % ddp.world_size():
        parser.error(f"--batch-size {batch_size} (the global batch) must divide by the number of processes "
                     f"({ddp.world_size()})")
    state = state_path_for(out)
    if resume and not state.is_file():
        raise TrainingError(f"no training state at {state} to resume from")
    if not resume and state.is_file() and ddp.is_main_process():
        print(f"note: this run replaces the training state of an earlier, unfinished run at {state} "
              "(--resume continues that run instead)", file=sys.stderr)
    return state


NOT_MEASURED = "not measured (--eval-per-class 0)"
"""What a trainer's last line says of an evaluation that ``--eval-per-class 0`` turned off."""


def format_accuracy(accuracy: dict[str, float]) -> str:
    """``{"0.0": 0.0949999, "1.0": 0.9}`` (class accuracy by guidance strength, as trainers record it) as
    ``"w=0.0: 9.5%, w=1.0: 90.0%"`` for a trainer's last line; ``{}`` (not measured) as
    ``"not measured (--eval-per-class 0)"``."""
    if not accuracy:
        return NOT_MEASURED
    return ", ".join(f"w={w}: {a:.1%}" for w, a in accuracy.items())


def finish_run(state: Path) -> None:
    """Remove a run's training state once its final checkpoint is written (rank 0)."""
    if ddp.is_main_process():
        state.unlink(missing_ok=True)


def trainer_main(main: Callable[[list[str] | None], int]) -> Callable[..., int]:
    """Decorate a trainer's ``main(argv)`` (the result's ``argv`` defaults to None: ``sys.argv``): a
    :class:`TrainingError` becomes one line ``error: ...`` on stderr (from rank 0) and exit status 1; an
    interruption says how to continue, and weights that :func:`~ar_course.checkpoint.save_checkpoint` refuses
    (NaN or inf) say that the run diverged."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except TrainingInterrupted as exc:
            message = f"interrupted at step {exc.step}; continue with --resume"
        except TrainingError as exc:
            message = str(exc)
        except NonFiniteWeightsError as exc:  # the one check that no trainer writes NaN or inf weights
            message = f"training diverged: {exc} ({DIVERGED_HINT})"
        if ddp.is_main_process():
            print(f"error: {message}", file=sys.stderr)
        return 1

    return run
