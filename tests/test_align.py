"""Chapter 11's library: GRPO's pieces (advantages, clipped surrogate, k3 KL, an exact step on a toy policy),
the CCA loss, log-probabilities under the raster model, rewards, trainers' determinism, shipped checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ar_course import checkpoint, raster
from ar_course.align import (
    CCAConfig, GRPOConfig, brightness, cca_batch_loss, cca_loss, cca_step, class_probability, clipped_surrogate,
    group_advantages, grpo_objective, grpo_rollout, grpo_step, grpo_update, k3_kl, sequence_log_probs,
    token_log_probs, train_cca, train_grpo, wrong_classes,
)
from ar_course.train import TrainingError
from ar_course.transformer.model import GPT


@settings(max_examples=40, deadline=None, derandomize=True, database=None)  # the same cases every run
@given(st.integers(1, 4), st.integers(2, 9), st.integers(0, 2**31 - 1))
def test_advantages_have_zero_mean_per_group_and_order_like_rewards(n, g, seed):
    rewards = torch.rand(n, g, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    adv = group_advantages(rewards)
    assert adv.shape == (n, g)
    assert torch.allclose(adv.mean(dim=1), torch.zeros(n, dtype=torch.float64), atol=1e-12)
    for r, a in zip(rewards, adv):  # strictly larger reward -> strictly larger advantage
        i, j = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        assert bool(((r[i] > r[j]) <= (a[i] > a[j])).all())


def test_advantages_are_zero_for_equal_rewards_and_reject_bad_shapes():
    assert torch.equal(group_advantages(torch.full((2, 4), 0.3)), torch.zeros(2, 4))
    # 0.9 seven times has a float32 mean an ulp off: (0.9 - mean) / eps was 6e-4, not 0 (audit 29)
    assert torch.equal(group_advantages(torch.tensor([[0.9] * 7, [0.123] * 7])), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.rand(5))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.rand(3, 1))
    with pytest.raises(ValueError, match="float"):
        group_advantages(torch.ones(2, 3, dtype=torch.long))


def _surrogate_grad(ratio: float, adv: float, clip: float = 0.2) -> float:
    logp = torch.tensor([[float(torch.log(torch.tensor(ratio)))]], requires_grad=True)
    clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([adv]), clip).sum().backward()
    return float(logp.grad)


def test_clipped_surrogate_gradient_vanishes_outside_the_clip_range():
    assert _surrogate_grad(1.5, +1.0) == 0.0  # already pushed up past 1 + clip
    assert _surrogate_grad(0.5, -1.0) == 0.0  # already pushed down past 1 - clip
    assert _surrogate_grad(1.1, +1.0) == pytest.approx(1.1)  # inside: d(r A)/d logp = r A
    assert _surrogate_grad(0.9, -2.0) == pytest.approx(-1.8)
    assert _surrogate_grad(0.5, +1.0) == pytest.approx(0.5)  # the pessimistic side is never clipped
    assert _surrogate_grad(1.5, -1.0) == pytest.approx(-1.5)


def test_k3_is_nonnegative_zero_for_identical_models_and_estimates_kl():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert bool((k3_kl(a, b) >= 0).all())
    model = GPT(raster.raster_config(16, (2, 2), n_layer=1, n_head=2, n_embd=16))
    maps, classes = torch.randint(0, 16, (5, 2, 2), generator=g), torch.arange(5)
    logp = token_log_probs(model, maps, classes)
    assert torch.equal(k3_kl(logp, token_log_probs(copy.deepcopy(model), maps, classes)), torch.zeros(5, 4))
    # the mean over samples from p is KL(p || q) for two categoricals
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    exact = float((p * (p / q).log()).sum())
    assert float(k3_kl(p.log()[x], q.log()[x]).mean()) == pytest.approx(exact, rel=0.02)


def test_grpo_step_on_a_two_token_policy_moves_probability_to_the_rewarded_token_exactly():
    theta = torch.zeros(2, requires_grad=True)  # a policy over two outcomes, p = softmax(theta)
    samples, rewards = torch.tensor([0, 1]), torch.tensor([[1.0, 0.0]])  # one group: outcome 0 is rewarded
    adv = group_advantages(rewards).flatten()  # (+a, -a), a = 0.5 / (0.5 + eps)
    logp = torch.log_softmax(theta, 0)[samples][:, None]  # (2, 1): one token per sequence
    loss, kl = grpo_objective(logp, logp.detach(), logp.detach(), adv, clip=0.2, kl_coef=0.1)
    loss.backward()
    lr = 0.5
    with torch.no_grad():
        theta -= lr * theta.grad
    a = 0.5 / (0.5 + 1e-4)
    # loss = -(a r0 - a r1) / 2 at r = 1: the step adds lr * a / 2 to theta0 and takes it from theta1
    expected = torch.sigmoid(torch.tensor(lr * a))
    assert float(kl) == 0.0
    assert float(torch.softmax(theta.detach(), 0)[0]) == pytest.approx(float(expected), abs=1e-7)
    assert float(expected) > 0.5


def test_grpo_objective_adds_the_kl_penalty_and_its_gradient_pulls_the_policy_to_the_reference():
    """With logp_ref != logp: loss = -mean(surrogate) + kl_coef * mean(k3), and with zero advantages a descent
    step moves each log-probability towards the reference's (the penalty is added, not subtracted)."""
    logp_ref = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    logp = torch.tensor([[-0.4, -2.5, -0.5]], dtype=torch.float64, requires_grad=True)  # above, below, equal
    adv = torch.tensor([0.7], dtype=torch.float64)
    loss, kl = grpo_objective(logp, logp.detach(), logp_ref, adv, clip=0.2, kl_coef=0.3)
    k3 = k3_kl(logp.detach(), logp_ref).mean()
    assert float(kl) == pytest.approx(float(k3), rel=1e-12) and float(kl) > 0.05
    assert float(loss.detach()) == pytest.approx(-0.7 + 0.3 * float(k3), rel=1e-12)  # surrogate: r = 1: r * A = A
    loss.backward()
    d = logp_ref - logp.detach()  # d k3 / d logp = 1 - exp(d); the surrogate adds -A / T to every token
    torch.testing.assert_close(logp.grad, -0.7 / 3 + 0.3 / 3 * (1 - torch.exp(d)))
    logp_zero = logp.detach().clone().requires_grad_(True)
    loss0, _ = grpo_objective(logp_zero, logp_zero.detach(), logp_ref, torch.zeros(1, dtype=torch.float64),
                              clip=0.2, kl_coef=0.3)
    assert float(loss0.detach()) > 0  # only the penalty is left: positive while the policy is not the reference
    loss0.backward()
    g = logp_zero.grad[0]
    assert g[0] > 0 and g[1] < 0 and g[2] == 0  # descent lowers the first, raises the second, keeps the third


