"""Chapter 11: aligning the class-conditional raster model (and VAR, with CCA) after pre-training.

* :mod:`.functional` -- the plain pieces on log-probabilities: group-relative advantages, the clipped
  surrogate, the ``k3`` KL estimate, the CCA loss (the chapter's exercises are checked against them).
* :mod:`.model` -- token and sequence log-probabilities of token maps under the raster model, and of token
  pyramids under VAR.
* :mod:`.rewards` -- the classifier's probability of the requested class, and a hackable brightness reward.
* :mod:`.grpo` -- Group Relative Policy Optimization with a KL penalty to the frozen reference.
* :mod:`.cca` -- Condition Contrastive Alignment: guidance-free sampling from data pairs, no sampling; one
  loop for the raster model and VAR (the log-probability function is a parameter).
* :mod:`.train` -- ``python -m ar_course train grpo`` and ``python -m ar_course train cca [--model var]``.

The shipped fine-tuned models are raster checkpoints (``ar_mnist_grpo``, ``ar_mnist_cca``) and a VAR checkpoint
(``var_mnist_cca``): they load with :func:`ar_course.checkpoint.load_with_tokenizer` and
``Generator.from_pretrained("mnist", ar="grpo")`` / ``Generator.from_pretrained("mnist", var="cca")``.
"""

from ar_course.align.cca import (CCAConfig, CCALog, LogProbs, cca_batch_loss, cca_step, train_cca, var_log_probs,
                                 wrong_classes)
from ar_course.align.functional import cca_loss, clipped_surrogate, group_advantages, k3_kl
from ar_course.align.grpo import (GRPOConfig, GRPOLog, grpo_objective, grpo_rollout, grpo_step, grpo_update,
                                  train_grpo)
from ar_course.align.model import pyramid_log_probs, pyramid_token_log_probs, sequence_log_probs, token_log_probs
from ar_course.align.rewards import REWARDS, brightness, class_probability

__all__ = [
    "group_advantages", "clipped_surrogate", "k3_kl", "cca_loss", "token_log_probs", "sequence_log_probs",
    "class_probability", "brightness", "REWARDS", "GRPOConfig", "GRPOLog", "grpo_objective", "grpo_rollout",
    "grpo_update", "grpo_step", "train_grpo", "CCAConfig", "CCALog", "cca_batch_loss", "cca_step", "train_cca",
    "wrong_classes", "pyramid_token_log_probs", "pyramid_log_probs", "LogProbs", "var_log_probs",
]
