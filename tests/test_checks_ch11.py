"""Chapter 11 checks: each accepts the reference, reports a stub as not attempted, and rejects plausible
wrong answers (probabilities for log-probabilities, an off-by-one read of the logits, log-probabilities without
gradients, a 0/1 reward, an unbiased or batch-wide normalisation, a fixed eps or clip, a clip without the minimum,
the k1 or reversed KL, a flipped CCA sign...)."""

import torch
import torch.nn.functional as F

from ar_course.align import functional as A
from ar_course.align.model import token_log_probs
from ar_course.checks import ch11
from ar_course.checks.reference import ch11 as answers
from checks_helpers import assert_fails, assert_not_attempted, assert_passes, stub

# 11.1 ------------------------------------------------------------------------------------------------------


def logp_probabilities(model, maps, classes):
    return token_log_probs(model, maps, classes).exp()


def logp_no_class_shift(model, maps, classes):
    seq = maps.flatten(1)  # (B, L)
    logits, _ = model(seq[:, :-1], classes=classes)  # (B, L, V)
    logp = torch.log_softmax(logits[:, 1:], dim=-1)
    return torch.cat([logp.gather(-1, seq[:, 1:, None]).squeeze(-1), torch.zeros(seq.shape[0], 1)], 1)


def logp_ignores_class(model, maps, classes):
    return token_log_probs(model, maps, torch.full_like(classes, model.null_class))


def logp_summed(model, maps, classes):
    return token_log_probs(model, maps, classes).sum(-1)


def logp_without_grad(model, maps, classes):
    with torch.no_grad():  # fine for scoring, but GRPO and CCA backpropagate through these
        return token_log_probs(model, maps, classes)


def logp_detached_logits(model, maps, classes):
    seq = maps.flatten(1)  # (B, L)
    logits, _ = model(seq[:, :-1], classes=classes)
    return torch.log_softmax(logits.detach(), dim=-1).gather(-1, seq[..., None]).squeeze(-1)


def logp_detached_normaliser(model, maps, classes):
    seq = maps.flatten(1)  # (B, L)
    logits, _ = model(seq[:, :-1], classes=classes)
    picked = logits.gather(-1, seq[..., None]).squeeze(-1)
    return picked - logits.logsumexp(-1).detach()  # the right values, half the gradient


def test_11_1():
    check = ch11.token_log_probs
    assert_passes(check, token_log_probs)
    assert_not_attempted(check, stub)
    for wrong in (logp_probabilities, logp_no_class_shift, logp_ignores_class, logp_summed):
        assert_fails(check, wrong)
    assert_fails(check, logp_probabilities, contains="those are probabilities")
    assert_fails(check, logp_no_class_shift, contains="position t")
    assert_fails(check, logp_without_grad, contains="no gradient reaches the model")
    assert_fails(check, logp_detached_logits, contains="no gradient reaches the model")
    assert_fails(check, logp_detached_normaliser, contains="the gradient of")


# 11.2 ------------------------------------------------------------------------------------------------------


def reward_accuracy(images, classes, classifier):
    return (classifier(images).argmax(-1) == classes).float()


def reward_logit(images, classes, classifier):
    return classifier(images).gather(1, classes[:, None]).squeeze(1)


def reward_batch_softmax(images, classes, classifier):
    return torch.softmax(classifier(images), 0).gather(1, classes[:, None]).squeeze(1)


def reward_max_prob(images, classes, classifier):
    return torch.softmax(classifier(images), -1).max(-1).values


def test_11_2():
    check = ch11.class_reward
    assert_passes(check, answers.class_reward)
    assert_not_attempted(check, stub)
    for wrong in (reward_accuracy, reward_logit, reward_batch_softmax, reward_max_prob):
        assert_fails(check, wrong)
    assert_fails(check, reward_accuracy, contains="0 or 1")
    assert_fails(check, reward_batch_softmax, contains="over the batch")


# 11.3 ------------------------------------------------------------------------------------------------------


def adv_unbiased(rewards, eps=1e-4):
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + eps)


def adv_global(rewards, eps=1e-4):
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)


def adv_no_eps(rewards, eps=1e-4):
    return (rewards - rewards.mean(1, keepdim=True)) / rewards.std(1, keepdim=True, unbiased=False)


