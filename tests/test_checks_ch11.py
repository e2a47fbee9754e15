"""Chapter 11 checks: each accepts the reference, reports a stub as not attempted, and rejects plausible wrong answers
(probabilities for log-probabilities, an off-by-one read of the logits, log-probabilities without gradients or from the
log of a softmax, a model left in eval mode, groups read as blocks, an unbiased, one-pass or batch-wide normalisation, a
fixed eps or clip, a clip without the minimum or with it after the mean, the k1 or reversed KL, the objective for the
loss, a rollout sampled or scored in train mode or scored by the wrong model, a ratio to the current step's policy,
accumulated gradients, losses kept as tensors, a rollout or negatives changed in place, per-token CCA log-ratios, a
flipped CCA sign...)."""

import torch
import torch.nn.functional as F

from ar_course import raster
from ar_course.align import functional as A
from ar_course.align.cca import cca_batch_loss
from ar_course.align.grpo import grpo_objective, grpo_rollout as library_rollout
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


def logp_log_of_softmax(model, maps, classes):
    seq = maps.flatten(1)  # (B, L)
    logits, _ = model(seq[:, :-1], classes=classes)
    return torch.softmax(logits, dim=-1).log().gather(-1, seq[..., None]).squeeze(-1)  # -inf for unlikely tokens


def logp_switches_to_eval(model, maps, classes):
    model.eval()  # the caller's training loop loses its mode
    return token_log_probs(model, maps, classes)


def logp_negated_cross_entropy(model, maps, classes):  # the same numbers through cross_entropy: right
    seq = maps.flatten(1)  # (B, L)
    logits, _ = model(seq[:, :-1], classes=classes)
    return -F.cross_entropy(logits.transpose(1, 2), seq, reduction="none")


def logp_softmax_over_positions(model, maps, classes):  # dim=1 of (B, L, V): the positions
    seq = maps.flatten(1)  # (B, L)
    logits, _ = model(seq[:, :-1], classes=classes)
    return torch.log_softmax(logits, dim=1).gather(-1, seq[..., None]).squeeze(-1)


def test_11_1():
    check = ch11.token_log_probs
    assert_passes(check, token_log_probs)
    assert_passes(check, logp_negated_cross_entropy)
    assert_not_attempted(check, stub)
    for wrong in (logp_probabilities, logp_no_class_shift, logp_ignores_class, logp_summed):
        assert_fails(check, wrong)
    assert_fails(check, logp_probabilities, contains="those are probabilities")
    assert_fails(check, logp_no_class_shift, contains="position t")
    assert_fails(check, logp_ignores_class, contains="scored with the null class")
    assert_fails(check, logp_softmax_over_positions, contains="ran over the positions")
    assert_fails(check, logp_without_grad, contains="no gradient reaches the model")
    assert_fails(check, logp_detached_logits, contains="no gradient reaches the model")
    assert_fails(check, logp_detached_normaliser, contains="the normaliser (the logsumexp of the logits) was detached")
    assert_fails(check, logp_log_of_softmax, contains="log of a softmax")
    assert_fails(check, logp_switches_to_eval, contains="switched the model to eval mode")


# 11.2 ------------------------------------------------------------------------------------------------------


def adv_blocks(rewards, groups, eps=1e-4):
    return A.group_advantages(rewards.view(groups.unique().numel(), -1), eps).flatten()


def adv_batch(rewards, groups, eps=1e-4):
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)


def adv_batch_default_std(rewards, groups, eps=1e-4):  # the first thing one writes: torch's unbiased std
    return (rewards - rewards.mean()) / (rewards.std() + eps)


def loss_ratio_inverted(logp, logp_old, logp_ref, adv, clip, kl_coef):  # pi_old / pi
    r, a = torch.exp(logp_old - logp), adv[:, None]
    return -torch.minimum(r * a, r.clamp(1 - clip, 1 + clip) * a).mean() + kl_coef * _k3(logp, logp_ref).mean(), \
        _k3(logp, logp_ref).mean().detach()


