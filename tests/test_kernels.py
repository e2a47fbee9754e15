"""ar_course.kernels on CPU: numba.cuda kernels in the CUDA simulator, the numba CPU search, the masks, the
sanitizer and the torch-facing wrappers, each against plain torch on random inputs with odd sizes."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ar_course.kernels as K
from ar_course.kernels import cuda_attention as ka
from ar_course.kernels import cuda_basic as kb
from ar_course.kernels import cuda_softmax as ks
from ar_course.kernels import cuda_vq as kv
from ar_course.kernels import env
from ar_course.kernels.calibrate import software_section
from ar_course.kernels.cpu_vq import vq_nearest_cpu
from ar_course.kernels.masks import BlockCausal, dense_mask, prefix_lengths
from ar_course.kernels.sanitizer import SanitizerError, sanitize
from ar_course.transformer.functional import causal_mask
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
    ("diagonal", 3, 3, "unknown mask"),
    (BlockCausal((2, 2)), 5, 5, "covers 4"),
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
    from ar_course.kernels import cpu_vq, ops

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
    from ar_course.kernels import ops

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


# measured dispatch ---------------------------------------------------------------------------------------


def fake_timer(*seconds: float):
    """A timer that hands out ``seconds`` in order (auto_choice times torch first, then the kernel)."""
    times = iter(seconds)
    return lambda fn: next(times)


def test_calibration_keeps_a_kernel_only_when_it_is_faster_by_the_margin(tmp_path):
    from ar_course.kernels.calibrate import Calibrator
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
    sections = json.loads(path.read_text())
    assert list(sections) == [software_section()] and "torch " in software_section()
    assert "numba-cuda " in software_section()  # a numba-cuda upgrade measures the numba kernels again


@pytest.mark.parametrize("section", [["triton"], {"k": "triton"}, {"k": {}}, {"k": {"backend": "triton"}}, 7,
                                     {"k": {"backend": "cuda-magic", "seconds": {"triton": 1.0, "torch": 2.0}}},
                                     {"k": {"backend": "numba", "seconds": {"triton": 1.0, "torch": 2.0}}}])
def test_calibration_measures_again_past_a_malformed_cache_file(tmp_path, section):
    """A cache file that is JSON but not what this version writes (edited by hand, another version) counts as
    no decision: the call is measured again and the file rewritten, never an AttributeError inside dispatch."""
    from ar_course.kernels.calibrate import Calibrator

    path = tmp_path / "choices.json"
    path.write_text(json.dumps({software_section(): section}))
    calibrator = Calibrator(timer=fake_timer(), path=path)
    assert calibrator.lookup("k") is None and calibrator.choices() == {}
    assert calibrator.decide("k", "triton", 1.0, 2.0) == "triton"
    assert Calibrator(timer=fake_timer(), path=path).lookup("k") == "triton"


def test_calibration_without_a_writable_cache_keeps_its_decisions_in_memory(tmp_path):
    from ar_course.kernels.calibrate import Calibrator

    blocker = tmp_path / "file"
    blocker.write_text("")
    calibrator = Calibrator(timer=fake_timer(), path=blocker / "choices.json")  # a file where a folder must be
    with pytest.warns(RuntimeWarning, match="for this process only"):
        assert calibrator.decide("k", "triton", 1.0, 2.0) == "triton"
    assert calibrator.lookup("k") == "triton" and calibrator.path is None
