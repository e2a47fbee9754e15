"""A masked diffusion language model on chapter 02's transformer with the causal mask off.

:class:`DiffusionLM` wraps a :class:`~ar_course.transformer.GPT` built with ``causal=False`` whose vocabulary has one
more id, the mask token (``mask_id = vocab_size``). Its output never proposes the mask token (its logit is
``-inf``), and unmasked tokens are copied through, as in MDLM's "SUBS" parameterisation.

* ``model(ids, block_size=b)``: the per-sequence ELBO estimate (nats/char) of a batch, the training loss. ``b =
  length`` (default) is full-sequence diffusion; a smaller ``b`` is block diffusion: the input is the noisy copy
  followed by the clean one under :func:`~.functional.block_attention_mask`, so one pass trains every block
  conditioned on the clean blocks before it (``b = 1`` is next-token prediction).
* :meth:`DiffusionLM.nll_bound`: that bound on held-out text, averaged over several noise draws;
  :meth:`DiffusionLM.exact_nll_bound` sums it over every masking pattern (tiny sequences only).
* :meth:`DiffusionLM.generate`: ``steps`` denoising passes, over the whole sequence or block by block with the
  finished blocks in a KV cache (``use_cache=False`` recomputes them every pass: the plain path, same tokens).
* :func:`load_pretrained`: the shipped ``diffusion_lm`` (``train diffusion_lm``) and its tokenizer.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ar_course import checkpoint
from ar_course import distributed as ddp
from ar_course.checkpoint import config_from_dict
from ar_course.data import CharTokenizer
from ar_course.diffusion_lm import functional as F
from ar_course.sampling import SamplingConfig, check_sampling, sample
from ar_course.transformer.model import GPT, GPTConfig, KVCache, check_cache_layout
from ar_course.utils import check_bool, check_ids, check_int, eval_mode

DEFAULT_TRAIN_BLOCK_SIZES = (0, 0, 1, 4, 16)
PRETRAINED_NAME = "diffusion_lm"  # ar_course/assets/diffusion_lm.safetensors


@dataclass
class DiffusionLMConfig:
    """Hyper-parameters of :class:`DiffusionLM`.

    Raises:
        TypeError: ``train_block_sizes`` not a tuple or list of integers, or a ``vocab_size`` or ``length`` that is
            not an integer.
        ValueError: ``vocab_size`` or ``length`` ``< 1``, an unknown ``schedule``, or ``train_block_sizes`` empty or
            holding a block size that is neither 0 nor a divisor of ``length``.

    The transformer's fields (``n_layer``, ``n_head``, ``n_embd``, ``attn``) are checked only when
    :class:`DiffusionLM` builds its GPT from :meth:`gpt_config`.
    """

    vocab_size: int = 96  # characters; the mask token is id vocab_size
    length: int = 64  # the longest sequence (training windows have this length)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    schedule: str = "linear"  # the noise schedule alpha(t): "linear" or "cosine"
    # a training batch's block size, drawn uniformly; 0: length
    train_block_sizes: tuple[int, ...] = DEFAULT_TRAIN_BLOCK_SIZES
    attn: str = "sdpa"

    def __post_init__(self) -> None:
        sizes = self.train_block_sizes
        if not isinstance(sizes, (tuple, list)):  # JSON gives a list back
            raise TypeError(f"train_block_sizes must be a tuple of block sizes (0: length), got {sizes!r} "
                            f"({type(sizes).__name__})")
        self.train_block_sizes = tuple(check_int(f"train_block_sizes[{i}]", b, lo=0) for i, b in enumerate(sizes))
        check_int("vocab_size", self.vocab_size, lo=1)
        check_int("length", self.length, lo=1)
        if self.schedule not in F.SCHEDULES:
            raise ValueError(f"schedule must be one of {F.SCHEDULES}, got {self.schedule!r}")
        if not self.train_block_sizes:
            raise ValueError("train_block_sizes must name at least one block size")
        for b in self.train_block_sizes:
            if b != 0 and self.length % b:
                default = (f" (train_block_sizes is the default {DEFAULT_TRAIN_BLOCK_SIZES}, made for length 64: "
                           f"pass train_block_sizes=(0,) or other divisors of {self.length})"
                           if self.train_block_sizes == DEFAULT_TRAIN_BLOCK_SIZES else "")
                raise ValueError(f"train_block_sizes: {b} is neither 0 nor a divisor of length {self.length}{default}")

    def gpt_config(self) -> GPTConfig:
        """The bidirectional :class:`GPTConfig` of the backbone (one extra id: the mask token)."""
        return GPTConfig(vocab_size=self.vocab_size + 1, block_size=self.length, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, attn=self.attn, causal=False)

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusionLMConfig":
        """The config of a dict such as a checkpoint records (:meth:`to_dict`): a missing key takes its default,
        an unknown key is a ``ValueError`` (:func:`~ar_course.checkpoint.config_from_dict`)."""
        return config_from_dict(cls, d)

    def to_dict(self) -> dict:
        """The fields as a plain dict (what a checkpoint records; :meth:`from_dict` reads it back)."""
        return asdict(self)


class DiffusionLM(nn.Module):
    """Masked (absorbing-state) diffusion LM: a bidirectional GPT that predicts the clean token under every mask."""

    def __init__(self, config: DiffusionLMConfig):
        if not isinstance(config, DiffusionLMConfig):
            raise TypeError(f"config must be a DiffusionLMConfig, got {type(config).__name__} "
                            f"(DiffusionLMConfig.from_dict(d) makes one of a dict)")
        super().__init__()
        self.config = config
        self.gpt = GPT(config.gpt_config())

    @property
    def mask_id(self) -> int:
        """The mask token's id: ``vocab_size``, one past the characters."""
        return self.config.vocab_size

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (what :class:`~ar_course.transformer.PassCounter` counts passes at)."""
        return self.gpt.blocks

    def num_params(self) -> int:
        """The number of parameters (the GPT backbone's, all of them)."""
        return sum(p.numel() for p in self.parameters())

    def logits(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """Logits over the characters for every input token: ``x`` ``(B, T)`` at ``positions`` ``(T,)``, attending
        under ``mask`` ``(T, T_k)`` (None: to every key) to the keys of ``cache`` (positions ``0 .. cache.length-1``,
        not advanced) and to themselves. Returns ``(B, T, V + 1)`` with the mask token's logit ``-inf``.

        Raises:
            TypeError: an argument that is not a tensor (or a ``cache`` not a :class:`KVCache`).
            ValueError: ``x`` not a non-empty ``(B, T)`` long tensor of ids in ``[0, V]`` (``V``: the mask token),
                ``positions`` not ``(T,)`` long in ``[0, length)``, ``mask`` not ``(T, cache.length + T)`` bool, or
                a ``cache`` of another batch size or layout, or too short (the ids are read in one host sync
                each).
        """
        self._check_logits(x, positions, mask, cache)
        return self._logits(x, positions, mask, cache)

    def _check_logits(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                      cache: KVCache | None) -> None:
        check_ids("x", x, self.mask_id + 1, ("B", "T"))
        B, T = x.shape
        check_ids("positions", positions, self.config.length, (T,))
        past = 0
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be None or a KVCache, got {type(cache).__name__}")
            if cache.batch_size != B or cache.length + T > cache.max_len:
                raise ValueError(f"cache must be a KVCache of batch size {B} with room for {T} more positions, got "
                                 f"batch size {cache.batch_size} with {cache.max_len - cache.length} left")
            check_cache_layout(cache, self.gpt.config, self.gpt.wte.weight)
            past = cache.length
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask must be None or a ({T}, {past + T}) bool tensor, got {type(mask).__name__}")
            if mask.dtype != torch.bool or mask.shape != (T, past + T):
                raise ValueError(f"mask must be a ({T}, {past + T}) bool tensor, got {tuple(mask.shape)} {mask.dtype}")

    def _logits(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """:meth:`logits` without the argument checks (the model's own passes, whose ids are checked once)."""
        h = self.gpt.forward_at(x, positions, mask, cache)  # (B, T, C)
        out = self.gpt.lm_head(h)  # (B, T, V+1)
        return out.index_fill(-1, torch.tensor([self.mask_id], device=out.device), float("-inf"))

    def _block_size(self, block_size: int | None, length: int) -> int:
        if block_size is None:
            return length
        block_size = check_int("block_size", block_size, lo=1)
        if length % block_size:
            raise ValueError(f"block_size ({block_size}) must divide the sequence length ({length})")
        return block_size

    def _check_ids(self, ids: torch.Tensor) -> None:
        check_ids("ids", ids, self.config.vocab_size, ("B", "L"))
        if not 1 <= ids.shape[1] <= self.config.length:
            raise ValueError(f"ids has {ids.shape[1]} tokens per row; this model takes 1 to {self.config.length}")

    def _denoiser_logits(self, x_t: torch.Tensor, x_0: torch.Tensor, block_size: int) -> torch.Tensor:
        """Logits ``(B, L, V+1)`` of the noisy ``x_t`` ``(B, L)``, each block seeing the clean ``x_0`` of the blocks
        before it (full diffusion when ``block_size == L``: no clean copy is needed)."""
        L = x_t.shape[1]
        positions = torch.arange(L, device=x_t.device)  # (L,)
        if block_size == L:
            return self._logits(x_t, positions)
        mask = F.block_attention_mask(L, block_size, x_t.device)  # (2L, 2L)
        both = torch.cat([x_t, x_0], dim=1)  # (B, 2L)
        return self._logits(both, torch.cat([positions, positions]), mask)[:, :L]  # (B, L, V+1)

    def forward(self, ids: torch.Tensor, block_size: int | None = None, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        """One Monte Carlo draw of the ELBO of each row of ``ids`` ``(B, L)``, in nats per token: ``(B,)``.

        One time ``t`` per block of each row, spread evenly over ``(0, 1]`` across the batch (MDLM's low-discrepancy
        sampler); the masked cross-entropy is weighted by :func:`~.functional.loss_weight`. Its mean is the
        training loss."""
        self._check_ids(ids)
        B, L = ids.shape
        b = self._block_size(block_size, L)

        def times(rows: int) -> torch.Tensor:  # (rows, L) in (0, 1]: one time per block, evenly spread over all
            n = rows * (L // b)
            u = torch.rand((), generator=generator, device=ids.device, dtype=torch.float32)
            t = (u + torch.arange(n, device=ids.device) / n) % 1.0  # (rows * n_blocks,)
            return (1.0 - t).view(rows, L // b).repeat_interleave(b, dim=1)  # (rows, L)

        # under torchrun, in training: the global batch's draws, this process's rows (ddp.draw_rows)
        t = ddp.draw_rows(times, B)  # (B, L)
        noise = ddp.draw_rows(lambda rows: torch.rand((rows, L), generator=generator, device=ids.device,
                                                   dtype=torch.float32), B)  # (B, L)
        x_t, masked = F.mask_tokens(ids, t, self.mask_id, self.config.schedule, noise=noise)
        logits = self._denoiser_logits(x_t, ids, b)  # (B, L, V+1)
        return F._masked_nll(logits, ids, masked, F.loss_weight(t, self.config.schedule)) / L  # (B,)

    def _windows(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` ``(N,)`` cut into non-overlapping windows of ``length`` ``(N // length, length)``; ``(B, L)`` as
        is."""
        if isinstance(ids, torch.Tensor) and ids.ndim == 1:
            n = ids.shape[0] // self.config.length
            if n < 1:
                raise ValueError(f"{ids.shape[0]} tokens are fewer than one window of {self.config.length}")
            ids = ids[: n * self.config.length].view(n, self.config.length)  # (N // L, L)
        self._check_ids(ids)
        return ids

    @torch.no_grad()
    def nll_bound(self, ids: torch.Tensor, *, block_size: int | None = None, samples: int = 4,
                  batch_size: int = 64, generator: torch.Generator | None = None) -> float:
        """The ELBO (an upper bound on the negative log-likelihood) in nats per character, averaged over the rows
        of ``ids`` ``(B, L)`` (or a text ``(N,)``, cut into windows of ``length``) and ``samples`` noise draws.

        ``block_size``: the bound of block-wise diffusion (each block given the clean ones before it); with ``1``
        the bound is exactly the next-token NLL of the model's left-to-right reading (still estimated here from
        ``samples`` draws). ``generator`` draws the noise; rows go through in batches of ``batch_size``."""
        ids = self._windows(ids)
        samples = check_int("samples", samples, lo=1)
        batch_size = check_int("batch_size", batch_size, lo=1)
        b = self._block_size(block_size, ids.shape[1])
        total = 0.0
        with eval_mode(self):
            for _ in range(samples):
                for i in range(0, ids.shape[0], batch_size):
                    total += float(self(ids[i : i + batch_size], b, generator).sum())
        return total / (samples * ids.shape[0])

    @torch.no_grad()
    def exact_nll_bound(self, ids: torch.Tensor, *, block_size: int | None = None) -> torch.Tensor:
        """The ELBO of each row of ``ids`` ``(B, L)`` in nats per token ``(B,)``, integrated exactly: the sum over
        every set ``M`` of ``k >= 1`` masked positions of a block of ``b`` of
        ``(k-1)! (b-k)! / b! * sum_{i in M} -log p(x_i | the rest)``. ``2^b`` patterns per block: tiny ``b`` only
        (at most 12). The plain path beside :meth:`nll_bound` (which estimates it by sampling ``t``)."""
        self._check_ids(ids)
        B, L = ids.shape
        b = self._block_size(block_size, L)
        if b > 12:
            raise ValueError(f"exact_nll_bound enumerates 2^block_size patterns; block_size {b} is over 12")
        total = torch.zeros(B, dtype=torch.float64, device=ids.device)
        for start, end in F.block_spans(L, b):
            for k in range(1, b + 1):
                coef = math.factorial(k - 1) * math.factorial(b - k) / math.factorial(b)
                for subset in itertools.combinations(range(start, end), k):
                    masked = torch.zeros(B, L, dtype=torch.bool, device=ids.device)
                    masked[:, list(subset)] = True
                    x_t = torch.where(masked, torch.full_like(ids, self.mask_id), ids)  # (B, L)
                    logits = self._denoiser_logits(x_t, ids, b)  # (B, L, V+1)
                    total += coef * F._masked_nll(logits, ids, masked, torch.ones(())).double()
        return total / L  # (B,)

    def _check_generate(self, n: int, length: int, steps: int, block_size: int | None) -> tuple[int, int, int, int]:
        n = check_int("n", n, lo=1)
        length = check_int("length", length, lo=1, hi=self.config.length)
        steps = check_int("steps", steps, lo=1)
        return n, length, steps, self._block_size(block_size, length)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        length: int,
        *,
        steps: int,
        block_size: int | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        return_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``n`` sequences of ``length`` characters from all masks, in exactly ``steps`` forward passes.

        ``block_size=None`` (or ``length``): full-sequence diffusion, ``steps`` reverse steps from ``t = 1`` to
        ``0``. A smaller ``block_size`` (a divisor of ``length``): blocks left to right, ``steps // n_blocks`` reverse
        steps each, every block conditioned on the finished ones. With ``use_cache`` the finished blocks sit in a KV
        cache: a block's keys are written by the first pass of the next block (which feeds it, clean, in front of
        the new block's masks), so no pass is spent on it; ``use_cache=False`` reruns the whole clean prefix at every
        pass (the plain path; same tokens). ``block_size=1`` with ``steps=length`` is left-to-right
        (autoregressive) decoding. ``sampling``: temperature / top-k / top-p of each revealed token (0: greedy).

        Returns ``(n, length)`` long ids, and with ``return_states`` also ``(steps + 1, n, length)``: the sequence
        before the first pass and after each (the mask token is ``mask_id``).

        Raises:
            TypeError: a number or flag of the wrong type (``steps=8.0``), or ``sampling`` not a ``SamplingConfig``.
            ValueError: ``n``, ``steps`` < 1, ``length`` outside ``1 .. config.length``, a ``block_size`` that does
                not divide ``length``, or ``steps`` not a multiple of the number of blocks."""
        n, length, steps, b = self._check_generate(n, length, steps, block_size)
        sampling = check_sampling(sampling)
        use_cache = check_bool("use_cache", use_cache)
        return_states = check_bool("return_states", return_states)
        device = self.gpt.wte.weight.device
        passes = F.block_schedule(length, b, steps)
        x = torch.full((n, length), self.mask_id, dtype=torch.long, device=device)  # (n, L)
        states = [x.clone()]
        c = self.gpt.config
        cache = KVCache(c.n_layer, n, c.n_head, length, c.head_dim, device, self.gpt.wte.weight.dtype) \
            if use_cache else None
        for start, end, t, s in passes:
            if cache is not None:
                logits = self._cached_logits(x, start, end, t == 1.0, cache)
            else:
                blk = torch.arange(end, device=device) // b  # (end,) block of every position so far
                mask = blk[:, None] >= blk[None, :]  # (end, end): clean blocks see earlier ones, the last sees all
                logits = self._logits(x[:, :end], torch.arange(end, device=device), mask)[:, start:]  # (n, b, V+1)
            proposal = sample(logits, sampling=sampling, generator=generator)  # (n, b)
            x[:, start:end] = F.denoise_step(x[:, start:end], proposal, t, s, self.mask_id, self.config.schedule,
                                             generator)
            states.append(x.clone())
        return (x, torch.stack(states)) if return_states else x

    def _cached_logits(self, x: torch.Tensor, start: int, end: int, first: bool, cache: KVCache) -> torch.Tensor:
        """Logits ``(n, b, V+1)`` of the block ``start .. end-1`` of ``x`` ``(n, L)`` over the finished blocks in
        ``cache``. On a block's ``first`` pass the previous (now clean) block goes in front of it, and its keys
        stay in the cache."""
        b, device = end - start, x.device
        past = cache.length
        if start == 0 or not first:
            return self._logits(x[:, start:end], torch.arange(start, end, device=device), None, cache)  # (n, b, V+1)
        mask = torch.ones(2 * b, past + 2 * b, dtype=torch.bool, device=device)  # (2b, past + 2b)
        mask[:b, past + b:] = False  # the clean block does not see the new one
        prev = torch.arange(start - b, end, device=device)  # (2b,)
        logits = self._logits(x[:, start - b : end], prev, mask, cache)[:, b:]  # (n, b, V+1)
        cache.advance(b)  # keep the clean block's keys; the new block's are rewritten by its next pass
        return logits


def load_pretrained(device: torch.device | str = "cpu", path: str | Path | None = None
                    ) -> tuple[DiffusionLM, CharTokenizer]:
    """The shipped diffusion LM (or ``path``: a file or a shipped checkpoint name written by ``train
    diffusion_lm``) and its character tokenizer: ``(model, tokenizer)``, the model in eval mode
    (:func:`ar_course.checkpoint.load_with_tokenizer`)."""
    return checkpoint.load_with_tokenizer(PRETRAINED_NAME if path is None else path, device, kind="diffusion_lm")
