"""An inference engine serving many requests from one GPT: continuous batching over a paged KV cache.

Each :meth:`Engine.step` is one iteration of the scheduler (Orca's iteration-level scheduling, vLLM's engine):

1. admit waiting requests, first come first served, while the batch has room and the pool has the blocks
   their tokens need (``policy="static"`` admits a new batch only when the last one has finished, and
   reserves every sequence's memory up front, as a contiguous cache would: its prompt plus ``max_new_tokens - 1``
   positions (the last new token is never fed back), or ``static_reserve`` positions when that is more, e.g. the
   model's full length);
2. schedule one token for every sequence that is decoding, then chunks of waiting prompts up to the step's
   token budget (chunked prefill); when the pool runs out of blocks, the most recently admitted sequence is
   *preempted*: its blocks are freed and it goes back to the front of the queue, to be recomputed later;
3. run all scheduled tokens of all sequences in **one** forward pass: they are packed into one row (as in
   "Prepacking"), each at its own position, with a mask that lets a token see only the earlier tokens of its
   own sequence, read through the block tables;
4. sample the next token of every sequence whose tokens are all computed, and free finished sequences.

With ``prefix_caching=True`` the full blocks of every computed prefix are kept (:mod:`.prefix`); an admitted
request starts on the cached blocks of its longest cached prefix instead of recomputing them.

KV compression inside the engine: ``kv_bits=8`` or ``4`` quantizes the pool (per token and head, see
:func:`~ar_course.serving.compression.pool_quantize`); ``kv_window=W`` (with ``kv_sinks=S``) is StreamingLLM's
cache of the ``S`` first and ``W - S`` last positions: every query sees only those
(:func:`~ar_course.serving.compression.sink_window_visible`) and, after each step, the blocks no later query can
see are freed (:func:`~ar_course.serving.compression.sink_window_evictable`), so a long sequence holds at most
about ``W / block_size + 2`` blocks. ``kv_h2o_budget=N`` (with ``kv_h2o_recent=R``) is heavy-hitter eviction
by whole blocks (:mod:`.h2o`): every key slot accumulates the attention it receives, and after each step a
sequence over ``N // block_size`` blocks gives back its lowest-scoring full blocks outside the ``R`` newest
positions. ``kv_merge_from=m`` is MiniCache's cross-layer merging: each pair of layers
``(a, a + 1)`` from ``m`` on stores one direction per token and head plus each layer's norm instead of two
vectors; a step's own positions are read exactly, earlier ones merged (:mod:`~ar_course.serving.minicache`;
not with ``kv_bits`` or prefix caching, but with ``kv_window``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ar_course.sampling import SamplingConfig, check_sampling, sample
from ar_course.serving.compression import merged_pairs, sink_window_evictable, sink_window_visible
from ar_course.serving.h2o import ScoringAttention, check_h2o, h2o_evictions
from ar_course.serving.minicache import fresh_rows
from ar_course.serving.paged import OutOfBlocks, PagedKVCache, check_text_model, check_tokens
from ar_course.serving.prefix import PrefixCache
from ar_course.transformer.model import use_attention
from ar_course.utils import check_bool, check_int, check_seed

POLICIES = ("continuous", "static")


@dataclass
class EngineConfig:
    """How an :class:`Engine` schedules: pool size, block size, batch limits and policy.

    Checked when made: ``TypeError`` for a size that is not an integer or a ``prefix_caching`` that is not a
    bool (``"false"`` is refused), ``ValueError`` for values out of range or options that do not combine."""

    num_blocks: int = 256
    block_size: int = 16
    max_running: int = 16  # sequences in a batch
    max_step_tokens: int = 256  # tokens in one forward pass (decodes + prefill chunks)
    policy: str = "continuous"  # "continuous" or "static"
    prefix_caching: bool = False
    static_reserve: int | None = None  # static policy: positions reserved per sequence at least (None: what it needs)
    kv_bits: int | None = None  # 8 / 4: the pool stores int8 / packed int4 codes per token and head (None: dtype)
    kv_window: int | None = None  # sinks + window eviction: positions a query sees (None: all of them)
    kv_sinks: int = 4  # with kv_window: the first positions always kept (the attention sinks)
    kv_h2o_budget: int | None = None  # heavy-hitter eviction: positions a sequence keeps (None: all of them)
    kv_h2o_recent: int = 32  # with kv_h2o_budget: the newest positions never evicted
    kv_merge_from: int | None = None  # MiniCache: layers (a, a+1) for a = this, this+2, ... share one direction

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_running", "max_step_tokens"):
            check_int(name, getattr(self, name), lo=1)
        check_bool("prefix_caching", self.prefix_caching)
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.kv_bits is not None and check_int("kv_bits", self.kv_bits) not in (8, 4):  # 8.0 is a TypeError
            raise ValueError(f"kv_bits must be None, 8 or 4, got {self.kv_bits!r}")
        if self.kv_window is not None:
            check_int("kv_window", self.kv_window, lo=1)
            if not 0 <= check_int("kv_sinks", self.kv_sinks, lo=0) < self.kv_window:
                raise ValueError(f"need 0 <= kv_sinks < kv_window, got {self.kv_sinks} and {self.kv_window}")
            if self.prefix_caching:
                raise ValueError("prefix_caching cannot share blocks that kv_window evicts: use one or the other")
        if self.kv_h2o_budget is not None:
            check_h2o(self.kv_h2o_budget, self.kv_h2o_recent, self.block_size)
            if self.prefix_caching or self.kv_window is not None or self.kv_merge_from is not None:
                raise ValueError("kv_h2o_budget evicts blocks by score: it cannot be combined with prefix_caching, "
                                 "kv_window or kv_merge_from")
        if self.kv_merge_from is not None:
            check_int("kv_merge_from", self.kv_merge_from, lo=0)
            if self.kv_bits is not None:
                raise ValueError("kv_merge_from stores full-precision directions: use it or kv_bits, not both")
            if self.prefix_caching:
                raise ValueError("prefix_caching would read merged prefixes that a prefill reads exactly: "
                                 "use kv_merge_from or prefix_caching, not both")
        if self.static_reserve is not None:
            pool = self.num_blocks * self.block_size
            check_int("static_reserve", self.static_reserve, lo=1)
            if self.static_reserve > pool:
                raise ValueError(f"static_reserve ({self.static_reserve} positions) is more than the pool holds "
                                 f"({self.num_blocks} blocks of {self.block_size} = {pool})")
        if self.max_step_tokens < self.max_running:
            raise ValueError(f"max_step_tokens ({self.max_step_tokens}) must be >= max_running ({self.max_running})")


def check_merge_from(n_layer: int, merge_from: int | None) -> None:
    """``ValueError`` unless ``merge_from`` (:attr:`EngineConfig.kv_merge_from`) is None or merges at least one pair
    of layers ``(a, a + 1)`` of an ``n_layer``-layer model."""
    if merge_from is not None and n_layer < 2:
        raise ValueError(f"kv_merge_from merges the caches of neighbouring layers: a {n_layer}-layer model has none "
                         f"to merge (use None), got {merge_from}")
    if merge_from is not None and not merged_pairs(n_layer, merge_from):
        raise ValueError(f"kv_merge_from must be < {n_layer - 1} for this {n_layer}-layer model (it merges layers "
                         f"(a, a + 1) from it on), got {merge_from}")


def kv_positions(prompt_tokens: int, max_new_tokens: int) -> int:
    """Pool positions a request of ``prompt_tokens`` and ``max_new_tokens`` needs at most (the last new token is
    never fed back)."""
    return prompt_tokens + max(max_new_tokens - 1, 0)


@dataclass
class Request:
    """One request and what has happened to it; ``tokens`` = prompt + output, ``computed`` of them cached."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    generator: torch.Generator | None
    arrival: float
    output: list[int] = field(default_factory=list)
    computed: int = 0
    status: str = "waiting"  # waiting, running, finished, cancelled
    token_times: list[float] = field(default_factory=list)
    finished_at: float | None = None
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        """A new list: the prompt then the tokens generated so far."""
        return self.prompt + self.output

    @property
    def kv_positions(self) -> int:
        """Positions this request needs at most: the last new token is never fed back."""
        return kv_positions(len(self.prompt), self.max_new_tokens)


