"""ar_course.speculative: exactness (greedy equality, distribution tests with power), acceptance, cache
rollback, the expected-length formula, Speculative Jacobi Decoding and relaxed acceptance."""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats as sps

from ar_course import sampling
from ar_course.sampling import GREEDY, SamplingConfig
from ar_course.checks.reference.ch05 import relaxed_acceptance_probability
from ar_course.speculative import (
    acceptance_probability,
    codebook_neighbors,
    decoding,
    expected_speedup,
    expected_tokens_per_call,
    jacobi_verify,
    relaxed_target,
    residual_distribution,
    rollback_caches,
    sjd_generate,
    speculative_generate,
    speculative_round,
)
from ar_course.transformer import GPT, GPTConfig


def tiny_gpt(seed: int, vocab: int = 5, n_layer: int = 1, n_embd: int = 16, n_classes: int = 0,
             block_size: int = 32, scale: float = 40.0) -> GPT:
    """A random GPT whose outputs depend clearly on the context (weights scaled up from GPT-2's init)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd,
                      n_classes=n_classes)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(scale ** 0.5 if p is not m.wte.weight else scale ** 0.25)
    return m


def chi2_pvalue(samples: list[tuple], probs: dict[tuple, float]) -> float:
    """Chi-square goodness of fit of ``samples`` to ``probs`` (outcomes with small expectation pooled)."""
    n = len(samples)
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    assert set(counts) <= {k for k, v in probs.items() if v > 0}, "an impossible outcome was sampled"
    keys = sorted(probs, key=lambda k: -probs[k])
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for k in keys:
        if probs[k] * n >= 5:
            obs.append(counts.get(k, 0))
            exp.append(probs[k] * n)
        else:
            rest_o += counts.get(k, 0)
            rest_e += probs[k] * n
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    exp = np.array(exp) * n / sum(exp)
    return float(sps.chisquare(obs, exp).pvalue)


def exact_continuations(model: GPT, prefix: torch.Tensor, n: int, config: SamplingConfig) -> dict[tuple, float]:
    """Probability of every continuation of ``n`` tokens under ``sampling.probs`` (enumerated)."""
    V = model.config.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))  # (V**n, n)
    full = torch.cat([prefix.expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        logits, _ = model(full[:, :-1])
    p = sampling.probs(logits[:, prefix.shape[1] - 1:], sampling=config).double()  # (V**n, n, V)
    lik = p.gather(-1, seqs[..., None]).squeeze(-1).prod(-1)
    return {tuple(s.tolist()): float(v) for s, v in zip(seqs, lik)}


# --- the pieces --------------------------------------------------------------------------------------------


def test_acceptance_and_residual():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]])
    a = acceptance_probability(p, q, torch.tensor([0, 3]))
    torch.testing.assert_close(a, torch.tensor([1.0, 1.0]))
    a = acceptance_probability(p, q, torch.tensor([2, 1]))
    torch.testing.assert_close(a, torch.tensor([0.8, 1.0]))
    r = residual_distribution(p, q)
    torch.testing.assert_close(r[0], torch.tensor([0.25, 0.05, 0.0, 0.0]) / 0.3)
    torch.testing.assert_close(r[1], p[1])  # p == q: nothing left, falls back to p
    with pytest.raises(ValueError):
        acceptance_probability(p, q[:1], torch.tensor([0, 1]))


def test_expected_tokens_formula():
    assert expected_tokens_per_call(0.0, 5) == 1.0
    assert expected_tokens_per_call(1.0, 4) == 5.0
    assert expected_tokens_per_call(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens_per_call(0.999999, 3) == pytest.approx(4.0, rel=1e-4)
    assert expected_speedup(0.8, 4, 0.0) == pytest.approx(expected_tokens_per_call(0.8, 4))
    assert expected_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8**5) / 0.2 / 1.4)
    with pytest.raises(ValueError):
        expected_tokens_per_call(1.5, 3)


def _rounds(fn, p, q, n, seed=0):
    """Run ``fn`` (a speculative round) ``n`` times with fresh drafts from ``q``; returns the outputs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        draft = sampling.sample_from_probs(q, g)
        u = torch.rand(q.shape[0], generator=g)
        out.append(fn(p, q, draft, u, g).tolist())
    return out


