"""Bad input at the public entries of ``ar_course.align`` (chapter 11): one clear TypeError/ValueError naming
the argument, never a deep torch error or a silent NaN."""

from __future__ import annotations

import copy

import pytest
import torch

from ar_course.align import (CCAConfig, GRPOConfig, brightness, cca_loss, class_probability, clipped_surrogate,
                             grpo_objective, grpo_rollout, grpo_update, group_advantages, sequence_log_probs,
                             token_log_probs, train_cca, train_grpo, wrong_classes)
from ar_course.raster import raster_config
from ar_course.transformer import GPT, GPTConfig

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def policy() -> GPT:
    torch.manual_seed(0)
    return GPT(raster_config(5, grid=(2, 2), n_classes=3, n_layer=1, n_head=2, n_embd=16)).eval()


@pytest.fixture(scope="module")
def maps() -> torch.Tensor:
    return torch.randint(0, 5, (2, 2, 2), generator=torch.Generator().manual_seed(0))


CLASSES = torch.tensor([0, 1])


# -- finding 4: every token of the map is range-checked, the last (a target only) too --------------------------

@pytest.mark.parametrize("fn", [token_log_probs, sequence_log_probs])
@pytest.mark.parametrize("where", [(0, 0, 0), (0, -1, -1), (1, 1, 0)])
def test_log_probs_token_out_of_range(policy, maps, fn, where):
    bad = maps.clone()
    bad[where] = 7
    with pytest.raises(ValueError, match=r"token_maps must lie in \[0, 4\], got 7"):
        fn(policy, bad, CLASSES)


@pytest.mark.parametrize("fn", [token_log_probs, sequence_log_probs])
def test_log_probs_name_the_argument_of_a_wrong_dtype(policy, maps, fn):  # to_raster's 'token_map' spoke first
    with pytest.raises(ValueError, match=r"^token_maps must be a \(B, h, w\) long tensor, got \(2, 2, 2\) "
                                         r"torch.int32$"):
        fn(policy, maps.int(), CLASSES)


def test_log_probs_good_maps_unchanged(policy, maps):
    logp = token_log_probs(policy, maps, CLASSES)
    assert logp.shape == (2, 4) and torch.isfinite(logp).all()
    assert torch.equal(sequence_log_probs(policy, maps, CLASSES), logp.sum(-1))


# -- finding 5: kl_coef on the direct GRPO path ----------------------------------------------------------------

KL_COEFS = [(NAN, ValueError, "kl_coef must be a finite number >= 0, got nan"),
            (INF, ValueError, "kl_coef must be a finite number >= 0, got inf"),
            (-0.1, ValueError, "kl_coef must be a finite number >= 0, got -0.1"),
            ("0.05", TypeError, "kl_coef must be a finite number >= 0, got '0.05'"),
            (None, TypeError, "kl_coef must be a finite number >= 0, got None")]


@pytest.mark.parametrize("kl_coef, error, message", KL_COEFS)
def test_grpo_objective_kl_coef(kl_coef, error, message):
    logp = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(error, match=message):
        grpo_objective(logp, torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), 0.2, kl_coef)


@pytest.fixture(scope="module")
def rollout(policy):
    return grpo_rollout(policy, copy.deepcopy(policy), lambda m, c: torch.rand(m.shape[0]), 2,
                        torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kl_coef, error, message", KL_COEFS)
def test_grpo_update_kl_coef_leaves_policy_alone(policy, rollout, kl_coef, error, message):
    p = copy.deepcopy(policy)
    before = [t.clone() for t in p.parameters()]
    with pytest.raises(error, match=message):
        grpo_update(p, torch.optim.SGD(p.parameters(), lr=0.1), rollout, kl_coef=kl_coef, inner_steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, p.parameters()))


def test_grpo_update_int_kl_coef_same_as_float(policy, rollout):
    out = []
    for kl_coef in (0, 0.0):
        p = copy.deepcopy(policy)
        out.append(grpo_update(p, torch.optim.SGD(p.parameters(), lr=0.1), rollout, kl_coef=kl_coef))
    assert out[0] == out[1]


# -- findings 6 and 7: rewards refuse non-float and non-finite images ------------------------------------------

def _images(fill: float) -> torch.Tensor:
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x[1, 0, 3, 4] = fill
    return x


@pytest.mark.parametrize("reward", [class_probability, brightness])
@pytest.mark.parametrize("images, message", [
    (_images(NAN), "images must be finite, got nan"),
    (_images(INF), "images must be finite, got inf"),
    (_images(-INF), "images must be finite, got -inf"),
    ((_images(0.5) * 255).to(torch.uint8), "images must be a floating-point tensor .*got torch.uint8"),
    (torch.ones(2, 1, 32, 32, dtype=torch.long), "images must be a floating-point tensor .*got torch.int64"),
    (_images(0.5) * 255, r"images must be in \[0, 1\], got values in \[0.\d+, 254.\d+\] \(divide 0..255 images by "
                         r"255\)"),  # the reward used to clamp them: nearly every pixel became 1
    (_images(0.5) * 2 - 1, r"images must be in \[0, 1\].*\(map \[-1, 1\] images with \(x \+ 1\) / 2 first\)"),
])
def test_rewards_refuse_bad_images(reward, images, message):
    with pytest.raises(ValueError, match=message):
        reward(images, CLASSES)


