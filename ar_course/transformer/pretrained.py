"""The shipped character-level language models: ``load_pretrained("lm_target" | "lm_draft")``.

Both were trained by ``python -m ar_course train lm`` (see :mod:`.train`) on the offline text corpus and
share one tokenizer, so the draft can propose tokens for the target (chapter 05). Both functions are
:mod:`ar_course.checkpoint`'s: :func:`load_pretrained` its loader for ``"lm"`` checkpoints, :func:`checkpoint_info`
its :func:`~ar_course.checkpoint.info` (which does not check the kind)."""

from __future__ import annotations

from pathlib import Path

import torch

from ar_course import checkpoint
from ar_course.data import CharTokenizer
from ar_course.transformer.model import GPT


def checkpoint_info(name: str | Path = "lm_target") -> dict:
    """What the trainer recorded with a checkpoint: config, preset, steps, validation loss (nats/char), ...
    (the kind and the vocabulary left out)."""
    return {k: v for k, v in checkpoint.info(name).items() if k not in ("kind", "vocab")}


def load_pretrained(
    name: str | Path = "lm_target", device: torch.device | str = "cpu"
) -> tuple[GPT, CharTokenizer]:
    """Load a shipped (or any ``train lm``) checkpoint; returns ``(model in eval mode, tokenizer)``.

    The shipped weights are stored in float16 (``train lm --float32`` stores float32) and loaded into a float32
    model."""
    return checkpoint.load_with_tokenizer(name, device, kind="lm")
