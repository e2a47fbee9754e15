"""Tests of ar_course.transformer: attention paths agree, masks, RoPE, blocks, the GPT and its KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ar_course.checkpoint import load, save_checkpoint
from ar_course.checks.reference import ch02 as answers
from ar_course.sampling import GREEDY, SamplingConfig
from ar_course.transformer import GPT, Block, GPTConfig, KVCache, RMSNorm, count_forward_passes
from ar_course.transformer import functional as ref
from ar_course.transformer import model as M


def small_config(**kw) -> GPTConfig:
    base = dict(vocab_size=37, block_size=48, n_layer=2, n_head=4, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


def make_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(small_config(**kw)).eval()


# ----------------------------------------------------------------------------------------------------
# functional pieces


def test_masked_softmax_is_stable_and_handles_empty_rows():
    scores = torch.tensor([[1000.0, 1001.0, -5.0], [3.0, 2.0, 1.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    p = ref.masked_softmax(scores, mask)
    assert torch.isfinite(p).all()
    assert torch.allclose(p[0], torch.tensor([1 / (1 + math.e), math.e / (1 + math.e), 0.0]))
    assert torch.equal(p[1], torch.zeros(3))
    assert torch.allclose(ref.masked_softmax(scores[1:]), torch.softmax(scores[1:], -1))


def test_causal_mask_structure_and_offset():
    m = ref.causal_mask(4)
    assert m.dtype == torch.bool
    assert torch.equal(m, torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    # 2 queries at absolute positions 3 and 4 of 5 keys
    m = ref.causal_mask(2, 5)
    assert torch.equal(m, torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    with pytest.raises(ValueError, match="t_k"):
        ref.causal_mask(5, 3)


def test_plain_attention_scales_by_the_query_head_size_when_values_are_wider():
    """The scores are divided by sqrt of the q/k head size D, also when the values have another width D_v."""
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 3, 4, generator=g), torch.randn(1, 5, 4, generator=g), torch.randn(1, 5, 9, generator=g)
    want = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1) @ v
    torch.testing.assert_close(ref.scaled_dot_product_attention(q, k, v), want)
    torch.testing.assert_close(ref.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_plain_attention_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    assert torch.allclose(ref.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-6)
    causal = ref.causal_mask(7)
    assert torch.allclose(
        ref.scaled_dot_product_attention(q, k, v, causal),
        F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6,
    )
    rnd = torch.rand(2, 1, 7, 7, generator=g) > 0.5
    rnd[..., 0] = True  # no empty rows (SDPA gives NaN there, the plain path zeros)
    assert torch.allclose(
        ref.scaled_dot_product_attention(q, k, v, rnd),
        F.scaled_dot_product_attention(q, k, v, attn_mask=rnd),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(5, 5), "dtype"),
        (torch.ones(5, 5, dtype=torch.long), "dtype"),
        (torch.ones(5, 4, dtype=torch.bool), "shape"),
        (torch.ones(5, dtype=torch.bool), "shape"),
        (torch.ones(1, 5, 5, dtype=torch.bool), "shape"),
    ],
)
def test_bad_masks_raise_clear_errors(mask, match):
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=match):
        ref.scaled_dot_product_attention(q, q, q, mask)
    block = Block(small_config()).eval()
    with pytest.raises(ValueError, match=match):
        block(torch.randn(1, 5, 32), mask=mask)


def test_split_merge_heads_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 12, dtype=torch.float32).view(2, 3, 12)
    h = ref.split_heads(x, 4)
    assert h.shape == (2, 4, 3, 3)
    assert torch.equal(h[1, 2, 0], x[1, 0, 6:9])  # head 2 holds channels 6..8
    assert torch.equal(ref.merge_heads(h), x)
    with pytest.raises(ValueError, match="divisible"):
        ref.split_heads(x, 5)


def test_rms_norm_matches_torch():
    x = torch.randn(3, 5, 16)
    w = torch.rand(16)
    assert torch.allclose(ref.rms_norm(x, w, 1e-6), F.rms_norm(x, (16,), w, 1e-6), atol=1e-6)
    assert torch.allclose(RMSNorm(16)(x), F.rms_norm(x, (16,), None, 1e-6), atol=1e-6)


def test_rope_scores_depend_only_on_offsets():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def score(m: int, n: int) -> float:
        qm = answers.rotary_embedding(q[None], torch.tensor([m]))[0]
        kn = answers.rotary_embedding(k[None], torch.tensor([n]))[0]
        return float(qm @ kn)

    for m, n in [(3, 1), (10, 2), (7, 7), (0, 5)]:
        for shift in (1, 13, 100):
            assert math.isclose(score(m, n), score(m + shift, n + shift), rel_tol=1e-4, abs_tol=1e-4)
    assert not math.isclose(score(3, 1), score(4, 1), abs_tol=1e-3)
    # rotation preserves norms, position 0 is the identity
    assert torch.allclose(answers.rotary_embedding(q[None], torch.tensor([0]))[0], q)
    rotated = answers.rotary_embedding(q[None], torch.tensor([9]))[0]
    assert math.isclose(float(rotated.norm()), float(q.norm()), rel_tol=1e-5)


def test_rope_angles_are_computed_in_float64_so_large_positions_stay_exact():
    """At position 100,000 a float32 product of position and frequency is off by up to 4e-3 rad; the angles are
    computed in float64 and only the cosines and sines rounded to float32."""
    cos, sin = ref.rope_angles(torch.tensor([100_000]), 8)
    want = 100_000.0 * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # (4,)
    torch.testing.assert_close(cos[0], torch.cos(want).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[0], torch.sin(want).float(), atol=1e-6, rtol=0)


def test_apply_rope_keeps_the_input_dtype():
    cos, sin = ref.rope_angles(torch.arange(3), 8)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert ref.apply_rope(torch.randn(1, 3, 8).to(dtype), cos, sin).dtype == dtype


def test_rope_2d_scores_depend_only_on_row_and_column_offsets():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def score(a: tuple[int, int], b: tuple[int, int]) -> float:
        cq, sq = ref.rope_2d_angles(torch.tensor([a[0]]), torch.tensor([a[1]]), 16)
        ck, sk = ref.rope_2d_angles(torch.tensor([b[0]]), torch.tensor([b[1]]), 16)
        return float(ref.apply_rope(q[None], cq, sq)[0] @ ref.apply_rope(k[None], ck, sk)[0])

    assert math.isclose(score((2, 3), (1, 1)), score((5, 4), (4, 2)), rel_tol=1e-4, abs_tol=1e-4)
    assert not math.isclose(score((2, 3), (1, 1)), score((3, 2), (1, 1)), abs_tol=1e-3)
    with pytest.raises(ValueError, match="divisible by 4"):
        ref.rope_2d_angles(torch.tensor([0]), torch.tensor([0]), 6)


def test_rope_2d_rotates_the_first_half_of_the_pairs_with_the_row():
    """Row first, then column: the first dim // 4 pairs turn with the row index, the rest with the column, so a
    checkpoint trained with this layout reads its token map the right way round."""
    cos, sin = ref.rope_2d_angles(torch.tensor([3]), torch.tensor([0]), 16)  # row 3, column 0
    row_cos, row_sin = ref.rope_angles(torch.tensor([3]), 8)
    torch.testing.assert_close(cos[:, :4], row_cos)
    torch.testing.assert_close(sin[:, :4], row_sin)
    assert torch.equal(cos[:, 4:], torch.ones(1, 4)) and torch.equal(sin[:, 4:], torch.zeros(1, 4))


def test_cached_attention_writes_cache_and_matches_full_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    full = ref.scaled_dot_product_attention(q, k, v, ref.causal_mask(6))
    kc, vc = torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 10, 4)
    out_a = answers.cached_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], kc, vc, 0)
    out_b = answers.cached_attention(q[:, :, 4:5], k[:, :, 4:5], v[:, :, 4:5], kc, vc, 4)
    out_c = answers.cached_attention(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], kc, vc, 5)
    assert torch.allclose(torch.cat([out_a, out_b, out_c], dim=2), full, atol=1e-6)
    assert torch.equal(kc[:, :, :6], k) and torch.equal(kc[:, :, 6:], torch.zeros(1, 2, 4, 4))


def test_attention_heads_match_split_heads_and_rotary_embedding():
    torch.manual_seed(0)
    attn = Block(small_config()).attn
    x = torch.randn(2, 7, 32)
    q, k, v = attn.heads(x, ref.rope_angles(torch.arange(3, 10), 8))
    q_ref, k_ref, v_ref = (ref.split_heads(t, 4) for t in attn.qkv(x).split(32, dim=2))
    pos = torch.arange(3, 10)
    assert torch.allclose(q, answers.rotary_embedding(q_ref, pos), atol=1e-6)
    assert torch.allclose(k, answers.rotary_embedding(k_ref, pos), atol=1e-6)
    assert torch.equal(v, v_ref)


def test_block_reference_is_the_pre_norm_wiring_of_the_parts():
    block = Block(small_config()).eval()
    x, pos = torch.randn(2, 5, 32), torch.arange(5)
    h = x + answers.self_attention(block.norm1(x), block.attn, pos)
    assert torch.allclose(answers.transformer_block(x, block, pos), h + block.mlp(block.norm2(h)), atol=1e-6)
    assert torch.allclose(answers.self_attention(x, block.attn, pos), block.attn(x, ref.rope_angles(pos, 8)))


def test_rms_norm_keeps_float32_statistics_in_half_precision():
    x = torch.tensor([[300.0, -400.0, 500.0, 100.0], [1e-3, -2e-3, 3e-3, 1e-3]])
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    out = ref.rms_norm(x.half(), w.half(), 1e-12)
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), ref.rms_norm(x, w, 1e-12), rtol=2e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# blocks


def test_block_with_explicit_mask_and_no_causal_matches_reference():
    """VAR's use: causal=False with a block-causal mask."""
    torch.manual_seed(0)
    cfg = small_config(attn="plain")
    block = Block(cfg).eval()
    fast = Block(small_config()).eval()
    fast.load_state_dict(block.state_dict())
    levels = torch.tensor([0, 1, 1, 1, 1, 2, 2])
    mask = levels[None, :] <= levels[:, None]  # (7, 7) block-causal
    x = torch.randn(2, 7, 32)
    assert torch.allclose(block(x, mask=mask, causal=False), fast(x, mask=mask, causal=False), atol=1e-5)
    # and it differs from the plain causal mask (tokens of one scale see each other)
    assert not torch.allclose(block(x, mask=mask, causal=False), block(x), atol=1e-4)


