"""MiniCache inside the serving engine (chapter 09, ``EngineConfig(kv_merge_from=...)``): the engine equals the plain
one-sequence decoder that merges a contiguous cache after each step, the pool really stores one direction and
two norms per merged pair (its bytes are the accounting's), no pair means the plain engine, copy-on-write copies
the norms, and bad arguments are one-line errors."""

from __future__ import annotations

import pytest
import torch

from ar_course.sampling import SamplingConfig
from ar_course.serving import Engine, EngineConfig, PagedKVCache
from ar_course.serving.compression import kv_bytes_per_token, merge_pair
from ar_course.serving.minicache import fresh_rows, merged_generate
from ar_course.transformer import GPT, GPTConfig, load_pretrained
from serving_fixtures import _one_thread, tiny  # noqa: F401 (pytest fixtures)

GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def lm_tok():
    return load_pretrained("lm_target")


@pytest.mark.parametrize("options", [{"kv_merge_from": 6}, {"kv_merge_from": 4, "kv_window": 24, "kv_sinks": 4}],
                         ids=["merge_from_6", "with_sinks_window"])
def test_engine_equals_the_plain_merging_decoder(lm_tok, options):
    """Three requests batched over shuffled blocks, each prompt prefilled in one step: the engine's greedy tokens
    are those of merged_generate (contiguous cache, merged after each step) on each prompt alone, and differ from
    the uncompressed model's (the merge matters)."""
    lm, tok = lm_tok
    prompts = [tok.encode(p).tolist() for p in ("The class ", "Return the value of the attribute named", "def f(x):")]
    engine = Engine(lm, EngineConfig(num_blocks=40, block_size=8, max_running=3, max_step_tokens=128, **options))
    engine.cache.allocator._free.rotate(11)  # blocks out of order
    ids = [engine.add_request(p, 40) for p in prompts]
    out = engine.run()
    window = (options["kv_sinks"], options["kv_window"]) if "kv_window" in options else None
    differs = 0
    for i, p in zip(ids, prompts):
        assert out[i] == merged_generate(lm, p, 40, options["kv_merge_from"], window)
        differs += out[i] != merged_generate(lm, p, 40, None, window)
    assert differs > 0
    assert engine.cache.allocator.num_used == 0 and not engine.cache.tables


def test_plain_decoder_without_merging_is_generate(tiny):
    prompt = [3, 1, 4, 1, 5]
    assert merged_generate(tiny, prompt, 12, None) == tiny.generate(torch.tensor(prompt)[None], 12,
                                                                     sampling=GREEDY)[0, 5:].tolist()
    assert merged_generate(tiny, prompt, 12, 1) == merged_generate(tiny, prompt, 12, None)  # layer 1: no partner


@pytest.mark.parametrize("merge_from", [6, 10, 0])  # 11 merges nothing: refused (below)
def test_pool_bytes_match_the_accounting(lm_tok, merge_from):
    """A merged pair stores one direction per token and head plus two norms, for keys and for values: the fp32
    pool's bytes per block are kv_bytes_per_token's minicache at 32-bit floats."""
    lm = lm_tok[0]
    engine = Engine(lm, EngineConfig(num_blocks=8, block_size=16, kv_merge_from=merge_from))
    pairs = len(range(merge_from, lm.config.n_layer - 1, 2))
    assert engine.cache.k.shape[0] == lm.config.n_layer - pairs and engine.cache.k_norm.shape[0] == 2 * pairs
    expected = 16 * kv_bytes_per_token(lm.config, "minicache", 64, merge_from=merge_from, bits_float=32)
    assert engine.cache.bytes_per_block() == expected
    assert engine.cache.bytes_per_block() < PagedKVCache.for_model(lm, 8, 16).bytes_per_block()
    engine.add_request([1, 2, 3], 5)
    engine.step()
    assert engine.history[-1].kv_bytes == engine.cache.bytes_per_block()  # 3 positions: one block