def _round_case():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(4, 5, generator=g) * 1.5, -1).double()  # L = 3 drafts, V = 5
    q = torch.softmax(torch.randn(3, 5, generator=g) * 1.5, -1).double()
    return p, q


def _round_statistics(fn, n=6000):
    """p-values that every emitted position follows its row of p, and the mean length vs its exact value."""
    p, q = _round_case()
    outs = _rounds(fn, p, q, n)
    pvals = []
    for j in range(p.shape[0]):
        toks = [(o[j],) for o in outs if len(o) > j]
        if len(toks) > 200:
            pvals.append(chi2_pvalue(toks, {(v,): float(p[j, v]) for v in range(p.shape[1])}))
    alpha = torch.minimum(p[:3], q).sum(-1)
    exp_len = 1 + sum(float(alpha[:j].prod()) for j in range(1, 4))
    return min(pvals), np.mean([len(o) for o in outs]), exp_len, n


def test_round_is_exact_and_length_matches():
    pmin, mean_len, exp_len, n = _round_statistics(speculative_round)
    assert pmin > 1e-3
    assert abs(mean_len - exp_len) < 0.05


def _no_residual(p, q, draft, u, g):  # resamples from p instead of the residual
    a = acceptance_probability(p[:-1], q, draft)
    for i in range(len(draft)):
        if u[i] >= a[i]:
            return torch.cat([draft[:i], sampling.sample_from_probs(p[i], g).view(1)])
    return torch.cat([draft, sampling.sample_from_probs(p[-1], g).view(1)])


def _no_bonus(p, q, draft, u, g):  # forgets the bonus token when every draft is accepted
    out = speculative_round(p, q, draft, u, g)
    return out[:-1] if len(out) == len(draft) + 1 else out


def _no_min(p, q, draft, u, g):  # accepts with p/q capped differently: q/p (a classic slip)
    a = acceptance_probability(q, p[:-1], draft)
    for i in range(len(draft)):
        if u[i] >= a[i]:
            return torch.cat([draft[:i], sampling.sample_from_probs(residual_distribution(p[i], q[i]), g).view(1)])
    return torch.cat([draft, sampling.sample_from_probs(p[-1], g).view(1)])


def test_round_statistics_have_power():
    pmin, _, _, _ = _round_statistics(_no_residual)
    assert pmin < 1e-4
    pmin, _, _, _ = _round_statistics(_no_min)
    assert pmin < 1e-4
    _, mean_len, exp_len, _ = _round_statistics(_no_bonus)
    assert abs(mean_len - exp_len) > 0.1


def test_disjoint_draft_falls_back_to_target():
    p = torch.tensor([[0.0, 0.0, 0.7, 0.3], [0.1, 0.2, 0.3, 0.4]]).double()
    q = torch.tensor([[0.6, 0.4, 0.0, 0.0]]).double()
    outs = _rounds(speculative_round, p, q, 3000)
    assert all(len(o) == 1 for o in outs)  # never accepted
    assert chi2_pvalue([(o[0],) for o in outs], {(v,): float(p[0, v]) for v in range(4)}) > 1e-3


def test_rollback_caches():
    m = tiny_gpt(0)
    a, b = m.make_cache(1, 20), m.make_cache(1, 20)
    a.advance(12)
    b.advance(5)
    rollback_caches([a, b], 9)
    assert (a.length, b.length) == (8, 5)
    with pytest.raises(ValueError):
        rollback_caches([a], 0)


# --- speculative_generate ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_equals_target_greedy(gamma):
    target, draft = tiny_gpt(1, vocab=11, n_layer=2, block_size=48), tiny_gpt(2, vocab=11, block_size=48)
    for seed in range(3):
        prefix = torch.randint(11, (1, 1 + seed * 3), generator=torch.Generator().manual_seed(seed))
        expected = target.generate(prefix, 30, sampling=GREEDY)
        got, st = speculative_generate(target, draft, prefix, 30, gamma=gamma, sampling=GREEDY,
                                       generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, expected)
        assert st.new_tokens == 30 and st.target_calls < 30 + 1
        assert 0 < st.acceptance_rate < 1  # a random draft agrees sometimes, not always


