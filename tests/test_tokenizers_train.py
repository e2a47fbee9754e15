"""The tokenizer trainer (``python -m ar_course train tokenizer``) and the shipped tokenizers."""

import pytest
import torch

from ar_course.checkpoint import load_checkpoint
from ar_course.tokenizers import PRETRAINED, VQVAE, load_pretrained, pretrained_info, pretrained_path
from ar_course.tokenizers import train as tok_train


def test_help_works(capsys):
    with pytest.raises(SystemExit) as info:
        tok_train.main(["--help"])
    assert info.value.code == 0
    assert "--quantizer" in capsys.readouterr().out


@pytest.mark.parametrize("quantizer", ["vq", "rvq", "msvq"])
def test_tiny_training_run_writes_a_loadable_checkpoint(quantizer, tmp_path, monkeypatch):
    images = torch.rand(80, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(tok_train, "load_images", lambda dataset, split: images[:64] if split == "train" else images[64:])
    out = tmp_path / f"{quantizer}.safetensors"
    assert tok_train.main(["--quantizer", quantizer, "--steps", "3", "--num-codes", "16", "--device", "cpu",
                           "--out", str(out)]) == 0
    state, meta = load_checkpoint(out)
    assert meta["kind"] == "tokenizer" and meta["config"]["quantizer"] == quantizer
    assert set(meta["extra"]["held_out"]) == {"psnr", "mse", "fraction_used", "perplexity"}


def test_training_is_deterministic_under_its_seed():
    images = torch.rand(40, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    config = tok_train.default_config("msvq", num_codes=16, width=8)
    runs = [tok_train.train_tokenizer(config, steps=3, seed=5, batch_size=8, train_images=images,
                                      test_images=images[:8], progress=False, device="cpu")[0] for _ in range(2)]
    for (name, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        assert torch.equal(a, b), name


def _images(n=6):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def test_evaluate_runs_in_eval_mode_and_restores_train_mode():
    """evaluate measures in eval mode (no sampling noise, no EMA or usage update) and gives the model back in the
    mode it came in (it runs in the middle of training with eval_every)."""
    torch.manual_seed(0)
    model = VQVAE(tok_train.default_config("vq", ema=True)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = tok_train.evaluate(model, _images())
    assert model.training  # given back in train mode
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # no EMA / usage update
    assert tok_train.evaluate(model.eval(), _images()) == first


def test_training_batches_are_always_full(monkeypatch):
    """The training batches are always full: the last partial chunk of each shuffled pass (10 images, batch 4)
    is skipped."""
    seen = []

    def fake_loop(model, loss_fn, batches, config, **kwargs):
        seen.extend(next(batches).shape[0] for _ in range(7))
        raise StopIteration

    monkeypatch.setattr(tok_train, "train_loop", fake_loop)
    with pytest.raises(StopIteration):
        tok_train.train_tokenizer(tok_train.default_config("vq"), steps=1, batch_size=4, device="cpu",
                                  progress=False, train_images=_images(10), test_images=_images(2))
    assert seen == [4] * 7


@pytest.mark.parametrize("name, tokens", [("mnist_vq", 64), ("mnist_msvq", 130)])
def test_shipped_tokenizers(name, tokens):
    if not pretrained_path(name).is_file():
        pytest.skip(f"{name} not built yet")
    model = load_pretrained(name)
    assert isinstance(model, VQVAE) and not model.training
    assert model.tokens_per_image == tokens
    assert model.config.num_codes == 256 and model.config.latent_dim == 16 and model.config.downsample == 4
    assert pretrained_path(name).stat().st_size < 1_000_000
    info = pretrained_info(name)
    assert info["held_out"]["fraction_used"] >= 0.9 and info["held_out"]["psnr"] > 20
    x = torch.zeros(2, 1, 32, 32)
    x[:, :, 8:24, 14:18] = 1.0  # a crude "1"
    tokens_out = model.encode_to_indices(x)
    assert model.decode_from_indices(tokens_out).shape == x.shape


def test_shipped_multiscale_tokenizer_within_1db_of_vq_and_monotone():
    """Chapter 01's target on 1,000 held-out digits: the shipped multi-scale tokenizer reconstructs within
    1 dB PSNR of the shipped single-scale one, and its PSNR rises with every scale decoded."""
    from ar_course.data import load_mnist
    from ar_course.metrics import psnr

    if not all(pretrained_path(n).is_file() for n in PRETRAINED):
        pytest.skip("shipped tokenizers not built yet")
    x = load_mnist("test", size=32)[0][:1000]
    vq, ms = load_pretrained("mnist_vq"), load_pretrained("mnist_msvq")
    with torch.no_grad():
        vq_psnr = psnr(vq(x).recon, x)
        pyramid = ms.encode_to_indices(x)
        by_scale = [psnr(ms.decode_from_indices(pyramid[:k]), x) for k in range(1, len(pyramid) + 1)]
    assert vq_psnr - 1.0 <= by_scale[-1] < vq_psnr, (by_scale, vq_psnr)
    assert all(a < b for a, b in zip(by_scale, by_scale[1:])), by_scale


def test_unknown_pretrained_name():
    with pytest.raises(ValueError, match="mnist_vq"):
        load_pretrained("imagenet")
    assert PRETRAINED == ("mnist_vq", "mnist_msvq", "mnist_kl")


@pytest.mark.parametrize("shared", [False, True])
def test_evaluate_counts_residual_levels_in_their_own_codebooks(shared):
    """rvq's levels have a codebook each (unless shared): evaluate pooled their codes into one count, so a
    trained tokenizer reported 100% usage where its levels used 74% (audit 29). It now averages the levels as
    ResidualVQ.usage does; a shared codebook is counted once, as before."""
    from dataclasses import replace

    from ar_course.metrics import codebook_usage

    torch.manual_seed(0)
    model = VQVAE(replace(tok_train.default_config("rvq", num_codes=16, width=8), shared_codebook=shared)).eval()
    images = _images()
    got = tok_train.evaluate(model, images, batch_size=3)
    with torch.no_grad():
        idx = model.encode_to_indices(images)  # (N, depth, h, w)
    levels = [codebook_usage(idx[:, d], 16) for d in range(idx.shape[1])]
    pooled = codebook_usage(idx, 16)
    want = pooled if shared else {k: sum(s[k] for s in levels) / len(levels) for k in ("fraction_used", "perplexity")}
    assert got["fraction_used"] == pytest.approx(want["fraction_used"])
    assert got["perplexity"] == pytest.approx(want["perplexity"])
    if not shared:
        assert want["perplexity"] < pooled["perplexity"]  # the pooled count mixes the levels' codes
