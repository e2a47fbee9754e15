"""A paged KV cache: a pool of fixed-size blocks, a block allocator with reference counts, and a block table per
sequence (the memory layout of vLLM's PagedAttention).

* :class:`BlockAllocator` hands out block ids from a free list and counts references; a block returns to the
  free list when its last reference is released. Two sequences (or a sequence and the prefix cache) may hold
  the same block: it is then read-only, and a write goes to a private copy first (copy-on-write).
* :class:`PagedKVCache` owns the pools ``k, v``: ``(n_layer, num_blocks, block_size, H, D)``. Token ``p`` of a
  sequence lives in block ``table[p // block_size]`` at offset ``p % block_size``; its *slot* (its row in the
  pool flattened to ``(num_blocks * block_size, H, D)``) is ``block * block_size + offset``.

Only the last, partly filled block of a sequence ever needs a copy: full blocks are never written again.

With ``merge_from`` (MiniCache, :mod:`.minicache`), each merged pair of layers ``(a, a + 1)`` shares one storage
slot of ``k, v`` (a direction per token and head) and keeps each layer's norm in ``k_norm, v_norm``, so the pools
hold fewer layer slots than the model has layers (:attr:`PagedKVCache.store_index` maps a layer to its slot).

A block that no later query can see (a sinks + window cache) or that H2O gives back (:mod:`.h2o`) is *evicted*
by :meth:`PagedKVCache.evict`: it goes back to the free list and its table entry becomes ``-1``;
:meth:`PagedKVCache.live_positions` lists the positions still stored.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import torch

from ar_course.serving.compression import _check_tensor, merge_pair, merged_pairs, pool_dequantize, pool_quantize
from ar_course.transformer.model import GPT, check_causal
from ar_course.utils import check_ids, check_int


def check_text_model(model: object) -> GPT:
    """``model`` if serving can run it: a causal :class:`~ar_course.transformer.GPT` with no class token (a text
    model; the engine and its plain paths feed token ids only, left to right). Returns ``model``.

    Raises:
        TypeError: ``model`` is not a GPT (e.g. a VAR).
        ValueError: it is class-conditional (``config.n_classes > 0``) or bidirectional (``config.causal`` False).
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a GPT (a text model), got {type(model).__name__}")
    if model.config.n_classes > 0:
        raise ValueError(f"serving feeds no class token and needs an unconditional model; this one has n_classes="
                         f"{model.config.n_classes} (sample it with model.generate(..., classes=...))")
    check_causal(model, "serving")
    return model


def check_tokens(ids: object, vocab_size: int, name: str = "prompt_ids", token: str = "prompt token") -> list[int]:
    """``ids`` (a list of token ids or a 1-D integer tensor ``(T,)``) as a list of ints in ``[0, vocab_size)``:
    the prompt check of :meth:`~.engine.Engine.add_request` and of the plain paths. An empty list passes (the
    callers say how many tokens they need).

    Raises:
        TypeError: ``ids`` is not a list or tensor of integers (``prompt token must be an integer in [0, 9], got
            1.0 (float)``).
        ValueError: a tensor that is not 1-D, or a token outside ``[0, vocab_size)``
            (``prompt token must be an integer in [0, 9], got 99``)."""
    if isinstance(ids, torch.Tensor):
        if ids.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"{name} must be a list of token ids or a 1-D tensor, got {type(ids).__name__}")
    return [check_int(token, t, lo=0, hi=vocab_size - 1) for t in ids]