def test_11_2_and_11_3_name_the_first_forms_a_learner_writes():
    assert_fails(ch11.group_advantages, adv_batch_default_std, contains="normalises over the whole batch at once")
    assert_fails(ch11.grpo_loss, loss_ratio_inverted, contains="the ratio is inverted")


def adv_loop(rewards, groups, eps=1e-4, unbiased=False, add_eps=True):
    out = torch.zeros_like(rewards)
    for gid in groups.unique():
        r = rewards[groups == gid]
        std = r.std(unbiased=unbiased)
        out[groups == gid] = (r - r.mean()) / (std + eps if add_eps else std)
    return out


def adv_unbiased(rewards, groups, eps=1e-4):
    return adv_loop(rewards, groups, eps, unbiased=True)


def adv_no_eps(rewards, groups, eps=1e-4):
    return adv_loop(rewards, groups, eps, add_eps=False)


def adv_fixed_eps(rewards, groups, eps=1e-4):
    return adv_loop(rewards, groups, 1e-4)


def adv_float32(rewards, groups, eps=1e-4):
    return adv_loop(rewards.float(), groups, eps)


def adv_one_pass(rewards, groups, eps=1e-4):
    out = torch.zeros_like(rewards)
    for gid in groups.unique():
        r = rewards[groups == gid]
        std = ((r * r).mean() - r.mean() ** 2).sqrt()  # cancels catastrophically for rewards close together
        out[groups == gid] = (r - r.mean()) / (std + eps)
    return out


def adv_sorted(rewards, groups, eps=1e-4):  # right values, in the order of the sorted groups
    order = groups.argsort(stable=True)
    return adv_loop(rewards[order], groups[order], eps)


def adv_concatenated(rewards, groups, eps=1e-4):  # each group's advantages, concatenated
    return torch.cat([adv_loop(rewards[groups == g], groups[groups == g], eps) for g in groups.unique()])


def test_11_2():
    check = ch11.group_advantages
    assert_passes(check, answers.group_advantages)
    assert_passes(check, adv_loop)
    assert_not_attempted(check, stub)
    for wrong in (adv_blocks, adv_batch, adv_unbiased, adv_no_eps, adv_fixed_eps, adv_float32, adv_sorted):
        assert_fails(check, wrong)
    assert_fails(check, adv_blocks, contains="consecutive, equal blocks")
    assert_fails(check, adv_batch, contains="whole batch")
    assert_fails(check, adv_unbiased, contains="unbiased")
    assert_fails(check, adv_no_eps, contains="0/0")
    assert_fails(check, adv_fixed_eps, contains="ignores the eps argument")  # eps is an argument
    assert_fails(check, adv_sorted, contains="group by group")
    assert_fails(check, adv_concatenated, contains="group by group")
    assert_fails(check, adv_float32, contains="dtype")
    assert_fails(check, adv_one_pass, contains="mean(r^2) - mean(r)^2")


# 11.3 ------------------------------------------------------------------------------------------------------


def _k3(logp, logp_ref):
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def loss_parts(logp, logp_old, logp_ref, adv, clip, a_index=(slice(None), None)):
    r = torch.exp(logp - logp_old)
    a = adv[a_index]
    return r, a, _k3(logp, logp_ref).mean()


def loss_clip_only(logp, logp_old, logp_ref, adv, clip, kl_coef):
    r, a, kl = loss_parts(logp, logp_old, logp_ref, adv, clip)
    return -(r.clamp(1 - clip, 1 + clip) * a).mean() + kl_coef * kl, kl.detach()


def loss_objective(logp, logp_old, logp_ref, adv, clip, kl_coef):
    loss, kl = grpo_objective(logp, logp_old, logp_ref, adv, clip, kl_coef)
    return -loss, kl


def loss_k1(logp, logp_old, logp_ref, adv, clip, kl_coef):
    r, a, _ = loss_parts(logp, logp_old, logp_ref, adv, clip)
    kl = (logp - logp_ref).mean()
    return -torch.minimum(r * a, r.clamp(1 - clip, 1 + clip) * a).mean() + kl_coef * kl, kl.detach()


