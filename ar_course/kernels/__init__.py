"""GPU kernels written in Python: numba.cuda and Triton, runnable without a GPU (chapter 06).

Importing this package first decides where kernels run (:mod:`.env`; importing the rest of ``ar_course``
does not): without a CUDA GPU it sets ``NUMBA_ENABLE_CUDASIM=1`` and ``TRITON_INTERPRET=1`` for the process
unless you set them yourself, so ``@cuda.jit`` kernels run in numba's CUDA simulator and ``@triton.jit``
kernels in Triton's interpreter. Import ``ar_course.kernels`` (or call
:func:`ar_course.kernels.env.set_kernel_defaults`, or set the variables) before importing ``numba.cuda``
yourself. numba and Triton are optional extras (``ar-course[kernels]``, ``ar-course[triton]``); without them
the entry points below answer with torch.

Entry points (torch tensors in, torch tensors out; ``backend=`` picks or forces an implementation):

* :func:`vq_nearest` (z, codebook): nearest-code indices without an N x K distance matrix;
* :func:`flash_attention` (q, k, v, mask): FlashAttention forward with causal and block-causal masks;
* :func:`decode_attention` (q, k_cache, v_cache, length): one query per head over a KV cache, split-K;
* :func:`softmax` (x): row-wise online softmax.

``backend="auto"`` runs a kernel only where it measured faster than torch on this GPU, per kind of call
(:mod:`.calibrate`); inside ``with record_dispatch() as rec:`` every call records the back-end that really
ran and any fallback with its reason.

Kernels: :mod:`.cuda_basic` (map, 2-D map, shared-memory reduction, tiled matmul), :mod:`.cuda_softmax`,
:mod:`.cuda_vq`, :mod:`.cuda_attention` (numba.cuda); :mod:`.triton_kernels` (optional, needs Triton);
:mod:`.cpu_vq` (numba CPU). Masks as the kernels take them: :mod:`.masks`; the dtype they multiply in:
:mod:`.precision`. Plain torch definitions: :mod:`.reference`. Simulator bug finder: :mod:`.sanitizer`.
"""

from . import env  # noqa: F401  (first: sets the simulator / interpreter defaults)
from .env import describe
from .masks import BlockCausal, MaskSpec
from .ops import (BACKENDS, DispatchRecord, decode_attention, flash_attention, record_dispatch, select_backend,
                  softmax, vq_nearest)
from .reference import attention_reference, decode_attention_reference, vq_nearest_reference

__all__ = [
    "BACKENDS",
    "BlockCausal",
    "DispatchRecord",
    "MaskSpec",
    "attention_reference",
    "decode_attention",
    "decode_attention_reference",
    "describe",
    "flash_attention",
    "record_dispatch",
    "select_backend",
    "softmax",
    "vq_nearest",
    "vq_nearest_reference",
]
