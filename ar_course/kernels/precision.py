"""Which dtype the attention kernels multiply in.

Inside ``torch.autocast`` the projections hand attention bf16 (or fp16) queries while the KV cache stays
float32, so a kernel sees mixed dtypes. The rule, shared by every backend that multiplies tiles: under
autocast the autocast dtype (the dtype ``scaled_dot_product_attention`` would cast to), otherwise the
promoted dtype of the inputs, float64 computed as float32. Tiles are cast to it right before each matrix
product, the products accumulate in float32, and the result comes back in the queries' dtype.
"""

from __future__ import annotations

from functools import reduce

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float16, bfloat16 or float32: the dtype the matrix products of ``tensors`` (on one device) run in."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in HALF_DTYPES:
            return dtype
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.float32 if dtype == torch.float64 else dtype
