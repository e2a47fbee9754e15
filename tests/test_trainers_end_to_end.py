"""Trainer paths no other test runs to the end (coverage audit, finding 1): ``train var`` and ``train continuous``
(held-out loss, class-accuracy sweep, checkpoint write), ``train tokenizer --quantizer kl`` (the calibration),
``--dataset shapes`` for ``tokenizer`` and ``var``, and ``train grpo`` / ``train cca`` with ``--eval-per-class``.

Each runs in-process through :func:`ar_course.cli.main` on one torch thread with the smallest options, then checks
the exit status, the written checkpoint (it loads, of the right kind) and what the run printed and recorded."""

from __future__ import annotations

import math
import re

import pytest
import torch

from ar_course import checkpoint
from ar_course.continuous import train as continuous_train
from ar_course.continuous.model import ContinuousAR, ContinuousARConfig
from ar_course.masked import train as masked_train
from ar_course.metrics import DATASETS
from ar_course.raster import train as raster_train
from ar_course.tokenizers import VQVAE
from ar_course.tokenizers.train import default_config
from ar_course.train import TrainConfig, lr_at
from ar_course.transformer import GPT
from ar_course.var import train as var_train
from ar_course.var.model import VAR, VARConfig
from cli_helpers import one_torch_thread, run

PERCENT = r"(\d+(?:\.\d)?)%"


def train(capsys, *argv: object) -> str:
    """stdout of ``train ARGV --no-progress`` on one torch thread, after checking exit status 0 and an empty
    stderr but for warnings."""
    with one_torch_thread():
        status, out, err = run(capsys, "train", *argv, "--no-progress")
    assert status == 0, err
    assert "Traceback" not in err and "error:" not in err, err
    return out


def saved_line(out: str, path) -> None:
    """The run's last line names the file it wrote, with its size in KB; no training state is left beside it."""
    last = out.strip().splitlines()[-1]
    size = path.stat().st_size / 1024
    assert re.fullmatch(rf"(.*; )?saved {re.escape(str(path))} \((\d+) KB\)", last), last
    assert int(re.search(r"\((\d+) KB\)$", last).group(1)) == round(size), (last, size)
    assert not list(path.parent.glob("*.train-state.safetensors"))  # the training state is removed at the end


def accuracy_sweep(out: str, recorded: dict, guidance: tuple[float, ...], n_images: int) -> None:
    """The recorded ``accuracy_by_cfg`` holds one accuracy per guidance strength: a fraction of ``n_images``
    samples in [0, 1]; the printed sweep shows the same values as percentages, in the same order."""
    assert list(recorded) == [str(w) for w in guidance]
    for w, a in recorded.items():
        assert isinstance(a, float) and 0.0 <= a <= 1.0, (w, a)
        assert math.isclose(a * n_images, round(a * n_images), abs_tol=1e-6), (w, a)  # k correct of n_images
    shown = re.search(r"class accuracy by guidance strength (.*)$", out, re.M).group(1)
    printed = re.findall(rf"w=([0-9.]+): {PERCENT}", shown)
    assert [w for w, _ in printed] == list(recorded), shown
    assert [float(p) for _, p in printed] == [round(100 * a, 1) for a in recorded.values()], shown


