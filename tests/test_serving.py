"""The serving engine (chapter 09): paged attention equals dense attention, copy-on-write never changes another
sequence, no block leaks, and the engine's greedy outputs equal ``GPT.generate`` on each prompt alone whatever
the batching, chunking, preemption or prefix caching."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ar_course.sampling import SamplingConfig
from ar_course.serving import (
    BlockAllocator, Engine, EngineConfig, OutOfBlocks, PagedKVCache, PrefixCache, gather_kv, packed_forward,
    paged_attention, prefix_block_hashes,
)
from ar_course.serving.compression import CompressedAttention, kv_bytes_per_token, sink_window_evictable
from ar_course.serving.trace import make_trace, replay, summarize
from ar_course.transformer import GPT, load_pretrained, use_attention
from serving_fixtures import _one_thread, seeded_outputs_one_at_a_time_and_batched, tiny  # noqa: F401 (fixtures)

GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def lm() -> GPT:
    return load_pretrained("lm_target")[0]


def _dense_attention(q, k, v):
    """``q`` ``(H, D)`` over ``k, v`` ``(T, H, D)``: ``(H, D)``."""
    w = torch.einsum("hd,thd->ht", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("ht,thd->hd", w.softmax(-1), v)


def test_paged_attention_equals_dense_on_random_tables_with_shared_blocks():
    g = torch.Generator().manual_seed(0)
    num_blocks, bs, H, D = 12, 4, 3, 8
    k_pool, v_pool = torch.randn(num_blocks, bs, H, D, generator=g), torch.randn(num_blocks, bs, H, D, generator=g)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:5] for _ in range(4)])  # (4, 5)
    tables[1, :2] = tables[0, :2]  # two sequences share their first two blocks
    lengths = torch.tensor([1, 20, 9, 13])
    q = torch.randn(4, H, D, generator=g)
    out = paged_attention(q, k_pool, v_pool, tables, lengths)
    for b in range(4):
        k = k_pool[tables[b]].reshape(-1, H, D)[: lengths[b]]
        v = v_pool[tables[b]].reshape(-1, H, D)[: lengths[b]]
        torch.testing.assert_close(out[b], _dense_attention(q[b], k, v))
        torch.testing.assert_close(gather_kv(k_pool, tables[b], int(lengths[b])), k)
    with pytest.raises(ValueError, match="length"):
        paged_attention(q, k_pool, v_pool, tables, torch.tensor([0, 1, 1, 1]))


def test_packed_forward_through_block_tables_equals_the_dense_model(tiny):
    """Two sequences, fed in uneven chunks into a pool with shuffled blocks, get the dense model's logits."""
    cache = PagedKVCache.for_model(tiny, num_blocks=16, block_size=3)
    cache.allocator._free.rotate(5)  # blocks out of order
    g = torch.Generator().manual_seed(1)
    seqs = {0: torch.randint(0, 17, (11,), generator=g).tolist(), 1: torch.randint(0, 17, (7,), generator=g).tolist()}
    for s in seqs:
        cache.add(s)
    done = {0: 0, 1: 0}
    for step in [(5, 2), (1, 4), (5, 1)]:
        chunks = []
        for s, n in zip(seqs, step):
            cache.reserve(s, n)
            chunks.append((s, seqs[s][done[s]:done[s] + n], done[s]))
        logits = packed_forward(tiny, cache, chunks)
        for (s, toks, start), row in zip(chunks, logits):
            cache.advance(s, len(toks))
            done[s] += len(toks)
            dense = tiny(torch.tensor(seqs[s][:done[s]])[None])[0][0, -1]
            torch.testing.assert_close(row, dense, atol=1e-5, rtol=1e-4)


def test_copy_on_write_never_changes_another_sequence():
    cache = PagedKVCache(n_layer=2, n_head=1, head_dim=2, num_blocks=8, block_size=4)
    cache.add(0)
    cache.reserve(0, 6)
    cache.write(1, cache.slots(0, 0, 6), torch.arange(12.0).view(6, 1, 2), torch.ones(6, 1, 2))
    cache.advance(0, 6)
    cache.fork(0, 1)
    before = [gather_kv(cache.k[1], torch.tensor(cache.tables[0]), 6).clone()]
    assert cache.tables[0] == cache.tables[1] and cache.allocator.refs[cache.tables[0][1]] == 2
    cache.reserve(1, 2)  # the shared, partly filled last block is copied before sequence 1 writes into it
    cache.write(1, cache.slots(1, 6, 2), -torch.ones(2, 1, 2), -torch.ones(2, 1, 2))
    cache.advance(1, 2)
    assert cache.copies == 1 and cache.tables[0][0] == cache.tables[1][0] and cache.tables[0][1] != cache.tables[1][1]
    torch.testing.assert_close(gather_kv(cache.k[1], torch.tensor(cache.tables[0]), 6), before[0])
    torch.testing.assert_close(gather_kv(cache.k[1], torch.tensor(cache.tables[1]), 6), before[0])
    cache.free(0)
    cache.free(1)
    assert cache.allocator.num_free == 8