def test_adaptive_norm_block_starts_as_identity_and_uses_cond():
    torch.manual_seed(0)
    block = Block(small_config(), cond_dim=6).eval()
    x, cond = torch.randn(2, 5, 32), torch.randn(2, 6)
    assert torch.allclose(block(x, cond=cond), x)
    torch.nn.init.normal_(block.ada.weight, std=0.5)
    y1 = block(x, cond=cond)
    y2 = block(x, cond=cond.flip(0))
    assert not torch.allclose(y1[0], y2[0], atol=1e-4)
    with pytest.raises(ValueError, match="cond"):
        block(x)
    with pytest.raises(ValueError, match="cond"):
        Block(small_config())(x, cond=cond)


# ----------------------------------------------------------------------------------------------------
# the GPT


@pytest.mark.parametrize("pos", ["rope", "learned", "none"])
def test_sdpa_and_plain_gpt_agree(pos):
    fast = make_model(pos=pos)
    plain = GPT(small_config(pos=pos, attn="plain")).eval()
    plain.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 37, (3, 20))
    assert torch.allclose(fast(idx)[0], plain(idx)[0], atol=1e-5)
    cf, cp = fast.make_cache(3), plain.make_cache(3)
    for chunk in (idx[:, :7], idx[:, 7:8], idx[:, 8:]):
        assert torch.allclose(fast(chunk, cache=cf)[0], plain(chunk, cache=cp)[0], atol=1e-5)


