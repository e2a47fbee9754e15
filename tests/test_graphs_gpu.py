"""CUDA-graph replay of the static-cache decode steps against the same steps run eagerly: raster AR, VAR's
per-scale pass, speculative verification after rollbacks, and the Generator's graphs=True. Skipped without
CUDA (the static cache against the dynamic one is checked on the CPU in test_static_cache.py)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ar_course import raster, var
from ar_course.sampling import SamplingConfig
from ar_course.system import Generator
from ar_course.transformer.graphs import CUDAGraphStep

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SEEDED = SamplingConfig(temperature=1.0, top_k=20)


@pytest.fixture(scope="module")
def gen():
    return Generator.from_pretrained("mnist", device="cuda")


def test_graphed_raster_decode_matches_eager_and_records_its_capture(gen):
    model, classes = gen.ar, torch.arange(8, device="cuda")
    step = CUDAGraphStep(model.decode_step)
    cache = model.make_cache(16, static=True)
    want = raster.generate_tokens(model, classes, (8, 8), sampling=SEEDED, cfg=1.0, cache="static",
                                  generator=torch.Generator("cuda").manual_seed(0))
    for _ in range(2):  # the second run replays the graphs of the first
        got = raster.generate_tokens(model, classes, (8, 8), sampling=SEEDED, cfg=1.0, cache=cache, forward=step,
                                     generator=torch.Generator("cuda").manual_seed(0))
        assert torch.equal(got, want)
    assert step.failure is None and step.graphs == 2  # the class-token pass and the one-token step
    assert step.capture_seconds > 0


def test_graphed_var_scales_match_eager(gen):
    model, vq = gen.var, gen.var_tokenizer.quantizer
    classes = torch.arange(10, device="cuda")
    step = CUDAGraphStep(model._run)
    cache = model.make_cache(20, static=True)
    want = var.sample_pyramid(model, vq, classes, sampling=SEEDED, cfg=2.0, cache="static",
                              generator=torch.Generator("cuda").manual_seed(1))
    for _ in range(2):
        got = var.sample_pyramid(model, vq, classes, sampling=SEEDED, cfg=2.0, cache=cache, run=step,
                                 generator=torch.Generator("cuda").manual_seed(1))
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert step.failure is None and step.graphs == model.config.num_scales


def test_graphed_speculative_verification_matches_eager_after_rollbacks(gen):
    """A verification pass over the pending token and g drafts, replayed from one graph, at positions moved back
    by rollbacks (rejected drafts), against the same passes run eagerly on a twin cache."""
    model = gen.ar
    step = CUDAGraphStep(model.decode_step)
    graphed, eager = model.make_cache(2, static=True), model.make_cache(2, static=True)
    classes = torch.tensor([3, model.null_class], device="cuda")
    g = torch.Generator("cuda").manual_seed(2)
    for cache, fn in ((graphed, step), (eager, model.decode_step)):
        fn(torch.zeros(2, 0, dtype=torch.long, device="cuda"), classes, cache)  # the class token
    kept = 1
    for accepted in (0, 3, 1, 4, 2):
        tokens = torch.randint(model.config.vocab_size, (1, 5), device="cuda", generator=g).expand(2, -1)
        got, _ = step(tokens, None, graphed)
        want, _ = model.decode_step(tokens, None, eager)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        kept += accepted + 1
        graphed.rollback(kept)
        eager.rollback(kept)
    assert step.failure is None and step.graphs == 2


def test_generator_graphs_match_eager_and_reuse_their_capture(gen):
    """With torch attention (kernels="auto" may pick a kernel that cannot be captured: the report measures it)."""
    options = {"seed": 3, "precision": "float32", "kernels": "torch"}
    for method in ("var", "ar"):
        eager = gen.generate(list(range(10)), method=method, **options)
        first = gen.generate(list(range(10)), method=method, graphs=True, **options)
        again = gen.generate(list(range(10)), method=method, graphs=True, **options)
        for out in (first, again):
            torch.testing.assert_close(out.images, eager.images, atol=1e-3, rtol=0)
            assert out.stats.backends["compiled"] == "cuda graphs" and out.stats.backends["fallbacks"] == []
            assert out.stats.forward_passes == eager.stats.forward_passes
        assert first.stats.capture_seconds > 0 and again.stats.capture_seconds == 0
        bf16 = gen.generate(list(range(10)), method=method, seed=3, kernels="torch", graphs=True)  # own graphs
        assert bf16.stats.precision == "bfloat16" and bf16.stats.backends["compiled"] == "cuda graphs"


def test_generator_graphs_capture_with_the_kernels_auto_picks(gen):
    """kernels="auto" under CUDA graphs: the static cache's dense mask is not read back while capturing (it was,
    in every layer, so every capture failed and the report measured "auto, graphs" eagerly)."""
    options = {"seed": 3, "precision": "float32", "kernels": "auto"}
    for method in ("var", "ar"):
        eager = gen.generate(list(range(10)), method=method, **options)
        graphed = gen.generate(list(range(10)), method=method, graphs=True, **options)
        assert graphed.stats.backends["compiled"] == "cuda graphs", graphed.stats.backends
        torch.testing.assert_close(graphed.images, eager.images, atol=1e-3, rtol=0)


def test_a_step_that_waits_for_the_host_falls_back_to_eager_with_a_warning():
    """In a fresh process: a failed capture leaves nothing behind for the other tests."""
    script = textwrap.dedent("""
        import warnings, torch
        from ar_course.transformer.graphs import CUDAGraphStep
        step = CUDAGraphStep(lambda x: x * float(x.sum()))  # float(): a host sync, illegal while capturing
        x = torch.ones(3, device="cuda")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = step(x)
        assert torch.equal(out, x * 3) and step.failure is not None and step.graphs == 0, step.failure
        assert any("CUDA graph capture failed" in str(w.message) for w in caught)
        print("ok")
    """)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root,
                          env=env)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