def _tiny_policy(seed: int, dropout: float = 0.2, scale: float = 1.0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(raster.raster_config(12, (2, 3), n_classes=4, n_layer=1, n_head=2, n_embd=16, dropout=dropout))
    with torch.no_grad():  # scale > 1: a sharper model (a reference far from the policy)
        for p in model.parameters():
            p.mul_(scale)
    return model


def test_grpo_rollout_samples_groups_by_class_without_gradients_and_restores_the_mode():
    policy, reference = _tiny_policy(0).train(), _tiny_policy(1).eval()

    def reward(maps, classes):
        return maps.float().mean((1, 2)) + (maps == classes[:, None, None]).float().mean((1, 2))

    out = grpo_rollout(policy, reference, reward, 3, torch.Generator().manual_seed(0))
    assert policy.training  # given back in train mode; sampled in eval mode (same maps as an eval-mode call)
    again = grpo_rollout(policy.eval(), reference, reward, 3, torch.Generator().manual_seed(0))
    assert not policy.training and torch.equal(out["maps"], again["maps"])
    assert out["classes"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert out["maps"].shape == (12, 2, 3) and out["logp_old"].shape == out["logp_ref"].shape == (12, 6)
    assert torch.equal(out["rewards"], reward(out["maps"], out["classes"]))
    assert torch.allclose(out["advantages"], group_advantages(out["rewards"].view(4, 3)).flatten())
    assert torch.allclose(out["logp_ref"], token_log_probs(reference, out["maps"], out["classes"]))
    assert not any(t.requires_grad for t in out.values())
    with pytest.raises(ValueError, match="one reward per sample"):
        grpo_rollout(policy, reference, lambda maps, classes: reward(maps, classes)[:5], 3, torch.Generator())
    with pytest.raises(ValueError, match="group_size"):
        grpo_rollout(policy, reference, reward, 1, torch.Generator())


def test_grpo_update_takes_inner_steps_against_the_fixed_rollout():
    policy = _tiny_policy(0).eval()

    def reward(maps, classes):
        return maps.float().mean((1, 2))

    rollout = grpo_rollout(policy, copy.deepcopy(policy), reward, 4, torch.Generator().manual_seed(3))
    before = [p.detach().clone() for p in policy.parameters()]
    loss0, kl0 = grpo_objective(token_log_probs(policy, rollout["maps"], rollout["classes"]), rollout["logp_old"],
                                rollout["logp_ref"], rollout["advantages"], 0.2, 0.05)
    steps = grpo_update(policy, torch.optim.SGD(policy.parameters(), lr=0.5), rollout, 0.2, 0.05, inner_steps=3)
    assert len(steps) == 3 and steps[0] == pytest.approx((float(loss0.detach()), float(kl0)))
    assert steps[0][1] == 0.0 < steps[2][1]  # the reference is the starting policy: KL 0, then it grows
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    with pytest.raises(ValueError, match="rollout lacks logp_ref"):
        grpo_update(policy, torch.optim.SGD(policy.parameters(), lr=0.5),
                    {k: v for k, v in rollout.items() if k != "logp_ref"}, inner_steps=1)
    with pytest.raises(ValueError, match="inner_steps"):
        grpo_update(policy, torch.optim.SGD(policy.parameters(), lr=0.5), rollout, inner_steps=0)


def _two_part_reward(maps, classes):
    return maps.float().mean((1, 2)) / 11 + (maps == classes[:, None, None]).float().mean((1, 2))


def test_grpo_update_zeroes_and_clips_the_gradient_every_inner_step():
    """grpo_update is exactly the documented loop: gradients zeroed before every inner step (not accumulated) and
    their norm clipped to 1 before the optimizer step; here the norm is above 1, so the clipping matters."""
    policy, reference = _tiny_policy(0, dropout=0.0).eval(), _tiny_policy(1, dropout=0.0, scale=3.0).eval()
    rollout = grpo_rollout(policy, reference, _two_part_reward, 4, torch.Generator().manual_seed(0))
    mine = copy.deepcopy(policy)
    opt = torch.optim.SGD(mine.parameters(), lr=1.0)
    norms = []
    for _ in range(3):
        logp = token_log_probs(mine, rollout["maps"], rollout["classes"])
        loss, _ = grpo_objective(logp, rollout["logp_old"], rollout["logp_ref"], rollout["advantages"], 0.2, 2.0)
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(mine.parameters(), 1.0)))
        opt.step()
    assert max(norms) > 1  # the clipping matters here
    grpo_update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), rollout, 0.2, 2.0, inner_steps=3)
    for a, b in zip(policy.parameters(), mine.parameters()):
        torch.testing.assert_close(a, b)


