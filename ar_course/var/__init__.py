"""Chapter 04: next-scale prediction (VAR) over the multi-scale token pyramid of ``MultiScaleVQ``.

* :mod:`.functional` -- the plain pieces the chapter's exercises are checked against (sequence layout,
  block-causal mask, level/position embeddings, teacher forcing, loss, guidance ramp, inpainting masks).
* :mod:`.model` -- :class:`VAR` / :class:`VARConfig`, :func:`sample_pyramid` (S forward passes with a KV
  cache), :func:`generate_images`, and the shipped MNIST model (:func:`load_pretrained`).
* :mod:`.train` -- ``python -m ar_course train var``.
"""

from ar_course.var import functional
from ar_course.var.functional import (
    block_causal_mask, embed_levels_positions, guidance_strength, level_ids, scale_bounds, scale_masks, scale_step,
    teacher_forcing_sequence, var_loss,
)
from ar_course.var.model import (
    CHECKPOINT_KIND, PRETRAINED_PATH, VAR, VARConfig, check_pyramid, check_tokenizer, generate_images,
    load_pretrained, pretrained_info, sample_pyramid, save_pretrained,
)

__all__ = [
    "functional", "block_causal_mask", "embed_levels_positions", "guidance_strength", "level_ids", "scale_bounds",
    "scale_masks", "scale_step", "teacher_forcing_sequence", "var_loss",
    "VAR", "VARConfig", "sample_pyramid", "generate_images", "check_tokenizer", "check_pyramid",
    "load_pretrained", "pretrained_info",
    "save_pretrained", "CHECKPOINT_KIND", "PRETRAINED_PATH",
]
