"""ar_course.kernels on CPU: numba.cuda kernels in the CUDA simulator, the numba CPU search, the masks, the
sanitizer and the torch-facing wrappers, each against plain torch on random inputs with odd sizes."""

import hashlib
import json
import math
import os
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import ar_course.kernels as K
from ar_course.kernels import cuda_attention as ka
from ar_course.kernels import cuda_basic as kb
from ar_course.kernels import cuda_softmax as ks
from ar_course.kernels import cuda_vq as kv
from ar_course.kernels import calibrate, cpu_vq, env, masks, ops
from ar_course.kernels.calibrate import Calibrator, default_cache_path, software_section
from ar_course.kernels.cpu_vq import vq_nearest_cpu
from ar_course.kernels.launch import as_kernel_array, cdiv, float32_input, launch, pow2_at_least
from ar_course.kernels.masks import BlockCausal, dense_mask, prefix_lengths
from ar_course.kernels.precision import compute_dtype
from ar_course.kernels.sanitizer import SanitizerError, sanitize
from ar_course.transformer.functional import causal_mask
from ar_course.transformer.model import GPT, GPTConfig, set_attention
from numba import cuda, float32

needs_sim = pytest.mark.skipif(not env.CUDA_SIMULATOR, reason="runs numba.cuda kernels in the CUDA simulator")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def vq_data(n: int, k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors near random codes, with code 3 repeated as the last code so that some rows tie exactly."""
    g = gen(seed)
    c = torch.randn(k, d, generator=g)
    c[-1] = c[3]
    z = c[torch.randint(0, k, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    z[::4] = c[3] + 0.01 * torch.randn(len(z[::4]), d, generator=g)
    return z, c


def exact_nearest(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((z.double()[:, None] - c.double()[None]) ** 2).sum(-1).argmin(1)


# environment --------------------------------------------------------------------------------------------


def test_without_a_gpu_the_simulators_are_the_default():
    if env.CUDA_AVAILABLE:
        pytest.skip("a GPU is present")
    assert env.CUDA_SIMULATOR and env.NUMBA_CUDA_USABLE
    assert os.environ["NUMBA_ENABLE_CUDASIM"] == "1"
    assert "simulator" in K.describe()


def test_package_imports_and_falls_back_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, ar_course.kernels as K, ar_course.checks.ch06\n"
        "assert not K.env.TRITON_INSTALLED and 'not installed' in K.describe()\n"
        "z, c = torch.randn(9, 4), torch.randn(5, 4)\n"
        "assert torch.equal(K.vq_nearest(z, c), torch.cdist(z, c).argmin(1))\n"
        "try:\n    K.flash_attention(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), "
        "backend='triton')\nexcept RuntimeError as e:\n    assert 'not installed' in str(e); print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_a_user_setting_is_kept():
    code = ("import os; os.environ['TRITON_INTERPRET'] = '0'\n"
            "import ar_course.kernels as K; print(os.environ['TRITON_INTERPRET'], K.env.triton_interpreted())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["0", "False"], res.stderr


@pytest.mark.parametrize("value", ["true", "On", "yes"])
def test_triton_interpret_accepts_the_usual_true_words(monkeypatch, value):
    """TRITON_INTERPRET=true / On / yes turns the interpreter on, not only TRITON_INTERPRET=1."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert env.triton_interpreted()


def test_describe_says_numba_is_unusable_where_numba_cuda_cannot_run(monkeypatch):
    """numba installed, no simulator and no usable GPU: describe() must say "unusable", never "GPU"."""
    monkeypatch.setattr(env, "NUMBA_INSTALLED", True)
    monkeypatch.setattr(env, "CUDA_SIMULATOR", False)
    monkeypatch.setattr(env, "NUMBA_CUDA_USABLE", False)
    assert "numba.cuda kernels: unusable" in env.describe()


def test_installed_is_false_for_a_module_without_a_spec(monkeypatch):
    """A module in sys.modules whose __spec__ is None makes find_spec raise ValueError: _installed says
    "not installed" instead of failing the import of ar_course.kernels."""
    fake = types.ModuleType("ar_course_fake_pkg")
    fake.__spec__ = None
    monkeypatch.setitem(sys.modules, "ar_course_fake_pkg", fake)
    assert env._installed("ar_course_fake_pkg") is False


# masks --------------------------------------------------------------------------------------------------


def test_block_causal_mask():
    m = BlockCausal((1, 2, 3))
    assert m.kv_len().tolist() == [1, 3, 3, 6, 6, 6]
    dense = m.dense()
    assert dense.shape == (6, 6) and dense[1].tolist() == [True, True, True, False, False, False]
    assert torch.equal(dense, dense_mask(m, 6, 6, "cpu"))


def test_prefix_lengths_of_every_mask_kind():
    assert prefix_lengths(None, 4, 4, "cpu") is None
    assert prefix_lengths("causal", 4, 4, "cpu").tolist() == [1, 2, 3, 4]
    assert prefix_lengths("causal", 3, 5, "cpu").tolist() == [3, 4, 5]  # the last 3 of 5 positions (a KV cache)
    assert torch.equal(dense_mask("causal", 3, 5, "cpu"), causal_mask(3, 5))
    assert torch.equal(dense_mask("causal", 5, 5, "cpu"), torch.ones(5, 5, dtype=torch.bool).tril())
    dense = BlockCausal((2, 3)).dense()
    assert prefix_lengths(dense, 5, 5, "cpu").tolist() == [2, 2, 5, 5, 5]  # a prefix-shaped bool tensor


@pytest.mark.parametrize("mask, t_q, t_k, fragment", [
    ("causal", 5, 3, "no more queries than keys"),
    ("causal", 5, 4, "no more queries than keys"),  # one query too many is refused as well
    ("diagonal", 3, 3, "unknown mask"),
    (BlockCausal((2, 2)), 5, 5, "covers 4"),
    (BlockCausal((1, 3)), 4, 5, "covers 4 positions, but T_q=4, T_k=5"),  # block-causal needs T_q == T_k
    (torch.ones(3, 3), 3, 3, "bool"),
    (torch.ones(3, 4, dtype=torch.bool), 3, 3, "shape"),
    (torch.eye(3, dtype=torch.bool), 3, 3, "not a prefix"),
    (torch.tensor([[True, False], [False, False]]), 2, 2, "at least one key"),
])
def test_bad_masks_raise(mask, t_q, t_k, fragment):
    with pytest.raises(ValueError, match=fragment):
        prefix_lengths(mask, t_q, t_k, "cpu")


def test_block_causal_needs_positive_lengths():
    with pytest.raises(ValueError, match="positive"):
        BlockCausal((2, 0))


def test_block_causal_kv_len_is_int32_block_ends():
    """The kernels take int32 prefix lengths: each query sees up to the end of its own block."""
    kv = BlockCausal((1, 4, 2)).kv_len()
    assert kv.dtype == torch.int32 and kv.tolist() == [1, 5, 5, 5, 5, 7, 7]


def test_values_are_not_readable_inside_a_compile_trace(monkeypatch):
    """Inside a torch.compile trace no tensor value may be read back on the host, even on the CPU."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert masks.values_readable(torch.device("cpu")) is False


def test_a_dense_mask_is_taken_unchecked_where_values_cannot_be_read(monkeypatch):
    """Where values cannot be read (a capture, a compile trace), a dense mask's rows are taken to be prefixes
    without the host sync that would check them."""
    monkeypatch.setattr(masks, "values_readable", lambda device: False)
    mask = torch.tensor([[True, False, True], [True, True, False]])  # not prefixes: nobody may look
    assert masks._dense_to_prefix(mask).tolist() == [2, 2]


# numba.cuda kernels in the simulator --------------------------------------------------------------------


@needs_sim
def test_map_kernels():
    g = gen(0)
    x, y = torch.randn(301, generator=g), torch.randn(301, generator=g)
    torch.testing.assert_close(kb.axpy(-1.5, x, y, threads=64), -1.5 * x + y)
    z, c = torch.randn(37, 5, generator=g), torch.randn(19, 5, generator=g)
    torch.testing.assert_close(kb.pairwise_sqdist(z, c, block=8), K.reference.pairwise_sqdist_reference(z, c))


@needs_sim
def test_block_sum_and_tiled_matmul():
    g = gen(1)
    x = torch.randn(333, generator=g)
    torch.testing.assert_close(kb.block_sum(x, threads=32), x.sum(), atol=1e-4, rtol=1e-5)
    a, b = torch.randn(21, 19, generator=g), torch.randn(19, 13, generator=g)
    torch.testing.assert_close(kb.matmul(a, b, tile=8), a @ b, atol=1e-5, rtol=1e-5)


@needs_sim
@pytest.mark.parametrize("rows, cols, scale", [(5, 45, 3.0), (3, 7, 1.0), (2, 70, 80.0)])
def test_online_softmax_kernel(rows, cols, scale):
    x = torch.randn(rows, cols, generator=gen(2)) * scale
    torch.testing.assert_close(ks.softmax(x, threads=16), torch.softmax(x, -1), atol=1e-6, rtol=1e-5)


@needs_sim
def test_vq_kernel_matches_exact_search_with_ties():
    z, c = vq_data(70, 23, 6, seed=3)
    got = kv.vq_nearest_numba(z, c, threads=32)
    assert torch.equal(got, exact_nearest(z, c))
    assert (got[::4] == 3).all()  # exact ties go to the lower index


@needs_sim
@pytest.mark.parametrize("mask", [None, "causal", BlockCausal((1, 4, 9, 16, 7))], ids=["none", "causal", "block"])
def test_flash_attention_kernel(mask):
    g = gen(4)
    q, k, v = (torch.randn(1, 2, 37, 8, generator=g) for _ in range(3))
    kv_len = prefix_lengths(mask, 37, 37, "cpu")
    got = ka.flash_attention_numba(q, k, v, kv_len, 0.4, block_m=16, block_n=16)
    torch.testing.assert_close(got, K.attention_reference(q, k, v, mask, scale=0.4), atol=1e-5, rtol=1e-5)


@needs_sim
def test_flash_attention_kernel_with_fewer_queries_than_keys():
    g = gen(5)
    q = torch.randn(1, 1, 7, 8, generator=g)
    k, v = torch.randn(1, 1, 40, 8, generator=g), torch.randn(1, 1, 40, 8, generator=g)
    kv_len = torch.arange(34, 41, dtype=torch.int32)  # the last 7 positions of a causal 40-token sequence
    full = K.attention_reference(torch.cat([torch.zeros(1, 1, 33, 8), q], 2), k, v, "causal")
    got = ka.flash_attention_numba(q, k, v, kv_len, 1 / math.sqrt(8), block_m=16, block_n=16)
    torch.testing.assert_close(got, full[:, :, 33:], atol=1e-5, rtol=1e-5)


@needs_sim
def test_decode_kernels_ignore_the_cache_past_each_length():
    g = gen(6)
    q = torch.randn(2, 3, 8, generator=g)
    k_cache, v_cache = torch.randn(2, 3, 50, 8, generator=g), torch.randn(2, 3, 50, 8, generator=g)
    lengths = torch.tensor([50, 17])
    k_cache[1, :, 17:] = float("nan")  # never written
    v_cache[1, :, 17:] = float("nan")
    got = ka.decode_attention_numba(q, k_cache, v_cache, lengths, 1 / math.sqrt(8), chunk=16)
    torch.testing.assert_close(got, K.decode_attention_reference(q, k_cache, v_cache, lengths), atol=1e-5, rtol=1e-5)


@needs_sim
def test_decode_attention_is_the_last_row_of_causal_attention():
    g = gen(7)
    q, k, v = (torch.randn(1, 2, 29, 8, generator=g) for _ in range(3))
    full = K.flash_attention(q, k, v, "causal", backend="numba")
    last = K.decode_attention(q[:, :, -1], k, v, 29, backend="numba")
    torch.testing.assert_close(last, full[:, :, -1], atol=1e-5, rtol=1e-5)


# the sanitizer ------------------------------------------------------------------------------------------


@cuda.jit
def _shift_left(x, out):
    buf = cuda.shared.array(16, float32)
    t = cuda.threadIdx.x
    buf[t] = x[t]
    out[t] = buf[(t + 1) % 16]  # reads a neighbour's slot with no barrier in between


@cuda.jit
def _shared_past_the_end(x, out):
    buf = cuda.shared.array(16, float32)
    t = cuda.threadIdx.x
    buf[t + 1] = x[t]


@needs_sim
@pytest.mark.parametrize("kernel, error, fragment", [
    (_shift_left, SanitizerError, "missing cuda.syncthreads"),
    (_shared_past_the_end, IndexError, "out of bounds"),
])
def test_sanitizer_finds_bugs_the_plain_simulator_lets_through(kernel, error, fragment):
    x, out = np.arange(16, dtype=np.float32), np.zeros(16, dtype=np.float32)
    with sanitize(), pytest.raises(error, match=fragment):
        kernel[1, 16](x, out)
    if kernel is _shift_left:  # without the sanitizer this race can go unnoticed
        kernel[1, 16](x, out)


@cuda.jit
def _ordered_race(x, out, flag, reader_first, initialised):
    """Thread 0 reads buf[1], thread 1 writes it, with no barrier between them; a spin on a global flag
    forces which of the two goes first (bounded, since the sanitizer may stop the first one)."""
    buf = cuda.shared.array(2, float32)
    t = cuda.threadIdx.x
    if initialised:
        buf[t] = 0.0
        cuda.syncthreads()
    if t == 0:
        if not reader_first:
            for _ in range(1_000_000):
                if flag[0] == 1:
                    break
        out[0] = buf[1]
        flag[0] = 1
    else:
        if reader_first:
            for _ in range(1_000_000):
                if flag[0] == 1:
                    break
        buf[1] = x[0]
        flag[0] = 1


@needs_sim
@pytest.mark.parametrize("initialised", [False, True])
@pytest.mark.parametrize("reader_first", [False, True])
def test_sanitizer_report_does_not_depend_on_which_thread_runs_first(reader_first, initialised):
    x, out, flag = np.ones(1, np.float32), np.zeros(1, np.float32), np.zeros(1, np.int32)
    with sanitize(), pytest.raises(SanitizerError, match="missing cuda.syncthreads") as err:
        _ordered_race[1, 2](x, out, flag, reader_first, initialised)
    # the message names the order it saw: a read of an unwritten slot, a read after the write, an overwrite
    seen = {(False, False): "which thread (1, 0, 0) wrote", (False, True): "which thread (1, 0, 0) wrote",
            (True, False): "before any thread", (True, True): "overwrote"}[reader_first, initialised]
    assert seen in str(err.value)


@needs_sim
def test_sanitizer_accepts_correct_kernels():
    with sanitize():
        x = torch.randn(100, generator=gen(8))
        torch.testing.assert_close(kb.block_sum(x, threads=32), x.sum(), atol=1e-4, rtol=1e-5)


# numba on the CPU ---------------------------------------------------------------------------------------


def test_cpu_vq_matches_exact_search():
    z, c = vq_data(2000, 300, 32, seed=9)
    got = vq_nearest_cpu(z, c)
    assert got.dtype == torch.int64 and (got[::4] == 3).all()
    assert torch.equal(got, exact_nearest(z, c))


def test_cpu_vq_compiles_without_a_cache_where_numba_cannot_write_one(monkeypatch):
    """A read-only install with no writable home: numba's cache=True raised at import ("no locator available"),
    so numba_cpu could not run at all (checked by hand with a read-only bind mount of the package). The kernel
    is then compiled in each process instead."""
    calls = []

    def fake_njit(**options):
        calls.append(options)
        if options.get("cache"):
            raise RuntimeError("cannot cache function '_nearest': no locator available for file 'cpu_vq.py'")
        return lambda fn: ("compiled", fn)

    monkeypatch.setattr(cpu_vq, "njit", fake_njit)
    assert cpu_vq._jit(len) == ("compiled", len)
    assert calls == [{"parallel": True, "fastmath": True, "cache": True}, {"parallel": True, "fastmath": True}]


def test_cpu_vq_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        vq_nearest_cpu(torch.randn(3, 2), torch.randn(0, 2))
    with pytest.raises(ValueError, match="need z"):
        vq_nearest_cpu(torch.randn(3, 2), torch.randn(4, 3))


# the wrappers -------------------------------------------------------------------------------------------


def test_auto_backend_on_cpu():
    cpu = torch.device("cpu")
    assert K.select_backend("flash_attention", cpu) == "torch"
    assert K.select_backend("vq_nearest", cpu, large=True) == "numba_cpu"
    assert K.select_backend("vq_nearest", cpu, large=False) == "torch"
    with pytest.raises(ValueError, match="no backend"):
        K.select_backend("flash_attention", cpu, "numba_cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        K.select_backend("vq_nearest", cpu, "cuda")


def test_vq_nearest_every_backend_agrees():
    z, c = vq_data(60, 17, 5, seed=10)
    expected = exact_nearest(z, c)
    for backend in ("auto", "torch", "numba_cpu") + (("numba",) if env.CUDA_SIMULATOR else ()):
        assert torch.equal(K.vq_nearest(z, c, backend=backend), expected), backend
    batched = K.vq_nearest(z.reshape(3, 4, 5, 5), c)
    assert batched.shape == (3, 4, 5) and torch.equal(batched.reshape(-1), expected)


def test_vq_nearest_validates():
    with pytest.raises(ValueError, match="end in D=4"):
        K.vq_nearest(torch.randn(3, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="floating-point"):
        K.vq_nearest(torch.ones(3, 4, dtype=torch.long), torch.randn(2, 4))


@needs_sim
@pytest.mark.parametrize("mask", [None, "causal", BlockCausal((1, 4, 9, 7))], ids=["none", "causal", "block"])
def test_flash_attention_kernel_path_equals_torch_path(mask):
    g = gen(11)
    q, k, v = (torch.randn(2, 2, 21, 8, generator=g) for _ in range(3))
    expected = K.flash_attention(q, k, v, mask, backend="torch")
    torch.testing.assert_close(K.flash_attention(q, k, v, mask, backend="numba"), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(K.flash_attention(q, k, v, mask), expected)  # auto: torch on CPU
    torch.testing.assert_close(expected, K.attention_reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_flash_attention_arbitrary_mask_runs_on_torch():
    g = gen(12)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    mask = torch.rand(6, 6, generator=g) > 0.5
    mask[:, 0] = True
    mask[0, 1] = True  # row 0 is no prefix
    torch.testing.assert_close(K.flash_attention(q, k, v, mask), K.attention_reference(q, k, v, mask))
    with pytest.raises(ValueError, match="not a prefix"):
        K.flash_attention(q, k, v, mask, backend="numba")


def test_flash_attention_validates():
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        K.flash_attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="need q"):
        K.flash_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 5))


@needs_sim
def test_decode_attention_kernel_path_equals_torch_path():
    g = gen(13)
    q = torch.randn(3, 2, 8, generator=g)
    k_cache, v_cache = torch.randn(3, 2, 40, 8, generator=g), torch.randn(3, 2, 40, 8, generator=g)
    lengths = torch.tensor([40, 9, 1])
    k_cache[2, :, 1:] = float("nan")
    v_cache[2, :, 1:] = float("nan")
    expected = K.decode_attention(q, k_cache, v_cache, lengths, backend="torch")
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(K.decode_attention(q, k_cache, v_cache, lengths, backend="numba"), expected,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expected, K.decode_attention_reference(q, k_cache, v_cache, lengths),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("length, fragment", [(0, "1..T_max"), (41, "1..T_max"), (torch.tensor([3, 4]), r"\(B,\)")])
def test_decode_attention_validates(length, fragment):
    q, cache = torch.randn(3, 2, 8), torch.randn(3, 2, 40, 8)
    with pytest.raises(ValueError, match=fragment):
        K.decode_attention(q, cache, cache, length)


@needs_sim
def test_softmax_wrapper_paths_agree():
    x = torch.randn(2, 3, 37, generator=gen(14), dtype=torch.float64) * 5
    expected = torch.softmax(x, -1)
    torch.testing.assert_close(K.softmax(x), expected)
    got = K.softmax(x, backend="numba")
    assert got.dtype == torch.float64 and got.shape == x.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_a_failing_kernel_falls_back_to_torch_under_auto(monkeypatch):
    def broken(z, codebook):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpu_vq, "vq_nearest_cpu", broken)
    monkeypatch.setattr(ops, "_FAILED", {})
    z, c = vq_data(400, 300, 4, seed=15)  # large enough for numba_cpu under "auto"
    with pytest.raises(RuntimeError, match="no compiler"):
        K.vq_nearest(z, c, backend="numba_cpu")
    with K.record_dispatch() as ran, pytest.warns(RuntimeWarning, match="numba_cpu kernel failed"):
        got = K.vq_nearest(z, c)
    assert torch.equal(got, exact_nearest(z, c))
    assert ran.summary() == {"vq_nearest": "torch",
                             "fallbacks": ["numba_cpu vq_nearest: RuntimeError: no compiler here (used torch)"]}
    with K.record_dispatch() as again:
        K.vq_nearest(z, c)  # that kind of call stays on torch, and says why every time
    assert again.summary() == ran.summary()


def test_the_record_names_what_ran_per_op_with_call_counts():
    z, c = vq_data(400, 300, 4, seed=16)
    q = torch.randn(1, 2, 5, 8)
    with K.record_dispatch() as ran:
        K.vq_nearest(z, c)  # large: numba_cpu
        K.vq_nearest(z[:3], c[:3])  # small: torch
        K.vq_nearest(z[:3], c[:3])
        K.flash_attention(q, q, q, "causal")
        with K.record_dispatch() as inner:  # an inner block collects for itself
            K.decode_attention(q[:, :, 0], q, q, 5)
    assert ran.summary() == {"vq_nearest": "torch x2, numba_cpu x1", "flash_attention": "torch", "fallbacks": []}
    assert ran.backend("decode_attention") == "none" and inner.summary("decode_attention", "softmax") == {
        "decode_attention": "torch", "softmax": "none", "fallbacks": []}
    K.softmax(q)  # outside any block: nothing is recorded, nothing fails


def test_kernels_are_forward_only_so_auto_takes_torch_for_gradients(monkeypatch):
    rule = ops.backend_rule  # as if numba could win here
    monkeypatch.setattr(ops, "backend_rule", lambda op, device_type, why_not, backend="auto", large=False:
                        "numba" if backend == "auto" else rule(op, device_type, why_not, backend, large))
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    with K.record_dispatch() as ran:
        K.flash_attention(q, q, q, "causal").sum().backward()
        K.decode_attention(q[:, :, 0], q, q, 5)
        K.softmax(q).sum().backward()
    assert ran.summary() == {"flash_attention": "torch", "decode_attention": "torch", "softmax": "torch",
                             "fallbacks": []}
    assert q.grad is not None


def test_under_no_grad_auto_may_take_a_kernel_for_inputs_that_require_grad(monkeypatch):
    """Only a gradient that will flow back sends "auto" to torch: under torch.no_grad (inference on a trained
    model's parameters) the kernel may still run."""
    monkeypatch.setattr(ops, "backend_rule", lambda *a, **k: "numba")
    x = torch.randn(2, 3, requires_grad=True)
    with torch.no_grad():
        assert ops._select_forward_only("softmax", torch.device("cpu"), "auto", x) == "numba"
    assert ops._select_forward_only("softmax", torch.device("cpu"), "auto", x) == "torch"


@needs_sim
def test_a_forced_kernel_backend_refuses_inputs_that_need_a_gradient():
    """"auto" switches to torch for gradients; a forced kernel backend raises (its output carried no gradient,
    so a model trained with set_attention(model, "kernels", "numba") never updated its qkv and norm weights), and
    is used as asked under no_grad or for inputs that need none (audit 29)."""
    x = torch.randn(2, 3, requires_grad=True)
    cpu = torch.device("cpu")
    assert ops._select_forward_only("softmax", cpu, "auto", x) == "torch"
    assert ops._select_forward_only("softmax", cpu, "torch", x) == "torch"
    with pytest.raises(ValueError, match=r"^softmax: the numba kernels have no backward pass, and an input "
                                         r"requires grad; use backend='auto' or 'torch' to train"):
        K.softmax(x, backend="numba")
    with torch.no_grad():
        assert ops._select_forward_only("softmax", cpu, "numba", x) == "numba"
    assert ops._select_forward_only("softmax", cpu, "numba", x.detach()) == "numba"

    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    set_attention(model, "kernels", "numba")
    idx = torch.randint(0, 11, (2, 8))
    with pytest.raises(ValueError, match="flash_attention: the numba kernels have no backward pass"):
        model(idx, idx)
    set_attention(model, "kernels", "auto")  # auto trains on torch: every weight gets a gradient
    model(idx, idx)[1].backward()
    assert all(p.grad is not None for p in model.parameters())


@needs_sim
def test_simulated_numba_launches_hold_the_simulation_lock():
    """numba's CUDA simulator keeps process-wide state, so its launches are serialised by the shared lock."""
    assert ops._one_at_a_time("numba") is ops._SIMULATED


def test_auto_on_a_gpu_prefers_triton_then_numba_then_torch():
    """On CUDA, "auto" takes the first usable of Triton, numba, torch, in that order."""
    assert ops.backend_rule("flash_attention", "cuda", lambda b: None) == "triton"
    assert ops.backend_rule("softmax", "cuda", lambda b: None if b != "triton" else "no triton") == "numba"
    assert ops.backend_rule("softmax", "cuda", lambda b: None if b == "torch" else "no") == "torch"


def test_numba_cpu_takes_vq_nearest_from_exactly_cpu_vq_min_pairs():
    """vq_nearest counts as large (numba_cpu under "auto") from CPU_VQ_MIN_PAIRS (rows x codes) pairs on."""
    pytest.importorskip("numba")
    z, c = torch.randn(ops.CPU_VQ_MIN_PAIRS // 256, 4), torch.randn(256, 4)  # exactly CPU_VQ_MIN_PAIRS pairs
    with K.record_dispatch() as ran:
        K.vq_nearest(z, c)
        K.vq_nearest(z[:-1], c)
    assert ran.backend("vq_nearest") == "numba_cpu x1, torch x1"


def test_vq_nearest_torch_path_computes_in_float32_like_the_kernels():
    """The torch path rounds float64 input to float32 as the kernels do, so every backend breaks ties alike."""
    codebook = torch.tensor([[1.0], [1.0 + 1e-12]], dtype=torch.float64)  # one float32 value
    z = torch.tensor([[2.0]], dtype=torch.float64)  # nearer the second code in float64
    assert K.vq_nearest(z, codebook, backend="torch").item() == 0  # float32: a tie, the lowest index


def test_causal_attention_with_fewer_queries_than_keys_on_the_torch_path():
    """With T_q < T_k the queries are the last T_q positions (bottom-right causal mask), not SDPA's is_causal
    (top-left), on the torch path too."""
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    torch.testing.assert_close(K.flash_attention(q, k, v, "causal", backend="torch"),
                               K.attention_reference(q, k, v, "causal"), atol=1e-5, rtol=1e-5)


def test_torch_attention_of_mixed_dtypes_returns_the_query_dtype():
    """Half queries over a float32 cache (autocast's mix): the torch path computes in float32 and returns the
    queries' dtype, as the kernels and the docstring promise, in both attention entry points."""
    g = gen(0)
    q = torch.randn(1, 2, 3, 8, generator=g).half()
    k, v = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    for mask in (None, "causal"):
        out = K.flash_attention(q, k, v, mask, backend="torch")
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), K.attention_reference(q.float(), k, v, mask), atol=2e-3, rtol=0)
    assert K.decode_attention(q[:, :, 0], k, v, 4, backend="torch").dtype == torch.float16


def test_a_failed_kernel_is_listed_once_per_record_however_many_calls(monkeypatch):
    """A kernel that failed is named once in a record's fallbacks, however many calls fell back to torch."""
    monkeypatch.setattr(cpu_vq, "vq_nearest_cpu", lambda z, c: (_ for _ in ()).throw(RuntimeError("no compiler")))
    monkeypatch.setattr(ops, "_FAILED", {})
    z, c = torch.randn(400, 4), torch.randn(300, 4)  # large enough for numba_cpu under "auto"
    with K.record_dispatch() as ran, pytest.warns(RuntimeWarning, match="numba_cpu kernel failed"):
        for _ in range(3):
            K.vq_nearest(z, c)
    assert ran.summary() == {"vq_nearest": "torch",
                             "fallbacks": ["numba_cpu vq_nearest: RuntimeError: no compiler (used torch)"]}


def test_note_dispatch_lists_a_fallback_once_however_many_replays():
    """Each CUDA-graph replay adds the captured record's calls, but its fallbacks only once."""
    captured = ops.DispatchRecord(calls={"softmax": Counter(torch=1)}, fallbacks=["triton softmax: E (used torch)"])
    with K.record_dispatch() as outer:
        for _ in range(3):  # three CUDA-graph replays of one captured step
            ops.note_dispatch(captured)
    assert outer.summary() == {"softmax": "torch", "fallbacks": ["triton softmax: E (used torch)"]}
    assert outer.calls["softmax"]["torch"] == 3


# measured dispatch ---------------------------------------------------------------------------------------


def fake_timer(*seconds: float):
    """A timer that hands out ``seconds`` in order (auto_choice times torch first, then the kernel)."""
    times = iter(seconds)
    return lambda fn: next(times)


@pytest.fixture
def measured(monkeypatch):
    """"auto" treats the CPU like a GPU whose candidate is Triton, and the timer says torch is faster (the
    kernel never runs): every kind of call is measured once, up to 8 of them, each one calibrator entry."""
    rule = ops.backend_rule
    monkeypatch.setattr(ops, "backend_rule", lambda op, device_type, why_not, backend="auto", large=False:
                        "triton" if backend == "auto" else rule(op, device_type, why_not, backend, large))
    monkeypatch.setattr(ops, "_FAILED", {})
    calibrator = Calibrator(timer=fake_timer(*[1.0, 2.0] * 8), path=None, device_types=("cpu",))
    monkeypatch.setattr(ops, "CALIBRATOR", calibrator)
    return calibrator


def test_calibration_keeps_a_kernel_only_when_it_is_faster_by_the_margin(tmp_path):
    from ar_course.kernels.ops import auto_choice

    def choose(key, torch_s, kernel_s, calibrator=None):
        calibrator = calibrator or Calibrator(timer=fake_timer(torch_s, kernel_s), path=None)
        return auto_choice(key, "triton", lambda: None, lambda: None, calibrator)

    assert choose("a", 1.0, 0.5) == "triton"
    assert choose("a", 1.0, 2.0) == "torch"
    assert choose("a", 1.0, 0.96) == "torch"  # within 5% of torch: not clearly faster
    assert choose("a", 1.0, 0.95) == "triton"
    path = tmp_path / "choices.json"
    first = Calibrator(timer=fake_timer(1.0, 0.5, 1.0, 3.0), path=path)
    assert choose("small", 0, 0, first) == "triton" and choose("large", 0, 0, first) == "torch"
    second = Calibrator(timer=fake_timer(), path=path)  # a new process: decided without timing anything
    assert choose("small", 0, 0, second) == "triton" and choose("large", 0, 0, second) == "torch"
    assert second.choices()["small"] == {"backend": "triton", "seconds": {"triton": 0.5, "torch": 1.0}}
    sections = json.loads(path.read_text(encoding="utf-8"))
    assert list(sections) == [software_section()] and "torch " in software_section()
    assert "numba-cuda " in software_section()  # a numba-cuda upgrade measures the numba kernels again


def test_each_kind_of_call_is_measured_separately(measured):
    """The calibration key holds the op's size bucket: another D, mask kind, even or ragged lengths, or dtype is
    another kind of call, measured for itself."""
    z = torch.randn(40, 4)
    K.vq_nearest(z, torch.randn(8, 4))
    K.vq_nearest(torch.randn(40, 8), torch.randn(8, 8))  # another D
    q = torch.randn(1, 2, 8, 16)
    K.flash_attention(q, q, q)
    K.flash_attention(q, q, q, "causal")  # another mask kind
    cache = torch.randn(2, 2, 8, 16)
    K.decode_attention(q[:, :, 0].expand(2, 2, 16), cache, cache, 8)
    K.decode_attention(q[:, :, 0].expand(2, 2, 16), cache, cache, torch.tensor([8, 8]))  # ragged lengths
    K.softmax(torch.randn(3, 5))
    K.softmax(torch.randn(3, 5, dtype=torch.float64))  # another dtype
    keys = list(measured.choices())
    assert len(keys) == 8, keys  # no bucket at all would give 4


def test_where_nothing_can_be_timed_an_undecided_call_runs_torch(measured, monkeypatch):
    """Inside a CUDA-graph capture or a compile trace nothing can be timed: a kind of call not decided yet runs
    torch, never the unmeasured kernel, and records no decision."""
    monkeypatch.setattr(ops, "values_readable", lambda device: False)
    with K.record_dispatch() as ran:
        K.softmax(torch.randn(3, 5))
    assert ran.summary() == {"softmax": "torch", "fallbacks": []} and measured.choices() == {}


@pytest.mark.parametrize("section", [["triton"], {"k": "triton"}, {"k": {}}, {"k": {"backend": "triton"}}, 7,
                                     {"k": {"backend": "cuda-magic", "seconds": {"triton": 1.0, "torch": 2.0}}},
                                     {"k": {"backend": "numba", "seconds": {"triton": 1.0, "torch": 2.0}}}])
def test_calibration_measures_again_past_a_malformed_cache_file(tmp_path, section):
    """A cache file that is JSON but not what this version writes (edited by hand, another version) counts as
    no decision: the call is measured again and the file rewritten, never an AttributeError inside dispatch."""
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({software_section(): section}))
    calibrator = Calibrator(timer=fake_timer(), path=path)
    assert calibrator.lookup("k") is None and calibrator.choices() == {}
    assert calibrator.decide("k", "triton", 1.0, 2.0) == "triton"
    assert Calibrator(timer=fake_timer(), path=path).lookup("k") == "triton"