def test_set_attention_changes_only_the_model_it_is_given():
    """Two models built from one GPTConfig: switching one of them leaves the other's config (what its checkpoint
    records) as it runs, and the shared config object as it was."""
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    a, b = GPT(config), GPT(config)
    M.set_attention(a, "plain")
    assert a.config.attn == "plain" and b.config.attn == "sdpa" and config.attn == "sdpa"
    assert {m.attention for m in b.modules() if isinstance(m, M.SelfAttention)} == {M.sdpa_attention}


def test_use_attention_overrides_every_layer_for_the_block_only():
    """The override reaches every layer, gives the same numbers as set_attention, and leaves the model as it was."""
    model = make_model()
    plain = make_model()
    M.set_attention(plain, "plain")
    idx = torch.randint(0, 37, (2, 11))
    calls = []

    def spy(q, k, v, mask, causal, dropout_p=0.0):
        calls.append((q.shape[2], k.shape[2], mask, causal))
        return M.plain_attention(q, k, v, mask, causal, dropout_p)

    with M.use_attention(spy):
        got = model(idx)[0]
    assert len(calls) == 2 and calls[0] == (11, 11, None, True)  # one call per layer
    torch.testing.assert_close(got, plain(idx)[0], atol=0, rtol=0)
    assert {m.attention for m in model.modules() if isinstance(m, M.SelfAttention)} == {M.sdpa_attention}
    assert plain.config.attn == "plain" and model.config.attn == "sdpa"
    model(idx)
    assert len(calls) == 2  # the override ended with the block


