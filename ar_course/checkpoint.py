"""Checkpoints as safetensors files: tensors plus a JSON config in the metadata. No pickle is ever loaded.

One loader for every model the library trains::

    from ar_course import checkpoint
    checkpoint.available()                          # the shipped names: ['ar_mnist', ..., 'var_mnist_cca']
    model = checkpoint.load("var_mnist")            # a shipped name or a path -> the model, in eval mode
    model, tokenizer = checkpoint.load_with_tokenizer("var_mnist")   # with the tokenizer it was trained on
    checkpoint.info("var_mnist")                    # {"kind", "config", ...what the trainer recorded}

A checkpoint records its ``kind`` (``"tokenizer"``, ``"lm"``, ``"raster_ar"``, ``"var"``, ``"maskgit"``,
``"classifier"``, ``"diffusion_lm"``, ``"continuous_ar"``), and :data:`KINDS` maps each kind to its model class
and config dataclass; :func:`load` rebuilds the model with ``Model(config_from_dict(Config, stored_config))`` and
loads the weights strictly into a module of torch's default dtype (float32 unless changed): a float16, bfloat16
or float64 file is cast to it, so call ``.to(dtype)`` on the loaded model to work in another.
:func:`register_kind` adds a kind of your own (the built-in kinds cannot be replaced). Every config dataclass
follows one rule, :func:`config_from_dict`: a missing key takes the field's default, an unknown key is a
``ValueError`` naming it.

Shipped checkpoints live in :data:`ASSETS` (inside the installed package); their names are the file names
without ``.safetensors``; the tokenizers are also known by the short names that checkpoints record
(:data:`ALIASES`: ``"mnist_vq"``, ``"mnist_msvq"``, ``"mnist_kl"``).

An image model records the tokenizer it was trained on as a shipped name or as the path of a file relative to
the model checkpoint's own folder (:func:`tokenizer_reference`, which every trainer uses), so that a folder of
checkpoints can move; :func:`recorded_tokenizer` finds it again.

Lower level: ``save_checkpoint(path, model, config, kind=...)`` writes ``model.state_dict()`` and ``config`` (a
dataclass or a dict); ``load_checkpoint(path)`` returns ``(state_dict, metadata)``. A missing, truncated or
tampered file raises :class:`CheckpointError` with a clear message. Writes are atomic (a temporary file renamed
into place), so an interrupted save leaves the previous checkpoint, or none, never half of one.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import numbers
import os
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch.overrides import TorchFunctionMode

from ar_course.cli import exception_line
from ar_course.files import _file_path, atomic_write_bytes
from ar_course.utils import check_finite, content_digest, get_device, kept_random_state

ASSETS: Path = Path(__file__).resolve().parent / "assets"
"""The folder of the shipped checkpoints, inside the package (installed with it)."""

ALIASES: dict[str, str] = {"mnist_vq": "tokenizer_mnist_vq", "mnist_msvq": "tokenizer_mnist_msvq",
                           "mnist_kl": "tokenizer_mnist_kl"}
"""Short names of the shipped tokenizers, as the trainers' ``--tokenizer`` option, checkpoints and
:func:`ar_course.tokenizers.load_pretrained` use them."""

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
_BUILTIN_KINDS = frozenset(KINDS)
"""The kinds of the library's own models, which :func:`register_kind` refuses to replace."""

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


def _plain(value: Any) -> Any:
    """``json.dumps``'s ``default``: a NumPy scalar or a 0-d tensor as the Python number it holds."""
    if isinstance(value, np.generic) and isinstance(value.item(), (bool, numbers.Real)):
        return value.item()
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        return value.item()
    raise TypeError(f"got {type(value).__name__}" + (f" of shape {tuple(value.shape)}" if hasattr(value, "shape")
                                                     else ""))


def _json(what: str, values: dict) -> str:
    """``values`` as JSON, NumPy scalars and 0-d tensors as Python numbers; ``TypeError`` naming the key of a
    value JSON cannot hold (``what``: ``"config"`` or ``"extra"``)."""
    try:
        return json.dumps(values, default=_plain)
    except (TypeError, ValueError):  # find the key to blame
        for key, value in values.items():
            try:
                json.dumps(value, default=_plain)
            except (TypeError, ValueError) as exc:
                try:
                    shown = f"{value!r:.80}"
                except ValueError:  # an int too long for str()
                    shown = type(value).__name__
                raise TypeError(f"save_checkpoint: {what} value {key}={shown} cannot be stored as JSON "
                                f"({exc}); use numbers, strings, bools, None, lists and dicts of them") from None
        raise