def test_a_fork_sharing_a_partly_filled_block_needs_a_copy_even_for_one_position():
    """blocks_needed counts the private copy of a shared, partly filled last block for any n >= 1 (a decode step
    is n = 1), and reserve is refused, changing nothing, when the pool cannot give that copy."""
    cache = PagedKVCache(n_layer=1, n_head=1, head_dim=2, num_blocks=3, block_size=4)
    cache.add(0)
    cache.reserve(0, 6)
    cache.advance(0, 6)  # blocks [full, 2 of 4 filled]
    cache.fork(0, 1)
    assert [cache.blocks_needed(1, n) for n in (0, 1, 2, 3)] == [0, 1, 1, 2]  # 3: the copy and a new block
    assert cache.blocks_needed(0, 1) == 1  # the source shares the block too
    cache.add(2)
    cache.reserve(2, 4)  # takes the last free block
    tables = {s: list(t) for s, t in cache.tables.items()}
    with pytest.raises(OutOfBlocks):
        cache.reserve(1, 1)
    assert cache.tables == tables and cache.copies == 0 and cache.allocator.num_free == 0


def test_allocator_refuses_double_free_and_reserve_is_all_or_nothing():
    a = BlockAllocator(2)
    b = a.allocate()
    a.release(b)
    with pytest.raises(ValueError, match="already free"):
        a.release(b)
    cache = PagedKVCache(n_layer=1, n_head=1, head_dim=1, num_blocks=2, block_size=2)
    cache.add(0)
    with pytest.raises(OutOfBlocks):
        cache.reserve(0, 5)
    assert cache.tables[0] == [] and cache.allocator.num_free == 2


def _small_cache(num_blocks: int = 4) -> PagedKVCache:
    return PagedKVCache(n_layer=1, n_head=1, head_dim=2, num_blocks=num_blocks, block_size=2)


def test_used_tokens_leaves_out_evicted_blocks():
    """Positions of an evicted block no longer hold keys and values, so they are not counted as used."""
    cache = _small_cache()
    cache.add(0)
    cache.reserve(0, 6)
    cache.advance(0, 6)
    assert cache.evict(0, [0]) == 1
    assert cache.used_tokens() == 4


def test_a_free_block_cannot_be_shared():
    """Sharing a free block would hand it out twice: once shared, once by the next allocation."""
    alloc = BlockAllocator(2)
    with pytest.raises(ValueError, match="free or evicted"):
        alloc.share(0)


def test_advance_past_the_reserved_room_is_refused():
    """A sequence cannot grow past the blocks its table holds."""
    cache = _small_cache()
    cache.add(0)
    cache.reserve(0, 2)
    with pytest.raises(ValueError, match="no room"):
        cache.advance(0, 3)


def test_prefix_hashes_chain_over_everything_before():
    a = prefix_block_hashes([1, 2, 3, 4, 5, 6, 7], 3)
    b = prefix_block_hashes([9, 2, 3, 4, 5, 6], 3)
    assert len(a) == 2 and len(b) == 2
    assert a[1] != b[1]  # same tokens in block 1, different prefix
    assert prefix_block_hashes([1, 2, 3, 4, 5, 6, 8], 3) == a


def test_prefix_cache_evicts_the_least_recently_matched_block_first():
    """A match refreshes the block's place in the LRU order, so the block matched last is evicted last."""
    cache = _small_cache()
    prefixes = PrefixCache(cache)
    for seq, tokens in ((0, [1, 2]), (1, [3, 4])):
        cache.add(seq)
        cache.reserve(seq, 2)
        cache.advance(seq, 2)
        prefixes.insert(tokens, cache.block_table(seq), 2)
        cache.free(seq)
    prefixes.match([1, 2], limit=1)  # [1, 2] is now the most recently used
    assert prefixes.evict(1) == 1
    assert prefixes.match([1, 2], limit=1) != [] and prefixes.match([3, 4], limit=1) == []


def _prefix_cache_with_two_blocks() -> tuple[PagedKVCache, PrefixCache]:
    cache = _small_cache()
    prefixes = PrefixCache(cache)
    cache.add(0)
    cache.reserve(0, 4)
    cache.advance(0, 4)
    prefixes.insert([1, 2, 3, 4], cache.block_table(0), 4)  # two full blocks, each also held by sequence 0
    return cache, prefixes


def test_evictable_counts_only_blocks_no_sequence_holds():
    """A cached block that a running sequence still holds cannot be freed by eviction, so it is not evictable."""
    cache, prefixes = _prefix_cache_with_two_blocks()
    assert prefixes.evictable() == 0
    cache.free(0)
    assert prefixes.evictable() == 2


def test_evict_frees_exactly_the_blocks_asked_for():
    """Eviction stops at the number of blocks asked for, not one block later."""
    cache, prefixes = _prefix_cache_with_two_blocks()
    cache.free(0)
    assert prefixes.evict(1) == 1 and prefixes.evictable() == 1


