"""Tests of the chapter 00 references (ar_course.checks.reference.ch00) against torch's own softmax, sampling
and cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from ar_course.checks.reference.ch00 import cross_entropy_from_logits, sample_categorical, stable_softmax

NEG_INF = float("-inf")


# stable_softmax -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, dim", [((5, 7), -1), ((4, 3, 6), 1), ((6, 4), 0), ((2, 3, 4, 5), -2), ((9,), 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_matches_torch(shape, dim, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype) * 3
    got = stable_softmax(x, dim)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, torch.softmax(x, dim))


def test_softmax_is_shift_invariant_and_survives_huge_logits():
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(stable_softmax(x + 1e4), stable_softmax(x))  # float64: x + 1e4 stays exact enough
    big = x * 1e4
    assert torch.isnan(torch.exp(big) / torch.exp(big).sum(-1, keepdim=True)).any()  # the naive formula fails
    torch.testing.assert_close(stable_softmax(big), torch.softmax(big, -1))


def test_softmax_minus_infinity_entries_and_rows():
    x = torch.tensor([[0.0, NEG_INF, 1.0], [NEG_INF, NEG_INF, NEG_INF], [NEG_INF, 5.0, NEG_INF]])
    got = stable_softmax(x)
    torch.testing.assert_close(got[0], torch.softmax(x[0], -1))
    assert got[0, 1] == 0
    assert torch.equal(got[1], torch.zeros(3))  # torch.softmax gives NaN here
    assert torch.equal(got[2], torch.tensor([0.0, 1.0, 0.0]))


def test_softmax_gradient_matches_torch_and_is_finite_with_masked_entries():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[0, 2] = NEG_INF
    x[2] = NEG_INF
    w = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x[:2].clone().requires_grad_()
    (stable_softmax(a) * w).sum().backward()
    (torch.softmax(b, -1) * w[:2]).sum().backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad[:2], b.grad)
    assert torch.equal(a.grad[2], torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("bad", [torch.arange(5), torch.tensor(1.0), [0.1, 0.2]])
def test_softmax_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        stable_softmax(bad)


# sample_categorical ---------------------------------------------------------------------------------------


def _frequencies(logits: torch.Tensor, temperature: float, draws: int, seed: int) -> torch.Tensor:
    """Token counts (B, V) of ``draws`` samples per row."""
    b, v = logits.shape
    tokens = sample_categorical(logits.repeat(draws, 1), temperature, torch.Generator().manual_seed(seed))
    assert tokens.shape == (draws * b,) and tokens.dtype == torch.int64
    tokens = tokens.view(draws, b)
    return torch.stack([torch.bincount(tokens[:, r], minlength=v) for r in range(b)])


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_sampling_follows_tempered_softmax(temperature):
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0, 0.3], [0.0, 0.0, 0.0, 0.0, 0.0]])
    counts = _frequencies(logits, temperature, 20_000, seed=int(temperature * 10))
    expected = torch.softmax(logits.double() / temperature, -1) * 20_000
    for r in range(2):
        keep = expected[r] > 5
        obs, exp = counts[r][keep].double(), expected[r][keep]
        obs, exp = torch.cat([obs, (20_000 - obs.sum())[None]]), torch.cat([exp, (20_000 - exp.sum())[None]])
        if exp[-1] < 1e-9:
            obs, exp = obs[:-1], exp[:-1]
        assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-4


def test_sampling_agrees_with_torch_multinomial_in_distribution():
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(4)) * 1.5
    ours = _frequencies(logits, 0.8, 40_000, seed=1)[0].double() / 40_000
    probs = torch.softmax(logits / 0.8, -1)
    theirs = torch.bincount(torch.multinomial(probs.expand(40_000, 8), 1, generator=torch.Generator().manual_seed(2))
                            .squeeze(1), minlength=8).double() / 40_000
    assert (ours - theirs).abs().sum() / 2 < 0.02  # total variation between two 40k-sample histograms


def test_sampling_never_draws_masked_tokens_and_handles_huge_logits():
    logits = torch.tensor([[NEG_INF, 500.0, NEG_INF, 499.0], [1e4, NEG_INF, 1e4 - 1.0, NEG_INF]])
    counts = _frequencies(logits, 1.0, 5_000, seed=3)
    assert counts[0, [0, 2]].sum() == 0 and counts[1, [1, 3]].sum() == 0
    share = counts[:, [1, 0]].diag().double() / 5_000  # the larger of the two allowed tokens
    assert ((share - 1 / (1 + math.exp(-1))).abs() < 0.03).all()


def test_temperature_zero_is_argmax_with_first_index_on_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0], [5.0, 1.0, 5.0], [-1.0, -3.0, -0.5]])
    assert torch.equal(sample_categorical(logits, 0.0), torch.tensor([1, 0, 2]))


def test_sampling_is_reproducible_under_a_generator():
    logits = torch.randn(300, 12, generator=torch.Generator().manual_seed(5))
    a = sample_categorical(logits, 1.0, torch.Generator().manual_seed(9))
    b = sample_categorical(logits, 1.0, torch.Generator().manual_seed(9))
    c = sample_categorical(logits, 1.0, torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_low_temperature_approaches_greedy():
    logits = torch.randn(200, 6, generator=torch.Generator().manual_seed(6)) * 2
    tokens = sample_categorical(logits, 1e-4, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, logits.argmax(-1))


@pytest.mark.parametrize("logits, temperature", [
    (torch.randn(2, 3), -0.5),
    (torch.randn(3), 1.0),
    (torch.randint(0, 3, (2, 3)), 1.0),
])
def test_sampling_rejects_bad_input(logits, temperature):
    with pytest.raises(ValueError):
        sample_categorical(logits, temperature)


# cross_entropy_from_logits --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ignore_index", [-100, 0, 3])
def test_cross_entropy_matches_torch(dtype, ignore_index):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(23, 6, generator=g, dtype=dtype) * 2
    targets = torch.randint(0, 6, (23,), generator=g)
    if ignore_index == -100:
        targets[[1, 5, 9]] = -100  # padding; with ignore_index 0 or 3 the rows of that class do not count
    assert (targets == ignore_index).sum() >= 2
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = cross_entropy_from_logits(a, targets, ignore_index=ignore_index)
    want = F.cross_entropy(b, targets, ignore_index=ignore_index)
    assert got.ndim == 0 and got.dtype == dtype
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_cross_entropy_survives_huge_logits():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(10, 5, generator=g) * 1e4
    targets = torch.randint(0, 5, (10,), generator=g)
    got = cross_entropy_from_logits(logits, targets)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, F.cross_entropy(logits, targets))


def test_cross_entropy_of_uniform_logits_is_log_vocab():
    assert math.isclose(cross_entropy_from_logits(torch.zeros(4, 96), torch.tensor([0, 5, 95, 7])).item(),
                        math.log(96), rel_tol=1e-6)


def test_cross_entropy_with_every_target_ignored_is_nan_like_torch():
    logits, targets = torch.randn(3, 4), torch.full((3,), -100)
    assert torch.isnan(cross_entropy_from_logits(logits, targets))
    assert torch.isnan(F.cross_entropy(logits, targets))


@pytest.mark.parametrize("logits, targets", [
    (torch.randn(4, 5), torch.tensor([0, 1, 5, 2])),  # class 5 does not exist
    (torch.randn(4, 5), torch.tensor([0, 1, -1, 2])),  # negative and not ignore_index
    (torch.randn(4, 5), torch.tensor([0, 1, 2])),  # length mismatch
    (torch.randn(4, 5), torch.tensor([0.0, 1.0, 2.0, 3.0])),  # float targets
    (torch.randn(2, 4, 5), torch.tensor([0, 1])),  # 3-D logits
    (torch.randint(0, 4, (4, 5)), torch.tensor([0, 1, 2, 3])),  # integer logits
])
def test_cross_entropy_rejects_bad_input(logits, targets):
    with pytest.raises(ValueError):
        cross_entropy_from_logits(logits, targets)
