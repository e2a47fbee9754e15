"""Condition Contrastive Alignment (CCA) for the class-conditional raster model: guidance-free sampling.

Classifier-free guidance samples from ``p(x|c) * (p(x|c) / p(x))^w``, which costs a second (unconditional)
forward pass per token. CCA fine-tunes the model so that its plain conditional is that distribution, from
the training data alone (no sampling): for data token maps ``x`` with their class ``c`` (positives) and with
a wrong class ``c'`` (negatives) it raises ``log p(x|c) - log p_ref(x|c)`` and lowers
``log p(x|c') - log p_ref(x|c')`` through :func:`~ar_course.align.functional.cca_loss`::

    policy, tokenizer = raster.load_pretrained()
    reference = copy.deepcopy(policy)
    log = train_cca(policy, reference, token_maps, labels, CCAConfig())

The loop needs only ``log p(x|c)`` of data, so the same :func:`train_cca` fine-tunes chapter 04's VAR: pass
flattened token pyramids ``(N, L)`` and ``log_probs=var_log_probs(tokenizer.quantizer)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ar_course.align.functional import cca_loss
from ar_course.align.model import pyramid_log_probs, sequence_log_probs
from ar_course.sampling import check_generator
from ar_course.tokenizers import MultiScaleVQ
from ar_course.train import DIVERGED_HINT, TrainingError
from ar_course.utils import check_ids, check_int, check_number, check_seed, kept_random_state, progress_bar
from ar_course.var.functional import unflatten_pyramids

LogProbs = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``log_probs(model, data, classes) -> (B,)``: the log-probability of each of ``data`` ``(B, ...)`` given
``classes`` ``(B,)``, with gradients (:func:`~ar_course.align.model.sequence_log_probs` for raster token maps
``(B, h, w)``, :func:`var_log_probs` for VAR pyramids)."""


@dataclass
class CCAConfig:
    """CPU-sized defaults; ``beta`` scales the log-ratios, ``lam`` weighs the negatives (stronger ``lam`` acts
    like stronger guidance).

    Raises:
        TypeError: a field of the wrong type (``lr="1e-4"``, ``steps=2.0`` or ``True``, ``seed=1.5``).
        ValueError: ``steps`` or ``batch_size`` ``< 1``; ``lr``, ``beta`` not finite ``> 0``; ``lam`` not finite
            ``>= 0``; a ``seed`` out of a generator's range.
    """

    steps: int = 500
    batch_size: int = 32
    lr: float = 1e-4
    beta: float = 0.02
    lam: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            setattr(self, name, check_int(name, getattr(self, name), lo=1))
        for name in ("lr", "beta"):
            setattr(self, name, check_number(name, getattr(self, name), lo=0, lo_open=True))
        self.lam = check_number("lam", self.lam, lo=0)
        self.seed = check_seed(self.seed)


@dataclass
class CCALog:
    """Per step: the loss and the mean log-ratios of the positive and the negative pairs."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    logratio_pos: list[float] = field(default_factory=list)
    logratio_neg: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, list]:
        """The curves by field name (a new dict holding the same lists), as the trainer records them."""
        return dict(self.__dict__)


def wrong_classes(classes: torch.Tensor, n_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``(B,)``: for each of ``classes`` ``(B,)`` a class drawn uniformly from the ``n_classes - 1`` others.

    Raises ``TypeError`` for a non-integer ``n_classes`` or ``classes`` that is not a tensor, ``ValueError`` for
    ``n_classes < 2`` (no other class) or ``classes`` not ``(B,)`` long (values are not read: no host sync)."""
    n_classes = check_int("n_classes", n_classes, lo=2)
    check_generator(generator)
    if not isinstance(classes, torch.Tensor):
        raise TypeError(f"classes must be a (B,) long tensor, got {type(classes).__name__}")
    if classes.ndim != 1 or classes.dtype != torch.long:
        raise ValueError(f"classes must be a (B,) long tensor, got {tuple(classes.shape)} {classes.dtype}")
    shift = torch.randint(1, n_classes, classes.shape, generator=generator).to(classes.device)  # (B,)
    return (classes + shift) % n_classes


