"""More bad input refused with a one-line TypeError/ValueError naming the argument: devices when loading a
checkpoint, prompts and sizes of the serving plain paths (H2O, MiniCache), EngineConfig's flags, the
compression helpers, the paged cache's bookkeeping, prefix hashes, traces, and the PNG writer of ``generate``."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from ar_course import checkpoint, continuous, masked
from ar_course.generate import png_bytes
from ar_course.serving import Engine, EngineConfig
from ar_course.serving import admits, paged_attention, slot_mapping
from ar_course.serving.compression import (
    CompressedAttention, fake_quantize_kv, h2o_attention, heldout_nll, kv_bytes_per_token, merge_pair,
    pool_dequantize, pool_quantize, quantize, sink_window_evictable, sink_window_mask,
)
from ar_course.serving.h2o import h2o_decode, h2o_heldout_nll
from ar_course.serving.minicache import merged_generate
from ar_course.serving.paged import BlockAllocator, PagedKVCache
from ar_course.serving.prefix import prefix_block_hashes
from ar_course.serving.trace import make_trace, summarize
from ar_course.transformer import GPT, GPTConfig


def _tiny() -> GPT:
    with torch.random.fork_rng():  # leaves the global generator as it was
        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=10, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()


TINY = _tiny()

# -- finding 1: a bad device is refused by checkpoint.load before anything is read ----------------------------

BAD_DEVICES = [
    pytest.param(lambda d: checkpoint.load("tokenizer_mnist_vq", d), id="load"),
    pytest.param(lambda d: checkpoint.load_with_tokenizer("ar_mnist", d), id="load_with_tokenizer"),
    pytest.param(lambda d: masked.load_pretrained(d), id="masked"),
    pytest.param(lambda d: continuous.load_pretrained(device=d), id="continuous"),
]


@pytest.mark.parametrize("load", BAD_DEVICES)
def test_unknown_device_is_refused(load: Callable) -> None:
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        load("gpu")
    with pytest.raises(TypeError, match="device must be a str or torch.device"):
        load(0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("load", BAD_DEVICES)
def test_cuda_without_cuda_is_refused(load: Callable) -> None:
    with pytest.raises(RuntimeError, match="device 'cuda' requested but CUDA is not available"):
        load("cuda")


def test_cpu_devices_still_load() -> None:
    for device in ("cpu", torch.device("cpu")):
        model = checkpoint.load("tokenizer_mnist_vq", device)
        assert next(model.parameters()).device.type == "cpu"


# -- finding 3: the plain paths check the prompt as Engine.add_request does ---------------------------------

H2O = {"budget": 8, "recent": 2, "block_size": 4}

PLAIN_PATH_CASES = [
    pytest.param(lambda: h2o_decode(TINY, [1, 99], 3, **H2O), ValueError, r"prompt token .*\[0, 9\], got 99",
                 id="h2o prompt out of range"),
    pytest.param(lambda: h2o_decode(TINY, [1, -1], 3, **H2O), ValueError, "prompt token .*got -1",
                 id="h2o prompt negative"),
    pytest.param(lambda: h2o_decode(TINY, [1.0, 2.0], 3, **H2O), TypeError, "prompt token must be an integer",
                 id="h2o prompt floats"),
    pytest.param(lambda: h2o_decode(TINY, torch.tensor([[1, 2]]), 3, **H2O), ValueError, "prompt must be 1-D",
                 id="h2o prompt 2-D tensor"),
    pytest.param(lambda: h2o_decode(TINY, [1, 2], 3, **H2O, forced=[1, 99, 2]), ValueError,
                 "forced token .*got 99", id="h2o forced out of range"),
    pytest.param(lambda: h2o_decode(TINY, [1, 2], 30, **H2O), ValueError,
                 r"more than the model.s context of 16 \(config.block_size\)", id="h2o too long"),
    pytest.param(lambda: h2o_decode(TINY, [1, 2], -1, **H2O), ValueError, "steps must be an integer >= 0, got -1",
                 id="h2o steps negative"),
    pytest.param(lambda: h2o_decode(TINY, [1, 2], 2.0, **H2O), TypeError, "steps must be an integer",
                 id="h2o steps float"),
    pytest.param(lambda: h2o_decode(TINY, [1, 2], 3, 8, 2, 0), ValueError, "block_size must be an integer >= 1",
                 id="h2o block_size 0"),
    pytest.param(lambda: h2o_heldout_nll(TINY, torch.zeros(0, 5, dtype=torch.long), **H2O), ValueError,
                 "windows is empty", id="h2o nll no windows"),
    pytest.param(lambda: h2o_heldout_nll(TINY, torch.zeros(2, 1, dtype=torch.long), **H2O), ValueError,
                 "at least 2 tokens", id="h2o nll 1-token windows"),
    pytest.param(lambda: merged_generate(TINY, [1, 99], 3, 0), ValueError, "prompt token .*got 99",
                 id="merged prompt out of range"),
    pytest.param(lambda: merged_generate(TINY, [1.5, 2.0], 3, 0), TypeError, "prompt token must be an integer",
                 id="merged prompt floats"),
    pytest.param(lambda: merged_generate(TINY, torch.tensor([[1, 2]]), 3, 0), ValueError, "prompt must be 1-D",
                 id="merged prompt 2-D tensor"),
    pytest.param(lambda: merged_generate(TINY, "12", 3, 0), TypeError, "prompt must be a list of token ids",
                 id="merged prompt string"),
]


@pytest.mark.parametrize("call, error, match", PLAIN_PATH_CASES)
def test_plain_paths_refuse_bad_prompts(call: Callable, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_plain_paths_take_tensor_prompts_like_lists() -> None:
    assert h2o_decode(TINY, torch.tensor([1, 2]), 3, **H2O)[0] == h2o_decode(TINY, [1, 2], 3, **H2O)[0]
    assert merged_generate(TINY, torch.tensor([1, 2]), 3, 0) == merged_generate(TINY, [1, 2], 3, 0)


def test_engine_still_refuses_bad_prompts() -> None:
    engine = Engine(TINY, EngineConfig(num_blocks=8, block_size=4, max_running=2, max_step_tokens=8))
    with pytest.raises(ValueError, match=r"prompt token must be an integer in \[0, 9\], got 99"):
        engine.add_request([1, 99], 2)
    with pytest.raises(ValueError, match="prompt_ids must be 1-D"):
        engine.add_request(torch.tensor([[1, 2]]), 2)


# -- finding 14: EngineConfig's bool field -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["false", 0, 1, None])
def test_engine_config_prefix_caching_must_be_bool(value: object) -> None:
    with pytest.raises(TypeError, match="prefix_caching must be True or False"):
        EngineConfig(prefix_caching=value)


# -- findings 23-27: compression, paged cache, prefix hashes, traces, png_bytes ------------------------------

X = torch.linspace(-1, 1, 40).view(1, 2, 5, 4)


def _cache() -> PagedKVCache:
    cache = PagedKVCache(2, 2, 4, 8, 4)
    cache.add(0)
    return cache


def _engine_with_nothing_run() -> Engine:
    return Engine(TINY, EngineConfig(num_blocks=8, block_size=4, max_running=2, max_step_tokens=8))


IMAGES = torch.linspace(0, 1, 64).view(4, 1, 4, 4)
TABLE = torch.tensor([2, 0])  # 2 blocks: positions 0..3 with block_size 2
CODES, STATS = pool_quantize(torch.linspace(-1, 1, 24).view(3, 8), 8)
POOL = torch.linspace(-1, 1, 48).view(4, 2, 2, 3)

LOWER_PRIORITY_CASES = [
    pytest.param(lambda: fake_quantize_kv(X, X, 8, 0), ValueError, "group must be an integer >= 1, got 0",
                 id="fake_quantize_kv group 0"),
    pytest.param(lambda: CompressedAttention("int8", group=0), ValueError, "group must be an integer >= 1",
                 id="CompressedAttention group 0"),
    # the other fields are checked when made, naming the field (they failed on the first call, or named "budget")
    pytest.param(lambda: CompressedAttention("h2o", recent="x"), TypeError, r"recent must be an integer in \[0, 95\]",
                 id="CompressedAttention recent string"),
    pytest.param(lambda: CompressedAttention("h2o", window=-3), ValueError, "window must be an integer >= 1, got -3",
                 id="CompressedAttention window negative"),
    pytest.param(lambda: CompressedAttention("h2o", window=10, recent=10), ValueError,
                 r"recent must be an integer in \[0, 9\], got 10", id="CompressedAttention recent = window"),
    pytest.param(lambda: CompressedAttention("sink_window", sinks=96), ValueError,
                 r"sinks must be an integer in \[0, 95\], got 96", id="CompressedAttention sinks = window"),
    pytest.param(lambda: CompressedAttention("minicache", merge_from=-1), ValueError,
                 "merge_from must be an integer >= 0, got -1", id="CompressedAttention merge_from negative"),
    # a bidirectional pass was answered with causal attention, and dropout was ignored
    pytest.param(lambda: CompressedAttention("sink_window")(X, X, X, None, causal=False), ValueError,
                 "full causal passes only .*causal=False", id="CompressedAttention bidirectional"),
    pytest.param(lambda: CompressedAttention("int8")(X, X, X, None, causal=True, dropout_p=0.1), ValueError,
                 "full causal passes only .*dropout_p=0.1", id="CompressedAttention dropout"),
    pytest.param(lambda: kv_bytes_per_token(TINY.config, "sink_window", 0), ValueError,
                 "context must be an integer >= 1, got 0", id="kv_bytes context 0"),
    pytest.param(lambda: kv_bytes_per_token(TINY.config, "sink_window", -5), ValueError,
                 "context must be an integer >= 1, got -5", id="kv_bytes context negative"),
    pytest.param(lambda: heldout_nll(TINY, torch.zeros(0, 5, dtype=torch.long)), ValueError,
                 r"windows must be a non-empty \(N, T\+1\)", id="heldout_nll no windows"),
    pytest.param(lambda: quantize(X, 2.5, dim=3), TypeError, "bits must be an integer", id="quantize bits 2.5"),
    pytest.param(lambda: pool_quantize(torch.ones(2, 5), 4), ValueError, "last dimension must be even, got 5",
                 id="pool_quantize odd D"),
    # fuzz 2025 findings 2-3: slot_mapping and the compression helpers checked nothing (IndexError, AttributeError,
    # torch errors, or garbage returned)
    pytest.param(lambda: slot_mapping(TABLE, torch.tensor([5]), 2), ValueError,
                 r"positions must lie in \[0, 3\], got 5", id="slot_mapping position past the table"),
    pytest.param(lambda: slot_mapping(TABLE, torch.tensor([-1]), 2), ValueError,
                 r"positions must lie in \[0, 3\], got -1", id="slot_mapping negative position"),
    pytest.param(lambda: slot_mapping(TABLE, torch.arange(3), 0), ValueError,
                 "block_size must be an integer >= 1, got 0", id="slot_mapping block_size 0"),
    pytest.param(lambda: slot_mapping(TABLE, torch.arange(3), -2), ValueError,
                 "block_size must be an integer >= 1, got -2", id="slot_mapping block_size negative"),
    pytest.param(lambda: slot_mapping(TABLE, torch.arange(3), 2.0), TypeError,
                 r"block_size must be an integer >= 1, got 2.0 \(float\)", id="slot_mapping block_size float"),
    pytest.param(lambda: slot_mapping(TABLE, torch.arange(3.0), 2), ValueError,
                 r"positions must be a \(n,\) integer tensor, got \(3,\) torch.float32",
                 id="slot_mapping float positions"),
    pytest.param(lambda: slot_mapping(None, torch.arange(3), 2), TypeError,
                 r"block_table must be a \(n_blocks,\) integer tensor, got NoneType", id="slot_mapping table None"),
    pytest.param(lambda: quantize(None, 4, -1), TypeError, "x must be a real .* tensor, got NoneType",
                 id="quantize x None"),
    pytest.param(lambda: quantize(torch.ones(2, 8, dtype=torch.bool), 4, -1), ValueError,
                 r"x must be a real .* tensor, got \(2, 8\) torch.bool", id="quantize x bool"),
    pytest.param(lambda: quantize(torch.ones(2, 8), 4, 5), ValueError, r"dim must be an integer in \[-2, 1\], got 5",
                 id="quantize dim out of range"),
    pytest.param(lambda: fake_quantize_kv(None, X, 4, 4), TypeError,
                 r"k must be a \(B, H, T, D\) real .* tensor, got NoneType", id="fake_quantize_kv k None"),
    pytest.param(lambda: fake_quantize_kv(X, X[0], 4, 4), ValueError,
                 r"v must be a \(B, H, T, D\) real .* tensor, got \(2, 5, 4\)", id="fake_quantize_kv v 3-D"),
    pytest.param(lambda: pool_quantize(None, 8), TypeError, r"x must be a \(..., D\) real .* tensor, got NoneType",
                 id="pool_quantize x None"),
    pytest.param(lambda: pool_dequantize(CODES, STATS, "x", torch.float32), TypeError,
                 "bits must be an integer, got 'x'", id="pool_dequantize bits string"),
    pytest.param(lambda: pool_dequantize(CODES, STATS, 8, int), TypeError, "dtype must be a torch.dtype, got <class",
                 id="pool_dequantize dtype int"),
    pytest.param(lambda: pool_dequantize(None, STATS, 8, torch.float32), TypeError,
                 r"codes must be a \(..., D or D // 2\) integer tensor, got NoneType", id="pool_dequantize codes None"),
    pytest.param(lambda: pool_dequantize(CODES, STATS[:2], 8, torch.float32), ValueError,
                 r"stats must be a \(..., 2\) tensor with codes' leading dimensions \(3,\), got shape \(2, 2\)",
                 id="pool_dequantize stats rows"),
    pytest.param(lambda: merge_pair(None, X), TypeError, r"xa must be a \(..., D\) floating-point tensor, got NoneType",
                 id="merge_pair xa None"),
    pytest.param(lambda: merge_pair(X.long(), X), ValueError,
                 r"xa must be a \(..., D\) floating-point tensor, got \(1, 2, 5, 4\) torch.int64",
                 id="merge_pair xa long"),
    pytest.param(lambda: merge_pair(X, X[0]), ValueError, "xa and xb must have the same shape",
                 id="merge_pair shapes differ"),
    pytest.param(lambda: h2o_attention(X.long(), X, X, 4, 2), ValueError,
                 r"q must be a \(B, H, T, D\) floating-point tensor, got \(1, 2, 5, 4\) torch.int64", id="h2o q long"),
    pytest.param(lambda: h2o_attention(None, X, X, 4, 2), TypeError,
                 r"q must be a \(B, H, T, D\) floating-point tensor, got NoneType", id="h2o q None"),
    pytest.param(lambda: h2o_attention(X, X.double(), X, 4, 2), ValueError,
                 r"k must be a \(B, H, T, D\) tensor like q .*torch.float64", id="h2o k double"),
    pytest.param(lambda: h2o_attention(X, X, X, 4, "2"), TypeError, "recent must be an integer, got '2'",
                 id="h2o recent string"),
    pytest.param(lambda: sink_window_mask(None, 2, 3), TypeError, "T must be an integer >= 0, got None",
                 id="sink_window_mask T None"),
    pytest.param(lambda: sink_window_mask(-1, 2, 3), ValueError, "T must be an integer >= 0, got -1",
                 id="sink_window_mask T negative"),
    pytest.param(lambda: sink_window_mask(2.5, 2, 3), TypeError, r"T must be an integer >= 0, got 2.5 \(float\)",
                 id="sink_window_mask T float"),
    pytest.param(lambda: sink_window_mask(4, 1.5, 3), TypeError, r"sinks must be an integer, got 1.5 \(float\)",
                 id="sink_window_mask sinks float"),
    pytest.param(lambda: sink_window_evictable(20, 2, 4, 0), ValueError, "block_size must be an integer >= 1, got 0",
                 id="sink_window_evictable block_size 0"),
    pytest.param(lambda: sink_window_evictable(-5, 2, 4, 4), ValueError, "length must be an integer >= 0, got -5",
                 id="sink_window_evictable length negative"),
    pytest.param(lambda: sink_window_evictable(20, 4, 2, 4), ValueError, "need 0 <= sinks < window, got sinks=4",
                 id="sink_window_evictable sinks >= window"),
    pytest.param(lambda: admits(-5, 5, 1, 4), ValueError, "need must be an integer >= 0, got -5", id="admits need < 0"),
    pytest.param(lambda: admits(2, 5, 1, "x"), TypeError, "max_running must be an integer >= 1, got 'x'",
                 id="admits max_running string"),
    pytest.param(lambda: paged_attention(torch.ones(2, 2, 3, dtype=torch.long), POOL, POOL,
                                         torch.tensor([[0, 1], [2, 3]]), torch.tensor([3, 2])), ValueError,
                 r"q must be a \(B, H, D\) floating-point tensor, got torch.int64", id="paged_attention q long"),
    pytest.param(lambda: paged_attention(POOL[:2, 0], POOL.double(), POOL, torch.tensor([[0, 1], [2, 3]]),
                                         torch.tensor([3, 2])), ValueError,
                 "k_pool must have q's dtype torch.float32, got torch.float64", id="paged_attention k_pool double"),
    pytest.param(lambda: BlockAllocator(10).release(-1), ValueError, r"block must be an integer in \[0, 9\]",
                 id="release -1"),
    pytest.param(lambda: BlockAllocator(10).release(10), ValueError, r"block must be an integer in \[0, 9\]",
                 id="release 10"),
    pytest.param(lambda: _cache().reserve(99, 1), ValueError, "sequence 99 is not in the cache", id="reserve unknown"),
    pytest.param(lambda: _cache().slots(99, 0, 1), ValueError, "sequence 99 is not in the cache", id="slots unknown"),
    pytest.param(lambda: _cache().free(99), ValueError, "sequence 99 is not in the cache", id="free unknown"),
    pytest.param(lambda: _cache().add(1, [], -3), ValueError, "length must be an integer >= 0, got -3",
                 id="add negative length"),
    pytest.param(lambda: _cache().reserve(0, -10), ValueError, "n must be an integer >= 0, got -10",
                 id="reserve negative"),
    pytest.param(lambda: _cache().advance(0, -4), ValueError, "n must be an integer >= 0, got -4",
                 id="advance negative"),
    pytest.param(lambda: PagedKVCache(-1, 2, 4, 8, 4), ValueError, "n_layer must be an integer >= 1, got -1",
                 id="PagedKVCache n_layer -1"),
    pytest.param(lambda: prefix_block_hashes([1, 2, 3], 0), ValueError, "block_size must be an integer >= 1",
                 id="prefix hashes block_size 0"),
    pytest.param(lambda: prefix_block_hashes([1, 2, 3], -1), ValueError, "block_size must be an integer >= 1",
                 id="prefix hashes block_size -1"),
    pytest.param(lambda: summarize(_engine_with_nothing_run()), ValueError, "at least one finished request",
                 id="summarize before anything ran"),
    pytest.param(lambda: make_trace(torch.arange(5), 3), ValueError, "text_ids has 5 tokens, too few",
                 id="trace text too short"),
    pytest.param(lambda: make_trace(torch.arange(500), 3, rate=0), ValueError, "rate must be a finite number > 0",
                 id="trace rate 0"),
    pytest.param(lambda: png_bytes(IMAGES, 0), ValueError, "ncol must be an integer >= 1, got 0", id="png ncol 0"),
    pytest.param(lambda: png_bytes(IMAGES, -1), ValueError, "ncol must be an integer >= 1, got -1",
                 id="png ncol -1"),
    pytest.param(lambda: png_bytes(torch.full((1, 1, 4, 4), float("nan")), 1), ValueError,
                 "images must be finite, got nan", id="png NaN"),
    pytest.param(lambda: png_bytes((IMAGES * 255).to(torch.uint8), 2), ValueError,
                 "floating-point tensor in \\[0, 1\\] \\(divide uint8", id="png uint8"),
]


@pytest.mark.parametrize("call, error, match", LOWER_PRIORITY_CASES)
def test_lower_priority_bad_input(call: Callable, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_valid_inputs_unchanged() -> None:
    assert slot_mapping(TABLE, torch.arange(4), 2).tolist() == [4, 5, 0, 1]
    assert admits(0, 0, 0, 1) and not admits(2, 5, 4, 4)
    assert len(prefix_block_hashes([1, 2, 3, 4, 5], 2)) == 2
    assert png_bytes(IMAGES, 2, 1).startswith(b"\x89PNG")
    assert kv_bytes_per_token(TINY.config, "sink_window", 64, window=16) == kv_bytes_per_token(
        TINY.config, "none", 64) / 4