def loss_kl_to_old(logp, logp_old, logp_ref, adv, clip, kl_coef):
    return grpo_objective(logp, logp_old, logp_old, adv, clip, kl_coef)


def loss_tokens_broadcast(logp, logp_old, logp_ref, adv, clip, kl_coef):
    r, a, kl = loss_parts(logp, logp_old, logp_ref, adv, clip, a_index=(None, slice(None)))
    return -torch.minimum(r * a, r.clamp(1 - clip, 1 + clip) * a).mean() + kl_coef * kl, kl.detach()


def loss_token_sum(logp, logp_old, logp_ref, adv, clip, kl_coef):
    r, a, _ = loss_parts(logp, logp_old, logp_ref, adv, clip)
    j, k = torch.minimum(r * a, r.clamp(1 - clip, 1 + clip) * a), _k3(logp, logp_ref)
    return -j.sum(1).mean() + kl_coef * k.sum(1).mean(), k.sum(1).mean().detach()


def loss_fixed_clip(logp, logp_old, logp_ref, adv, clip, kl_coef):
    return grpo_objective(logp, logp_old, logp_ref, adv, 0.2, kl_coef)


def loss_detached(logp, logp_old, logp_ref, adv, clip, kl_coef):
    return grpo_objective(logp.detach(), logp_old, logp_ref, adv, clip, kl_coef)


def loss_min_of_means(logp, logp_old, logp_ref, adv, clip, kl_coef):
    r, a, kl = loss_parts(logp, logp_old, logp_ref, adv, clip)
    j = torch.minimum((r * a).mean(), (r.clamp(1 - clip, 1 + clip) * a).mean())  # the minimum after the mean
    return -j + kl_coef * kl, kl.detach()


def loss_sign_cases(logp, logp_old, logp_ref, adv, clip, kl_coef):  # the minimum written by the advantage's sign
    r, a, kl = loss_parts(logp, logp_old, logp_ref, adv, clip)
    j = torch.where(a > 0, r.clamp(max=1 + clip), r.clamp(min=1 - clip)) * a
    return -j.mean() + kl_coef * kl, kl.detach()


def test_11_3():
    check = ch11.grpo_loss
    assert_passes(check, grpo_objective)
    assert_passes(check, loss_sign_cases)
    assert_not_attempted(check, stub)
    for wrong in (loss_clip_only, loss_objective, loss_k1, loss_kl_to_old, loss_tokens_broadcast, loss_token_sum,
                  loss_fixed_clip, loss_detached):
        assert_fails(check, wrong)
    assert_fails(check, loss_clip_only, contains="clipped term alone")
    assert_fails(check, loss_objective, contains="objective to maximise")
    assert_fails(check, loss_k1, contains="k1")
    assert_fails(check, loss_kl_to_old, contains="old policy")
    assert_fails(check, loss_tokens_broadcast, contains="broadcast along the tokens")
    assert_fails(check, loss_token_sum, contains="sums over the tokens")
    assert_fails(check, loss_fixed_clip, contains="ignores the clip argument")  # clip is an argument
    assert_fails(check, loss_detached, contains="logp was detached")
    assert_fails(check, loss_min_of_means, contains="not per token")


# 11.4 ------------------------------------------------------------------------------------------------------


def rollout_with(eval_mode=True, restore=True, ref_model=True, groups="classes", layout="interleave",
                 no_grad=True, score_in_train=False):
    def rollout(policy, reference, reward_fn, group_size, generator):
        n = policy.config.n_classes
        classes = torch.arange(n).repeat_interleave(group_size) if layout == "interleave" else \
            torch.arange(n).repeat(group_size)
        was = policy.training
        if eval_mode:
            policy.eval()
        with torch.no_grad():
            maps = raster.generate_tokens(policy, classes, policy.config.grid, generator=generator)
            rewards = reward_fn(maps, classes)
        if score_in_train:
            policy.train(was)  # back to dropout before scoring
        adv = answers.group_advantages(rewards, {"classes": classes, "batch": torch.zeros_like(classes)}[groups])
        with torch.set_grad_enabled(not no_grad):
            old = token_log_probs(policy, maps, classes)
            logp_ref = token_log_probs(reference if ref_model else policy, maps, classes)
        if restore:
            policy.train(was)
        return {"classes": classes, "maps": maps, "rewards": rewards, "advantages": adv, "logp_old": old,
                "logp_ref": logp_ref}

    return rollout


