"""The simulator's per-thread memory counts (:class:`ar_course.kernels.sanitizer.MemoryTraffic`), which chapter
06's checks use to tell a tiled kernel from an untiled one: global reads and writes per argument (views
included), shared-memory reads and allocations, local arrays."""

import numpy as np
import pytest

from ar_course.kernels.env import CUDA_SIMULATOR
from ar_course.kernels.sanitizer import LOCAL, READ, SHARED_READ, WRITE, sanitize
from numba import cuda, float32  # after ar_course.kernels: the simulator is already chosen

pytestmark = pytest.mark.skipif(not CUDA_SIMULATOR, reason="memory traffic is counted in the CUDA simulator")


@cuda.jit
def _row_sums(x, out):
    """Thread t of a 1-D block sums row t of x, reading it through a row view; thread 0 also stages it."""
    t = cuda.threadIdx.x
    stage = cuda.shared.array(4, float32)
    scratch = cuda.local.array(3, float32)
    scratch[0] = 0.0
    row = x[t]
    acc = float32(0.0)
    for c in range(x.shape[1]):
        acc += row[c]
    if t < 4:
        stage[t] = acc
    cuda.syncthreads()
    if t == 0:
        for i in range(4):
            acc += stage[i] * 0
    out[t] = acc


def test_counts_per_thread_and_argument():
    x = np.arange(4 * 5, dtype=np.float32).reshape(4, 5)
    out = np.zeros(4, np.float32)
    with sanitize() as traffic:
        _row_sums[(1,), (4,)](x, out)
    assert traffic.measured and traffic.names == ["x", "out"]
    np.testing.assert_allclose(out, x.sum(1))
    assert traffic.most(READ, 0) == (5, ((0, 0, 0), (0, 0, 0)))  # five elements through the row view
    assert traffic.most(WRITE, 1)[0] == 1 and traffic.most(READ, 1)[0] == 0
    assert traffic.most(SHARED_READ) == (4, ((0, 0, 0), (0, 0, 0)))  # only thread 0 reads the stage
    assert traffic.most(LOCAL)[0] == 3
    assert traffic.shared_elements() == 4
    assert traffic.describe(((0, 0, 0), (3, 0, 0))) == "thread (3,) of block (0,)"


def test_launches_add_up_and_two_dimensional_names():
    @cuda.jit
    def copy2d(a, b):
        i, j = cuda.grid(2)
        if i < a.shape[1] and j < a.shape[0]:
            b[j, i] = a[j, i]

    a = np.ones((3, 2), np.float32)
    b = np.zeros((3, 2), np.float32)
    with sanitize() as traffic:
        copy2d[(1, 2), (2, 2)](a, b)
        copy2d[(1, 2), (2, 2)](a, b)
    assert traffic.most(READ, 0)[0] == 2 and traffic.most(WRITE, 1)[0] == 2
    assert traffic.shared_elements() == 0
    assert traffic.describe(((0, 1, 0), (1, 1, 0))) == "thread (1, 1) of block (0, 1)"
