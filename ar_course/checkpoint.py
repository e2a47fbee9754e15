"""Checkpoints as safetensors files: tensors plus a JSON config in the metadata. No pickle is ever loaded.

``save_checkpoint(path, model, config)`` writes ``model.state_dict()`` and ``config`` (a dataclass or a
dict); ``load_checkpoint(path)`` returns ``(state_dict, metadata)``; ``load_model(path, build)`` rebuilds a
model from its stored config and loads the weights. A truncated or tampered file raises
:class:`CheckpointError` with a clear message. Writes are atomic (a temporary file renamed into place), so
an interrupted save leaves the previous checkpoint, or none, never half of one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ar_course.files import atomic_path


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupted or of the wrong kind."""


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
    temporary file beside ``path``, then renamed). Under ``torchrun`` only rank 0 writes."""
    from ar_course.distributed import is_main_process

    path = Path(path)
    if not is_main_process():
        return path
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
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


def load_model(
    path: str | Path, build: Callable[[dict], torch.nn.Module], kind: str | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Rebuild a model with ``build(config_dict)`` and load its weights strictly from ``path``."""
    state, meta = load_checkpoint(path, device="cpu")
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} checkpoint, expected {kind!r}")
    model = build(meta["config"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match the model built from its config: {exc}") from None
    return model.to(device)