def test_11_4():
    check = ch11.grpo_rollout
    assert_passes(check, library_rollout)
    assert_passes(check, rollout_with())  # by hand, with 11.2's advantages by class id
    assert_not_attempted(check, stub)
    assert_fails(check, rollout_with(layout="repeat"), contains="laid out 0, 1, ..., 0, 1")
    assert_fails(check, rollout_with(eval_mode=False), contains="train mode, with dropout")
    assert_fails(check, rollout_with(restore=False), contains="left in eval mode")
    assert_fails(check, rollout_with(ref_model=False), contains="frozen reference model")
    assert_fails(check, rollout_with(groups="batch"), contains="whole batch")
    assert_fails(check, rollout_with(no_grad=False), contains="logp_old carries a gradient")
    assert_fails(check, rollout_with(score_in_train=True), contains="scored logp_old in the mode it came in")
    assert_fails(check, lambda *args: list(library_rollout(*args).values()), contains="should be a dict")


def rollout_reference_with_grad(policy, reference, reward_fn, group_size, generator):
    out = library_rollout(policy, reference, reward_fn, group_size, generator)
    out["logp_ref"] = token_log_probs(reference, out["maps"], out["classes"])  # same values, scored with autograd on
    return out


def test_11_4_rejects_logp_ref_that_carries_a_gradient():
    """11.4 rejects a rollout whose logp_ref carries a gradient (the reference scored outside torch.no_grad()),
    not only one whose logp_old does."""
    assert_fails(ch11.grpo_rollout, rollout_reference_with_grad, contains="logp_ref carries a gradient")


# 11.5 ------------------------------------------------------------------------------------------------------


def update_with(old="rollout", zero_grad=True, clip_norm=True, steps=None, returns="loss", overwrite_old=False):
    def update(policy, optimizer, rollout, clip=0.2, kl_coef=0.05, inner_steps=2):
        out = []
        for _ in range(inner_steps if steps is None else steps):
            logp = token_log_probs(policy, rollout["maps"], rollout["classes"])
            logp_old = {"rollout": rollout["logp_old"], "current": logp.detach(), "ref": rollout["logp_ref"]}[old]
            loss, kl = grpo_objective(logp, logp_old, rollout["logp_ref"], rollout["advantages"], clip, kl_coef)
            if zero_grad is True:
                optimizer.zero_grad()
            loss.backward()
            if clip_norm:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            if zero_grad == "after":  # the other common place for it: the same steps on a fresh policy
                optimizer.zero_grad()
            if overwrite_old:
                rollout["logp_old"] = logp.detach()  # the caller's rollout changes under it
            out.append({"loss": float(loss.detach()), "kl": float(kl), "tensor": loss}[returns])
        return out

    return update


def update_returns_pairs(policy, optimizer, rollout, clip=0.2, kl_coef=0.05, inner_steps=2):  # [(loss, kl), ...]
    out = []
    for _ in range(inner_steps):
        logp = token_log_probs(policy, rollout["maps"], rollout["classes"])
        loss, kl = grpo_objective(logp, rollout["logp_old"], rollout["logp_ref"], rollout["advantages"], clip, kl_coef)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        out.append((loss, kl))
    return out


def test_11_5_names_what_the_update_returned_in_place_of_a_float():
    check = ch11.grpo_update
    message = assert_fails(check, update_returns_pairs, contains="returned tuple[Tensor() float32 cpu, Tensor() "
                                                                 "float32 cpu] among its losses")
    assert "return Python floats" in message and "several values where one step's loss goes" in message
    message = assert_fails(check, update_with(returns="tensor"), contains="returned Tensor() float32 cpu among")
    assert "a tensor kept in the list keeps its step's graph alive" in message and "several" not in message
    assert_fails(check, lambda *args: [int(x) for x in answers.grpo_update(*args)], contains="(an int) among")