@dataclass
class StepRecord:
    """What one :meth:`Engine.step` did (for timelines and memory plots)."""

    time: float
    running: list[int]
    prefill_tokens: int
    decode_tokens: int
    blocks_used: int
    tokens_stored: int
    kv_bytes: int = 0  # bytes of the blocks in use after the step
    slots_empty: int = 0  # slots of those blocks that hold no position (PagedKVCache.empty_slots)


def admits(need: int, free_blocks: int, in_batch: int, max_running: int, keep_per_sequence: int = 1) -> bool:
    """The admission rule: a request needing ``need`` blocks joins a batch of ``in_batch`` sequences when the
    batch is below ``max_running`` and ``need`` fits in ``free_blocks`` minus ``keep_per_sequence`` blocks kept
    for the next token of every sequence already in the batch (0 when their memory is reserved up front).

    Raises:
        TypeError: an argument that is not an integer.
        ValueError: ``need``, ``free_blocks``, ``in_batch`` or ``keep_per_sequence`` is negative, or
            ``max_running < 1``."""
    need, free_blocks = check_int("need", need, lo=0), check_int("free_blocks", free_blocks, lo=0)
    in_batch, max_running = check_int("in_batch", in_batch, lo=0), check_int("max_running", max_running, lo=1)
    keep_per_sequence = check_int("keep_per_sequence", keep_per_sequence, lo=0)
    return in_batch < max_running and need <= free_blocks - keep_per_sequence * in_batch


