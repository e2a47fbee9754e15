"""Group Relative Policy Optimization for the class-conditional raster model.

One step: sample a group of ``G`` token maps for each class from the current policy (plain conditional
sampling, guidance 0), decode them, score them with a reward, turn the rewards into group-relative advantages,
then take ``inner_steps`` optimizer steps on the clipped policy-ratio objective over every token minus
``kl_coef`` times the ``k3`` KL estimate to the frozen reference model. No value network: the group's mean
reward is the baseline::

    policy, tokenizer = raster.load_pretrained()
    reference = copy.deepcopy(policy)
    log = train_grpo(policy, reference, tokenizer, GRPOConfig(steps=40))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ar_course import metrics
from ar_course.align.functional import clipped_surrogate, group_advantages, k3_kl
from ar_course.align.model import token_log_probs
from ar_course.align.rewards import REWARDS, Reward
from ar_course.raster.model import generate_images, generate_tokens
from ar_course.tokenizers import VQVAE
from ar_course.transformer.model import GPT


@dataclass
class GRPOConfig:
    """CPU-sized defaults: 10 classes x 8 samples per step, two optimizer steps per sampled group, 150 steps
    (a few minutes on one core)."""

    steps: int = 150
    group_size: int = 8
    lr: float = 2e-4
    clip: float = 0.2
    kl_coef: float = 0.05
    inner_steps: int = 2
    reward: str = "classifier"
    seed: int = 0
    eval_every: int = 20
    eval_per_class: int = 20

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {sorted(REWARDS)}, got {self.reward!r}")
        for name, lo in (("steps", 1), ("group_size", 2), ("inner_steps", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if not (self.lr > 0 and self.clip > 0 and self.kl_coef >= 0):
            raise ValueError(f"need lr > 0, clip > 0, kl_coef >= 0; got {self.lr}, {self.clip}, {self.kl_coef}")


@dataclass
class GRPOLog:
    """Curves of a run: per step the mean reward and KL estimate; per evaluation the class accuracy and the
    brightness reward of a fixed set of samples."""

    step: list[int] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    brightness: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, list]:
        return dict(self.__dict__)


def grpo_objective(
    logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, advantages: torch.Tensor,
    clip: float, kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, kl)``: the loss to minimise (minus the mean clipped surrogate plus ``kl_coef`` times the mean
    ``k3`` KL) and the mean KL estimate, from per-token log-probabilities ``(B, T)`` and advantages ``(B,)``."""
    kl = k3_kl(logp, logp_ref).mean()
    return -clipped_surrogate(logp, logp_old, advantages, clip).mean() + kl_coef * kl, kl.detach()


def grpo_step(
    policy: GPT, reference: GPT, tokenizer: VQVAE, optimizer: torch.optim.Optimizer, config: GRPOConfig,
    reward_fn: Reward, generator: torch.Generator,
) -> tuple[float, float]:
    """One GRPO step (sample, score, ``inner_steps`` updates); returns ``(mean reward, mean KL)``."""
    device = next(policy.parameters()).device
    n_classes, side = policy.config.n_classes, tokenizer.config.latent_side
    classes = torch.arange(n_classes, device=device).repeat_interleave(config.group_size)  # (N * G,)
    policy.eval()
    with torch.no_grad():
        maps = generate_tokens(policy, classes, (side, side), generator=generator)  # (N * G, h, w)
        rewards = reward_fn(tokenizer.decode_from_indices(maps), classes)  # (N * G,)
        adv = group_advantages(rewards.view(n_classes, config.group_size).float()).flatten()  # (N * G,)
        logp_old = token_log_probs(policy, maps, classes)  # (N * G, T)
        logp_ref = token_log_probs(reference, maps, classes)  # (N * G, T)
    policy.train()
    kls = []
    for _ in range(config.inner_steps):
        loss, kl = grpo_objective(token_log_probs(policy, maps, classes), logp_old, logp_ref, adv,
                                  config.clip, config.kl_coef)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        kls.append(float(kl))
    policy.eval()
    return float(rewards.mean()), kls[0]


@torch.no_grad()
def evaluate(model: GPT, tokenizer: VQVAE, per_class: int, seed: int = 1234) -> tuple[float, float]:
    """``(class accuracy, mean brightness)`` of ``per_class`` samples per class at guidance 0 (fixed seed)."""
    classes = torch.arange(model.config.n_classes).repeat_interleave(per_class)  # (n_classes * per_class,)
    images = generate_images(model, tokenizer, classes, seed=seed).cpu()
    return metrics.class_accuracy(images, classes), float(images.mean())


def train_grpo(
    policy: GPT, reference: GPT, tokenizer: VQVAE, config: GRPOConfig = GRPOConfig(), progress: bool = True,
) -> GRPOLog:
    """Fine-tune ``policy`` in place with GRPO against the frozen ``reference`` from ``config.seed``; returns the
    curves. With ``config.eval_every > 0`` the class accuracy is measured before the first step, every
    ``eval_every`` steps and at the end."""
    device = next(policy.parameters()).device
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    reference.requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0, betas=(0.9, 0.99))
    reward_fn, log = REWARDS[config.reward], GRPOLog()

    def maybe_eval(done: int) -> None:
        if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
            acc, bright = evaluate(policy, tokenizer, config.eval_per_class)
            log.eval_step.append(done), log.accuracy.append(acc), log.brightness.append(bright)

    maybe_eval(0)
    bar = tqdm(range(config.steps), desc=f"GRPO ({config.reward})", disable=not progress)
    for step in bar:
        reward, kl = grpo_step(policy, reference, tokenizer, optimizer, config, reward_fn, generator)
        log.step.append(step), log.reward.append(reward), log.kl.append(kl)
        bar.set_postfix(reward=f"{reward:.3f}", kl=f"{kl:.4f}")
        maybe_eval(step + 1)
    policy.eval()
    return log
