"""Bad input to checkpoints, output files, the shared argument checks, the kernels' entry points and the
system's Generator: a one-line ``TypeError``/``ValueError`` naming the argument, never a deep error from
pathlib, json, safetensors or torch, and never a silently wrong value."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import ar_course.kernels as K
from ar_course import checkpoint
from ar_course.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ar_course.files import atomic_write_text, check_output_path, save_figure
from ar_course.kernels import BlockCausal
from ar_course.kernels.calibrate import Calibrator
from ar_course.raster import raster_config
from ar_course.system import GenerationRequest, Generator
from ar_course.tokenizers import VQVAE, VQVAEConfig
from ar_course.transformer import GPT, GPTConfig
from ar_course.utils import check_int, check_number, get_device, seed_everything


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8)).eval()


# -- utils ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [10**400, -(10**400), 10**5000], ids=["1e400", "-1e400", "1e5000"])
def test_check_number_refuses_an_int_too_large_for_a_float_with_value_error(value):
    with pytest.raises(ValueError, match=r"^x must be a finite number, got a number too large for a float"):
        check_number("x", value)


@pytest.mark.parametrize("value", [torch.tensor([3]), torch.tensor([[3]])])
def test_check_int_refuses_a_one_element_tensor_that_is_not_0d(value):
    with pytest.raises(TypeError, match=r"top_k must be an integer >= 1, got a tensor of shape"):
        check_int("top_k", value, lo=1)


def test_check_int_still_takes_a_0d_integer_tensor():
    assert check_int("top_k", torch.tensor(3), lo=1) == 3


@pytest.mark.parametrize("seed, error", [(1.5, TypeError), ("3", TypeError), (None, TypeError),
                                         (2**64, ValueError), (-(2**63) - 1, ValueError)])
def test_seed_everything_checks_its_seed(seed, error):
    with pytest.raises(error, match=r"^seed must be an integer in \["):
        seed_everything(seed)


@pytest.mark.parametrize("seed", [0, 7, -1, 2**32 + 5, 2**64 - 1, np.int64(3)])
def test_seed_everything_still_seeds_numpy_with_the_seed_mod_2_32(seed):
    generator = seed_everything(seed)
    drawn = np.random.random()
    np.random.seed(int(seed) % 2**32)
    assert drawn == np.random.random()
    assert generator.initial_seed() == int(seed) % 2**64
    random.seed(int(seed))  # Python's random got the seed itself
    expected = random.random()
    seed_everything(seed)
    assert random.random() == expected


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
@pytest.mark.parametrize("name", ["mps", "mps:0"])
def test_get_device_refuses_mps_on_a_machine_without_it(name):
    with pytest.raises(RuntimeError, match=rf"device '{name}' requested but MPS .* is not available"):
        get_device(name)


def test_get_device_refuses_a_gpu_index_past_the_machine_s_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert get_device("cuda:0") == torch.device("cuda:0") and get_device("cuda") == torch.device("cuda")
    with pytest.raises(RuntimeError, match=r"device 'cuda:5' requested but this machine has 1 CUDA device \(cuda:0"):
        get_device("cuda:5")


def test_get_device_still_allows_meta():
    assert get_device("meta") == torch.device("meta")


# -- files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [None, 3, ["a.png"]])
def test_check_output_path_refuses_a_path_that_is_not_a_str_or_pathlike(path):
    with pytest.raises(TypeError, match=r"^output path must be a str or os.PathLike, got"):
        check_output_path(path)


def test_atomic_writers_refuse_a_folder_before_writing_anything(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"is a folder; name a file inside it"):
        atomic_write_text(folder, "x")
    with pytest.raises(TypeError, match=r"^figure path must be a str or os.PathLike, got None"):
        save_figure(object(), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary file left beside it


def test_the_kernel_calibrator_still_only_warns_when_its_cache_path_is_a_folder(tmp_path):
    calibrator = Calibrator(path=tmp_path)
    with pytest.warns(RuntimeWarning, match="cannot keep kernel choices"):
        assert calibrator.decide("key", "triton", 1.0, 2.0) == "triton"
    assert calibrator.path is None


# -- checkpoint ----------------------------------------------------------------------------------------------


def test_save_checkpoint_stores_numpy_scalars_and_0d_tensors_as_python_numbers(lm, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", lm, lm.config, kind="lm", val_loss=np.float32(1.5),
                           best=torch.tensor(0.25), steps=np.int64(3), done=np.bool_(True),
                           history=[np.float64(2.0), torch.tensor(3)])
    _, meta = load_checkpoint(path)
    assert meta["extra"] == {"val_loss": 1.5, "best": 0.25, "steps": 3, "done": True, "history": [2.0, 3]}
    assert type(meta["extra"]["steps"]) is int and type(meta["extra"]["done"]) is bool


@pytest.mark.parametrize("value, got", [(np.zeros(3), r"ndarray of shape \(3,\)"),
                                        (torch.ones(2), r"Tensor of shape \(2,\)"), (object(), "object"),
                                        ({"nested": [1, {2, 3}]}, "set")])
def test_save_checkpoint_names_the_extra_key_json_cannot_hold(lm, tmp_path, value, got):
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match=rf"^save_checkpoint: extra value val_loss=.* cannot be stored as JSON "
                                        rf"\(got {got}\)"):
        save_checkpoint(path, lm, lm.config, kind="lm", steps=3, val_loss=value)
    assert not path.exists()


def test_save_checkpoint_names_the_config_key_json_cannot_hold(lm, tmp_path):
    with pytest.raises(TypeError, match=r"^save_checkpoint: config value width=.* cannot be stored as JSON"):
        save_checkpoint(tmp_path / "m.safetensors", lm, {"width": np.ones(2)}, kind="lm")


@pytest.mark.parametrize("args, kwargs, error, match", [
    (("x",), {}, TypeError, r"^model must be a torch.nn.Module or a state dict .*, got str"),
    (({"w": [1.0]},), {}, TypeError, r"^model must be a torch.nn.Module or a state dict .*'w': list"),
    ((None, None), {"kind": 3}, TypeError, r"^kind must be a str such as 'lm' or 'var', got 3 \(int\)"),
])
def test_save_checkpoint_checks_model_and_kind(lm, tmp_path, args, kwargs, error, match):
    args = tuple(lm if a is None else a for a in args)
    with pytest.raises(error, match=match):
        save_checkpoint(tmp_path / "m.safetensors", *args, **kwargs)


def test_save_checkpoint_refuses_a_folder_before_any_work(lm, tmp_path):
    with pytest.raises(ValueError, match=r"^checkpoint '.*' is a folder; name a file inside it"):
        save_checkpoint(tmp_path, lm, lm.config, kind="lm")
    with pytest.raises(TypeError, match=r"^checkpoint path must be a str or os.PathLike, got None"):
        save_checkpoint(None, lm, lm.config, kind="lm")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device, error, match", [
    ("gpu", ValueError, r"^unknown device 'gpu'"),
    ("", ValueError, r"^device is empty"),
    (0, TypeError, r"^device must be a str or torch.device"),
])
def test_load_checkpoint_blames_a_bad_device_not_the_file(device, error, match):
    with pytest.raises(error, match=match):
        load_checkpoint(checkpoint.resolve("lm_draft"), device=device)


@pytest.mark.parametrize("call, error, match", [
    (lambda: checkpoint.resolve(None), TypeError, r"^name_or_path must be a checkpoint name or path .*None"),
    (lambda: checkpoint.load(3), TypeError, r"^name_or_path must be a checkpoint name or path .*got 3 \(int\)"),
    (lambda: checkpoint.info(["lm_draft"]), TypeError, r"^name_or_path must be a checkpoint name or path"),
    (lambda: checkpoint.resolve(""), ValueError, r"^name_or_path is empty"),
    (lambda: load_checkpoint(None), TypeError, r"^path must be a checkpoint name or path .*None"),
])
def test_checkpoint_names_and_paths_are_checked(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("model, config, error, match", [
    (3, 4, TypeError, r"^register_kind: model must be a class or a 'module:Name' string, got 3"),
    (GPT, 4, TypeError, r"^register_kind: config must be a class or a 'module:Name' string, got 4"),
    ("nomodule", GPTConfig, ValueError, r"^register_kind: model must be .*, got 'nomodule'"),
    (GPT, "a.b:", ValueError, r"^register_kind: config must be .*, got 'a.b:'"),
    (GPT, GPT, TypeError, r"^register_kind: config must be a dataclass .*, got GPT"),
])
def test_register_kind_checks_its_targets_when_called(monkeypatch, model, config, error, match):
    monkeypatch.setattr(checkpoint, "KINDS", dict(checkpoint.KINDS))
    with pytest.raises(error, match=match):
        checkpoint.register_kind("zz", model, config)
    assert "zz" not in checkpoint.KINDS


@pytest.mark.parametrize("target, why", [("no_such_module_zz:GPT", "ModuleNotFoundError"),
                                         ("ar_course.transformer.model:NoSuchClass", "AttributeError")])
def test_load_wraps_a_kind_that_cannot_be_imported_in_a_checkpoint_error(monkeypatch, lm, tmp_path, target, why):
    monkeypatch.setattr(checkpoint, "KINDS", dict(checkpoint.KINDS))
    checkpoint.register_kind("zz", target, GPTConfig)
    path = save_checkpoint(tmp_path / "m.safetensors", lm, lm.config, kind="zz")
    with pytest.raises(CheckpointError, match=rf"^checkpoint kind 'zz': cannot import '{target}' \({why}"):
        checkpoint.load(path)


# -- kernels -------------------------------------------------------------------------------------------------


def _qkv(t_k=3, d=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 2, 3, d, generator=g), torch.randn(1, 2, t_k, d, generator=g), \
        torch.randn(1, 2, t_k, d, generator=g)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("t_k, d", [(0, 4), (3, 0)])
def test_flash_attention_refuses_no_keys_or_an_empty_head(backend, t_k, d):
    with pytest.raises(ValueError, match=r"^need T_k >= 1 keys and a head size D >= 1"):
        K.flash_attention(*_qkv(t_k, d), backend=backend)


def test_decode_attention_refuses_an_empty_head():
    q, k, v = _qkv(3, 0)
    with pytest.raises(ValueError, match=r"^need T_k >= 1 keys and a head size D >= 1"):
        K.decode_attention(q[:, :, 0], k, v, 1, backend="torch")


def test_softmax_and_vq_nearest_refuse_an_empty_last_axis():
    with pytest.raises(ValueError, match=r"^x must be \(\.\.\., C\) with C >= 1, got shape \(2, 0\)"):
        K.softmax(torch.zeros(2, 0))
    with pytest.raises(ValueError, match=r"^codebook must be \(K, D\) with K >= 1 and D >= 1, got shape \(4, 0\)"):
        K.vq_nearest(torch.randn(2, 0), torch.randn(4, 0))
    assert K.softmax(torch.zeros(0, 3)).shape == (0, 3)  # no rows is still fine


def test_softmax_refuses_a_scalar_with_value_error():
    """A 0-d tensor has no last axis: one ValueError naming the shape, not an IndexError from inside."""
    with pytest.raises(ValueError, match=r"^x must be \(\.\.\., C\) with C >= 1, got shape \(\)"):
        K.softmax(torch.tensor(1.0))


@pytest.mark.parametrize("vq_nearest", [K.vq_nearest, K.vq_nearest_reference], ids=["vq_nearest", "reference"])
def test_vq_nearest_refuses_an_empty_codebook_in_one_line(vq_nearest):
    """A codebook of no codes (K = 0) is refused by name, not left to fail inside torch."""
    with pytest.raises(ValueError, match=r"^codebook must be \(K, D\) with K >= 1 and D >= 1, got shape \(0, 4\)"):
        vq_nearest(torch.randn(3, 4), torch.empty(0, 4))


@pytest.mark.parametrize("op", ["flash", "decode"])
def test_attention_refuses_a_zero_scale(op):
    """scale=0 would weight every key equally, silently: the scale must be > 0."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^scale must be a finite number > 0, got 0.0"):
        if op == "flash":
            K.flash_attention(q, k, v, scale=0.0)
        else:
            K.decode_attention(q[:, :, 0], k, v, 2, scale=0.0)