def test_cached_passes_hand_the_causal_mask_to_the_kernels_as_causal(monkeypatch):
    """A pass over several new tokens after cached ones (speculative decoding's verification) builds no dense
    mask for the kernels: they get "causal" (queries are the last T of T_k), and agree with SDPA."""
    from ar_course import kernels

    seen = []
    flash = kernels.flash_attention

    def recording(q, k, v, mask=None, **kw):
        seen.append(mask)
        return flash(q, k, v, mask, **kw)

    monkeypatch.setattr(kernels, "flash_attention", recording)
    model = make_model()
    idx = torch.randint(0, 37, (2, 12))
    expected = [model(c, cache=cache)[0] for cache in [model.make_cache(2)] for c in (idx[:, :5], idx[:, 5:])]
    with M.use_attention(M.KernelAttention("torch")):
        cache = model.make_cache(2)
        got = [model(c, cache=cache)[0] for c in (idx[:, :5], idx[:, 5:])]
    assert seen == ["causal"] * 4  # 2 layers x 2 passes, none of them a matrix
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def test_attention_overrides_in_two_threads_do_not_mix():
    """Each thread's override is its own: the other thread's layers never call it."""
    import threading

    model = make_model()
    idx = torch.randint(0, 37, (1, 9))
    seen: dict[str, list[str]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def worker(name: str) -> None:
        def attend(q, k, v, mask, causal, dropout_p=0.0):
            seen[name].append(threading.current_thread().name)
            return M.sdpa_attention(q, k, v, mask, causal, dropout_p)

        with M.use_attention(attend):
            barrier.wait()
            for _ in range(20):
                model(idx)

    threads = [threading.Thread(target=worker, args=(n,), name=n) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": ["a"] * 40, "b": ["b"] * 40}


def test_attention_maps_are_causal_distributions_that_reproduce_the_layer():
    model = make_model()
    idx = torch.randint(0, 37, (2, 9))
    maps = model.attention_maps(idx)
    assert len(maps) == 2 and maps[0].shape == (2, 4, 9, 9)
    for m in maps:
        assert torch.allclose(m.sum(-1), torch.ones(2, 4, 9), atol=1e-5)
        assert torch.equal(m.triu(1), torch.zeros_like(m))
    # layer 0's output equals maps @ v projected
    attn = model.blocks[0].attn
    h = model.blocks[0].norm1(model.wte(idx))
    v = ref.split_heads(attn.qkv(h).split(32, dim=2)[2], 4)
    expected = attn.proj(ref.merge_heads(maps[0] @ v))
    assert torch.allclose(attn(h, model.rotary(torch.arange(9))), expected, atol=1e-5)


def test_loss_is_cross_entropy_of_logits():
    model = make_model()
    idx = torch.randint(0, 37, (2, 11))
    logits, loss = model(idx[:, :-1], targets=idx[:, 1:])
    assert logits.shape == (2, 10, 37)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 37), idx[:, 1:].reshape(-1)))
    assert model(idx)[1] is None
    with pytest.raises(ValueError, match="targets"):
        model(idx, targets=idx[:, 1:])