def var_log_probs(vq: MultiScaleVQ) -> LogProbs:
    """The :data:`LogProbs` of a VAR model on flattened token pyramids ``(B, L)`` of ``vq``
    (:func:`ar_course.var.functional.flatten_pyramids`): :func:`~ar_course.align.model.pyramid_log_probs`."""

    def log_probs(model: nn.Module, tokens: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return pyramid_log_probs(model, vq, unflatten_pyramids(tokens, tuple(vq.scales)), classes)  # (B,)

    return log_probs


def cca_batch_loss(policy: nn.Module, reference: nn.Module, maps: torch.Tensor, classes: torch.Tensor,
                   negatives: torch.Tensor, beta: float = 0.02, lam: float = 1.0,
                   log_probs: LogProbs = sequence_log_probs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, logratio_pos, logratio_neg)``: CCA's loss (:func:`~ar_course.align.functional.cca_loss`, a scalar
    with gradients to ``policy``) of data ``maps`` ``(B, ...)`` (raster token maps ``(B, h, w)`` by default;
    whatever ``log_probs`` reads) paired with their ``classes`` and with wrong ``negatives`` ``(B,)``, and the
    log-ratios ``log p(x | c) - log p_ref(x | c)`` ``(B,)`` of both kinds of pair (one pass per model over the
    ``2B`` pairs; the reference without gradients)."""
    both_maps, both_classes = torch.cat([maps, maps]), torch.cat([classes, negatives])  # (2B, ...), (2B,)
    with torch.no_grad():
        ref = log_probs(reference, both_maps, both_classes)  # (2B,)
    pos, neg = (log_probs(policy, both_maps, both_classes) - ref).chunk(2)  # (B,), (B,)
    return cca_loss(pos, neg, beta, lam), pos, neg


def cca_step(policy: nn.Module, reference: nn.Module, maps: torch.Tensor, classes: torch.Tensor,
             negatives: torch.Tensor, optimizer: torch.optim.Optimizer, config: CCAConfig,
             log_probs: LogProbs = sequence_log_probs) -> tuple[float, float, float]:
    """One CCA update (:func:`cca_batch_loss`, then an optimizer step with the gradient norm clipped to 1);
    returns ``(loss, mean positive log-ratio, mean negative log-ratio)``."""
    loss, pos, neg = cca_batch_loss(policy, reference, maps, classes, negatives, config.beta, config.lam, log_probs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach()), float(pos.detach().mean()), float(neg.detach().mean())


@kept_random_state()
@torch.enable_grad()
def train_cca(policy: nn.Module, reference: nn.Module, token_maps: torch.Tensor, labels: torch.Tensor,
              config: CCAConfig | None = None, progress: bool = True,
              log_probs: LogProbs = sequence_log_probs) -> CCALog:
    """Fine-tune ``policy`` in place with CCA against the frozen ``reference`` on data ``token_maps``
    ``(N, h, w)`` (raster; with ``log_probs=var_log_probs(vq)``, VAR pyramids ``(N, L)``; with any ``log_probs``
    other than the default, ``(N, L)``) with ``labels`` ``(N,)``, from ``config.seed`` (``config`` None: a
    :class:`CCAConfig` of its defaults); returns the curves and
    leaves ``policy`` in eval mode. The updates run in eval mode too (dropout off: the log-ratios compare two
    deterministic passes; with dropout 0.3 a policy equal to its reference started at log-ratios of +-0.03, not
    0). A run that diverges stops at the first loss that is NaN or inf, as :func:`~ar_course.train.train_loop`
    does.

    Raises:
        TypeError: ``token_maps`` or ``labels`` not a tensor, or ``config`` not a :class:`CCAConfig`.
        ValueError: ``token_maps`` or ``labels`` of the wrong shape, no data (``N = 0``), ``labels`` not long or
            not a class of ``policy`` in ``[0, n_classes)``, or a ``policy`` with fewer than 2 classes (an
            unconditional model: CCA contrasts each class with a wrong one).
        TrainingError: a loss that is NaN or inf (:class:`~ar_course.train.TrainingError`, ``training diverged:
            the loss is nan at step 3 (rerun with a lower --lr)``).

    Runs with gradients on, even inside a caller's ``torch.no_grad()``; the caller's global random generators are
    left as they were (:func:`~ar_course.utils.kept_random_state`); ``reference`` is left frozen (eval mode, no
    gradients), ``policy`` in eval mode.
    """
    config = CCAConfig() if config is None else config
    if not isinstance(config, CCAConfig):
        raise TypeError(f"config must be a CCAConfig, got {type(config).__name__}")
    for name, x in (("token_maps", token_maps), ("labels", labels)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    want = 3 if log_probs is sequence_log_probs else 2
    if token_maps.ndim != want or labels.shape != token_maps.shape[:1]:
        raise ValueError(f"expected token_maps {'(N, h, w)' if want == 3 else '(N, L)'} and labels (N,), got "
                         f"{tuple(token_maps.shape)}, {tuple(labels.shape)}")
    if token_maps.shape[0] == 0:
        raise ValueError(f"token_maps holds no data (N = 0), got {tuple(token_maps.shape)}")
    n_classes = policy.config.n_classes
    if n_classes < 2:
        raise ValueError(f"CCA needs a class-conditional policy with n_classes >= 2, got n_classes={n_classes}")
    check_ids("labels", labels, n_classes, (token_maps.shape[0],))
    device = next(policy.parameters()).device
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    reference.requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0, betas=(0.9, 0.99))
    log = CCALog()
    policy.eval()  # dropout off: at the start the policy's log-ratios against its copy are exactly 0
    for step in progress_bar(range(config.steps), desc="CCA", disable=not progress):
        idx = torch.randint(0, token_maps.shape[0], (config.batch_size,), generator=g)  # (B,)
        classes = labels[idx]
        negatives = wrong_classes(classes, n_classes, g)
        loss, pos, neg = cca_step(policy, reference, token_maps[idx].to(device), classes.to(device),
                                  negatives.to(device), optimizer, config, log_probs)
        log.step.append(step), log.loss.append(loss), log.logratio_pos.append(pos), log.logratio_neg.append(neg)
        if not math.isfinite(loss):  # NaN or inf: every later step and the weights are ruined
            raise TrainingError(f"training diverged: the loss is {loss} at step {step + 1} ({DIVERGED_HINT})")
    policy.eval()
    return log