def test_train_var_end_to_end(capsys, tmp_path):
    path = tmp_path / "var.safetensors"
    out = train(capsys, "var", "--steps", "2", "--batch-size", "4", "--train-images", "16", "--eval-per-class", "1",
                "--n-layer", "1", "--device", "cpu", "--out", path)
    model = checkpoint.load(path, kind="var")
    assert isinstance(model, VAR) and not model.training
    info = checkpoint.info(path)
    assert (info["kind"], info["steps"], info["train_images"], info["eval_per_class"]) == ("var", 2, 16, 1)
    assert info["dataset"] == "mnist" and info["tokenizer"] == "mnist_msvq"
    n_scales = len(model.config.scales)
    assert len(info["test_loss_per_scale"]) == n_scales
    # the held-out loss is the token-weighted mean of the per-scale losses: a scale of side s has s*s tokens
    sides = model.config.scales
    weighted = sum(s * s * v for s, v in zip(sides, info["test_loss_per_scale"])) / sum(s * s for s in sides)
    assert math.isclose(info["test_loss"], weighted, abs_tol=1e-3), (info["test_loss"], weighted)
    # untrained over a codebook of V codes: close to log V nats per token
    assert abs(info["test_loss"] - math.log(model.config.vocab_size)) < 1.0, info["test_loss"]
    first = out.splitlines()[0]
    assert first.startswith(f"test loss {info['test_loss']:.4f} nats/token (per scale "), first
    accuracy_sweep(first, info["accuracy_by_cfg"], (0.0, 1.0, 2.0, 4.0), 10)
    saved_line(out, path)
    _, tokenizer = checkpoint.load_with_tokenizer(path)
    assert isinstance(tokenizer, VQVAE) and tokenizer.config.quantizer == "msvq"


def test_train_continuous_end_to_end(capsys, tmp_path):
    path = tmp_path / "continuous.safetensors"
    out = train(capsys, "continuous", "--steps", "2", "--batch-size", "4", "--eval-per-class", "1", "--eval-steps",
                "1", "--n-layer", "1", "--n-embd", "32", "--head-width", "32", "--head-depth", "1",
                "--device", "cpu", "--out", path)
    model = checkpoint.load(path, kind="continuous_ar")
    assert isinstance(model, ContinuousAR) and not model.training
    info = checkpoint.info(path)
    assert (info["kind"], info["steps"], info["eval_per_class"], info["eval_steps"]) == ("continuous_ar", 2, 1, 1)
    assert (model.config.n_layer, model.config.n_embd, model.config.head_width) == (1, 32, 32)
    assert math.isfinite(info["test_loss"]) and info["test_loss"] > 0
    first = out.splitlines()[0]
    assert first.startswith(f"test flow-matching loss {info['test_loss']:.4f}; "), first
    accuracy_sweep(first, info["accuracy_by_cfg"], (0.0, 1.0, 2.0), 10)
    saved_line(out, path)
    # the weights are stored as float16 and load back as the model's float32 parameters
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _, tokenizer = checkpoint.load_with_tokenizer(path)
    assert tokenizer.config.quantizer == "kl"


def test_train_tokenizer_kl_calibrates_its_tokens(capsys, tmp_path):
    path = tmp_path / "kl.safetensors"
    out = train(capsys, "tokenizer", "--quantizer", "kl", "--steps", "1", "--batch-size", "4", "--device", "cpu",
                "--out", path)
    model = checkpoint.load(path, kind="tokenizer")
    assert isinstance(model, VQVAE) and model.config.quantizer == "kl"
    info = checkpoint.info(path)
    assert (info["kind"], info["dataset"], info["steps"]) == ("tokenizer", "mnist", 1)
    # calibrate() replaced the identity standardisation (shift 0, scale 1) with the training latents' statistics
    q = model.quantizer
    assert q.shift.shape == q.scale.shape == (model.config.latent_dim,)
    assert not torch.equal(q.shift, torch.zeros_like(q.shift))
    assert not torch.equal(q.scale, torch.ones_like(q.scale))
    assert bool((q.scale > 0).all())
    psnr = info["held_out"]["psnr"]
    assert math.isfinite(psnr) and psnr > 0
    assert re.fullmatch(rf"mnist/kl: held-out PSNR {psnr:.2f} dB; saved {re.escape(str(path))} \(\d+ KB\)",
                        out.strip()), out
    assert "codebook usage" not in out  # a continuous tokenizer has no codebook