def test_causal_property_future_tokens_do_not_change_past_logits():
    model = make_model()
    idx = torch.randint(0, 37, (1, 16))
    changed = idx.clone()
    changed[0, 9:] = (changed[0, 9:] + 5) % 37
    a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[0, :9], b[0, :9], atol=1e-6)
    assert not torch.allclose(a[0, 9:], b[0, 9:], atol=1e-3)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_cached_logits_equal_full_forward(pos):
    model = make_model(pos=pos)
    idx = torch.randint(0, 37, (2, 30))
    full = model(idx)[0]
    cache = model.make_cache(2)
    pieces = [model(idx[:, :5], cache=cache)[0]]
    for t in range(5, 30):
        pieces.append(model(idx[:, t : t + 1], cache=cache)[0])
    assert cache.length == 30
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_kv_cache_rollback_then_continue_matches_fresh_forward():
    model = make_model()
    idx = torch.randint(0, 37, (1, 20))
    other = torch.randint(0, 37, (1, 6))
    cache = model.make_cache(1, max_len=20)
    model(idx, cache=cache)
    cache.rollback(12)
    assert cache.length == 12
    got = model(other, cache=cache)[0]
    expected = model(torch.cat([idx[:, :12], other], dim=1))[0][:, 12:]
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="rollback"):
        cache.rollback(19)
    with pytest.raises(ValueError, match="full"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_kv_cache_shapes():
    cache = KVCache(n_layer=3, batch_size=2, n_head=4, max_len=10, head_dim=8)
    k = torch.randn(2, 4, 3, 8)
    ka, va = cache.append(1, k, k)
    assert ka.shape == (2, 4, 3, 8) and torch.equal(ka, k)
    cache.advance(3)
    ka, _ = cache.append(1, k[:, :, :1], k[:, :, :1])
    assert ka.shape == (2, 4, 4, 8)
    assert cache.max_len == 10 and cache.batch_size == 2


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(), SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)])
def test_generate_cached_equals_uncached(sampling):
    model = make_model()
    prompt = torch.randint(0, 37, (2, 4))
    out = [
        model.generate(prompt, 25, sampling=sampling, generator=torch.Generator().manual_seed(3), use_cache=c)
        for c in (True, False)
    ]
    assert out[0].shape == (2, 29)
    assert torch.equal(out[0][:, :4], prompt)
    assert torch.equal(out[0], out[1])


def test_generate_is_reproducible_with_a_generator():
    model = make_model()
    prompt = torch.randint(0, 37, (1, 3))
    a = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    c = model.generate(prompt, 20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_block_size_is_enforced():
    model = make_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="long"):
        model(torch.zeros(1, 4))


def test_generate_fills_the_context_exactly():
    """The last new token is never fed back, so 3 prompt tokens and 6 new ones fit a context of 8."""
    model = make_model(block_size=8)
    out = model.generate(torch.tensor([[1, 2, 3]]), 6, sampling=GREEDY)  # 3 + 5 fed positions = block_size
    assert out.shape == (1, 9)


def test_a_cache_of_another_dtype_is_refused():
    """A KV cache whose dtype is not the model's is refused with a clear error, not mixed into attention."""
    model = make_model()
    c = model.config
    cache = KVCache(c.n_layer, 1, c.n_head, c.block_size, c.head_dim, dtype=torch.float64)
    with pytest.raises(ValueError, match="cache holds"):
        model(torch.tensor([[1, 2]]), cache=cache)


# ----------------------------------------------------------------------------------------------------
# class conditioning (chapter 03) and 2D rotary positions


