"""The static KV cache (positions on the device, masks by arange, rollback by index) against the dynamic one:
raster AR, VAR's per-scale pass, speculative decoding with rollbacks, the Generator's options, bad input.
The CUDA-graph replay of these steps is checked in test_graphs_gpu.py."""

import warnings
from contextlib import nullcontext
from itertools import count

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ar_course import checkpoint, raster, var
from ar_course.sampling import GREEDY, SamplingConfig
from ar_course.speculative import sjd_generate, speculative_generate
from ar_course.system import GenerationRequest, Generator
from ar_course.transformer import GPT, GPTConfig, graphs
from ar_course.kernels import masks, ops, record_dispatch
from ar_course.transformer.graphs import CUDAGraphStep, _replace_tensors, _signature, _tensors
from ar_course.transformer.model import KernelAttention, StaticKVCache, sdpa_attention, use_attention

SAMPLINGS = {"greedy": GREEDY, "seeded": SamplingConfig(temperature=1.0, top_k=20)}


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # for this module only: the rest of the worker keeps conftest's share of the cores
    ar, ar_tok = raster.load_pretrained()
    draft, _ = checkpoint.load_with_tokenizer("ar_mnist_draft", "cpu", kind=raster.CHECKPOINT_KIND)
    var_model, var_tok = var.load_pretrained()
    yield {"ar": ar, "draft": draft, "var": var_model, "var_tokenizer": var_tok, "ar_tokenizer": ar_tok}
    torch.set_num_threads(threads)


def small_gpt(pos: str) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=37, block_size=30, n_layer=2, n_head=2, n_embd=32, n_classes=4, pos=pos,
                       grid=(5, 5) if pos == "rope2d" else None)
    return GPT(config).eval()


@pytest.mark.parametrize("pos", ["rope", "rope2d", "learned", "none"])
def test_static_cache_logits_match_the_dynamic_cache_step_by_step(pos):
    model = small_gpt(pos)
    classes = torch.tensor([0, 3, 4])
    idx = torch.randint(37, (3, 12), generator=torch.Generator().manual_seed(1))
    dynamic, static = model.make_cache(3), model.make_cache(3, static=True)
    chunks = [(0, 5), (5, 6), (6, 9), (9, 10), (10, 12)]  # a prompt, single steps, a multi-token pass
    for i, (a, b) in enumerate(chunks):
        cls = classes if i == 0 else None
        want, _ = model(idx[:, a:b], classes=cls, cache=dynamic)
        got, _ = model.decode_step(idx[:, a:b], cls, static)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert static.length == dynamic.length
    checked, _ = model(idx[:, :0], classes=classes, cache=model.make_cache(3, static=True))  # forward dispatches
    first, _ = model(idx[:, :0], classes=classes, cache=model.make_cache(3))
    torch.testing.assert_close(checked, first, atol=1e-5, rtol=0)


def test_static_cache_masks_positions_past_its_length_on_the_device():
    cache = StaticKVCache(1, 1, 1, 6, 2)
    cache.advance(2)
    positions = cache.positions(2)
    assert positions.tolist() == [2, 3]
    assert cache.visible(positions, causal=True).tolist() == [[True, True, True, False, False, False],
                                                              [True, True, True, True, False, False]]
    assert cache.visible(positions, causal=False).tolist() == [[True] * 4 + [False] * 2] * 2
    k = torch.ones(1, 1, 2, 2)
    full, _ = cache.append(0, k, k)
    assert full.shape == (1, 1, 6, 2) and full[0, 0, :, 0].tolist() == [0, 0, 1, 1, 0, 0]
    cache.rollback(1)
    assert cache.length == 1
    cache.rollback(torch.tensor(4))
    assert cache.length == 4


def test_static_cache_advance_past_max_len_is_refused():
    with pytest.raises(ValueError, match=r"^advance n must be an integer in \[0, 4\], got 5"):
        StaticKVCache(1, 1, 1, 4, 2).advance(5)


def test_a_half_precision_static_cache_takes_float32_keys_and_values():
    """A float16 cache written by a float32 model (or autocast's mix) casts both keys and values to its dtype."""
    cache = StaticKVCache(1, 1, 1, 4, 2, dtype=torch.float16)
    k_all, v_all = cache.append(0, torch.full((1, 1, 2, 2), 1.5), torch.full((1, 1, 2, 2), 2.5))
    assert k_all.dtype == v_all.dtype == torch.float16
    assert k_all[0, 0, :, 0].tolist() == [1.5, 1.5, 0, 0] and v_all[0, 0, :, 0].tolist() == [2.5, 2.5, 0, 0]


