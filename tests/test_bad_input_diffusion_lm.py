"""Bad input to the diffusion language model (chapter 08, text half) fails at the public entry with a one-line
TypeError/ValueError naming the argument, never deep inside torch or silently (API audit items 12, 13, 22, 28)."""

from __future__ import annotations

import math

import pytest
import torch

from ar_course.diffusion_lm import DiffusionLM, DiffusionLMConfig
from ar_course.diffusion_lm import functional as F
from ar_course.transformer.model import KVCache

MASK = 5


def tiny(**kw) -> DiffusionLM:
    torch.manual_seed(0)
    return DiffusionLM(DiffusionLMConfig(vocab_size=5, length=8, n_layer=1, n_head=2, n_embd=16,
                                         train_block_sizes=(0,), **kw)).eval()


# -- item 12: DiffusionLM.logits checks its ids, positions, mask and cache ------------------------------------------


@pytest.mark.parametrize("args, error, match", [
    ((torch.tensor([[9, 1]]), torch.arange(2)), ValueError, r"^x must lie in \[0, 5\], got 9$"),
    ((torch.tensor([[-1, 1]]), torch.arange(2)), ValueError, r"^x must lie in \[0, 5\], got -1$"),
    ((torch.tensor([[1, 1]]), torch.tensor([20, 21])), ValueError, r"^positions must lie in \[0, 7\], got 20$"),
    ((torch.tensor([[1, 1]]), torch.arange(3)), ValueError, r"positions must be a \(2,\) long tensor, got \(3,\)"),
    ((torch.tensor([1, 1]), torch.arange(2)), ValueError, r"x must be a \(B, T\) long tensor, got \(2,\)"),
    ((torch.tensor([[1.0, 1.0]]), torch.arange(2)), ValueError, r"x must be a \(B, T\) long tensor"),
    (([[1, 1]], torch.arange(2)), TypeError, r"x must be a \(B, T\) long tensor, got list"),
    ((torch.tensor([[1, 1]]), torch.arange(2), torch.ones(2, 3, dtype=torch.bool)), ValueError,
     r"^mask must be a \(2, 2\) bool tensor, got \(2, 3\) torch.bool$"),
    ((torch.tensor([[1, 1]]), torch.arange(2), torch.ones(2, 2)), ValueError, r"mask must be a \(2, 2\) bool tensor"),
    ((torch.tensor([[1, 1]]), torch.arange(2), None, {}), TypeError, "cache must be None or a KVCache, got dict"),
])
def test_logits_refuse_bad_ids_positions_and_masks(args, error, match):
    with pytest.raises(error, match=match):
        tiny().logits(*args)


def test_logits_refuse_a_cache_of_another_batch_size():
    model = tiny()
    c = model.gpt.config
    cache = KVCache(c.n_layer, 3, c.n_head, 8, c.head_dim)
    with pytest.raises(ValueError, match=r"cache must be a KVCache of batch size 1 .*got batch size 3"):
        model.logits(torch.tensor([[1, 1]]), torch.arange(2), None, cache)


def test_logits_still_take_the_mask_token_and_give_it_minus_inf():
    out = tiny().logits(torch.tensor([[MASK, 1, 4]]), torch.arange(3))
    assert out.shape == (1, 3, 6) and torch.isinf(out[..., MASK]).all()


# -- item 13: DiffusionLMConfig and generate's flags ----------------------------------------------------------------


@pytest.mark.parametrize("sizes, error, match", [
    ((2.5,), TypeError, r"^train_block_sizes\[0\] must be an integer >= 0, got 2.5 \(float\)$"),
    ((0, "4"), TypeError, r"train_block_sizes\[1\] must be an integer >= 0, got '4' \(str\)"),
    (4, TypeError, r"^train_block_sizes must be a tuple of block sizes \(0: length\), got 4 \(int\)$"),
    ((-2,), ValueError, r"train_block_sizes\[0\] must be an integer >= 0, got -2"),
    ((3,), ValueError, r"^train_block_sizes: 3 is neither 0 nor a divisor of length 8$"),
    ((), ValueError, "train_block_sizes must name at least one block size"),
])
def test_config_refuses_block_sizes_that_are_not_integers(sizes, error, match):
    with pytest.raises(error, match=match):
        DiffusionLMConfig(length=8, train_block_sizes=sizes)


def test_config_says_when_the_refused_block_size_is_the_default():
    with pytest.raises(ValueError, match=r"train_block_sizes: 16 is neither 0 nor a divisor of length 8 "
                                         r"\(train_block_sizes is the default \(0, 0, 1, 4, 16\).*"
                                         r"pass train_block_sizes=\(0,\)"):
        DiffusionLMConfig(length=8)