class _IdentityTokenizer:
    """Decodes a token map to itself as a float image (grpo_step only calls decode_from_indices)."""

    def decode_from_indices(self, maps):
        return maps.float()


def test_grpo_step_returns_the_kl_before_the_first_update_and_leaves_eval_mode():
    """grpo_step reports the mean reward of its rollout and the KL measured before the first inner update (not
    after the last), and gives the policy back in eval mode."""
    policy, reference = _tiny_policy(0, dropout=0.0).eval(), _tiny_policy(1, dropout=0.0, scale=3.0).eval()
    config = GRPOConfig(group_size=4, inner_steps=3, kl_coef=2.0, lr=0.5, eval_every=0)
    expected = grpo_rollout(copy.deepcopy(policy), reference, _two_part_reward, 4, torch.Generator().manual_seed(5))
    kl_before = float(k3_kl(expected["logp_old"], expected["logp_ref"]).mean())
    reward, kl = grpo_step(policy, reference, _IdentityTokenizer(), torch.optim.SGD(policy.parameters(), lr=0.5),
                           config, _two_part_reward, torch.Generator().manual_seed(5))
    assert reward == float(expected["rewards"].mean())
    assert abs(kl - kl_before) < 1e-6
    assert not policy.training


def test_train_grpo_evaluates_at_the_end_when_steps_is_no_multiple_of_eval_every(monkeypatch):
    """With eval_every=2 and 5 steps the accuracy is measured at steps 0, 2, 4 and at the end (5)."""
    monkeypatch.setattr("ar_course.align.grpo.grpo_step", lambda *args: (0.5, 0.0))
    monkeypatch.setattr("ar_course.align.grpo.evaluate", lambda *args, **kwargs: (0.25, 0.1))
    log = train_grpo(_tiny_policy(0), _tiny_policy(1), None, GRPOConfig(steps=5, eval_every=2, eval_per_class=1),
                     progress=False)
    assert log.eval_step == [0, 2, 4, 5] and log.step == [0, 1, 2, 3, 4]


