"""Bad input to the GPT, its KV caches, the plain functions of ``transformer/functional.py`` and the sampler's
``generator`` (API audit 3: F5, F6, F13, F14, F15, F16, F19, F22): each case raises a one-line ``TypeError`` /
``ValueError`` naming the argument, at once, instead of a deep traceback, a late crash or a silent NaN; valid
input keeps working (and gives the same numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ar_course import sampling
from ar_course.data import CharTokenizer, normalise_text
from ar_course.transformer import GPT, GPTConfig, KVCache, StaticKVCache
from ar_course.transformer import functional as F
from ar_course.transformer import model as M
from ar_course.var import embed_levels_positions, scale_masks

SMALL = dict(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8)


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**SMALL)).eval()


def _ids(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.long)


# -- F5: a seed where a torch.Generator goes ------------------------------------------------------------------

GENERATOR_MSG = r"generator must be a torch.Generator or None, got {} \(make one with torch.Generator\(\).manual_seed"


@pytest.mark.parametrize("call", [
    lambda m, g: m.generate(_ids(1, 2), 2, generator=g),
    lambda m, g: m.generate(_ids(1, 2), 2, generator=g, sampling=sampling.GREEDY),
    lambda m, g: sampling.sample(torch.zeros(2, 3), generator=g),
    lambda m, g: sampling.sample(torch.zeros(2, 3), generator=g, sampling=sampling.GREEDY),
    lambda m, g: sampling.sample_from_probs(torch.ones(2, 3), generator=g),
], ids=["generate", "generate-greedy", "sample", "sample-greedy", "sample_from_probs"])
@pytest.mark.parametrize("generator, kind", [(0, "int"), ("0", "str"), (np.int64(3), "int64")])
def test_a_seed_is_not_a_generator(gpt, call, generator, kind):
    with pytest.raises(TypeError, match=GENERATOR_MSG.format(kind)):
        call(gpt, generator)


def test_a_generator_or_none_still_samples_the_same(gpt):
    a = gpt.generate(_ids(1, 2), 3, generator=torch.Generator().manual_seed(5))
    b = gpt.generate(_ids(1, 2), 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and gpt.generate(_ids(1, 2), 3).shape == (1, 5)
    assert sampling.check_generator(None) is None


# -- F6: a config that is not a GPTConfig ---------------------------------------------------------------------


@pytest.mark.parametrize("config, kind", [(dict(SMALL), "dict"), (None, "NoneType")])
def test_gpt_needs_a_gpt_config(config, kind):
    with pytest.raises(TypeError, match=rf"config must be a GPTConfig \(GPTConfig\(\*\*d\) or "
                                        rf"GPTConfig.from_dict\(d\) makes one\), got {kind}"):
        GPT(config)


# -- F13: every target ignored -> NaN loss --------------------------------------------------------------------


def test_every_target_ignored_is_refused(gpt):
    with pytest.raises(ValueError, match=r"every target is ignored \(-100\): no loss to compute"):
        gpt(_ids(2, 3), targets=torch.full((2, 3), -100))


@pytest.mark.parametrize("targets, error, match", [
    (torch.tensor([[1, -100, 10]]), ValueError, r"targets must lie in \[0, 9\] \(or -100\), got 10"),
    (torch.tensor([[-5, -100, -100]]), ValueError, r"targets must lie in \[0, 9\] \(or -100\), got -5"),
    (torch.tensor([[1, 2]]), ValueError, r"targets must be a \(1, 3\) long tensor, got \(1, 2\)"),
    (torch.tensor([[1.0, 2.0, 3.0]]), ValueError, r"targets must be a \(1, 3\) long tensor, got \(1, 3\) torch.float"),
    ([[1, 2, 3]], TypeError, r"targets must be a \(1, 3\) long tensor, got list"),
])
def test_other_bad_targets_keep_their_messages(gpt, targets, error, match):
    with pytest.raises(error, match=match):
        gpt(_ids(1, 3), targets=targets)


def test_some_ignored_targets_give_the_same_loss(gpt):
    logits, loss = gpt(_ids(1, 3), targets=torch.tensor([[1, -100, 2]]))
    expected = torch.nn.functional.cross_entropy(logits[0, [0, 2]], torch.tensor([1, 2]))
    assert torch.equal(loss, expected)


# -- F14: make_cache's max_len and static ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_len": 0}, ValueError, r"max_len must be an integer in \[1, 8\], got 0"),
    ({"max_len": 100}, ValueError, r"max_len must be an integer in \[1, 8\], got 100"),
    ({"max_len": 4.0}, TypeError, r"max_len must be an integer in \[1, 8\], got 4.0"),
    ({"static": "yes"}, TypeError, r"static must be True or False, got 'yes'"),
    ({"static": 1}, TypeError, r"static must be True or False, got 1"),
])
def test_make_cache_checks_its_arguments(gpt, kwargs, error, match):
    with pytest.raises(error, match=match):
        gpt.make_cache(1, **kwargs)


@pytest.mark.parametrize("kwargs, cls, max_len", [
    ({}, KVCache, 8), ({"max_len": None}, KVCache, 8), ({"max_len": 3}, KVCache, 3),
    ({"max_len": np.int64(8), "static": np.bool_(True)}, StaticKVCache, 8),
])
def test_make_cache_still_builds(gpt, kwargs, cls, max_len):
    cache = gpt.make_cache(2, **kwargs)
    assert type(cache) is cls and cache.max_len == max_len and cache.length == 0


# -- F15: advance and rollback of both caches ------------------------------------------------------------------


def _cache(cls: type, length: int = 0) -> KVCache | StaticKVCache:
    cache = cls(1, 1, 1, 6, 2)
    cache.advance(length)
    return cache


@pytest.mark.parametrize("cls, method, arg, error, match", [
    (KVCache, "advance", -3, ValueError, r"advance n must be an integer >= 0, got -3"),
    (KVCache, "advance", 1.0, TypeError, r"advance n must be an integer >= 0, got 1.0"),
    (KVCache, "advance", 5, ValueError, r"cannot advance past max_len 6: 2 \+ 5 positions"),
    (KVCache, "rollback", 1.5, TypeError, r"rollback length must be an integer in \[0, 2\], got 1.5"),
    (KVCache, "rollback", -1, ValueError, r"rollback length must be an integer in \[0, 2\], got -1"),
    (KVCache, "rollback", 3, ValueError, r"rollback length must be an integer in \[0, 2\], got 3"),
    (StaticKVCache, "advance", -1, ValueError, r"advance n must be an integer in \[0, 6\], got -1"),
    (StaticKVCache, "advance", 100, ValueError, r"advance n must be an integer in \[0, 6\], got 100"),
    (StaticKVCache, "advance", 1.0, TypeError, r"advance n must be an integer in \[0, 6\], got 1.0"),
    (StaticKVCache, "rollback", 1.5, TypeError, r"rollback length must be an integer in \[0, 6\], got 1.5"),
    (StaticKVCache, "rollback", 7, ValueError, r"rollback length must be an integer in \[0, 6\], got 7"),
])
def test_cache_advance_and_rollback_are_checked(cls, method, arg, error, match):
    cache = _cache(cls, 2)
    with pytest.raises(error, match=match):
        getattr(cache, method)(arg)
    assert cache.length == 2  # untouched


@pytest.mark.parametrize("cls", [KVCache, StaticKVCache])
def test_cache_advance_and_rollback_still_move(cls):
    cache = _cache(cls, 2)
    cache.advance(np.int64(3))
    assert cache.length == 5 and type(cache.length) is int
    cache.rollback(1)
    assert cache.length == 1
    cache.advance(0)
    cache.rollback(0)
    assert cache.length == 0


def test_rolled_back_cache_then_runs(gpt):
    cache = gpt.make_cache(1)
    gpt(_ids(1, 3), cache=cache)
    with pytest.raises(TypeError, match="rollback length"):
        cache.rollback(1.5)
    cache.rollback(2)
    assert gpt(_ids(1, 1), cache=cache)[0].shape == (1, 1, 10) and cache.length == 3


# -- F16: an unknown kernel backend ---------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda m, b: M.set_attention(m, "kernels", b),
    lambda m, b: M.attention_function("kernels", b),
    lambda m, b: M.KernelAttention(b),
], ids=["set_attention", "attention_function", "KernelAttention"])
@pytest.mark.parametrize("backend, match", [
    ("bogus", r"unknown backend 'bogus'; choose from"),
    ("numba_cpu", r"flash_attention has no backend 'numba_cpu'; choose from \('auto', 'torch', 'numba', 'triton'\)"),
])
def test_an_unknown_kernel_backend_is_refused_when_set(call, backend, match):
    model = GPT(GPTConfig(**SMALL))
    with pytest.raises(ValueError, match=match):
        call(model, backend)
    assert model.config.attn == "sdpa" and model.blocks[0].attn.attention is M.sdpa_attention  # untouched


def test_known_kernel_backends_are_taken():
    model = GPT(GPTConfig(**SMALL))
    M.set_attention(model, "kernels", "torch")
    assert model.blocks[0].attn.attention == M.KernelAttention("torch") and model.config.attn == "kernels"
    assert M.attention_function("kernels") == M.KernelAttention("auto")


# -- F19: the plain reference functions -----------------------------------------------------------------------

_Q = torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(0))  # (B, H, T, D)
_ATTN_MSG = r"must be a floating-point \(B, H, T, D\) torch.Tensor, got"


@pytest.mark.parametrize("call, error, match", [
    (lambda: F.rms_norm(torch.full((1, 4), 1e-3), eps=-1.0), ValueError, r"eps must be a finite number > 0, got -1.0"),
    (lambda: F.rms_norm(torch.ones(1, 4), eps=0.0), ValueError, r"eps must be a finite number > 0, got 0.0"),
    (lambda: F.rms_norm(torch.ones(1, 4), eps=math.nan), ValueError, r"eps must be a finite number > 0, got nan"),
    (lambda: F.rms_norm(torch.ones(1, 4), eps=math.inf), ValueError, r"eps must be a finite number > 0, got inf"),
    (lambda: F.rms_norm(torch.ones(1, 4), eps="1e-6"), TypeError, r"eps must be a finite number > 0, got '1e-6'"),
    (lambda: M.RMSNorm(4, eps=-1.0), ValueError, r"eps must be a finite number > 0, got -1.0"),
    (lambda: F.rope_angles(torch.arange(3), 4, 0.0), ValueError, r"base must be a finite number > 0, got 0.0"),
    (lambda: F.rope_angles(torch.arange(3), 4, -2.0), ValueError, r"base must be a finite number > 0, got -2.0"),
    (lambda: F.rope_2d_angles(torch.arange(3), torch.arange(3), 8, 0.0), ValueError, r"base must be a finite"),
    (lambda: F.masked_softmax(torch.zeros(2, 3), torch.tensor([[1, 0, 1], [1, 1, 0]])), ValueError,
     r"mask must have dtype torch.bool \(True = may attend\), got torch.int64"),
    (lambda: F.masked_softmax(torch.zeros(2, 3), [[True] * 3] * 2), ValueError,
     r"mask must be a torch.Tensor of dtype bool, got list"),
    (lambda: F.causal_mask(2.5), TypeError, r"t_q must be an integer >= 0, got 2.5"),
    (lambda: F.causal_mask(-1), ValueError, r"t_q must be an integer >= 0, got -1"),
    (lambda: F.causal_mask(2, 3.0), TypeError, r"t_k must be an integer >= 0, got 3.0"),
    (lambda: F.causal_mask(3, 2), ValueError, r"t_k \(2\) must be >= t_q \(3\)"),
    (lambda: F.split_heads(torch.zeros(1, 2, 4), 0), ValueError, r"n_head must be an integer >= 1, got 0"),
    (lambda: F.split_heads(torch.zeros(1, 2, 4), 2.0), TypeError, r"n_head must be an integer >= 1, got 2.0"),
    (lambda: F.split_heads(torch.zeros(1, 2, 4), 3), ValueError, r"channels \(4\) must be divisible"),
    (lambda: M.plain_attention(_Q, _Q.long(), _Q, None, True), ValueError,
     rf"^k {_ATTN_MSG} shape \(1, 2, 3, 4\) torch.int64$"),
    (lambda: M.plain_attention(_Q, _Q, _Q, None, True, math.nan), ValueError,
     r"^dropout_p must be a finite number in \[0, 1\], got nan$"),
    (lambda: M.plain_attention(None, _Q, _Q, None, True), TypeError, rf"^q {_ATTN_MSG} NoneType$"),
    (lambda: M.plain_attention(_Q, _Q[0], _Q, None, True), ValueError,
     rf"^k {_ATTN_MSG} shape \(2, 3, 4\) torch.float32$"),
    (lambda: M.plain_attention(_Q, _Q, _Q, None, "no"), TypeError, r"^causal must be True or False, got 'no' \(str\)$"),
    (lambda: M.plain_attention(_Q, _Q, _Q, [[True] * 3] * 3, False), TypeError,
     r"^mask must be None or a bool torch.Tensor \(True = may attend\), got list$"),
    (lambda: M.RMSNorm(-1), ValueError, r"^dim must be an integer >= 1, got -1$"),
    (lambda: M.RMSNorm(None), TypeError, r"^dim must be an integer >= 1, got None \(NoneType\)$"),
    (lambda: M.Rotary(8, -1), ValueError, r"^max_len must be an integer >= 1, got -1$"),
    (lambda: M.Rotary(8, 2.5), TypeError, r"^max_len must be an integer >= 1, got 2.5 \(float\)$"),
    (lambda: GPT(GPTConfig(**SMALL)).check_room(2.5, 1), TypeError, r"^T must be an integer >= 0, got 2.5 \(float\)$"),
    (lambda: GPT(GPTConfig(**SMALL)).check_room(-3, 1), ValueError, r"^T must be an integer >= 0, got -3$"),
    (lambda: GPT(GPTConfig(**SMALL)).check_room("x", 1), TypeError, r"^T must be an integer >= 0, got 'x' \(str\)$"),
    (lambda: KVCache(10**12, 1, 1, 4, 2), ValueError,
     r"^a KV cache of n_layer=1000000000000 x \(1, 1, 4, 2\) torch.float32 needs .+ GiB, more than the .+ GiB of "
     r"memory of cpu$"),
    (lambda: M.StaticKVCache(10**12, 1, 1, 4, 2), ValueError,
     r"^a KV cache of n_layer=1000000000000 x \(1, 1, 4, 2\) torch.float32 needs .+ GiB, more than the .+ GiB of "
     r"memory of cpu$"),
    (lambda: normalise_text(None), TypeError, r"^text must be a str, got NoneType$"),
    (lambda: CharTokenizer(None), TypeError, r"^chars must be a str or an iterable of str, got NoneType$"),
    (lambda: CharTokenizer([1, 2]), TypeError, r"^chars must be a str or an iterable of str, got an item 1 \(int\)$"),
    (lambda: embed_levels_positions(None, torch.randn(3, 4), torch.randn(14, 4), (1, 2, 3)), TypeError,
     r"^x must be a torch.Tensor, got NoneType$"),
    (lambda: scale_masks(None, (1, 2, 3)), TypeError, r"^mask must be a \(B, 3, 3\) bool torch.Tensor, got NoneType$"),
])
def test_reference_functions_refuse(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_reference_functions_still_compute():
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(F.rms_norm(x), expected) and torch.equal(F.rms_norm(x, eps=np.float64(1e-6)), expected)
    assert torch.equal(M.RMSNorm(4)(x), expected)
    assert torch.equal(F.causal_mask(np.int64(2), 3), torch.tensor([[True, True, False], [True, True, True]]))
    assert F.causal_mask(0).shape == (0, 0)
    assert F.split_heads(torch.zeros(1, 2, 4), np.int64(2)).shape == (1, 2, 2, 2)
    cos, sin = F.rope_angles(torch.arange(3), 4, 1)  # base 1 (an int): every pair turns by its position
    assert torch.equal(cos[:, 0], cos[:, 1]) and torch.equal(sin[:, 0], sin[:, 1]) and not sin[1:].eq(0).any()
    p = F.masked_softmax(torch.tensor([[0.0, -math.inf, 1.0]]), torch.tensor([[True, True, False]]))
    assert torch.equal(p, torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.equal(M.plain_attention(_Q, _Q, _Q, None, np.bool_(True)), M.plain_attention(_Q, _Q, _Q, None, True))
    assert CharTokenizer(["b", "a"]).chars == CharTokenizer("ab").chars == "ab" and normalise_text("a\tb") == "a    b"


# -- F22: GPTConfig.causal as a NumPy bool --------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [(np.bool_(True), True), (np.bool_(False), False), (False, False)])
def test_causal_takes_numpy_bools_like_the_other_flags(value, expected):
    config = GPTConfig(**SMALL, causal=value)
    assert config.causal is expected and type(config.causal) is bool


@pytest.mark.parametrize("value", ["no", 1, None])
def test_causal_refuses_a_non_bool_like_the_other_flags(value):
    with pytest.raises(TypeError, match=r"causal must be True or False, got"):
        GPTConfig(**SMALL, causal=value)


@pytest.mark.parametrize("max_windows, error, match", [
    (0, ValueError, r"^max_windows must be an integer >= 1, got 0$"),
    (-1, ValueError, r"^max_windows must be an integer >= 1, got -1$"),
    (2.0, TypeError, r"^max_windows must be an integer >= 1, got 2.0"),
])
def test_evaluate_lm_checks_max_windows(gpt, max_windows, error, match):
    from ar_course.transformer.train import evaluate_lm

    ids = torch.arange(100) % 10
    with pytest.raises(error, match=match):
        evaluate_lm(gpt, ids, 4, max_windows=max_windows)
    assert evaluate_lm(gpt, ids, 4, max_windows=3) == evaluate_lm(gpt, ids, 4, max_windows=np.int64(3))


def test_evaluate_lm_leaves_the_model_in_the_mode_it_found():
    """Evaluating during training (it switches to eval mode to score) hands the model back in training mode, so
    dropout keeps working for the next steps; a model in eval mode stays in eval mode."""
    from ar_course.transformer.train import evaluate_lm

    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    ids = torch.arange(40) % 10
    for training in (True, False):
        model.train(training)
        evaluate_lm(model, ids, 4)
        assert all(m.training == training for m in model.modules())


@pytest.mark.parametrize("cache", [KVCache, StaticKVCache])
def test_a_cache_reads_its_device_name_as_get_device_does(cache):
    """A device name torch cannot read is the package's one-line ValueError, not torch's list of device types."""
    with pytest.raises(ValueError, match="unknown device 'gpu': use 'cpu', 'cuda', 'cuda:N' or 'auto'"):
        cache(1, 1, 1, 4, 2, device="gpu")
    assert cache(1, 1, 1, 4, 2, device="cpu").k[0].device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device 'cuda' requested but CUDA is not available"):
            cache(1, 1, 1, 4, 2, device="cuda")
