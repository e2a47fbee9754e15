"""Serving many requests from one model (chapter 09): a paged KV cache with reference-counted blocks
(:mod:`.paged`), attention through block tables (:mod:`.attention`; a Triton kernel in
:mod:`ar_course.kernels.triton_paged`), prefix caching (:mod:`.prefix`), an engine with continuous batching,
chunked prefill and preemption by recomputation (:mod:`.engine`), KV compression measured for memory and
quality (:mod:`.compression`; int8/int4 pools, sinks + window eviction and MiniCache's cross-layer merging
(:mod:`.minicache`) also inside the engine), heavy-hitter eviction by blocks inside the engine with its
one-sequence plain path (:mod:`.h2o`), seeded request traces and serving metrics (:mod:`.trace`), the engine on
its own thread (:mod:`.worker`) and the HTTP server of ``python -m ar_course serve`` (:mod:`.server`, extra
``[serve]``, not imported here)."""

from .attention import gather_kv, paged_attention
from .engine import POLICIES, Engine, EngineConfig, Request, StepRecord, admits, packed_forward
from .paged import BlockAllocator, OutOfBlocks, PagedKVCache, slot_mapping
from .prefix import PrefixCache, prefix_block_hashes

__all__ = ["slot_mapping", "BlockAllocator", "OutOfBlocks", "PagedKVCache", "gather_kv", "paged_attention",
           "PrefixCache", "prefix_block_hashes", "Engine", "EngineConfig", "admits", "Request", "StepRecord",
           "POLICIES", "packed_forward"]
from .compression import (  # noqa: E402
    METHODS, CompressedAttention, dequantize, fake_quantize_kv, h2o_attention, heldout_nll, kv_bytes_per_token,
    merge_pair, merged_pairs, pool_dequantize, pool_quantize, quantize, sink_window_evictable, sink_window_mask,
    sink_window_visible,
)
from .minicache import merged_generate  # noqa: E402

__all__ += ["METHODS", "CompressedAttention", "quantize", "dequantize", "fake_quantize_kv", "sink_window_mask",
            "h2o_attention", "kv_bytes_per_token", "heldout_nll", "pool_quantize", "pool_dequantize",
            "sink_window_visible", "sink_window_evictable", "merge_pair", "merged_pairs", "merged_generate"]
