"""The Triton kernels against plain torch, in Triton's interpreter on CPU (compiled on a GPU machine by
tests/test_kernels_gpu.py), and "auto" dispatch to them. Skipped when Triton is not installed."""

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import ar_course.kernels as K
from ar_course.kernels import env, ops
from ar_course.kernels.calibrate import Calibrator
from ar_course.kernels.masks import BlockCausal, prefix_mask
from ar_course.kernels.precision import compute_dtype

pytestmark = pytest.mark.skipif(not (env.TRITON_INSTALLED and env.triton_interpreted()),
                                reason="needs Triton running in its interpreter (TRITON_INTERPRET=1)")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-5, F16: 2e-3, BF16: 2e-2}  # the larger of the compute and output dtypes' tolerances applies
DTYPES = {"fp32": (F32, F32, F32), "fp16": (F16, F16, F16), "bf16": (BF16, BF16, BF16),
          "fp32q-bf16kv": (F32, BF16, BF16), "bf16q-fp32kv": (BF16, F32, F32), "fp16q-bf16kv": (F16, BF16, BF16)}


@pytest.fixture(scope="module")
def tk():
    from ar_course.kernels import triton_kernels

    return triton_kernels


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tolerance(out_dtype: torch.dtype, computed_in: torch.dtype) -> float:
    return max(TOL[out_dtype], TOL[computed_in])


@pytest.mark.parametrize("rows, cols, scale, block", [(7, 45, 3.0, 16), (3, 5, 1.0, 16), (4, 70, 80.0, 32)])
def test_softmax(tk, rows, cols, scale, block):
    x = torch.randn(rows, cols, generator=gen(0)) * scale
    torch.testing.assert_close(tk.softmax_triton(x, block=block), torch.softmax(x, -1), atol=1e-6, rtol=1e-5)


def test_vq_nearest_ties_within_and_across_tiles(tk):
    """Equal distances go to the lowest index, inside a tile and across tiles. Codes and inputs are small
    integers, so every distance is exact in float32 whatever order a matrix product sums in (with random floats,
    a duplicated code's distance can round differently at another column of the product: OpenBLAS does so on
    some CPUs), and each tie is a real one."""
    g = gen(1)
    c = torch.randint(-3, 4, (70, 5), generator=g).float()
    c[5] = c[3]  # a tie inside the first tile of 16 codes
    c[40] = c[3]  # and one in a later tile
    z = c[torch.randint(0, 70, (45,), generator=g)] + torch.randint(-1, 2, (45, 5), generator=g)
    z[::3] = c[3]
    expected = ((z.double()[:, None] - c.double()[None]) ** 2).sum(-1).argmin(1)  # argmin: the first minimum
    assert torch.equal(tk.vq_nearest_triton(z, c, block_n=16, block_k=16), expected)
    assert torch.equal(tk.vq_nearest_triton(z, c), expected)  # the autotuned entry (one configuration here)
    assert (expected[::3] == 3).all()


# FlashAttention ------------------------------------------------------------------------------------------

MASKS = {  # (T_q, T_k, head size, mask): every mask kind, ragged tiles, padded head sizes, length 1
    "full-37": (37, 37, 16, None),
    "full-5x33-d20": (5, 33, 20, None),
    "causal-37-d32": (37, 37, 32, "causal"),
    "causal-cache-7x40": (7, 40, 20, "causal"),  # the last 7 of 40 positions: causal offset by a KV cache
    "causal-1": (1, 1, 16, "causal"),
    "var-blocks-d64": (37, 37, 64, BlockCausal((1, 4, 9, 16, 7))),
    "dense-prefix": (21, 21, 16, BlockCausal((5, 16)).dense()),
}


def flash_inputs(t_q: int, t_k: int, d: int, dtypes: tuple, seed: int = 2) -> tuple[torch.Tensor, ...]:
    g = gen(seed)
    return (torch.randn(1, 2, t_q, d, generator=g).to(dtypes[0]), torch.randn(1, 2, t_k, d, generator=g).to(dtypes[1]),
            torch.randn(1, 2, t_k, d, generator=g).to(dtypes[2]))


def flash_expected(q, k, v, mask, scale, dtype):
    """The reference in float64 on the inputs rounded to the compute dtype."""
    q, k, v = (x.to(dtype).double() for x in (q, k, v))
    return K.attention_reference(q, k, v, mask, scale=scale)


