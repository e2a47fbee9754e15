"""Checks for chapter 11, alignment: ``checks.ch11.group_advantages(group_advantages)``.

Every check compares with the library (:mod:`ar_course.align`) or :mod:`ar_course.checks.reference.ch11` on seeded
random inputs, tiny seeded models and hand-made edge cases (groups in shuffled order and of one sample, equal or
near-equal rewards, a sharp model whose unlikely tokens have log-probabilities below -150, as many sequences as tokens,
ratios outside the clip range, a policy that arrives in train mode with dropout, several inner steps, large CCA scores),
and names the usual mistakes: the log of a softmax, groups read as consecutive blocks, an unbiased or one-pass standard
deviation, a clip without the minimum, the k1 or reversed KL, the objective instead of the loss, a rollout that samples
or scores with dropout on or scores with the wrong model, a ratio taken against the current step's policy, gradients
that accumulate across inner steps, per-token CCA log-ratios, a flipped sign. Log-probabilities and losses must also
carry the gradient to the model's weights, since GRPO and CCA train through them; the functions leave their tensors, the
rollout and the model's mode as they came, and the update returns Python floats."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ar_course import raster
from ar_course.align import functional as ref
from ar_course.align.cca import cca_batch_loss
from ar_course.align.grpo import ROLLOUT_KEYS, grpo_objective, grpo_rollout as library_rollout
from ar_course.align.model import token_log_probs as ref_token_log_probs
from ar_course.checks.core import (Case, Chapter, CheckFailure, Mistake, call, check_unchanged, clone_args, compare,
                                   compare_cases, describe, explain)
from ar_course.checks.reference import ch11 as answers
from ar_course.transformer.model import GPT

chapter = Chapter(11, "Alignment")
use = chapter.use
hint = chapter.hint


# --------------------------------------------------------------------------------------------------------
# 11.1 log-probabilities of sampled tokens


def _tiny_model(seed: int, dropout: float = 0.0, scale: float = 1.0) -> GPT:
    """A seeded tiny raster model over 3x4 maps of 12 codes and 5 classes; ``scale`` multiplies its weights (a
    larger scale gives sharper distributions, far from another tiny model's)."""
    torch.manual_seed(seed)
    model = GPT(raster.raster_config(12, (3, 4), n_classes=5, n_layer=1, n_head=2, n_embd=16, dropout=dropout))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model.eval()


def _logp_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(111)
    for seed, b in ((0, 4), (1, 1)):
        model = _tiny_model(seed)
        yield Case(f"tiny model {seed}, batch {b}", (model, torch.randint(0, 12, (b, 3, 4), generator=g),
                                                     torch.randint(0, 5, (b,), generator=g)))
    model = _tiny_model(2)
    yield Case("null class (unconditional)", (model, torch.randint(0, 12, (2, 3, 4), generator=g),
                                              torch.tensor([5, 1])))
    g = torch.Generator().manual_seed(0)
    maps, classes = torch.randint(0, 12, (2, 3, 4), generator=g), torch.randint(0, 5, (2,), generator=g)
    yield Case("a sharp model (weights x 20): some log-probabilities below -150", (_tiny_model(4, scale=20.0), maps,
                                                                                   classes))


def _logp_probs(model, maps, classes):
    return ref_token_log_probs(model, maps, classes).exp()


def _logp_shifted(model, maps, classes):
    seq = maps.flatten(1)  # (B, L)
    logits, _ = model(seq[:, :-1], classes=classes)  # (B, L, V)
    logp = torch.log_softmax(logits[:, 1:], dim=-1)  # predictions one position too late
    return torch.cat([logp.gather(-1, seq[:, 1:, None]).squeeze(-1), torch.zeros_like(seq[:, :1], dtype=logp.dtype)], 1)


def _logp_of_softmax(model, maps, classes):
    seq = maps.flatten(1)  # (B, L)
    logits, _ = model(seq[:, :-1], classes=classes)  # (B, L, V)
    return torch.softmax(logits, dim=-1).log().gather(-1, seq[..., None]).squeeze(-1)


def _logp_unconditional(model, maps, classes):
    return ref_token_log_probs(model, maps, torch.full_like(classes, model.null_class))


def _logp_over_positions(model, maps, classes):
    seq = maps.flatten(1)  # (B, L)
    logits, _ = model(seq[:, :-1], classes=classes)  # (B, L, V)
    return torch.log_softmax(logits, dim=1).gather(-1, seq[..., None]).squeeze(-1)  # normalised over positions


LOGP_MISTAKES = [
    Mistake(_logp_probs, "those are probabilities; the ratio and the KL need log-probabilities"),
    Mistake(_logp_of_softmax, "that is the log of a softmax: a probability below about 1e-38 rounds to 0 (or "
                              "loses its digits) before the log, so an unlikely token gets -inf; compute the "
                              "log-probabilities from the logits in one stable step"),
    Mistake(_logp_shifted, "each token is read from the prediction of the position after it: the logits at "
                           "position t (the class token is position 0) predict token t"),
    Mistake(_logp_unconditional, "those are the unconditional log-probabilities (every map scored with the null "
                                 "class): the model must see each map's own class"),
    Mistake(_logp_over_positions, "the log_softmax ran over the positions (dim 1), not over the vocabulary: each "
                                  "position's distribution is over the codes, the last axis"),
]


def _logp_normaliser_detached(model, maps, classes):
    seq = maps.flatten(1)  # (B, L)
    logits, _ = model(seq[:, :-1], classes=classes)  # (B, L, V)
    return logits.gather(-1, seq[..., None]).squeeze(-1) - logits.logsumexp(-1).detach()  # right values


def _logp_grads(logp_fn: Callable) -> Callable:
    """The gradients, with respect to the model's weights, of ``logp_fn``'s output weighted by ``weights`` (zeros
    where none reaches a weight), as :func:`_check_logp_gradients` takes them."""

    def grads(model, maps, classes, weights):
        params = [p for p in model.parameters() if p.requires_grad]
        out = torch.autograd.grad((logp_fn(model, maps, classes) * weights).sum(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out)]

    return grads


LOGP_GRAD_MISTAKES = [
    Mistake(_logp_grads(_logp_normaliser_detached),
            "the normaliser (the logsumexp of the logits) was detached: the values are right, but the part of the "
            "gradient that lowers every other code's logit is missing"),
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
        compare_cases(fn, ref_fn, _logp_cases(), mistakes=LOGP_MISTAKES, off_cpu=True)
        _check_eval_mode_kept(fn)
    _check_logp_gradients(fn, ref_fn)


def _check_eval_mode_kept(fn: Callable) -> None:
    """A model that arrives in eval mode leaves in eval mode: a function that switches to eval mode and then back
    to train mode unconditionally turns dropout on for a caller that had it off (a rollout scores in eval mode)."""
    where = "tiny model 0 in eval mode, batch 2"
    model = _tiny_model(0)
    g = torch.Generator().manual_seed(1111)
    call(fn, model, torch.randint(0, 12, (2, 3, 4), generator=g), torch.randint(0, 5, (2,), generator=g), where=where)
    if model.training:
        raise CheckFailure(f"your function left the model in train mode on input {where!r}, though it came in eval "
                           "mode: the caller chooses the mode (a rollout scores with dropout off), so give the model "
                           "back in the mode it came in, whichever that was")


def _check_logp_gradients(fn: Callable, ref_fn: Callable) -> None:
    """GRPO and CCA train through these log-probabilities: the gradient of a weighted sum of the learner's output
    must reach the model's weights, and be the reference's."""
    where = "tiny model 3 in train mode, with gradients on"
    model = _tiny_model(3).train()  # no dropout: the mode changes nothing but itself
    g = torch.Generator().manual_seed(1110)
    maps, classes = torch.randint(0, 12, (3, 3, 4), generator=g), torch.randint(0, 5, (3,), generator=g)
    weights = torch.randn(3, 12, generator=g)
    got = call(fn, model, maps, classes, where=where)
    if not model.training:
        raise CheckFailure(f"your function switched the model to eval mode on input {where!r} and left it there: the "
                           "caller chooses the mode (GRPO's updates run the policy in train mode), so leave it as it "
                           "came")
    if not isinstance(got, torch.Tensor) or not got.requires_grad:
        raise CheckFailure(f"no gradient reaches the model's weights on input {where!r} (was the output computed "
                           "under torch.no_grad() or detached?): GRPO and CCA train the model through these "
                           "log-probabilities")
    params = [p for p in model.parameters() if p.requires_grad]
    mine = torch.autograd.grad((got * weights).sum(), params, allow_unused=True)
    expected = torch.autograd.grad((ref_fn(model, maps, classes) * weights).sum(), params, allow_unused=True)
    mine = [torch.zeros_like(b) if a is None else a for a, b in zip(mine, expected)]
    for (name, _), a, b in zip(model.named_parameters(), mine, expected):
        try:
            compare(a, b, where=where, name=f"the gradient of {name}")
        except CheckFailure as exc:
            raise explain(exc, LOGP_GRAD_MISTAKES, Case(where, (model, maps, classes, weights)), mine) from None


# --------------------------------------------------------------------------------------------------------
# 11.2 group-relative advantages, groups by id


def _adv_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(112)
    yield Case("2 groups of 4, interleaved", (torch.rand(8, generator=g), torch.tensor([1, 0, 0, 1, 1, 0, 1, 0])))
    yield Case("groups of 5, 2 and 1 sample (ids 7, 3, 0), shuffled",
               (torch.rand(8, generator=g), torch.tensor([7, 3, 7, 0, 7, 3, 7, 7])))
    yield Case("a group of equal rewards", (torch.tensor([0.5, 0.0, 0.5, 1.0, 0.5, 0.5]),
                                            torch.tensor([2, 5, 2, 5, 2, 5])))
    yield Case("float64 rewards, groups of very different spread",
               (torch.cat([torch.rand(4, generator=g), 10 * torch.rand(4, generator=g)]).double(),
                torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])))
    yield Case("3 groups of 3, eps = 0.05", (torch.rand(9, generator=g), torch.arange(9) % 3), {"eps": 0.05})
    # rewards 0.99 give or take 0.001 keep only about 4 significant digits of their deviations in float32, so any
    # two accurate orders of operations (or float64 inside) differ by up to ~4e-4 there; a one-pass variance is off
    # by ~0.3
    yield Case("a group of near-equal confident rewards (0.99 + up to 0.001) beside a spread one",
               (torch.cat([0.99 + 0.001 * torch.rand(4, generator=g), torch.rand(4, generator=g)]),
                torch.tensor([4, 4, 4, 4, 2, 2, 2, 2])), atol=1e-3)