def test_class_conditional_shapes_and_loss():
    model = make_model(n_classes=10, pos="rope2d", grid=(4, 4), block_size=17)
    x = torch.randint(0, 37, (3, 16))
    y = torch.tensor([1, 5, 9])
    logits, loss = model(x[:, :-1], targets=x, classes=y)
    assert logits.shape == (3, 16, 37) and loss.ndim == 0
    first, _ = model(torch.zeros(3, 0, dtype=torch.long), classes=y)
    assert torch.allclose(first[:, 0], logits[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x)
    with pytest.raises(ValueError, match="classes"):
        make_model()(x, classes=y)
    assert model.null_class == 10


def test_class_token_changes_predictions():
    model = make_model(n_classes=3)
    torch.nn.init.normal_(model.wce.weight, std=1.0)
    x = torch.randint(0, 37, (1, 8))
    a = model(x, classes=torch.tensor([0]))[0]
    b = model(x, classes=torch.tensor([2]))[0]
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_class_conditional_generation_cached_equals_uncached(cfg):
    model = make_model(n_classes=4, pos="rope2d", grid=(4, 5), block_size=21)
    torch.nn.init.normal_(model.wce.weight, std=1.0)
    empty = torch.zeros(2, 0, dtype=torch.long)
    classes = torch.tensor([0, 3])
    out = [
        model.generate(empty, 20, cfg=cfg, classes=classes, generator=torch.Generator().manual_seed(0), use_cache=c)
        for c in (True, False)
    ]
    assert out[0].shape == (2, 20)
    assert torch.equal(out[0], out[1])


def test_guidance_strength_minus_one_is_the_unconditional_model():
    """w = 0 is the conditional model (no second batch half at all), w = -1 the null class's."""
    model = make_model(n_classes=4)
    torch.nn.init.normal_(model.wce.weight, std=1.0)
    empty = torch.zeros(1, 0, dtype=torch.long)
    cls, null = torch.tensor([2]), torch.tensor([model.null_class])
    unconditional = model.generate(empty, 10, sampling=GREEDY, classes=null)
    assert torch.equal(model.generate(empty, 10, sampling=GREEDY, classes=cls, cfg=-1.0), unconditional)
    assert not torch.equal(model.generate(empty, 10, sampling=GREEDY, classes=cls), unconditional)
    with pytest.raises(ValueError, match="guidance"):
        make_model().generate(torch.zeros(1, 1, dtype=torch.long), 2, cfg=1.0)
    with pytest.raises(TypeError):
        model.generate(empty, 2, 0.0)  # sampling options are keyword-only


def test_rope2d_class_token_and_map_positions():
    model = make_model(n_classes=2, pos="rope2d", grid=(3, 4), block_size=13)
    cos = model.rotary.cos
    cos_expected, _ = ref.rope_2d_angles(torch.tensor([0, 0, 0, 1, 2]), torch.tensor([0, 0, 3, 0, 3]), 8)
    assert torch.allclose(cos[[0, 1, 4, 5, 12]], cos_expected)


# ----------------------------------------------------------------------------------------------------
# configuration and checkpoints


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="grid"):
        GPTConfig(pos="rope2d")
    with pytest.raises(ValueError, match="mlp"):
        GPTConfig(mlp="relu")


@pytest.mark.parametrize("kw", [dict(), dict(mlp="gelu", pos="learned", tie_weights=False),
                                dict(n_classes=3, pos="rope2d", grid=(4, 4), block_size=17)])
def test_checkpoint_round_trip(tmp_path, kw):
    model = make_model(**kw)
    path = save_checkpoint(tmp_path / "m.safetensors", model, model.config, kind="lm")
    loaded = load(path, kind="lm")
    assert loaded.config == model.config
    idx = torch.randint(0, 37, (2, 9))
    classes = torch.tensor([0, 2]) if model.config.n_classes else None
    assert torch.equal(loaded(idx, classes=classes)[0], model(idx, classes=classes)[0])
    if model.config.tie_weights:
        assert loaded.lm_head.weight is loaded.wte.weight


def test_forward_at_positions_mask_and_cache_equals_forward():
    """The public packed-pass entry point: a causal mask and no cache give forward's logits; the second half
    over a KVCache holding the first half gives them too; a different mask changes them."""
    model = make_model()
    idx = torch.randint(0, 37, (2, 9))
    full = model(idx)[0]  # (2, 9, V)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    torch.testing.assert_close(model.lm_head(model.forward_at(idx, torch.arange(9), causal)), full)
    cache = model.make_cache(2)
    model(idx[:, :5], cache=cache)
    mask = torch.arange(9)[None, :] <= torch.arange(5, 9)[:, None]  # (4, 9)
    h = model.forward_at(idx[:, 5:], torch.arange(5, 9), mask, cache)  # (2, 4, C)
    torch.testing.assert_close(model.lm_head(h), full[:, 5:], atol=1e-5, rtol=1e-4)
    alone = torch.eye(9, dtype=torch.bool)  # each token sees only itself
    assert not torch.allclose(model.lm_head(model.forward_at(idx, torch.arange(9), alone)), full)


