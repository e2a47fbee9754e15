"""The Triton paged-attention kernel (chapter 09) against the torch reference that gathers the blocks, in Triton's
interpreter on CPU. Skipped when Triton is not installed or not interpreted."""

import pytest
import torch

from ar_course.kernels import env
from ar_course.serving import paged_attention

pytestmark = pytest.mark.skipif(not (env.TRITON_INSTALLED and env.triton_interpreted()),
                                reason="needs Triton running in its interpreter (TRITON_INTERPRET=1)")


@pytest.mark.parametrize("B, H, D, block_size, dtype", [(3, 2, 8, 4, torch.float32), (2, 3, 6, 8, torch.float32),
                                                        (2, 2, 16, 2, torch.float16)])
def test_triton_paged_attention_matches_the_gather_reference(B, H, D, block_size, dtype):
    from ar_course.kernels.triton_paged import paged_attention_triton

    g = torch.Generator().manual_seed(B * 10 + D)
    num_blocks, max_blocks = 12, 4
    k_pool = torch.randn(num_blocks, block_size, H, D, generator=g).to(dtype)
    v_pool = torch.randn(num_blocks, block_size, H, D, generator=g).to(dtype)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(B)])
    tables[1, :2] = tables[0, :2]  # shared blocks
    lengths = torch.randint(1, max_blocks * block_size + 1, (B,), generator=g)
    lengths[0] = max_blocks * block_size
    q = torch.randn(B, H, D, generator=g).to(dtype)
    got = paged_attention_triton(q, k_pool, v_pool, tables, lengths)
    expected = paged_attention(q.float(), k_pool.float(), v_pool.float(), tables, lengths)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)


def test_triton_paged_attention_refuses_bad_shapes():
    from ar_course.kernels.triton_paged import paged_attention_triton

    q, pool = torch.randn(1, 1, 4), torch.randn(3, 3, 1, 4)
    with pytest.raises(ValueError, match="power-of-two"):
        paged_attention_triton(q, pool, pool, torch.zeros(1, 2, dtype=torch.long), torch.tensor([2]))
    pool = torch.randn(3, 4, 1, 4)
    with pytest.raises(ValueError, match="length"):
        paged_attention_triton(q, pool, pool, torch.zeros(1, 2, dtype=torch.long), torch.tensor([9]))
    with pytest.raises(ValueError, match="lengths must be an integer tensor"):
        paged_attention_triton(q, pool, pool, torch.zeros(1, 2, dtype=torch.long), torch.tensor([2.5]))