def adv_columns(rewards, eps=1e-4):
    return (rewards - rewards.mean(0, keepdim=True)) / (rewards.std(0, keepdim=True, unbiased=False) + eps)


def adv_fixed_eps(rewards, eps=1e-4):
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True, unbiased=False) + 1e-4)


def test_11_3():
    check = ch11.group_advantages
    assert_passes(check, A.group_advantages)
    assert_not_attempted(check, stub)
    for wrong in (adv_unbiased, adv_global, adv_no_eps, adv_columns, adv_fixed_eps):
        assert_fails(check, wrong)
    assert_fails(check, adv_unbiased, contains="unbiased")
    assert_fails(check, adv_global, contains="all groups at once")
    assert_fails(check, adv_no_eps, contains="0/0")
    assert_fails(check, adv_fixed_eps, contains="eps = 0.05")  # eps is an argument


# 11.4 ------------------------------------------------------------------------------------------------------


def surrogate_clip_only(logp, logp_old, adv, clip=0.2):
    return torch.exp(logp - logp_old).clamp(1 - clip, 1 + clip) * adv[:, None]


def surrogate_inverted_ratio(logp, logp_old, adv, clip=0.2):
    return A.clipped_surrogate(logp_old, logp, adv, clip)


def surrogate_clip_logp(logp, logp_old, adv, clip=0.2):
    d = (logp - logp_old).clamp(-clip, clip)
    r = torch.exp(logp - logp_old)
    return torch.minimum(r * adv[:, None], torch.exp(d) * adv[:, None])


def surrogate_detached(logp, logp_old, adv, clip=0.2):
    return A.clipped_surrogate(logp.detach(), logp_old, adv, clip)


def surrogate_fixed_clip(logp, logp_old, adv, clip=0.2):
    return A.clipped_surrogate(logp, logp_old, adv, 0.2)


def test_11_4():
    check = ch11.clipped_surrogate
    assert_passes(check, A.clipped_surrogate)
    assert_not_attempted(check, stub)
    for wrong in (surrogate_clip_only, surrogate_inverted_ratio, surrogate_clip_logp, surrogate_detached,
                  surrogate_fixed_clip):
        assert_fails(check, wrong)
    assert_fails(check, surrogate_clip_only, contains="clipped term alone")
    assert_fails(check, surrogate_fixed_clip, contains="clip 0.3")  # clip is an argument


# 11.5 ------------------------------------------------------------------------------------------------------


def kl_k1(logp, logp_ref):
    return logp - logp_ref


def kl_reversed(logp, logp_ref):
    d = logp - logp_ref
    return torch.exp(d) - d - 1


def kl_abs(logp, logp_ref):
    return (logp - logp_ref).abs()


def test_11_5():
    check = ch11.k3_kl
    assert_passes(check, A.k3_kl)
    assert_not_attempted(check, stub)
    for wrong in (kl_k1, kl_reversed, kl_abs):
        assert_fails(check, wrong)
    assert_fails(check, kl_k1, contains="k1")
    assert_fails(check, kl_reversed, contains="reversed")


# 11.6 ------------------------------------------------------------------------------------------------------


def cca_wrong_sign(pos, neg, beta=0.02, lam=1.0):
    return -F.logsigmoid(beta * pos).mean() - lam * F.logsigmoid(beta * neg).mean()


def cca_no_lam(pos, neg, beta=0.02, lam=1.0):
    return -F.logsigmoid(beta * pos).mean() - F.logsigmoid(-beta * neg).mean()


def cca_unstable(pos, neg, beta=0.02, lam=1.0):
    return -torch.log(torch.sigmoid(beta * pos)).mean() - lam * torch.log(torch.sigmoid(-beta * neg)).mean()


def cca_sum(pos, neg, beta=0.02, lam=1.0):
    return -F.logsigmoid(beta * pos).sum() - lam * F.logsigmoid(-beta * neg).sum()


def test_11_6():
    check = ch11.cca_loss
    assert_passes(check, A.cca_loss)
    assert_not_attempted(check, stub)
    for wrong in (cca_wrong_sign, cca_no_lam, cca_unstable, cca_sum):
        assert_fails(check, wrong)
    assert_fails(check, cca_wrong_sign, contains="sigmoid(-beta * neg)")
    assert_fails(check, cca_no_lam, contains="lam is missing")
