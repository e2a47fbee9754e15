"""Heavy-hitter eviction inside the serving engine (chapter 09): the block choice, the scoring attention, the
engine against the one-sequence plain path, the memory bound, no leaks, and clear errors."""

from __future__ import annotations

import pytest
import torch

from ar_course.sampling import SamplingConfig
from ar_course.serving import Engine, EngineConfig
from ar_course.serving.compression import heldout_nll
from ar_course.serving.h2o import ScoringAttention, h2o_decode, h2o_evictions, h2o_heldout_nll
from ar_course.transformer import load_pretrained
from ar_course.transformer.model import plain_attention
from serving_fixtures import _one_thread, tiny  # noqa: F401 (pytest fixtures)

GREEDY = SamplingConfig(temperature=0.0)


def test_evictions_take_the_lowest_scoring_full_blocks_outside_the_recent_ones():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.0, 9.0])
    live = [True] * 5
    # 20 positions in blocks of 4, budget 12 (3 blocks): 2 too many; block 4 holds the 4 recent positions
    assert h2o_evictions(scores, live, 20, 4, 12, 4) == [1, 3]
    # the recent 8 positions protect blocks 3 and 4: the next lowest is block 2
    assert h2o_evictions(scores, live, 20, 4, 12, 8) == [1, 2]
    # already evicted blocks count out of the budget and are never picked again
    assert h2o_evictions(scores, [True, False, True, True, True], 20, 4, 12, 4) == [3]
    assert h2o_evictions(scores, [True, False, True, False, True], 20, 4, 12, 4) == []
    # 18 positions: block 4 is partly filled and never evicted; ties go to the earlier block
    assert h2o_evictions(torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0]), live, 18, 4, 8, 0) == [0, 1, 2]
    # nothing evictable: everything is recent
    assert h2o_evictions(scores, live, 20, 4, 4, 19) == []


def test_scoring_attention_attends_plainly_and_adds_each_keys_probability():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g) for _ in range(3))
    past = [torch.randn(1, 2, 2, 4, generator=g) for _ in range(2)]  # two cached positions
    k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    mask = torch.ones(3, 5, dtype=torch.bool).tril(2)
    mask[:, 1] = False  # an evicted key
    scores = torch.zeros(9, dtype=torch.float64)
    slots = torch.tensor([7, 0, 3, 4, 8])
    out = ScoringAttention(scores, slots)(q, k, v, mask, False)
    torch.testing.assert_close(out, plain_attention(q, k, v, mask, False))
    p = torch.softmax((q @ k.transpose(-2, -1) / 2.0).masked_fill(~mask, float("-inf")), -1)  # (1, 2, 3, 5)
    expected = torch.zeros(9, dtype=torch.float64).index_add_(0, slots, p.sum((0, 1, 2)).double())
    torch.testing.assert_close(scores, expected)
    assert scores[0] == 0 and float(scores.sum()) == pytest.approx(2 * 3)  # each query row sums to 1
    with pytest.raises(ValueError, match="mask"):
        ScoringAttention(scores, slots)(q, k, v, None, True)


def _engine_outputs(model, prompts, new, **options):
    engine = Engine(model, EngineConfig(max_running=len(prompts), max_step_tokens=512, **options))
    engine.cache.allocator._free.rotate(7)  # blocks out of order
    ids = [engine.add_request(p, new) for p in prompts]
    out = engine.run()
    assert engine.cache.allocator.num_used == 0 and not engine.cache.tables
    return [out[i] for i in ids], engine


