"""Chapter 03: class-conditional raster-order autoregression over VQ token maps, with classifier-free
guidance.

* :mod:`.functional` -- the plain pieces the model is built from (raster flattening, training pairs for the
  class-embedding GPT, condition dropout); the chapter's exercises are checked against them.
* :mod:`.model` -- the model around the chapter 02 GPT: :func:`raster_config`, :func:`raster_loss`,
  :func:`generate_tokens`, :func:`generate_images`, and the shipped MNIST model (:func:`load_pretrained`).
* :mod:`.orders` -- raster, random (RandAR) and neighbour (NAR) generation orders and their step counts.
* :mod:`.train` -- ``python -m ar_course train ar``.
"""

from ar_course.raster import functional, orders
from ar_course.raster.functional import condition_dropout, from_raster, make_training_pairs, to_raster
from ar_course.raster.model import (
    CHECKPOINT_KIND, PRETRAINED_PATH, check_model_grid, check_tokenizer, generate_images, generate_tokens,
    load_pretrained, pretrained_info, raster_config, raster_loss, token_losses,
)

__all__ = [
    "functional", "orders", "to_raster", "from_raster", "make_training_pairs", "condition_dropout", "raster_config",
    "raster_loss", "token_losses", "generate_tokens", "generate_images", "check_model_grid", "check_tokenizer",
    "load_pretrained", "pretrained_info",
    "CHECKPOINT_KIND", "PRETRAINED_PATH",
]
