"""The full system (chapter 07): Generator outputs, fast paths against plain paths, errors, the generate CLI."""

import importlib.util
import itertools
import copy
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from ar_course import system
from ar_course.checkpoint import CheckpointError, resolve
from ar_course.raster import generate_tokens, raster_config
from ar_course.raster.functional import to_raster
from ar_course.sampling import GREEDY, SamplingConfig
from ar_course.system import PRETRAINED, GenerationRequest, GenerationStats, Generator
from ar_course.tokenizers import VQVAE, VQVAEConfig
from ar_course.transformer import GPT
from ar_course.transformer.model import SelfAttention, attention_function, sdpa_attention, set_attention, use_attention
from ar_course.var import functional as var_ref
from ar_course.var import sample_pyramid


@pytest.fixture(scope="module")
def gen():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # for this module only: the rest of the worker keeps conftest's share of the cores
    yield Generator.from_pretrained("mnist", device="cpu")
    torch.set_num_threads(threads)


def test_var_and_ar_generate_images_with_their_pass_counts(gen):
    for method, passes in (("var", 6), ("ar", 64)):
        out = gen.generate([0, 3, 9], method=method, seed=1)
        assert out.images.shape == (3, 1, 32, 32) and out.images.dtype == torch.float32
        assert 0 <= float(out.images.min()) and float(out.images.max()) <= 1
        assert out.classes.tolist() == [0, 3, 9]
        assert out.stats.forward_passes == passes and out.stats.passes_per_image == passes
        assert out.stats.backends["attention"] == "torch" and out.stats.precision == "float32"
        assert out.stats.backends["fallbacks"] == []
        json.dumps(out.stats.as_dict())  # JSON-ready


def test_passes_per_image_counts_batched_passes_once_per_chunk(gen):
    out = gen.generate(list(range(10)), method="var", batch_size=4)  # chunks of 4, 4, 2
    assert out.stats.forward_passes == 18 and out.stats.passes_per_image == 6


def test_seeded_runs_reproduce_and_seeds_differ(gen):
    a = gen.generate([1, 2, 3, 4], seed=5).images
    b = gen.generate([1, 2, 3, 4], seed=5).images
    c = gen.generate([1, 2, 3, 4], seed=6).images
    assert torch.equal(a, b) and not torch.equal(a, c)


def model_state(gen: Generator) -> list:
    """What a generation call must leave as it found it on every model: the attention function of every layer,
    ``config.attn``, the hooks, and the instance attributes (a compiled step installed on the model would be
    one)."""
    state = []
    for model in (gen.var, gen.ar, gen.ar_draft):
        modules = list(model.modules())
        state.append(([m.attention for m in modules if isinstance(m, SelfAttention)], model.config.attn,
                      sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules),
                      sorted(model.__dict__)))
    return state


def test_generate_leaves_the_models_as_they_were(gen):
    before = model_state(gen)
    assert {fn for fns, *_ in before for fn in fns} == {sdpa_attention}
    gen.generate([0], method="var", kernels="triton" if _has_triton() else "numba", seed=0)
    gen.generate([0], method="ar", speculative="draft", seed=0)
    assert model_state(gen) == before
    with pytest.raises(ValueError, match="precision must be one of"):
        gen.generate([0], method="var", kernels="triton", precision="int8")
    assert model_state(gen) == before


def test_a_request_is_checked_once_and_runs_like_generate(gen):
    request = GenerationRequest([3, 1], method="ar", sampling=SamplingConfig(top_k=20), cfg=None, seed=4)
    assert request.cfg == 1.0 and request.classes.dtype == torch.long  # the method's default strength
    out = gen.run(request)
    assert torch.equal(out.images, gen.generate([3, 1], method="ar", sampling=SamplingConfig(top_k=20), seed=4).images)
    with pytest.raises(TypeError, match="go in sampling=SamplingConfig"):
        gen.generate([0], temperature=0.5)
    with pytest.raises(TypeError, match="sampling must be a SamplingConfig"):
        GenerationRequest([0], sampling={"top_k": 3})
    with pytest.raises(AttributeError):
        request.cfg = 3.0  # frozen: a request cannot change between its check and its run


