"""Chapter 08 (images): masked parallel decoding over VQ token maps on a bidirectional chapter 02 GPT.

* :mod:`.functional` -- the plain pieces: the mask-ratio schedule, training masks, the masked cross-entropy,
  the per-step mask counts, one confidence-based decoding step, the next-neighbour (NAR) order.
* :mod:`.model` -- :class:`MaskGIT` (a ``causal=False`` GPT with a ``[MASK]`` token): :meth:`MaskGIT.generate`
  in exactly ``steps`` passes, :meth:`MaskGIT.generate_in_order` for a fixed order, :func:`maskgit_loss`,
  :func:`generate_images` and the shipped MNIST model (:func:`load_pretrained`).
* :mod:`.train` -- ``python -m ar_course train maskgit``.
"""

from ar_course.masked import functional
from ar_course.masked.functional import (
    SCHEDULES, confidence_step, mask_ratio, masked_after, masked_cross_entropy, neighbour_steps, random_mask,
    training_mask,
)
from ar_course.masked.model import (
    CHECKPOINT_KIND, PRETRAINED_PATH, MaskGIT, generate_images, load_pretrained, maskgit_config, maskgit_loss,
    pretrained_info,
)

__all__ = [
    "functional", "SCHEDULES", "mask_ratio", "random_mask", "training_mask", "masked_cross_entropy", "masked_after",
    "confidence_step", "neighbour_steps", "MaskGIT", "maskgit_config", "maskgit_loss", "generate_images",
    "load_pretrained", "pretrained_info", "CHECKPOINT_KIND", "PRETRAINED_PATH",
]