def _adv_per_group(rewards, groups, eps=1e-4, unbiased=False, add_eps=True, one_pass=False):
    out = torch.zeros_like(rewards)
    for gid in groups.unique():
        member = groups == gid
        r = rewards[member]
        std = ((r * r).mean() - r.mean() ** 2).clamp_min(0).sqrt() if one_pass else r.std(unbiased=unbiased)
        out[member] = (r - r.mean()) / (std + eps if add_eps else std)
    return out


def _adv_blocks(rewards, groups, eps=1e-4):
    return ref.group_advantages(rewards.view(groups.unique().numel(), -1), eps).flatten()


def _adv_group_by_group(rewards, groups, eps=1e-4):
    order = groups.argsort(stable=True)
    return answers.group_advantages(rewards[order], groups[order], eps)


ADV_MISTAKES = [
    Mistake(_adv_blocks, "that reads the groups as consecutive, equal blocks of the batch; a sample's group is "
                         "its id in groups, wherever it sits"),
    *[Mistake(lambda r, gr, eps=1e-4, unbiased=unbiased: (r - r.mean()) / (r.std(unbiased=unbiased) + eps),
              "that normalises over the whole batch at once; each group is its own baseline")
      for unbiased in (False, True)],  # r.std() is torch's unbiased one
    Mistake(lambda r, gr, eps=1e-4: _adv_per_group(r, gr, eps, unbiased=True),
            "that divides by the unbiased standard deviation (torch.std's default); use the population one"),
    Mistake(lambda r, gr, eps=1e-4: _adv_per_group(r, gr, eps, add_eps=False),
            "a group of equal rewards (or of one sample) gives 0/0: add eps to the standard deviation"),
    Mistake(lambda r, gr, eps=1e-4: _adv_per_group(r, gr, eps, one_pass=True),
            "the variance came from mean(r^2) - mean(r)^2: for rewards close together that difference of two nearly "
            "equal numbers loses most of its digits in float32; average the squared deviations from the mean instead"),
    Mistake(_adv_group_by_group, "the advantages come back group by group (in the order of the sorted group ids), "
                                 "not at their samples' places: advantage i must belong to rewards[i]"),
    Mistake(lambda r, gr, eps=1e-4: answers.group_advantages(r, gr), "that ignores the eps argument and always "
            "uses 1e-4, its default: the caller chooses eps"),
]


