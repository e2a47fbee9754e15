"""KV compression (chapter 09): quantization error bounds, KIVI's layout, the sink + window mask, the memory
accounting, and that the evaluation path without compression is the model's own loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ar_course.serving.compression import (
    CompressedAttention, dequantize, fake_quantize_kv, heldout_nll, kv_bytes_per_token, quantize, sink_window_mask,
)
from ar_course.transformer import GPT, GPTConfig
from serving_fixtures import _one_thread  # noqa: F401 (pytest fixtures)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_round_trip_is_within_half_a_step(bits):
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(bits)) * 3
    codes, scale, lo = quantize(x, bits, dim=2)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1 and scale.shape == (3, 5, 1)
    assert bool(((dequantize(codes, scale, lo) - x).abs() <= scale / 2 + 1e-6).all())


def test_kivi_keys_are_per_channel_and_values_per_token():
    """A channel of huge keys ruins per-token key scales but not KIVI's per-channel ones."""
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 1, 64, 8, generator=g), torch.randn(1, 1, 64, 8, generator=g)
    k[..., 3] *= 100
    k_hat, v_hat = fake_quantize_kv(k, v, 4, group=32)
    per_token = dequantize(*quantize(k, 4, dim=3))
    err = lambda a: float((a - k)[..., [0, 1, 2, 4, 5, 6, 7]].abs().mean())  # noqa: E731
    assert err(k_hat) < err(per_token) / 10
    torch.testing.assert_close(v_hat, dequantize(*quantize(v, 4, dim=3)))


def test_sink_window_mask_keeps_sinks_and_the_window():
    m = sink_window_mask(10, sinks=2, window=5)
    assert m.sum(1).max() == 5 and bool(m[9, [0, 1, 7, 8, 9]].all()) and not bool(m[9, 2:7].any())
    assert bool(m[:5].eq(torch.ones(5, 10, dtype=torch.bool).tril()[:5]).all())
    with pytest.raises(ValueError):
        sink_window_mask(10, sinks=5, window=5)


def test_compressed_attention_limits_and_memory():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=80, n_layer=4, n_head=2, n_embd=32)).eval()
    rows = torch.randint(0, 11, (2, 65))
    plain = heldout_nll(model, rows)
    assert heldout_nll(model, rows, CompressedAttention("none")) == pytest.approx(plain, rel=1e-5)
    assert heldout_nll(model, rows, CompressedAttention("sink_window", window=200)) == pytest.approx(plain, rel=1e-5)
    assert heldout_nll(model, rows, CompressedAttention("int8", group=8)) == pytest.approx(plain, rel=1e-2)
    assert heldout_nll(model, rows, CompressedAttention("int2", group=8)) != pytest.approx(plain, rel=1e-6)
    full = kv_bytes_per_token(model.config, "none", 64)
    assert kv_bytes_per_token(model.config, "int8", 64) < 0.6 * full
    assert kv_bytes_per_token(model.config, "int4", 64) < kv_bytes_per_token(model.config, "int8", 64)
    assert kv_bytes_per_token(model.config, "sink_window", 64, window=16) == full / 4
    assert kv_bytes_per_token(model.config, "minicache", 64, merge_from=2) < full
    with pytest.raises(ValueError, match="method"):
        CompressedAttention("fp4")


def test_h2o_keeps_budget_entries_and_equals_full_attention_within_budget():
    from ar_course.serving.compression import h2o_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 20, 4, generator=g) for _ in range(3))
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(h2o_attention(q, k, v, budget=20, recent=5), full)
    small = h2o_attention(q, k, v, budget=6, recent=2)
    torch.testing.assert_close(small[:, :, :6], full[:, :, :6])  # nothing evicted before the cache is full
    assert not torch.allclose(small, full)
    # a key that draws all the attention is a heavy hitter: it survives eviction
    k2 = k.clone()
    k2[:, :, 0] = 0
    q2 = q.clone()
    q2[..., :] = 0
    q2[..., 0] = 1.0
    k2[:, :, 3, 0] = 50.0
    v2 = torch.zeros_like(v)
    v2[:, :, 3] = 1.0
    out = h2o_attention(q2, k2, v2, budget=4, recent=1)
    assert bool((out[:, :, 19, 0] > 0.99).all())
    with pytest.raises(ValueError):
        h2o_attention(q, k, v, budget=4, recent=4)