def _state_dict(model: object) -> dict[str, torch.Tensor]:
    """``model``'s state dict (a module) or ``model`` itself (a dict of tensors); ``TypeError`` otherwise."""
    if isinstance(model, torch.nn.Module):
        return model.state_dict()
    if not isinstance(model, dict):
        raise TypeError(f"model must be a torch.nn.Module or a state dict (a dict of tensors), got "
                        f"{type(model).__name__}")
    for key, value in model.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"model must be a torch.nn.Module or a state dict (str -> tensor), got "
                            f"{key!r}: {type(value).__name__}")
    return model


def save_checkpoint(
    path: str | Path, model: torch.nn.Module | dict, config: Any = None, kind: str = "", **extra: Any
) -> Path:
    """Write ``model``'s weights (a module or a state dict) and ``config`` to ``path`` (safetensors).

    Shared storage (tied weights) is cloned so the file is self-contained. ``extra`` values must be
    JSON-serialisable (e.g. training history summary); NumPy scalars and 0-d tensors are stored as the
    Python numbers they hold. The file appears complete or not at all (written to a temporary file beside
    ``path``, then renamed); equal weights and metadata give equal bytes. Under ``torchrun`` only rank 0 writes.

    Raises:
        TypeError: ``path`` is not a str or path, ``model`` is neither a module nor a dict of tensors, ``kind``
            is not a str, ``config`` is neither a dataclass nor a dict (nor ``None``), or a ``config`` or ``extra``
            value cannot be stored as JSON (the key is named).
        ValueError: ``path`` is empty or names a folder.
        NonFiniteWeightsError: a floating-point tensor holds NaN or inf (nothing is written, an earlier file at
            ``path`` stays).
    """
    from ar_course.distributed import is_main_process

    path = _file_path(path, "checkpoint")
    if not is_main_process():
        return path
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a str such as 'lm' or 'var', got {kind!r} ({type(kind).__name__})")
    state = _state_dict(model)
    metadata = {"config": _json("config", _to_dict(config)), "kind": kind, "extra": _json("extra", extra)}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    try:
        _check_finite_tensors(tensors)
    except ValueError as exc:
        raise NonFiniteWeightsError(f"{exc}; nothing was written to {path}") from None
    atomic_write_bytes(path, _sorted_metadata(save(tensors, metadata=metadata)))  # save_file: private (0600) files
    return path


def _sorted_metadata(blob: bytes) -> bytes:
    """The safetensors file ``blob`` with its metadata's keys in sorted order, so that equal weights and metadata
    give equal bytes (safetensors writes the tensors sorted but the metadata in a per-process random order). The
    layout: an 8-byte little-endian header length, the JSON header padded with spaces to a multiple of 8, the
    data (whose offsets count from the data's start, so a rewritten header moves nothing)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n:]


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`, its tensors on ``device`` (``"auto"`` allowed).

    Returns ``(state_dict, {"config": dict, "kind": str, "extra": dict})``.

    Raises:
        CheckpointError: the file is missing (``no checkpoint at PATH``; a folder: ``PATH is a folder``), corrupted
            or truncated, or its ``config`` or ``extra`` metadata is not a JSON object.
        TypeError: ``path`` is not a str or path, or ``device`` not a str or ``torch.device``.
        ValueError, RuntimeError: a ``device`` torch does not know (``"gpu"``) or that this machine lacks,
            from :func:`~ar_course.utils.get_device`, before the file is read.
    """
    path = _path_arg("path", path)
    device = _device(device)
    if not path.is_file():  # as resolve() says it
        raise CheckpointError(f"{path} is a folder, expected a .safetensors file" if path.is_dir()
                              else f"no checkpoint at {path}")
    try:
        # safetensors reads onto "cpu" or "cuda[:N]" only: cpu:0 is the CPU, meta and mps are moved to after
        state = load_file(str(path), device=str(device) if device.type == "cuda" else "cpu")
        if device.type not in ("cpu", "cuda"):
            state = {name: tensor.to(device) for name, tensor in state.items()}
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
    for key in ("config", "extra"):
        if not isinstance(meta[key], dict):
            raise CheckpointError(f"{path} is not a valid ar_course checkpoint: its {key!r} metadata must be a JSON "
                                  f"object, got a {type(meta[key]).__name__}")
    return state, meta


