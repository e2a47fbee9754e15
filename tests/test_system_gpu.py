"""The full system on a CUDA GPU: kernels inside the models, bf16 by default, compiled decode steps.
Skipped without CUDA (the CPU versions of these checks are in test_system.py)."""

import pytest
import torch

from test_system import var_logits_sdpa_and_kernels

from ar_course.system import Generator
from ar_course.var import functional as ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gen():
    return Generator.from_pretrained("mnist", device="cuda")


def test_defaults_on_cuda_run_bfloat16_with_measured_attention_and_no_fallback(gen):
    """kernels="auto" in the bf16 system: whatever the measurements chose, no kernel failed (autocast hands
    the kernels bf16 queries and a float32 KV cache). An entry point no pass called reads "none": raster AR over
    the dynamic cache runs one-token steps only, all of them decode attention."""
    for method, passes in (("var", 6), ("ar", 64)):
        out = gen.generate(list(range(10)), method=method, seed=0)
        assert out.stats.precision == "bfloat16" and out.stats.backends["fallbacks"] == []
        ran = {op: {part.split(" x")[0] for part in out.stats.backends[op].split(", ")}
               for op in ("attention", "decode_attention")}
        assert all(r <= {"triton", "numba", "torch", "none"} for r in ran.values()), out.stats.backends
        assert ran["decode_attention"] != {"none"}, out.stats.backends  # every method decodes one step at a time
        assert out.stats.forward_passes == passes and out.images.shape == (10, 1, 32, 32)
        assert torch.isfinite(out.images).all() and 0 <= float(out.images.min()) <= float(out.images.max()) <= 1


def test_var_logits_with_kernel_attention_match_sdpa(gen):
    """Teacher-forced VAR logits (block-causal FlashAttention) with the chapter 06 kernels against torch's SDPA,
    float32 (Triton's dot runs in TF32, hence the tolerance; test_system.py runs it with the interpreter)."""
    model, vq = gen.var, gen.var_tokenizer.quantizer
    classes = torch.arange(10, device="cuda")
    pyramid = model.generate(vq, classes, cfg=2.0, generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.no_grad():
        inputs, _ = ref.teacher_forcing_sequence(vq, pyramid)
        expected, got = var_logits_sdpa_and_kernels(model, inputs, classes, "auto")
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=0)


def test_compiled_generation_matches_eager_on_cuda(gen):
    """The default kernels ("auto") on both sides: a compiled step looks up the back-ends the eager run measured,
    so both sample from the same attention. (Eager torch against compiled Triton, whose dot runs in TF32, could
    flip a sampled token now and then, and one flip changes the image.)"""
    for method in ("var", "ar"):
        eager = gen.generate(list(range(10)), method=method, seed=3, precision="float32")
        compiled = gen.generate(list(range(10)), method=method, seed=3, precision="float32", compile=True)
        torch.testing.assert_close(compiled.images, eager.images, atol=1e-3, rtol=0)
        assert compiled.stats.backends["compiled"] == "torch.compile"
