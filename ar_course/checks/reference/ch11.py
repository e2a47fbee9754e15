"""Chapter 11 reference that the library does not call in this form.

* :func:`class_reward` -- exercise 11.2: the reward of a classifier passed as an argument. The library's
  :func:`~ar_course.align.rewards.class_probability` is the same computation with the shipped classifier.
"""

from __future__ import annotations

import torch


def class_reward(images: torch.Tensor, classes: torch.Tensor, classifier: torch.nn.Module) -> torch.Tensor:
    """``(B,)``: ``classifier``'s softmax probability of each image's requested class, ``images`` ``(B, C, S, S)``
    in [0, 1], ``classes`` ``(B,)`` long."""
    with torch.no_grad():
        probs = torch.softmax(classifier(images), dim=-1)  # (B, n_classes)
    return probs.gather(1, classes[:, None]).squeeze(1)