@chapter.exercise("11.2", reference=answers.group_advantages, hints=(
    "GRPO has no value network: the other samples drawn for the same class are the baseline. Which samples "
    "share a baseline is said by groups, not by where they sit in the batch",
    "for each distinct id (torch.unique, or a loop over groups.unique()), standardise the rewards of that "
    "group's samples: minus their mean, divided by their population standard deviation plus eps, and write the "
    "results back at those samples' places",
    "out = torch.zeros_like(rewards); for gid in groups.unique(): m = groups == gid; r = rewards[m]; "
    "out[m] = (r - r.mean()) / (r.std(unbiased=False) + eps); return out",
))
def group_advantages(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _adv_cases(), mistakes=ADV_MISTAKES, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# 11.3 the GRPO loss: clipped ratio and k3 KL penalty


def _loss_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(113)
    old = -3 * torch.rand(4, 4, generator=g)
    yield Case("4 sequences of 4 tokens, ratios far from 1",
               (old + torch.randn(4, 4, generator=g), old, old + torch.randn(4, 4, generator=g),
                torch.tensor([1.0, -1.0, 2.0, -0.5]), 0.2, 0.05))
    old = -3 * torch.rand(3, 6, generator=g)
    yield Case("3 sequences of 6 tokens, ratios near 1",
               (old + 0.1 * torch.randn(3, 6, generator=g), old, old + 0.5 * torch.randn(3, 6, generator=g),
                torch.randn(3, generator=g), 0.2, 0.05))
    yield Case("the first inner step (logp equal to logp_old), kl_coef 0.1",
               (old.clone(), old, old + 0.5 * torch.randn(3, 6, generator=g), torch.randn(3, generator=g), 0.2, 0.1))
    r = torch.tensor([[0.5, 0.9, 1.1, 1.5]]).log()
    yield Case("ratios 0.5, 0.9, 1.1, 1.5 with A = +1 and -1, clip 0.3, kl_coef 0",
               (torch.cat([r, r]), torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([1.0, -1.0]), 0.3, 0.0))
    yield Case("the policy equal to the reference (KL 0), clip 0.1, kl_coef 1",
               (old + 0.3, old, old + 0.3, torch.randn(3, generator=g), 0.1, 1.0))


def _k3(logp, logp_ref):
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def _loss_with(surrogate=None, kl=_k3, sign=1.0, kl_sign=1.0, reduce=torch.mean, kl_to_old=False):
    """A GRPO loss with one piece swapped for a plausible wrong one."""

    def loss(logp, logp_old, logp_ref, adv, clip, kl_coef):
        r = torch.exp(logp - logp_old)
        a = adv[:, None]
        j = surrogate(r, a, clip) if surrogate else torch.minimum(r * a, r.clamp(1 - clip, 1 + clip) * a)
        k = kl(logp, logp_old if kl_to_old else logp_ref)
        k_mean = reduce(k)
        return sign * (-reduce(j) + kl_sign * kl_coef * k_mean), k_mean.detach()

    return loss


def _loss_tokens_broadcast(logp, logp_old, logp_ref, adv, clip, kl_coef):
    r, a = torch.exp(logp - logp_old), adv[None, :]
    kl = _k3(logp, logp_ref).mean()
    return -torch.minimum(r * a, r.clamp(1 - clip, 1 + clip) * a).mean() + kl_coef * kl, kl.detach()


LOSS_MISTAKES = [
    Mistake(_loss_with(surrogate=lambda r, a, clip: torch.minimum(a / r, (1 / r).clamp(1 - clip, 1 + clip) * a)),
            "the ratio is inverted: it is pi / pi_old = exp(logp - logp_old), the new policy over the one that "
            "sampled"),
    Mistake(_loss_with(surrogate=lambda r, a, clip: r.clamp(1 - clip, 1 + clip) * a),
            "that is the clipped term alone: without the minimum with the unclipped term, a ratio that moved the "
            "wrong way is clipped too and its gradient lost"),
    Mistake(_loss_with(surrogate=lambda r, a, clip: torch.maximum(r * a, r.clamp(1 - clip, 1 + clip) * a)),
            "that takes the maximum: the objective is the pessimistic (smaller) of the two terms"),
    Mistake(_loss_with(surrogate=lambda r, a, clip: r * a),
            "that is the unclipped term alone: either there is no clipping (one batch could move the policy "
            "arbitrarily far from the one that sampled) or the minimum was taken between the two means, not per token"),
    Mistake(_loss_tokens_broadcast, "the advantages were broadcast along the tokens; each sequence's advantage "
                                    "is shared by the tokens of its own row"),
    Mistake(_loss_with(kl=lambda lp, lr: lp - lr), "that KL term is the k1 estimate log p - log p_ref: it averages "
                                                   "to the KL but is negative for many tokens, and noisy"),
    Mistake(_loss_with(kl=lambda lp, lr: _k3(lr, lp)), "the KL's log-ratio is reversed: k3 is exp(d) - d - 1 with "
                                                       "d = log p_ref - log p"),
    Mistake(_loss_with(kl_to_old=True), "the KL is measured to the old policy; the penalty holds the policy near "
                                        "the frozen reference"),
    Mistake(_loss_with(sign=-1.0), "that is the objective to maximise; an optimizer minimises, so the loss is its "
                                   "negative"),
    Mistake(_loss_with(kl_sign=-1.0), "the KL penalty is subtracted: it must make the loss larger the further the "
                                      "policy strays"),
    Mistake(_loss_with(reduce=lambda x: x.sum(1).mean()), "that sums over the tokens; the loss is the mean over "
                                                          "tokens and sequences"),
    Mistake(lambda logp, logp_old, logp_ref, adv, clip, kl_coef: grpo_objective(logp, logp_old, logp_ref, adv, 0.2,
                                                                                 kl_coef),
            "that ignores the clip argument and clips at a fixed 0.2"),
    Mistake(lambda logp, logp_old, logp_ref, adv, clip, kl_coef: grpo_objective(logp.detach(), logp_old, logp_ref,
                                                                                 adv, clip, kl_coef),
            "logp was detached (or the loss computed under torch.no_grad()): the loss trains the policy through the "
            "gradient it sends back to logp"),
]


@chapter.exercise("11.3", reference=grpo_objective, hints=(
    "three pieces: a per-token ratio of new to old probability, PPO's clipped objective with each sequence's "
    "advantage, and a never-negative KL estimate to the reference; an optimizer minimises, so which sign does "
    "each piece get?",
    "r = exp(logp - logp_old); J = min(r * A, clamp(r, 1 - clip, 1 + clip) * A) with A = advantages[:, None]; "
    "with d = logp_ref - logp, k3 = exp(d) - d - 1; loss = -mean(J) + kl_coef * mean(k3)",
    "r = torch.exp(logp - logp_old); a = advantages[:, None]; d = logp_ref - logp; kl = (torch.exp(d) - d - 1).mean(); "
    "return -torch.minimum(r * a, r.clamp(1 - clip, 1 + clip) * a).mean() + kl_coef * kl, kl.detach()",
))
def grpo_loss(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _loss_cases(), grad_wrt=(0,), mistakes=LOSS_MISTAKES, off_cpu=True)


# --------------------------------------------------------------------------------------------------------
# 11.4 the rollout: sample, score, advantages, fixed log-probabilities

def _toy_reward(maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float: a reward of token maps that the tiny models of the checks can earn (the mean token id over
    the largest one, plus a bonus for tokens equal to the class)."""
    return maps.float().mean((1, 2)) / 11 + (maps == classes[:, None, None]).float().mean((1, 2))


class _Reward:
    """:func:`_toy_reward` as the argument a rollout gets: a function of (maps, classes) that a message names."""

    def __call__(self, maps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return _toy_reward(maps, classes)

    def __repr__(self) -> str:
        return "reward_fn(maps, classes)"


class _Generator(torch.Generator):
    """A CPU generator that a message names by its seed."""

    def __repr__(self) -> str:
        return f"Generator(seed {self.initial_seed()})"


def _named(name: str, *args) -> Case:
    """A case of a check that runs the learner's function inside a wrapper (11.4 to 11.6): ``args`` are the wrapper's
    (a seed, sizes...); the wrapper also gets the case's name, to name it when the learner's function, called with its
    real arguments through :func:`call`, raises or returns something of the wrong kind."""
    return Case(name, args, {"case": name})


def _rolled(fn: Callable) -> Callable:
    """``fn`` as a rollout (policy, reference, reward_fn, group_size, generator) run on fresh tiny models."""

    def run(seed: int, group_size: int, train: bool, case: str = ""):
        policy, reference = _tiny_model(seed, dropout=0.3).train(train), _tiny_model(seed + 50)
        out = call(fn, policy, reference, _Reward(), group_size, _Generator().manual_seed(seed), where=case)
        if not isinstance(out, dict):
            raise CheckFailure(f"the rollout on input {case!r} should be a dict with keys {', '.join(ROLLOUT_KEYS)}, "
                               f"got {type(out).__name__}")
        return {**{k: out[k] for k in ROLLOUT_KEYS if k in out}, "policy in train mode after": policy.training}

    return run


def _rollout_cases() -> Iterator[Case]:
    yield _named("tiny policy in eval mode, G = 4", 0, 4, False)
    yield _named("tiny policy with dropout, arriving in train mode, G = 3", 1, 3, True)


def _rollout_with(sample_in_train=False, keep_eval=False, ref_model=True, grouped=True, layout="interleave",
                  score_in_train=False):
    """A rollout with one step done a plausible wrong way."""

    def rollout(policy, reference, reward_fn, group_size, generator):
        n = policy.config.n_classes
        classes = (torch.arange(n).repeat_interleave(group_size) if layout == "interleave"
                   else torch.arange(n).repeat(group_size))
        was = policy.training
        if not sample_in_train:
            policy.eval()
        with torch.no_grad():
            maps = raster.generate_tokens(policy, classes, policy.config.grid, generator=generator)
            rewards = reward_fn(maps, classes)
            adv = answers.group_advantages(rewards, classes if grouped else torch.zeros_like(classes))
            if score_in_train:
                policy.train(was)
            old = ref_token_log_probs(policy, maps, classes)
            logp_ref = ref_token_log_probs(reference if ref_model else policy, maps, classes)
        if not keep_eval:
            policy.train(was)
        return {"classes": classes, "maps": maps, "rewards": rewards, "advantages": adv, "logp_old": old,
                "logp_ref": logp_ref}

    return rollout


ROLLOUT_MISTAKES = [
    Mistake(_rolled(_rollout_with(layout="repeat")), "the classes are laid out 0, 1, ..., 0, 1, ...: the spec "
                                                     "puts each class's group_size samples next to each other"),
    Mistake(_rolled(_rollout_with(sample_in_train=True)), "the policy sampled and scored in train mode, with "
                                                          "dropout on: rollouts use the policy as it will be used"),
    Mistake(_rolled(_rollout_with(score_in_train=True)), "the policy sampled in eval mode but scored logp_old in "
                                                         "the mode it came in, with dropout on: the ratio needs the "
                                                         "probabilities of the policy as it sampled"),
    Mistake(_rolled(_rollout_with(keep_eval=True)), "the policy is left in eval mode: give it back in the mode "
                                                    "it came in"),
    Mistake(_rolled(_rollout_with(ref_model=False)), "logp_ref was scored by the policy (the KL would start at "
                                                     "0 every step): it comes from the frozen reference model"),
    Mistake(_rolled(_rollout_with(grouped=False)), "the advantages are standardised over the whole batch; the "
                                                   "samples of one class are a group"),
]


@chapter.exercise("11.4", reference=library_rollout, hints=(
    "a rollout is everything computed once per group, before any update: which samples, with which model and "
    "mode, which numbers need gradients later and which must stay fixed?",
    "classes = arange(n_classes).repeat_interleave(group_size); in eval mode and under torch.no_grad(), one "
    "raster.generate_tokens(policy, classes, policy.config.grid, generator=generator), then the reward, your "
    "advantages (adv_fn, 11.2) with the classes as the groups, and the log-probabilities (logp_fn, 11.1) under the "
    "policy and the reference",
    "was = policy.training; policy.eval(); with torch.no_grad(): classes = torch.arange(policy.config.n_classes, "
    "device=next(policy.parameters()).device).repeat_interleave(group_size); maps = raster.generate_tokens(policy, "
    "classes, policy.config.grid, generator=generator); "
    "rewards = reward_fn(maps, classes); advantages = adv_fn(rewards, classes); logp_old = "
    "logp_fn(policy, maps, classes); logp_ref = logp_fn(reference, maps, classes); "
    "policy.train(was); return the six in a dict",
))
def grpo_rollout(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(_rolled(fn), _rolled(ref_fn), _rollout_cases(), mistakes=ROLLOUT_MISTAKES)
    out = call(fn, _tiny_model(2), _tiny_model(3), _Reward(), 2, _Generator().manual_seed(2),
               where="tiny policy 2, G = 2")
    for key in ("advantages", "logp_old", "logp_ref"):
        if out[key].requires_grad:
            raise CheckFailure(f"{key} carries a gradient on input 'tiny policy 2, G = 2': the rollout's numbers "
                               "are constants for the updates (compute them under torch.no_grad())")
    made_in_inference = [key for key in ROLLOUT_KEYS if out[key].is_inference()]
    if made_in_inference:
        raise CheckFailure(f"{', '.join(made_in_inference)} were made under torch.inference_mode() on input 'tiny "
                           "policy 2, G = 2': the update's backward pass cannot save such tensors (it raises "
                           "'Inference tensors cannot be saved for backward'), so a rollout needs torch.no_grad()")


# --------------------------------------------------------------------------------------------------------
# 11.5 the updates on one rollout


def _updated(fn: Callable) -> Callable:
    """``fn`` as an update (policy, optimizer, rollout, clip, kl_coef, inner_steps) of a fresh tiny policy with SGD
    on a rollout of the reference: the losses it returns and the weights it leaves."""

    def run(seed: int, ref_scale: float, lr: float, clip: float, kl_coef: float, inner_steps: int, case: str = ""):
        policy, reference = _tiny_model(seed), _tiny_model(seed + 50, scale=ref_scale)
        rollout = library_rollout(policy, reference, _toy_reward, 4, torch.Generator().manual_seed(seed))
        optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
        kept = clone_args((rollout,))
        losses = call(fn, policy, optimizer, rollout, clip, kl_coef, inner_steps, where=case)
        check_unchanged(("rollout",), kept, (rollout,), case,
                        why="the rollout's numbers stay fixed for every inner step and for the caller's logs")
        if not isinstance(losses, (list, tuple)):
            raise CheckFailure(f"the update on input {case!r} should return a list of the inner steps' losses, got "
                               f"{type(losses).__name__}")
        wrong = next((x for x in losses if not isinstance(x, float)), None)
        if wrong is not None:
            raise CheckFailure(_not_a_loss(wrong, case))
        return {"losses": [float(x) for x in losses],
                "weights after the update": torch.cat([p.detach().flatten() for p in policy.parameters()])}

    return run


def _not_a_loss(item, case: str) -> str:
    """The failure for ``item``, something other than a Python float in the list of losses an update returned."""
    kind = type(item).__name__
    if item is None or isinstance(item, (torch.Tensor, tuple, list)):
        what = describe(item)
    elif isinstance(item, dict):
        what = f"a dict with keys {list(item)}"
    else:
        what = f"{describe(item)} ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"
    parts = list(item.values()) if isinstance(item, dict) else list(item) if isinstance(item, (tuple, list)) else []
    several = ", several values where one step's loss goes" if parts else ""
    graph = ": a tensor kept in the list keeps its step's graph alive" if any(
        isinstance(p, torch.Tensor) and p.requires_grad for p in [item, *parts]) else ""
    return (f"the update on input {case!r} returned {what} among its losses{several}; return Python floats, one per "
            f"inner step, each that step's loss (loss.item()){graph}")


def _update_cases() -> Iterator[Case]:
    yield _named("tiny policy, SGD lr 1, clip 0.2, kl_coef 0.05, 2 inner steps", 0, 1.0, 1.0, 0.2, 0.05, 2)
    yield _named("a reference far from the policy, SGD lr 1, clip 0.1, kl_coef 2, 3 inner steps",
                 1, 5.0, 1.0, 0.1, 2.0, 3)


def _update_with(old_each_step=False, zero_grad=True, clip_norm=True, old_is_ref=False, keep_kl=False):
    """An update loop with one step done a plausible wrong way."""

    def update(policy, optimizer, rollout, clip=0.2, kl_coef=0.05, inner_steps=2):
        losses = []
        for _ in range(inner_steps):
            logp = ref_token_log_probs(policy, rollout["maps"], rollout["classes"])
            old = logp.detach() if old_each_step else rollout["logp_ref" if old_is_ref else "logp_old"]
            loss, kl = grpo_objective(logp, old, rollout["logp_ref"], rollout["advantages"], clip, kl_coef)
            if zero_grad:
                optimizer.zero_grad()
            loss.backward()
            if clip_norm:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            losses.append(float((kl if keep_kl else loss).detach()))
        return losses

    return update


UPDATE_MISTAKES = [
    Mistake(_updated(_update_with(old_each_step=True)),
            "the ratio is taken against this very step's policy (logp.detach()), so it is always 1 and never "
            "clipped: logp_old is the policy that sampled, fixed for all inner steps"),
    Mistake(_updated(_update_with(old_is_ref=True)),
            "the ratio is taken against the reference model; PPO's ratio is to the policy that sampled (logp_old)"),
    Mistake(_updated(_update_with(zero_grad=False)),
            "the gradients of earlier inner steps accumulate into later ones"),
    Mistake(_updated(_update_with(clip_norm=False)), "the gradient norm was not clipped to 1 before the step"),
    Mistake(_updated(_update_with(keep_kl=True)),
            "those are the KL estimates (the second value grpo_loss returns), not the losses: the list keeps each "
            "inner step's loss"),
]


@chapter.exercise("11.5", reference=answers.grpo_update, hints=(
    "every inner step asks the current policy again (with gradients) how likely the sampled maps are, and "
    "compares with numbers that stay fixed for the whole rollout; what changes between inner steps, and what "
    "must not carry over?",
    "for each inner step: logp = logp_fn(policy, maps, classes); loss, kl = loss_fn(logp, "
    "rollout['logp_old'], rollout['logp_ref'], rollout['advantages'], clip, kl_coef); zero the gradients, "
    "backward, clip the norm to 1, step; keep float(loss.detach())",
    "losses = []; for _ in range(inner_steps): logp = logp_fn(policy, rollout['maps'], rollout['classes']); "
    "loss, _ = loss_fn(logp, rollout['logp_old'], rollout['logp_ref'], rollout['advantages'], clip, kl_coef); "
    "optimizer.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0); "
    "optimizer.step(); losses.append(float(loss.detach())); return losses",
))
def grpo_update(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(_updated(fn), _updated(ref_fn), _update_cases(), mistakes=UPDATE_MISTAKES)


# --------------------------------------------------------------------------------------------------------
# 11.6 the CCA loss from the two models


def _cca_run(fn: Callable) -> Callable:
    """``fn`` as a CCA loss (policy, reference, maps, classes, negatives, beta, lam) on fresh tiny models: the loss,
    the log-ratios, and the gradient of the loss to the policy's weights."""

    def run(seed: int, ref_scale: float, batch: int, beta: float, lam: float, case: str = ""):
        g = torch.Generator().manual_seed(seed + 116)
        policy, reference = _tiny_model(seed), _tiny_model(seed + 50, scale=ref_scale)
        maps, classes = torch.randint(0, 12, (batch, 3, 4), generator=g), torch.randint(0, 5, (batch,), generator=g)
        negatives = (classes + torch.randint(1, 5, (batch,), generator=g)) % 5
        kept = clone_args((maps, classes, negatives))
        out = call(fn, policy, reference, maps, classes, negatives, beta, lam, where=case)
        check_unchanged(("maps", "classes", "negatives"), kept, (maps, classes, negatives), case)
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            raise CheckFailure(f"cca_loss should return (loss, logratio_pos, logratio_neg); on input {case!r} it "
                               f"returned {describe(out)}")
        loss, pos, neg = out
        _check_cca_outputs(loss, pos, neg, batch, case)
        if not loss.requires_grad:
            raise CheckFailure(f"no gradient reaches the policy's weights through the loss on input {case!r} (computed "
                               "under torch.no_grad(), or detached?): CCA trains through it")
        grads = torch.autograd.grad(loss, list(policy.parameters()), allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if gr is None else gr).flatten()
                          for p, gr in zip(policy.parameters(), grads)])
        return {"loss": loss.detach(), "logratio_pos": pos.detach(), "logratio_neg": neg.detach(),
                "gradient of the loss to the policy's weights": flat}

    return run