def test_cca_step_updates_on_cca_batch_loss():
    policy, reference = _tiny_policy(0).eval(), _tiny_policy(1).eval()
    g = torch.Generator().manual_seed(0)
    maps, classes = torch.randint(0, 12, (5, 2, 3), generator=g), torch.randint(0, 4, (5,), generator=g)
    negatives = wrong_classes(classes, 4, g)
    loss, pos, neg = (t.detach() for t in cca_batch_loss(policy, reference, maps, classes, negatives, 0.5, 2.0))
    both = sequence_log_probs(policy, torch.cat([maps, maps]), torch.cat([classes, negatives]))
    ref = sequence_log_probs(reference, torch.cat([maps, maps]), torch.cat([classes, negatives]))
    assert torch.allclose(torch.cat([pos, neg]), both - ref)
    assert float(loss) == pytest.approx(float(cca_loss(pos, neg, 0.5, 2.0)))
    got = cca_step(policy, reference, maps, classes, negatives, torch.optim.SGD(policy.parameters(), lr=0.1),
                   CCAConfig(beta=0.5, lam=2.0))
    assert got == pytest.approx((float(loss), float(pos.mean()), float(neg.mean())))
    assert float(cca_batch_loss(policy, reference, maps, classes, negatives, 0.5, 2.0)[0].detach()) < float(loss)


@pytest.mark.parametrize("beta", [50.0, 0.01])
def test_cca_step_clips_the_gradient_norm_to_one(beta):
    """An SGD step moves the weights by ``lr`` times the gradient scaled to norm 1 when its norm is larger (a
    large ``beta``), and by the plain gradient when it is smaller."""
    policy, reference = _tiny_policy(0).eval(), _tiny_policy(1).eval()
    g = torch.Generator().manual_seed(0)
    maps, classes = torch.randint(0, 12, (5, 2, 3), generator=g), torch.randint(0, 4, (5,), generator=g)
    negatives = wrong_classes(classes, 4, g)
    params = list(policy.parameters())
    loss = cca_batch_loss(policy, reference, maps, classes, negatives, beta, 1.0)[0]
    grads = [torch.zeros_like(p) if gr is None else gr
             for p, gr in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]
    norm = float(torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads)))
    assert (norm > 1) == (beta > 1)  # the two cases: above and below the clipping norm
    before = [p.detach().clone() for p in params]
    cca_step(policy, reference, maps, classes, negatives, torch.optim.SGD(params, lr=0.1),
             CCAConfig(beta=beta, lam=1.0))
    scale = min(1.0, 1.0 / (norm + 1e-6))  # torch's clip_grad_norm_ coefficient for max_norm 1
    for b, p, gr in zip(before, params, grads):
        torch.testing.assert_close(b - p.detach(), 0.1 * scale * gr, rtol=1e-4, atol=1e-7)


def test_cca_loss_matches_its_formula_and_pushes_positives_up_negatives_down():
    pos = torch.tensor([1.0, -3.0, 10.0], requires_grad=True)
    neg = torch.tensor([2.0, 0.0, -5.0], requires_grad=True)
    loss = cca_loss(pos, neg, beta=0.5, lam=3.0)
    expected = -torch.log(torch.sigmoid(0.5 * pos)).mean() - 3.0 * torch.log(torch.sigmoid(-0.5 * neg)).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    loss.backward()
    assert bool((pos.grad < 0).all()) and bool((neg.grad > 0).all())  # descent raises pos, lowers neg
    with pytest.raises(ValueError, match="one size"):
        cca_loss(torch.zeros(3), torch.zeros(2))


def test_wrong_classes_never_match():
    classes = torch.arange(10).repeat(500)
    neg = wrong_classes(classes, 10, torch.Generator().manual_seed(0))
    assert bool((neg != classes).all()) and bool(((neg >= 0) & (neg < 10)).all())
    assert set(neg[classes == 3].tolist()) == set(range(10)) - {3}


