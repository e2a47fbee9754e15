"""The shipped character-level language models: ``load_pretrained("lm_target" | "lm_draft")``.

Both were trained by ``python -m ar_course train lm`` (see :mod:`.train`) on the offline text corpus and
share one tokenizer, so the draft can propose tokens for the target (chapter 05). Both functions are
:mod:`ar_course.checkpoint`'s loader for ``"lm"`` checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from ar_course import checkpoint
from ar_course.data import CharTokenizer
from ar_course.transformer.model import GPT


def checkpoint_info(name: str | Path = "lm_target") -> dict:
    """What the trainer recorded with a checkpoint: preset, steps, validation loss (nats/char), ... (the
    vocabulary left out)."""
    return {k: v for k, v in checkpoint.info(name).items() if k not in ("kind", "vocab")}


def load_pretrained(
    name: str | Path = "lm_target", device: torch.device | str = "cpu"
) -> tuple[GPT, CharTokenizer]:
    """Load a shipped (or any ``train lm``) checkpoint; returns ``(model in eval mode, tokenizer)``.

    Weights are stored in float16 and loaded into a float32 model."""
    return checkpoint.load_with_tokenizer(name, device, kind="lm")