def register_kind(kind: str, model: type | str, config: type | str) -> None:
    """Let :func:`load` rebuild checkpoints of ``kind``: ``model(config_from_dict(config, stored_config))``.

    ``model`` and ``config`` are classes or ``"module:Name"`` strings (imported when first needed). A kind of your
    own may be registered again, and the latest registration wins (so that re-running a notebook cell that
    defines the classes works); the built-in kinds (:data:`KINDS` as the library ships it) cannot be replaced.

    Raises:
        TypeError: ``model`` or ``config`` is neither a class nor a str, or ``config`` a class that is not a
            dataclass.
        ValueError: ``kind`` is not a non-empty str or is a built-in kind, or a string target is not of the form
            ``"module:Name"``.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    if kind in _BUILTIN_KINDS:
        raise ValueError(f"register_kind: {kind!r} is a built-in kind (the library's own checkpoints load with it) "
                         f"and cannot be replaced; register your model under another kind name")
    for name, target in (("model", model), ("config", config)):
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            if not module or not attr.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
                raise ValueError(f"register_kind: {name} must be a class or a 'module:Name' string such as "
                                 f"'ar_course.var.model:VAR', got {target!r}")
        elif not isinstance(target, type):
            raise TypeError(f"register_kind: {name} must be a class or a 'module:Name' string, got {target!r} "
                            f"({type(target).__name__})")
    if isinstance(config, type) and not dataclasses.is_dataclass(config):
        raise TypeError(f"register_kind: config must be a dataclass (built with config_from_dict), got "
                        f"{config.__name__}")
    KINDS[kind] = (model, config)


def available() -> list[str]:
    """The names of the shipped checkpoints (files in :data:`ASSETS`), sorted."""
    return sorted(p.stem for p in ASSETS.glob("*.safetensors"))


def resolve(name_or_path: str | Path) -> Path:
    """The file of a shipped checkpoint name (:func:`available`, or an alias in :data:`ALIASES`) or of a path.

    Raises :class:`CheckpointError` when neither exists: ``PATH is a folder`` for a folder, ``no checkpoint at
    PATH`` for something that looks like a path (a :class:`Path`, a folder separator, a suffix), else ``unknown
    checkpoint name ...``; and when a shipped name is also a file in the current folder (``./NAME`` means the
    file); ``TypeError`` for something that is not a str or path, ``ValueError`` for ``""``."""
    name_or_path = _path_arg("name_or_path", name_or_path, keep_str=True)
    text = str(name_or_path)
    if isinstance(name_or_path, str) and _is_shipped_name(text):
        if Path(text).is_file():  # a file of yours named like a shipped checkpoint: say which one is meant
            raise CheckpointError(f"{text!r} is both a shipped checkpoint name and a file in {Path.cwd()}: write "
                                  f"./{text} (or its full path) for the file")
        return ASSETS / f"{ALIASES.get(text, text)}.safetensors"
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, expected a .safetensors file")
    if isinstance(name_or_path, Path) or "/" in text or "\\" in text or path.suffix:
        raise CheckpointError(f"no checkpoint at {path}")
    raise CheckpointError(f"unknown checkpoint name {text!r}: not a file, and the shipped ones are "
                          f"{', '.join(available())} (or {', '.join(ALIASES)})")


def _is_shipped_name(text: str) -> bool:
    """Whether ``text`` names a shipped checkpoint (:func:`available`) or is an alias of one (:data:`ALIASES`)."""
    return ALIASES.get(text, text) in available()


def tokenizer_record(model: torch.nn.Module, tokenizer: str | Path, out: str | Path) -> dict[str, str]:
    """The entries a model checkpoint written to ``out`` records about its tokenizer ``model``, loaded from
    ``tokenizer`` (a shipped name or a path): ``"tokenizer"``, where to find it (:func:`tokenizer_reference`), and
    ``"tokenizer_digest"``, a :func:`~ar_course.utils.content_digest` of its weights, which
    :func:`load_with_tokenizer` compares, so that a tokenizer retrained or replaced at that path since is refused
    rather than decoding the model's codes with another codebook. Raises as :func:`tokenizer_reference`."""
    return {"tokenizer": tokenizer_reference(tokenizer, out), "tokenizer_digest": content_digest(model)}


