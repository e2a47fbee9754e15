"""Prefix caching: full blocks of keys and values reused by every request whose tokens start the same way.

A full block is named by a hash of its tokens *and everything before them* (a hash chain), so two requests share
block ``i`` only when their first ``(i + 1) * block_size`` tokens agree: keys and values depend on the whole
prefix, not only on the block's own tokens. :class:`PrefixCache` holds one reference to each block it has seen
(so it outlives its request) and gives blocks back, least recently used first, when the pool runs short.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from ar_course.serving.paged import PagedKVCache
from ar_course.utils import check_int


def prefix_block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """One hash per *full* block of ``tokens``: ``h[i] = hash((h[i-1], tuple(block i)))`` with ``h[-1] = 0``.

    A partly filled last block gets no hash (it will still change). ``len(result) == len(tokens) // block_size``.
    ``block_size``: an integer ``>= 1`` (``TypeError``/``ValueError`` otherwise).
    """
    block_size = check_int("block_size", block_size, lo=1)
    hashes, parent = [], 0
    for i in range(len(tokens) // block_size):
        parent = hash((parent, tuple(int(t) for t in tokens[i * block_size:(i + 1) * block_size])))
        hashes.append(parent)
    return hashes


class PrefixCache:
    """Full blocks of ``cache`` by prefix hash, least recently used first."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.blocks: OrderedDict[int, int] = OrderedDict()  # prefix hash -> block id
        self.hits = 0  # blocks reused by admitted requests so far (the engine counts them)

    def match(self, tokens: Sequence[int], limit: int) -> list[int]:
        """The cached blocks that hold the longest cached prefix of ``tokens``, at most ``limit`` blocks."""
        found = []
        for h in prefix_block_hashes(tokens, self.cache.block_size)[:limit]:
            block = self.blocks.get(h)
            if block is None:
                break
            self.blocks.move_to_end(h)
            found.append(block)
        return found

    def insert(self, tokens: Sequence[int], table: Sequence[int], computed: int) -> None:
        """Remember the full blocks among the first ``computed`` positions of a sequence (``tokens``, its
        block ``table``); a block already cached under the same hash is left as it is."""
        bs = self.cache.block_size
        for i, h in enumerate(prefix_block_hashes(tokens[:computed], bs)):
            if h not in self.blocks:
                self.blocks[h] = self.cache.allocator.share(table[i])

    def evictable(self) -> int:
        """Blocks only this cache holds (freed by :meth:`evict`)."""
        return sum(self.cache.allocator.refs[b] == 1 for b in self.blocks.values())

    def evict(self, n: int) -> int:
        """Free up to ``n`` blocks that no sequence uses, least recently used first; returns how many."""
        freed = 0
        for h in list(self.blocks):
            if freed == n:
                break
            block = self.blocks[h]
            if self.cache.allocator.refs[block] == 1:
                del self.blocks[h]
                self.cache.allocator.release(block)
                freed += 1
        return freed

    def clear(self) -> None:
        """Drop every cached block (the ones sequences still use stay theirs)."""
        for block in self.blocks.values():
            self.cache.allocator.release(block)
        self.blocks.clear()