@pytest.mark.parametrize("lengths, error, match", [
    ((1.5, 2), TypeError, r"^BlockCausal lengths\[0\] must be an integer, got 1.5"),
    ((1, True), TypeError, r"^BlockCausal lengths\[1\] must be an integer, got True"),
    (torch.tensor([1.0, 4.0]), TypeError, r"^BlockCausal lengths\[0\] must be an integer"),
    ("123", TypeError, r"^BlockCausal lengths must be a sequence of ints .*got '123' \(str\)"),
    ({1, 4}, TypeError, r"^BlockCausal lengths must be a sequence of ints"),
    (3, TypeError, r"^BlockCausal lengths must be a sequence of ints .*got 3 \(int\)"),
    ((1, 0), ValueError, r"^BlockCausal needs one or more positive block lengths"),
])
def test_block_causal_refuses_non_integer_lengths(lengths, error, match):
    with pytest.raises(error, match=match):
        BlockCausal(lengths)


@pytest.mark.parametrize("lengths", [(1, 4), [1, 4], np.array([1, 4]), torch.tensor([1, 4]), (np.int64(1), 4)])
def test_block_causal_still_takes_integer_sequences(lengths):
    mask = BlockCausal(lengths)
    assert mask.lengths == (1, 4) and all(type(n) is int for n in mask.lengths) and mask == BlockCausal((1, 4))