@pytest.mark.parametrize("config", [
    EngineConfig(num_blocks=64, block_size=4, max_running=3, max_step_tokens=8),  # chunked prefill
    EngineConfig(num_blocks=14, block_size=4, max_running=5, max_step_tokens=16),  # preemption
    EngineConfig(num_blocks=64, block_size=8, max_running=2, policy="static"),
    EngineConfig(num_blocks=20, block_size=4, max_running=4, max_step_tokens=16, prefix_caching=True),
], ids=["chunked", "preempting", "static", "prefix"])
def test_engine_greedy_equals_generate_alone(lm, config):
    prompts = ["The class ", "def f(x): return", "A", "Return the value of the attribute named", "In Python"]
    lengths = [20, 7, 33, 12, 25]
    engine = Engine(lm, config)
    tok = load_pretrained("lm_target")[1]
    ids = [engine.add_request(tok.encode(p), n) for p, n in zip(prompts, lengths)]
    out = engine.run()
    for i, p, n in zip(ids, prompts, lengths):
        assert out[i] == lm.generate(tok.encode(p)[None], n, sampling=GREEDY)[0, -n:].tolist()
    if config.num_blocks == 14:
        assert engine.preemptions > 0
    held = len(engine.prefix.blocks) if engine.prefix is not None else 0
    assert engine.cache.allocator.num_used == held


def _steps_until_done(engine: Engine, limit: int = 100) -> dict[int, list[int]]:
    """``engine.run()`` that gives up after ``limit`` steps (a request that is never scheduled would hang run)."""
    for _ in range(limit):
        if not engine.has_work:
            break
        engine.step()
    assert not engine.has_work, f"still waiting {[r.id for r in engine.waiting]}, running {engine.running}"
    return engine.outputs()


def test_preemption_takes_the_newest_sequence_and_queues_it_first(tiny):
    """Pool of 3 blocks of 4: A (3-token prompt) and B (4 tokens) run, D waits (max_running=2). Step 2 gives B
    the last block; in step 3 A needs one: B, the most recently admitted, is preempted (not A, whose decode
    triggered it) and goes back to the front of the queue, ahead of D; D does not overtake it."""
    engine = Engine(tiny, EngineConfig(num_blocks=3, block_size=4, max_running=2, max_step_tokens=16))
    prompts = {"A": [1, 2, 3], "B": [4, 5, 6, 7], "D": [8, 9]}
    new = {"A": 6, "B": 6, "D": 2}
    ids = {k: engine.add_request(p, new[k]) for k, p in prompts.items()}
    for _ in range(3):
        engine.step()
    assert [engine.requests[ids[k]].preemptions for k in "ABD"] == [0, 1, 0]
    assert engine.history[-1].running == [ids["A"]]
    assert [r.id for r in engine.waiting] == [ids["B"], ids["D"]]
    admitted = []
    while engine.has_work:
        engine.step()
        admitted += [r.id for r in engine.running if r.id not in admitted and r.id != ids["A"]]
    assert admitted[0] == ids["B"]  # readmitted before D
    out = engine.outputs()
    for k, p in prompts.items():
        assert out[ids[k]] == tiny.generate(torch.tensor(p)[None], new[k], sampling=GREEDY)[0, -new[k]:].tolist()
    assert engine.preemptions == 1 and engine.cache.allocator.num_used == 0


class _LazyPrefillEngine(Engine):
    """An engine that reserves a prompt's blocks chunk by chunk as it is prefilled (vLLM's way) instead of all at
    admission. Engine itself reserves whole prompts, so only a decode runs short and the victim (the newest
    sequence) is never already in the step's batch; here a prefill chunk runs short after the newer sequence's
    decode was scheduled."""

    def _reserve(self, req, n):
        if req.status == "waiting":  # admission: nothing yet
            return
        super()._reserve(req, n)


def test_a_victim_already_scheduled_in_the_step_is_taken_out_of_the_batch(tiny):
    """F (8-token prompt, chunks of 2) then V (1-token prompt, decoding from its first step) in 4 blocks of 2:
    in step 3 V's decode takes the last block, then F's chunk needs one: V (the newest) is preempted after it was
    scheduled; the step must run F alone (V's blocks are freed), and both outputs stay those of generate."""
    engine = _LazyPrefillEngine(tiny, EngineConfig(num_blocks=4, block_size=2, max_running=2, max_step_tokens=3))
    prompts, new = {"F": [3, 1, 4, 1, 5, 9, 2, 6], "V": [7]}, {"F": 1, "V": 3}
    ids = {k: engine.add_request(p, new[k]) for k, p in prompts.items()}
    out = _steps_until_done(engine, 20)
    assert engine.requests[ids["V"]].preemptions == 1 and engine.preemptions == 1
    assert [h.running for h in engine.history][:3] == [[ids["V"], ids["F"]]] * 2 + [[ids["F"]]]
    for k, p in prompts.items():
        assert out[ids[k]] == tiny.generate(torch.tensor(p)[None], new[k], sampling=GREEDY)[0, -new[k]:].tolist()
    assert engine.cache.allocator.num_used == 0


