"""The kernels compiled for a CUDA GPU (numba.cuda and Triton) against torch. Skipped without CUDA."""

import pytest
import torch

import ar_course.kernels as K
from ar_course.kernels import env
from ar_course.kernels.masks import BlockCausal

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
KERNEL_BACKENDS = ["numba"] + (["triton"] if env.TRITON_INSTALLED else [])


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(CUDA, dtype)


def test_auto_considers_the_best_installed_kernel_on_cuda():
    """The candidate; whether it runs is measured per kind of call (test_auto_measures_and_records_on_cuda)."""
    assert K.select_backend("flash_attention", CUDA) == KERNEL_BACKENDS[-1]


def test_auto_measures_and_records_on_cuda(tmp_path, monkeypatch):
    from ar_course.kernels import ops
    from ar_course.kernels.calibrate import Calibrator

    calibrator = Calibrator(path=tmp_path / "choices.json")
    monkeypatch.setattr(ops, "CALIBRATOR", calibrator)
    q, k, v = (rand(4, 16, 1024, 64, dtype=torch.bfloat16, seed=s) for s in (20, 21, 22))
    for _ in range(2):
        with K.record_dispatch() as ran:
            got = K.flash_attention(q, k, v, "causal")
        assert ran.backend("flash_attention") in ("triton", "numba", "torch") and ran.fallbacks == []
    (choice,) = calibrator.choices().values()  # measured once, on the first call
    assert choice["backend"] == ran.backend("flash_attention") and min(choice["seconds"].values()) > 0
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_vq_nearest(backend):
    z, c = rand(3001, 32, seed=1), rand(515, 32, seed=2)
    got = K.vq_nearest(z, c, backend=backend)
    dist = torch.cdist(z.double(), c.double()) ** 2  # (N, K)
    chosen = dist.gather(1, got[:, None]).squeeze(1)
    assert (chosen - dist.min(1).values).abs().max() < 1e-3  # the nearest code, up to float32 near-ties
    assert (got == dist.argmin(1)).double().mean() > 0.999


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mask", [None, "causal", BlockCausal((1, 4, 9, 16, 25, 36, 64, 100, 169, 256))],
                         ids=["none", "causal", "var-scales"])
def test_flash_attention_float32(backend, mask):
    t = 680 if isinstance(mask, BlockCausal) else 333
    q, k, v = rand(2, 3, t, 64, seed=3), rand(2, 3, t, 64, seed=4), rand(2, 3, t, 64, seed=5)
    expected = K.attention_reference(q.double(), k.double(), v.double(), mask).float()
    tol = 2e-2 if backend == "triton" else 1e-4  # Triton's tl.dot uses TF32 for float32 inputs
    torch.testing.assert_close(K.flash_attention(q, k, v, mask, backend=backend), expected, atol=tol, rtol=tol)


@pytest.mark.skipif(not env.TRITON_INSTALLED, reason="needs Triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_flash_attention_half_precision(dtype):
    q, k, v = (rand(2, 4, 1027, 64, dtype=dtype, seed=s) for s in (6, 7, 8))
    got = K.flash_attention(q, k, v, "causal", backend="triton")
    assert got.dtype == dtype
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not env.TRITON_INSTALLED, reason="needs Triton")
@pytest.mark.parametrize("mask", [None, "causal", BlockCausal((1, 4, 9, 16, 25, 36, 64, 100, 169, 256))],
                         ids=["none", "causal", "var-scales"])
def test_triton_kernels_take_autocast_and_mixed_dtypes(mask):
    """What the bf16 system hands attention: bf16 queries with the float32 KV cache, and the reverse."""
    t = 680
    q32, k32, v32 = rand(2, 3, t, 64, seed=13), rand(2, 3, t, 64, seed=14), rand(2, 3, t, 64, seed=15)
    expected = K.attention_reference(*(x.bfloat16().double() for x in (q32, k32, v32)), mask).float()
    for q, k, v in ((q32.bfloat16(), k32, v32), (q32, k32.bfloat16(), v32.bfloat16())):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = K.flash_attention(q, k, v, mask, backend="triton")
        assert got.dtype == q.dtype
        torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)
    lengths = torch.tensor([t, 77], device=CUDA)
    dec = K.decode_attention(q32[:, :, -1].bfloat16(), k32, v32, lengths, backend="triton")
    torch.testing.assert_close(dec.float(), K.decode_attention_reference(q32[:, :, -1].bfloat16().double(),
                               k32.double(), v32.double(), lengths).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_decode_attention(backend):
    q, k_cache, v_cache = rand(3, 4, 64, seed=9), rand(3, 4, 2000, 64, seed=10), rand(3, 4, 2000, 64, seed=11)
    lengths = torch.tensor([2000, 777, 1], device=CUDA)
    expected = K.decode_attention(q, k_cache, v_cache, lengths, backend="torch")
    torch.testing.assert_close(K.decode_attention(q, k_cache, v_cache, lengths, backend=backend), expected,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_softmax(backend):
    x = rand(37, 3001, seed=12) * 10
    torch.testing.assert_close(K.softmax(x, backend=backend), torch.softmax(x, -1), atol=1e-6, rtol=1e-4)