def test_11_5():
    check = ch11.grpo_update
    assert_passes(check, answers.grpo_update)
    assert_passes(check, update_with())
    assert_not_attempted(check, stub)
    assert_fails(check, update_with(old="current"), contains="always 1")
    assert_fails(check, update_with(old="ref"), contains="against the reference model")
    assert_fails(check, update_with(zero_grad=False), contains="accumulate")
    assert_fails(check, update_with(clip_norm=False), contains="not clipped to 1")
    assert_fails(check, update_with(steps=2), contains="3 inner steps")  # inner_steps is an argument
    assert_fails(check, update_with(returns="kl"), contains="those are the KL estimates")
    assert_fails(check, update_with(returns="tensor"), contains="return Python floats")
    assert_fails(check, update_with(overwrite_old=True), contains="changed its argument `rollout` in place")
    assert_passes(check, update_with(zero_grad="after"))


# 11.6 ------------------------------------------------------------------------------------------------------


def cca_with(reduce="sum", neg_sign=-1.0, lam_used=True, log_sigmoid=F.logsigmoid, negatives_used=True,
             ref_grad=False):
    def loss_fn(policy, reference, maps, classes, negatives, beta=0.02, lam=1.0):
        m, c = torch.cat([maps, maps]), torch.cat([classes, negatives if negatives_used else classes])
        total = (lambda x: x.sum(1)) if reduce == "sum" else (lambda x: x.mean(1))
        with torch.set_grad_enabled(ref_grad):
            ref = total(token_log_probs(reference, m, c))
        pos, neg = (total(token_log_probs(policy, m, c)) - ref).chunk(2)
        loss = -log_sigmoid(beta * pos).mean() - (lam if lam_used else 1.0) * log_sigmoid(neg_sign * beta * neg).mean()
        return loss, pos, neg

    return loss_fn


def cca_shifted_negatives(policy, reference, maps, classes, negatives, beta=0.02, lam=1.0):
    negatives.copy_((classes + 1) % policy.config.n_classes)  # overwrites the caller's negatives
    return cca_batch_loss(policy, reference, maps, classes, negatives, beta, lam)


def cca_no_grad(policy, reference, maps, classes, negatives, beta=0.02, lam=1.0):
    with torch.no_grad():
        return cca_batch_loss(policy, reference, maps, classes, negatives, beta, lam)


def cca_unreduced(policy, reference, maps, classes, negatives, beta=0.02, lam=1.0):  # the batch mean forgotten
    m, c = torch.cat([maps, maps]), torch.cat([classes, negatives])
    with torch.no_grad():
        ref = token_log_probs(reference, m, c).sum(1)
    pos, neg = (token_log_probs(policy, m, c).sum(1) - ref).chunk(2)
    return -F.logsigmoid(beta * pos) - lam * F.logsigmoid(-beta * neg), pos, neg


def test_11_6_checks_what_the_loss_returns_before_using_it():
    check = ch11.cca_loss
    for wrong, says in (
            (cca_unreduced, "the loss on input 'tiny models 0, 6 maps, beta 0.5, lam 1' is a Tensor(6,) float32 cpu; "
                            "it should be one number, a 0-d tensor"),
            (lambda *args: (cca_batch_loss(*args)[0], None, None), "logratio_pos on input 'tiny models 0, 6 maps, "
                                                                   "beta 0.5, lam 1' is None; it should be a (6,) "
                                                                   "tensor"),
            (lambda *args: (*cca_batch_loss(*args)[:2], cca_batch_loss(*args)[2][:, None]),
             "logratio_neg on input 'tiny models 0, 6 maps, beta 0.5, lam 1' is Tensor(6, 1) float32 cpu"),
            (lambda *args: (float(cca_batch_loss(*args)[0].detach()), *cca_batch_loss(*args)[1:]),
             "it should be a 0-d tensor that carries the gradient back")):
        message = assert_fails(check, wrong, contains=says)
        assert "your function raised" not in message  # the check's own code never trips over the output