def tokenizer_reference(tokenizer: str | Path, out: str | Path) -> str:
    """What a model checkpoint written to ``out`` records as its tokenizer ``tokenizer`` (a shipped name, or the
    path of a tokenizer file as given on a command line, relative to the current folder): a shipped name (a str)
    as it is, a file as its path relative to the folder of ``out``, with ``/`` separators (absolute where there is
    no relative path, across Windows drives), so that the model still finds it when the folder moves. A relative
    path that would read as a shipped name is written as ``./NAME``. :func:`recorded_tokenizer` reads it back.

    Raises ``TypeError`` for a ``tokenizer`` or ``out`` that is not a str or path, ``ValueError`` for ``""`` (or an
    ``out`` that names a folder)."""
    tokenizer, out = _path_arg("tokenizer", tokenizer, keep_str=True), _file_path(out, "output")
    if isinstance(tokenizer, str) and _is_shipped_name(tokenizer):
        return tokenizer
    target = Path(tokenizer).resolve()
    try:
        reference = Path(os.path.relpath(target, out.resolve().parent)).as_posix()
    except ValueError:  # another drive
        return target.as_posix()
    return f"./{reference}" if _is_shipped_name(reference) else reference


def _tokenizer_file(path: Path, recorded: str) -> str | Path:
    """The tokenizer that the checkpoint at ``path`` records as ``recorded``: a shipped name as it is, else a file,
    a relative one looked up in ``path``'s folder (or, as files of older versions recorded it, in the current
    folder when it is only there); :class:`CheckpointError` naming both when there is no such file."""
    if not isinstance(recorded, str) or not recorded:
        raise CheckpointError(f"{path} records tokenizer {recorded!r}, which is neither a name nor a path")
    if _is_shipped_name(recorded):
        return recorded
    file = Path(recorded)
    if not file.is_absolute():
        beside = path.parent / file
        file = file if file.is_file() and not beside.is_file() else beside
    if not file.is_file():
        raise CheckpointError(f"{path} records tokenizer {recorded!r}, which is not at {file}")
    return file


def recorded_tokenizer(name_or_path: str | Path) -> str | Path:
    """The tokenizer an image model checkpoint (a shipped name or a path) records: a shipped tokenizer's name, or
    the path of its file (see :func:`tokenizer_reference`), for :func:`load`.

    Raises :class:`CheckpointError` when the checkpoint cannot be read (as :func:`info`), records no tokenizer,
    or records a file that is not there (the message names the checkpoint and the recorded path)."""
    path = resolve(name_or_path)
    _, meta = load_checkpoint(path)
    if "tokenizer" not in meta["extra"]:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} checkpoint that records no tokenizer")
    return _tokenizer_file(path, meta["extra"]["tokenizer"])


def info(name_or_path: str | Path) -> dict:
    """What a checkpoint records: ``{"kind": ..., "config": {...}, **extra}`` (the trainer's steps, seed, losses,
    the tokenizer it used...)."""
    _, meta = load_checkpoint(resolve(name_or_path))
    return {"kind": meta["kind"], "config": meta["config"], **meta["extra"]}


def _path_arg(name: str, value: object, keep_str: bool = False) -> str | Path:
    """``value`` (a ``str`` or :class:`os.PathLike`, not empty) as a :class:`Path`, or kept as it is with
    ``keep_str`` (a str may be a shipped name); ``TypeError`` or ``ValueError`` naming the argument."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a checkpoint name or path (str or Path), got {value!r} "
                        f"({type(value).__name__})")
    if str(value) == "":
        raise ValueError(f"{name} is empty: name a shipped checkpoint (see checkpoint.available()) or a "
                         f".safetensors file")
    return value if keep_str else Path(value)


def _import(target: type | str, kind: str) -> type:
    """A class given as itself or as ``"module:Name"``; :class:`CheckpointError` naming ``kind`` and the target
    when it cannot be imported."""
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint kind {kind!r}: cannot import {target!r} ({type(exc).__name__}: "
                              f"{exc})") from None


class _ShapesOnly(TorchFunctionMode):
    """Inside ``torch.device("meta")``: the weight initialisers (``torch.nn.init``, ``Tensor.normal_``...) do nothing
    to a meta tensor, which holds no values (for a large model, the initialisers dominate its build)."""

    _INIT = frozenset({getattr(torch.nn.init, name) for name in dir(torch.nn.init)
                       if name.endswith("_") and not name.startswith("_")}
                      | {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._INIT:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def state_dict_problems(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``state`` from loading strictly into a module whose state dict is ``expected`` (tensors on any
    device, ``"meta"`` included: only names, shapes and dtypes are read), one line per tensor, in torch's words:
    a missing or unexpected key, a size mismatch, or a tensor that is not floating-point (an integer, bool or
    complex one) for a floating-point parameter. Empty when it loads; :func:`first_and_more` says it in one line."""
    problems = [f'Missing key(s) in state_dict: "{k}"' for k in expected if k not in state]
    problems += [f'Unexpected key(s) in state_dict: "{k}"' for k in state if k not in expected]
    for key, want in expected.items():
        got = state.get(key)
        if got is None:
            continue
        if got.shape != want.shape:
            problems.append(f"size mismatch for {key}: copying a param with shape {got.shape} from checkpoint, the "
                            f"shape in current model is {want.shape}.")
        elif want.is_floating_point() and not got.is_floating_point():
            problems.append(f"dtype mismatch for {key}: the checkpoint holds {got.dtype}, the model a "
                            f"floating-point {want.dtype}")
    return problems