def test_select_backend_refuses_unknown_ops_and_takes_a_device_string():
    with pytest.raises(ValueError, match=r"^unknown op 'bogus'; the ops are \('vq_nearest', 'flash_attention'"):
        K.select_backend("bogus", torch.device("cpu"))
    assert K.select_backend("softmax", "cpu") == K.select_backend("softmax", torch.device("cpu")) == "torch"
    assert K.select_backend("vq_nearest", "cpu", large=True) == "numba_cpu"
    with pytest.raises(ValueError, match=r"^unknown device 'gpu'"):
        K.select_backend("softmax", "gpu")
    with pytest.raises(TypeError, match=r"^device must be a torch.device or a str such as 'cpu', got 0 \(int\)"):
        K.select_backend("softmax", 0)


# -- system --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", ["x", {"classes": [0]}, [0, 1]])
def test_generator_run_asks_for_a_generation_request(request_):
    torch.manual_seed(0)
    tok = VQVAE(VQVAEConfig(num_codes=5, latent_dim=4, width=8, downsample=8)).eval()
    ar = GPT(raster_config(5, grid=(4, 4), n_classes=3, n_layer=1, n_head=2, n_embd=16)).eval()
    gen = Generator(ar_model=ar, ar_tokenizer=tok)
    with pytest.raises(TypeError, match=r"^request must be a GenerationRequest .*, got "):
        gen.run(request_)


