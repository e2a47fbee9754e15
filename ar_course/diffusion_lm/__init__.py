"""Chapter 08 (text half): a masked diffusion language model against AR on the same characters.

* :mod:`.functional` -- the plain pieces: noise schedule ``alpha(t)``, the ELBO weight ``w(t)``, masking, one
  reverse (denoising) step, block spans and the block-diffusion attention mask.
* :mod:`.model` -- :class:`DiffusionLM`: chapter 02's GPT with ``causal=False`` and a mask token; the MDLM loss
  (full or block-wise), the NLL bound on held-out text, and generation in exactly ``steps`` passes, full-sequence
  or block by block with a KV cache (``block_size=1`` is AR order); :func:`~.model.load_pretrained` the shipped one.
* :mod:`.train` -- ``python -m ar_course train diffusion_lm`` (the shipped ``diffusion_lm`` checkpoint).
* :mod:`.study` -- the data-constrained study, scaled down: AR and diffusion repeating a small text budget.
"""

from ar_course.diffusion_lm.functional import (
    SCHEDULES, alpha, block_attention_mask, block_schedule, block_spans, denoise_step, loss_weight, mask_tokens,
    masked_nll, time_grid, unmask_probability,
)
from ar_course.diffusion_lm.model import DiffusionLM, DiffusionLMConfig, load_pretrained

__all__ = [
    "SCHEDULES", "alpha", "loss_weight", "mask_tokens", "masked_nll", "unmask_probability", "denoise_step",
    "block_spans", "block_schedule", "block_attention_mask", "time_grid", "DiffusionLM", "DiffusionLMConfig",
    "load_pretrained",
]