def test_count_forward_passes_leaves_no_hook_behind():
    """count_forward_passes removes its counting hook when done: no hook piles up on the model across calls."""
    model = make_model()
    x = torch.zeros(1, 3, dtype=torch.long)
    assert count_forward_passes(model, lambda: (model(x), model(x))) == 2
    assert count_forward_passes(model, lambda: model(x)) == 1
    assert len(model.blocks[0]._forward_pre_hooks) == 0


def test_count_forward_passes_counts_only_its_own_threads_passes():
    """Another thread using the same model while a count runs was counted too (64 passes alone read 115-136)."""
    import threading

    model = make_model()
    x = torch.zeros(1, 3, dtype=torch.long)
    inside, done = threading.Event(), threading.Event()

    def other_thread() -> None:
        inside.wait()
        for _ in range(5):
            model(x)
        done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()

    def two_passes_while_the_other_thread_runs() -> None:
        model(x)
        inside.set()
        done.wait(timeout=60)
        model(x)

    assert count_forward_passes(model, two_passes_while_the_other_thread_runs) == 2
    worker.join()
    assert done.is_set()


@pytest.mark.parametrize("attn", ["sdpa", "kernels"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_compiled_forward_has_no_graph_break(attn, cache):
    """Reading a ContextVar broke the graph in every layer (dynamo cannot trace ContextVar.get): use_attention's,
    and the kernels' dispatch record (13 breaks per step with attn="kernels"); so did reading a static cache's
    length before handing the step to decode_step. Generator(compile=True) recompiled per layer until torch's
    recompile limit, then ran mostly eagerly while its stats said "torch.compile" (shipped VAR, second call:
    0.29 s compiled vs 0.06 s eager)."""
    from ar_course.transformer.model import sdpa_attention, use_attention

    torch._dynamo.reset()
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=3, n_head=2, n_embd=16, attn=attn)).eval()
    kv = model.make_cache(2, static=cache == "static")
    with torch.no_grad(), use_attention(sdpa_attention):
        model(torch.zeros(2, 5, dtype=torch.long), cache=kv)  # a later step is what the loop repeats
        explained = torch._dynamo.explain(model)(torch.zeros(2, 1, dtype=torch.long), cache=kv)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    torch._dynamo.reset()


def test_generate_takes_a_compiled_forward():
    """``forward or default`` asked the compiled module for its truth value: "GPT does not support len()"."""
    torch._dynamo.reset()
    model = make_model()
    x = torch.zeros(1, 2, dtype=torch.long)
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(model.generate(x, 3, sampling=GREEDY, forward=compiled), model.generate(x, 3, sampling=GREEDY))
    torch._dynamo.reset()


def test_train_lm_on_text_of_ones_own():
    """train_lm takes train_ids / val_ids of a tokenizer of one's own, as train_diffusion_lm does (audit 30: it
    trained on the course corpus only); the same one-line errors, and without them the course corpus as before."""
    from dataclasses import replace

    from ar_course.data import CharTokenizer, load_text_dataset
    from ar_course.transformer.train import PRESETS, train_lm

    text = "caf\u00e9 na\u00efve \u00c5ngstr\u00f6m, co\u00f6perate; " * 120
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    preset = replace(PRESETS["tiny"], steps=2, batch_size=2)
    model, info = train_lm(preset, progress=False, eval_every=1, train_ids=ids[:2000], val_ids=ids[2000:],
                           tokenizer=tok)
    assert info["tokenizer"] is tok and model.config.vocab_size == tok.vocab_size < 96
    assert torch.equal(info["val_ids"], ids[2000:]) and len(info["history"].evals) == 2
    with pytest.raises(ValueError, match="tokenizer is for text of your own: give train_ids"):
        train_lm(preset, progress=False, tokenizer=tok)
    with pytest.raises(ValueError, match="eval_every and keep_best evaluate on val_ids"):
        train_lm(preset, progress=False, keep_best=True, train_ids=ids)
    with pytest.raises(ValueError, match=r"train_ids must lie in \[0, 1\]"):
        train_lm(preset, progress=False, train_ids=ids, tokenizer=CharTokenizer.from_text("ab"))
    _, corpus = train_lm(preset, progress=False)
    assert corpus["tokenizer"].vocab_size == 96 and torch.equal(corpus["val_ids"], load_text_dataset()[2])
