"""Group Relative Policy Optimization for the class-conditional raster model.

One step: sample a group of ``G`` token maps for each class from the current policy (plain conditional
sampling, guidance 0), decode them, score them with a reward, turn the rewards into group-relative advantages,
then take ``inner_steps`` optimizer steps on the clipped policy-ratio objective over every token minus
``kl_coef`` times the ``k3`` KL estimate to the frozen reference model. No value network: the group's mean
reward is the baseline. :func:`grpo_rollout` is the sampling half of a step and :func:`grpo_update` its optimizer
half (chapter 11's exercises 11.4 and 11.5); :func:`grpo_step` joins them for the class-conditional raster model
and a reward on decoded images::

    policy, tokenizer = raster.load_pretrained()
    reference = copy.deepcopy(policy)
    log = train_grpo(policy, reference, tokenizer, GRPOConfig(steps=40))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ar_course import metrics
from ar_course.align.functional import clipped_surrogate, group_advantages, k3_kl
from ar_course.align.model import token_log_probs
from ar_course.align.rewards import REWARDS, Reward
from ar_course.raster.model import generate_images, generate_tokens
from ar_course.tokenizers import VQVAE
from ar_course.train import DIVERGED_HINT, TrainingError, nonfinite_parameter
from ar_course.transformer.model import GPT
from ar_course.utils import check_int, check_number, check_seed, eval_mode, kept_random_state, progress_bar


def _check_kl_coef(kl_coef: object) -> float:
    """``kl_coef`` as a finite float ``>= 0`` (the rule of :class:`GRPOConfig`, :func:`grpo_objective` and
    :func:`grpo_update`)."""
    return check_number("kl_coef", kl_coef, lo=0)


@dataclass
class GRPOConfig:
    """CPU-sized defaults: 10 classes x 8 samples per step, two optimizer steps per sampled group, 150 steps
    (a few minutes on one core). ``eval_every``: measure the class accuracy on ``eval_per_class`` samples per
    class every that many steps (``0``: never, and ``eval_per_class`` may then be ``0``).

    Raises:
        TypeError: a field of the wrong type (``lr="1e-4"``, ``steps=2.0``, ``seed="x"``).
        ValueError: an unknown ``reward``; ``steps``, ``inner_steps`` ``< 1``, ``group_size < 2``; ``lr``,
            ``clip`` not finite ``> 0``, ``kl_coef`` not finite ``>= 0``; ``eval_every``, ``eval_per_class``
            ``< 0``, or ``eval_per_class = 0`` with ``eval_every > 0``.
    """

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
        if not isinstance(self.reward, str) or self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {sorted(REWARDS)}, got {self.reward!r}")
        for name, lo in (("steps", 1), ("group_size", 2), ("inner_steps", 1), ("eval_every", 0),
                         ("eval_per_class", 0)):
            setattr(self, name, check_int(name, getattr(self, name), lo=lo))
        self.lr = check_number("lr", self.lr, lo=0, lo_open=True)
        self.clip = check_number("clip", self.clip, lo=0, lo_open=True)
        self.kl_coef = _check_kl_coef(self.kl_coef)
        self.seed = check_seed(self.seed)
        if self.eval_every and not self.eval_per_class:
            raise ValueError(f"eval_per_class must be >= 1 when eval_every > 0 (eval_every=0 turns the evaluation "
                             f"off), got eval_per_class=0 with eval_every={self.eval_every}")


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
        """The curves by field name (a new dict holding the same lists), as the trainer records them."""
        return dict(self.__dict__)


def grpo_objective(
    logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, advantages: torch.Tensor,
    clip: float, kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, kl)``: the loss to minimise (minus the mean clipped surrogate plus ``kl_coef`` times the mean
    ``k3`` KL) and the mean KL estimate, from per-token log-probabilities ``(B, T)`` and advantages ``(B,)``.

    Raises:
        TypeError: ``kl_coef`` not a number; as :func:`~ar_course.align.functional.clipped_surrogate` and
            :func:`~ar_course.align.functional.k3_kl` for tensors that are not tensors.
        ValueError: ``kl_coef`` not a finite number ``>= 0``; as those two for bad shapes, dtypes or ``clip``.
    """
    return _objective(logp, logp_old, logp_ref, advantages, clip, _check_kl_coef(kl_coef))