def first_and_more(problems: list[str]) -> str:
    """The first of ``problems`` (not empty), with ``(and N more)`` when there are others: one short line however
    many there are."""
    return problems[0] if len(problems) == 1 else f"{problems[0]} (and {len(problems) - 1} more)"


def load_error_problems(exc: BaseException) -> list[str]:
    """The lines of a ``load_state_dict`` error (torch: a header, then one line per tensor), the header dropped
    where there are others: for :func:`first_and_more`."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[1:] or lines


def _build(path: Path, meta: dict, kind: str | None, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The (untrained) model a checkpoint's metadata describes, once ``state`` is known to fit it: the model is
    first built on the ``"meta"`` device (no memory, no initialisation) and its tensors' names, shapes and dtypes
    compared with ``state``'s, so that a config whose weights would not match the file (a huge width or
    vocabulary, say) is refused before the real model is allocated. Sizes that only non-persistent buffers hold
    (e.g. a rotary table of ``block_size`` positions) are not in the file to compare: a build that then fails to
    allocate is a :class:`CheckpointError` too, after the attempt."""
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} checkpoint, expected {kind!r}")
    if meta["kind"] not in KINDS:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} checkpoint, which load() does not know; known "
                              f"kinds: {sorted(KINDS)} (add one with register_kind)")
    model_cls, config_cls = (_import(t, meta["kind"]) for t in KINDS[meta["kind"]])
    if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
        raise CheckpointError(f"checkpoint kind {meta['kind']!r}: its config {KINDS[meta['kind']][1]!r} is not a "
                              f"dataclass")
    try:
        config = config_from_dict(config_cls, meta["config"])
        try:
            with torch.device("meta"), _ShapesOnly():
                expected = model_cls(config).state_dict()
        except (TypeError, ValueError):
            raise
        except Exception:  # a model of your own that cannot be built on meta: checked by load_state_dict
            expected = None
        if expected is not None and (problems := state_dict_problems(expected, state)):
            raise CheckpointError(f"{path} does not match the model built from its config: "
                                  f"{first_and_more(problems)}")
        with kept_random_state():  # the initial weights, about to be replaced, draw nothing of the caller's
            return model_cls(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its {meta['kind']!r} config does not build a model: {exc}") from None
    except (RuntimeError, MemoryError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: the model its {meta['kind']!r} config describes cannot be built "
                              f"({exception_line(exc)})") from None


def _device(device: str | torch.device) -> torch.device:
    """``device`` resolved by :func:`~ar_course.utils.get_device` (``"auto"`` allowed), so that an unknown
    device or CUDA on a machine without it is refused up front with a one-line message."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device such as 'cpu', 'cuda' or 'auto', got {device!r} "
                        f"({type(device).__name__})")
    if isinstance(device, str) and not device.strip():  # a clearer line than get_device's "unknown device"
        raise ValueError(f"device is empty: use 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if isinstance(device, str) and _is_shipped_name(device):  # load_pretrained("ar_mnist_cca"): device comes first
        raise ValueError(f"device {device!r} is a checkpoint name, not a device: pass it as path={device!r} "
                         "(the loaders of the packages take the device first)")
    return get_device(device)


def _check_finite_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """``ValueError`` naming the first floating-point tensor of ``tensors`` that holds NaN or inf (``w must be
    finite, got nan``): what :func:`save_checkpoint` refuses to write and :func:`load` to read."""
    for key, value in tensors.items():
        if value.is_floating_point():
            check_finite(key, value)


def _load(path: Path, device: str | torch.device, kind: str | None) -> tuple[torch.nn.Module, dict]:
    device = _device(device)
    state, meta = load_checkpoint(path, device="cpu")
    model = _build(path, meta, kind, state)
    try:
        _check_finite_tensors(state)
    except ValueError as exc:
        raise CheckpointError(f"{path} holds weights that are not finite (a run that diverged?): {exc}") from None
    try:
        model.load_state_dict(state, strict=True)  # copies (and casts) into the model's default-dtype parameters
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match the model built from its config: "
                              f"{first_and_more(load_error_problems(exc))}") from None
    return model.to(device).eval(), meta


def load(name_or_path: str | Path, device: str | torch.device = "cpu", *, kind: str | None = None) -> torch.nn.Module:
    """The model of a shipped checkpoint name (:func:`available`) or of a checkpoint file, on ``device``, in
    eval mode (call ``.train()`` to train it further). With ``kind``, a checkpoint of another kind is refused.

    Raises :class:`CheckpointError` naming the file: missing, corrupted, of the wrong or an unknown kind, a
    config with unknown keys or describing a model too big to build, weights that do not fit the model its config
    builds (names, shapes, or an integer, bool or complex tensor for a floating-point parameter: the first
    mismatch and how many more, checked on the ``"meta"`` device before the model is allocated), or weights holding
    NaN or inf (the tensor is named); ``ValueError`` for a
    device torch does not know (``"gpu"``), ``RuntimeError`` for ``"cuda"`` on a machine without CUDA (both
    from :func:`~ar_course.utils.get_device`, before the file is read)."""
    return _load(resolve(name_or_path), device, kind)[0]


def load_with_tokenizer(
    name_or_path: str | Path, device: str | torch.device = "cpu", *, kind: str | None = None
) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)``: a model as :func:`load` gives it, with the tokenizer it was trained on.

    Image models (``"var"``, ``"raster_ar"``, ``"maskgit"``, ``"continuous_ar"``) record their tokenizer's name
    or path (relative to the checkpoint's folder, :func:`recorded_tokenizer`): it is loaded with :func:`load` on
    ``device``. Language models (``"lm"``, ``"diffusion_lm"``) record their vocabulary: a
    :class:`~ar_course.data.CharTokenizer`. A checkpoint that records neither (a tokenizer, a classifier), a
    vocabulary that is not a str of as many distinct characters as the model's ``vocab_size``, a tokenizer file
    that is not there, or one whose weights differ from those the checkpoint recorded (:func:`tokenizer_record`:
    retrained or replaced since), raises :class:`CheckpointError` naming the file; a bad ``device`` raises as in
    :func:`load`."""
    path = resolve(name_or_path)
    model, meta = _load(path, device, kind)  # checks the device before reading the file
    extra = meta["extra"]
    if meta["kind"] in ("lm", "diffusion_lm") and "vocab" in extra:
        from ar_course.data.text import CharTokenizer

        vocab, size = extra["vocab"], model.config.vocab_size
        if not isinstance(vocab, str) or len(set(vocab)) != len(vocab) or len(vocab) != size:
            got = (f"{len(vocab)} characters" + (" (some repeated)" if len(set(vocab)) != len(vocab) else "")
                   if isinstance(vocab, str) else type(vocab).__name__)
            raise CheckpointError(f"{path} records a vocabulary that does not fit its model: expected a str of "
                                  f"{size} distinct characters (the model's vocab_size), got {got}")
        return model, CharTokenizer(vocab)
    if "tokenizer" not in extra:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} checkpoint that records no tokenizer")
    source = _tokenizer_file(path, extra["tokenizer"])
    tokenizer = load(source, device, kind="tokenizer")
    recorded = extra.get("tokenizer_digest")  # checkpoints written before it was recorded are not checked
    if recorded is not None and content_digest(tokenizer) != recorded:
        raise CheckpointError(f"{path} was trained with another tokenizer than the one at {source} (retrained or "
                              "replaced since: its weights differ from those the model learned codes of)")
    return model, tokenizer