def test_generation_request_refuses_uint64_classes_beyond_int64():
    with pytest.raises(ValueError, match=r"^classes must be ints that fit in int64, got 9223372036854775808$"):
        GenerationRequest(np.array([1, 2**63], dtype=np.uint64))
    request = GenerationRequest(np.array([2, 0], dtype=np.uint64))
    assert request.classes.dtype == torch.long and request.classes.tolist() == [2, 0]


def test_no_warning_from_a_valid_save_and_load(lm, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = save_checkpoint(tmp_path / "sub" / "m.safetensors", lm, lm.config, kind="lm", val_loss=1.0)
        assert checkpoint.info(path)["val_loss"] == 1.0
        assert isinstance(checkpoint.load(path, device="auto" if not torch.cuda.is_available() else "cpu"), GPT)


# -- kernels without the optional extras, and inputs of the wrong kind --------------------------------------------


def _without_numba(monkeypatch, cuda_only: bool = False) -> None:
    """Make ops.py see a machine without numba (``cuda_only``: numba without numba-cuda)."""
    for flag in ("NUMBA_INSTALLED", "NUMBA_CUDA_USABLE", "CUDA_SIMULATOR") + (() if cuda_only else
                                                                            ("NUMBA_CPU_INSTALLED",)):
        monkeypatch.setattr(K.env, flag, False)


def test_auto_vq_nearest_quietly_takes_torch_without_numba(monkeypatch):
    _without_numba(monkeypatch)
    assert K.select_backend("vq_nearest", "cpu", large=True) == "torch"
    z, codes = torch.randn(256, 8), torch.randn(256, 8)  # >= CPU_VQ_MIN_PAIRS pairs
    with warnings.catch_warnings(), K.record_dispatch() as rec:
        warnings.simplefilter("error")
        idx = K.vq_nearest(z, codes)
    assert torch.equal(idx, torch.cdist(z, codes).argmin(-1))
    assert rec.summary() == {"vq_nearest": "torch", "fallbacks": []}


@pytest.mark.parametrize("cuda_only, call, match", [
    (False, lambda: K.vq_nearest(torch.randn(4, 8), torch.randn(3, 8), backend="numba_cpu"),
     r"^vq_nearest: backend 'numba_cpu' is not available: numba is not installed \(pip install -e "
     r"'\.\[kernels\]' in the course's folder\)$"),
    (False, lambda: K.flash_attention(*_qkv(), backend="numba"),
     r"^flash_attention: backend 'numba' is not available: numba is not installed \(pip install -e "
     r"'\.\[kernels\]' in the course's folder\)$"),
    (True, lambda: K.softmax(torch.randn(2, 3), backend="numba"),
     r"^softmax: backend 'numba' is not available: numba-cuda is not installed \(pip install -e '\.\[kernels\]' in the "
     r"course's folder\)$"),
], ids=["numba_cpu-no-numba", "numba-no-numba", "numba-no-numba-cuda"])
def test_forced_numba_backends_name_the_missing_package_and_the_extra(monkeypatch, cuda_only, call, match):
    _without_numba(monkeypatch, cuda_only)
    with pytest.raises(RuntimeError, match=match):
        call()


def test_numba_cpu_needs_numba_but_not_numba_cuda(monkeypatch):
    _without_numba(monkeypatch, cuda_only=True)
    assert K.select_backend("vq_nearest", "cpu", "numba_cpu") == "numba_cpu"
    assert K.select_backend("vq_nearest", "cpu", large=True) == "numba_cpu"


def test_numba_cpu_is_refused_for_cuda_tensors():
    with pytest.raises(RuntimeError, match=r"^vq_nearest: backend 'numba_cpu' is not available: numba_cpu runs on "
                                           r"CPU tensors only$"):
        K.select_backend("vq_nearest", "cuda", "numba_cpu")


_Q, _CACHE = torch.randn(2, 3, 4), torch.randn(2, 3, 5, 4)


@pytest.mark.parametrize("call, match", [
    (lambda: K.vq_nearest(np.zeros((4, 8), np.float32), np.zeros((3, 8), np.float32)), "z"),
    (lambda: K.vq_nearest(torch.zeros(4, 8), np.zeros((3, 8), np.float32)), "codebook"),
    (lambda: K.flash_attention(_qkv()[0], _qkv()[1].numpy(), _qkv()[2]), "k"),
    (lambda: K.decode_attention(_Q.numpy(), _CACHE, _CACHE, 1), "q"),
    (lambda: K.decode_attention(_Q, _CACHE, _CACHE.numpy(), 1), "v_cache"),
    (lambda: K.softmax(np.zeros((2, 3), np.float32)), "x"),
    (lambda: K.attention_reference(_qkv()[0], _qkv()[1].numpy(), _qkv()[2]), "k"),
    (lambda: K.decode_attention_reference(_Q, _CACHE, _CACHE.numpy(), 1), "v_cache"),
    (lambda: K.vq_nearest_reference(torch.zeros(4, 8), np.zeros((3, 8), np.float32)), "codebook"),
])
def test_kernel_entry_points_refuse_numpy_arrays_with_a_type_error(call, match):
    with pytest.raises(TypeError, match=rf"^{match} must be a floating-point torch.Tensor, got ndarray$"):
        call()


def test_kernel_entry_points_still_refuse_integer_tensors_and_lengths_of_the_wrong_kind_apart():
    with pytest.raises(ValueError, match=r"^z must be a floating-point torch.Tensor, got torch.int32$"):
        K.vq_nearest(torch.zeros(4, 8, dtype=torch.int32), torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"^k must be a floating-point torch.Tensor, got torch.int64$"):
        K.attention_reference(_qkv()[0], _qkv()[1].long(), _qkv()[2])
    with pytest.raises(ValueError, match=r"^k_cache must be \(B, H, T, D\), got shape \(2, 3, 4\)$"):
        K.decode_attention(_Q, _Q, _CACHE, 1)
    with pytest.raises(TypeError, match=r"^length must be an int or a \(B,\) = \(2,\) integer tensor, got float$"):
        K.decode_attention(_Q, _CACHE, _CACHE, 4.0)
    with pytest.raises(TypeError, match=r"^length must be an int or a \(B,\) = \(2,\) integer tensor, got ndarray$"):
        K.decode_attention(_Q, _CACHE, _CACHE, np.array([1, 2]))
    with pytest.raises(ValueError, match=r"^length must be an int or a \(B,\) = \(2,\) integer tensor, got tensor"):
        K.decode_attention(_Q, _CACHE, _CACHE, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("length, error, match", [
    (True, TypeError, r"^length must be an int or a \(B,\) = \(2,\) integer tensor, got bool$"),
    (torch.tensor([3, 6]), ValueError, r"^every length must be in 1\.\.T_max=5, got \[3, 6\]$"),
], ids=["bool", "past-T_max"])
@pytest.mark.parametrize("decode", [K.decode_attention, K.decode_attention_reference], ids=["op", "reference"])
def test_decode_attention_refuses_a_bool_or_a_length_tensor_past_t_max(decode, length, error, match):
    """A bool is no length (True would read as 1), and a (B,) length tensor may not pass T_max by even one."""
    with pytest.raises(error, match=match):
        decode(_Q, _CACHE, _CACHE, length)


def test_get_device_reads_ar_course_device_only_without_a_device_and_names_it(monkeypatch):
    """AR_COURSE_DEVICE is the default (None or "auto"), an explicit device overrides it, and its errors name it
    (audit 30: the CLI said "device 'cuda' requested" of a run that named no device; 0, torch's cuda:0, meant auto)."""
    monkeypatch.setenv("AR_COURSE_DEVICE", "meta")
    assert get_device() == get_device("auto") == torch.device("meta")
    assert get_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("AR_COURSE_DEVICE", "auto")
    assert get_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("AR_COURSE_DEVICE", "gpu")
    with pytest.raises(ValueError, match=r"^unknown device 'gpu' in AR_COURSE_DEVICE: use 'cpu', 'cuda'"):
        get_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("AR_COURSE_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match=r"^device 'cuda' requested by AR_COURSE_DEVICE but CUDA is not available$"):
        get_device()
    for number in (0, 1, 0.0):
        with pytest.raises(TypeError, match=r"^device must be a name such as 'cpu' or 'cuda:0', a torch.device"):
            get_device(number)


@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu", 0), "meta"])
def test_load_checkpoint_onto_any_device_get_device_takes(tmp_path, device):
    """safetensors reads onto cpu or cuda only: cpu:0 and meta were blamed on the file (audit 30)."""
    path = tmp_path / "m.safetensors"
    checkpoint.save_checkpoint(path, torch.nn.Linear(2, 3), {"n": 2}, kind="test")
    state, meta = checkpoint.load_checkpoint(path, device)
    assert meta["kind"] == "test" and sorted(state) == ["bias", "weight"]
    assert {t.device.type for t in state.values()} == {torch.device(device).type}


def test_the_calibrators_cache_warning_points_at_the_callers_line_and_says_what_to_do(tmp_path, monkeypatch):
    """It pointed inside ar_course/kernels/ops.py, and its advice ("name a file inside it") fit a CLI --out, not
    a cache path the user never chose (audit 30)."""
    from ar_course.kernels import ops

    monkeypatch.setattr(ops, "CALIBRATOR", Calibrator(timer=lambda fn: (fn(), 1.0)[1], path=tmp_path,
                                                      device_types=("cpu",)))
    z, codebook = torch.randn(4096, 8), torch.randn(512, 8)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        K.vq_nearest(z, codebook)  # the caller's line
    mine = [w for w in seen if "cannot keep kernel choices" in str(w.message)]
    assert len(mine) == 1 and mine[0].filename == __file__
    assert "set XDG_CACHE_HOME to a writable folder" in str(mine[0].message)


def test_the_numba_import_order_warning_points_at_the_users_import(tmp_path):
    script = tmp_path / "mine.py"
    script.write_text("import warnings\nwarnings.simplefilter('always')\nfrom numba import cuda\n"
                      "import ar_course.kernels\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    err = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env).stderr
    assert f"{script}:4: UserWarning: numba.cuda was imported before ar_course.kernels" in err