def test_train_tokenizer_on_shapes(capsys, tmp_path):
    path = tmp_path / "shapes.safetensors"
    out = train(capsys, "tokenizer", "--quantizer", "msvq", "--dataset", "shapes", "--steps", "1", "--batch-size",
                "4", "--device", "cpu", "--out", path)
    model = checkpoint.load(path, kind="tokenizer")
    assert isinstance(model, VQVAE) and model.config.quantizer == "msvq"
    assert model.config.in_channels == DATASETS["shapes"][0] == 3
    info = checkpoint.info(path)
    assert (info["dataset"], info["steps"], info["batch_size"]) == ("shapes", 1, 4)
    held = info["held_out"]
    assert 0.0 < held["fraction_used"] <= 1.0 and 1.0 <= held["perplexity"] <= model.config.num_codes
    assert out.startswith(f"shapes/msvq: held-out PSNR {held['psnr']:.2f} dB, codebook usage "
                          f"{held['fraction_used']:.1%} (perplexity {held['perplexity']:.1f}); saved "), out
    saved_line(out, path)
    images = torch.rand(2, 3, 32, 32)
    assert model(images).recon.shape == images.shape


def test_train_var_on_shapes(capsys, tmp_path):
    # an untrained 3-channel msvq tokenizer (a trained one is not needed to run the trainer to the end)
    config = default_config("msvq", "shapes", num_codes=16, width=8)
    torch.manual_seed(0)
    tokenizer_path = checkpoint.save_checkpoint(tmp_path / "tok.safetensors", VQVAE(config).eval(), config,
                                                kind="tokenizer", dataset="shapes")
    path = tmp_path / "var.safetensors"
    out = train(capsys, "var", "--dataset", "shapes", "--tokenizer", tokenizer_path, "--steps", "1", "--batch-size",
                "4", "--train-images", "16", "--eval-per-class", "1", "--n-layer", "1", "--device", "cpu",
                "--out", path)
    model = checkpoint.load(path, kind="var")
    assert isinstance(model, VAR)
    n_classes = DATASETS["shapes"][1]
    assert (model.config.n_classes, model.config.vocab_size) == (n_classes, 16) == (4, 16)
    info = checkpoint.info(path)
    assert (info["dataset"], info["train_images"], info["tokenizer"]) == ("shapes", 16, "tok.safetensors")
    accuracy_sweep(out.splitlines()[0], info["accuracy_by_cfg"], (0.0, 1.0, 2.0, 4.0), n_classes)
    saved_line(out, path)
    _, tokenizer = checkpoint.load_with_tokenizer(path)
    assert tokenizer.config.in_channels == 3


def _accuracy_cfg0(out: str, info: dict, n_images: int) -> None:
    a = info["accuracy_cfg0"]
    assert isinstance(a, float) and 0.0 <= a <= 1.0, a
    assert math.isclose(a * n_images, round(a * n_images), abs_tol=1e-6), a
    assert out.splitlines()[0] == f"class accuracy at guidance 0: {a:.1%}", out
    assert info["eval_per_class"] == 1


def test_train_grpo_with_evaluation(capsys, tmp_path):
    path = tmp_path / "grpo.safetensors"
    out = train(capsys, "grpo", "--steps", "1", "--group-size", "2", "--eval-per-class", "1", "--device", "cpu",
                "--out", path)
    model = checkpoint.load(path, kind="raster_ar")
    assert isinstance(model, GPT)
    info = checkpoint.info(path)
    assert (info["kind"], info["method"], info["base"]) == ("raster_ar", "grpo", "ar_mnist")
    assert info["options"]["steps"] == 1 and info["options"]["group_size"] == 2
    _accuracy_cfg0(out, info, model.config.n_classes)
    saved_line(out, path)


def test_train_cca_var_with_evaluation(capsys, tmp_path):
    path = tmp_path / "cca.safetensors"
    out = train(capsys, "cca", "--model", "var", "--steps", "1", "--batch-size", "4", "--train-images", "40",
                "--eval-per-class", "1", "--device", "cpu", "--out", path)
    model = checkpoint.load(path, kind="var")
    assert isinstance(model, VAR)
    info = checkpoint.info(path)
    assert (info["kind"], info["method"], info["base"]) == ("var", "cca", "var_mnist")
    _accuracy_cfg0(out, info, model.config.n_classes)
    saved_line(out, path)