@pytest.mark.parametrize("length", [8, 12])  # multiples of the block size
def test_prefix_caching_never_shares_the_block_of_the_last_prompt_token(tiny, length):
    """The same prompt twice: the second request shares (length - 1) // block_size blocks, never the block that
    holds its last token (whose logits must be computed), and both get the tokens of the engine without
    caching."""
    prompt = [(5 * i + 3) % 17 for i in range(length)]
    outs, engines = {}, {}
    for caching in (False, True):
        engine = Engine(tiny, EngineConfig(num_blocks=16, block_size=4, max_running=1, prefix_caching=caching))
        ids = [engine.add_request(prompt, 3) for _ in range(2)]
        out = _steps_until_done(engine)
        outs[caching], engines[caching] = [out[i] for i in ids], engine
    assert outs[True] == outs[False] and outs[True][0] == outs[True][1]
    shared = (length - 1) // 4
    assert engines[True].prefix.hits == shared
    assert engines[True].prefill_computed == 2 * length - 4 * shared  # the second request recomputes a block


def test_prefix_caching_skips_the_shared_prompt(tiny):
    system = list(range(1, 17)) * 2  # 32 shared tokens
    prompts = [system + [i, i + 1] for i in range(4)]
    work = {}
    for caching in (False, True):
        engine = Engine(tiny, EngineConfig(num_blocks=64, block_size=8, max_running=1, prefix_caching=caching))
        ids = [engine.add_request(p, 3) for p in prompts]
        out = engine.run()
        work[caching] = engine.prefill_computed
        results = [out[i] for i in ids]
    assert work[False] == 4 * 34
    assert work[True] == 34 + 3 * 2  # only the first request computes the 32 shared tokens
    assert results == [tiny.generate(torch.tensor(p)[None], 3, sampling=GREEDY)[0, -3:].tolist() for p in prompts]


def test_sampled_outputs_do_not_depend_on_the_batch(tiny):
    alone, batched = seeded_outputs_one_at_a_time_and_batched(tiny)
    assert alone == batched


TINY_COMPRESSION = {"none": ({}, None), "int4": ({"kv_bits": 4}, ("int4_pool", {})),
                    "window": ({"kv_window": 5, "kv_sinks": 1}, ("sink_window", {"sinks": 1, "window": 5})),
                    "merge": ({"kv_merge_from": 0}, None), "h2o": ({"kv_h2o_budget": 4, "kv_h2o_recent": 1}, None)}
# MiniCache's and H2O's outputs depend on how a prompt is chunked (a step's own positions are exact; evictions
# come after each step): here only no leaks; test_serving_minicache and test_serving_h2o check their tokens
# against their plain paths
CHUNKING_DEPENDENT = {"merge", "h2o"}


def _generate_alone(model, prompt, n, compression):
    """Greedy ``n`` tokens after ``prompt`` by plain generate, recomputing every step through ``compression``
    (a :class:`CompressedAttention` method and its arguments; None: the model's own attention)."""
    if compression is None:
        return model.generate(torch.tensor(prompt)[None], n, sampling=GREEDY)[0, len(prompt):].tolist()
    with use_attention(CompressedAttention(compression[0], **compression[1])):
        out = model.generate(torch.tensor(prompt)[None], n, sampling=GREEDY, use_cache=False)
    return out[0, len(prompt):].tolist()


@settings(max_examples=25, deadline=None, derandomize=True, database=None,  # the same cases every run
          suppress_health_check=[HealthCheck.function_scoped_fixture])
# prefix caching on, whatever the derandomized draws hold: prompts of one length share their tokens, so later
# requests reuse cached blocks; a tight pool makes the engine preempt and evict cached prefixes
@example([(8, 3, "run"), (8, 2, "step"), (10, 4, "cancel"), (8, 0, "run"), (10, 5, "run")], 20, True, "none")
@example([(12, 9, "step"), (12, 9, "run"), (6, 9, "cancel"), (12, 9, "run")], 11, True, "none")
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 9), st.sampled_from(["run", "cancel", "step"])),
                min_size=1, max_size=8),
       st.integers(11, 24), st.booleans(), st.sampled_from(sorted(TINY_COMPRESSION)))
