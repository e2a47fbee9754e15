"""Heavy-hitter eviction (H2O) inside the serving engine, by whole blocks.

H2O ("Heavy-Hitter Oracle for Efficient Generative Inference") keeps the newest tokens plus the *heavy hitters*:
the older tokens that have received the most attention so far. A paged pool frees memory a block at a time and
stores every head of a position together, so the engine's variant scores blocks, shared by heads and layers:

* every key slot accumulates the attention probability it receives, summed over heads, layers and queries
  (:class:`ScoringAttention`); a new position starts at 0;
* after each step, a sequence holding more than ``budget // block_size`` blocks gives back its full blocks with
  the lowest summed score (:func:`h2o_evictions`), never a block holding one of its ``recent`` newest
  positions (nor the last, partly filled one), so it keeps at most ``max(budget // block_size, ceil(recent /
  block_size) + 1)`` blocks after a step.

A query sees exactly the positions of blocks not yet evicted. The per-head, token-by-token form of H2O that
decides after every query is :func:`~ar_course.serving.compression.h2o_attention` (measured beside the engine).

:func:`h2o_decode` is the plain path: one sequence, a contiguous cache, the prompt in one pass then one token per
step, the same rule. The engine's greedy tokens equal it (tested); teacher-forced it gives the held-out NLL of
decoding through the evicting cache (:func:`h2o_heldout_nll`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ar_course.serving.minicache import StepCache
from ar_course.serving.paged import check_text_model, check_tokens
from ar_course.transformer import functional as ref
from ar_course.transformer.model import use_attention
from ar_course.utils import check_ids, check_int


@dataclass
class ScoringAttention:
    """:data:`~ar_course.transformer.AttentionFn` that attends as ``softmax(q k^T / sqrt(D))`` under ``mask``
    (required: it holds the causal rule) and adds the probability each key receives, summed over batch, heads
    and queries, to ``scores`` ``(N,)`` float64 at ``key_index`` ``(T_k,)`` long (the key's slot)."""

    scores: torch.Tensor
    key_index: torch.Tensor

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                 dropout_p: float = 0.0) -> torch.Tensor:
        """``softmax(q k^T / sqrt(D)) v`` under ``mask`` ``(T, T_k)`` for ``q`` ``(B, H, T, D)`` and ``k``, ``v``
        ``(B, H, T_k, D)``, adding each key's received probability to :attr:`scores`; returns ``(B, H, T, D)``."""
        if mask is None or causal:
            raise ValueError("ScoringAttention needs the full mask (it holds the causal rule) and causal=False")
        p = ref.masked_softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), mask)  # (B, H, T, T_k)
        self.scores.index_add_(0, self.key_index, p.sum(dim=(0, 1, 2)).to(self.scores.dtype))
        return p @ v  # (B, H, T, D)


def check_h2o(budget: int, recent: int, block_size: int) -> None:
    """One-line ``ValueError``/``TypeError`` unless ``1 <= block_size <= budget`` and ``0 <= recent < budget``
    (all integers)."""
    check_int("kv_h2o_budget", budget, lo=check_int("block_size", block_size, lo=1))
    if not 0 <= check_int("kv_h2o_recent", recent, lo=0) < budget:
        raise ValueError(f"need 0 <= kv_h2o_recent < kv_h2o_budget, got {recent} and {budget}")