def test_config_still_takes_a_list_from_json():
    assert DiffusionLMConfig(length=8, train_block_sizes=[0, 2, 8]).train_block_sizes == (0, 2, 8)
    assert DiffusionLMConfig().train_block_sizes == (0, 0, 1, 4, 16)


@pytest.mark.parametrize("flag", ["no", 1, None])
def test_generate_refuses_a_return_states_that_is_not_a_bool(flag):
    with pytest.raises(TypeError, match="return_states must be True or False"):
        tiny().generate(1, 8, steps=8, return_states=flag)


def test_generate_still_returns_states_when_asked():
    x, states = tiny().generate(1, 8, steps=4, block_size=4, return_states=True)
    assert x.shape == (1, 8) and states.shape == (5, 1, 8)
    assert isinstance(tiny().generate(1, 8, steps=4, return_states=False), torch.Tensor)


# -- item 28: a dict config is refused by name ----------------------------------------------------------------------


def test_diffusion_lm_refuses_a_dict_config():
    with pytest.raises(TypeError, match=r"^config must be a DiffusionLMConfig, got dict \(DiffusionLMConfig\.from"):
        DiffusionLM({"vocab_size": 5})


# -- item 22: the plain pieces -----------------------------------------------------------------------------------


X = torch.full((1, 4), MASK)
PROPOSAL = torch.tensor([[1, 2, 3, 4]])


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((X, PROPOSAL, 0.0, 1.0, MASK), {}, ValueError,
     r"^s must be < t \(a reverse step goes from time t down to s\), got t=0.0, s=1.0$"),
    ((X, PROPOSAL, 0.0, 0.0, MASK), {}, ValueError, r"s must be < t .*got t=0.0, s=0.0"),
    ((X, PROPOSAL, 0.5, 0.5, MASK), {}, ValueError, r"s must be < t .*got t=0.5, s=0.5"),
    ((X, PROPOSAL, math.nan, 0.0, MASK), {}, ValueError, r"^t must be a finite number in \[0, 1\], got nan$"),
    ((X, PROPOSAL, 1.5, 0.0, MASK), {}, ValueError, r"t must be a finite number in \[0, 1\], got 1.5"),
    ((X, PROPOSAL, 1.0, "0"), {"mask_id": MASK}, TypeError, r"s must be a finite number in \[0, 1\]"),
    ((X, PROPOSAL[:, :2], 1.0, 0.0, MASK), {}, ValueError, r"proposal must have the shape of x \(1, 4\), got \(1, 2\)"),
    ((X, PROPOSAL, 1.0, 0.0, MASK), {"u": torch.rand(4)}, ValueError, r"u must have the shape of x \(1, 4\)"),
    ((X.float(), PROPOSAL, 1.0, 0.0, MASK), {}, ValueError, r"x must be an integer \(B, L\) tensor"),
    ((X, PROPOSAL, 1.0, 0.0, 5.0), {}, TypeError, r"mask_id must be an integer, got 5.0"),
    ((None, PROPOSAL, 1.0, 0.0, MASK), {}, TypeError, r"^x must be a tensor, got NoneType$"),
    ((X, None, 1.0, 0.0, MASK), {}, TypeError, r"^proposal must be a tensor, got NoneType$"),
])
def test_denoise_step_refuses_steps_that_reveal_nothing_and_bad_shapes(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        F.denoise_step(*args, **kwargs)


def test_denoise_step_still_reveals_everything_from_one_to_zero():
    assert torch.equal(F.denoise_step(X, PROPOSAL, 1.0, 0.0, MASK), PROPOSAL)


@pytest.mark.parametrize("schedule", F.SCHEDULES)
def test_unmask_probability_is_one_at_s_zero_even_at_t_zero(schedule):
    p = F.unmask_probability(torch.tensor([0.0, 0.3, 1.0]), torch.tensor(0.0), schedule)
    assert p.tolist() == [1.0, 1.0, 1.0]
    t, s = torch.tensor([0.7, 0.5]), torch.tensor([0.3, 0.5])  # valid times: the formula, as before
    a_t, a_s = F.alpha(t, schedule), F.alpha(s, schedule)
    assert torch.equal(F.unmask_probability(t, s, schedule), ((a_s - a_t) / (1.0 - a_t)).clamp(0.0, 1.0))


@pytest.mark.parametrize("schedule", F.SCHEDULES)
def test_alpha_and_loss_weight_take_python_floats_in_both_schedules(schedule):
    for fn in (F.alpha, F.loss_weight):
        assert fn(0.5, schedule) == pytest.approx(float(fn(torch.tensor(0.5, dtype=torch.float64), schedule)))
    assert float(F.unmask_probability(0.7, 0.3, schedule)) == pytest.approx(
        float(F.unmask_probability(torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64),
                                   schedule)))