@pytest.mark.parametrize("reward", [class_probability, brightness])
def test_rewards_refuse_an_empty_batch(reward):  # was a RuntimeError from amin() inside torch
    with pytest.raises(ValueError, match=r"images is an empty batch \(0, 1, 32, 32\)"):
        reward(torch.rand(0, 1, 32, 32), torch.zeros(0, dtype=torch.long))


def test_brightness_good_images_unchanged():
    images = _images(0.5)
    assert torch.equal(brightness(images, CLASSES), images.clamp(0, 1).flatten(1).mean(dim=1))


# -- finding 19: group_advantages' eps ---------------------------------------------------------------------------

@pytest.mark.parametrize("eps, error, message", [
    (0, ValueError, "eps must be a finite number > 0, got 0.0"),
    (0.0, ValueError, "eps must be a finite number > 0, got 0.0"),
    (-0.5, ValueError, "eps must be a finite number > 0, got -0.5"),
    (NAN, ValueError, "eps must be a finite number > 0, got nan"),
    (INF, ValueError, "eps must be a finite number > 0, got inf"),
    ("1e-4", TypeError, "eps must be a finite number > 0, got '1e-4'"),
])
def test_group_advantages_eps(eps, error, message):
    with pytest.raises(error, match=message):
        group_advantages(torch.ones(2, 3), eps=eps)


def test_group_advantages_equal_rewards_zero():
    assert torch.equal(group_advantages(torch.ones(2, 3)), torch.zeros(2, 3))


# -- finding 20: every numeric field of the configs ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    ({"lr": "1e-4"}, TypeError, "lr must be a finite number > 0, got '1e-4'"),
    ({"lr": INF}, ValueError, "lr must be a finite number > 0, got inf"),
    ({"lr": 0.0}, ValueError, "lr must be a finite number > 0, got 0.0"),
    ({"beta": NAN}, ValueError, "beta must be a finite number > 0, got nan"),
    ({"lam": -1.0}, ValueError, "lam must be a finite number >= 0, got -1.0"),
    ({"lam": INF}, ValueError, "lam must be a finite number >= 0, got inf"),
    ({"steps": True}, TypeError, "steps must be an integer >= 1, got True"),
    ({"steps": 2.0}, TypeError, "steps must be an integer >= 1, got 2.0"),
    ({"steps": 0}, ValueError, "steps must be an integer >= 1, got 0"),
    ({"batch_size": "8"}, TypeError, "batch_size must be an integer >= 1, got '8'"),
    ({"seed": 1.5}, TypeError, "seed must be an integer .*got 1.5"),
    ({"seed": 2**64}, ValueError, "seed must be an integer .*got 18446744073709551616"),
])
def test_cca_config(kwargs, error, message):
    with pytest.raises(error, match=message):
        CCAConfig(**kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"clip": "0.2"}, TypeError, "clip must be a finite number > 0, got '0.2'"),
    ({"clip": 0}, ValueError, "clip must be a finite number > 0, got 0.0"),
    ({"lr": NAN}, ValueError, "lr must be a finite number > 0, got nan"),
    ({"kl_coef": INF}, ValueError, "kl_coef must be a finite number >= 0, got inf"),
    ({"kl_coef": NAN}, ValueError, "kl_coef must be a finite number >= 0, got nan"),
    ({"eval_every": -5}, ValueError, "eval_every must be an integer >= 0, got -5"),
    ({"eval_every": 2.5}, TypeError, "eval_every must be an integer >= 0, got 2.5"),
    ({"eval_per_class": -1}, ValueError, "eval_per_class must be an integer >= 0, got -1"),
    ({"eval_per_class": 0}, ValueError, "eval_per_class must be >= 1 when eval_every > 0"),
    ({"seed": "x"}, TypeError, "seed must be an integer .*got 'x'"),
    ({"group_size": 2.0}, TypeError, "group_size must be an integer >= 2, got 2.0"),
    ({"inner_steps": True}, TypeError, "inner_steps must be an integer >= 1, got True"),
    ({"steps": 0}, ValueError, "steps must be an integer >= 1, got 0"),
    ({"reward": ["classifier"]}, ValueError, "reward must be one of"),
])
def test_grpo_config(kwargs, error, message):
    with pytest.raises(error, match=message):
        GRPOConfig(**kwargs)


def test_configs_accept_valid_values_as_given():
    assert GRPOConfig(eval_every=0, eval_per_class=0).eval_per_class == 0  # what `train grpo` builds
    config = CCAConfig(steps=3, batch_size=2, lr=1e-3, beta=0.1, lam=0.0, seed=-7)
    assert (config.steps, config.batch_size, config.lr, config.beta, config.lam, config.seed) == \
        (3, 2, 1e-3, 0.1, 0.0, -7)


# -- finding 21: the training entries ----------------------------------------------------------------------------

CCA_SMALL = CCAConfig(steps=1, batch_size=2)