def _objective(
    logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, advantages: torch.Tensor,
    clip: float, kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grpo_objective` with ``kl_coef`` already checked."""
    kl = k3_kl(logp, logp_ref).mean()
    return -clipped_surrogate(logp, logp_old, advantages, clip).mean() + kl_coef * kl, kl.detach()


class _LossDiverged(TrainingError):
    """The :class:`~ar_course.train.TrainingError` of :func:`grpo_update` for a loss that is NaN or inf (raised
    before that inner step changes the weights); :func:`train_grpo` says at which of its steps."""

    def __init__(self, loss: float, inner_step: int) -> None:
        super().__init__(f"training diverged: the loss is {loss} at inner step {inner_step} ({DIVERGED_HINT})")
        self.loss = loss


ROLLOUT_KEYS = ("classes", "maps", "rewards", "advantages", "logp_old", "logp_ref")
"""The keys of a :func:`grpo_rollout` dict, in order."""


def _check_grid(policy: GPT) -> None:
    """``ValueError`` unless ``policy`` has a ``config.grid``: the shape of the maps GRPO samples from it."""
    if policy.config.grid is None:
        raise ValueError("policy must be a raster model with a grid (raster_config(..., grid=(rows, cols))): GRPO "
                         "samples maps of that shape, and this one has config.grid=None")


def grpo_rollout(
    policy: GPT, reference: GPT, reward_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], group_size: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The sampling half of a GRPO step, without gradients: ``group_size`` token maps per class from ``policy``
    in eval mode (one :func:`~ar_course.raster.model.generate_tokens` call with ``generator``), scored by
    ``reward_fn(maps, classes)`` -> ``(B,)``. Returns the batch the updates train on, ``B = n_classes *
    group_size`` with each class's samples next to each other: ``classes`` ``(B,)``, ``maps`` ``(B, h, w)``,
    ``rewards`` ``(B,)``, ``advantages`` ``(B,)`` (relative to the class's group), and the per-token
    log-probabilities ``logp_old`` (the policy's) and ``logp_ref`` (the reference's) ``(B, h * w)``. The policy
    is given back in the mode it came in.

    Raises:
        TypeError: ``group_size`` not an integer.
        ValueError: ``group_size < 2``, a ``policy`` without a ``config.grid`` (the map shape it samples), or
            rewards that are not one finite float per sample (NaN or inf would make every advantage of its group
            NaN).
    """
    group_size = check_int("group_size", group_size, lo=2)
    _check_grid(policy)
    device = next(policy.parameters()).device
    n_classes = policy.config.n_classes
    classes = torch.arange(n_classes, device=device).repeat_interleave(group_size)  # (N * G,)
    with eval_mode(policy), torch.no_grad():
        maps = generate_tokens(policy, classes, policy.config.grid, generator=generator)  # (N * G, h, w)
        rewards = reward_fn(maps, classes)  # (N * G,)
        if not (isinstance(rewards, torch.Tensor) and rewards.is_floating_point()
                and rewards.shape == classes.shape):
            raise ValueError(f"reward_fn must return a float tensor of shape {tuple(classes.shape)} (one reward "
                             f"per sample), got {getattr(rewards, 'dtype', type(rewards).__name__)} "
                             f"{tuple(getattr(rewards, 'shape', ()))}")
        finite = torch.isfinite(rewards)  # (N * G,)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            raise ValueError(f"reward_fn returned {float(rewards[bad])} for sample {bad} (of {rewards.numel()}): "
                             f"rewards must be finite numbers")
        adv = group_advantages(rewards.view(n_classes, group_size)).flatten()  # (N, G) -> (N * G,)
        logp_old = token_log_probs(policy, maps, classes)  # (N * G, T)
        logp_ref = token_log_probs(reference, maps, classes)  # (N * G, T)
    return dict(zip(ROLLOUT_KEYS, (classes, maps, rewards, adv, logp_old, logp_ref)))


def grpo_update(
    policy: GPT, optimizer: torch.optim.Optimizer, rollout: dict[str, torch.Tensor], clip: float = 0.2,
    kl_coef: float = 0.05, inner_steps: int = 2,
) -> list[tuple[float, float]]:
    """The optimizer half of a GRPO step: ``inner_steps`` steps on :func:`grpo_objective` of one
    :func:`grpo_rollout`, each recomputing the policy's log-probabilities with gradients against the fixed
    ``logp_old`` and ``logp_ref``, with the gradient norm clipped to 1. Returns ``(loss, mean KL)`` of each
    step, measured before its update. Runs in whatever mode ``policy`` is in.

    Raises:
        TypeError: ``inner_steps`` not an integer or ``kl_coef`` not a number.
        ValueError: ``inner_steps < 1``, ``kl_coef`` not a finite number ``>= 0``, a ``rollout`` that lacks a key
            of :func:`grpo_rollout`'s (``rewards`` aside, which is not used), or as :func:`grpo_objective` and
            :func:`token_log_probs`.
        TrainingError: a loss that is NaN or inf (:class:`~ar_course.train.TrainingError`, ``training diverged:
            the loss is inf at inner step 2 (rerun with a lower --lr)``), before its step changes the weights.
    """
    inner_steps = check_int("inner_steps", inner_steps, lo=1)
    kl_coef = _check_kl_coef(kl_coef)
    missing = [key for key in ROLLOUT_KEYS if key != "rewards" and key not in rollout]
    if missing:
        raise ValueError(f"rollout lacks {', '.join(missing)}: pass the dict that grpo_rollout returns")
    steps = []
    for _ in range(inner_steps):
        logp = token_log_probs(policy, rollout["maps"], rollout["classes"])  # (B, T)
        loss, kl = _objective(logp, rollout["logp_old"], rollout["logp_ref"], rollout["advantages"], clip, kl_coef)
        value = float(loss.detach())
        if not math.isfinite(value):  # its gradient would turn every weight NaN
            raise _LossDiverged(value, len(steps) + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        steps.append((value, float(kl)))
    return steps


def grpo_step(
    policy: GPT, reference: GPT, tokenizer: VQVAE, optimizer: torch.optim.Optimizer, config: GRPOConfig,
    reward_fn: Reward, generator: torch.Generator,
) -> tuple[float, float]:
    """One GRPO step: :func:`grpo_rollout` scored by ``reward_fn`` on the decoded images, then
    :func:`grpo_update` in eval mode: dropout off, so that the ratio compares the policy with ``logp_old`` computed
    by the same function (with dropout on, a policy with ``dropout=0.3`` was 0.11 nats from ``logp_old`` before
    any update, and the clipping acted on that noise). Returns ``(mean reward, mean KL before the first
    update)``; the policy is left in eval mode. Raises as those two (a NaN or inf loss:
    :class:`~ar_course.train.TrainingError`)."""

    def reward_of_maps(maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return reward_fn(tokenizer.decode_from_indices(maps), classes)  # (B,)

    rollout = grpo_rollout(policy, reference, reward_of_maps, config.group_size, generator)
    policy.eval()
    steps = grpo_update(policy, optimizer, rollout, config.clip, config.kl_coef, config.inner_steps)
    return float(rollout["rewards"].mean()), steps[0][1]


def evaluate(model: GPT, tokenizer: VQVAE, per_class: int, seed: int = 1234) -> tuple[float, float]:
    """``(class accuracy, mean brightness)`` of ``per_class`` samples per class at guidance 0 (fixed seed)."""
    accuracy, images = metrics.generated_class_accuracy(
        lambda classes: generate_images(model, tokenizer, classes, seed=seed),
        model.config.n_classes, per_class)
    return accuracy, float(images.mean())


@kept_random_state()
@torch.enable_grad()
def train_grpo(
    policy: GPT, reference: GPT, tokenizer: VQVAE, config: GRPOConfig | None = None, progress: bool = True,
) -> GRPOLog:
    """Fine-tune ``policy`` in place with GRPO against the frozen ``reference`` from ``config.seed`` (``config``
    None: a :class:`GRPOConfig` of its defaults); returns the curves. With ``config.eval_every > 0`` the class
    accuracy is measured before the first step, every ``eval_every`` steps and at the end.

    A run that diverges stops at the step where it does, as :func:`~ar_course.train.train_loop` does.

    Raises:
        TypeError: ``config`` is not a :class:`GRPOConfig`.
        ValueError: as :func:`grpo_rollout` (a policy without a grid, a reward that is NaN or inf).
        TrainingError: the run diverged (:class:`~ar_course.train.TrainingError`): a loss that is NaN or inf
            (``training diverged: the loss is inf at step 3 (rerun with a lower --lr)``, raised before that
            update) or weights that hold NaN or inf after a step.

    Runs with gradients on, even inside a caller's ``torch.no_grad()``; the caller's global random generators are
    left as they were (:func:`~ar_course.utils.kept_random_state`); ``reference`` is left frozen (eval mode, no
    gradients), ``policy`` in eval mode.
    """
    config = GRPOConfig() if config is None else config
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a GRPOConfig, got {type(config).__name__}")
    _check_grid(policy)
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
    bar = progress_bar(range(config.steps), desc=f"GRPO ({config.reward})", disable=not progress)
    for step in bar:
        try:
            reward, kl = grpo_step(policy, reference, tokenizer, optimizer, config, reward_fn, generator)
        except _LossDiverged as exc:  # train_loop's message, naming this step
            raise TrainingError(f"training diverged: the loss is {exc.loss} at step {step + 1} "
                                f"({DIVERGED_HINT})") from None
        if (bad := nonfinite_parameter(policy)) is not None:  # a finite loss whose update overflowed
            raise TrainingError(f"training diverged: the weights hold NaN or inf after step {step + 1} ({bad} "
                                f"first) ({DIVERGED_HINT})")
        log.step.append(step), log.reward.append(reward), log.kl.append(kl)
        bar.set_postfix(reward=f"{reward:.3f}", kl=f"{kl:.4f}")
        maybe_eval(step + 1)
    policy.eval()
    return log