@pytest.mark.parametrize("call, error, match", [
    (lambda: F.alpha(1.5), ValueError, r"^t must be a finite number in \[0, 1\], got 1.5$"),
    (lambda: F.alpha("0.5", "cosine"), TypeError, r"t must be a finite number in \[0, 1\], got '0.5'"),
    (lambda: F.loss_weight(0.0), ValueError, r"t must be a finite number in \(0, 1\], got 0.0"),
    (lambda: F.masked_nll(torch.randn(1, 3, 5), torch.tensor([[0, 1, 9]]), torch.ones(1, 3, dtype=torch.bool),
                          torch.ones(())), ValueError, r"^targets must lie in \[0, 4\], got 9$"),
    (lambda: F.masked_nll(torch.randn(1, 3, 5), torch.tensor([[0.0, 1.0, 2.0]]), torch.ones(1, 3, dtype=torch.bool),
                          torch.ones(())), ValueError, r"targets must be a \(1, 3\) long tensor"),
    (lambda: F.masked_nll(torch.randn(3, 5), torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool),
                          torch.ones(())), ValueError, r"logits must be a float \(B, L, V\) tensor, got \(3, 5\)"),
    (lambda: F.masked_nll(torch.randn(1, 3, 5), torch.tensor([[0, 1, 2]]), torch.ones(1, 3), torch.ones(())),
     ValueError, r"masked must be a \(1, 3\) bool tensor"),
    (lambda: F.block_attention_mask(8, 0), ValueError, r"^block_size must be an integer >= 1, got 0$"),
    (lambda: F.block_spans(8.0, 2), TypeError, r"length must be an integer >= 1, got 8.0"),
    (lambda: F.block_schedule(8, 2, 4.0), TypeError, r"^steps must be an integer >= 1, got 4.0 \(float\)$"),
    (lambda: F.block_schedule(8, 2, "4"), TypeError, r"steps must be an integer >= 1, got '4'"),
    (lambda: F.time_grid(2.5), TypeError, r"^steps must be an integer >= 1, got 2.5 \(float\)$"),
    (lambda: F.time_grid(0), ValueError, r"steps must be an integer >= 1, got 0"),
])
def test_plain_pieces_refuse_bad_input_in_one_line(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_masked_nll_still_sums_the_weighted_masked_cross_entropy():
    logits, targets = torch.randn(2, 3, 5), torch.tensor([[0, 1, 4], [2, 2, 3]])
    masked = torch.tensor([[True, False, True], [False, False, False]])
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    assert torch.equal(F.masked_nll(logits, targets, masked, torch.ones(())), (nll * masked).sum(1))


def test_mask_tokens_takes_one_number_and_names_its_bad_arguments():
    ids = torch.arange(12).view(2, 6)
    noise = torch.rand(2, 6, generator=torch.Generator().manual_seed(0))
    by_number = F.mask_tokens(ids, 0.5, 99, noise=noise)
    by_tensor = F.mask_tokens(ids, torch.full((2, 1), 0.5), 99, noise=noise)
    assert all(torch.equal(a, b) for a, b in zip(by_number, by_tensor))
    for call, error, match in [
        (lambda: F.mask_tokens(ids.tolist(), 0.5, 99), TypeError, "ids must be a"),
        (lambda: F.mask_tokens(ids.float(), 0.5, 99), ValueError, "ids must be a"),
        (lambda: F.mask_tokens(ids, torch.rand(2), 99), ValueError, "t must broadcast"),
        (lambda: F.mask_tokens(ids, 1.5, 99), ValueError, "t must be a finite number in"),
        (lambda: F.mask_tokens(ids, 0.5, 99, noise=noise.tolist()), TypeError,
         "^noise must be a tensor or None, got list$"),
    ]:
        with pytest.raises(error, match=match):
            call()


def test_the_trainers_helpers_refuse_what_they_cannot_use():
    """2-D ids reached a view ("shape '[1, 8]' is invalid") and an empty block list torch.randint's 'from'."""
    from ar_course.diffusion_lm.train import diffusion_batches, evaluate_bound

    model = DiffusionLM(DiffusionLMConfig(vocab_size=5, length=8, n_layer=1, n_head=1, n_embd=8,
                                          train_block_sizes=(0,)))
    for ids, got in ((torch.zeros(2, 8, dtype=torch.long), r"\(2, 8\)"), (torch.zeros(7, dtype=torch.long), r"\(7,\)")):
        with pytest.raises(ValueError, match=r"^ids must be a 1-D tensor of token ids holding at least one window "
                                             r"of 8, got " + got + "$"):
            evaluate_bound(model, ids)
    with pytest.raises(ValueError, match=r"^block_sizes must list at least one block size \(0: the whole window\)$"):
        next(diffusion_batches(torch.zeros(100, dtype=torch.long), 8, 2, (), 0))