def test_gamma_zero_is_plain_sampling():
    """No drafts: every round is one target call and one draw from p, the draws ``generate`` makes."""
    target, draft = tiny_gpt(1, vocab=11, n_layer=2, block_size=48), tiny_gpt(2, vocab=11, block_size=48)
    prefix = torch.tensor([[3, 1, 4]])
    for config in (SamplingConfig(), SamplingConfig(temperature=0.7, top_k=4), GREEDY):
        expected = target.generate(prefix, 30, sampling=config, generator=torch.Generator().manual_seed(5))
        got, st = speculative_generate(target, draft, prefix, 30, gamma=0, sampling=config,
                                       generator=torch.Generator().manual_seed(5))
        assert torch.equal(got, expected)
        assert (st.target_calls, st.draft_calls) == (30, 0)
    got, st = speculative_generate(target, draft, prefix, 0, gamma=3)
    assert torch.equal(got, prefix) and st.target_calls == 0


def test_identical_draft_is_always_accepted():
    target = tiny_gpt(1, vocab=11, n_layer=2, block_size=48)
    prefix = torch.tensor([[3, 1]])
    for config in (SamplingConfig(), SamplingConfig(temperature=0.7, top_k=4),
                   SamplingConfig(temperature=1.3, top_p=0.8)):
        g = torch.Generator().manual_seed(0)
        _, st = speculative_generate(target, target, prefix, 40, gamma=4, sampling=config, generator=g)
        assert st.acceptance_rate == 1.0
        assert st.accepted_hist == [0, 0, 0, 0, 8] and st.target_calls == 8  # 40 tokens = 8 rounds of 4 + bonus
        assert st.draft_calls == st.proposed


def test_speculative_generate_samples_the_target_distribution():
    """End to end (caches, rollback, temperature and top-k): 500 samples of 3 tokens over a 3-token vocabulary
    against the enumerated target distribution. (The power against a wrong residual or a missing bonus
    token is shown on single rounds above, where many more samples are cheap.)"""
    config = SamplingConfig(temperature=0.8, top_k=2)
    target, draft = tiny_gpt(11, vocab=3, block_size=16), tiny_gpt(12, vocab=3, block_size=16, scale=3.0)
    prefix = torch.tensor([[1, 2]])
    exact = exact_continuations(target, prefix, 3, config)
    draft_dist = exact_continuations(draft, prefix, 3, config)
    assert 0.5 * sum(abs(exact[k] - draft_dist[k]) for k in exact) > 0.1  # the draft alone would be off
    g = torch.Generator().manual_seed(0)
    samples, total = [], decoding.SpecStats()
    for _ in range(500):
        out, st = speculative_generate(target, draft, prefix, 3, gamma=2, sampling=config, generator=g)
        samples.append(tuple(out[0, 2:].tolist()))
        total.merge(st)
    assert chi2_pvalue(samples, exact) > 1e-3
    assert 0.2 < total.acceptance_rate < 0.95


def test_speculative_generate_rejects_bad_input():
    m = tiny_gpt(0)
    with pytest.raises(ValueError):
        speculative_generate(m, m, torch.tensor([[1], [2]]), 3)
    with pytest.raises(ValueError):
        speculative_generate(m, tiny_gpt(0, vocab=6), torch.tensor([[1]]), 3)
    with pytest.raises(ValueError):
        speculative_generate(m, m, torch.tensor([[1]]), 40)  # past block_size
    # whose context is too short is named (here the draft's: 8 positions, the target's 32)
    with pytest.raises(ValueError, match=r"^draft: 1 prompt token and 12 new tokens need 12 positions, more than "
                                         r"the model's context of 8 \(config.block_size\)$"):
        speculative_generate(m, tiny_gpt(0, block_size=8), torch.tensor([[1]]), 12)


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_class_conditional_greedy_equals_target_greedy(cfg):
    """Image-style models: an empty prefix, a class token, guidance in a batch of 2 in both models."""
    target = tiny_gpt(21, vocab=9, n_layer=2, n_classes=3, block_size=40)
    draft = tiny_gpt(22, vocab=9, n_classes=3, block_size=40, scale=3.0)
    empty = torch.zeros(1, 0, dtype=torch.long)
    for c in range(3):
        cls = torch.tensor([c])
        expected = target.generate(empty, 30, sampling=GREEDY, classes=cls, cfg=cfg)
        got, st = speculative_generate(target, draft, empty, 30, gamma=3, sampling=GREEDY, classes=cls, cfg=cfg)
        assert torch.equal(got, expected)
        assert st.new_tokens == 30 and st.target_calls < 30