def slot_mapping(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Pool slots of sequence ``positions`` ``(n,)`` long through ``block_table`` ``(n_blocks,)`` long: position
    ``p`` is at offset ``p % block_size`` of block ``block_table[p // block_size]``, so its slot is
    ``block_table[p // block_size] * block_size + p % block_size``. Returns ``(n,)`` long (for any integer
    dtype of the inputs).

    Raises:
        TypeError: ``block_size`` is not an integer, or ``block_table`` / ``positions`` is not a tensor.
        ValueError: ``block_size < 1``; ``block_table`` or ``positions`` is not a 1-D integer tensor; a position
            outside ``[0, n_blocks * block_size)``, the positions the table holds (one read of the positions' values:
            :meth:`PagedKVCache.slots_at`, the engine's per-step path, checks its own and skips these checks)."""
    block_size = check_int("block_size", block_size, lo=1)
    _check_tensor("block_table", block_table, "(n_blocks,)", 1, kind="integer")
    check_ids("positions", positions, block_table.numel() * block_size, ("n",), dtype=None, allow_empty=True)
    return _slot_mapping(block_table, positions, block_size)


def _slot_mapping(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """:func:`slot_mapping` without its checks (the engine's per-step path, whose callers checked the input)."""
    table, pos = block_table.long(), positions.long()  # any integer dtype: a uint8 product would wrap at 256
    return table[pos // block_size] * block_size + pos % block_size


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than a request for memory needs (the scheduler preempts on it)."""


class BlockAllocator:
    """Free list and reference counts of ``num_blocks`` blocks (ids ``0 .. num_blocks-1``)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = check_int("num_blocks", num_blocks, lo=1)
        self.refs = [0] * self.num_blocks
        self._free: deque[int] = deque(range(self.num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks on the free list."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks with at least one reference (``num_blocks - num_free``)."""
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        """A free block with one reference; :class:`OutOfBlocks` when none is left."""
        if not self._free:
            raise OutOfBlocks(f"all {self.num_blocks} blocks are in use")
        block = self._free.popleft()
        self.refs[block] = 1
        return block

    def share(self, block: int) -> int:
        """One more reference to a block in use (a forked sequence, a cached prefix); returns ``block``."""
        if not 0 <= block < self.num_blocks or self.refs[block] <= 0:
            raise ValueError(f"block {block} is free or evicted: only a block in use can be shared")
        self.refs[block] += 1
        return block

    def release(self, block: int) -> None:
        """Drop one reference; the block is free again when none is left. ``ValueError`` for a block id outside
        ``[0, num_blocks)`` or a block that is free already."""
        check_int("block", block, lo=0, hi=self.num_blocks - 1)
        if self.refs[block] <= 0:
            raise ValueError(f"block {block} is already free (released twice?)")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self._free.append(block)


class PagedKVCache:
    """Keys and values of many sequences in one pool of blocks, addressed through per-sequence block tables.

    ``k``, ``v``: ``(n_layer, num_blocks, block_size, H, D)``. ``tables[seq]``: the sequence's block ids;
    ``lengths[seq]``: how many of its positions hold keys and values. A sequence grows with
    :meth:`reserve` (allocating blocks, copying a shared last block) then :meth:`slots` / :meth:`write`;
    :meth:`read` gives keys and values back; :meth:`free` gives its blocks back.

    ``kv_bits=8`` stores ``k``, ``v`` as uint8 codes with a float16 ``(scale, minimum)`` per token and head
    (``k_stats``, ``v_stats``: ``(n_layer, num_blocks, block_size, H, 2)``): asymmetric min-max quantization over
    the head dimension, written once per token, dequantized on :meth:`read` (``dtype`` is what it returns).
    ``kv_bits=4`` does the same with 4-bit codes, two per byte: ``k``, ``v`` are ``(..., H, D // 2)`` uint8
    (``D`` must be even). Both are :func:`~ar_course.serving.compression.pool_quantize`.

    ``merge_from`` (MiniCache): the layers of :func:`~ar_course.serving.compression.merged_pairs` are stored in
    pairs: ``k, v`` are ``(n_layer - pairs, num_blocks, block_size, H, D)``, a pair's slot holding the merged
    direction, and ``k_norm, v_norm`` ``(2 * pairs, num_blocks, block_size, H)`` each merged layer's norms. A write
    to a pair's first layer is held until the same slots of its second layer are written; then both are merged
    (:func:`~ar_course.serving.compression.merge_pair`) and stored. :meth:`read` of a merged layer gives
    ``direction * norm``. Not combined with ``kv_bits``."""

    def __init__(self, n_layer: int, n_head: int, head_dim: int, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, kv_bits: int | None = None,
                 merge_from: int | None = None):
        for name, value in (("n_layer", n_layer), ("n_head", n_head), ("head_dim", head_dim),
                            ("num_blocks", num_blocks)):
            check_int(name, value, lo=1)
        self.block_size = check_int("block_size", block_size, lo=1)
        if kv_bits not in (None, 8, 4):
            raise ValueError(f"kv_bits must be None (full precision), 8 or 4, got {kv_bits!r}")
        if kv_bits == 4 and head_dim % 2:
            raise ValueError(f"kv_bits=4 packs two codes per byte: head_dim must be even, got {head_dim}")
        if merge_from is not None:
            check_int("merge_from", merge_from, lo=0)
            if kv_bits is not None:
                raise ValueError("merge_from (MiniCache) stores full-precision directions: use it without kv_bits")
        self.allocator = BlockAllocator(num_blocks)
        self.dtype, self.kv_bits, self.merge_from = dtype, kv_bits, merge_from
        pairs = merged_pairs(n_layer, merge_from) if merge_from is not None else []
        self.partner: dict[int, int] = {}  # merged layer -> the other layer of its pair
        for a in pairs:
            self.partner[a], self.partner[a + 1] = a + 1, a
        # layer -> its slot in k, v: a pair's second layer shares its first layer's
        self.store_index = [layer - sum(a < layer for a in pairs) for layer in range(n_layer)]
        self.norm_index = {layer: i for i, layer in enumerate(sorted(self.partner))}  # merged layer -> norm row
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # first layer -> (slots, k, v)
        shape = (n_layer - len(pairs), num_blocks, block_size, n_head, head_dim // 2 if kv_bits == 4 else head_dim)
        store = torch.uint8 if kv_bits else dtype
        self.k = torch.zeros(shape, device=device, dtype=store)
        self.v = torch.zeros(shape, device=device, dtype=store)
        stats = (*shape[:-1], 2) if kv_bits else (shape[0], num_blocks, 0, n_head, 2)
        self.k_stats = torch.zeros(stats, device=device, dtype=torch.float16)
        self.v_stats = torch.zeros(stats, device=device, dtype=torch.float16)
        norms = (2 * len(pairs), num_blocks, block_size, n_head)
        self.k_norm = torch.zeros(norms, device=device, dtype=dtype)
        self.v_norm = torch.zeros(norms, device=device, dtype=dtype)
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.copies = 0  # copy-on-write copies made so far

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_blocks: int, block_size: int, kv_bits: int | None = None,
                  merge_from: int | None = None) -> PagedKVCache:
        """A cache shaped for a :class:`~ar_course.transformer.GPT` on its device and dtype."""
        c, p = model.config, model.wte.weight
        return cls(c.n_layer, c.n_head, c.head_dim, num_blocks, block_size, p.device, p.dtype, kv_bits, merge_from)

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool (used and free)."""
        return self.allocator.num_blocks

    def bytes_per_block(self) -> int:
        """Bytes one block holds over all layers, keys and values (codes and their statistics, merged norms)."""
        per = sum(x[:, 0].numel() * x.element_size() for x in (self.k, self.k_stats, self.k_norm))
        return 2 * per

    def _table(self, seq: int) -> list[int]:
        """The block table of ``seq``; ``ValueError`` when the cache does not hold that sequence."""
        table = self.tables.get(seq)
        if table is None:
            raise ValueError(f"sequence {seq!r} is not in the cache (add it first; it holds {sorted(self.tables)})")
        return table

    def add(self, seq: int, shared: list[int] | None = None, length: int = 0) -> None:
        """Start sequence ``seq`` on the blocks ``shared`` (a reference is taken on each) holding ``length``
        positions (an integer ``>= 0``, e.g. a cached prefix); default: empty."""
        if seq in self.tables:
            raise ValueError(f"sequence {seq} is already in the cache")
        length = check_int("length", length, lo=0)
        shared = list(shared or [])
        if length > len(shared) * self.block_size:
            raise ValueError(f"{length} positions do not fit in {len(shared)} blocks of {self.block_size}")
        self.tables[seq] = [self.allocator.share(b) for b in shared]
        self.lengths[seq] = length

    def fork(self, src: int, dst: int) -> None:
        """Sequence ``dst`` starts as a copy of ``src`` sharing all of its blocks (copied when written)."""
        self.add(dst, self._table(src), self.lengths[src])

    def blocks_needed(self, seq: int, n: int) -> int:
        """Blocks :meth:`reserve` ``(seq, n)`` would take from the free list (a new block, or a private copy of a
        shared last block). ``n``: an integer ``>= 0``."""
        table, n = self._table(seq), check_int("n", n, lo=0)
        length = self.lengths[seq]
        new = -(-(length + n) // self.block_size) - len(table)
        partial = length % self.block_size != 0 and n > 0
        cow = partial and self.allocator.refs[table[length // self.block_size]] > 1
        return max(new, 0) + int(cow)

    def reserve(self, seq: int, n: int) -> None:
        """Make room for ``n`` more positions of ``seq``: copy its last block if shared and partly filled, then
        allocate new blocks. All or nothing: :class:`OutOfBlocks` (nothing changed) when the pool is short."""
        need = self.blocks_needed(seq, n)  # checks seq and n
        if need > self.allocator.num_free:
            raise OutOfBlocks(f"sequence {seq} needs {need} blocks, {self.allocator.num_free} are free")
        length, table = self.lengths[seq], self.tables[seq]
        if length % self.block_size and n > 0:
            last = length // self.block_size
            if self.allocator.refs[table[last]] > 1:
                table[last] = self._copy(table[last])
        while len(table) * self.block_size < length + n:
            table.append(self.allocator.allocate())

    def _copy(self, block: int) -> int:
        """A private copy of shared ``block`` (every layer); the shared one loses this reference."""
        new = self.allocator.allocate()
        for pool in (self.k, self.v, self.k_stats, self.v_stats, self.k_norm, self.v_norm):
            pool[:, new] = pool[:, block]
        self.allocator.release(block)
        self.copies += 1
        return new

    def slots(self, seq: int, start: int, n: int) -> torch.Tensor:
        """Flat pool slots of positions ``start .. start+n-1`` of ``seq``: ``(n,)`` long (``start``, ``n``:
        integers ``>= 0``)."""
        start, n = check_int("start", start, lo=0), check_int("n", n, lo=0)
        return self.slots_at(seq, torch.arange(start, start + n))

    def slots_at(self, seq: int, positions: torch.Tensor) -> torch.Tensor:
        """Flat pool slots of ``positions`` ``(n,)`` long of ``seq`` (each in a block that is not evicted)."""
        table = torch.tensor(self._table(seq), dtype=torch.long)
        if positions.numel() and int(positions.max()) >= table.numel() * self.block_size:
            raise ValueError(f"positions up to {int(positions.max()) + 1} of sequence {seq} have no block: "
                             f"reserve them first")
        if positions.numel() and bool((table[positions // self.block_size] < 0).any()):
            raise ValueError(f"some positions of sequence {seq} are in evicted blocks")
        return _slot_mapping(table, positions, self.block_size).to(self.k.device)

    def live_positions(self, seq: int, end: int) -> torch.Tensor:
        """Positions ``< end`` of ``seq`` whose block is not evicted: ``(n,)`` long, ascending."""
        table = torch.tensor(self._table(seq), dtype=torch.long)
        positions = torch.arange(end)  # (end,)
        return positions[table[positions // self.block_size] >= 0]

    def evict(self, seq: int, blocks: Sequence[int]) -> int:
        """Free the blocks at table indices ``blocks`` (ascending) of ``seq`` (they are never read again); already
        evicted ones are skipped. Only full blocks (indices below ``lengths[seq] // block_size``) can be evicted:
        ``ValueError`` otherwise. Returns how many were freed."""
        table, freed = self._table(seq), 0
        if blocks and blocks[-1] >= self.lengths[seq] // self.block_size:
            raise ValueError(f"block {blocks[-1]} of sequence {seq} is not full: only full blocks can be evicted")
        for i in blocks:
            if table[i] >= 0:
                self.allocator.release(table[i])
                table[i], freed = -1, freed + 1
        return freed

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v`` ``(n, H, D)`` of ``layer`` at pool ``slots`` ``(n,)`` (quantized when ``kv_bits``; the
        first layer of a merged pair is held until its partner's are written, then the pair is merged)."""
        if layer in self.partner:
            self._write_merged(layer, slots, k, v)
            return
        for pool, stats, x in ((self.k, self.k_stats, k), (self.v, self.v_stats, v)):
            rows = pool[self.store_index[layer]].view(-1, *pool.shape[-2:])  # (num_blocks * bs, H, D or D // 2)
            if self.kv_bits is None:
                rows[slots] = x.to(pool.dtype)
                continue
            codes, scale_lo = pool_quantize(x, self.kv_bits)  # (n, H, D or D // 2), (n, H, 2)
            rows[slots] = codes
            stats[self.store_index[layer]].view(-1, *stats.shape[-2:])[slots] = scale_lo

    def _write_merged(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """A merged layer's write: hold the first layer's ``k, v`` ``(n, H, D)``; with the second layer's, store
        the pair's directions and both layers' norms at ``slots``."""
        first = min(layer, self.partner[layer])
        if layer == first:
            self._held[first] = (slots, k, v)
            return
        held = self._held.pop(first, None)
        if held is None or not torch.equal(held[0], slots):
            raise ValueError(f"layers {first} and {layer} are merged: write layer {first} first, at the same slots")
        for pool, norms, xa, xb in ((self.k, self.k_norm, held[1], k), (self.v, self.v_norm, held[2], v)):
            direction, norm_a, norm_b = merge_pair(xa, xb)  # (n, H, D), (n, H), (n, H)
            pool[self.store_index[layer]].view(-1, *pool.shape[-2:])[slots] = direction.to(pool.dtype)
            for i, norm in ((self.norm_index[first], norm_a), (self.norm_index[layer], norm_b)):
                norms[i].view(-1, norms.shape[-1])[slots] = norm.to(norms.dtype)  # (num_blocks * bs, H)

    def is_merged(self, layer: int) -> bool:
        """Whether ``layer`` shares its storage with another (MiniCache)."""
        return layer in self.partner

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``layer`` at pool ``slots`` ``(n,)``: each ``(n, H, D)`` in ``dtype`` (a merged
        layer: the pair's direction times the layer's norm)."""
        out = []
        for pool, stats, norms in ((self.k, self.k_stats, self.k_norm), (self.v, self.v_stats, self.v_norm)):
            x = pool[self.store_index[layer]].view(-1, *pool.shape[-2:])[slots]  # (n, H, D or D // 2)
            if self.kv_bits is not None:
                s = stats[self.store_index[layer]].view(-1, *stats.shape[-2:])[slots]  # (n, H, 2)
                x = pool_dequantize(x, s, self.kv_bits, self.dtype)  # (n, H, D)
            if layer in self.partner:
                x = x * norms[self.norm_index[layer]].view(-1, norms.shape[-1])[slots][..., None]  # (n, H, D)
            out.append(x.to(self.dtype))  # with kv_bits: compression.pool_fake_quantize of what was written
        return out[0], out[1]

    def advance(self, seq: int, n: int) -> None:
        """Mark ``n`` (an integer ``>= 0``) more positions of ``seq`` written (on every layer)."""
        table, n = self._table(seq), check_int("n", n, lo=0)
        if self.lengths[seq] + n > len(table) * self.block_size:
            raise ValueError(f"sequence {seq} has no room for {n} more positions")
        self.lengths[seq] += n

    def free(self, seq: int) -> None:
        """Forget ``seq``: release every block of its table."""
        self._table(seq)
        for block in self.tables.pop(seq):
            if block >= 0:  # evicted blocks were released already
                self.allocator.release(block)
        del self.lengths[seq]

    def block_table(self, seq: int) -> list[int]:
        """A copy of ``seq``'s block ids (``-1`` for an evicted block); ``ValueError`` for an unknown ``seq``."""
        return list(self._table(seq))

    def empty_slots(self) -> int:
        """Slots of the blocks in use that hold no position: a block shared by several sequences counts once, with
        the positions of the sequence that fills it furthest; a block only a prefix cache holds is full."""
        filled: dict[int, int] = {}  # block id -> slots written
        for seq, table in self.tables.items():
            for i, block in enumerate(table):
                if block >= 0:  # not evicted
                    written = min(max(self.lengths[seq] - i * self.block_size, 0), self.block_size)
                    filled[block] = max(filled.get(block, 0), written)
        return sum(self.block_size - n for n in filled.values())

    def used_tokens(self) -> int:
        """Positions held by all sequences, evicted ones not counted (a block shared by several counts once per
        sequence)."""
        evicted = sum(b < 0 for table in self.tables.values() for b in table)
        return sum(self.lengths.values()) - evicted * self.block_size