def cca_raises(policy, reference, maps, classes, negatives, beta=0.02, lam=1.0):
    raise RuntimeError("not written yet")


def rollout_int32_classes(policy, reference, reward_fn, group_size, generator):
    classes = torch.arange(policy.config.n_classes, dtype=torch.int32).repeat_interleave(group_size)
    with torch.no_grad():
        raster.generate_tokens(policy.eval(), classes, policy.config.grid, generator=generator)


def update_raises(policy, optimizer, rollout, clip=0.2, kl_coef=0.05, inner_steps=2):
    return [rollout["no such key"]]


def test_11_4_to_11_6_name_the_learners_arguments_when_it_raises():
    # the wrappers' own case numbers (a seed, a size) are not the arguments the learner's function got
    message = assert_fails(ch11.grpo_rollout, rollout_int32_classes, contains="raised ValueError on input 'tiny policy "
                                                                              "in eval mode, G = 4' (arguments: GPT, "
                                                                              "GPT, reward_fn(maps, classes), 4, "
                                                                              "Generator(seed 0))")
    assert "(line " in message  # the learner's line is still named
    assert_fails(ch11.grpo_update, update_raises, contains="raised KeyError on input 'tiny policy, SGD lr 1, clip 0.2, "
                                                           "kl_coef 0.05, 2 inner steps' (arguments: GPT, SGD, dict, "
                                                           "0.2, 0.05, 2)")
    assert_fails(ch11.cca_loss, cca_raises, contains="raised RuntimeError on input 'tiny models 0, 6 maps, beta 0.5, "
                                                     "lam 1' (arguments: GPT, GPT, Tensor(6, 3, 4) int64 cpu, "
                                                     "Tensor(6,) int64 cpu, Tensor(6,) int64 cpu, 0.5, 1): not written")


def test_11_6():
    check = ch11.cca_loss
    assert_passes(check, cca_batch_loss)
    assert_passes(check, cca_with())
    assert_passes(check, cca_with(ref_grad=True))  # a reference with gradients wastes work but trains the same
    assert_not_attempted(check, stub)
    assert_fails(check, cca_with(negatives_used=False), contains="wrong class")
    assert_fails(check, cca_with(reduce="mean"), contains="sum over its tokens")
    assert_fails(check, cca_with(neg_sign=1.0), contains="sigmoid(-beta * neg)")
    assert_fails(check, cca_with(lam_used=False), contains="lam is missing")
    assert_fails(check, cca_with(log_sigmoid=lambda x: torch.log(torch.sigmoid(x))), contains="logsigmoid")
    assert_fails(check, cca_no_grad, contains="no gradient reaches the policy")
    assert_fails(check, cca_shifted_negatives, contains="changed its argument `negatives` in place")


# right answers written in other styles than the reference (each must pass), and wrong ones found since -----------


def logp_logsumexp(model, maps, classes):  # logits minus their logsumexp, take_along_dim
    seq = maps.reshape(maps.shape[0], -1)
    logits, _ = model(seq[:, :-1], classes=classes)
    return torch.take_along_dim(logits, seq[..., None], -1).squeeze(-1) - torch.logsumexp(logits, -1)


def logp_categorical(model, maps, classes):
    seq = maps.flatten(1)
    logits, _ = model(seq[:, :-1], classes=classes)
    return torch.distributions.Categorical(logits=logits).log_prob(seq)


def logp_whole_map_fed(model, maps, classes):  # all h*w tokens in, the last prediction dropped
    seq = maps.flatten(1)
    logits, _ = model(seq, classes=classes)
    return logits[:, :-1].log_softmax(-1).gather(2, seq.unsqueeze(2)).squeeze(2)


def logp_one_hot_float64(model, maps, classes):
    seq = maps.flatten(1)
    logits, _ = model(seq[:, :-1], classes=classes)
    return (F.one_hot(seq, logits.shape[-1]) * logits.double().log_softmax(-1)).sum(-1).float()