def test_no_block_leaks_and_greedy_outputs_after_any_mix_of_requests(tiny, ops, num_blocks, caching, compression):
    options, reference = TINY_COMPRESSION[compression]
    caching = caching and not options  # eviction and prefix caching exclude each other
    engine = Engine(tiny, EngineConfig(num_blocks=num_blocks, block_size=2, max_running=3, max_step_tokens=6,
                                       prefix_caching=caching, **options))
    ids = []
    for prompt_len, new, action in ops:
        ids.append(engine.add_request([(prompt_len * 7 + j) % 17 for j in range(prompt_len)], new))
        if action == "cancel":
            engine.step()
            engine.cancel(ids[len(ids) // 2])
        elif action == "step":
            engine.step()
    out = engine.run()
    assert all(engine.requests[i].status in ("finished", "cancelled") for i in ids)
    for i in ids:  # whatever the arrival order, chunking, preemption or caching: the tokens of generate alone
        r = engine.requests[i]
        if r.status == "finished" and r.output and compression not in CHUNKING_DEPENDENT:
            assert out[i] == _generate_alone(tiny, r.prompt, r.max_new_tokens, reference)
    held = len(engine.prefix.blocks) if caching else 0
    assert engine.cache.allocator.num_used == held and not engine.cache.tables
    if caching:
        engine.prefix.clear()
    assert engine.cache.allocator.num_free == num_blocks


def test_bad_arguments_are_clear_errors(tiny):
    engine = Engine(tiny, EngineConfig(num_blocks=4, block_size=4))
    with pytest.raises(ValueError, match="prompt has no tokens"):
        engine.add_request([], 3)
    with pytest.raises(ValueError, match="prompt token"):
        engine.add_request([1, 99], 3)
    with pytest.raises(ValueError, match="never fit"):
        engine.add_request([1] * 10, 20)
    with pytest.raises(TypeError):
        engine.add_request([1], 2.5)
    with pytest.raises(ValueError, match="policy"):
        EngineConfig(policy="fifo")
    with pytest.raises(TypeError):
        Engine(tiny, {"num_blocks": 4})


def test_static_reserve_must_fit_the_pool(tiny):
    """A reserve larger than the pool could never be admitted: refused when the config is made (it used to leave
    the request waiting while every step did nothing)."""
    with pytest.raises(ValueError, match=r"static_reserve \(17 positions\) is more than the pool holds \(4 blocks "
                                         r"of 4 = 16\)"):
        EngineConfig(num_blocks=4, block_size=4, policy="static", static_reserve=17)
    engine = Engine(tiny, EngineConfig(num_blocks=4, block_size=4, max_running=2, max_step_tokens=8,
                                       policy="static", static_reserve=16))
    rid = engine.add_request([1, 2, 3], 4)
    assert engine.run()[rid] == tiny.generate(torch.tensor([[1, 2, 3]]), 4, sampling=GREEDY)[0, 3:].tolist()


def test_release_forgets_ended_requests_and_max_history_keeps_the_newest_steps(tiny):
    config = EngineConfig(num_blocks=32, block_size=4, max_running=2)
    full, bounded = Engine(tiny, config), Engine(tiny, config, max_history=3)
    for engine in (full, bounded):
        ids = [engine.add_request([1, 2, i], 5) for i in range(3)]
        engine.step()
        with pytest.raises(ValueError, match="request 0 is still running: cancel it before releasing it"):
            engine.release(ids[0])
        engine.run()
    assert len(full.history) > 3 and _steps(bounded.history) == _steps(list(full.history)[-3:])
    released = bounded.release(ids[1])
    assert released.id == ids[1] and released.output == full.outputs()[ids[1]]
    assert sorted(bounded.outputs()) == [ids[0], ids[2]]
    with pytest.raises(ValueError, match="request_id 1 is unknown"):
        bounded.release(ids[1])
    with pytest.raises(TypeError, match="max_history must be an integer"):
        Engine(tiny, config, max_history=2.0)
    with pytest.raises(ValueError, match="max_history must be an integer >= 0, got -1"):
        Engine(tiny, config, max_history=-1)


def _steps(records) -> list[tuple]:
    """What step records say but for the clock's readings (two engines read it at other times)."""
    return [(r.running, r.prefill_tokens, r.decode_tokens, r.blocks_used, r.tokens_stored, r.kv_bytes)
            for r in records]


def test_int8_pool_engine_equals_generate_through_the_same_quantization(lm):
    """The engine over an int8 pool (a fast path) gives the tokens of plain recomputing generate whose attention
    quantizes keys and values the way the pool stores them (the plain path), at 0.28x the fp32 pool's bytes."""
    from ar_course.serving.compression import CompressedAttention
    from ar_course.transformer import use_attention

    tok = load_pretrained("lm_target")[1]
    prompts = [tok.encode(p).tolist() for p in ("The class ", "Return the value of the attribute named")]
    engine = Engine(lm, EngineConfig(num_blocks=32, block_size=16, max_running=2, kv_bits=8))
    ids = [engine.add_request(p, 24) for p in prompts]
    out = engine.run()
    for i, p in zip(ids, prompts):
        with use_attention(CompressedAttention("int8_pool")):
            alone = lm.generate(torch.tensor(p)[None], 24, sampling=GREEDY, use_cache=False)
        assert out[i] == alone[0, len(p):].tolist()
    full = PagedKVCache.for_model(lm, 32, 16)
    assert engine.cache.bytes_per_block() / full.bytes_per_block() == pytest.approx((32 + 4) / (4 * 32))
    with pytest.raises(ValueError, match="kv_bits"):
        EngineConfig(kv_bits=2)


@pytest.mark.parametrize("options, reference", [
    ({"kv_bits": 4}, ("int4_pool", {})),
    ({"kv_window": 24, "kv_sinks": 4}, ("sink_window", {"sinks": 4, "window": 24})),
], ids=["int4", "sinks_window"])
def test_compressed_engine_equals_generate_through_the_same_compression(lm, options, reference):
    """Each compression inside the engine (chunked prefill, three sequences in a batch) gives the tokens of plain
    recomputing generate whose attention applies the same compression."""
    tok = load_pretrained("lm_target")[1]
    prompts = [tok.encode(p).tolist() for p in ("The class ", "Return the value of the attribute named", "def f(x):")]
    engine = Engine(lm, EngineConfig(num_blocks=32, block_size=8, max_running=3, max_step_tokens=16, **options))
    ids = [engine.add_request(p, 40) for p in prompts]
    out = engine.run()
    for i, p in zip(ids, prompts):
        assert out[i] == _generate_alone(lm, p, 40, reference)
    assert engine.cache.allocator.num_used == 0 and not engine.cache.tables


def test_int4_pool_bytes_match_the_accounting(lm):
    """Packed 4-bit codes plus a float16 (scale, min) per token and head: kv_bytes_per_token's int4_pool."""
    engine = Engine(lm, EngineConfig(num_blocks=8, block_size=16, kv_bits=4))
    assert engine.cache.k.shape[-1] == lm.config.head_dim // 2 and engine.cache.k.dtype == torch.uint8
    assert engine.cache.bytes_per_block() == 16 * kv_bytes_per_token(lm.config, "int4_pool", 64)
    fp32 = 16 * kv_bytes_per_token(lm.config, "none", 64, bits_float=32)
    assert PagedKVCache.for_model(lm, 8, 16).bytes_per_block() == fp32
    engine.add_request([1, 2, 3], 20)
    engine.step()
    assert engine.history[-1].kv_bytes == engine.cache.bytes_per_block()  # 3 positions: one block
    with pytest.raises(ValueError, match="even"):
        PagedKVCache(n_layer=1, n_head=1, head_dim=5, num_blocks=2, block_size=2, kv_bits=4)


def test_sinks_window_frees_the_blocks_no_query_can_see(tiny):
    """One long sequence: after every step the engine holds the sink blocks and the blocks of the window, no
    more; the bytes in use drop as blocks are evicted; at the end every block is free again."""
    sinks, window, bs = 2, 9, 2
    engine = Engine(tiny, EngineConfig(num_blocks=30, block_size=bs, max_running=1, kv_window=window, kv_sinks=sinks))
    plain = Engine(tiny, EngineConfig(num_blocks=30, block_size=bs, max_running=1))
    for e in (engine, plain):
        e.add_request([3, 1, 4, 1, 5], 50)
        e.run()
    assert len(engine.history) == 50
    for record, length in zip(engine.history, range(5, 55)):  # positions computed after each step
        blocks = -(-length // bs) - len(sink_window_evictable(length, sinks, window, bs))
        assert record.blocks_used == blocks <= -(-sinks // bs) + -(-window // bs) + 1
        assert record.kv_bytes == blocks * engine.cache.bytes_per_block()
    assert max(r.blocks_used for r in engine.history) < max(r.blocks_used for r in plain.history) / 2
    in_use = [r.kv_bytes for r in engine.history]
    assert any(b < a for a, b in zip(in_use, in_use[1:]))  # memory in use drops when a block is evicted
    assert engine.cache.allocator.num_free == 30


def test_sink_window_evictable_blocks_are_exactly_the_invisible_ones():
    from ar_course.serving.compression import sink_window_visible

    for sinks, window, bs in [(0, 3, 2), (1, 5, 2), (4, 24, 8), (3, 10, 4)]:
        for length in range(1, 60):
            future = torch.arange(length, length + 80)[:, None]  # every later query
            seen = (sink_window_visible(future, torch.arange(length)[None, :], sinks, window)).any(0)  # (length,)
            dead = sink_window_evictable(length, sinks, window, bs)
            for b in range(length // bs):  # full blocks: dead exactly when none of its positions is ever seen
                assert (b in dead) == (not bool(seen[b * bs:(b + 1) * bs].any())), (sinks, window, bs, length, b)


def test_compression_options_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="kv_sinks < kv_window"):
        EngineConfig(kv_window=4, kv_sinks=4)
    with pytest.raises(ValueError, match="kv_window"):
        EngineConfig(kv_window=0)
    with pytest.raises(ValueError, match="prefix_caching"):
        EngineConfig(kv_window=16, prefix_caching=True)
    with pytest.raises(TypeError):
        EngineConfig(kv_window=16.0)
    cache = PagedKVCache(n_layer=1, n_head=1, head_dim=2, num_blocks=4, block_size=2)
    cache.add(0)
    cache.reserve(0, 3)
    cache.advance(0, 3)
    with pytest.raises(ValueError, match="not full"):
        cache.evict(0, range(0, 2))
    assert cache.evict(0, range(0, 1)) == 1 and cache.tables[0][0] == -1
    with pytest.raises(ValueError, match="evicted"):
        cache.slots(0, 0, 1)


def test_prefix_hits_count_reused_blocks(tiny):
    engine = Engine(tiny, EngineConfig(num_blocks=64, block_size=4, max_running=1, prefix_caching=True))
    for _ in range(3):
        engine.add_request(list(range(1, 11)), 2)  # 10 tokens: 2 full blocks reusable (never the last token's)
    engine.run()
    assert engine.prefix.hits == 2 * 2


@pytest.mark.parametrize("caching, waste_fraction", [(True, 72 / 288), (False, 72 / 480)])
def test_paged_waste_counts_a_shared_prefix_block_once_and_is_never_negative(tiny, caching, waste_fraction):
    """One request, then three at once on the 32-token prompt it left in the prefix cache (blocks of 8): each
    sequence leaves 7, 6, 5 slots of its last block empty over its 3 steps, shared or not (0.75 blocks). Counting
    the shared blocks' positions once per sequence made the waste negative (serving.json: -0.22, -1.75 blocks)."""
    system = list(range(1, 17)) * 2  # 32 tokens: 4 full blocks
    engine = Engine(tiny, EngineConfig(num_blocks=64, block_size=8, max_running=4, prefix_caching=caching))
    engine.add_request(system + [1], 3)
    engine.run()
    for i in range(2, 5):
        engine.add_request(system + [i], 3)
    engine.run()
    s = summarize(engine)
    assert s["paged_waste_fraction"] == pytest.approx(waste_fraction)
    assert s["paged_waste_blocks_per_sequence"] == pytest.approx(0.75)
    assert [h.blocks_used for h in engine.history][3:] == ([7] * 3 if caching else [15] * 3)
    assert [h.slots_empty for h in engine.history] == [7, 6, 5, 21, 18, 15]


def _summarized_engine() -> SimpleNamespace:
    """What summarize reads of an engine: one request that arrived at 0 and got 3 tokens at 1, 2 and 4 s."""
    req = SimpleNamespace(status="finished", output=[5, 6, 7], arrival=0.0, token_times=[1.0, 2.0, 4.0])
    step = SimpleNamespace(tokens_stored=10, blocks_used=3, slots_empty=2, running=[0])
    return SimpleNamespace(requests={0: req}, history=[step], prefill_computed=4, preemptions=0,
                           config=SimpleNamespace(block_size=4), model=SimpleNamespace(config=SimpleNamespace(
                               block_size=64)))


def test_summarize_ttft_and_tpot():
    """Time to first token runs to the first token, and time per output token divides by the gaps between
    tokens, not by the number of tokens."""
    s = summarize(_summarized_engine())
    assert s["ttft_s"]["p50"] == pytest.approx(1.0)
    assert s["tpot_s"]["p50"] == pytest.approx(1.5)  # (4 - 1) s over 2 gaps


def test_summarize_uses_the_contiguous_length_it_is_given():
    """The contiguous-cache baseline reserves the length passed in, not the model's context."""
    assert summarize(_summarized_engine(), contiguous_len=20)["contiguous_waste_fraction"] == pytest.approx(0.5)


def test_trace_requests_fit_in_max_len():
    """Outputs are clipped to half of max_len and prompts to what is left, so a request always fits."""
    text = torch.arange(2000) % 50
    trace = make_trace(text, 20, output_median=1000, prompt_median=1000, sigma=0.0, max_len=64)
    assert all(len(r.prompt) + r.max_new_tokens <= 64 for r in trace)


def test_engines_made_without_a_config_do_not_share_one(tiny):  # noqa: F811
    """Each engine made with the default config gets its own: changing one engine's settings leaves the next
    engine's defaults as they are."""
    first = Engine(tiny)
    first.config.max_running = 1
    second = Engine(tiny)
    assert second.config is not first.config and second.config == EngineConfig()


@pytest.mark.parametrize("realtime", [True, False])
def test_replay_adds_each_request_at_its_arrival_and_runs_them_all(tiny, realtime):  # noqa: F811
    """Requests join when the engine's clock passes their arrival (realtime) or all at the start, each runs to
    its max_new_tokens, and the returned ids map to the trace's requests."""
    ticks = iter(range(10**6))
    engine = Engine(tiny, EngineConfig(num_blocks=32, block_size=4, max_running=4, max_step_tokens=32),
                    clock=lambda: float(next(ticks)))  # one second per reading of the clock
    trace = make_trace(torch.arange(500) % tiny.config.vocab_size, 3, rate=0.1, prompt_median=4, output_median=3,
                       max_len=16)
    ids = replay(engine, trace, realtime=realtime)
    assert sorted(ids) == sorted(engine.requests) and sorted(ids.values(), key=id) == sorted(trace, key=id)
    starts = set()  # the clock's reading when the replay started, as each request's arrival implies it
    for rid, request in ids.items():
        done = engine.requests[rid]
        assert done.status == "finished" and len(done.output) == request.max_new_tokens
        assert done.prompt == request.prompt
        starts.add(round(done.arrival - request.arrival if realtime else done.arrival, 9))
    assert len(starts) == 1 and len({r.arrival for r in trace}) == 3  # three arrival times, one start


@pytest.mark.parametrize("trace, realtime, match", [
    ([1, 2], True, "trace must be a list of TraceRequest .*got a list holding int"),
    (None, True, "trace must be a list of TraceRequest .*got NoneType"),
    ([], 1, r"realtime must be True or False, got 1 \(int\)"),
])
def test_replay_refuses_what_is_not_a_trace(tiny, trace, realtime, match):  # noqa: F811
    """It used to fail inside with "AttributeError: 'int' object has no attribute 'arrival'"."""
    with pytest.raises(TypeError, match=match):
        replay(Engine(tiny), trace, realtime=realtime)


# -- paths the engine itself never takes, or takes without a visible effect: found by mutating the library ---------


def test_packed_forward_starts_the_scores_of_written_slots_at_zero(tiny):
    """A freed block reused by a new sequence must not keep the H2O score an earlier sequence gave it."""
    written = []
    for stale in (0.0, 5.0):
        cache = PagedKVCache.for_model(tiny, 4, 4)
        cache.add(0)
        cache.reserve(0, 6)
        scores = torch.full((16,), stale, dtype=torch.float64)
        with torch.no_grad():
            packed_forward(tiny, cache, [(0, [1, 2, 3, 4, 5, 6], 0)], scores=scores)
        written.append(scores[cache.slots(0, 0, 6)])
    torch.testing.assert_close(written[0], written[1])


def test_admission_keeps_a_block_of_headroom_per_running_sequence(tiny):
    """Two requests of 7 positions (2 blocks each) and a pool of 2 blocks: the second waits instead of being
    admitted and then preempted (outputs would be the same, the work twice)."""
    engine = Engine(tiny, EngineConfig(num_blocks=2, block_size=4, max_running=2, max_step_tokens=16))
    for prompt in ([1, 2, 3, 4], [5, 6, 7, 8]):
        engine.add_request(prompt, 4)
    engine.step()
    assert len(engine.running) == 1
    engine.run()
    assert engine.preemptions == 0


def test_copy_on_write_of_a_quantized_block_keeps_its_scales():
    """fork shares a partly filled int8 block; the first write of the fork copies it, scales included."""
    cache = PagedKVCache(1, 2, 4, 4, 4, kv_bits=8)
    cache.add(0)
    cache.reserve(0, 2)
    k = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(0))
    cache.write(0, cache.slots(0, 0, 2), k, -k)
    cache.advance(0, 2)
    cache.fork(0, 1)
    cache.reserve(1, 1)  # sequence 1 writes into the shared block: a private copy
    assert cache.block_table(1)[0] != cache.block_table(0)[0]
    for copied, original in zip(cache.read(0, cache.slots(1, 0, 2)), cache.read(0, cache.slots(0, 0, 2))):
        torch.testing.assert_close(copied, original)


def _run_interrupted(model, prompts, new, target, k, after=False, **config):
    """Greedy requests through an engine whose ``target`` (an ``(object, attribute name)``) raises
    KeyboardInterrupt on its ``k``-th call (``after``: once it has run), then run again to the end as a learner
    re-running the cell would: the outputs and the pool's free blocks. ``config``: EngineConfig's fields."""
    engine = Engine(model, EngineConfig(**{"num_blocks": 64, "block_size": 4, "max_running": 4,
                                           "max_step_tokens": 16, **config}))
    ids = [engine.add_request(p, n, sampling=GREEDY) for p, n in zip(prompts, new)]
    obj, name = target(engine)
    original, calls = getattr(obj, name), [0]

    def interrupting(*args, **kwargs):
        calls[0] += 1
        out = original(*args, **kwargs) if after or calls[0] != k else None
        if calls[0] == k:
            raise KeyboardInterrupt
        return out

    setattr(obj, name, interrupting)
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    setattr(obj, name, original)
    out = engine.run()
    return [out[i] for i in ids], engine.cache.allocator.num_free


@pytest.mark.parametrize("where, k, after", [("sample", 2, False), ("sample", 11, False), ("advance", 5, True),
                                             ("record", 4, False), ("evict", 6, False)])
def test_an_engine_step_interrupted_part_way_goes_on_as_if_it_had_not_been(tiny, where, k, after):
    """Ctrl-C inside a step (audit 30): a request moved on without its token was never scheduled again (run()
    spun forever), one holding all its tokens got one more. Now the tokens are drawn before any request moves on
    and the next step repairs the rest: the outputs equal an uninterrupted run, every block comes back."""
    import ar_course.serving.engine as engine_module

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, tiny.config.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 3, 12)]
    new = [6, 4, 8, 5]
    want = [tiny.generate(torch.tensor([p]), n, sampling=GREEDY)[0, len(p):].tolist() for p, n in zip(prompts, new)]
    targets = {"sample": lambda e: (engine_module, "sample"), "advance": lambda e: (e.cache, "advance"),
               "record": lambda e: (e, "_record"), "evict": lambda e: (e, "_evict")}
    outputs, free = _run_interrupted(tiny, prompts, new, targets[where], k, after)
    assert outputs == want
    assert free == 64


def test_an_interrupted_step_still_makes_its_h2o_evictions():
    """With H2O what a request attends to depends on when blocks are evicted: a step cut short before its
    evictions changed the tokens after it (diff review 30); the next step now makes them first."""
    model = load_pretrained("lm_draft")[0]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(40, 80, (n,), generator=g).tolist() for n in (5, 9, 9, 3, 14)]
    h2o = {"kv_h2o_budget": 16, "kv_h2o_recent": 8, "max_running": 16, "max_step_tokens": 256}
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4, **h2o))
    ids = [engine.add_request(p, 12, sampling=GREEDY) for p in prompts]
    want = engine.run()
    outputs, free = _run_interrupted(model, prompts, [12] * 5, lambda e: (e, "_evict"), 4, **h2o)
    assert outputs == [want[i] for i in ids] and free == 64
