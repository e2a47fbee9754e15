"""Tests of ar_course.sampling: the filters keep exactly the right sets, sampling follows probs()."""

from __future__ import annotations

import itertools

import pytest
import torch

from ar_course import sampling
from ar_course.sampling import GREEDY, SamplingConfig
from ar_course.masked.functional import gumbel_noise, random_mask
from ar_course.raster.functional import condition_dropout

NEG_INF = float("-inf")


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def brute_force_top_p(probs: list[float], p: float) -> set[int]:
    """Smallest-mass-first search: the smallest set of most likely tokens with mass >= p, plus ties."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    chosen, mass = [], 0.0
    for i in order:
        if mass >= p - 1e-12:
            break
        chosen.append(i)
        mass += probs[i]
    smallest = min(probs[i] for i in chosen)
    return {i for i, q in enumerate(probs) if q >= smallest}


def test_greedy_is_argmax_and_sample_at_temperature_zero_is_greedy():
    logits = torch.randn(5, 11)
    assert torch.equal(sampling.greedy(logits), logits.argmax(-1))
    assert torch.equal(sampling.sample(logits, sampling=GREEDY), logits.argmax(-1))


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 2.0, -1.0, 3.0, 0.5]])
    assert kept(sampling.top_k_filter(logits, 2)[0]) == {1, 3}
    assert kept(sampling.top_k_filter(logits, 1)[0]) == {3}
    out = sampling.top_k_filter(logits, 3)
    assert torch.equal(out[0, [1, 3, 4]], logits[0, [1, 3, 4]])  # kept values untouched
    assert torch.equal(sampling.top_k_filter(logits, 5), logits)
    assert torch.equal(sampling.top_k_filter(logits, 50), logits)
    with pytest.raises(ValueError, match="top_k"):
        sampling.top_k_filter(logits, 0)


def test_top_k_keeps_ties_with_the_kth_value():
    logits = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0, 0.0]])
    assert kept(sampling.top_k_filter(logits, 3)[0]) == {0, 1, 2, 3, 4}
    assert kept(sampling.top_k_filter(logits, 2)[0]) == {1, 3}


def test_top_k_batched_rows_are_independent():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 20, generator=g)
    out = sampling.top_k_filter(logits, 6)
    for i, j in itertools.product(range(4), range(3)):
        assert kept(out[i, j]) == set(torch.topk(logits[i, j], 6).indices.tolist())


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    assert kept(sampling.top_p_filter(logits, 0.6)[0]) == {0, 1}  # 0.5 < 0.6, the 0.3 token crosses
    assert kept(sampling.top_p_filter(logits, 0.5)[0]) == {0}
    assert kept(sampling.top_p_filter(logits, 0.81)[0]) == {0, 1, 2}
    assert kept(sampling.top_p_filter(logits, 0.01)[0]) == {0}  # the top token is always kept
    assert kept(sampling.top_p_filter(logits, 0.999)[0]) == {0, 1, 2, 3}


def test_top_p_one_keeps_everything():
    logits = torch.randn(3, 9)
    assert torch.equal(sampling.top_p_filter(logits, 1.0), logits)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            sampling.top_p_filter(logits, bad)


def test_top_p_keeps_ties_of_the_last_kept_token():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, -3.0]])
    probs = torch.softmax(logits, -1)[0].tolist()
    out = sampling.top_p_filter(logits, probs[0] + 0.01)  # needs one more token: all three tied ones
    assert kept(out[0]) == {0, 1, 2, 3}


def test_top_p_matches_brute_force_on_random_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 13, generator=g) * 2
    ps = torch.rand(200, generator=g).clamp(0.05, 0.99).tolist()
    for row, p in zip(logits, ps):
        probs = torch.softmax(row.double(), -1).tolist()
        assert kept(sampling.top_p_filter(row[None], p)[0]) == brute_force_top_p(probs, p)


def test_process_logits_order_and_greedy():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])

    def process(**kw):
        return sampling.process_logits(logits, sampling=SamplingConfig(**kw))

    # top-p acts on the tempered distribution: a higher temperature flattens it, so more tokens are needed
    assert kept(process(temperature=1.0, top_p=0.5)[0]) == {0}
    assert kept(process(temperature=0.1, top_p=0.5)[0]) == {0}
    assert len(kept(process(temperature=10.0, top_p=0.5)[0])) == 3
    assert kept(process(temperature=1.0, top_k=4, top_p=0.99)[0]) == {0, 1, 2, 3}
    assert kept(process(temperature=0.0)[0]) == {0}
    assert torch.equal(sampling.probs(logits, sampling=GREEDY), torch.tensor([[1.0, 0, 0, 0, 0]]))


def test_sampling_config_checks_and_normalises_its_values():
    config = SamplingConfig(temperature=1, top_k=3, top_p=1)
    assert (config.temperature, config.top_k, config.top_p) == (1.0, 3, 1.0)
    assert type(config.temperature) is float and type(config.top_p) is float
    assert GREEDY.greedy and not config.greedy and SamplingConfig() == SamplingConfig(1.0, None, None)
    for kw, error, match in [({"temperature": -1.0}, ValueError, "temperature"), ({"top_k": 0}, ValueError, "top_k"),
                             ({"top_k": 2.0}, TypeError, "top_k"), ({"top_p": 0.0}, ValueError, "top_p"),
                             ({"temperature": "1"}, TypeError, "temperature"), ({"top_p": True}, TypeError, "top_p")]:
        with pytest.raises(error, match=match):
            SamplingConfig(**kw)
    with pytest.raises(AttributeError):
        config.temperature = 2.0  # frozen
    with pytest.raises(TypeError, match="sampling must be a SamplingConfig"):
        sampling.sample(torch.zeros(1, 3), sampling={"temperature": 0})


def test_probs_is_normalised_and_zero_outside_the_kept_set():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 30, generator=g)
    config = SamplingConfig(temperature=0.7, top_k=10, top_p=0.8)
    p = sampling.probs(logits, sampling=config)
    assert torch.allclose(p.sum(-1), torch.ones(6))
    filtered = sampling.process_logits(logits, sampling=config)
    assert torch.equal(p > 0, torch.isfinite(filtered))
    assert ((p > 0).sum(-1) <= 10).all()


def test_sample_is_reproducible_and_follows_probs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 8, generator=g)
    config = SamplingConfig(temperature=0.9, top_k=5, top_p=0.9)
    a = sampling.sample(logits.expand(4000, 8), sampling=config, generator=torch.Generator().manual_seed(1))
    b = sampling.sample(logits.expand(4000, 8), sampling=config, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4000,) and a.dtype == torch.long and torch.equal(a, b)
    freq = torch.bincount(a, minlength=8).float() / 4000
    expected = sampling.probs(logits, sampling=config)[0]
    assert (freq[expected == 0] == 0).all()
    assert (freq - expected).abs().max() < 0.03  # ~4 standard errors at n=4000


def test_sample_keeps_leading_dims():
    logits = torch.randn(2, 3, 7)
    assert sampling.sample(logits, generator=torch.Generator().manual_seed(0)).shape == (2, 3)
    assert sampling.sample_from_probs(torch.softmax(logits, -1)).shape == (2, 3)


def test_cfg_mix_limits():
    """Strength w: 0 is the conditional prediction exactly, -1 the unconditional one, and w > 0 extrapolates
    from the unconditional through the conditional (the guidance scale s = 1 + w of the CFG paper)."""
    cond, uncond = torch.randn(3, 10), torch.randn(3, 10)
    assert torch.equal(sampling.cfg_mix(cond, uncond, 0.0), cond)
    assert torch.allclose(sampling.cfg_mix(cond, uncond, -1.0), uncond, atol=1e-6)
    assert torch.allclose(sampling.cfg_mix(cond, uncond, 2.0), cond + 2 * (cond - uncond), atol=1e-6)
    assert torch.allclose(sampling.cfg_mix(cond, uncond, 2.0), uncond + 3 * (cond - uncond), atol=1e-5)
    with pytest.raises(ValueError, match=r"^cond_logits and uncond_logits must have one shape, "
                                         r"got \(3, 10\) and \(3, 5\)$"):
        sampling.cfg_mix(cond, uncond[:, :5], 2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cfg_mix_of_half_logits_is_computed_in_float32(dtype):
    """Under autocast a model's logits are half precision; mixed in it, (1 + w) cond - w uncond loses most of
    bf16's 8 bits (about 0.25 of a logit at w = 2 on the shipped VAR). The mix is done and returned in float32."""
    g = torch.Generator().manual_seed(0)
    cond, uncond = (torch.randn(4, 50, generator=g) * 8).to(dtype), (torch.randn(4, 50, generator=g) * 8).to(dtype)
    mixed = sampling.cfg_mix(cond, uncond, 2.0)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, 3 * cond.float() - 2 * uncond.float())
    assert sampling.cfg_mix(cond.double(), uncond.double(), 2.0).dtype == torch.float64