@pytest.mark.parametrize("dtypes", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(MASKS), ids=list(MASKS))
def test_flash_attention(tk, case, dtypes):
    t_q, t_k, d, mask = MASKS[case]
    q, k, v = flash_inputs(t_q, t_k, d, dtypes)
    dtype = compute_dtype(q, k, v)
    got = tk.flash_attention_triton(q, k, v, prefix_mask(mask, t_q, t_k, "cpu"), 0.4, block_m=16, block_n=16)
    assert got.dtype == q.dtype and got.shape == q.shape
    tol = tolerance(q.dtype, dtype)
    torch.testing.assert_close(got.double(), flash_expected(q, k, v, mask, 0.4, dtype), atol=tol, rtol=tol)


def test_flash_attention_reads_strided_heads_in_place_and_writes_merge_ready_output(tk):
    """q, k, v as the model makes them: views of one (B, T, 3, H, D) projection, no copies."""
    qkv = torch.randn(2, 19, 3, 2, 16, generator=gen(3))  # (B, T, 3, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D), strided
    got = tk.flash_attention_triton(q, k, v, prefix_mask("causal", 19, 19, "cpu"), 0.25)
    torch.testing.assert_close(got, K.attention_reference(q, k, v, "causal", scale=0.25), atol=1e-5, rtol=1e-5)
    assert got.transpose(1, 2).is_contiguous()  # (B, T, H, D) in memory: merging heads needs no copy


def test_flash_attention_under_autocast_computes_in_the_autocast_dtype():
    q, k, v = flash_inputs(23, 23, 16, DTYPES["fp32"], seed=4)
    with torch.autocast("cpu", dtype=BF16):
        got = K.flash_attention(q, k, v, "causal", backend="triton")
    exact = flash_expected(q, k, v, "causal", 0.25, F32)
    torch.testing.assert_close(got.double(), flash_expected(q, k, v, "causal", 0.25, BF16), atol=2e-2, rtol=2e-2)
    assert got.dtype == F32 and (got.double() - exact).abs().max() > 1e-4  # it did round to bfloat16


# decode attention ----------------------------------------------------------------------------------------


def decode_inputs(b: int, h: int, t: int, d: int, dtypes: tuple, seed: int = 5) -> tuple[torch.Tensor, ...]:
    g = gen(seed)
    return (torch.randn(b, h, d, generator=g).to(dtypes[0]), torch.randn(b, h, t, d, generator=g).to(dtypes[1]),
            torch.randn(b, h, t, d, generator=g).to(dtypes[2]))


@pytest.mark.parametrize("splits", [1, 2], ids=["one-pass", "two-splits"])
@pytest.mark.parametrize("dtypes", [DTYPES[n] for n in ("fp32", "fp32q-bf16kv", "fp16")], ids=["fp32", "mixed", "fp16"])
def test_decode_attention_ignores_the_cache_past_each_length(tk, dtypes, splits):
    q, k_cache, v_cache = decode_inputs(3, 2, 50, 8, dtypes)
    lengths = torch.tensor([50, 17, 1])
    k_cache[1:, :, 17:] = float("nan")  # never written
    v_cache[1:, :, 17:] = float("nan")
    got = tk.decode_attention_triton(q, k_cache, v_cache, lengths, 1 / math.sqrt(8), splits=splits, block_n=8)
    expected = K.decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), lengths)
    assert got.dtype == q.dtype
    torch.testing.assert_close(got.double(), expected, atol=TOL[q.dtype], rtol=TOL[q.dtype])


@pytest.mark.parametrize("lengths", [torch.tensor(3, dtype=torch.int32),
                                     torch.tensor([[3, 0], [8, 0], [1, 0], [5, 0]], dtype=torch.int32)[:, 0]],
                         ids=["0-d", "strided"])
def test_decode_attention_reads_lengths_of_any_layout(lengths):
    """The kernel reads lengths[b] at offset b: a 0-d int32 tensor (expanded to a stride-0 view) or a strided
    int32 view passed its checks and was read past its storage or at the wrong elements (nan, or 4.8e30)."""
    q, k_cache, v_cache = decode_inputs(4, 2, 8, 4, DTYPES["fp32"])
    got = K.decode_attention(q, k_cache, v_cache, lengths, backend="triton")
    expected = K.decode_attention_reference(q.double(), k_cache.double(), v_cache.double(),
                                            lengths.expand(4).long())
    torch.testing.assert_close(got.double(), expected, atol=TOL[q.dtype], rtol=TOL[q.dtype])


