"""The Triton kernels against plain torch, in Triton's interpreter on CPU (compiled on a GPU machine by
tests/test_kernels_gpu.py). Skipped when Triton is not installed."""

import math

import pytest
import torch

import ar_course.kernels as K
from ar_course.kernels import env
from ar_course.kernels.masks import BlockCausal, prefix_lengths

pytestmark = pytest.mark.skipif(not (env.TRITON_INSTALLED and env.triton_interpreted()),
                                reason="needs Triton running in its interpreter (TRITON_INTERPRET=1)")


@pytest.fixture(scope="module")
def tk():
    from ar_course.kernels import triton_kernels

    return triton_kernels


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows, cols, scale, block", [(7, 45, 3.0, 16), (3, 5, 1.0, 16), (4, 70, 80.0, 32)])
def test_softmax(tk, rows, cols, scale, block):
    x = torch.randn(rows, cols, generator=gen(0)) * scale
    torch.testing.assert_close(tk.softmax_triton(x, block=block), torch.softmax(x, -1), atol=1e-6, rtol=1e-5)


def test_vq_nearest_ties_within_and_across_tiles(tk):
    g = gen(1)
    c = torch.randn(70, 5, generator=g)
    c[5] = c[3]  # a tie inside the first tile of 16 codes
    c[40] = c[3]  # and one in a later tile
    z = c[torch.randint(0, 70, (45,), generator=g)] + 0.3 * torch.randn(45, 5, generator=g)
    z[::3] = c[3] + 0.01 * torch.randn(15, 5, generator=g)
    got = tk.vq_nearest_triton(z, c, block_n=16, block_k=16)
    assert torch.equal(got, ((z.double()[:, None] - c.double()[None]) ** 2).sum(-1).argmin(1))
    assert (got[::3] == 3).all()


@pytest.mark.parametrize("mask", [None, "causal", BlockCausal((1, 4, 9, 16, 7))], ids=["none", "causal", "block"])
def test_flash_attention(tk, mask):
    g = gen(2)
    q, k, v = (torch.randn(2, 2, 37, 8, generator=g) for _ in range(3))
    got = tk.flash_attention_triton(q, k, v, prefix_lengths(mask, 37, 37, "cpu"), 0.4, block_m=16, block_n=16)
    torch.testing.assert_close(got, K.attention_reference(q, k, v, mask, scale=0.4), atol=1e-5, rtol=1e-5)


def test_flash_attention_with_fewer_queries_than_keys(tk):
    g = gen(3)
    q = torch.randn(1, 2, 7, 20, generator=g)  # head size 20: padded to 32 inside the kernel
    k, v = torch.randn(1, 2, 40, 20, generator=g), torch.randn(1, 2, 40, 20, generator=g)
    kv_len = torch.arange(34, 41, dtype=torch.int32)
    full = K.attention_reference(torch.cat([torch.zeros(1, 2, 33, 20), q], 2), k, v, "causal")
    got = tk.flash_attention_triton(q, k, v, kv_len, 1 / math.sqrt(20), block_m=16, block_n=16)
    torch.testing.assert_close(got, full[:, :, 33:], atol=1e-5, rtol=1e-5)


def test_decode_attention_ignores_the_cache_past_each_length(tk):
    g = gen(4)
    q = torch.randn(2, 3, 8, generator=g)
    k_cache, v_cache = torch.randn(2, 3, 50, 8, generator=g), torch.randn(2, 3, 50, 8, generator=g)
    lengths = torch.tensor([50, 17])
    k_cache[1, :, 17:] = float("nan")
    v_cache[1, :, 17:] = float("nan")
    got = tk.decode_attention_triton(q, k_cache, v_cache, lengths, 1 / math.sqrt(8), chunk=16, block_n=8)
    torch.testing.assert_close(got, K.decode_attention_reference(q, k_cache, v_cache, lengths), atol=1e-5, rtol=1e-5)


def test_wrappers_triton_path_equals_torch_path():
    g = gen(5)
    q, k, v = (torch.randn(1, 3, 29, 16, generator=g) for _ in range(3))
    for mask in (None, "causal", BlockCausal((1, 4, 9, 15))):
        torch.testing.assert_close(K.flash_attention(q, k, v, mask, backend="triton"),
                                   K.flash_attention(q, k, v, mask, backend="torch"), atol=1e-5, rtol=1e-5)
    last = K.decode_attention(q[:, :, -1], k, v, 29, backend="triton")
    torch.testing.assert_close(last, K.flash_attention(q, k, v, "causal")[:, :, -1], atol=1e-5, rtol=1e-5)
    z, c = torch.randn(50, 7, generator=g), torch.randn(33, 7, generator=g)
    assert torch.equal(K.vq_nearest(z, c, backend="triton"), K.vq_nearest(z, c, backend="torch"))
    x = torch.randn(4, 33, generator=g)
    torch.testing.assert_close(K.softmax(x, backend="triton"), torch.softmax(x, -1), atol=1e-6, rtol=1e-5)