@pytest.mark.parametrize("buffer", [torch.tensor([1, 2]), np.array([1, 2])], ids=["tensor", "numpy"])
def test_a_request_and_its_generation_keep_their_classes_when_the_callers_buffer_is_refilled(gen, buffer):
    """The classes were the caller's own tensor (or shared the NumPy array's memory): a service that refills one
    buffer per request relabelled every earlier Generation and changed a frozen, checked request."""
    request = GenerationRequest(buffer, method="var")
    out = gen.generate(buffer, method="var", seed=0)
    buffer[:] = 7
    assert request.classes.tolist() == [1, 2] and out.classes.tolist() == [1, 2]
    out = gen.run(request)
    out.classes[0] = 5  # nor does a Generation share its request's tensor
    assert request.classes.tolist() == [1, 2]


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None  # no import: ar_course.kernels sets its mode first


@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_forced_kernel_backends_agree_with_torch(gen, backend):
    """The chapter 06 kernels (Triton interpreter / numba CUDA simulator on CPU) inside the full VAR pipeline."""
    if backend == "triton" and not _has_triton():
        pytest.skip("triton is not installed")
    kern = gen.generate([4], method="var", kernels=backend, seed=0)
    plain = gen.generate([4], method="var", kernels="torch", seed=0)
    assert kern.stats.backends["attention"] == backend and kern.stats.backends["fallbacks"] == []
    assert kern.stats.backends["decode_attention"] == backend  # VAR's first scale is a single token
    torch.testing.assert_close(kern.images, plain.images, atol=1e-4, rtol=0)


@pytest.fixture
def auto_tries_triton(monkeypatch):
    """"auto" on this CPU as on a GPU: Triton is the candidate for FlashAttention and a fake timer decides
    (torch is timed first, then the kernel). The Triton function is replaced by torch's attention: what is
    under test is the accounting. Returns a function installing the two times."""
    if not _has_triton():
        pytest.skip("triton is not installed")
    from ar_course.kernels import ops, triton_kernels
    from ar_course.kernels.calibrate import Calibrator
    from ar_course.kernels.masks import prefix_to_dense

    def stand_in(q, k, v, mask, scale, **kwargs):
        kv_len = mask.kv_len(q.device)
        allowed = None if kv_len is None else prefix_to_dense(kv_len, k.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)

    rule = ops.backend_rule
    monkeypatch.setattr(ops, "backend_rule", lambda op, device_type, why_not, backend="auto", large=False:
                        "triton" if backend == "auto" and op == "flash_attention"
                        else rule(op, device_type, why_not, backend, large))
    monkeypatch.setattr(ops, "_FAILED", {})
    monkeypatch.setattr(triton_kernels, "flash_attention_triton", stand_in)
    monkeypatch.setattr(system, "AUTO_KERNEL_DEVICES", ("cuda", "cpu"))  # as the rule above now says for the CPU

    def install(torch_seconds: float, kernel_seconds: float) -> None:
        times = itertools.cycle([torch_seconds, kernel_seconds])
        monkeypatch.setattr(ops, "CALIBRATOR", Calibrator(timer=lambda fn: next(times), path=None,
                                                          device_types=("cpu",)))

    return install