@pytest.mark.parametrize("length", [1, 33, 64])
@pytest.mark.parametrize("d", [16, 32, 64])
def test_decode_attention_with_an_int_length_over_a_cache_slice(tk, d, length):
    buffer = decode_inputs(2, 2, 80, d, DTYPES["bf16q-fp32kv"], seed=d)  # a preallocated cache of 80 positions
    q, k_cache, v_cache = buffer[0], buffer[1][:, :, :64], buffer[2][:, :, :64]  # the slice the model passes
    got = tk.decode_attention_triton(q, k_cache, v_cache, length, 1 / math.sqrt(d), splits=2 if length > 32 else None)
    expected = K.decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), length)
    torch.testing.assert_close(got.double(), expected, atol=TOL[BF16], rtol=TOL[BF16])


def test_decode_splits_fill_the_device_in_whole_chunks(tk):
    cpu = torch.device("cpu")  # the interpreter stands for a device that wants 8 programs
    assert tk.decode_splits(64, 33, cpu) == (1, 64)  # rows enough to fill it: one pass, no reduction
    assert tk.decode_splits(2, 4096, cpu) == (4, 1024)  # few rows over a long cache: 2 x 4 programs
    assert tk.decode_splits(2, 50, cpu) == (1, 64)  # too few keys to be worth splitting
    assert tk.decode_splits(6, 50, cpu, splits=2) == (2, 32)
    for rows, keys in ((1, 500), (6, 1000), (3, 17)):
        splits, chunk = tk.decode_splits(rows, keys, cpu)
        assert (splits - 1) * chunk < keys <= splits * chunk and chunk % 32 == 0


# the wrappers and "auto" ----------------------------------------------------------------------------------


def test_wrappers_triton_path_equals_torch_path():
    g = gen(6)
    q, k, v = (torch.randn(1, 3, 29, 16, generator=g) for _ in range(3))
    for mask in (None, "causal", BlockCausal((1, 4, 9, 15))):
        with K.record_dispatch() as ran:
            got = K.flash_attention(q, k, v, mask, backend="triton")
        assert ran.backend("flash_attention") == "triton"
        torch.testing.assert_close(got, K.flash_attention(q, k, v, mask, backend="torch"), atol=1e-5, rtol=1e-5)
    last = K.decode_attention(q[:, :, -1], k, v, 29, backend="triton")
    torch.testing.assert_close(last, K.flash_attention(q, k, v, "causal")[:, :, -1], atol=1e-5, rtol=1e-5)
    cached = K.flash_attention(q[:, :, -4:], k, v, "causal", backend="triton")  # 4 new queries over a cache
    torch.testing.assert_close(cached, K.flash_attention(q, k, v, "causal")[:, :, -4:], atol=1e-5, rtol=1e-5)
    z, c = torch.randn(50, 7, generator=g), torch.randn(33, 7, generator=g)
    assert torch.equal(K.vq_nearest(z, c, backend="triton"), K.vq_nearest(z, c, backend="torch"))
    x = torch.randn(4, 33, generator=g)
    torch.testing.assert_close(K.softmax(x, backend="triton"), torch.softmax(x, -1), atol=1e-6, rtol=1e-5)


@pytest.fixture
def measured_cpu(monkeypatch):
    """"auto" treats this CPU like a GPU: Triton is its candidate and a fake timer decides. Returns a function
    that installs the times (torch is timed first, then the kernel) and the calibrator."""
    rule = ops.backend_rule
    monkeypatch.setattr(ops, "backend_rule", lambda op, device_type, why_not, backend="auto", large=False:
                        "triton" if backend == "auto" else rule(op, device_type, why_not, backend, large))
    monkeypatch.setattr(ops, "_FAILED", {})

    def install(torch_seconds: float, kernel_seconds: float, run: bool = False) -> Calibrator:
        times = iter([torch_seconds, kernel_seconds])
        timer = (lambda fn: (fn(), next(times))[1]) if run else (lambda fn: next(times))  # run: call what it times
        calibrator = Calibrator(timer=timer, path=None, device_types=("cpu",))
        monkeypatch.setattr(ops, "CALIBRATOR", calibrator)
        return calibrator

    return install