def h2o_evictions(block_scores: torch.Tensor, live: list[bool], length: int, block_size: int, budget: int,
                  recent: int) -> list[int]:
    """The block indices a sequence of ``length`` positions gives back, ascending: while it holds more than
    ``budget // block_size`` live blocks (``live[i]``: block ``i`` not evicted yet), the full block outside the
    ``recent`` newest positions with the lowest ``block_scores`` ``(n_blocks,)`` (ties: the earlier block)."""
    n_blocks = -(-length // block_size)
    excess = sum(live[:n_blocks]) - budget // block_size
    if excess <= 0:
        return []
    protected = max(length - recent, 0) // block_size  # the first block holding a recent position
    candidates = [i for i in range(min(length // block_size, protected)) if live[i]]
    candidates.sort(key=lambda i: (float(block_scores[i]), i))
    return sorted(candidates[:excess])


@torch.no_grad()
def h2o_decode(model: torch.nn.Module, prompt: list[int], steps: int, budget: int, recent: int, block_size: int,
               forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """The plain path of the engine's H2O: one sequence through a contiguous cache, ``prompt`` in one pass, then
    one token per step; after every pass, the blocks :func:`h2o_evictions` picks are hidden from later queries.

    Each step's next token is the argmax (greedy), or ``forced[i]`` when ``forced`` (``steps`` tokens) is given
    (teacher forcing). Returns ``(tokens, logits (steps, V))``: the tokens fed after the prompt, and the logits
    each of them was chosen from.

    ``prompt`` and ``forced``: lists of token ids or 1-D integer tensors, as
    :meth:`~.engine.Engine.add_request` takes them (:func:`~.paged.check_tokens`).

    Raises:
        TypeError: ``model`` is not a GPT; ``steps``, ``budget``, ``recent``, ``block_size`` or a token is not an
            integer.
        ValueError: ``model`` is not a text model (:func:`~.paged.check_text_model`), bad H2O sizes
            (:func:`check_h2o`), ``steps < 0``, an empty ``prompt``, a token outside ``[0, vocab_size)``,
            ``forced`` not ``steps`` tokens long, or a prompt and ``steps`` that need more positions than the
            model's ``config.block_size`` (its context, not the ``block_size`` argument;
            :meth:`~ar_course.transformer.GPT.check_room`)."""
    check_text_model(model)
    check_h2o(budget, recent, block_size)
    steps = check_int("steps", steps, lo=0)
    prompt = check_tokens(prompt, model.config.vocab_size, "prompt")
    if not prompt:
        raise ValueError("prompt has no tokens")
    if forced is not None:
        forced = check_tokens(forced, model.config.vocab_size, "forced", "forced token")
        if len(forced) != steps:
            raise ValueError(f"forced has {len(forced)} tokens, expected steps={steps}")
    model.check_room(len(prompt), steps)
    device = model.lm_head.weight.device
    cache, scores, live = StepCache(model.config.n_layer, None), torch.zeros(0, dtype=torch.float64, device=device), []
    chunk, start, tokens, logits = list(prompt), 0, [], []
    while len(tokens) < steps:
        end = start + len(chunk)
        scores = torch.cat([scores, scores.new_zeros(len(chunk))])  # (end,)
        live += [True] * (-(-end // block_size) - len(live))
        k_pos, q_pos = torch.arange(end, device=device), torch.arange(start, end, device=device)
        visible = torch.tensor(live, device=device)[k_pos // block_size]  # (end,)
        mask = visible[None, :] & (k_pos[None, :] <= q_pos[:, None])  # (T, end)
        with use_attention(ScoringAttention(scores, k_pos)):
            h = model.forward_at(torch.tensor(chunk, device=device)[None], q_pos, mask, cache)  # (1, T, C)
        cache.advance()
        logits.append(model.lm_head(h[0, -1]))  # (V,)
        block_scores = F.pad(scores, (0, -end % block_size)).view(-1, block_size).sum(-1)  # (n_blocks,)
        for i in h2o_evictions(block_scores, live, end, block_size, budget, recent):
            live[i] = False
        nxt = forced[len(tokens)] if forced is not None else int(logits[-1].argmax())
        tokens.append(nxt)
        chunk, start = [nxt], end
    return tokens, torch.stack(logits) if logits else torch.zeros(0, model.config.vocab_size, device=device)


@torch.no_grad()
def h2o_heldout_nll(model: torch.nn.Module, windows: torch.Tensor, budget: int, recent: int, block_size: int
                    ) -> float:
    """Mean next-token NLL (nats/token) of ``model`` on ``windows`` ``(N, T+1)`` long, decoded one token at a time
    (after the first) through the engine's H2O cache (:func:`h2o_decode`, teacher-forced).

    Raises:
        TypeError: ``windows`` is not a tensor; else as :func:`h2o_decode`.
        ValueError: ``windows`` is not a non-empty ``(N, T+1)`` integer tensor of ids in ``[0, vocab_size)`` with
            ``T >= 1``; else as :func:`h2o_decode`."""
    check_text_model(model)
    check_ids("windows", windows, model.config.vocab_size, ("N", "T+1"), dtype=None)
    if windows.shape[1] < 2:
        raise ValueError(f"windows must hold at least 2 tokens per row (a context and a target), got shape "
                         f"{tuple(windows.shape)}")
    losses = []
    for row in windows.tolist():
        _, logits = h2o_decode(model, row[:1], len(row) - 1, budget, recent, block_size, forced=row[1:])
        losses.append(float(F.cross_entropy(logits, torch.tensor(row[1:], device=logits.device))))
    return sum(losses) / len(losses)