def test_class_conditional_guided_sampling_is_exact():
    """500 guided samples of 3 tokens against the enumerated guided target distribution."""
    target = tiny_gpt(23, vocab=3, n_classes=2, block_size=16)
    draft = tiny_gpt(24, vocab=3, n_classes=2, block_size=16, scale=3.0)
    cls, w = torch.tensor([1]), 1.0
    seqs = torch.tensor(list(itertools.product(range(3), repeat=3)))  # (27, 3)
    with torch.no_grad():
        cond, _ = target(seqs[:, :-1], classes=cls.expand(len(seqs)))
        uncond, _ = target(seqs[:, :-1], classes=torch.full((len(seqs),), target.null_class))
    p = torch.softmax(sampling.cfg_mix(cond, uncond, w), -1)  # (27, 3, V)
    lik = p.gather(-1, seqs[..., None]).squeeze(-1).prod(-1)
    exact = {tuple(q.tolist()): float(v) for q, v in zip(seqs, lik)}
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(500):
        out, _ = speculative_generate(target, draft, torch.zeros(1, 0, dtype=torch.long), 3, gamma=2,
                                      generator=g, classes=cls, cfg=w)
        samples.append(tuple(out[0].tolist()))
    assert chi2_pvalue(samples, exact) > 1e-3


def test_class_conditional_input_is_checked():
    target = tiny_gpt(21, vocab=9, n_classes=3)
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="classes of shape"):
        speculative_generate(target, target, empty, 3)  # no classes
    with pytest.raises(ValueError, match="same vocabulary and classes"):
        speculative_generate(target, tiny_gpt(0, vocab=9), empty, 3, classes=torch.tensor([0]))
    with pytest.raises(ValueError, match="needs class-conditional"):
        speculative_generate(tiny_gpt(0), tiny_gpt(0), torch.tensor([[1]]), 3, cfg=1.0)
    with pytest.raises(TypeError):
        speculative_generate(target, target, empty, 3, 2, classes=torch.tensor([0]))  # gamma is keyword-only


# --- Speculative Jacobi Decoding and relaxed acceptance -------------------------------------------------------


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_sjd_greedy_equals_plain_greedy(cfg):
    m = tiny_gpt(7, vocab=9, n_layer=2, n_classes=3, block_size=40)
    for c in range(3):
        cls = torch.tensor([c])
        expected = m.generate(torch.zeros(1, 0, dtype=torch.long), 30, sampling=GREEDY, classes=cls, cfg=cfg)
        got, st = sjd_generate(m, 30, classes=cls, window=5, sampling=GREEDY, cfg=cfg,
                               generator=torch.Generator().manual_seed(c))
        assert torch.equal(got, expected)
        assert st.target_calls <= 30 and st.new_tokens == 30


def test_sjd_unconditional_prefix_greedy():
    m = tiny_gpt(8, vocab=5, block_size=40, scale=3.0)
    prefix = torch.tensor([[2, 4, 1]])
    got, st = sjd_generate(m, 25, prefix=prefix, window=6, sampling=GREEDY)
    assert torch.equal(got, m.generate(prefix, 25, sampling=GREEDY))
    assert st.new_tokens == 25