def test_auto_runs_a_kernel_only_where_it_measured_faster(measured_cpu):
    q, k, v = flash_inputs(20, 20, 16, DTYPES["fp32"], seed=7)
    expected = K.attention_reference(q, k, v, "causal")
    calibrator = measured_cpu(torch_seconds=1.0, kernel_seconds=0.5)
    for _ in range(2):  # the second call reuses the decision (the fake timer has no third time to give)
        with K.record_dispatch() as ran:
            torch.testing.assert_close(K.flash_attention(q, k, v, "causal"), expected, atol=1e-5, rtol=1e-5)
        assert ran.summary() == {"flash_attention": "triton", "fallbacks": []}
    assert [c["backend"] for c in calibrator.choices().values()] == ["triton"]
    measured_cpu(torch_seconds=1.0, kernel_seconds=0.99)  # faster, but not by the margin: torch
    with K.record_dispatch() as ran:
        K.flash_attention(q, k, v, "causal")
    assert ran.summary() == {"flash_attention": "torch", "fallbacks": []}


@pytest.mark.parametrize("when", ["measured", "run"])
def test_a_kernel_that_fails_under_auto_falls_back_and_says_why(measured_cpu, monkeypatch, tk, when):
    def broken(*args, **kwargs):
        raise RuntimeError("Both operands must be same dtype\n(more lines)")

    monkeypatch.setattr(tk, "flash_attention_triton", broken)
    measured_cpu(torch_seconds=1.0, kernel_seconds=0.5, run=when == "measured")
    q, k, v = flash_inputs(9, 9, 16, DTYPES["fp32q-bf16kv"], seed=8)
    reason = "triton flash_attention: RuntimeError: Both operands must be same dtype (used torch)"
    with K.record_dispatch() as ran, pytest.warns(RuntimeWarning, match="triton kernel failed"):
        got = K.flash_attention(q, k, v)
    assert ran.summary() == {"flash_attention": "torch", "fallbacks": [reason]}
    torch.testing.assert_close(got, K.attention_reference(q, k.float(), v.float()), atol=1e-5, rtol=1e-5)
    with K.record_dispatch() as ran, warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; the fallback is still reported in every record
        K.flash_attention(q, k, v)
    assert ran.summary() == {"flash_attention": "torch", "fallbacks": [reason]}
    with pytest.raises(RuntimeError, match="same dtype"):  # a forced backend never falls back
        K.flash_attention(q, k, v, backend="triton")


# compiled for a GPU, without one ------------------------------------------------------------------------

