"""The causal transformer of chapter 02: attention, rotary embeddings, blocks, a GPT with a KV cache.

``functional`` holds the plain reference functions; ``model`` the modules built from them;
``pretrained`` the shipped character-level target/draft pair (``load_pretrained("lm_target")``);
``counting`` counts forward passes (:class:`PassCounter`).
"""

from .model import (
    ATTENTION_IMPLS, GPT, MLP, Block, GPTConfig, KVCache, RMSNorm, Rotary, SelfAttention, SwiGLU, set_attention,
)
from .counting import PassCounter, count_forward_passes
from .pretrained import checkpoint_info, load_pretrained

__all__ = [
    "GPT", "GPTConfig", "KVCache", "Block", "SelfAttention", "MLP", "SwiGLU", "RMSNorm", "Rotary",
    "load_pretrained", "checkpoint_info", "ATTENTION_IMPLS", "set_attention", "PassCounter", "count_forward_passes",
]