def test_sjd_samples_the_target_distribution():
    m = tiny_gpt(9, vocab=3, n_classes=2, block_size=16)
    cls = torch.tensor([1])
    V = 3
    seqs = torch.tensor(list(itertools.product(range(V), repeat=3)))
    with torch.no_grad():
        logits, _ = m(seqs[:, :-1], classes=cls.expand(len(seqs)))
    lik = torch.softmax(logits, -1).gather(-1, seqs[..., None]).squeeze(-1).prod(-1)
    exact = {tuple(s.tolist()): float(v) for s, v in zip(seqs, lik)}
    g = torch.Generator().manual_seed(0)
    samples, total = [], decoding.SpecStats()
    for _ in range(500):
        out, st = sjd_generate(m, 3, classes=cls, window=3, generator=g)
        samples.append(tuple(out[0].tolist()))
        total.merge(st)
    assert chi2_pvalue(samples, exact) > 1e-3
    assert total.accepted > 0


def test_jacobi_verify_carries_the_rest():
    p = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    q = torch.eye(3)[[1, 2, 2]]
    acc, carry, carry_q = jacobi_verify(p, q, torch.tensor([1, 2, 2]), torch.zeros(3))
    assert acc.tolist() == [1, 0] and carry.tolist() == [2, 1]
    torch.testing.assert_close(carry_q, p[2:])
    acc, carry, carry_q = jacobi_verify(p, torch.eye(3)[[1, 0, 2]], torch.tensor([1, 0, 2]), torch.zeros(3))
    assert acc.tolist() == [1, 0, 2, 1] and carry.numel() == 0 and carry_q.shape == (0, 3)


def test_relaxed_target_moves_at_most_delta():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(12, 3, generator=g)
    nb = codebook_neighbors(codebook, 3)
    assert nb.shape == (12, 3) and not (nb == torch.arange(12)[:, None]).any()
    d = torch.cdist(codebook, codebook)
    assert torch.allclose(d.gather(1, nb)[:, 0], (d + torch.eye(12) * 1e9).min(1).values)
    p = torch.softmax(torch.randn(50, 12, generator=g), -1)
    q = torch.softmax(torch.randn(50, 12, generator=g), -1)
    tok = torch.randint(12, (50,), generator=g)
    torch.testing.assert_close(relaxed_target(p, tok, nb, 0.0), p)
    torch.testing.assert_close(relaxed_acceptance_probability(p, q, tok, nb, 0.0), acceptance_probability(p, q, tok))
    for delta in (0.01, 0.1, 0.5):
        r = relaxed_target(p, tok, nb, delta)
        torch.testing.assert_close(r.sum(-1), torch.ones(50))
        assert (r >= 0).all()
        tv = 0.5 * (r - p).abs().sum(-1)
        assert (tv <= delta + 1e-6).all()
        moved = torch.minimum(torch.full((50,), delta), p.gather(1, nb[tok]).sum(-1))
        torch.testing.assert_close(tv, moved)
        assert (relaxed_acceptance_probability(p, q, tok, nb, delta) >= acceptance_probability(p, q, tok)).all()


def test_sjd_relaxed_delta_zero_is_exact_and_delta_accepts_more():
    m = tiny_gpt(9, vocab=8, n_classes=2, block_size=40, scale=10.0)
    nb = codebook_neighbors(torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), 3)
    cls = torch.tensor([0])
    a, _ = sjd_generate(m, 30, classes=cls, window=4, generator=torch.Generator().manual_seed(1))
    b, _ = sjd_generate(m, 30, classes=cls, window=4, generator=torch.Generator().manual_seed(1),
                        delta=0.0, neighbors=nb)
    assert torch.equal(a, b)
    calls = {}
    for delta in (0.0, 0.5):
        total = decoding.SpecStats()
        for s in range(10):
            total.merge(sjd_generate(m, 30, classes=cls, window=4, generator=torch.Generator().manual_seed(s),
                                     delta=delta, neighbors=nb)[1])
        calls[delta] = total.target_calls
    assert calls[0.5] < calls[0.0]
    with pytest.raises(ValueError):
        sjd_generate(m, 5, classes=cls, delta=0.1)