@pytest.mark.parametrize("budget, recent", [(2, 0), (2, 1), (4, 1), (4, 3), (5, 2)])
def test_h2o_protects_exactly_the_recent_newest_keys(budget, recent):
    """The first eviction comes at query ``i = budget``; the key ``i - recent`` is the newest one outside the
    ``recent`` protected ones. Give it the least attention: it is the one evicted, so query ``budget + 1`` sees
    every key but it (had ``recent + 1`` keys been protected, an older key would go instead)."""
    from ar_course.serving.compression import h2o_attention

    T, low = budget + 2, budget - recent
    q = torch.ones(1, 1, T, 1)
    k = torch.zeros(1, 1, T, 1)
    k[..., low, 0] = -10.0  # scores 0 everywhere but -10 for the key at the boundary
    v = torch.arange(1.0, T + 1).reshape(1, 1, T, 1) ** 2  # a distinct value per key
    out = h2o_attention(q, k, v, budget=budget, recent=recent)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out[..., :-1, :], full[..., :-1, :])  # query budget evicts after attending
    seen = torch.ones(T, dtype=torch.bool)
    seen[low] = False
    expected = torch.nn.functional.scaled_dot_product_attention(q[..., -1:, :], k[..., seen, :], v[..., seen, :])
    torch.testing.assert_close(out[..., -1:, :], expected)