# -- temperatures too large for the logits' dtype, float64 logits beyond float32 ---------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_finite_temperature_too_large_for_the_dtype_keeps_excluded_tokens_excluded(dtype):
    """1e39 is a finite temperature (SamplingConfig accepts it) that float32 rounds to inf: -inf / inf was NaN,
    so the probabilities were NaN and the drawn id was V. Excluded tokens stay excluded, the rest become flat."""
    config = SamplingConfig(temperature=1e39)
    one_allowed = torch.tensor([[NEG_INF, NEG_INF, 2.0, NEG_INF]], dtype=dtype)
    assert torch.equal(sampling.probs(one_allowed, sampling=config), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    for seed in range(5):
        assert sampling.sample(one_allowed, sampling=config, generator=torch.Generator().manual_seed(seed)).item() == 2
    tempered = sampling.apply_temperature(one_allowed, 1e39)
    assert tempered.dtype == dtype and torch.equal(tempered.float(), torch.tensor([[NEG_INF, NEG_INF, 0.0, NEG_INF]]))
    two_allowed = torch.tensor([[0.0, 1.0, NEG_INF]], dtype=dtype)
    assert torch.equal(sampling.probs(two_allowed, sampling=SamplingConfig(temperature=1e300, top_k=2)),
                       torch.tensor([[0.5, 0.5, 0.0]]))
    ids = sampling.sample(two_allowed.expand(200, 3), sampling=config, generator=torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {0, 1}


def test_float64_logits_beyond_float32_are_sampled_not_refused():
    """A finite float64 logit of 1e300 overflowed the cast to float32 and was refused as +inf."""
    logits = torch.tensor([[1e300, 0.0, 1.0], [-1e300, -2e300, 5.0], [NEG_INF, -1e300, -1e300 - 1e290]],
                          dtype=torch.float64)
    assert sampling.greedy(logits).tolist() == [0, 2, 1]
    assert torch.equal(sampling.probs(logits), torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]]))
    assert sampling.sample(logits, generator=torch.Generator().manual_seed(0)).tolist() == [0, 2, 1]
    assert torch.equal(sampling.process_logits(logits, sampling=GREEDY),
                       torch.tensor([[0.0, NEG_INF, NEG_INF], [NEG_INF, NEG_INF, 0.0], [NEG_INF, 0.0, NEG_INF]]))
    # tempered in float64 first: 1e300 at temperature 1e300 is a logit of 1, not 0 after a shift
    got = sampling.probs(torch.tensor([[1e300, 0.0]], dtype=torch.float64), sampling=SamplingConfig(temperature=1e300))
    torch.testing.assert_close(got, torch.softmax(torch.tensor([[1.0, 0.0]]), -1))
    small = torch.randn(3, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    config = SamplingConfig(temperature=0.7, top_k=5)
    torch.testing.assert_close(sampling.probs(small, sampling=config), sampling.probs(small.float(), sampling=config))


@pytest.mark.parametrize("offset", [1e8, 1e15])
def test_float64_logits_with_a_large_common_offset_keep_their_differences(offset):
    """Narrowed to float32 before the shift, 1e8 + [0, 0.5, 1] became three equal logits (a uniform draw, and
    top-p kept a token of probability 0)."""
    logits = torch.tensor([[0.0, 0.5, 1.0]], dtype=torch.float64)
    exact = torch.softmax(logits.float(), -1)
    torch.testing.assert_close(sampling.probs(logits + offset), exact)
    nucleus = SamplingConfig(temperature=0.5, top_p=0.9)
    torch.testing.assert_close(sampling.probs(logits + offset, sampling=nucleus),
                               sampling.probs(logits, sampling=nucleus))
    assert sampling.probs(logits + offset, sampling=nucleus)[0, 0] == 0


def test_nan_or_inf_in_float16_logits_hints_at_the_precision():
    for bad in (float("nan"), float("inf")):
        logits = torch.tensor([[bad, 1.0]], dtype=torch.float16)
        for call in (sampling.greedy, sampling.sample, sampling.probs):
            with pytest.raises(ValueError, match=r"^logits row 0 \(of 1\) contains .*overflowed float16; run it in "
                                                 r"float32 or bfloat16\)$"):
                call(logits)
    with pytest.raises(ValueError, match=r"^logits row 0 \(of 1\) contains NaN$"):  # float32: no hint
        sampling.sample(torch.tensor([[float("nan"), 1.0]]))


LOGITS = torch.randn(500, 7, generator=torch.Generator().manual_seed(1))  # float32


@pytest.mark.parametrize("draw", [
    pytest.param(lambda g: sampling.sample(LOGITS, generator=g), id="sample"),
    pytest.param(lambda g: random_mask(4, 16, generator=g), id="random_mask"),
    pytest.param(lambda g: gumbel_noise((3, 5), generator=g).float(), id="gumbel_noise"),
    pytest.param(lambda g: condition_dropout(torch.arange(10).repeat(5), 0.5, 10, generator=g), id="condition_dropout"),
])
def test_seeded_draws_do_not_depend_on_the_default_dtype(draw):
    """A seeded draw gives the same result when the caller has made float64 torch's default dtype: the uniform
    numbers are float32 by choice, not by default (950 of 1,000 sampled tokens used to change)."""
    want = draw(torch.Generator().manual_seed(0))
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = draw(torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(before)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