def _step(cache: PagedKVCache, seq: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write one step of ``seq``: every layer's ``(k, v)`` ``(n, H, D)`` at its next positions."""
    n = kv[0][0].shape[0]
    cache.reserve(seq, n)
    slots = cache.slots(seq, cache.lengths[seq], n)
    for layer, (k, v) in enumerate(kv):
        cache.write(layer, slots, k, v)
    cache.advance(seq, n)


def test_merged_pool_reads_direction_times_norm_and_copy_on_write_keeps_the_norms():
    g = torch.Generator().manual_seed(0)
    rand = lambda n: [tuple(torch.randn(n, 2, 4, generator=g) for _ in range(2)) for _ in range(3)]  # noqa: E731
    cache = PagedKVCache(n_layer=3, n_head=2, head_dim=4, num_blocks=6, block_size=4, merge_from=0)
    assert cache.store_index == [0, 0, 1] and cache.k.shape[0] == 2 and cache.k_norm.shape[0] == 2
    cache.add(0)
    first = rand(6)
    _step(cache, 0, first)
    slots = cache.slots(0, 0, 6)
    for x in range(2):  # keys, values
        direction, norm_a, norm_b = merge_pair(first[0][x], first[1][x])
        torch.testing.assert_close(cache.read(0, slots)[x], direction * norm_a[..., None])
        torch.testing.assert_close(cache.read(1, slots)[x], direction * norm_b[..., None])
        torch.testing.assert_close(cache.read(2, slots)[x], first[2][x])  # the unpaired last layer is exact
    before = [cache.read(layer, slots) for layer in range(3)]
    cache.fork(0, 1)
    _step(cache, 1, rand(2))  # the shared, partly filled last block is copied first
    assert cache.copies == 1 and cache.tables[0][1] != cache.tables[1][1]
    for layer in range(3):  # the copy has the norms: sequence 1 reads the shared positions as sequence 0 does
        for x in range(2):
            torch.testing.assert_close(cache.read(layer, cache.slots(1, 0, 6))[x], before[layer][x])
            torch.testing.assert_close(cache.read(layer, slots)[x], before[layer][x])
    cache.free(0)
    cache.free(1)
    assert cache.allocator.num_free == 6


def test_fresh_rows_find_the_steps_own_keys():
    at, src = fresh_rows(torch.tensor([7, 2, 9]), torch.tensor([0, 7, 5, 9, 2, 3]), 12)
    assert at.tolist() == [1, 3, 4] and src.tolist() == [0, 2, 1]


def test_merge_options_are_clear_errors(tiny):
    for options, message in (({"kv_merge_from": -1}, "kv_merge_from must be an integer >= 0"),
                             ({"kv_merge_from": 0, "kv_bits": 8}, "kv_bits"),
                             ({"kv_merge_from": 0, "prefix_caching": True}, "prefix_caching")):
        with pytest.raises(ValueError, match=message) as e:
            EngineConfig(**options)
        assert "\n" not in str(e.value)
    with pytest.raises(TypeError):
        EngineConfig(kv_merge_from=1.0)
    n = tiny.config.n_layer
    for merge_from in (n - 1, n + 5):  # no pair (a, a + 1) left to merge: refused, not ignored
        with pytest.raises(ValueError) as e:
            Engine(tiny, EngineConfig(kv_merge_from=merge_from))
        assert str(e.value) == f"kv_merge_from must be < {n - 1} for this {n}-layer model (it merges layers " \
                               f"(a, a + 1) from it on), got {merge_from}"
    one_layer = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError) as e:  # it said "must be < 0"
        Engine(one_layer, EngineConfig(kv_merge_from=0))
    assert str(e.value) == "kv_merge_from merges the caches of neighbouring layers: a 1-layer model has none to " \
                           "merge (use None), got 0"
    with pytest.raises(TypeError, match="kv_bits must be an integer"):  # 8.0 in (8, 4) is True: checked as an int
        EngineConfig(kv_bits=8.0)
    with pytest.raises(ValueError, match="kv_bits"):
        PagedKVCache(n_layer=2, n_head=1, head_dim=2, num_blocks=2, block_size=2, kv_bits=8, merge_from=0)
    cache = PagedKVCache(n_layer=2, n_head=1, head_dim=2, num_blocks=2, block_size=2, merge_from=0)
    with pytest.raises(ValueError, match="write layer 0 first"):
        cache.write(1, torch.tensor([0]), torch.ones(1, 1, 2), torch.ones(1, 1, 2))
    with pytest.raises(ValueError, match="prompt has no tokens"):
        merged_generate(tiny, [], 3, 0)
    with pytest.raises(ValueError, match="block_size"):
        merged_generate(tiny, [1, 2], 100, 0)
    with pytest.raises(ValueError, match="merge_from must be an integer >= 0"):
        merged_generate(tiny, [1, 2], 3, -2)
