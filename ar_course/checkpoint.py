"""Checkpoints as safetensors files: tensors plus a JSON config in the metadata. No pickle is ever loaded.

One loader for every model the library trains::

    from ar_course import checkpoint
    checkpoint.available()                          # the shipped names: ['ar_mnist', ..., 'var_mnist']
    model = checkpoint.load("var_mnist")            # a shipped name or a path -> the model, in eval mode
    model, tokenizer = checkpoint.load_with_tokenizer("var_mnist")   # with the tokenizer it was trained on
    checkpoint.info("var_mnist")                    # {"kind", "config", ...what the trainer recorded}

A checkpoint records its ``kind`` (``"tokenizer"``, ``"lm"``, ``"raster_ar"``, ``"var"``, ``"maskgit"``,
``"classifier"``, ``"diffusion_lm"``, ``"continuous_ar"``), and :data:`KINDS` maps each kind to its model class
and config dataclass; :func:`load` rebuilds the model with ``Model(config_from_dict(Config, stored_config))`` and
loads the weights strictly (float16 files load into float32 modules). :func:`register_kind` adds a kind of your
own. Every config dataclass follows one rule, :func:`config_from_dict`: a missing key takes the field's default,
an unknown key is a ``ValueError`` naming it.

Shipped checkpoints live in :data:`ASSETS` (inside the installed package); their names are the file names
without ``.safetensors``; the tokenizers are also known by the short names that checkpoints record
(:data:`ALIASES`: ``"mnist_vq"``, ``"mnist_msvq"``).

Lower level: ``save_checkpoint(path, model, config, kind=...)`` writes ``model.state_dict()`` and ``config`` (a
dataclass or a dict); ``load_checkpoint(path)`` returns ``(state_dict, metadata)``. A missing, truncated or
tampered file raises :class:`CheckpointError` with a clear message. Writes are atomic (a temporary file renamed
into place), so an interrupted save leaves the previous checkpoint, or none, never half of one.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ar_course.files import atomic_path
from ar_course.utils import check_finite, get_device

ASSETS: Path = Path(__file__).resolve().parent / "assets"
"""The folder of the shipped checkpoints, inside the package (installed with it)."""

ALIASES: dict[str, str] = {"mnist_vq": "tokenizer_mnist_vq", "mnist_msvq": "tokenizer_mnist_msvq"}
"""Short names of the shipped tokenizers, as the trainers' ``--tokenizer`` option and checkpoints record them."""

KINDS: dict[str, tuple[type | str, type | str]] = {
    "tokenizer": ("ar_course.tokenizers.vqvae:VQVAE", "ar_course.tokenizers.vqvae:VQVAEConfig"),
    "lm": ("ar_course.transformer.model:GPT", "ar_course.transformer.model:GPTConfig"),
    "raster_ar": ("ar_course.transformer.model:GPT", "ar_course.transformer.model:GPTConfig"),
    "var": ("ar_course.var.model:VAR", "ar_course.var.model:VARConfig"),
    "maskgit": ("ar_course.masked.model:MaskGIT", "ar_course.transformer.model:GPTConfig"),
    "classifier": ("ar_course.metrics:Classifier", "ar_course.metrics:ClassifierConfig"),
    "diffusion_lm": ("ar_course.diffusion_lm.model:DiffusionLM", "ar_course.diffusion_lm.model:DiffusionLMConfig"),
    "continuous_ar": ("ar_course.continuous.model:ContinuousAR", "ar_course.continuous.model:ContinuousARConfig"),
}
"""Checkpoint kind -> (model class, config dataclass), as classes or ``"module:Name"`` strings imported on first
use (so that this module imports none of the models). The model is built as ``Model(config)``."""

T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupted or of the wrong kind."""


class NonFiniteWeightsError(ValueError):
    """:func:`save_checkpoint` refused weights holding NaN or inf (a training run that diverged); nothing was
    written."""


def config_from_dict(cls: type[T], d: dict) -> T:
    """The config dataclass ``cls`` from a dict such as a checkpoint's stored config: a missing key takes the
    field's default, an unknown key raises ``ValueError`` naming it (and the keys ``cls`` knows)."""
    if not isinstance(d, dict):
        raise TypeError(f"a {cls.__name__} is built from a dict, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {names}")
    return cls(**d)


def _to_dict(config: Any) -> dict:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"config must be a dataclass or dict, got {type(config).__name__}")


