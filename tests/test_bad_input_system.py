"""Bad input to the full system's Generator, the device choice and the evaluation classifier: a clear
``TypeError``/``ValueError`` naming the argument when the object is made, never an ``AttributeError`` at
generation time or a silently wrong number."""

from __future__ import annotations

import pytest
import torch

from ar_course import metrics
from ar_course.raster import raster_config
from ar_course.system import Generator
from ar_course.tokenizers import VQVAE, VQVAEConfig
from ar_course.transformer import GPT, GPTConfig
from ar_course.utils import get_device
from ar_course.var import VAR, VARConfig


@pytest.fixture(scope="module")
def tok():
    return VQVAE(VQVAEConfig(num_codes=5, latent_dim=4, width=8, downsample=8)).eval()  # a 4x4 map of 5 codes


@pytest.fixture(scope="module")
def mstok():
    return VQVAE(VQVAEConfig(quantizer="msvq", num_codes=5, latent_dim=4, width=8, downsample=8,
                             scales=(1, 2, 4))).eval()


def raster(vocab=5, grid=(4, 4), n_classes=3):
    return GPT(raster_config(vocab, grid=grid, n_classes=n_classes, n_layer=1, n_head=2, n_embd=16)).eval()


def test_a_valid_pair_builds_and_generates(tok, mstok):
    var_model = VAR(VARConfig(vocab_size=5, latent_dim=4, scales=(1, 2, 4), n_classes=3, n_layer=1, n_head=2,
                              n_embd=16)).eval()
    gen = Generator(var_model, mstok, raster(), tok, ar_draft=raster())
    assert gen.generate([0, 2], method="ar", seed=0).images.shape == (2, 1, 32, 32)
    assert gen.generate([1], method="var", seed=0).images.shape == (1, 1, 32, 32)


@pytest.mark.parametrize("build, error, match", [
    (lambda tok, ms: Generator(raster(), tok), TypeError, "var_model must be a VAR, got GPT"),
    (lambda tok, ms: Generator(ar_model=raster(), ar_tokenizer=raster()), TypeError,
     "ar_tokenizer must be a VQVAE, got GPT"),
    (lambda tok, ms: Generator(ar_model=raster(3), ar_tokenizer=tok), ValueError,
     "ar_model does not fit ar_tokenizer: tokenizer has 5 codes but the model a vocabulary of 3"),
    (lambda tok, ms: Generator(ar_model=raster(9), ar_tokenizer=tok), ValueError, "vocabulary of 9"),
    (lambda tok, ms: Generator(ar_model=raster(grid=(3, 3)), ar_tokenizer=tok), ValueError,
     r"ar_model does not fit ar_tokenizer: tokenizer maps must match the model's 3x3 grid, got \(4, 4\)"),
    (lambda tok, ms: Generator(ar_model=GPT(GPTConfig(vocab_size=5, block_size=17, n_layer=1, n_head=2,
                                                      n_embd=16)), ar_tokenizer=tok), ValueError,
     "causal, class-conditional raster model"),
    (lambda tok, ms: Generator(ar_model=raster(), ar_tokenizer=ms), ValueError, "one code map per image"),
    (lambda tok, ms: Generator(ar_model=raster(), ar_tokenizer=tok, ar_draft=raster(4)), ValueError,
     "ar_draft does not fit ar_tokenizer: tokenizer has 5 codes but the model a vocabulary of 4"),
    (lambda tok, ms: Generator(ar_model=raster(), ar_tokenizer=tok, ar_draft=raster(n_classes=2)), ValueError,
     "ar_draft models 2 classes, ar_model 3"),
    (lambda tok, ms: Generator(ar_model=raster(), ar_tokenizer=tok, ar_draft=tok), TypeError,
     "ar_draft must be a GPT"),
    (lambda tok, ms: Generator(VAR(VARConfig(vocab_size=5, latent_dim=4, scales=(1, 2, 4), n_classes=10, n_layer=1,
                                             n_head=2, n_embd=16)), ms, raster(), tok), ValueError,
     "var_model models 10 classes, ar_model 3: one Generator's models must share their classes"),
    (lambda tok, ms: Generator(VAR(VARConfig(vocab_size=5, latent_dim=4, scales=(1, 2), n_classes=3, n_layer=1,
                                             n_head=2, n_embd=16)), ms), ValueError, "does not match the model"),
    # a draft alone was told "a Generator needs a VAR model or a raster AR model"
    (lambda tok, ms: Generator(ar_draft=raster()), ValueError,
     r"^ar_draft needs the raster model it drafts for \(ar_model\)$"),
    (lambda tok, ms: Generator(ar_model=raster(), ar_tokenizer=tok, default_cfg={"raster": 0.0}), ValueError,
     r"^default_cfg's keys must be methods \('var', 'ar'\), got \['raster'\]$"),
    (lambda tok, ms: Generator(ar_model=raster(), ar_tokenizer=tok, default_cfg={"ar": -1.0}), ValueError,
     r"^default_cfg\['ar'\] must be a finite number >= 0, got -1.0$"),
])
def test_generator_refuses_models_that_do_not_fit(tok, mstok, build, error, match):
    with pytest.raises(error, match=match):
        build(tok, mstok)