def test_calibration_without_a_writable_cache_keeps_its_decisions_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    calibrator = Calibrator(timer=fake_timer(), path=blocker / "choices.json")  # a file where a folder must be
    with pytest.warns(RuntimeWarning, match="for this process only"):
        assert calibrator.decide("k", "triton", 1.0, 2.0) == "triton"
    assert calibrator.lookup("k") == "triton" and calibrator.path is None


def test_the_default_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "ar_course" / "kernel_choices.json"


def test_the_section_digest_covers_the_kernels_source():
    """The cache section's digest hashes the kernels' source, not only their file names: an edited kernel is
    measured again."""
    sources = sorted(Path(calibrate.__file__).parent.glob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    assert software_section().endswith(f"kernels {digest}")


def test_a_half_written_cache_file_is_measured_again(tmp_path):
    """A cache file that is not valid JSON (a half-written save) counts as no decision, never an error."""
    path = tmp_path / "choices.json"
    path.write_text('{"torch 2.')
    calibrator = Calibrator(timer=lambda fn: 1.0, path=path)
    assert calibrator.lookup("k") is None
    assert calibrator.decide("k", "triton", 1.0, 2.0) == "triton"
    assert Calibrator(path=path).lookup("k") == "triton"


def test_two_processes_sharing_the_cache_file_keep_each_others_decisions(tmp_path):
    """Saving merges with what the file holds now: a decision another process wrote meanwhile is kept."""
    path = tmp_path / "choices.json"
    a, b = Calibrator(path=path), Calibrator(path=path)
    assert a.lookup("x") is None and b.lookup("y") is None  # both loaded the (empty) file
    b.decide("y", "triton", 1.0, 2.0)
    a.decide("x", "triton", 1.0, 2.0)
    fresh = Calibrator(path=path)
    assert fresh.lookup("x") == "triton" and fresh.lookup("y") == "triton"


# launch helpers, precision and the reference -------------------------------------------------------------


def test_cdiv_is_ceiling_division():
    assert [cdiv(a, 32) for a in (1, 31, 32, 33, 64, 65)] == [1, 1, 1, 2, 2, 3]


def test_pow2_at_least_keeps_powers_of_two():
    assert [pow2_at_least(n) for n in (0, 1, 2, 3, 4, 5, 64, 65)] == [1, 1, 2, 4, 4, 8, 64, 128]


def test_float32_input_checks_axes():
    """A kernel input with the wrong number of axes is refused before launch; the right one becomes float32."""
    with pytest.raises(ValueError, match="z must be 2-D"):
        float32_input(torch.ones(3), 2, "z")
    assert float32_input(torch.ones(2, 3, dtype=torch.float64), 2, "z").dtype == torch.float32


@pytest.mark.skipif(not env.NUMBA_CUDA_USABLE, reason="launch needs numba.cuda (a GPU or the simulator)")
def test_a_grid_without_blocks_launches_nothing():
    """An empty input gives a grid with no blocks: launch returns without launching (a GPU refuses such a launch)."""

    class Kernel:
        def __getitem__(self, config):
            raise AssertionError(f"launched with {config}")

    launch(Kernel(), (0,), (32,), torch.zeros(0))
    launch(Kernel(), (2, 0), (32, 4), torch.zeros(0, 3))


def test_kernel_arrays_must_be_contiguous():
    """A non-contiguous tensor is refused: a kernel would index its memory as if it were contiguous."""
    with pytest.raises(ValueError, match="contiguous"):
        as_kernel_array(torch.ones(4, 4).t())


def test_compute_dtype_promotes_and_rounds_float64_to_float32():
    """The kernels compute in the promoted dtype of all their inputs, with float64 rounded to float32."""
    f16, bf16, f32, f64 = (torch.ones(1, dtype=d)
                           for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    assert compute_dtype(f64, f64) == torch.float32
    assert compute_dtype(bf16, f32, f32) == torch.float32
    assert compute_dtype(f16, bf16) == torch.float32
    assert compute_dtype(f16, f16) == torch.float16


def test_compute_dtype_follows_autocast_only_for_a_half_dtype():
    """Under autocast the products run in its half dtype; an autocast set to a dtype that is not half (float32,
    which torch.set_autocast_dtype allows) is ignored and the inputs' promoted dtype is used."""
    f16, f32 = torch.ones(1, dtype=torch.float16), torch.ones(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(f32, f32) == torch.bfloat16
        torch.set_autocast_dtype("cpu", torch.float32)  # restored when the autocast block exits
        assert torch.is_autocast_enabled("cpu") and compute_dtype(f16, f16) == torch.float16


def test_attention_reference_uses_its_scale():
    """The reference takes a scale other than 1/sqrt(D) (checked without the simulator's kernels)."""
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    want = torch.softmax(q @ k.transpose(-2, -1) * 0.1, -1) @ v
    torch.testing.assert_close(K.attention_reference(q, k, v, scale=0.1), want)