_COMPILE_FOR_SM90 = r'''
import os
os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compile, do not interpret
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from ar_course.kernels import triton_kernels as tk

from ar_course.kernels import triton_paged as tp

SHARED_LIMIT = 232448  # bytes of shared memory one program may use on an H100 / H200 (227 KiB)

def compile_(fn, types, constexprs, **options):
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if sig[n].startswith("*") or n.startswith("stride")}  # as torch's allocations and strides are
    src = triton.compiler.ASTSource(fn, sig, constexprs, aligned)
    shared = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).metadata.shared
    assert shared <= SHARED_LIMIT, f"{fn.__name__} {constexprs} {options}: {shared} bytes of shared memory"
    print("compiled", fn.__name__, flush=True)

def tuned(kernel):  # (tiles, launch options) of every configuration the autotuner may pick on a GPU
    return [(c.kwargs, dict(num_warps=c.num_warps, num_stages=c.num_stages)) for c in kernel.configs]

flash = {"kv_len_ptr": "*i32", "qk_scale": "fp32"}
compile_(tk._flash_attention_kernel, {**flash, "q_ptr": "*bf16", "k_ptr": "*fp32", "v_ptr": "*fp32", "out_ptr": "*bf16"},
         {"MASK": 1, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "EVEN_D": True, "DOT_DTYPE": tl.bfloat16},
         num_warps=4, num_stages=3)
compile_(tk._flash_attention_kernel, {**flash, "q_ptr": "*fp32", "k_ptr": "*bf16", "v_ptr": "*fp16", "out_ptr": "*fp32"},
         {"MASK": 2, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "EVEN_D": False, "DOT_DTYPE": tl.float32},
         num_warps=4, num_stages=2)
compile_(tk._decode_split_kernel, {"q_ptr": "*bf16", "k_ptr": "*fp32", "v_ptr": "*fp32", "len_ptr": "*i32",
         "out_ptr": "*bf16", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "qk_scale": "fp32"},
         {"HAS_LENGTHS": True, "FINAL": False, "BLOCK_N": 64, "BLOCK_D": 128, "EVEN_D": True}, num_warps=4, num_stages=2)
compile_(tk._decode_reduce_kernel, {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": "*bf16"},
         {"BLOCK_S": 4, "BLOCK_D": 128})
# every configuration autotuning may try, at the largest head size the system uses (bf16, as under autocast)
bf16 = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
for tiles, options in tuned(tk._flash_attention_tuned):
    compile_(tk._flash_attention_kernel, {**flash, **bf16},
             {"MASK": 1, **tiles, "BLOCK_D": 128, "EVEN_D": True, "DOT_DTYPE": tl.bfloat16}, **options)
for tiles, options in tuned(tk._decode_split_tuned):
    compile_(tk._decode_split_kernel, {**bf16, "len_ptr": "*i32", "m_ptr": "*fp32", "l_ptr": "*fp32",
             "acc_ptr": "*fp32", "qk_scale": "fp32"},
             {"HAS_LENGTHS": True, "FINAL": False, **tiles, "BLOCK_D": 128, "EVEN_D": True}, **options)
for tiles, options in tuned(tk._vq_nearest_tuned):
    compile_(tk._vq_nearest_kernel, {"z_ptr": "*fp32", "c_ptr": "*fp32", "norms_ptr": "*fp32", "out_ptr": "*i32"},
             {**tiles, "BLOCK_D": 64}, **options)
compile_(tp._paged_decode_kernel, {**bf16, "tables_ptr": "*i32", "len_ptr": "*i32", "out_ptr": "*fp32",
         "qk_scale": "fp32"}, {"BLOCK_SIZE": 16, "BLOCK_D": 128})
compile_(tk._softmax_kernel, {"x_ptr": "*fp32", "out_ptr": "*fp32"}, {"BLOCK": 1024})
print("configurations", len(tuned(tk._flash_attention_tuned)) + len(tuned(tk._decode_split_tuned))
      + len(tuned(tk._vq_nearest_tuned)), flush=True)
'''


def _nvidia_compiler_here() -> bool:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_compiler_here(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_a_hopper_gpu_with_mixed_dtypes(tmp_path):
    """The interpreter runs a kernel without type-checking it the way the compiler does (a bf16 x fp32
    tl.dot runs there and fails to compile on a GPU), so compile the mixed-dtype variants for sm_90 here:
    Triton's front end and ptxas run on any Linux machine. Every configuration the autotuner may try is
    compiled too, and each must fit an H100's shared memory (the autotuner would silently skip one that
    does not, wasting its compile time on every new kind of call)."""
    env_vars = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], capture_output=True, text=True, env=env_vars,
                         cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    configurations = int(res.stdout.split("configurations")[-1])
    assert configurations >= 3 and res.stdout.count("compiled") == 4 + configurations + 2


def test_threads_can_launch_simulated_kernels_at_once():
    """Triton's interpreter and numba's CUDA simulator keep process-wide state: two threads launching at once
    failed ('Did you forget to add @triton.jit', "'Thread' object has no attribute 'blockIdx'"). Simulated
    launches now take turns; each thread gets its own right answer (audit 23)."""
    import threading

    g = gen(0)
    inputs = [tuple(torch.randn(1, 2, 16, 8, generator=g) for _ in range(3)) for _ in range(4)]
    backends = ["triton", "numba", "triton", "numba"] if env.CUDA_SIMULATOR else ["triton"] * 4
    want = [K.flash_attention(q, k, v, "causal", backend="torch") for q, k, v in inputs]
    got, errors = {}, {}
    start = threading.Barrier(len(inputs))

    def work(i: int) -> None:
        q, k, v = inputs[i]
        start.wait()
        try:
            for _ in range(2):
                got[i] = K.flash_attention(q, k, v, "causal", backend=backends[i])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors[i] = repr(exc)[:300]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == {}
    for i, w in enumerate(want):
        torch.testing.assert_close(got[i], w, atol=1e-5, rtol=1e-5)