@pytest.mark.parametrize("argv", [["grpo", "--group-size", "2"], ["cca", "--model", "var", "--batch-size", "4",
                                                                   "--train-images", "40"]])
def test_align_trainers_without_evaluation_record_none(capsys, tmp_path, argv):
    path = tmp_path / "x.safetensors"
    out = train(capsys, *argv, "--steps", "1", "--eval-per-class", "0", "--device", "cpu", "--out", path)
    info = checkpoint.info(path)
    assert info["accuracy_cfg0"] is None and info["eval_per_class"] == 0
    assert out.splitlines()[0] == "class accuracy at guidance 0: not measured (--eval-per-class 0)"


class _Config(Exception):
    """Raised by a stand-in train_loop: carries the TrainConfig a trainer built."""


def _trainer_schedule(monkeypatch, module, call) -> TrainConfig:
    """The TrainConfig ``call`` passes to ``module.train_loop`` (nothing trains)."""
    def caught(model, loss_fn, batches, config, **kwargs):
        raise _Config(config)

    monkeypatch.setattr(module, "train_loop", caught)
    with pytest.raises(_Config) as got:
        call()
    return got.value.args[0]


@pytest.mark.parametrize("steps, warmup", [(60, 20), (2, 0), (300, 100), (1500, 100)])
def test_a_short_image_run_reaches_its_lr_and_decays_to_the_floor(monkeypatch, steps, warmup):
    """A fixed 100-step warmup left a 60-step run of the raster, VAR, MaskGIT and continuous trainers at 0.6 lr
    and never decayed; runs of 300 steps or more (every default and the VAR scaling study) keep 100."""
    tok = VQVAE(default_config("vq", "mnist", num_codes=16))
    maps, labels = torch.randint(0, 16, (8, 4, 4)), torch.arange(8) % 2
    small = {"steps": steps, "batch_size": 4, "progress": False}
    calls = {
        raster_train: lambda: raster_train.train_ar(tok, maps, labels, n_layer=1, n_embd=16, n_head=2, **small),
        masked_train: lambda: masked_train.train_maskgit(tok, maps, labels, n_layer=1, n_embd=16, n_head=2, **small),
        var_train: lambda: var_train.train_var(
            tok, torch.randint(0, 16, (8, 5)), labels,
            VARConfig(vocab_size=16, latent_dim=16, scales=(1, 2), n_classes=2, n_layer=1, n_head=2, n_embd=16),
            **small),
        continuous_train: lambda: continuous_train.train_continuous(
            torch.randn(8, 4, 4), labels, ContinuousARConfig(grid=(2, 2), n_classes=2, n_layer=1, n_head=2,
                                                             n_embd=16, head_width=8, head_depth=1), **small),
    }
    for module, call in calls.items():
        config = _trainer_schedule(monkeypatch, module, call)
        assert (config.steps, config.warmup) == (steps, warmup), module.__name__
        lrs = [lr_at(s, config) / config.lr for s in range(steps + 1)]
        assert max(lrs) == 1.0 and lrs[-1] == pytest.approx(config.min_lr_ratio), module.__name__


@pytest.mark.parametrize("steps, warmup", [(60, 20), (150, 50), (1500, 50)])
def test_a_short_classifier_run_reaches_its_lr_too(monkeypatch, steps, warmup):
    """The classifier's fixed 50-step warmup: a 60-step run never reached its lr (150 steps and more: 50)."""
    from ar_course import metrics

    config = _trainer_schedule(monkeypatch, metrics, lambda: metrics.train_classifier("mnist", steps=steps,
                                                                                       progress=False))
    assert (config.steps, config.warmup) == (steps, warmup)
    lrs = [lr_at(s, config) / config.lr for s in range(steps + 1)]
    assert max(lrs) == 1.0 and lrs[-1] == pytest.approx(config.min_lr_ratio)
