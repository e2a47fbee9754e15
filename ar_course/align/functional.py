"""The plain pieces of alignment, on log-probabilities (no model inside): the chapter's exercises are checked
against them.

* :func:`group_advantages` -- GRPO's group-relative advantage of each sample's reward.
* :func:`clipped_surrogate` -- PPO's clipped policy-ratio objective per token.
* :func:`k3_kl` -- the non-negative, unbiased-in-expectation ``k3`` estimate of KL(policy || reference).
* :func:`cca_loss` -- Condition Contrastive Alignment's loss on matched and mismatched log-ratios.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ar_course.utils import at_least_float32, check_number


def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {x.dtype}")
    return x


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages ``(N, G)`` of ``rewards`` ``(N, G)`` (``N`` groups of ``G`` samples).

    Each reward minus its group's mean, divided by the group's (population) standard deviation plus ``eps``:
    zero mean within every group, in the order of the rewards, and all zero for a group whose rewards are equal
    (nothing to learn from it).

    Raises:
        TypeError: ``rewards`` not a tensor, or ``eps`` not a number.
        ValueError: ``rewards`` not a float ``(N, G)`` tensor with ``N >= 1`` and ``G >= 2``, a reward that is
            NaN or inf (its whole group's advantages would be NaN; one host sync), or ``eps`` not a finite number
            ``> 0`` (``0`` would turn a group of equal rewards into ``0 / 0``).
    """
    _check_tensor("rewards", rewards)
    eps = check_number("eps", eps, lo=0, lo_open=True)
    if rewards.ndim != 2 or rewards.shape[1] < 2 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be (N, G) with N >= 1 groups of G >= 2 samples, got {tuple(rewards.shape)}")
    finite = torch.isfinite(rewards)  # (N, G)
    if not bool(finite.all()):
        group, sample = (int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"rewards must be finite numbers, got {float(rewards[group, sample])} at group {group}, "
                         f"sample {sample}")
    mean = rewards.mean(dim=1, keepdim=True)  # (N, 1)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)  # (N, 1)
    tied = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)  # (N, 1)
    # equal rewards: exactly 0 (the rounded mean of 0.9s differs from 0.9 by an ulp, ~6e-4 after dividing by eps)
    return torch.where(tied, 0.0, (rewards - mean) / (std + eps))


def clipped_surrogate(
    logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip: float = 0.2
) -> torch.Tensor:
    """PPO's clipped objective per token ``(B, T)``, to be maximised.

    ``logp`` ``(B, T)``: the policy's log-probabilities of the sampled tokens (with gradients);
    ``logp_old`` ``(B, T)``: those of the policy that sampled them (no gradient); ``advantages`` ``(B,)``:
    one per sequence, shared by its tokens. With the ratio ``r = exp(logp - logp_old)`` the objective is
    ``min(r * A, clip(r, 1 - clip, 1 + clip) * A)``: once the ratio has moved past the clip range in the
    direction the advantage favours, its gradient is zero. Half-precision log-probabilities are taken in float32."""
    _check_tensor("logp", logp), _check_tensor("logp_old", logp_old), _check_tensor("advantages", advantages)
    if logp.shape != logp_old.shape or logp.ndim != 2 or advantages.shape != logp.shape[:1]:
        raise ValueError(f"expected logp, logp_old (B, T) and advantages (B,), got {tuple(logp.shape)}, "
                         f"{tuple(logp_old.shape)}, {tuple(advantages.shape)}")
    clip = check_number("clip", clip, lo=0, lo_open=True)
    ratio = torch.exp(at_least_float32(logp) - at_least_float32(logp_old.detach()))  # (B, T)
    adv = advantages.detach()[:, None]  # (B, 1)
    return torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """The ``k3`` estimate of KL(policy || reference) per sampled token, same shape as ``logp``.

    With ``d = logp_ref - logp`` (log-probabilities of tokens sampled from the policy) it is
    ``exp(d) - d - 1``: never negative, zero where the two models agree, and its mean over samples from the
    policy is the KL divergence (an unbiased estimate with a lower variance than ``-d``). Half-precision
    log-probabilities are taken in float32 (the result too): in bfloat16 ``exp(d) - d - 1`` cancels away."""
    _check_tensor("logp", logp), _check_tensor("logp_ref", logp_ref)
    if logp.shape != logp_ref.shape:
        raise ValueError(f"logp and logp_ref must have one shape, got {tuple(logp.shape)}, {tuple(logp_ref.shape)}")
    d = at_least_float32(logp_ref.detach()) - at_least_float32(logp)  # bf16 would lose most of k3 for small d
    return torch.exp(d) - d - 1



def cca_loss(
    logratio_pos: torch.Tensor, logratio_neg: torch.Tensor, beta: float = 0.02, lam: float = 1.0
) -> torch.Tensor:
    """Condition Contrastive Alignment's loss, a scalar: ``mean(-log sigmoid(beta * pos)) +
    lam * mean(-log sigmoid(-beta * neg))``.

    ``logratio_pos`` ``(B,)``: ``log p(x | c) - log p_ref(x | c)`` of data images with their own class;
    ``logratio_neg`` ``(B,)``: the same for images paired with a wrong class. Raising the first and lowering
    the second makes the model's conditional look like the guided one of its reference, with no sampling."""
    _check_tensor("logratio_pos", logratio_pos), _check_tensor("logratio_neg", logratio_neg)
    if logratio_pos.ndim != 1 or logratio_pos.shape != logratio_neg.shape or logratio_pos.numel() == 0:
        raise ValueError(f"logratio_pos and logratio_neg must be (B,) of one size B >= 1, got "
                         f"{tuple(logratio_pos.shape)}, {tuple(logratio_neg.shape)}")
    beta, lam = check_number("beta", beta, lo=0, lo_open=True), check_number("lam", lam, lo=0)
    return -F.logsigmoid(beta * logratio_pos).mean() - lam * F.logsigmoid(-beta * logratio_neg).mean()