def logp_eval_then_train(model, maps, classes):  # wrong: back to train mode whatever mode the model came in
    model.eval()
    out = token_log_probs(model, maps, classes)
    model.train()
    return out


def test_11_1_other_styles():
    for right in (logp_logsumexp, logp_categorical, logp_whole_map_fed, logp_one_hot_float64):
        assert_passes(ch11.token_log_probs, right)
    assert_fails(ch11.token_log_probs, logp_eval_then_train, contains="came in eval mode")


def adv_one_hot_matmul(rewards, groups, eps=1e-4):
    _, inverse = torch.unique(groups, return_inverse=True)
    member = F.one_hot(inverse).to(rewards.dtype)  # (B, n)
    count = member.sum(0)
    centred = rewards - member @ (member.T @ rewards / count)
    return centred / (member @ (member.T @ centred**2 / count).sqrt() + eps)


def adv_bincount(rewards, groups, eps=1e-4):
    count = torch.bincount(groups).to(rewards.dtype).clamp_min(1)
    centred = rewards - (torch.bincount(groups, weights=rewards).to(rewards.dtype) / count)[groups]
    return centred / ((torch.bincount(groups, weights=centred**2).to(rewards.dtype) / count).sqrt()[groups] + eps)


def adv_scatter_reduce(rewards, groups, eps=1e-4):
    n = int(groups.max()) + 1
    mean = torch.zeros(n, dtype=rewards.dtype).scatter_reduce(0, groups, rewards, "mean", include_self=False)
    centred = rewards - mean[groups]
    var = torch.zeros(n, dtype=rewards.dtype).scatter_reduce(0, groups, centred**2, "mean", include_self=False)
    return centred / (var.sqrt()[groups] + eps)


def adv_in_float64(rewards, groups, eps=1e-4):  # more accurate than float32 on the near-equal rewards
    return adv_loop(rewards.double(), groups, eps).to(rewards.dtype)


def adv_std_mean_per_id(rewards, groups, eps=1e-4):
    out = torch.zeros_like(rewards)
    for gid in set(groups.tolist()):
        ids = (groups == gid).nonzero().squeeze(1)
        std, mean = torch.std_mean(rewards[ids], unbiased=False)
        out[ids] = (rewards[ids] - mean) / (std + eps)
    return out


def test_11_2_other_styles():
    for right in (adv_one_hot_matmul, adv_bincount, adv_scatter_reduce, adv_in_float64, adv_std_mean_per_id):
        assert_passes(ch11.group_advantages, right)


def loss_where_expm1(logp, logp_old, logp_ref, adv, clip=0.2, kl_coef=0.05):
    r, a = (logp - logp_old).exp(), adv.unsqueeze(1)
    surrogate = torch.where(a >= 0, torch.clamp(r, max=1 + clip) * a, torch.clamp(r, min=1 - clip) * a)
    d = logp_ref - logp
    kl = (torch.expm1(d) - d).mean()
    return -surrogate.mean() + kl_coef * kl, kl.detach()


def loss_per_token_then_mean(logp, logp_old, logp_ref, adv, clip=0.2, kl_coef=0.05):  # kl returned with its graph
    r = torch.exp(logp - logp_old)
    a = adv.view(-1, 1).expand_as(r)
    k3 = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1
    return -(torch.min(r * a, torch.clamp(r, 1 - clip, 1 + clip) * a) - kl_coef * k3).mean(), k3.mean()


def loss_in_float64(logp, logp_old, logp_ref, adv, clip=0.2, kl_coef=0.05):
    loss, kl = grpo_objective(logp.double(), logp_old.double(), logp_ref.double(), adv.double(), clip, kl_coef)
    return loss.float(), kl.float()


def test_11_3_other_styles():
    for right in (loss_where_expm1, loss_per_token_then_mean, loss_in_float64):
        assert_passes(ch11.grpo_loss, right)


