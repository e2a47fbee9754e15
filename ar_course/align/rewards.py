"""Rewards of generated images, ``(B,)`` floats from images ``(B, C, S, S)`` in [0, 1] and their requested
classes ``(B,)``.

* :func:`class_probability` -- the shipped classifier's probability of the requested class: what we want.
* :func:`brightness` -- the mean pixel value: a reward that is easy to raise without making better digits, to
  show reward hacking.
"""

from __future__ import annotations

from typing import Callable

import torch

from ar_course import metrics
from ar_course.utils import check_ids, check_image_values

Reward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(images: torch.Tensor, classes: torch.Tensor) -> None:
    """The checks both rewards share: tensors of shapes ``(B, C, S, S)`` and ``(B,)``, float finite images in
    [0, 1] (:func:`~ar_course.utils.check_image_values`: 0..255 or [-1, 1] images are refused; one host sync on
    CUDA)."""
    if not isinstance(images, torch.Tensor) or not isinstance(classes, torch.Tensor):
        raise TypeError("images and classes must be tensors")
    if images.ndim != 4 or classes.shape != images.shape[:1]:
        raise ValueError(f"expected images (B, C, S, S) and classes (B,), got {tuple(images.shape)}, "
                         f"{tuple(classes.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor with values in [0, 1], got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"images is an empty batch {tuple(images.shape)}")
    check_image_values("images", images)


@torch.no_grad()
def class_probability(images: torch.Tensor, classes: torch.Tensor, dataset: str = "mnist") -> torch.Tensor:
    """``(B,)``: the shipped ``dataset`` classifier's softmax probability of each image's requested class.

    Raises:
        TypeError: ``images`` or ``classes`` is not a tensor.
        ValueError: shapes other than ``(B, C, S, S)`` and ``(B,)``, an empty batch, ``images`` not
            floating-point, not finite or not in [0, 1] (0..255 or [-1, 1] images), an unknown ``dataset``, or
            ``classes`` not long or not a class of the classifier (the null class of a class-conditional model is
            none).
    """
    _check(images, classes)
    model = metrics.load_classifier(dataset, images.device)
    check_ids("classes", classes, model.config.num_classes, (images.shape[0],))
    probs = torch.softmax(model(images.clamp(0, 1)), dim=-1)  # (B, n_classes)
    return probs.gather(1, classes[:, None].to(images.device)).squeeze(1)


@torch.no_grad()
def brightness(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the mean pixel value of each image (the classes are ignored). A hackable reward.

    Raises:
        TypeError: ``images`` or ``classes`` is not a tensor.
        ValueError: shapes other than ``(B, C, S, S)`` and ``(B,)``, an empty batch, or ``images`` not
            floating-point, not finite or not in [0, 1].
    """
    _check(images, classes)
    return images.clamp(0, 1).flatten(1).mean(dim=1)


REWARDS: dict[str, Reward] = {"classifier": class_probability, "brightness": brightness}
"""The rewards the trainer knows, by name."""
