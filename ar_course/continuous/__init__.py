"""Chapter 10: continuous tokens. Class-conditional raster-order AR over the continuous tokens of a KL-regularised
autoencoder (``tokenizer_mnist_kl``), with a small MLP head trained by flow matching on the next token.

* :mod:`.functional` -- the rectified-flow pieces: :func:`flow_matching_pair`, :func:`flow_matching_loss`,
  :func:`euler_sample`, :func:`guided_velocity`; the chapter's exercises are checked against them.
* :mod:`.model` -- :class:`ContinuousAR` (the chapter 03 backbone emitting a condition per position, and the
  :class:`FlowHead`), :func:`generate_tokens`, :func:`generate_images` and the shipped model
  (:func:`load_pretrained`).
* :mod:`.train` -- ``python -m ar_course train continuous``.
"""

from ar_course.continuous import functional
from ar_course.continuous.functional import euler_sample, flow_matching_loss, flow_matching_pair, guided_velocity
from ar_course.continuous.model import (
    CHECKPOINT_KIND, PRETRAINED_PATH, ContinuousAR, ContinuousARConfig, FlowHead, generate_images, generate_tokens,
    load_pretrained, map_to_tokens, pretrained_info, tokens_to_map,
)

__all__ = [
    "functional", "flow_matching_pair", "flow_matching_loss", "euler_sample", "guided_velocity", "ContinuousAR",
    "ContinuousARConfig",
    "FlowHead", "generate_tokens", "generate_images", "tokens_to_map", "map_to_tokens", "load_pretrained",
    "pretrained_info", "CHECKPOINT_KIND", "PRETRAINED_PATH",
]