def _check_cca_outputs(loss, pos, neg, batch: int, case: str) -> None:
    """Fail, in one line, when what a CCA loss returned on ``case`` (``batch`` maps) is not a 0-d loss tensor and two
    ``(batch,)`` tensors of log-ratios."""
    if not isinstance(loss, torch.Tensor):
        raise CheckFailure(f"the loss on input {case!r} is {describe(loss)}; it should be a 0-d tensor that carries "
                           "the gradient back to the policy's weights (CCA trains through it)")
    if loss.ndim != 0:
        raise CheckFailure(f"the loss on input {case!r} is a {describe(loss)}; it should be one number, a 0-d tensor: "
                           "each pair's term averaged over the batch (mean over the maps)")
    for name, ratio in (("logratio_pos", pos), ("logratio_neg", neg)):
        if not isinstance(ratio, torch.Tensor) or tuple(ratio.shape) != (batch,):
            raise CheckFailure(f"{name} on input {case!r} is {describe(ratio)}; it should be a ({batch},) tensor, one "
                               "log-ratio (policy minus reference, summed over the tokens) per map")


def _cca_cases() -> Iterator[Case]:
    yield _named("tiny models 0, 6 maps, beta 0.5, lam 1", 0, 1.0, 6, 0.5, 1.0)
    yield _named("tiny models 1, 4 maps, beta 0.2, lam 3", 1, 1.0, 4, 0.2, 3.0)
    yield _named("a reference far from the policy, 5 maps, beta 40 (scores in the hundreds)", 2, 3.0, 5, 40.0, 1.0)