def test_engine_h2o_equals_the_one_sequence_plain_path_on_lm_target():
    """Three requests batched in a paged pool with shuffled blocks give the greedy tokens of the contiguous
    one-sequence decoder with the same rule; eviction changes some of them."""
    model, tok = load_pretrained("lm_target")
    prompts = [tok.encode(p).tolist() for p in ("The class ", "Return the value of the attribute named x.",
                                                "def f(x):\n    ")]
    budget, recent, bs = 24, 8, 8
    out, engine = _engine_outputs(model, prompts, 48, num_blocks=24, block_size=bs, kv_h2o_budget=budget,
                                  kv_h2o_recent=recent)
    assert max(r.blocks_used for r in engine.history) <= 3 * (budget // bs + 1)
    plain = [model.generate(torch.tensor(p)[None], 48, sampling=GREEDY)[0, len(p):].tolist() for p in prompts]
    for p, o in zip(prompts, out):
        assert o == h2o_decode(model, p, 48, budget, recent, bs)[0]
    assert out != plain  # the cache really forgets
    # a budget above every length evicts nothing: the plain path is then plain greedy decoding
    assert h2o_decode(model, prompts[0], 48, 128, 8, bs)[0] == plain[0]


def test_engine_h2o_equals_the_plain_path_on_a_tiny_model_with_many_evictions(tiny):
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7], [2, 7]]
    out, engine = _engine_outputs(tiny, prompts, 30, num_blocks=30, block_size=2, kv_h2o_budget=6, kv_h2o_recent=2)
    for p, o in zip(prompts, out):
        assert o == h2o_decode(tiny, p, 30, 6, 2, 2)[0]
    # each sequence holds at most budget // bs = 3 blocks after a step (+1 while it grows into the next one)
    assert max(r.blocks_used for r in engine.history) <= 3 * 3


def test_one_sequence_keeps_its_budget_of_blocks_and_frees_the_rest(tiny):
    bs, budget, recent = 2, 8, 3
    engine = Engine(tiny, EngineConfig(num_blocks=40, block_size=bs, max_running=1, kv_h2o_budget=budget,
                                       kv_h2o_recent=recent))
    engine.add_request([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], 40)
    engine.run()
    bound = max(budget // bs, -(-recent // bs) + 1)
    assert [r.blocks_used for r in engine.history][:1] == [bound]  # the 11-token prompt is cut to the budget
    assert all(r.blocks_used <= bound for r in engine.history)
    per_block = engine.cache.bytes_per_block() + bs * 8  # the pool's block plus a float64 score per slot
    assert engine.bytes_per_block() == per_block and all(r.kv_bytes == r.blocks_used * per_block
                                                         for r in engine.history)
    assert engine.cache.allocator.num_free == 40


def test_heldout_nll_through_h2o_is_the_plain_nll_when_nothing_is_evicted(tiny):
    windows = torch.randint(0, 17, (2, 25), generator=torch.Generator().manual_seed(0))
    assert h2o_heldout_nll(tiny, windows, 32, 4, 4) == pytest.approx(heldout_nll(tiny, windows), rel=1e-5)
    assert h2o_heldout_nll(tiny, windows, 8, 2, 4) != pytest.approx(heldout_nll(tiny, windows), rel=1e-4)


def test_bad_h2o_options_are_clear_errors(tiny):
    for options, message in (({"kv_h2o_budget": 1, "block_size": 2}, "kv_h2o_budget"),
                             ({"kv_h2o_budget": 8, "kv_h2o_recent": 8, "block_size": 4},
                              "kv_h2o_recent < kv_h2o_budget"),
                             ({"kv_h2o_budget": 64, "prefix_caching": True}, "prefix_caching"),
                             ({"kv_h2o_budget": 64, "kv_window": 8}, "kv_window"),
                             ({"kv_h2o_budget": 64, "kv_merge_from": 2}, "kv_merge_from")):
        with pytest.raises(ValueError, match=message):
            EngineConfig(**options)
    with pytest.raises(TypeError):
        EngineConfig(kv_h2o_budget=16.0)
    with pytest.raises(ValueError, match="forced"):
        h2o_decode(tiny, [1, 2], 3, 8, 2, 2, forced=[1])
    with pytest.raises(ValueError, match="prompt"):
        h2o_decode(tiny, [], 3, 8, 2, 2)