def save_checkpoint(
    path: str | Path, model: torch.nn.Module | dict, config: Any = None, kind: str = "", **extra: Any
) -> Path:
    """Write ``model``'s weights (a module or a state dict) and ``config`` to ``path`` (safetensors).

    Shared storage (tied weights) is cloned so the file is self-contained. ``extra`` values must be
    JSON-serialisable (e.g. training history summary). The file appears complete or not at all (written to a
    temporary file beside ``path``, then renamed). Under ``torchrun`` only rank 0 writes.

    Raises:
        NonFiniteWeightsError: a floating-point tensor holds NaN or inf (nothing is written, an earlier file at
            ``path`` stays).
    """
    from ar_course.distributed import is_main_process

    path = Path(path)
    if not is_main_process():
        return path
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    for k, v in tensors.items():
        try:
            if v.is_floating_point():
                check_finite(k, v)
        except ValueError as exc:
            raise NonFiniteWeightsError(f"{exc}; nothing was written to {path}") from None
    metadata = {"config": json.dumps(_to_dict(config)), "kind": kind, "extra": json.dumps(extra)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns ``(state_dict, {"config": dict, "kind": str, "extra": dict})``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = load_file(str(path), device=str(device))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        meta = {
            "config": json.loads(raw.get("config", "{}")),
            "kind": raw.get("kind", ""),
            "extra": json.loads(raw.get("extra", "{}")),
        }
    except (SafetensorError, json.JSONDecodeError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid ar_course checkpoint (corrupted or truncated?): {exc}") from None
    return state, meta


def register_kind(kind: str, model: type | str, config: type | str) -> None:
    """Let :func:`load` rebuild checkpoints of ``kind``: ``model(config_from_dict(config, stored_config))``.

    ``model`` and ``config`` are classes or ``"module:Name"`` strings (imported when first needed)."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    KINDS[kind] = (model, config)


def available() -> list[str]:
    """The names of the shipped checkpoints (files in :data:`ASSETS`), sorted."""
    return sorted(p.stem for p in ASSETS.glob("*.safetensors"))


def resolve(name_or_path: str | Path) -> Path:
    """The file of a shipped checkpoint name (:func:`available`, or an alias in :data:`ALIASES`) or of a path.

    Raises :class:`CheckpointError` when neither exists: ``PATH is a folder`` for a folder, ``no checkpoint at
    PATH`` for something that looks like a path (a :class:`Path`, a folder separator, a suffix), else ``unknown
    checkpoint name ...``."""
    text = str(name_or_path)
    name = ALIASES.get(text, text)
    if isinstance(name_or_path, str) and name in available():
        return ASSETS / f"{name}.safetensors"
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, expected a .safetensors file")
    if isinstance(name_or_path, Path) or "/" in text or "\\" in text or path.suffix:
        raise CheckpointError(f"no checkpoint at {path}")
    raise CheckpointError(f"unknown checkpoint name {text!r}: not a file, and the shipped ones are "
                          f"{', '.join(available())} (or {', '.join(ALIASES)})")


def info(name_or_path: str | Path) -> dict:
    """What a checkpoint records: ``{"kind": ..., "config": {...}, **extra}`` (the trainer's steps, seed, losses,
    the tokenizer it used...)."""
    _, meta = load_checkpoint(resolve(name_or_path))
    return {"kind": meta["kind"], "config": meta["config"], **meta["extra"]}


def _import(target: type | str) -> type:
    """A class given as itself or as ``"module:Name"``."""
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _build(path: Path, meta: dict, kind: str | None) -> torch.nn.Module:
    """The (untrained) model a checkpoint's metadata describes."""
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} checkpoint, expected {kind!r}")
    if meta["kind"] not in KINDS:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} checkpoint, which load() does not know; known "
                              f"kinds: {sorted(KINDS)} (add one with register_kind)")
    model_cls, config_cls = (_import(t) for t in KINDS[meta["kind"]])
    try:
        return model_cls(config_from_dict(config_cls, meta["config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its {meta['kind']!r} config does not build a model: {exc}") from None


def _device(device: str | torch.device) -> torch.device:
    """``device`` resolved by :func:`~ar_course.utils.get_device` (``"auto"`` allowed), so that an unknown
    device or CUDA on a machine without it is refused up front with a one-line message."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device such as 'cpu', 'cuda' or 'auto', got {device!r} "
                        f"({type(device).__name__})")
    return get_device(device)


def _load(path: Path, device: str | torch.device, kind: str | None) -> tuple[torch.nn.Module, dict]:
    device = _device(device)
    state, meta = load_checkpoint(path, device="cpu")
    model = _build(path, meta, kind)
    try:
        model.load_state_dict(state, strict=True)  # copies (and upcasts float16) into the model's parameters
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match the model built from its config: {exc}") from None
    return model.to(device).eval(), meta


def load(name_or_path: str | Path, device: str | torch.device = "cpu", *, kind: str | None = None) -> torch.nn.Module:
    """The model of a shipped checkpoint name (:func:`available`) or of a checkpoint file, on ``device``, in
    eval mode (call ``.train()`` to train it further). With ``kind``, a checkpoint of another kind is refused.

    Raises :class:`CheckpointError` naming the file: missing, corrupted, of the wrong or an unknown kind, a
    config with unknown keys, or weights that do not fit the model its config builds; ``ValueError`` for a
    device torch does not know (``"gpu"``), ``RuntimeError`` for ``"cuda"`` on a machine without CUDA (both
    from :func:`~ar_course.utils.get_device`, before the file is read)."""
    return _load(resolve(name_or_path), device, kind)[0]


def load_with_tokenizer(
    name_or_path: str | Path, device: str | torch.device = "cpu", *, kind: str | None = None
) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)``: a model as :func:`load` gives it, with the tokenizer it was trained on.

    Image models (``"var"``, ``"raster_ar"``, ``"maskgit"``, ``"continuous_ar"``) record their tokenizer's name
    or path: it is loaded with :func:`load` on ``device``. Language models (``"lm"``, ``"diffusion_lm"``) record
    their vocabulary: a :class:`~ar_course.data.CharTokenizer`. A checkpoint that records neither (a tokenizer,
    a classifier) raises :class:`CheckpointError`; a bad ``device`` raises as in :func:`load`."""
    path = resolve(name_or_path)
    device = _device(device)
    model, meta = _load(path, device, kind)
    extra = meta["extra"]
    if meta["kind"] in ("lm", "diffusion_lm") and "vocab" in extra:
        from ar_course.data.text import CharTokenizer

        return model, CharTokenizer(extra["vocab"])
    if "tokenizer" not in extra:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} checkpoint that records no tokenizer")
    return model, load(extra["tokenizer"], device, kind="tokenizer")
