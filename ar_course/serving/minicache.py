"""MiniCache-style cross-layer KV merging inside the serving engine (``EngineConfig(kv_merge_from=m)``).

Semantics:

* Layers ``(a, a + 1)`` for ``a = m, m + 2, ...`` with ``a + 1 < n_layer`` form merged pairs
  (:func:`~ar_course.serving.compression.merged_pairs`); an unpaired last layer, and every layer before ``m``, stays
  exact. ``m >= n_layer - 1`` merges nothing: the engine is then the plain one.
* Storage really shrinks: for each token and head a merged pair stores ONE direction
  (:func:`~ar_course.serving.compression.merge_pair`: ``normalize(normalize(x_a) + normalize(x_b))``, ``D``
  numbers) and each layer's norm (2 numbers) instead of two ``D``-vectors, for keys and for values
  (:class:`~ar_course.serving.paged.PagedKVCache` with ``merge_from``), which is what
  :func:`~ar_course.serving.compression.kv_bytes_per_token` ``("minicache")`` counts.
* In one packed step, a pair's first layer ``a`` sees the positions of earlier steps as ``direction * norm_a``
  and the positions of this step exactly; its new keys and values are held until layer ``a + 1`` has computed
  its own, then the pair is merged and stored; layer ``a + 1`` sees the earlier positions as
  ``direction * norm_b`` and this step's positions exactly. In decode (one token per step) that is
  :class:`~ar_course.serving.compression.CompressedAttention` ``("minicache")``: a query's own entries are exact,
  the earlier positions merged. A prompt prefilled in one step attends to itself exactly; so the outputs
  depend on how a prompt is chunked (and a request recomputed after a preemption may continue differently).
* Prefix caching is refused (a cached prefix would be read merged where a fresh prefill reads it exactly) and so
  are int8/int4 pools (``kv_bits``); sinks + window eviction (``kv_window``) combines with it.

:func:`merged_generate` is the plain path: one sequence, an ordinary contiguous cache, the prompt in one pass
then one token per step, the same merge applied after each step. Tests check the engine against it.
"""

from __future__ import annotations

import torch

from ar_course.serving.compression import merge_pair, merged_pairs, sink_window_visible
from ar_course.serving.paged import check_text_model, check_tokens
from ar_course.utils import check_int


def fresh_rows(write_slots: torch.Tensor, key_slots: torch.Tensor, num_slots: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys of a packed step are the step's own new positions: ``(at, src)`` long, ``key_slots[at] ==
    write_slots[src]``. ``write_slots`` ``(T,)``, ``key_slots`` ``(T_k,)``: distinct pool slots below
    ``num_slots``."""
    lookup = torch.full((num_slots,), -1, dtype=torch.long, device=write_slots.device)  # (num_slots,)
    lookup[write_slots] = torch.arange(write_slots.numel(), device=write_slots.device)
    src = lookup[key_slots]  # (T_k,): the write row of each key, -1 for earlier positions
    at = (src >= 0).nonzero()[:, 0]
    return at, src[at]


class StepCache:
    """A contiguous one-sequence cache for :meth:`~ar_course.transformer.GPT.forward_at`, the plain paths' cache:
    each layer keeps its keys and values ``(1, H, T, D)`` as later queries read them (with ``merge_from``, merged
    pairs as ``direction * norm``; None: exactly). A step's own keys and values are read exactly and stored by
    :meth:`advance`."""

    def __init__(self, n_layer: int, merge_from: int | None):
        self.pairs = merged_pairs(n_layer, merge_from) if merge_from is not None else []
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values of ``layer`` then this step's ``k, v`` ``(1, H, T, D)`` exactly."""
        self.new[layer] = (k, v)
        if self.k[layer] is None:
            return k, v
        return torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)  # (1, H, T_k, D)

    def advance(self) -> None:
        """After a step: store its keys and values, each merged pair merged."""
        stored = dict(self.new)
        for a in self.pairs:
            pair = [merge_pair(xa, xb) for xa, xb in zip(self.new[a], self.new[a + 1])]  # keys, values
            stored[a] = tuple(d * na[..., None] for d, na, _ in pair)
            stored[a + 1] = tuple(d * nb[..., None] for d, _, nb in pair)
        for layer, (k, v) in stored.items():
            self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], 2)
            self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], 2)
        self.new = {}


@torch.no_grad()
def merged_generate(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, merge_from: int | None,
                    sinks_window: tuple[int, int] | None = None) -> list[int]:
    """Greedy ``max_new_tokens`` tokens of ``model`` (a :class:`~ar_course.transformer.GPT`) after ``prompt``
    with MiniCache merging from layer ``merge_from`` (None: none): the prompt in one pass, then one token per
    step, a contiguous cache merged after each step (the plain path of the engine's ``kv_merge_from``).
    ``sinks_window`` ``(sinks, window)``: a query also sees only what
    :func:`~ar_course.serving.compression.sink_window_visible` keeps. Returns the new token ids.

    ``prompt``: a list of token ids or a 1-D integer tensor, as :meth:`~.engine.Engine.add_request` takes it
    (:func:`~.paged.check_tokens`).

    Raises:
        TypeError: ``model`` is not a GPT, or ``max_new_tokens`` / ``merge_from`` / a prompt token is not an
            integer.
        ValueError: ``model`` is not a text model (:func:`~.paged.check_text_model`), ``max_new_tokens < 0``,
            ``merge_from < 0``, a prompt token outside ``[0, vocab_size)``, or an empty prompt or one too long
            for the model's ``config.block_size`` with ``max_new_tokens``."""
    check_text_model(model)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, lo=0)
    if merge_from is not None:
        check_int("merge_from", merge_from, lo=0)
    prompt = check_tokens(prompt, model.config.vocab_size, "prompt")
    model.check_room(len(prompt), max_new_tokens)
    device = model.wte.weight.device
    cache = StepCache(model.config.n_layer, merge_from)
    tokens, start, out = list(prompt), 0, []
    while len(out) < max_new_tokens:
        new = tokens[start:]
        q_pos = torch.arange(start, len(tokens), device=device)  # (T,)
        k_pos = torch.arange(len(tokens), device=device)  # (T_k,)
        mask = k_pos[None, :] <= q_pos[:, None]  # (T, T_k)
        if sinks_window is not None:
            mask &= sink_window_visible(q_pos[:, None], k_pos[None, :], *sinks_window)
        h = model.forward_at(torch.tensor(new, device=device)[None], q_pos, mask, cache)  # (1, T, C)
        cache.advance()
        out.append(int(model.lm_head(h[0, -1]).argmax()))
        start = len(tokens)
        tokens.append(out[-1])
    return out