def test_token_log_probs_agree_with_the_raster_token_losses():
    model, _ = raster.load_pretrained()
    maps, classes = torch.randint(0, 256, (3, 8, 8), generator=torch.Generator().manual_seed(1)), torch.arange(3)
    logp = token_log_probs(model, maps, classes)
    assert torch.allclose(logp, -raster.token_losses(model, maps, classes).flatten(1), atol=1e-5)
    assert torch.allclose(sequence_log_probs(model, maps, classes), logp.sum(1))


def test_token_log_probs_refuses_a_map_of_another_grid_with_as_many_tokens():
    """A (B, 3, 2) map has as many tokens as the model's (2, 3) grid: without the grid check it would be scored
    silently as if transposed."""
    model = _tiny_policy(0).eval()
    assert token_log_probs(model, torch.zeros(1, 2, 3, dtype=torch.long), torch.tensor([1])).shape == (1, 6)
    with pytest.raises(ValueError, match=r"token_maps must match the model's 2x3 grid, got \(1, 3, 2\)"):
        token_log_probs(model, torch.zeros(1, 3, 2, dtype=torch.long), torch.tensor([1]))


def test_rewards():
    images = torch.zeros(2, 1, 32, 32)
    images[1, :, 8:24, 8:24] = 1.0
    assert brightness(images, torch.tensor([0, 1])).tolist() == [0.0, 0.25]
    _, tokenizer = raster.load_pretrained()
    from ar_course.data import load_mnist
    digits, labels = load_mnist("test", size=32)
    right = class_probability(digits[:20], labels[:20])
    wrong = class_probability(digits[:20], (labels[:20] + 1) % 10)
    assert bool(((right >= 0) & (right <= 1)).all()) and float(right.mean()) > 0.9 > 0.1 > float(wrong.mean())
    with pytest.raises(ValueError, match="classes"):
        brightness(images, torch.tensor([0]))


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="reward"):
        GRPOConfig(reward="likes")
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="lam"):
        CCAConfig(lam=-1.0)


def _tiny_pair() -> tuple[GPT, GPT]:
    torch.manual_seed(3)
    model = GPT(raster.raster_config(256, (8, 8), n_layer=1, n_head=2, n_embd=16))
    return model, copy.deepcopy(model)


def test_grpo_and_cca_training_are_deterministic_under_their_seed():
    _, tokenizer = raster.load_pretrained()
    config = GRPOConfig(steps=2, group_size=2, eval_every=0, seed=7, lr=1e-3)
    runs = []
    for _ in range(2):
        policy, reference = _tiny_pair()
        log = train_grpo(policy, reference, tokenizer, config, progress=False)
        runs.append((log.reward, log.kl, policy.state_dict()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][2][k], runs[1][2][k]) for k in runs[0][2])
    start = _tiny_pair()[0].state_dict()
    assert any(not torch.equal(runs[0][2][k], start[k]) for k in start)  # the steps did train
    maps, labels = torch.randint(0, 256, (20, 8, 8), generator=torch.Generator().manual_seed(0)), torch.arange(20) % 10
    cca = [train_cca(*_tiny_pair(), maps, labels, CCAConfig(steps=3, batch_size=4), progress=False).loss
           for _ in range(2)]
    assert cca[0] == cca[1]



def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_grpo_training_that_diverges_stops_with_train_loops_message():
    """lr 10: the second inner update of step 1 meets a loss of inf, whose gradient would make every weight NaN
    (the run then failed at step 2 with 'logits row 0 (of 20) contains NaN'). It stops before that update;
    lr 1e6 keeps the losses finite but its first update overflows the weights."""
    _, tokenizer = raster.load_pretrained()
    config = GRPOConfig(steps=4, group_size=2, lr=10.0, eval_every=0, eval_per_class=0)
    policy, reference = _tiny_pair()
    with pytest.raises(TrainingError, match=r"^training diverged: the loss is inf at step 1 \(rerun with a lower "
                                            r"--lr\)$"):
        train_grpo(policy, reference, tokenizer, config, progress=False)
    assert _finite(policy)  # the update of the inf loss was not taken
    with pytest.raises(TrainingError, match=r"^training diverged: the weights hold NaN or inf after step 1 \(\S+ "
                                            r"first\) \(rerun with a lower --lr\)$"):
        train_grpo(*_tiny_pair(), tokenizer, GRPOConfig(steps=4, group_size=2, lr=1e6, eval_every=0,
                                                        eval_per_class=0), progress=False)
    policy, reference = _tiny_pair()  # grpo_update alone names its inner step
    rollout = grpo_rollout(policy, reference, lambda maps, classes: maps.float().mean((1, 2)), 2,
                           torch.Generator().manual_seed(0))
    with pytest.raises(TrainingError, match=r"^training diverged: the loss is inf at inner step 2 \(rerun with a "
                                            r"lower --lr\)$"):
        grpo_update(policy, torch.optim.AdamW(policy.parameters(), lr=10.0, betas=(0.9, 0.99)), rollout, 0.2, 0.05,
                    inner_steps=2)
    assert _finite(policy)


