"""Chapter 09 reference that the library does not call.

* :func:`admit` -- exercise 9.3: the engine's admission rule (:func:`ar_course.serving.admits`) applied to a
  whole queue at once. The engine applies it one request at a time, because with prefix caching a request's
  need is only known once its prefix has been matched.
"""

from __future__ import annotations

from ar_course.serving.engine import admits


def admit(needs: list[int], free_blocks: int, num_running: int, max_running: int) -> int:
    """How many requests at the head of the queue to admit, first come first served.

    ``needs[i]``: blocks the ``i``-th waiting request needs now; ``free_blocks``: free blocks in the pool;
    ``num_running``: sequences already in the batch; ``max_running``: the batch limit. A request is admitted
    while the batch has room and its blocks fit in the free blocks minus one block kept for the next decode
    token of every sequence in the batch (the ones admitted so far included); the first that does not fit
    stops admission (no overtaking)."""
    admitted = 0
    for need in needs:
        if not admits(need, free_blocks, num_running + admitted, max_running):
            break
        free_blocks -= need
        admitted += 1
    return admitted