def test_more_neighbours_than_other_codes_is_refused_before_any_work(tok, monkeypatch):
    gen = Generator(ar_model=raster(), ar_tokenizer=tok)  # 5 codes: each has at most 4 other codes
    monkeypatch.setattr(gen.strategies["ar", "jacobi"], "run",
                        lambda *args, **kwargs: pytest.fail("generation started before neighbors was checked"))
    for delta in (0.0, 0.3):  # checked even where relaxed acceptance does not use it
        with pytest.raises(ValueError, match=r"^neighbors must be an integer in \[0, 4\], got 5$"):
            gen.generate([0], method="ar", speculative="jacobi", relaxed_delta=delta, neighbors=5)
    monkeypatch.undo()
    out = gen.generate([0], method="ar", speculative="jacobi", relaxed_delta=0.3, neighbors=4, seed=0)
    assert out.images.shape == (1, 1, 32, 32)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "nonsense"])
def test_an_unknown_device_is_a_value_error(device):
    with pytest.raises(ValueError, match=f"unknown device '{device}'"):
        get_device(device)
    with pytest.raises(ValueError, match="unknown device"):
        Generator.from_pretrained("mnist", device=device)


def test_auto_is_the_default_device():
    assert get_device("auto") == get_device()


@pytest.mark.parametrize("call, error, match", [
    (lambda: metrics.class_accuracy(torch.rand(2, 1, 32, 32), [3, 7]), TypeError, "labels must be a"),
    (lambda: metrics.class_accuracy(torch.rand(2, 1, 32, 32), torch.tensor([10, 1])), ValueError,
     r"labels must lie in \[0, 9\], got 10"),
    (lambda: metrics.class_accuracy(torch.rand(2, 1, 32, 32), torch.tensor([1.0, 2.0])), ValueError,
     "labels must be a"),
    (lambda: metrics.class_accuracy(torch.rand(2, 1, 32, 32), torch.tensor([1, 2, 3])), ValueError,
     r"labels must be a \(2,\)"),
    (lambda: metrics.classify(torch.full((2, 1, 32, 32), float("nan"))), ValueError, "images must be finite"),
    (lambda: metrics.classifier_features(torch.rand(2, 1, 32, 32).index_fill_(2, torch.tensor([3]), float("inf"))),
     ValueError, "images must be finite"),
    (lambda: metrics.classify(torch.rand(2, 1, 32, 32), batch_size=0), ValueError, "batch_size must be"),
])
def test_classifier_metrics_check_labels_and_images(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_class_accuracy_takes_any_integer_labels():
    images = torch.rand(3, 1, 32, 32)
    labels = metrics.classify(images)
    assert metrics.class_accuracy(images, labels.int()) == 1.0


def test_a_var_model_with_a_single_scale_tokenizer_does_not_fit(tok, tmp_path, capsys):
    """A VQVAE of another quantizer is a pair that does not fit (ValueError), and a VAR checkpoint recording one
    is a usage error naming the file, as any other mismatch (not a TypeError, exit 1)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ar_course.checkpoint import ASSETS
    from ar_course.cli import main as cli_main

    var_model = VAR(VARConfig(vocab_size=5, latent_dim=4, scales=(1, 2, 4), n_classes=3, n_layer=1, n_head=2,
                              n_embd=16)).eval()
    with pytest.raises(ValueError, match="^var_model does not fit var_tokenizer: vq must be a MultiScaleVQ, got "
                                         "VectorQuantizer$"):
        Generator(var_model, tok)
    path = tmp_path / "var.safetensors"
    with safe_open(str(ASSETS / "var_mnist.safetensors"), framework="pt") as f:
        raw, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, str(path), metadata={**raw, "extra": json.dumps({**json.loads(raw["extra"]),
                                                                      "tokenizer": "mnist_vq"})})
    assert cli_main(["generate", "--out", str(tmp_path / "g.png"), "--var-checkpoint", str(path),
                     "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"error: {path}: var_model does not fit var_tokenizer: vq must be a " \
                                      f"MultiScaleVQ, got VectorQuantizer\n"
