"""The causal transformer of chapter 02: attention, rotary embeddings, blocks, a GPT with a KV cache.

``functional`` holds the plain reference functions; ``model`` the modules built from them (and the attention
functions a layer may use: :func:`sdpa_attention`, :func:`plain_attention`, :class:`KernelAttention`, chosen per
call with :func:`use_attention`);
``pretrained`` the shipped character-level target/draft pair (``load_pretrained("lm_target")``);
``counting`` counts forward passes (:class:`PassCounter`); ``graphs`` replays a decode step over a
:class:`StaticKVCache` from CUDA graphs (:class:`~ar_course.transformer.graphs.CUDAGraphStep`).
"""

from .model import (
    ATTENTION_IMPLS, CACHE_KINDS, GPT, MLP, AttentionFn, Block, GPTConfig, KernelAttention, KVCache, RMSNorm,
    Rotary, SelfAttention, StaticKVCache, SwiGLU, attention_function, plain_attention, sdpa_attention,
    set_attention, use_attention,
)
from .counting import PassCounter, count_forward_passes
from .pretrained import checkpoint_info, load_pretrained

__all__ = [
    "GPT", "GPTConfig", "KVCache", "StaticKVCache", "CACHE_KINDS", "Block", "SelfAttention", "MLP", "SwiGLU",
    "RMSNorm", "Rotary",
    "load_pretrained", "checkpoint_info", "ATTENTION_IMPLS", "set_attention", "PassCounter", "count_forward_passes",
    "AttentionFn", "attention_function", "sdpa_attention", "plain_attention", "KernelAttention", "use_attention",
]