def test_auto_stats_name_the_backend_that_ran_and_every_fallback(gen, auto_tries_triton, monkeypatch):
    plain = gen.generate([4], method="var", kernels="torch", seed=0)
    auto_tries_triton(torch_seconds=1.0, kernel_seconds=0.5)
    fast = gen.generate([4], method="var", seed=0)
    assert fast.stats.backends == {"attention": "triton", "decode_attention": "torch", "fallbacks": [],
                                   "compiled": "no"}
    torch.testing.assert_close(fast.images, plain.images, atol=1e-5, rtol=0)
    auto_tries_triton(torch_seconds=1.0, kernel_seconds=2.0)
    assert gen.generate([4], method="var", seed=0).stats.backends["attention"] == "torch"

    from ar_course.kernels import triton_kernels

    def broken(*args, **kwargs):
        raise RuntimeError("Both operands must be same dtype")

    monkeypatch.setattr(triton_kernels, "flash_attention_triton", broken)
    auto_tries_triton(torch_seconds=1.0, kernel_seconds=0.5)
    with pytest.warns(RuntimeWarning, match="triton kernel failed"):
        failed = gen.generate([4], method="var", seed=0)
    assert failed.stats.backends["attention"] == "torch"
    assert failed.stats.backends["fallbacks"] == [
        "triton flash_attention: RuntimeError: Both operands must be same dtype (used torch)"]
    assert "1 kernel fallback" in failed.stats.summary()
    torch.testing.assert_close(failed.images, plain.images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention, decode, says", [
    ("torch", "torch", "attention: torch)"),
    ("triton", "none", "attention: triton)"),
    ("none", "numba", "attention: numba)"),  # raster AR: every pass after the prompt is a one-token step
    ("triton x6", "torch", "attention: triton x6, decode torch)"),
])
def test_the_summary_names_what_computed_attention(attention, decode, says):
    stats = GenerationStats("ar", None, "cpu", "float32", {"attention": attention, "decode_attention": decode,
                                                           "fallbacks": [], "compiled": "no"}, 2, 1.0, 64, 64.0)
    assert stats.summary().startswith(f"2 images by ar on cpu (float32, {says}: 1.00 s, 2 images/s")


@pytest.mark.parametrize("images, seconds, says", [(1, 65.8, "1 image by var on cpu (float32, attention: torch): "
                                                               "65.80 s, 0.0152 images/s"),
                                                    (300, 1.0, "300 images by var on cpu (float32, attention: torch): "
                                                               "1.00 s, 300.0 images/s")])
def test_the_summary_counts_one_image_and_slow_rates_readably(images, seconds, says):
    stats = GenerationStats("var", None, "cpu", "float32", {"attention": "torch", "decode_attention": "torch",
                                                            "fallbacks": [], "compiled": "no"}, images, seconds, 6, 6.0)
    assert stats.summary().startswith(says)  # it said "1 images" and "0.0 images/s"