def test_int4_codes_pack_two_per_byte_and_the_pool_round_trip_is_within_half_a_step():
    from ar_course.serving.compression import pack_int4, pool_dequantize, pool_quantize, unpack_int4

    codes = torch.randint(0, 16, (3, 2, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(codes)
    assert packed.shape == (3, 2, 4) and torch.equal(unpack_int4(packed), codes)
    assert int(packed[0, 0, 0]) == int(codes[0, 0, 0]) + 16 * int(codes[0, 0, 1])
    x = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(1))
    stored, stats = pool_quantize(x, 4)
    assert stored.shape == (5, 2, 4) and stats.dtype == torch.float16
    err = (pool_dequantize(stored, stats, 4, torch.float32) - x).abs()
    assert bool((err <= stats[..., :1].float() / 2 + 2e-3).all()) and float(err.max()) > 0
    with pytest.raises(ValueError, match="8- or 4-bit"):
        pool_quantize(x, 2)


def test_minicache_merges_pairs_by_direction_and_keeps_each_norm():
    from ar_course.serving.compression import merge_layer_pairs

    g = torch.Generator().manual_seed(5)
    kv = [tuple(torch.randn(2, 3, 7, 4, generator=g) for _ in range(2)) for _ in range(5)]
    merged = merge_layer_pairs(kv, merge_from=1)
    assert sorted(merged) == [1, 2, 3, 4]  # pairs (1, 2) and (3, 4); layer 0 is before merge_from
    for a in (1, 3):
        for x in range(2):  # keys, values
            for layer in (a, a + 1):  # each layer keeps its own norm ...
                torch.testing.assert_close(merged[layer][x].norm(dim=-1), kv[layer][x].norm(dim=-1))
            # ... and the pair shares one direction, between the two layers' own
            da, db = (F.normalize(merged[layer][x], dim=-1) for layer in (a, a + 1))
            torch.testing.assert_close(da, db)
            cos = lambda u, w: (F.normalize(u, dim=-1) * F.normalize(w, dim=-1)).sum(-1)  # noqa: E731
            torch.testing.assert_close(cos(da, kv[a][x]), cos(da, kv[a + 1][x]))
    assert sorted(merge_layer_pairs(kv, merge_from=2)) == [2, 3]  # layer 4 has no partner
    k, v = kv[0]
    same = [(k, v), (3 * k, 0.5 * v)]
    for layer, (k_hat, v_hat) in merge_layer_pairs(same, 0).items():  # parallel vectors merge to themselves
        torch.testing.assert_close(k_hat, same[layer][0])
        torch.testing.assert_close(v_hat, same[layer][1])


def test_minicache_attention_reads_the_merged_cache_for_earlier_positions_only():
    g = torch.Generator().manual_seed(6)
    q, k, v, k2, v2 = (torch.randn(1, 2, 9, 4, generator=g) for _ in range(5))
    exact = lambda kk, vv: F.scaled_dot_product_attention(q, kk, vv, is_causal=True)  # noqa: E731
    att = CompressedAttention("minicache", merge_from=0)
    with pytest.raises(RuntimeError, match="record"):
        att(q, k, v, None, True)
    att.reset()
    att.record()
    torch.testing.assert_close(att(q, k, v, None, True), exact(k, v))  # the recorded pass is exact
    att(q, k2, v2, None, True)
    att.reset()
    first = att(q, k, v, None, True)
    torch.testing.assert_close(first[:, :, 0], exact(k, v)[:, :, 0])  # position 0 sees only its own entries
    assert not torch.allclose(first, exact(k, v), atol=1e-4)
    from ar_course.serving.compression import merge_layer_pairs

    k_hat, v_hat = merge_layer_pairs([(k, v), (k2, v2)], 0)[0]
    for i in range(9):  # query i: merged keys and values at positions < i, its own exactly
        keys = torch.cat([k_hat[:, :, :i], k[:, :, i:i + 1]], 2)  # (1, 2, i + 1, 4)
        values = torch.cat([v_hat[:, :, :i], v[:, :, i:i + 1]], 2)
        p = (q[:, :, i:i + 1] @ keys.transpose(-2, -1) / 2).softmax(-1)  # sqrt(D) = 2
        torch.testing.assert_close(first[:, :, i:i + 1], p @ values)
    with pytest.raises(ValueError, match="only the minicache"):
        CompressedAttention("int8").record()


def test_minicache_nll_equals_plain_when_no_pair_is_merged_and_differs_when_one_is():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=40, n_layer=3, n_head=2, n_embd=16)).eval()
    rows = torch.randint(0, 11, (2, 33))
    plain = heldout_nll(model, rows)
    assert heldout_nll(model, rows, CompressedAttention("minicache", merge_from=2)) == pytest.approx(plain, rel=1e-5)
    assert heldout_nll(model, rows, CompressedAttention("minicache", merge_from=1)) != pytest.approx(plain, rel=1e-6)
    full = kv_bytes_per_token(model.config, "none", 32)
    assert kv_bytes_per_token(model.config, "minicache", 32, merge_from=2) == full  # layer 2 has no partner
    assert kv_bytes_per_token(model.config, "minicache", 32, merge_from=9) == full
    D, f = model.config.head_dim, 2
    assert full - kv_bytes_per_token(model.config, "minicache", 32, merge_from=1) == 2 * 2 * (2 * D - (D + 2)) * f


def test_heldout_nll_takes_a_compiled_model():
    """The causal/unconditional check looks through torch.compile's wrapper (it refused an OptimizedModule)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    rows = torch.randint(0, 11, (1, 9), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="eager")
    assert heldout_nll(compiled, rows) == pytest.approx(heldout_nll(model, rows), rel=1e-6)
    # a compression is applied to it too (a compiled trace does not see use_attention: it measured no compression)
    window = CompressedAttention("sink_window", sinks=1, window=2)
    assert heldout_nll(compiled, rows, window) == heldout_nll(model, rows, window) != heldout_nll(model, rows)
