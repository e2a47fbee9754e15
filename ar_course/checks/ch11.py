"""Checks for chapter 11, alignment: ``checks.ch11.group_advantages(group_advantages)``.

Every check compares with the library (:mod:`ar_course.align`) on seeded random inputs and hand-made edge
cases (a group of equal rewards, ratios outside the clip range, identical models, eps and clip other than their
defaults), and names the usual mistakes: an unbiased standard deviation, a clip without the minimum, the k1 or
reversed KL estimate, a negative term with the wrong sign. The log-probabilities must also carry the gradient to
the model's weights, since both GRPO and CCA train through them."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ar_course import metrics, raster
from ar_course.align import functional as ref
from ar_course.align.model import token_log_probs as ref_token_log_probs
from ar_course.checks.core import Case, Chapter, CheckFailure, Mistake, call, compare, compare_cases
from ar_course.checks.reference import ch11 as answers
from ar_course.transformer.model import GPT

chapter = Chapter(11, "Alignment")
use = chapter.use
hint = chapter.hint


# --------------------------------------------------------------------------------------------------------
# 11.1 log-probabilities of sampled tokens


def _tiny_model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(raster.raster_config(12, (3, 4), n_classes=5, n_layer=1, n_head=2, n_embd=16)).eval()


def _logp_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(111)
    for seed, b in ((0, 4), (1, 1)):
        model = _tiny_model(seed)
        yield Case(f"tiny model {seed}, batch {b}", (model, torch.randint(0, 12, (b, 3, 4), generator=g),
                                                     torch.randint(0, 5, (b,), generator=g)))
    model = _tiny_model(2)
    yield Case("null class (unconditional)", (model, torch.randint(0, 12, (2, 3, 4), generator=g),
                                              torch.tensor([5, 1])))


def _logp_probs(model, maps, classes):
    return ref_token_log_probs(model, maps, classes).exp()


def _logp_shifted(model, maps, classes):
    seq = maps.flatten(1)  # (B, L)
    logits, _ = model(seq[:, :-1], classes=classes)  # (B, L, V)
    logp = torch.log_softmax(logits[:, 1:], dim=-1)  # predictions one position too late
    return torch.cat([logp.gather(-1, seq[:, 1:, None]).squeeze(-1), torch.zeros_like(seq[:, :1], dtype=logp.dtype)], 1)


LOGP_MISTAKES = [
    Mistake(_logp_probs, "those are probabilities; the ratio and the KL need log-probabilities"),
    Mistake(_logp_shifted, "each token is read from the prediction of the position after it: the logits at "
                           "position t (the class token is position 0) predict token t"),
]


@chapter.exercise("11.1", reference=ref_token_log_probs, hints=(
    "one forward pass over the whole map gives, at every position, the distribution of the next token; you "
    "need each sampled token's entry of its own distribution",
    "flatten the map in raster order, feed all tokens but the last with the classes (the class token comes "
    "first, so position t predicts token t), take log_softmax over the vocabulary and gather the targets",
    "seq = token_maps.flatten(1); logits, _ = model(seq[:, :-1], classes=classes); "
    "return torch.log_softmax(logits, -1).gather(-1, seq[..., None]).squeeze(-1)",
))
def token_log_probs(fn: Callable, ref_fn: Callable) -> None:
    with torch.no_grad():
        compare_cases(fn, ref_fn, _logp_cases(), mistakes=LOGP_MISTAKES)
    _check_logp_gradients(fn, ref_fn)


def _check_logp_gradients(fn: Callable, ref_fn: Callable) -> None:
    """GRPO and CCA train through these log-probabilities: the gradient of a weighted sum of the learner's output
    must reach the model's weights, and be the reference's."""
    where = "tiny model 3 with gradients on"
    model = _tiny_model(3)
    g = torch.Generator().manual_seed(1110)
    maps, classes = torch.randint(0, 12, (3, 3, 4), generator=g), torch.randint(0, 5, (3,), generator=g)
    weights = torch.randn(3, 12, generator=g)
    got = call(fn, model, maps, classes, where=where)
    if not isinstance(got, torch.Tensor) or not got.requires_grad:
        raise CheckFailure(f"no gradient reaches the model's weights on input {where!r} (was the output computed "
                           "under torch.no_grad() or detached?): GRPO and CCA train the model through these "
                           "log-probabilities")
    params = [p for p in model.parameters() if p.requires_grad]
    mine = torch.autograd.grad((got * weights).sum(), params, allow_unused=True)
    expected = torch.autograd.grad((ref_fn(model, maps, classes) * weights).sum(), params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), mine, expected):
        compare(torch.zeros_like(b) if a is None else a, b, where=where, name=f"the gradient of {name}")


# --------------------------------------------------------------------------------------------------------
# 11.2 the classifier's reward


def _reward_cases() -> Iterator[Case]:
    from ar_course.data import load_mnist

    classifier = metrics.load_classifier("mnist")
    images, labels = load_mnist("test", size=32)
    g = torch.Generator().manual_seed(112)
    yield Case("8 test digits, their own classes", (images[:8], labels[:8], classifier))
    yield Case("8 test digits, other classes", (images[8:16], (labels[8:16] + 3) % 10, classifier))
    yield Case("noise images", (torch.rand(5, 1, 32, 32, generator=g), torch.arange(5), classifier))


REWARD_MISTAKES = [
    Mistake(lambda x, c, clf: (clf(x).argmax(-1) == c).float(),
            "that is 0 or 1 (right or wrong): a probability gives a reward that grows smoothly"),
    Mistake(lambda x, c, clf: torch.log_softmax(clf(x), -1).gather(1, c[:, None]).squeeze(1),
            "that is the log-probability; the reward is the probability itself"),
    Mistake(lambda x, c, clf: torch.softmax(clf(x), 0).gather(1, c[:, None]).squeeze(1),
            "that softmax runs over the batch; each image's probabilities are over the classes"),
]


@chapter.exercise("11.2", reference=answers.class_reward, hints=(
    "the classifier returns one score per class; the reward asks how sure it is that the image shows the "
    "class that was requested",
    "turn the logits into probabilities over the classes (softmax on the last axis) and pick each row's "
    "requested class",
    "return torch.softmax(classifier(images), -1).gather(1, classes[:, None]).squeeze(1)",
))
def class_reward(fn: Callable, ref_fn: Callable) -> None:
    with torch.no_grad():
        compare_cases(fn, ref_fn, _reward_cases(), mistakes=REWARD_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 11.3 group-relative advantages


def _adv_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(113)
    yield Case("3 groups of 4", (torch.rand(3, 4, generator=g),))
    yield Case("groups of different spread", (torch.cat([torch.rand(1, 6, generator=g),
                                                         10 * torch.rand(1, 6, generator=g)]),))
    yield Case("a group of equal rewards", (torch.tensor([[0.5, 0.5, 0.5], [0.0, 1.0, 0.5]]),))
    yield Case("2 groups of 5, eps = 0.05", (torch.rand(2, 5, generator=g),), {"eps": 0.05})


ADV_MISTAKES = [
    Mistake(lambda r: (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4),
            "that divides by the unbiased standard deviation (torch.std's default); use the population one "
            "(unbiased=False)"),
    Mistake(lambda r: (r - r.mean()) / (r.std(unbiased=False) + 1e-4),
            "that normalises over all groups at once; each group is its own baseline"),
    Mistake(lambda r: r - r.mean(1, keepdim=True), "those are not divided by the group's standard deviation"),
    Mistake(lambda r: (r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True, unbiased=False),
            "a group of equal rewards gives 0/0: add eps to the standard deviation"),
]


@chapter.exercise("11.3", reference=ref.group_advantages, hints=(
    "GRPO has no value network: the other samples of the same class are the baseline",
    "subtract each group's (row's) mean and divide by its population standard deviation plus eps = 1e-4",
    "return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True, unbiased=False) + eps)",
))
def group_advantages(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _adv_cases(), mistakes=ADV_MISTAKES, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# 11.4 the clipped surrogate


def _surrogate_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(114)
    logp_old = -3 * torch.rand(4, 6, generator=g)
    yield Case("ratios near 1", (logp_old + 0.1 * torch.randn(4, 6, generator=g), logp_old,
                                 torch.randn(4, generator=g)))
    yield Case("ratios far from 1, both signs of advantage",
               (logp_old + torch.randn(4, 6, generator=g), logp_old, torch.tensor([1.0, -1.0, 2.0, -0.5])))
    r = torch.tensor([[0.5, 0.9, 1.1, 1.5]]).log()
    yield Case("ratios 0.5, 0.9, 1.1, 1.5 with clip 0.2, A = +1 and -1",
               (torch.cat([r, r]), torch.zeros(2, 4), torch.tensor([1.0, -1.0])), {"clip": 0.2})
    yield Case("the same ratios with clip 0.3", (torch.cat([r, r]), torch.zeros(2, 4), torch.tensor([1.0, -1.0])),
               {"clip": 0.3})


def _no_min(logp, logp_old, adv, clip=0.2):
    return torch.exp(logp - logp_old).clamp(1 - clip, 1 + clip) * adv[:, None]


def _max(logp, logp_old, adv, clip=0.2):
    r = torch.exp(logp - logp_old)
    return torch.maximum(r * adv[:, None], r.clamp(1 - clip, 1 + clip) * adv[:, None])


SURROGATE_MISTAKES = [
    Mistake(_no_min, "that is the clipped term alone: without the minimum with the unclipped term, a ratio that "
                     "moved the wrong way is clipped too and its gradient lost"),
    Mistake(_max, "that takes the maximum: the objective must be the pessimistic (smaller) of the two terms"),
    Mistake(lambda logp, logp_old, adv, clip=0.2: torch.exp(logp - logp_old) * adv[:, None],
            "there is no clipping: the update can move the policy arbitrarily far from the one that sampled"),
]


@chapter.exercise("11.4", reference=ref.clipped_surrogate, hints=(
    "the ratio of new to old probability says how far the update has moved each token; PPO stops rewarding "
    "moves beyond 1 +- clip in the direction the advantage likes",
    "r = exp(logp - logp_old); the objective is the smaller of r * A and clamp(r, 1 - clip, 1 + clip) * A, with "
    "A broadcast over the tokens of its sequence",
    "r = torch.exp(logp - logp_old); a = advantages[:, None]; "
    "return torch.minimum(r * a, r.clamp(1 - clip, 1 + clip) * a)",
))
def clipped_surrogate(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _surrogate_cases(), grad_wrt=(0,), mistakes=SURROGATE_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 11.5 the k3 KL estimate


def _kl_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(115)
    a = -2 * torch.rand(3, 5, generator=g)
    yield Case("random log-probabilities", (a, a + 0.5 * torch.randn(3, 5, generator=g)))
    yield Case("identical models", (a, a.clone()))
    yield Case("large differences", (torch.tensor([[-0.1, -4.0, -1.0]]), torch.tensor([[-3.0, -0.2, -1.0]])))


KL_MISTAKES = [
    Mistake(lambda lp, lr: lp - lr, "that is the k1 estimate log p - log p_ref: unbiased, but negative for many "
                                    "samples and noisy"),
    Mistake(lambda lp, lr: torch.exp(lp - lr) - (lp - lr) - 1,
            "the log-ratio is reversed: with d = log p_ref - log p the estimate is exp(d) - d - 1"),
    Mistake(lambda lp, lr: 0.5 * (lp - lr) ** 2, "that is the k2 estimate (d^2 / 2), biased"),
]


@chapter.exercise("11.5", reference=ref.k3_kl, hints=(
    "the tokens were sampled from the policy; you want an estimate of KL(policy || reference) per token that "
    "is never negative",
    "with d = logp_ref - logp, the estimate is exp(d) - d - 1 (its mean over samples from the policy is the KL, "
    "and exp(d) >= 1 + d makes it non-negative)",
    "d = logp_ref - logp; return torch.exp(d) - d - 1",
))
def k3_kl(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _kl_cases(), grad_wrt=(0,), mistakes=KL_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 11.6 the CCA loss


def _cca_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(116)
    yield Case("random log-ratios", (10 * torch.randn(8, generator=g), 10 * torch.randn(8, generator=g)),
               {"beta": 0.02, "lam": 1.0})
    yield Case("beta 0.5, lam 3", (torch.randn(5, generator=g), torch.randn(5, generator=g)),
               {"beta": 0.5, "lam": 3.0})
    yield Case("large log-ratios (a stable log-sigmoid)",
               (torch.tensor([-800.0, 900.0]), torch.tensor([700.0, -900.0])), {"beta": 1.0, "lam": 2.0})


def _cca_wrong_sign(pos, neg, beta=0.02, lam=1.0):
    return -torch.nn.functional.logsigmoid(beta * pos).mean() - lam * torch.nn.functional.logsigmoid(beta * neg).mean()


def _cca_no_lam(pos, neg, beta=0.02, lam=1.0):
    return ref.cca_loss(pos, neg, beta, 1.0)


CCA_MISTAKES = [
    Mistake(_cca_wrong_sign, "the negative pairs' term raises their log-ratio: it needs sigmoid(-beta * neg)"),
    Mistake(_cca_no_lam, "lam is missing: it weighs the negative pairs' term"),
    Mistake(lambda pos, neg, beta=0.02, lam=1.0: -torch.log(torch.sigmoid(beta * pos)).mean()
            - lam * torch.log(torch.sigmoid(-beta * neg)).mean(),
            "log(sigmoid(x)) overflows to -inf for large negative x: use torch.nn.functional.logsigmoid"),
]


@chapter.exercise("11.6", reference=ref.cca_loss, hints=(
    "CCA is a classification between matched (image, its class) and mismatched (image, another class) pairs, "
    "with the model's log-ratio to the reference as the score",
    "mean of -logsigmoid(beta * pos) over the positives plus lam times the mean of -logsigmoid(-beta * neg) over "
    "the negatives (torch.nn.functional.logsigmoid is stable)",
    "return -F.logsigmoid(beta * logratio_pos).mean() - lam * F.logsigmoid(-beta * logratio_neg).mean()",
))
def cca_loss(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _cca_cases(), grad_wrt=(0, 1), mistakes=CCA_MISTAKES)