def run_concurrently(jobs: dict[str, object]) -> dict[str, list]:
    """Run every job ``name -> fn`` in its own thread, started together; the first job runs once, the others
    again and again until it is done (so they overlap it whatever the timing). Returns each job's results."""
    results: dict[str, list] = {name: [] for name in jobs}
    errors: list[BaseException] = []
    first_done = threading.Event()
    barrier = threading.Barrier(len(jobs))

    def work(name: str, fn, repeat: bool) -> None:
        try:
            barrier.wait()
            results[name].append(fn())
            while repeat and not first_done.is_set():
                results[name].append(fn())
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)
        finally:
            if not repeat:
                first_done.set()

    threads = [threading.Thread(target=work, args=(name, fn, i > 0)) for i, (name, fn) in enumerate(jobs.items())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("sharing", ["one Generator", "two Generators sharing the models"])
def test_threads_generating_with_different_kernels_do_not_interfere(gen, sharing):
    """One thread on the Triton interpreter, another on torch, on the same models at once: each thread's images
    and stats are exactly those it gets alone, and the models are untouched afterwards. (Were the attention
    switched by setting it on the shared models, the torch thread would run on Triton part of the time.)"""
    if not _has_triton():
        pytest.skip("triton is not installed")
    other = gen if sharing == "one Generator" else Generator(gen.var, gen.var_tokenizer, gen.ar, gen.ar_tokenizer,
                                                             gen.ar_draft)
    jobs = {"triton": lambda: gen.generate([4], method="var", kernels="triton", seed=0),
            "torch": lambda: other.generate([4, 7], method="var", kernels="torch", seed=1)}
    alone = {name: job() for name, job in jobs.items()}
    before = model_state(gen)
    results = run_concurrently(jobs)
    assert len(results["triton"]) == 1 and results["torch"]
    for name, outs in results.items():
        for out in outs:
            assert torch.equal(out.images, alone[name].images), name
            assert out.stats.backends == alone[name].stats.backends, name
            assert out.stats.forward_passes == alone[name].stats.forward_passes == 6, name
    assert results["triton"][0].stats.backends["attention"] == "triton"
    assert model_state(gen) == before


def test_a_compiled_step_is_seen_only_by_its_own_call(gen, monkeypatch):
    """A compile=True call hands its compiled step to its own sampling loop: a call without it, in another
    thread at the same time on the same models, never runs it. (torch.compile is replaced by a wrapper that
    records which thread runs the "compiled" step: what is under test is who gets it, not inductor.)"""
    ran_by: set[str] = set()

    def fake_compile(fn, dynamic=False):
        def compiled(*args, **kwargs):
            ran_by.add(threading.current_thread().name)
            return fn(*args, **kwargs)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    mine = Generator(gen.var, gen.var_tokenizer, gen.ar, gen.ar_tokenizer)  # its own cache of compiled steps
    eager = {m: gen.generate([2, 5], method=m, seed=0) for m in ("var", "ar")}
    before = model_state(gen)
    for method in ("var", "ar"):
        def job(g: Generator, compile: bool):
            return lambda: (threading.current_thread().name, g.generate([2, 5], method=method, seed=0, compile=compile))

        results = run_concurrently({"compiled": job(mine, True), "eager": job(gen, False)})
        for outs in results.values():
            for _, out in outs:
                assert torch.equal(out.images, eager[method].images), method
                assert out.stats.forward_passes == {"var": 6, "ar": 64}[method]
        compiled_thread = {thread for thread, _ in results["compiled"]}
        assert ran_by and ran_by <= compiled_thread, (method, ran_by, compiled_thread)
        ran_by.clear()
    assert model_state(gen) == before


@pytest.mark.slow
@pytest.mark.parametrize("speculative", [None, "jacobi"])
def test_raster_pipeline_on_triton_kernels_matches_torch(gen, speculative):
    """Raster generation takes the attention paths the VAR pipeline above never does: plain decoding runs
    single-token decode attention over a growing KV cache, Speculative Jacobi Decoding runs FlashAttention under
    a causal mask offset by the cache. Through the Triton interpreter (7-13 s each on a 2-core CPU; cfg=0 keeps
    the batch at 1) the same seed must give the same tokens -- the same speculative rounds and image -- as
    torch attention."""
    if not _has_triton():
        pytest.skip("triton is not installed")
    kern = gen.generate([6], method="ar", cfg=0, speculative=speculative, kernels="triton", seed=0)
    plain = gen.generate([6], method="ar", cfg=0, speculative=speculative, kernels="torch", seed=0)
    ran = {op: kern.stats.backends[op] for op in ("attention", "decode_attention")}
    main_op = "decode_attention" if speculative is None else "attention"  # one token a step / a window a step
    assert ran[main_op] == "triton" and set(ran.values()) <= {"triton", "none"}, ran
    assert plain.stats.backends["attention"] == "torch"
    assert kern.stats.accepted_hist == plain.stats.accepted_hist
    torch.testing.assert_close(kern.images, plain.images, atol=1e-4, rtol=0)


def var_logits_sdpa_and_kernels(model, inputs, classes, backend):
    """Teacher-forced VAR logits ``(B, L, V)`` with SDPA, then with the kernels of ``backend`` (FlashAttention
    under the block-causal mask), the model untouched. Shared with test_system_gpu.py."""
    with use_attention(sdpa_attention):
        expected = model(inputs, classes)
    with use_attention(attention_function("kernels", backend)):
        got = model(inputs, classes)
    return expected, got


def test_teacher_forced_var_logits_with_triton_interpreter_match_sdpa(gen):
    if not _has_triton():
        pytest.skip("triton is not installed")
    model, vq = gen.var, gen.var_tokenizer.quantizer
    classes = torch.tensor([3, 8])
    pyramid = model.generate(vq, classes, cfg=2.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inputs, _ = var_ref.teacher_forcing_sequence(vq, pyramid)
        expected, got = var_logits_sdpa_and_kernels(model, inputs, classes, "triton")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_jacobi_and_draft_greedy_equal_plain_greedy_raster(gen):
    classes = [1, 8]
    plain = gen.generate(classes, method="ar", sampling=GREEDY, seed=0)
    for spec in ("jacobi", "draft"):
        fast = gen.generate(classes, method="ar", sampling=GREEDY, speculative=spec, seed=0)
        # same tokens; decoding one image at a time vs a batch of 2 may differ in the last float bits
        torch.testing.assert_close(fast.images, plain.images, atol=1e-5, rtol=0, msg=spec)
        assert fast.stats.passes_per_image < 64, spec
    # the token maps themselves: greedy raster tokens decoded equal the generator's images
    maps = generate_tokens(gen.ar, torch.tensor(classes), (8, 8), cfg=1.0, sampling=GREEDY)
    assert to_raster(maps).shape == (2, 64)
    torch.testing.assert_close(gen.ar_tokenizer.decode_from_indices(maps), plain.images)


def test_relaxed_jacobi_sampling_runs_and_reports_acceptance(gen):
    out = gen.generate([5], method="ar", speculative="jacobi", relaxed_delta=0.2, seed=0)
    exact = gen.generate([5], method="ar", speculative="jacobi", seed=0)
    assert out.images.shape == (1, 1, 32, 32)
    assert 0 <= out.stats.acceptance_rate <= 1 and sum(out.stats.accepted_hist) == out.stats.forward_passes
    assert exact.stats.forward_passes <= 64


def _tokens_made(stats: GenerationStats) -> int:
    """Tokens a speculative call produced: each round adds its accepted drafts and one more."""
    return sum((k + 1) * rounds for k, rounds in enumerate(stats.accepted_hist))


def test_draft_gamma_sets_the_drafts_proposed_per_round(gen):
    none = gen.generate([2], method="ar", speculative="draft", gamma=0, seed=0)
    # no drafts: one target pass per token, no draft pass, every round accepts nothing
    assert none.stats.draft_passes == 0 and none.stats.forward_passes == 64 and none.stats.accepted_hist == [64]
    two = gen.generate([2], method="ar", speculative="draft", gamma=2, seed=0)
    assert 0 < two.stats.draft_passes <= 2 * two.stats.forward_passes and len(two.stats.accepted_hist) <= 3
    assert _tokens_made(two.stats) == 64 and sum(two.stats.accepted_hist) == two.stats.forward_passes


def test_jacobi_window_sets_the_drafts_of_each_pass(gen):
    zero = gen.generate([2], method="ar", speculative="jacobi", window=0, sampling=GREEDY, seed=0)
    assert zero.stats.forward_passes == 64 and zero.stats.accepted_hist == [64]  # plain decoding, a token a pass
    two = gen.generate([2], method="ar", speculative="jacobi", window=2, sampling=GREEDY, seed=0)
    assert two.stats.forward_passes < 64 and len(two.stats.accepted_hist) <= 3 and _tokens_made(two.stats) == 64
    torch.testing.assert_close(two.images, zero.images, atol=1e-5, rtol=0)  # greedy: the same tokens


def test_var_ramp_false_guides_every_scale_at_the_full_strength(gen):
    classes = [3, 7]
    flat = gen.generate(classes, method="var", cfg=2.0, ramp=False, seed=0)
    ramped = gen.generate(classes, method="var", cfg=2.0, seed=0)
    assert not torch.allclose(flat.images, ramped.images)
    with torch.no_grad():
        pyramid = sample_pyramid(gen.var, gen.var_tokenizer.quantizer, torch.tensor(classes), cfg=2.0, ramp=False,
                                 generator=torch.Generator().manual_seed(0))
        expected = gen.var_tokenizer.decode_from_indices(pyramid)
    torch.testing.assert_close(flat.images, expected)


def test_relaxed_jacobi_borrows_from_the_requested_number_of_neighbours(gen):
    exact = gen.generate([5], method="ar", speculative="jacobi", seed=0)
    # no neighbours to borrow from: the relaxed target is the exact one, so the same draws and tokens
    alone = gen.generate([5], method="ar", speculative="jacobi", relaxed_delta=0.5, neighbors=0, seed=0)
    assert torch.equal(alone.images, exact.images) and alone.stats.accepted_hist == exact.stats.accepted_hist
    many = gen.generate([5], method="ar", speculative="jacobi", relaxed_delta=0.5, neighbors=50, seed=0)
    assert many.stats.acceptance_rate > exact.stats.acceptance_rate
    assert many.stats.forward_passes < exact.stats.forward_passes


@pytest.mark.parametrize("quantizer, extra", [("fsq", {"fsq_levels": (2, 3), "latent_dim": 2}),
                                               ("lfq", {"latent_dim": 3})])
def test_relaxed_jacobi_finds_neighbours_in_an_implicit_codebook(quantizer, extra):
    """FSQ and LFQ raster tokenizers are accepted, and relaxed Jacobi read a VQ codebook they do not have
    (AttributeError); the neighbours are now those of the codes the tokenizer's lookup uses."""
    torch.manual_seed(0)
    tok = VQVAE(VQVAEConfig(quantizer=quantizer, image_size=8, downsample=4, width=4, **extra)).eval()
    model = GPT(raster_config(tok.config.num_codes, (2, 2), n_classes=2, n_layer=1, n_head=1, n_embd=8)).eval()
    gen = Generator(ar_model=model, ar_tokenizer=tok)
    out = gen.generate([0, 1], method="ar", speculative="jacobi", window=2, relaxed_delta=0.1, neighbors=2, seed=0)
    assert out.images.shape == (2, 1, 8, 8) and out.stats.forward_passes >= 2
    nbrs = gen.strategies[("ar", "jacobi")].codebook_neighbors(2)  # (V, 2): the two nearest other codes
    codes = tok.quantizer.codes()
    dist = torch.cdist(codes, codes).fill_diagonal_(float("inf"))
    nearest = dist.topk(2, largest=False).values  # (V, 2)
    assert torch.equal(dist.gather(1, nbrs), nearest)


def test_a_compiled_step_past_the_recompile_limit_runs_eagerly_and_says_so(gen, monkeypatch):
    """Every Generator and model of a process shares a traced function's recompile budget (8 graphs): a third
    precision reached it, torch ran the step eagerly in silence and the stats said "torch.compile". Here the
    limit is 1 graph (VAR's first scale and the later ones need 2) and torch.compile traces without inductor."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=False: real_compile(fn, dynamic=dynamic,
                                                                                backend="eager"))
    mine = Generator(gen.var, gen.var_tokenizer, gen.ar, gen.ar_tokenizer)  # its own compiled steps
    eager = gen.generate([2, 5], method="var", seed=0)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            out = mine.generate([2, 5], method="var", seed=0, compile=True)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out.images, eager.images) and out.stats.forward_passes == 6
    assert out.stats.backends["compiled"] == "no"
    assert out.stats.backends["fallbacks"] == ["torch.compile: recompile limit reached (ran eagerly)"]


def test_compile_refuses_layers_whose_own_attention_is_not_torch(gen):
    """A compiled trace runs each layer's own attention function, not the call's: with kernels installed on a
    layer the stats said attention "torch" for what chapter 06's kernels computed. Refused before any work."""
    mine = Generator(copy.deepcopy(gen.var), gen.var_tokenizer)
    set_attention(mine.var.blocks[1], "kernels")
    with pytest.raises(ValueError, match=r"compile=True traces each layer's own attention function, and 1 "
                                         r"layer\(s\) of the VAR run one other than sdpa_attention or "
                                         r"plain_attention \(first: .*KernelAttention"):
        mine.generate([2, 5], method="var", seed=0, compile=True)
    assert mine.generate([2, 5], method="var", seed=0).stats.forward_passes == 6  # eager: the call's attention


@pytest.mark.slow
def test_compiled_decode_step_matches_eager_and_leaves_the_model_alone(gen):
    """torch.compile of VAR's per-scale pass and the raster forward: the same images as eager (the first call
    compiles, tens of seconds), the same pass counts, and nothing installed on the model."""
    for method, name, passes in (("var", "_run", 6), ("ar", "forward", 64)):
        model = gen.var if method == "var" else gen.ar
        eager = gen.generate(list(range(10)), method=method, seed=3)
        compiled = gen.generate(list(range(10)), method=method, seed=3, compile=True)
        torch.testing.assert_close(compiled.images, eager.images, atol=1e-4, rtol=0)
        assert compiled.stats.forward_passes == passes and compiled.stats.backends["compiled"] == "torch.compile"
        assert eager.stats.backends["compiled"] == "no"
        assert name not in model.__dict__  # the compiled step went to the sampling loop, not onto the model
        again = gen.generate([1, 2], method=method, seed=0, compile=True)  # reuses the compiled step
        assert again.stats.forward_passes == passes and torch.isfinite(again.images).all()
        assert gen.generate([1, 2], method=method, seed=0).stats.forward_passes == passes


def test_progress_bar_counts_every_image(gen, capsys):
    gen.generate([0, 1, 2], method="var", batch_size=2, progress=True)
    gen.generate([4, 5], method="ar", speculative="jacobi", progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "2/2" in err and "var" in err and "ar + jacobi" in err
    gen.generate([0], method="var")  # no bar by default
    assert capsys.readouterr().err == ""


def test_bfloat16_precision_runs_on_cpu(gen):
    out = gen.generate([0, 1], method="var", precision="bfloat16", seed=0)
    assert out.images.dtype == torch.float32 and out.stats.precision == "bfloat16"
    assert torch.isfinite(out.images).all()


def test_float32_precision_runs_in_float32_under_the_callers_autocast(gen):
    """precision="float32" is what runs even inside a caller's bfloat16 autocast (it used to run, unreported, in
    bfloat16: the images of a precision="bfloat16" call)."""
    plain = gen.generate([0, 1], method="var", precision="float32", seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = gen.generate([0, 1], method="var", precision="float32", seed=0)
    assert inside.stats.precision == "float32"
    torch.testing.assert_close(inside.images, plain.images, atol=0, rtol=0)


def test_float32_precision_runs_where_torch_has_no_autocast(gen, monkeypatch):
    """On a device without autocast (MPS before torch 2.5) float32 enters none: torch.autocast(..., enabled=False)
    raises there before it reads `enabled`."""
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    monkeypatch.setattr(torch, "autocast", None)  # any use of it now fails
    out = gen.generate([0], method="var", precision="float32", seed=0)
    assert out.stats.precision == "float32" and out.images.shape == (1, 1, 32, 32)


def test_auto_kernel_devices_are_where_the_backend_rule_may_pick_an_attention_kernel():
    """system.AUTO_KERNEL_DEVICES lets kernels="auto" skip importing ar_course.kernels elsewhere: it must hold every
    device type where backend_rule's "auto" can pick a kernel for attention, when every back-end could run."""
    from ar_course.kernels.ops import backend_rule

    for device_type in ("cuda", "cpu", "mps", "xpu"):
        picks = {backend_rule(op, device_type, lambda backend: None) for op in ("flash_attention", "decode_attention")}
        assert (picks != {"torch"}) == (device_type in system.AUTO_KERNEL_DEVICES), (device_type, picks)


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_torch_attention_leaves_the_kernels_package_unimported(kernels):
    """kernels="torch", and the default "auto" on a CPU (torch there), never import ar_course.kernels, which sets
    the simulators' environment variables (seen by every process started afterwards) on a machine without a GPU
    and, with the kernels extra, loads numba (a first call took 0.42-0.65 s against 0.02-0.09 s)."""
    code = ("import os, sys; from ar_course.system import Generator; "
            "g = Generator.from_pretrained('mnist', device='cpu'); "
            f"out = g.generate([0], method='var', kernels='{kernels}', seed=0); "
            "print('ar_course.kernels' in sys.modules, os.environ.get('NUMBA_ENABLE_CUDASIM'), "
            "out.stats.backends['attention'], out.stats.backends['fallbacks'])")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "None", "torch", "[]"]


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": [10]}, "classes must lie in [0, 9]"),
    ({"classes": [[1, 2]]}, "1-D sequence of ints"),
    ({"classes": [1.5]}, "1-D sequence of ints"),
    ({"method": "diffusion"}, "method must be one of"),
    ({"speculative": "draft"}, "applies to method='ar'"),
    ({"method": "ar", "speculative": "medusa"}, "speculative must be one of"),
    ({"method": "ar", "relaxed_delta": 0.1}, "only with speculative='jacobi'"),
    ({"kernels": "cuda"}, "kernels must be one of"),
    ({"precision": "int8"}, "precision must be one of"),
    ({"cfg": -1.0}, "cfg must be a finite number >= 0, got -1.0"),
    ({"cfg": float("nan")}, "cfg must be a finite number >= 0, got nan"),

    ({"classes": []}, "classes is empty: ask for at least one class"),
    ({"classes": [True]}, "1-D sequence of ints, got bools"),
    ({"classes": [2.0]}, "1-D sequence of ints"),
    ({"method": "ar", "speculative": "jacobi", "compile": True}, "compile=True applies to batched generation"),
    ({"kernels": "triton", "compile": True}, "with torch attention"),
])
def test_bad_arguments_raise_clear_errors(gen, kwargs, message):
    kwargs = {"classes": [0], **kwargs}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        gen.generate(kwargs.pop("classes"), **kwargs)


def test_missing_models_are_reported():
    only_var = Generator.from_checkpoints(var_path=PRETRAINED["mnist"]["var_path"], device="cpu")
    with pytest.raises(ValueError, match="no 'ar' model"):
        only_var.generate([0], method="ar")
    with pytest.raises(ValueError, match="needs a VAR model or a raster AR model"):
        Generator()


def test_corrupted_and_missing_checkpoints_are_rejected(tmp_path):
    good = resolve(PRETRAINED["mnist"]["var_path"]).read_bytes()
    bad = tmp_path / "var.safetensors"
    bad.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        Generator.from_checkpoints(var_path=bad, device="cpu")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        Generator.from_checkpoints(var_path=garbage, device="cpu")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        Generator.from_checkpoints(var_path=tmp_path / "nope.safetensors", device="cpu")
    with pytest.raises(CheckpointError, match="expected 'var'"):  # a raster checkpoint is not a VAR one
        Generator.from_checkpoints(var_path=PRETRAINED["mnist"]["ar_path"], device="cpu")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ar_course", "generate", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_cli_generate_writes_a_png_grid_of_the_requested_classes(tmp_path):
    from PIL import Image

    res = _cli("--out", str(tmp_path / "s.png"), "--classes", "0", "1", "2", "--per-class", "2",
               "--stats-json", str(tmp_path / "stats.json"))
    assert res.returncode == 0, res.stderr
    with Image.open(tmp_path / "s.png") as img:
        assert img.format == "PNG"
        # 3 columns and 2 rows of 32-px digits with 2-px padding, zoomed 2x
        assert img.size == (2 * (3 * 34 + 2), 2 * (2 * 34 + 2))
    stats = json.loads((tmp_path / "stats.json").read_text(encoding="utf-8"))
    assert stats["images"] == 6 and stats["method"] == "var"
    assert "6 images by var" in res.stdout


def test_cli_generate_default_needs_only_the_output_path(tmp_path):
    res = _cli("--out", "samples.png", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "samples.png").stat().st_size > 0 and "10 images by var" in res.stdout


@pytest.mark.parametrize("args, message", [
    ((), "the following arguments are required: --out"),
    (("--out", "x.png", "--method", "foo"), "invalid choice: 'foo'"),
    (("--out", "x.png", "--classes", "12"), "classes must lie in [0, 9]"),
    (("--out", "x.jpg"), "must name a .png file"),
    (("--out", "x.png", "--speculative", "draft"), "--speculative applies to --method ar"),
    (("--out", "x.png", "--var-checkpoint", "missing.safetensors"), "no checkpoint at"),
    (("--out", "x.png", "--compile", "--kernels", "numba"), "--compile applies to batched generation"),
])
def test_cli_generate_bad_arguments_fail_with_one_line(tmp_path, args, message):
    res = _cli(*args, cwd=tmp_path)
    assert res.returncode != 0
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not list(tmp_path.glob("*.png"))
