"""The shipped character-level language models: ``load_pretrained("lm_target" | "lm_draft")``.

Both were trained by ``python -m ar_course train lm`` (see :mod:`.train`) on the offline text corpus and
share one tokenizer, so the draft can propose tokens for the target (chapter 05)."""

from __future__ import annotations

from pathlib import Path

import torch

from ar_course.checkpoint import CheckpointError, load_checkpoint
from ar_course.data import CharTokenizer
from ar_course.transformer.model import GPT, GPTConfig

ASSETS = Path(__file__).resolve().parents[1] / "assets"
NAMES = ("lm_target", "lm_draft")


def _path(name: str | Path) -> Path:
    if isinstance(name, str) and name in NAMES:
        return ASSETS / f"{name}.safetensors"
    path = Path(name)
    if not path.is_file():
        raise CheckpointError(f"unknown model {str(name)!r}: use one of {NAMES} or a checkpoint path")
    return path


def checkpoint_info(name: str | Path = "lm_target") -> dict:
    """What the trainer recorded with a checkpoint: preset, steps, validation loss (nats/char), ..."""
    _, meta = load_checkpoint(_path(name))
    return {"config": meta["config"], **{k: v for k, v in meta["extra"].items() if k != "vocab"}}


def load_pretrained(
    name: str | Path = "lm_target", device: torch.device | str = "cpu"
) -> tuple[GPT, CharTokenizer]:
    """Load a shipped (or any ``train lm``) checkpoint; returns ``(model in eval mode, tokenizer)``.

    Weights are stored in float16 and loaded into a float32 model."""
    path = _path(name)
    state, meta = load_checkpoint(path)
    if meta["kind"] != "lm":
        raise CheckpointError(f"{path} holds a {meta['kind']!r} checkpoint, expected 'lm'")
    model = GPT(GPTConfig.from_dict(meta["config"]))
    try:
        model.load_state_dict(state, strict=True)  # copies (and upcasts) into the float32 parameters
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match the model built from its config: {exc}") from None
    tokenizer = CharTokenizer(meta["extra"]["vocab"])
    return model.to(device).eval(), tokenizer
