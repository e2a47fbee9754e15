"""Condition Contrastive Alignment (CCA) for the class-conditional raster model: guidance-free sampling.

Classifier-free guidance samples from ``p(x|c) * (p(x|c) / p(x))^w``, which costs a second (unconditional)
forward pass per token. CCA fine-tunes the model so that its plain conditional is that distribution, from
the training data alone (no sampling): for data token maps ``x`` with their class ``c`` (positives) and with
a wrong class ``c'`` (negatives) it raises ``log p(x|c) - log p_ref(x|c)`` and lowers
``log p(x|c') - log p_ref(x|c')`` through :func:`~ar_course.align.functional.cca_loss`::

    policy, tokenizer = raster.load_pretrained()
    reference = copy.deepcopy(policy)
    log = train_cca(policy, reference, token_maps, labels, CCAConfig())
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ar_course.align.functional import cca_loss
from ar_course.align.model import sequence_log_probs
from ar_course.transformer.model import GPT


@dataclass
class CCAConfig:
    """CPU-sized defaults; ``beta`` scales the log-ratios, ``lam`` weighs the negatives (stronger ``lam`` acts
    like stronger guidance)."""

    steps: int = 500
    batch_size: int = 32
    lr: float = 1e-4
    beta: float = 0.02
    lam: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not (self.lr > 0 and self.beta > 0 and self.lam >= 0):
            raise ValueError(f"need lr > 0, beta > 0, lam >= 0; got {self.lr}, {self.beta}, {self.lam}")


@dataclass
class CCALog:
    """Per step: the loss and the mean log-ratios of the positive and the negative pairs."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    logratio_pos: list[float] = field(default_factory=list)
    logratio_neg: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, list]:
        return dict(self.__dict__)


def wrong_classes(classes: torch.Tensor, n_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``(B,)``: for each of ``classes`` ``(B,)`` a class drawn uniformly from the ``n_classes - 1`` others."""
    shift = torch.randint(1, n_classes, classes.shape, generator=generator).to(classes.device)  # (B,)
    return (classes + shift) % n_classes


def cca_step(policy: GPT, reference: GPT, maps: torch.Tensor, classes: torch.Tensor, negatives: torch.Tensor,
             optimizer: torch.optim.Optimizer, config: CCAConfig) -> tuple[float, float, float]:
    """One CCA update on data ``maps`` ``(B, h, w)`` with their ``classes`` and wrong ``negatives`` ``(B,)``;
    returns ``(loss, mean positive log-ratio, mean negative log-ratio)``."""
    both_maps, both_classes = torch.cat([maps, maps]), torch.cat([classes, negatives])  # (2B, h, w), (2B,)
    with torch.no_grad():
        ref = sequence_log_probs(reference, both_maps, both_classes)  # (2B,)
    ratio = sequence_log_probs(policy, both_maps, both_classes) - ref  # (2B,)
    pos, neg = ratio.chunk(2)  # (B,), (B,)
    loss = cca_loss(pos, neg, config.beta, config.lam)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach()), float(pos.detach().mean()), float(neg.detach().mean())


def train_cca(policy: GPT, reference: GPT, token_maps: torch.Tensor, labels: torch.Tensor,
              config: CCAConfig = CCAConfig(), progress: bool = True) -> CCALog:
    """Fine-tune ``policy`` in place with CCA against the frozen ``reference`` on data ``token_maps``
    ``(N, h, w)`` with ``labels`` ``(N,)``, from ``config.seed``; returns the curves."""
    if token_maps.ndim != 3 or labels.shape != token_maps.shape[:1]:
        raise ValueError(f"expected token_maps (N, h, w) and labels (N,), got {tuple(token_maps.shape)}, "
                         f"{tuple(labels.shape)}")
    device = next(policy.parameters()).device
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    reference.requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0, betas=(0.9, 0.99))
    log = CCALog()
    policy.train()
    for step in tqdm(range(config.steps), desc="CCA", disable=not progress):
        idx = torch.randint(0, token_maps.shape[0], (config.batch_size,), generator=g)  # (B,)
        classes = labels[idx]
        negatives = wrong_classes(classes, policy.config.n_classes, g)
        loss, pos, neg = cca_step(policy, reference, token_maps[idx].to(device), classes.to(device),
                                  negatives.to(device), optimizer, config)
        log.step.append(step), log.loss.append(loss), log.logratio_pos.append(pos), log.logratio_neg.append(neg)
    policy.eval()
    return log
