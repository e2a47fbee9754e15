"""Bad input to the tokenizers (API audit 2, items 2, 5, 9, 10, 13-17): each case must raise a one-line
``TypeError``/``ValueError`` naming the argument, instead of a crash inside torch or a silently wrong result; valid
input keeps working."""

from __future__ import annotations

import pytest
import torch

from ar_course.tokenizers import FSQ, LFQ, VQVAE, MultiScaleVQ, ResidualVQ, VectorQuantizer, VQVAEConfig, token_count
from ar_course.tokenizers import functional as Fq
from ar_course.tokenizers.continuous import GaussianBottleneck

NAN = float("nan")
BASE = dict(image_size=8, downsample=2, width=4, latent_dim=3, num_codes=5)


def _tok(**change) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**{**BASE, **change})).eval()


def _nan_map(*shape: int) -> torch.Tensor:
    z = torch.randn(*shape)
    z[0, 0, 0, 0] = NAN
    return z


# -- item 2: images outside [0, 1] -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale, shift", [(255.0, 0.0), (2.0, -1.0)])  # 0..255 and [-1, 1] images
@pytest.mark.parametrize("call", ["encode_to_indices", "reconstruct", "forward_eval", "forward_train"])
def test_vqvae_refuses_images_outside_unit_range(scale, shift, call):
    tok = _tok()
    x = torch.rand(2, 1, 8, 8) * scale + shift
    run = {"encode_to_indices": tok.encode_to_indices, "reconstruct": tok.reconstruct,
           "forward_eval": tok, "forward_train": tok.train()}[call]
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\], got values in \["):
        run(x)


def test_vqvae_still_takes_unit_range_images():
    tok = _tok()
    x = torch.rand(2, 1, 8, 8)
    assert tok.encode_to_indices(x).shape == (2, 4, 4)
    assert tok(x).recon.shape == (2, 1, 8, 8)
    assert tok.train()(x).loss.ndim == 0


# -- item 5: float64 / float16 input to the quantizers' forward -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("make, shape", [
    (lambda: VectorQuantizer(5, 3), (1, 3, 2, 2)),
    (lambda: ResidualVQ(5, 3, depth=2), (1, 3, 2, 2)),
    (lambda: MultiScaleVQ(5, 3, scales=(1, 2, 4)), (1, 3, 4, 4)),
])
def test_quantizer_forward_casts_like_encode(make, shape, dtype):
    torch.manual_seed(0)
    q = make().eval()
    z = torch.randn(shape)
    out = q(z.to(dtype))
    assert out.z_q.dtype == torch.float32
    expected = q.encode(z.to(dtype))
    got = out.indices
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) if isinstance(got, list) else torch.equal(
        got, expected)


def test_vq_lookup_casts_z_to_the_codebook_dtype():
    torch.manual_seed(0)
    z, codebook = torch.randn(6, 3), torch.randn(5, 3)
    assert torch.equal(Fq.vq_lookup(z.double(), codebook), Fq.vq_lookup(z, codebook))


# -- items 9, 10: decode of another latent grid, reconstruct of a list -------------------------------------------


@pytest.mark.parametrize("latents", [torch.randn(1, 3, 3, 3), torch.randn(1, 3, 8, 8)])
def test_decode_refuses_latents_of_another_grid(latents):
    tok = _tok()
    with pytest.raises(ValueError, match=r"latents \(B, 3, 4, 4\)"):
        tok.decode(latents)
    assert tok.decode(torch.randn(1, 3, 4, 4)).shape == (1, 1, 8, 8)


def test_reconstruct_refuses_a_list():
    with pytest.raises(TypeError, match=r"images must be a float \(B, 1, 8, 8\) tensor, got list"):
        _tok().reconstruct([[0.0]])


# -- item 13: hyper-parameters of the quantizers and the config ---------------------------------------------------