class _PackedStep:
    """The ``cache`` a GPT's layers see in a packed pass: ``append`` writes the new keys and values
    ``(1, H, T, D)`` at their slots and returns every scheduled sequence's keys and values ``(1, H, T_k, D)``
    (a merged layer: this step's own positions exactly, the earlier ones as the pool stores them)."""

    def __init__(self, cache: PagedKVCache, write_slots: torch.Tensor, key_slots: torch.Tensor):
        self.cache, self.write_slots, self.key_slots = cache, write_slots, key_slots
        self.fresh = None
        if cache.partner:  # MiniCache: (rows of key_slots, rows of write_slots) of this step's positions
            self.fresh = fresh_rows(write_slots, key_slots, cache.num_blocks * cache.block_size)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = k[0].transpose(0, 1), v[0].transpose(0, 1)  # (T, H, D)
        self.cache.write(layer, self.write_slots, k, v)
        keys, values = self.cache.read(layer, self.key_slots)  # (T_k, H, D)
        if self.cache.is_merged(layer):
            at, src = self.fresh
            keys[at], values[at] = k[src], v[src]
        return keys.transpose(0, 1)[None], values.transpose(0, 1)[None]  # (1, H, T_k, D)


def packed_forward(model: torch.nn.Module, cache: PagedKVCache, chunks: list[tuple[int, list[int], int]],
                   sinks_window: tuple[int, int] | None = None, scores: torch.Tensor | None = None) -> torch.Tensor:
    """One forward pass of ``model`` (a :class:`~ar_course.transformer.GPT`) over the ``chunks``
    ``(seq, token ids, start position)`` of several sequences, packed in one row; their keys and values are
    written to ``cache`` (blocks reserved beforehand) and read back through the block tables (positions in
    evicted blocks are not read). ``sinks_window`` ``(sinks, window)``: a query also sees only the keys
    :func:`~ar_course.serving.compression.sink_window_visible` keeps. ``scores`` ``(num_blocks * block_size,)``
    float64: attend through :class:`~ar_course.serving.h2o.ScoringAttention`, adding the attention each key slot
    receives (a slot written in this pass starts at 0).

    Returns the logits after the last token of each chunk: ``(len(chunks), V)``.

    It checks none of its arguments, like :meth:`GPT.forward_at <ar_course.transformer.GPT.forward_at>`: it is
    the engine's per-step hot path, and :meth:`Engine.add_request` has checked every token and length that
    reaches it."""
    ids, positions, writes, keys, q_seq, k_seq, k_pos = [], [], [], [], [], [], []
    for i, (seq, tokens, start) in enumerate(chunks):
        n = len(tokens)
        ids += tokens
        positions.append(torch.arange(start, start + n))
        writes.append(cache.slots(seq, start, n))
        live = cache.live_positions(seq, start + n)  # (n_k,)
        keys.append(cache.slots_at(seq, live))
        q_seq.append(torch.full((n,), i))
        k_seq.append(torch.full((live.numel(),), i))
        k_pos.append(live)
    device = cache.k.device
    q_pos, kp = torch.cat(positions)[:, None], torch.cat(k_pos)[None, :]  # (T, 1), (1, T_k)
    mask = (torch.cat(q_seq)[:, None] == torch.cat(k_seq)[None, :]) & (kp <= q_pos)  # (T, T_k)
    if sinks_window is not None:
        mask &= sink_window_visible(q_pos, kp, *sinks_window)
    mask, q_pos = mask.to(device), q_pos[:, 0].to(device)  # (T, T_k), (T,)
    step = _PackedStep(cache, torch.cat(writes), torch.cat(keys))
    idx = torch.tensor(ids, device=device)[None]  # (1, T)
    if scores is None:
        h = model.forward_at(idx, q_pos, mask, step)  # (1, T, C)
    else:
        scores[step.write_slots] = 0.0
        with use_attention(ScoringAttention(scores, step.key_slots)):
            h = model.forward_at(idx, q_pos, mask, step)  # (1, T, C)
    last = torch.tensor([len(t) for _, t, _ in chunks]).cumsum(0) - 1  # (n_chunks,)
    return model.lm_head(h[0, last.to(device)])  # (n_chunks, V)