def test_static_cache_changes_pos_in_place_for_captured_graphs():
    """A captured CUDA graph reads the cache's length from one device tensor: rollback (to an int or a tensor)
    and reset write into that tensor instead of replacing it."""
    cache = StaticKVCache(1, 1, 1, 8, 2)
    pos = cache.pos  # what a captured graph reads
    cache.advance(5)
    cache.rollback(torch.tensor(3))
    assert cache.pos is pos and int(pos) == 3
    cache.reset()
    assert cache.pos is pos and int(pos) == 0


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
def test_raster_generation_with_the_static_cache_matches_the_dynamic_cache(models, sampling):
    classes = torch.tensor([0, 5, 7])
    runs = [raster.generate_tokens(models["ar"], classes, (8, 8), sampling=sampling, cfg=1.0, cache=cache,
                                   generator=torch.Generator().manual_seed(3)) for cache in ("dynamic", "static")]
    assert torch.equal(runs[0], runs[1])


def test_a_reused_static_cache_is_reset_and_gives_the_same_tokens(models):
    model, classes = models["ar"], torch.tensor([2, 4])
    cache = model.make_cache(4, static=True)  # 2 rows + their null-class twins
    want = raster.generate_tokens(model, classes, (8, 8), cfg=1.0, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        got = raster.generate_tokens(model, classes, (8, 8), cfg=1.0, cache=cache,
                                     generator=torch.Generator().manual_seed(0))
        assert torch.equal(got, want)


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
def test_var_per_scale_steps_with_the_static_cache_match_the_dynamic_cache(models, sampling):
    model, vq = models["var"], models["var_tokenizer"].quantizer
    classes = torch.arange(10)
    runs = [var.sample_pyramid(model, vq, classes, sampling=sampling, cfg=2.0, cache=cache,
                               generator=torch.Generator().manual_seed(4)) for cache in ("dynamic", "static")]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    x, cls = None, torch.arange(3)
    dynamic, static = model.make_cache(3), model.make_cache(3, static=True)
    for k in range(model.config.num_scales):
        want = model.step(k, x, cls, dynamic)
        got = model.step(k, x, cls, static)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        if k + 1 < model.config.num_scales:
            s = model.config.scales[k + 1]
            x = torch.randn(3, s * s, model.config.latent_dim, generator=torch.Generator().manual_seed(k))


def test_generate_images_takes_the_cache_option(models):
    classes = torch.tensor([0, 4, 9])
    runs = [var.generate_images(models["var"], models["var_tokenizer"], classes, cfg=2.0, seed=0, batch_size=2,
                                cache=cache) for cache in ("dynamic", "static")]
    torch.testing.assert_close(runs[1], runs[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cache must be one of"):
        var.generate_images(models["var"], models["var_tokenizer"], classes, cache="paged")


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
def test_speculative_decoding_with_the_static_cache_matches_including_rollbacks(models, sampling):
    start, classes = torch.zeros(1, 0, dtype=torch.long), torch.tensor([3])
    draft_runs = [speculative_generate(models["ar"], models["draft"], start, 64, gamma=4, sampling=sampling, cfg=1.0,
                                       classes=classes, generator=torch.Generator().manual_seed(0), cache=cache)
                  for cache in ("dynamic", "static")]
    jacobi_runs = [sjd_generate(models["ar"], 64, classes=classes, sampling=sampling, cfg=1.0, window=6,
                                generator=torch.Generator().manual_seed(0), cache=cache)
                   for cache in ("dynamic", "static")]
    for (seq_a, stats_a), (seq_b, stats_b) in (draft_runs, jacobi_runs):
        assert torch.equal(seq_a, seq_b)
        assert stats_a.accepted_hist == stats_b.accepted_hist
        assert stats_a.rejected > 0  # some rounds rolled back rejected drafts


def test_generator_cache_option_matches_and_graphs_need_cuda(models):
    gen = Generator(models["var"], models["var_tokenizer"], models["ar"], models["ar_tokenizer"], models["draft"])
    for method, extra in (("var", {}), ("ar", {}), ("ar", {"speculative": "draft"})):
        classes = [1, 6] if extra else list(range(5))
        plain = gen.generate(classes, method=method, seed=0, **extra)
        static = gen.generate(classes, method=method, seed=0, cache="static", **extra)
        torch.testing.assert_close(static.images, plain.images, atol=1e-5, rtol=0)
        assert static.stats.forward_passes == plain.stats.forward_passes
        assert static.stats.backends["compiled"] == "no" and static.stats.capture_seconds == 0
    assert GenerationRequest([1]).cache == "dynamic" and GenerationRequest([1], graphs=True).cache == "static"
    with pytest.raises(ValueError, match="graphs=True needs the models on a CUDA device"):
        gen.generate([1], graphs=True)


@pytest.mark.parametrize("options, message", [
    ({"cache": "fixed"}, "cache must be one of"),
    ({"graphs": True, "cache": "dynamic"}, "graphs=True applies to batched generation"),
    ({"graphs": True, "method": "ar", "speculative": "jacobi"}, "graphs=True applies to batched generation"),
    ({"graphs": True, "compile": True}, "graphs=True applies to batched generation"),
    ({"compile": True, "cache": "static"}, "compile=True runs the dynamic cache"),
])
def test_bad_cache_and_graph_options_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest([1], **options)
    with pytest.raises(TypeError, match="graphs must be True or False"):
        GenerationRequest([1], graphs=1)


def test_bad_static_caches_are_refused(models):
    model, classes = models["ar"], torch.tensor([1, 2])
    with pytest.raises(ValueError, match="cache must be one of"):
        raster.generate_tokens(model, classes, (8, 8), cache="fixed")
    with pytest.raises(ValueError, match="holds 3 rows of 65 positions; this call needs 2 rows"):
        raster.generate_tokens(model, classes, (8, 8), cache=model.make_cache(3, static=True))
    with pytest.raises(ValueError, match="needs use_cache=True"):
        raster.generate_tokens(model, classes, (8, 8), cache="static", use_cache=False)
    with pytest.raises(ValueError, match="cache must be one of"):
        var.sample_pyramid(models["var"], models["var_tokenizer"].quantizer, classes, cache="fixed")
    with pytest.raises(ValueError, match="decoders make their own caches"):
        sjd_generate(model, 4, classes=torch.tensor([1]), cache=model.make_cache(1, static=True))
    with pytest.raises(ValueError, match="targets are not taken with a StaticKVCache"):
        model(classes[:, None], targets=classes[:, None], cache=model.make_cache(2, static=True))
    cache = StaticKVCache(1, 1, 1, 4, 2)
    with pytest.raises(ValueError, match=r"length must be an integer in \[0, 4\], got 5"):
        cache.rollback(5)


def test_graph_signatures_separate_shapes_and_caches():
    """What a captured graph is specialised to (the capture itself needs CUDA: test_graphs_gpu.py)."""
    a, b = StaticKVCache(1, 2, 1, 8, 2), StaticKVCache(1, 2, 1, 8, 2)
    x = torch.zeros(2, 1, dtype=torch.long)
    key = _signature((x,), {"classes": None, "cache": a})
    assert key == _signature((torch.ones(2, 1, dtype=torch.long),), {"classes": None, "cache": a})
    assert key != _signature((torch.zeros(2, 2, dtype=torch.long),), {"classes": None, "cache": a})
    assert key != _signature((x,), {"classes": None, "cache": b})
    assert key != _signature((x,), {"classes": torch.zeros(2, dtype=torch.long), "cache": a})
    y = torch.ones(2)
    args, kwargs = _replace_tensors((x, 3), {"cache": a, "y": y}, [x + 1, y + 1])
    assert torch.equal(args[0], x + 1) and args[1] == 3 and kwargs["cache"] is a and torch.equal(kwargs["y"], y + 1)
    assert [t.shape for t in _tensors((x, 3), {"y": y, "cache": a})] == [x.shape, y.shape]


def test_a_graph_signature_includes_dtypes():
    assert _signature((torch.zeros(2),), {}) != _signature((torch.zeros(2, dtype=torch.float64),), {})


def test_a_graph_signature_includes_autocast(monkeypatch):
    """A graph captured without autocast must not be replayed under autocast (nor the other way round)."""
    x = torch.zeros(2, 1)
    plain = _signature((x,), {})
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: True)
    assert _signature((x,), {}) != plain


def test_a_graph_signature_includes_the_attention_in_effect():
    """A graph captured with one attention (use_attention) must not be replayed under another."""
    x = torch.zeros(2, 1)
    plain = _signature((x,), {})
    with use_attention(KernelAttention("torch")):
        assert _signature((x,), {}) != plain


def test_keyword_tensors_are_taken_in_name_order():
    """_tensors lists keyword tensors sorted by name, the order _replace_tensors writes them back in."""
    a, b = torch.zeros(1), torch.zeros(2)
    assert [t.shape for t in _tensors((), {"b": b, "a": a})] == [a.shape, b.shape]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where no capture can work")
def test_a_graph_step_that_cannot_capture_warns_once_and_runs_eagerly():
    step = CUDAGraphStep(lambda x: x * 2)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed, running eagerly"):
        assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
    assert step.failure and step.graphs == 0 and step.capture_seconds == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(step(torch.ones(3)), torch.full((3,), 2.0))


class _HostReads(TorchFunctionMode):
    """Records every read of a tensor's value back on the host (what breaks a CUDA-graph capture)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attention", [sdpa_attention, KernelAttention("auto"), KernelAttention("torch")])
def test_a_static_cache_decode_step_reads_nothing_back_where_values_cannot_be_read(monkeypatch, attention):
    """What a CUDA-graph capture needs of the step: kernels="auto" read the static cache's dense mask back in
    every layer (checking that it was a prefix mask), so its decode step could never be captured (audit 23).
    Here "no reads allowed" is what a capture or a torch.compile trace would say."""
    monkeypatch.setattr(masks, "values_readable", lambda device: False)
    model = small_gpt("rope")
    cache = model.make_cache(2, static=True)
    with torch.no_grad(), use_attention(attention):
        want, _ = model(torch.tensor([[1, 2, 3]] * 2), classes=torch.tensor([0, 1]), cache=model.make_cache(2))
        model.decode_step(torch.tensor([[1, 2]] * 2), torch.tensor([0, 1]), cache)  # the class token and a prompt
        with _HostReads() as host:
            got, _ = model.decode_step(torch.tensor([[3]] * 2), None, cache)  # one new token
    assert host.reads == []
    torch.testing.assert_close(got[:, -1], want[:, -1], atol=1e-5, rtol=0)


class _FakeGraph:
    """A CUDA graph on CPU for bookkeeping tests: capturing runs the pass once, replaying runs no Python."""

    def replay(self) -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA graphs on CPU for bookkeeping tests (_FakeGraph, streams that do nothing)."""
    stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def test_a_graph_step_reports_the_kernels_of_one_pass_at_every_call(fake_cuda):
    """A replay runs no kernel entry point, so warm graphs=True calls reported "attention: none"; the first call
    counted the two warm-up passes too. Each call now reports the capture pass's record once (audit 23)."""
    passes = []

    def step(x):
        passes.append(1)
        return ops._ran("flash_attention", "triton", x * 2)

    graphed = CUDAGraphStep(step, warmup=2)
    with record_dispatch() as first:
        graphed(torch.ones(2))
    with record_dispatch() as warm:
        graphed(torch.ones(2))
    assert len(passes) == 3 and graphed.graphs == 1  # two warm-ups and the capture, then replays only
    assert first.summary() == warm.summary() == {"flash_attention": "triton", "fallbacks": []}
    assert first.calls["flash_attention"]["triton"] == warm.calls["flash_attention"]["triton"] == 1


def test_capture_seconds_sums_every_capture(fake_cuda, monkeypatch):
    """capture_seconds is the time of every capture so far (one per signature), not the last one's."""
    clock = count()
    monkeypatch.setattr(graphs.time, "perf_counter", lambda: float(next(clock)))
    step = CUDAGraphStep(lambda x: x * 2, warmup=1)
    step(torch.ones(2))
    step(torch.ones(3))  # a second signature: a second capture
    assert step.graphs == 2 and step.capture_seconds == 2.0


def test_graphs_keep_the_caches_and_graphs_of_the_last_four_chunk_sizes_only():
    """Every new chunk size kept a static cache (and its graphs) for the Generator's life: 64 request sizes held
    1 GiB of caches on the shipped VAR. The least recently used size is dropped with the graphs captured over it
    (capturing needs CUDA: the graphs here are stand-ins under their real signatures, the request a stand-in for
    one with graphs=True, which needs CUDA to be made)."""
    from types import SimpleNamespace

    from ar_course.system import Tally, _DecodeStep

    model = small_gpt("learned")
    step = _DecodeStep(model, model, model.decode_step, model.forward)
    request = SimpleNamespace(graphs=True, cache="static", compile=False)
    x = torch.zeros(1, 1, dtype=torch.long)
    caches = {}
    for rows in (2, 4, 6, 8, 4, 10):
        with step.open(request, Tally(), rows) as (_, cache):
            caches[rows] = cache
            step._graphed._graphs[_signature((x,), {"cache": cache})] = f"graph over {rows} rows"
    assert list(step._caches) == [6, 8, 4, 10]  # 2 was the least recently used (4 was used again)
    assert step._caches[4] is caches[4]  # a size used again keeps its cache and graphs; 2's graphs are gone
    assert sorted(step._graphed._graphs.values()) == sorted(f"graph over {r} rows" for r in (4, 6, 8, 10))
    assert step._graphed.forget(caches[6]) == 1 and step._graphed.forget(caches[6]) == 0