def rollout_in(context, classes_of=lambda n, g: torch.arange(n).repeat_interleave(g), restore=None):
    def rollout(policy, reference, reward_fn, group_size, generator):
        classes = classes_of(policy.config.n_classes, group_size)
        was = policy.training
        policy.eval()
        with context():
            maps = raster.generate_tokens(policy, classes, policy.config.grid, generator=generator)
            rewards = reward_fn(maps, classes)
            out = {"classes": classes, "maps": maps, "rewards": rewards,
                   "advantages": answers.group_advantages(rewards, classes),
                   "logp_old": token_log_probs(policy, maps, classes),
                   "logp_ref": token_log_probs(reference, maps, classes)}
        if was:
            policy.train()
        return out

    return rollout


def rollout_detached(policy, reference, reward_fn, group_size, generator):  # .detach() instead of torch.no_grad()
    out = rollout_in(torch.enable_grad)(policy, reference, reward_fn, group_size, generator)
    return {k: v.detach() for k, v in out.items()}


def test_11_4_other_styles():
    assert_passes(ch11.grpo_rollout, rollout_in(torch.no_grad))
    assert_passes(ch11.grpo_rollout, rollout_in(torch.no_grad, classes_of=lambda n, g: torch.arange(n)[:, None]
                                                .expand(n, g).reshape(-1)))
    assert_passes(ch11.grpo_rollout, rollout_detached)
    # tensors made under inference mode break the update's backward pass later
    assert_fails(ch11.grpo_rollout, rollout_in(torch.inference_mode), contains="inference_mode")


def update_in_style(zero="policy", loss_of=float):
    def update(policy, optimizer, rollout, clip=0.2, kl_coef=0.05, inner_steps=2):
        params, losses = list(policy.parameters()), []
        for _ in range(inner_steps):
            if zero == "policy":
                policy.zero_grad(set_to_none=False)
            logp = token_log_probs(policy, rollout["maps"], rollout["classes"])
            loss = grpo_objective(logp, rollout["logp_old"], rollout["logp_ref"], rollout["advantages"], clip,
                                  kl_coef)[0]
            if zero == "autograd":  # gradients set from torch.autograd.grad, not accumulated by backward
                for p, g in zip(params, torch.autograd.grad(loss, params)):
                    p.grad = g
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm=1, norm_type=2.0)
            optimizer.step()
            if zero == "after":
                optimizer.zero_grad()
            losses.append(loss_of(loss.detach()))
        return losses

    return update


def test_11_5_other_styles():
    for right in (update_in_style("policy"), update_in_style("after", lambda x: x.item()), update_in_style("autograd")):
        assert_passes(ch11.grpo_update, right)


def cca_two_passes_softplus(policy, reference, maps, classes, negatives, beta=0.02, lam=1.0):
    with torch.no_grad():
        ref_pos, ref_neg = token_log_probs(reference, maps, classes).sum(-1), token_log_probs(reference, maps,
                                                                                               negatives).sum(-1)
    pos = token_log_probs(policy, maps, classes).sum(-1) - ref_pos
    neg = token_log_probs(policy, maps, negatives).sum(-1) - ref_neg
    return F.softplus(-beta * pos).mean() + lam * F.softplus(beta * neg).mean(), pos, neg


def cca_by_map(policy, reference, maps, classes, negatives, beta=0.02, lam=1.0):  # one map at a time, float64 loss
    pos, neg = [], []
    for i in range(len(maps)):
        m = maps[i:i + 1]
        for c, out in ((classes[i:i + 1], pos), (negatives[i:i + 1], neg)):
            out.append(token_log_probs(policy, m, c).sum() - token_log_probs(reference, m, c).sum().detach())
    pos, neg = torch.stack(pos), torch.stack(neg)
    loss = -F.logsigmoid(beta * pos.double()).mean() - lam * F.logsigmoid(-beta * neg.double()).mean()
    return loss.float(), pos, neg


def test_11_6_other_styles():
    for right in (cca_two_passes_softplus, cca_by_map, cca_with()):
        assert_passes(ch11.cca_loss, right)