class Engine:
    """Serve many requests from one GPT over a :class:`~ar_course.serving.paged.PagedKVCache`.

    ``add_request(prompt_ids, max_new_tokens, sampling=...) -> id``, then :meth:`step` until
    :attr:`has_work` is False (or :meth:`run`). Without KV compression, greedy outputs equal ``model.generate`` on
    each prompt alone, whatever the batching (tested); with it, they equal the compression's one-sequence plain
    path (recomputing ``generate`` through the same attention for ``kv_bits`` and ``kv_window``;
    :func:`~.h2o.h2o_decode` and :func:`~.minicache.merged_generate`, which prefill the prompt in one step, for H2O
    and merging). ``clock``: where times come from (``time.perf_counter``). :attr:`history` keeps a
    :class:`StepRecord` per step, the newest ``max_history`` of them (``None``: all); :attr:`requests` keeps every
    request until :meth:`release` forgets an ended one. A long-running server bounds the first and releases
    (:class:`~ar_course.serving.worker.EngineWorker` does both).

    ``model`` must be a text model: a causal GPT with no class token (:func:`~.paged.check_text_model`);
    ``config`` None: an :class:`EngineConfig` of its defaults, a new one for each engine.

    Raises:
        TypeError: ``model`` is not a GPT, ``config`` is not an :class:`EngineConfig`, or ``max_history`` is
            not an integer or ``None``.
        ValueError: ``model`` is class-conditional (``n_classes > 0``: the engine feeds no class token) or
            bidirectional (``causal=False``), or ``max_history < 0``."""

    def __init__(self, model: torch.nn.Module, config: EngineConfig | None = None,
                 clock: Callable[[], float] = time.perf_counter, *, max_history: int | None = None):
        model = check_text_model(model)
        config = EngineConfig() if config is None else config  # a new default for each engine
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        if max_history is not None:
            max_history = check_int("max_history", max_history, lo=0)
        check_merge_from(model.config.n_layer, config.kv_merge_from)
        self.model, self.config, self.clock = model, config, clock
        self.cache = PagedKVCache.for_model(model, config.num_blocks, config.block_size, config.kv_bits,
                                            config.kv_merge_from)
        self.prefix = PrefixCache(self.cache) if config.prefix_caching else None
        self.scores = (torch.zeros(config.num_blocks * config.block_size, dtype=torch.float64,
                                   device=self.cache.k.device) if config.kv_h2o_budget is not None else None)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self.history: deque[StepRecord] = deque(maxlen=max_history)
        self.prefill_computed = 0  # prompt (and recomputed) tokens run through the model
        self.preemptions = 0
        self._next_id = 0
        self._unfinished: list[tuple[Request, int]] | None = None  # the batch of a step that has not returned

    # ---------------------------------------------------------------------------------------------- requests

    def add_request(self, prompt_ids: list[int] | torch.Tensor, max_new_tokens: int, *,
                    sampling: SamplingConfig = SamplingConfig(temperature=0.0), seed: int | None = None) -> int:
        """Queue a request (``prompt_ids``: a list or 1-D long tensor); returns its id. Greedy by default;
        ``seed`` seeds the request's own generator (sampling is then independent of the batching).

        Raises:
            TypeError, ValueError: see :meth:`check_request`."""
        prompt, max_new_tokens, sampling, seed = self.check_request(prompt_ids, max_new_tokens, sampling=sampling,
                                                                    seed=seed)
        generator = None if seed is None else torch.Generator(device=self.cache.k.device).manual_seed(seed)
        req = Request(self._next_id, prompt, max_new_tokens, sampling, generator, self.clock())
        self._next_id += 1
        self.requests[req.id] = req
        if max_new_tokens == 0:
            self._finish(req, "finished")
        else:
            self.waiting.append(req)
        return req.id

    def check_request(self, prompt_ids: list[int] | torch.Tensor, max_new_tokens: int, *,
                      sampling: SamplingConfig = SamplingConfig(temperature=0.0),
                      seed: int | None = None) -> tuple[list[int], int, SamplingConfig, int | None]:
        """What :meth:`add_request` checks, without queuing anything (reads no engine state: any thread may call
        it): returns ``(prompt, max_new_tokens, sampling, seed)`` checked, the prompt as a list of ints. A list
        longer than the model's context is refused before its tokens are read.

        Raises:
            TypeError: a prompt token, ``max_new_tokens`` or ``seed`` that is not an integer, or ``sampling`` that
                is not a ``SamplingConfig``.
            ValueError: a prompt that is empty or not 1-D, a token outside ``[0, vocab_size)``,
                ``max_new_tokens < 0``, ``seed`` outside ``[-2**63, 2**64 - 1]``, or a request needing more
                positions than the model's ``config.block_size`` (its context) or than the whole pool holds."""
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, lo=0)
        if isinstance(prompt_ids, list) and len(prompt_ids) > self.model.config.block_size:  # before reading each
            self.model.check_room(len(prompt_ids), max_new_tokens)
        prompt = check_tokens(prompt_ids, self.model.config.vocab_size)
        self.model.check_room(len(prompt), max_new_tokens)
        sampling = check_sampling(sampling)
        if seed is not None:
            seed = check_seed(seed)
        positions = kv_positions(len(prompt), max_new_tokens)
        if -(-positions // self.config.block_size) > self.config.num_blocks:
            raise ValueError(f"a request of {positions} positions can never fit in {self.config.num_blocks} "
                             f"blocks of {self.config.block_size}")
        return prompt, max_new_tokens, sampling, seed

    def cancel(self, request_id: int) -> None:
        """Stop a waiting or running request (its blocks are freed); a finished one is left as it is.

        Raises:
            TypeError: ``request_id`` is not an integer.
            ValueError: no request has this id (ids come from :meth:`add_request`)."""
        request_id = check_int("request_id", request_id)
        if request_id not in self.requests:
            raise ValueError(f"request_id {request_id} is unknown: ids come from add_request")
        req = self.requests[request_id]
        if req.status in ("waiting", "running"):
            if req in self.waiting:
                self.waiting.remove(req)
            self._finish(req, "cancelled")

    def release(self, request_id: int) -> Request:
        """Forget an ended (finished or cancelled) request and return it: :meth:`outputs` no longer lists it.

        Raises:
            TypeError: ``request_id`` is not an integer.
            ValueError: no request has this id, or it is still waiting or running (:meth:`cancel` it first)."""
        request_id = check_int("request_id", request_id)
        req = self.requests.get(request_id)
        if req is None:
            raise ValueError(f"request_id {request_id} is unknown: ids come from add_request")
        if req.status in ("waiting", "running"):
            raise ValueError(f"request {request_id} is still {req.status}: cancel it before releasing it")
        return self.requests.pop(request_id)

    @property
    def has_work(self) -> bool:
        """True while some request is waiting or running."""
        return bool(self.waiting or self.running)

    def outputs(self) -> dict[int, list[int]]:
        """New tokens of every request so far, by id."""
        return {i: list(r.output) for i, r in self.requests.items()}

    def run(self) -> dict[int, list[int]]:
        """Step until every request has finished; returns :meth:`outputs`."""
        while self.has_work:
            self.step()
        return self.outputs()

    def bytes_per_block(self) -> int:
        """KV bytes one block in use holds: the pool's (codes and statistics), plus its slots' scores with H2O."""
        scores = 0 if self.scores is None else self.config.block_size * self.scores.element_size()
        return self.cache.bytes_per_block() + scores

    # ---------------------------------------------------------------------------------------------- one step

    @torch.no_grad()
    def step(self) -> list[tuple[int, int]]:
        """One scheduler iteration (see the module docstring). Returns the ``(request id, new token)`` pairs
        sampled in it, in batch order.

        A step that raised part way (Ctrl-C, an error while sampling) leaves the engine able to go on: the tokens
        are drawn before any request moves on, and the next step first repairs what is left half done."""
        self._recover()
        self._admit()
        batch = self._schedule()
        if not batch:
            return []
        chunks = [(r.id, r.tokens[r.computed:r.computed + n], r.computed) for r, n in batch]
        decodes = sum(1 for r, n in batch if r.output and r.computed == len(r.tokens) - 1)
        self._unfinished = batch
        logits = packed_forward(self.model, self.cache, chunks, self._sinks_window, self.scores)  # (len(batch), V)
        now, events = self.clock(), []
        drawn = [int(sample(row[None], sampling=req.sampling, generator=req.generator)[0])
                 if req.computed + n == len(req.tokens) else None  # None: a prefill chunk short of the prompt's end
                 for (req, n), row in zip(batch, logits)]
        for (req, n), token in zip(batch, drawn):
            self.cache.advance(req.id, n)
            req.computed += n
            if token is not None:
                req.output.append(token)
                req.token_times.append(now)
                events.append((req.id, token))
        self._evict(batch)
        self._record(now, batch, decodes)
        for req, _ in batch:
            if self.prefix is not None:
                self.prefix.insert(req.tokens, self.cache.tables[req.id], req.computed)
            if len(req.output) >= req.max_new_tokens:
                self._finish(req, "finished")
        self._unfinished = None
        return events

    def _recover(self) -> None:
        """Finish what a step that raised part way left undone: a request moved on without its token drawn steps
        back one position (computed again, its token drawn), its cache length follows, the evictions of the
        step are made (they are idempotent), and a request holding all its tokens is finished. Nothing to do
        after a step that returned."""
        if self._unfinished is None:
            return
        batch, self._unfinished = [(r, n) for r, n in self._unfinished if r in self.running], None
        for req, _ in batch:
            req.computed = min(req.computed, len(req.tokens) - 1)
            self.cache.lengths[req.id] = req.computed
        self._evict(batch)
        for req, _ in batch:
            if len(req.output) >= req.max_new_tokens:
                self._finish(req, "finished")

    @property
    def _sinks_window(self) -> tuple[int, int] | None:
        c = self.config
        return None if c.kv_window is None else (c.kv_sinks, c.kv_window)

    def _evict(self, batch: list[tuple[Request, int]]) -> None:
        """With ``kv_window``: free the blocks of the batch's sequences that no later query can see; with
        ``kv_h2o_budget``: the lowest-scoring blocks of each sequence over its budget."""
        c = self.config
        for req, _ in batch:
            if self._sinks_window is not None:
                self.cache.evict(req.id, sink_window_evictable(req.computed, *self._sinks_window, c.block_size))
            elif self.scores is not None:
                table = self.cache.tables[req.id]
                block_scores = self.scores.view(-1, c.block_size)[torch.tensor(table).clamp_min(0)].sum(-1)  # (n,)
                live = [b >= 0 for b in table]
                self.cache.evict(req.id, h2o_evictions(block_scores, live, req.computed, c.block_size,
                                                       c.kv_h2o_budget, c.kv_h2o_recent))

    def _admit(self) -> None:
        """Move waiting requests into the batch while it has room and the pool has their blocks."""
        c = self.config
        if c.policy == "static" and self.running:
            return
        keep = 1 if c.policy == "continuous" else 0
        while self.waiting and len(self.running) < c.max_running:
            req = self.waiting[0]
            shared = []
            if self.prefix is not None:  # never the last token: its logits must be computed
                shared = self.prefix.match(req.tokens, (len(req.tokens) - 1) // c.block_size)
            need = len(req.tokens)
            if c.policy == "static":
                need = max(req.kv_positions, c.static_reserve or 0)
            blocks = -(-need // c.block_size) - len(shared)
            if not admits(blocks, self._free_blocks(), len(self.running), c.max_running, keep):
                break  # first come, first served: no request overtakes this one
            self.cache.add(req.id, shared, len(shared) * c.block_size)
            try:
                self._reserve(req, need - len(shared) * c.block_size)
            except OutOfBlocks:  # the matched prefix blocks were counted as evictable
                self.cache.free(req.id)
                break
            self.waiting.popleft()
            req.computed, req.status = len(shared) * c.block_size, "running"
            self.running.append(req)
            if self.prefix is not None:
                self.prefix.hits += len(shared)

    def _free_blocks(self) -> int:
        return self.cache.allocator.num_free + (self.prefix.evictable() if self.prefix is not None else 0)

    def _reserve(self, req: Request, n: int) -> None:
        """Reserve ``n`` positions for ``req``, evicting cached prefix blocks first when the pool is short."""
        short = self.cache.blocks_needed(req.id, n) - self.cache.allocator.num_free
        if short > 0 and self.prefix is not None:
            self.prefix.evict(short)
        self.cache.reserve(req.id, n)

    def _schedule(self) -> list[tuple[Request, int]]:
        """``(request, tokens to compute)`` for this step, blocks reserved; preempts when blocks run out."""
        budget, batch = self.config.max_step_tokens, []
        decoding = [r for r in self.running if r.computed == len(r.tokens) - 1]
        prefilling = [r for r in self.running if r.computed < len(r.tokens) - 1]
        for req in decoding + prefilling:
            if req not in self.running or budget == 0:
                continue  # preempted while making room for an earlier one
            n = min(len(req.tokens) - req.computed, budget)
            while req in self.running:
                try:
                    self._reserve(req, n)
                    batch.append((req, n))
                    budget -= n
                    break
                except OutOfBlocks:
                    victim = self.running[-1]
                    self._preempt(victim)
                    batch = [(r, m) for r, m in batch if r is not victim]
        return batch

    def _preempt(self, req: Request) -> None:
        """Free ``req``'s blocks and queue it first again; its tokens so far are recomputed when readmitted."""
        self.running.remove(req)
        self.cache.free(req.id)
        req.computed, req.status = 0, "waiting"
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def _finish(self, req: Request, status: str) -> None:
        if req in self.running:
            self.running.remove(req)
        if req.id in self.cache.tables:
            self.cache.free(req.id)
        req.status, req.finished_at = status, self.clock()

    def _record(self, now: float, batch: list[tuple[Request, int]], decodes: int) -> None:
        prefill = sum(n for _, n in batch) - decodes  # prompt tokens, and tokens recomputed after a preemption
        self.prefill_computed += prefill
        used = self.cache.allocator.num_used
        self.history.append(StepRecord(now, [r.id for r, _ in batch], prefill, decodes, used,
                                       self.cache.used_tokens(), used * self.bytes_per_block(),
                                       self.cache.empty_slots()))