@pytest.mark.parametrize("make, error, match", [
    (lambda: VectorQuantizer(2.5, 3), TypeError, "num_codes must be an integer"),
    (lambda: VectorQuantizer("8", 3), TypeError, "num_codes must be an integer"),
    (lambda: VectorQuantizer(5, 3.0), TypeError, "dim must be an integer"),
    (lambda: VectorQuantizer(5, 3, beta=NAN), ValueError, "beta must be a finite number >= 0, got nan"),
    (lambda: VectorQuantizer(5, 3, beta="0.25"), TypeError, "beta must be a finite number"),
    (lambda: VectorQuantizer(5, 3, ema="no"), TypeError, "ema must be True or False"),
    (lambda: VectorQuantizer(5, 3, decay=NAN), ValueError, "decay must be a finite number in"),
    (lambda: VectorQuantizer(5, 3, eps=-1.0), ValueError, "eps must be a finite number >= 0"),
    (lambda: VectorQuantizer(5, 3, dead_code_threshold=NAN), ValueError, "dead_code_threshold"),
    (lambda: VectorQuantizer(5, 3, usage_window=2.5), TypeError, "usage_window must be an integer"),
    (lambda: VectorQuantizer(5, 3, kmeans_iters=2.5), TypeError, "kmeans_iters must be an integer"),
    (lambda: ResidualVQ(5, 3, depth=2.0), TypeError, "depth must be an integer"),
    (lambda: ResidualVQ(5, 3, shared_codebook="yes"), TypeError, "shared_codebook must be True or False"),
    (lambda: MultiScaleVQ(5, 3, scales=(1, 2, 4), num_phi=2.0), TypeError, "num_phi must be an integer"),
    (lambda: MultiScaleVQ(5, 3, scales=(1, 2, 4), phi_ratio=NAN), ValueError, "phi_ratio must be a finite number"),
    (lambda: MultiScaleVQ(5, 3, scales=(1, 2.5, 4)), TypeError, "scale must be an integer >= 1, got 2.5"),
    (lambda: MultiScaleVQ(5, 3, scales=(1, 2, 4), final_weight=NAN), ValueError, "final_weight must be a finite"),
    (lambda: LFQ(4, temperature=NAN), ValueError, "temperature must be a finite number > 0, got nan"),
    (lambda: LFQ(4, entropy_weight=NAN), ValueError, "entropy_weight must be a finite number >= 0"),
    (lambda: LFQ(4, beta="0.25"), TypeError, "beta must be a finite number"),
    (lambda: GaussianBottleneck(2, kl_weight="0.1"), TypeError, "kl_weight must be a finite number"),
])
def test_quantizer_hyper_parameters_are_checked(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("change, error, match", [
    ({"ema": "no"}, TypeError, "ema must be True or False"),
    ({"l2_norm": 1}, TypeError, "l2_norm must be True or False"),
    ({"beta": "0.25"}, TypeError, "beta must be a finite number >= 0"),
    ({"beta": NAN}, ValueError, "beta must be a finite number >= 0, got nan"),
    ({"decay": 1.0}, ValueError, r"decay must be a finite number in \[0, 1\)"),
    ({"dead_code_threshold": -1.0}, ValueError, "dead_code_threshold"),
    ({"usage_window": 0}, ValueError, "usage_window must be an integer >= 1"),
    ({"quantizer": "msvq", "scales": (1, 2, 4), "msvq_final_weight": NAN}, ValueError, "msvq_final_weight"),
    ({"quantizer": "msvq", "scales": (1, 2.5, 4)}, TypeError, "scale must be an integer >= 1, got 2.5"),
    ({"quantizer": "msvq", "scales": "124"}, TypeError, "scales must be a sequence"),
    ({"quantizer": "msvq", "scales": (1, 2, 4), "phi_ratio": NAN}, ValueError, "phi_ratio"),
    ({"quantizer": "msvq", "scales": (1, 2, 4), "num_phi": 2.0}, TypeError, "num_phi must be an integer"),
    ({"quantizer": "msvq", "scales": (1, 2, 4), "msvq_loss": "sum"}, ValueError, "msvq_loss must be one of"),
    ({"quantizer": "lfq", "lfq_entropy_weight": NAN}, ValueError, "lfq_entropy_weight"),
    ({"quantizer": "kl", "kl_weight": NAN}, ValueError, "kl_weight"),
])
def test_vqvae_config_hyper_parameters_are_checked(change, error, match):
    with pytest.raises(error, match=match):
        VQVAEConfig(**{**BASE, **change})


@pytest.mark.parametrize("change, message", [
    ({"quantizer": "msvq", "scales": (1, 2, 4), "ema": True}, "ema applies to quantizer 'vq' / 'rvq' only, got "
                                                             "quantizer='msvq'"),
    ({"quantizer": "rvq", "l2_norm": True}, "l2_norm applies to quantizer 'vq' only, got quantizer='rvq'"),
    ({"quantizer": "fsq", "latent_dim": 3, "ema": True}, "ema applies to quantizer 'vq' / 'rvq' only"),
    ({"quantizer": "lfq", "latent_dim": 8, "l2_norm": True}, "l2_norm applies to quantizer 'vq' only"),
    ({"quantizer": "vq", "shared_codebook": True}, "shared_codebook applies to quantizer 'rvq' only, got "
                                                   "quantizer='vq'"),
    ({"quantizer": "kl", "rotation_trick": True}, "rotation_trick applies to quantizer 'vq' only, got quantizer='kl'"),
    ({"quantizer": "rvq", "kmeans_init": True}, "kmeans_init applies to quantizer 'vq' only"),
])
def test_vqvae_config_refuses_a_switch_its_quantizer_would_ignore(change, message):
    with pytest.raises(ValueError) as info:
        VQVAEConfig(**{**BASE, **change})
    assert str(info.value).startswith(message), info.value


def test_switches_reach_the_quantizers_that_implement_them():
    assert VQVAE(VQVAEConfig(**BASE, ema=True, l2_norm=True)).quantizer.ema  # vq: both
    assert VQVAE(VQVAEConfig(**BASE, l2_norm=True)).quantizer.l2_norm
    rvq = VQVAE(VQVAEConfig(**BASE, quantizer="rvq", ema=True, shared_codebook=True)).quantizer
    assert len(rvq.layers) == 1 and all(layer.ema for layer in rvq.layers)


def test_good_configs_keep_their_values():
    c = VQVAEConfig(**BASE, quantizer="msvq", scales=[1, 2, 4], beta=1, ema=False)
    assert c.scales == (1, 2, 4) and c.beta == 1.0
    assert MultiScaleVQ(5, 3, scales=[1, 2, 4]).scales == (1, 2, 4)


# -- item 14: non-finite input to FSQ / LFQ in training, GaussianBottleneck.calibrate ---------------------------


@pytest.mark.parametrize("make", [lambda: FSQ((8, 6, 5)), lambda: LFQ(3)])
def test_implicit_quantizers_refuse_nan_in_training(make):
    q = make().train()
    with pytest.raises(ValueError, match="z must be finite, got nan"):
        q(_nan_map(1, 3, 2, 2))
    q.eval()(_nan_map(1, 3, 2, 2))  # eval mode reads no values (no host sync), like VectorQuantizer


@pytest.mark.parametrize("h, match", [
    (torch.randn(1, 4, 1, 1), "at least 2 positions"),
    (torch.full((2, 4, 2, 2), NAN), "h must be finite, got nan"),
])
def test_calibrate_refuses_what_gives_nan_statistics(h, match):
    g = GaussianBottleneck(2)
    with pytest.raises(ValueError, match=match):
        g.calibrate(h)
    assert torch.equal(g.shift, torch.zeros(2)) and torch.equal(g.scale, torch.ones(2))


# -- item 15: the pure functions of chapter 01 --------------------------------------------------------------------

CB = torch.randn(5, 3)


def _ema(indices=torch.tensor([0, 1, 2, 3]), decay=0.99, eps=1e-5):
    return Fq.ema_update(torch.ones(5), torch.randn(5, 3), torch.randn(4, 3), indices, decay, eps)


@pytest.mark.parametrize("call, error, match", [
    (lambda: _ema(torch.tensor([0, 1, 2, 7])), ValueError, r"indices must lie in \[0, 4\], got 7"),
    (lambda: _ema(torch.tensor([0, 1, 2, -1])), ValueError, r"indices must lie in \[0, 4\], got -1"),
    (lambda: _ema(decay=1.5), ValueError, r"decay must be a finite number in \[0, 1\), got 1.5"),
    (lambda: _ema(eps=NAN), ValueError, "eps must be a finite number >= 0"),
    (lambda: Fq.usage_from_counts(torch.tensor([-1.0, 2.0])), ValueError, "counts must be finite and >= 0, got -1"),
    (lambda: Fq.usage_from_counts(torch.tensor([NAN, 2.0])), ValueError, "counts must be finite and >= 0, got nan"),
    (lambda: token_count([-2, 4]), ValueError, "scale must be an integer >= 1, got -2"),
    (lambda: token_count([1, 2.5]), TypeError, "scale must be an integer >= 1, got 2.5"),
    (lambda: token_count("1234"), TypeError, "scales must be a sequence of integers"),
    (lambda: Fq.embed_indices(torch.tensor([[[7]]]), CB), ValueError, r"indices must lie in \[0, 4\], got 7"),
    (lambda: Fq.embed_indices(torch.tensor([[[-1]]]), CB), ValueError, r"indices must lie in \[0, 4\], got -1"),
    (lambda: Fq.fsq_indices_to_codes(torch.tensor([240]), (8, 6, 5)), ValueError, r"indices must lie in \[0, 239\]"),
    (lambda: Fq.fsq_codes_to_indices(torch.tensor([[NAN, 0.0, 0.0]]), (8, 6, 5)), ValueError, "codes must be finite"),
    (lambda: Fq.lfq_indices_to_codes(torch.tensor([16]), 4), ValueError, r"indices must lie in \[0, 15\], got 16"),
    (lambda: Fq.lfq_indices_to_codes(torch.tensor([1]), 4.0), TypeError, "dim must be an integer"),
    (lambda: Fq.lfq_entropy_terms(torch.randn(4, 3), temperature=NAN), ValueError, "temperature must be a finite"),
    (lambda: Fq.kmeans(torch.randn(4, 3), 2.5), TypeError, "k must be an integer, got 2.5"),
    (lambda: Fq.downsample_area(torch.randn(1, 3, 4, 4), 0), ValueError, r"s must be an integer in \[1, 4\], got 0"),
    (lambda: Fq.phi_index(1, 3, 2.0), TypeError, "num_phi must be an integer, got 2.0"),
    (lambda: Fq.vq_lookup(torch.randn(4, 3), CB, chunk_size=2.5), TypeError, "chunk_size must be an integer"),
])
def test_functional_refuses_bad_arguments(call, error, match):
    with pytest.raises(error, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_functional_valid_edge_cases_still_work():
    assert token_count((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) == 680 and token_count(()) == 0
    assert Fq.usage_from_counts(torch.zeros(4)) == (0.0, 0.0)
    assert Fq.phi_index(0, 1, 4) == 0 and Fq.phi_index(2, 3, 2) == 1
    assert Fq.fsq_indices_to_codes(torch.arange(240), (8, 6, 5)).shape == (240, 3)
    assert torch.equal(Fq.lfq_indices_to_codes(torch.tensor([15]), 4), torch.ones(1, 4))
    size, _, _ = _ema(torch.tensor([0, 0, 4, 4]), decay=0.0)  # decay 0: one k-means step
    assert torch.equal(size, torch.tensor([2.0, 0, 0, 0, 2]))


# -- item 16: MultiScaleVQ.next_input -----------------------------------------------------------------------------


@pytest.mark.parametrize("f_hat, k, error, match", [
    (torch.randn(1, 3, 2, 2), 1, ValueError, r"f_hat must be a non-empty float \(B, 3, 4, 4\) tensor"),
    (None, 0, TypeError, "f_hat must be a float"),
    (torch.randn(1, 3, 4, 4), 1.5, TypeError, "k must be an integer"),
    (torch.randn(1, 3, 4, 4), 2, ValueError, r"k must be an integer in \[0, 1\], got 2"),
])
def test_next_input_checks_f_hat_and_k(f_hat, k, error, match):
    m = MultiScaleVQ(5, 3, scales=(1, 2, 4)).eval()
    with pytest.raises(error, match=match):
        m.next_input(f_hat, k)
    assert m.next_input(torch.randn(1, 3, 4, 4), 0).shape == (1, 3, 2, 2)


# -- item 17: NaN images in a training VQ-VAE name the images --------------------------------------------------------


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_training_vqvae_names_the_images(quantizer):
    extra = {"fsq_levels": (3, 3, 3)} if quantizer == "fsq" else {}
    tok = _tok(quantizer=quantizer, **extra).train()
    with pytest.raises(ValueError, match="images must be finite, got nan"):
        tok(torch.full((1, 1, 8, 8), NAN))


def test_training_vqvae_names_non_finite_latents(monkeypatch):
    """Finite images whose latents the encoder made non-finite (a diverged encoder) are refused by the quantizer,
    naming its input z."""
    tok = _tok().train()
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda x: encode(x) * float("nan"))
    with pytest.raises(ValueError, match="z must be finite"):
        tok(torch.rand(2, 1, 8, 8))


# -- narrow integer token maps (audit 23): a 256-code map stored as uint8 decodes like the int64 one --------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("quantizer", ["vq", "rvq", "msvq"])
def test_decode_takes_any_integer_dtype(quantizer, dtype):
    codes = 256 if dtype == torch.uint8 else 100  # every id fits the dtype; uint8 up to 255, the top id
    tok = _tok(quantizer=quantizer, num_codes=codes, **({"scales": (1, 2, 4)} if quantizer == "msvq" else {}))
    ids = tok.encode_to_indices(torch.rand(2, 1, 8, 8))
    maps = ids if quantizer == "msvq" else [ids]
    maps[-1][(0,) * maps[-1].ndim] = codes - 1
    narrow = [m.to(dtype) for m in maps] if quantizer == "msvq" else maps[0].to(dtype)
    torch.testing.assert_close(tok.decode_from_indices(narrow), tok.decode_from_indices(ids), rtol=0, atol=0)


def test_a_uint8_id_past_the_codebook_is_named_as_it_is():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 99\], got 200"):
        VectorQuantizer(100, 4).decode(torch.full((1, 2, 2), 200, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"must lie in \[0, 254\], got 255"):
        Fq.embed_indices(torch.full((1, 1, 1), 255, dtype=torch.uint8), torch.randn(255, 2))
    top = Fq.embed_indices(  # 256 codes: the bound does not wrap to 0 in uint8 and flag every id
        torch.full((1, 1, 1), 255, dtype=torch.uint8), torch.eye(256))  # (1, 256, 1, 1)
    torch.testing.assert_close(top[0, :, 0, 0], torch.eye(256)[255])