def _cca_with(per_token=False, neg_sign=-1.0, lam_used=True, stable=True, reversed_ratio=False, use_negatives=True):
    """A CCA loss with one step done a plausible wrong way."""
    F = torch.nn.functional

    def loss_fn(policy, reference, maps, classes, negatives, beta=0.02, lam=1.0):
        both_maps = torch.cat([maps, maps])
        both_classes = torch.cat([classes, negatives if use_negatives else classes])
        reduce = (lambda x: x.mean(1)) if per_token else (lambda x: x.sum(1))
        with torch.no_grad():
            ref_lp = reduce(ref_token_log_probs(reference, both_maps, both_classes))
        ratio = reduce(ref_token_log_probs(policy, both_maps, both_classes)) - ref_lp
        pos, neg = (-ratio if reversed_ratio else ratio).chunk(2)
        logsig = F.logsigmoid if stable else (lambda x: torch.log(torch.sigmoid(x)))
        loss = -logsig(beta * pos).mean() - (lam if lam_used else 1.0) * logsig(neg_sign * beta * neg).mean()
        return loss, pos, neg

    return loss_fn


CCA_MISTAKES = [
    Mistake(_cca_run(_cca_with(use_negatives=False)),
            "the negative pairs were scored with the maps' own classes: pair each map with its wrong class"),
    Mistake(_cca_run(_cca_with(per_token=True)), "those log-ratios are per token (a mean); a pair's log-ratio is "
                                                 "that of the whole map, the sum over its tokens"),
    Mistake(_cca_run(_cca_with(reversed_ratio=True)), "the log-ratio is reversed: it is log p_policy - log p_ref"),
    Mistake(_cca_run(_cca_with(neg_sign=1.0)), "the negative pairs' term raises their log-ratio: it needs "
                                               "sigmoid(-beta * neg)"),
    Mistake(_cca_run(_cca_with(lam_used=False)), "lam is missing: it weighs the negative pairs' term"),
    Mistake(_cca_run(_cca_with(stable=False)), "log(sigmoid(x)) overflows to -inf for large negative x: use "
                                               "torch.nn.functional.logsigmoid"),
]


@chapter.exercise("11.6", reference=cca_batch_loss, hints=(
    "CCA is a logistic classification of matched (map, its class) against mismatched (map, a wrong class) "
    "pairs, scored by how much more likely the policy finds the pair than the frozen reference does",
    "score both kinds of pair (torch.cat the maps twice, with classes then negatives, for one pass per model); "
    "each log-ratio is the sum over the map's tokens of policy minus reference log-probabilities (the "
    "reference under torch.no_grad()); loss = mean(-logsigmoid(beta * pos)) + lam * mean(-logsigmoid(-beta * "
    "neg))",
    "F = torch.nn.functional; m, c = torch.cat([maps, maps]), torch.cat([classes, negatives]); "
    "with torch.no_grad(): ref = "
    "logp_fn(reference, m, c).sum(1); pos, neg = (logp_fn(policy, m, c).sum(1) - ref).chunk(2); "
    "return -F.logsigmoid(beta * pos).mean() - lam * F.logsigmoid(-beta * neg).mean(), pos, neg",
))
def cca_loss(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(_cca_run(fn), _cca_run(ref_fn), _cca_cases(), mistakes=CCA_MISTAKES)