@pytest.mark.parametrize("change, error, message", [
    ({"token_maps": "list"}, TypeError, "token_maps must be a tensor, got list"),
    ({"labels": "list"}, TypeError, "labels must be a tensor, got list"),
    ({"config": {"steps": 1}}, TypeError, "config must be a CCAConfig, got dict"),
    ({"empty": True}, ValueError, r"token_maps holds no data \(N = 0\)"),
    ({"labels": torch.tensor([0.0, 1.0])}, ValueError,
     r"labels must be a \(2,\) long tensor, got \(2,\) torch.float32"),
    ({"labels": torch.tensor([0, 3])}, ValueError, r"labels must lie in \[0, 2\], got 3"),
    ({"labels": torch.tensor([0, 1], dtype=torch.int32)}, ValueError, r"labels must be a \(2,\) long tensor"),
])
def test_train_cca_bad_input(policy, maps, change, error, message):
    p = copy.deepcopy(policy)
    token_maps, labels, config = maps, CLASSES, CCA_SMALL
    if change.get("token_maps") == "list":
        token_maps = maps.tolist()
    elif change.get("labels") == "list":
        labels = CLASSES.tolist()
    elif "labels" in change:
        labels = change["labels"]
    if "config" in change:
        config = change["config"]
    if change.get("empty"):
        token_maps, labels = maps[:0], CLASSES[:0]
    before = [t.clone() for t in p.parameters()]
    with pytest.raises(error, match=message):
        train_cca(p, copy.deepcopy(policy), token_maps, labels, config, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, p.parameters()))


def test_train_cca_still_trains(policy, maps):
    p = copy.deepcopy(policy)
    log = train_cca(p, copy.deepcopy(policy), maps, CLASSES, CCA_SMALL, progress=False)
    assert len(log.loss) == 1


@pytest.mark.parametrize("run", [
    lambda p: train_grpo(p, copy.deepcopy(p), None, GRPOConfig(steps=1, eval_every=1), progress=False),
    lambda p: grpo_rollout(p, copy.deepcopy(p), lambda m, c: torch.rand(m.shape[0]), 2, torch.Generator()),
], ids=["train_grpo", "grpo_rollout"])
def test_grpo_needs_a_policy_with_a_grid(run):
    """A class-conditional GPT without a grid (GPTConfig's default) is named as the problem, before any sampling
    (it used to fail inside with "grid must be (rows, cols), got None", an argument the user never passed)."""
    torch.manual_seed(0)
    no_grid = GPT(GPTConfig(vocab_size=5, block_size=5, n_layer=1, n_head=2, n_embd=16, n_classes=3))
    with pytest.raises(ValueError, match=r"policy must be a raster model with a grid .*config.grid=None"):
        run(no_grid)


def test_train_grpo_config_type(policy):
    with pytest.raises(TypeError, match="config must be a GRPOConfig, got dict"):
        train_grpo(copy.deepcopy(policy), policy, None, {"steps": 1}, progress=False)


@pytest.mark.parametrize("call, error, match", [
    (lambda: clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), clip="0.2"), TypeError, "clip"),
    (lambda: clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), clip=float("nan")), ValueError,
     "clip must be a finite number > 0"),
    (lambda: cca_loss(torch.zeros(2), torch.zeros(2), beta=float("nan")), ValueError, "beta must be a finite"),
    (lambda: cca_loss(torch.zeros(2), torch.zeros(2), lam=-1.0), ValueError, "lam must be a finite number >= 0"),
    (lambda: cca_loss(torch.zeros(0), torch.zeros(0)), ValueError, r"of one size B >= 1, got \(0,\)"),  # was nan
    (lambda: group_advantages(torch.zeros(0, 4)), ValueError, r"N >= 1 groups .*got \(0, 4\)"),
    (lambda: wrong_classes([0, 1], 3, torch.Generator()), TypeError, "classes must be a"),
    (lambda: wrong_classes(torch.tensor([0.0, 1.0]), 3, torch.Generator()), ValueError, "classes must be a"),
])
def test_loss_pieces_name_their_bad_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -- rewards that are NaN or inf: refused, not turned into NaN advantages and weights ----------------------------

@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_grpo_rollout_refuses_rewards_that_are_not_finite(policy, bad):
    def reward(maps, classes):  # (B,), the fourth one bad
        out = torch.rand(maps.shape[0], generator=torch.Generator().manual_seed(0))
        out[3] = bad
        return out

    with pytest.raises(ValueError, match=rf"^reward_fn returned {bad} for sample 3 \(of 6\): rewards must be finite "
                                         rf"numbers$"):
        grpo_rollout(policy, copy.deepcopy(policy), reward, 2, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_group_advantages_refuses_rewards_that_are_not_finite(bad):
    rewards = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    rewards[1, 2] = bad
    with pytest.raises(ValueError, match=rf"^rewards must be finite numbers, got {bad} at group 1, sample 2$"):
        group_advantages(rewards)
    rewards[1, 2] = 1e30  # large but finite: still advantages
    assert torch.isfinite(group_advantages(rewards)).all()