def test_cca_training_that_diverges_stops_at_the_first_loss_that_is_not_finite():
    """lr 1e3: the loss is NaN at step 3; the run went on to step 6 and returned NaN curves and weights."""
    maps, labels = torch.randint(0, 256, (20, 8, 8), generator=torch.Generator().manual_seed(0)), torch.arange(20) % 10
    with pytest.raises(TrainingError, match=r"^training diverged: the loss is nan at step 3 \(rerun with a lower "
                                            r"--lr\)$"):
        train_cca(*_tiny_pair(), maps, labels, CCAConfig(steps=6, batch_size=4, lr=1e3), progress=False)


def test_train_grpo_cli_that_diverges_exits_as_train_loop_does(tmp_path, capsys):
    from ar_course.cli import main as cli_main

    out = tmp_path / "g.safetensors"
    assert cli_main(["train", "grpo", "--steps", "4", "--group-size", "2", "--lr", "10", "--eval-per-class", "0",
                     "--eval-every", "0", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: training diverged: the loss is inf at step 1 (rerun with a lower --lr)"
    assert not out.exists()


def test_train_clis_write_raster_checkpoints_that_the_common_loader_and_generator_read(tmp_path, capsys):
    from ar_course.cli import main as cli_main
    from ar_course.system import Generator

    grpo_out, cca_out = tmp_path / "grpo.safetensors", tmp_path / "cca.safetensors"
    assert cli_main(["train", "grpo", "--steps", "1", "--group-size", "2", "--eval-per-class", "0",
                     "--out", str(grpo_out)]) == 0
    assert cli_main(["train", "cca", "--steps", "1", "--batch-size", "4", "--train-images", "40",
                     "--eval-per-class", "0", "--out", str(cca_out)]) == 0
    for path, method in ((grpo_out, "grpo"), (cca_out, "cca")):
        info = checkpoint.info(path)
        assert info["kind"] == raster.CHECKPOINT_KIND and info["method"] == method and info["base"] == "ar_mnist"
        model, tokenizer = checkpoint.load_with_tokenizer(path, kind=raster.CHECKPOINT_KIND)
        gen = Generator.from_checkpoints(ar_path=path, device="cpu")
        assert gen.generate([3, 7], method="ar", cfg=0.0, seed=0).images.shape == (2, 1, 32, 32)
    for size in ("1", "1025", "2.5"):
        assert cli_main(["train", "grpo", "--group-size", size, "--out", str(grpo_out)]) == 2
        assert "--group-size must be an integer in [2, 1024]" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["grpo", "cca"])
def test_shipped_aligned_models_load_through_the_common_loader_and_the_generator(name):
    path = checkpoint.resolve(f"ar_mnist_{name}")
    info = checkpoint.info(path)
    assert info["kind"] == raster.CHECKPOINT_KIND and info["method"] == name and info["tokenizer"] == "mnist_vq"
    assert path.stat().st_size < 2_000_000
    gen = _pretrained(name)
    base = _pretrained("base")
    assert gen.ar.config == base.ar.config
    assert any(not torch.equal(a, b) for a, b in zip(gen.ar.state_dict().values(), base.ar.state_dict().values()))
    assert gen.generate([1, 2], method="ar", cfg=0.0, seed=0).images.shape == (2, 1, 32, 32)


def _pretrained(ar: str):
    from ar_course.system import Generator

    return Generator.from_pretrained("mnist", device="cpu", ar=ar)


def test_generator_rejects_an_unknown_raster_variant():
    with pytest.raises(ValueError, match="unknown raster model"):
        _pretrained("ppo")


def test_generate_cli_picks_an_aligned_raster_model(tmp_path, capsys):
    from ar_course.cli import main as cli_main

    pngs = []
    for name, cfg in (("default", []), ("w0", ["--cfg", "0"]), ("w1", ["--cfg", "1"])):
        out = tmp_path / f"{name}.png"
        assert cli_main(["generate", "--method", "ar", "--ar-model", "cca", "--classes", "4", "7", "--out", str(out),
                         "--device", "cpu", *cfg]) == 0
        pngs.append(out.read_bytes())
    assert pngs[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert pngs[0] == pngs[1] != pngs[2]  # aligned models sample without guidance by default
    assert cli_main(["generate", "--ar-model", "grpo", "--out", str(tmp_path / "v.png")]) == 2
    assert "--method ar" in capsys.readouterr().err


# -- paths the package itself never takes: found by mutating the library ---------------------------------------


def test_a_rollout_whose_reward_fails_its_check_gives_the_policy_back_in_training_mode():
    """The documented ValueError for a NaN reward left a training policy in eval mode (dropout off)."""
    torch.manual_seed(3)
    policy = GPT(raster.raster_config(16, (2, 2), n_classes=2, n_layer=1, n_head=2, n_embd=16)).train()
    nan_rewards = lambda maps, classes: torch.full((maps.shape[0],), float("nan"))  # noqa: E731
    with pytest.raises(ValueError, match="reward_fn returned nan for sample 0"):
        grpo_rollout(policy, copy.deepcopy(policy), nan_rewards, 2, torch.Generator().manual_seed(0))
    assert policy.training


def test_the_clipped_surrogate_takes_logp_old_as_a_constant():
    """On the first inner step logp_old is the same tensor as logp: its gradient must still be the advantage (a
    logp_old that carried gradient would cancel it to 0)."""
    logp, adv = torch.randn(2, 3, requires_grad=True), torch.tensor([1.0, -2.0])
    clipped_surrogate(logp, logp, adv).sum().backward()
    torch.testing.assert_close(logp.grad, adv[:, None].expand(2, 3))


def test_cca_trains_on_a_single_example():
    """Batches draw examples from all of [0, N): with N = 1 the one example (an off-by-one bound crashed)."""
    torch.manual_seed(3)
    policy = GPT(raster.raster_config(256, (8, 8), n_layer=1, n_head=2, n_embd=16))
    maps, labels = torch.randint(0, 256, (1, 8, 8)), torch.tensor([3])
    log = train_cca(policy, copy.deepcopy(policy), maps, labels, CCAConfig(steps=1, batch_size=2), progress=False)
    assert len(log.loss) == 1 and math.isfinite(log.loss[0])


def test_alignment_updates_run_with_dropout_off(monkeypatch):
    """With dropout on during the updates, a dropout-0.3 policy was 0.11 nats from its own logp_old before any
    update (GRPO's clipping acted on noise) and CCA's log-ratios of a policy equal to its reference started at
    -0.013 / +0.028, not 0. Both now update in eval mode (dropout off), whatever mode the policy arrives in."""
    policy, reference = _tiny_policy(0, dropout=0.3).train(), _tiny_policy(1, dropout=0.0)
    first_ratio = []
    real_update = grpo_update

    def spy(policy, optimizer, rollout, clip, kl_coef, inner_steps):
        assert not policy.training
        logp = token_log_probs(policy, rollout["maps"], rollout["classes"])
        first_ratio.append(float((logp.detach() - rollout["logp_old"]).abs().max()))
        return real_update(policy, optimizer, rollout, clip, kl_coef, inner_steps)

    monkeypatch.setattr("ar_course.align.grpo.grpo_update", spy)
    config = GRPOConfig(group_size=2, inner_steps=1, eval_every=0)
    grpo_step(policy, reference, _IdentityTokenizer(), torch.optim.SGD(policy.parameters(), lr=0.1), config,
              _two_part_reward, torch.Generator().manual_seed(0))
    assert first_ratio == [0.0] and not policy.training

    policy = _tiny_policy(2, dropout=0.3).train()
    g = torch.Generator().manual_seed(0)
    maps, labels = torch.randint(0, 12, (8, 2, 3), generator=g), torch.randint(0, 4, (8,), generator=g)
    log = train_cca(policy, copy.deepcopy(policy), maps, labels, CCAConfig(steps=1, batch_size=4), progress=False)
    assert log.logratio_pos == [0.0] and log.logratio_neg == [0.0] and not policy.training
