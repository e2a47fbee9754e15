"""Bad input to the transformer and tokenizer core (API audit items 9, 10, 13, 14, 17): each case must raise the
documented ``TypeError``/``ValueError`` naming the argument, at once, instead of a late crash or a silently broken
model."""

from __future__ import annotations

import pytest
import torch

from ar_course import checkpoint
from ar_course.tokenizers import VQVAE, MultiScaleVQ, ResidualVQ, VectorQuantizer, VQVAEConfig
from ar_course.transformer import GPT, GPTConfig, KVCache, StaticKVCache, use_attention

SMALL = dict(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8)


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**SMALL)).eval()


# -- item 9: configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, error, match", [
    ({"n_head": 0}, ValueError, "n_head"),
    ({"n_head": 2.0}, TypeError, "n_head"),
    ({"n_layer": -1}, ValueError, "n_layer"),
    ({"n_layer": 0}, ValueError, "n_layer"),
    ({"vocab_size": 0}, ValueError, "vocab_size"),
    ({"block_size": 0}, ValueError, "block_size"),
    ({"n_embd": 0}, ValueError, "n_embd"),
    ({"n_classes": -1}, ValueError, "n_classes"),
    ({"mlp_hidden": -4}, ValueError, "mlp_hidden"),
    ({"pos": "rope2d", "grid": (0, 0)}, ValueError, "grid"),
    ({"pos": "rope2d", "grid": (2, 2, 2)}, ValueError, "grid"),
    ({"pos": "rope2d", "grid": (2, 4), "n_embd": 12, "n_head": 2}, ValueError, "head size"),
    ({"n_embd": 6, "n_head": 2}, ValueError, "head size"),  # rope: odd head size
    ({"norm_eps": -1.0}, ValueError, "norm_eps"),
    ({"dropout": 1.5}, ValueError, "dropout"),
    ({"rope_base": float("nan")}, ValueError, "rope_base"),
    ({"bias": "no"}, TypeError, "bias"),
])
def test_gpt_config_refuses(change, error, match):
    with pytest.raises(error, match=match):
        GPTConfig(**{**SMALL, **change})


@pytest.mark.parametrize("change, error, match", [
    ({"image_size": 0}, ValueError, "image_size"),
    ({"image_size": 8.0}, TypeError, "image_size"),
    ({"width": 0}, ValueError, "width"),
    ({"in_channels": 0}, ValueError, "in_channels"),
    ({"latent_dim": 0}, ValueError, "latent_dim"),
    ({"num_codes": 0}, ValueError, "num_codes"),
    ({"num_res_blocks": -1}, ValueError, "num_res_blocks"),
    ({"quantizer": "rvq", "depth": 0}, ValueError, "depth"),
    ({"quantizer": "msvq", "scales": (2, 1, 4)}, ValueError, "scales must not decrease"),
    ({"quantizer": "msvq", "scales": (1, 4, 2, 4)}, ValueError, "scales must not decrease"),
])
def test_vqvae_config_refuses(change, error, match):
    with pytest.raises(error, match=match):
        VQVAEConfig(**{"image_size": 8, "downsample": 2, "width": 4, "latent_dim": 3, "num_codes": 5, **change})


def test_multiscale_vq_refuses_decreasing_scales():
    with pytest.raises(ValueError, match="scales must not decrease"):
        MultiScaleVQ(8, 4, scales=(2, 1, 4))


def test_good_configs_and_shipped_checkpoints_still_load():
    GPTConfig(**{**SMALL, "pos": "rope2d", "grid": [2, 4], "n_classes": 0, "mlp_hidden": 0})  # JSON gives a list
    VQVAEConfig(image_size=8, downsample=2, quantizer="msvq", scales=(1, 2, 4))
    MultiScaleVQ(8, 4, scales=(4, 4))  # a repeated side is allowed (residual VQ at one scale)
    names = checkpoint.available()
    assert names
    for name in names:
        assert isinstance(checkpoint.load(name), torch.nn.Module)


# -- item 10: a hand-built KVCache ---------------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: KVCache(1, 1, 4, 8, 2), "heads"),  # n_head / head_dim swapped
    (lambda: KVCache(2, 1, 2, 8, 4), "layers"),
    (lambda: KVCache(1, 1, 2, 8, 4, dtype=torch.float64), "float64"),
])
def test_forward_refuses_a_cache_of_another_layout(gpt, make, match):
    x = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=f"cache holds .*{match}.*make_cache"):
        gpt(x, cache=make())


def test_generate_refuses_a_static_cache_of_another_layout(gpt):
    x = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="cache holds .* heads"):
        gpt.generate(x, 2, cache=StaticKVCache(1, 1, 4, 8, 2))


@pytest.mark.parametrize("cls", [KVCache, StaticKVCache])
@pytest.mark.parametrize("sizes, error, match", [
    ((0, 1, 2, 8, 4), ValueError, "n_layer"),
    ((1, 0, 2, 8, 4), ValueError, "batch_size"),
    ((1, 1, 2, 0, 4), ValueError, "max_len"),
    ((1, 1, 2.0, 8, 4), TypeError, "n_head"),
])
def test_cache_sizes_are_checked(cls, sizes, error, match):
    with pytest.raises(error, match=match):
        cls(*sizes)


def test_a_made_cache_still_works(gpt):
    x = torch.zeros(1, 3, dtype=torch.long)
    full, _ = gpt(x)
    cached, _ = gpt(x, cache=gpt.make_cache(1))
    assert torch.allclose(full, cached, atol=1e-6)


# -- item 13: NaN into a training quantizer ----------------------------------------------------------------


@pytest.mark.parametrize("make, name", [
    (lambda: VectorQuantizer(5, 3, ema=True), "z"),
    (lambda: VectorQuantizer(5, 3), "z"),
    (lambda: ResidualVQ(5, 3, depth=2, ema=True), "z"),
    (lambda: MultiScaleVQ(5, 3, scales=(1, 2)), "f"),
])
def test_training_quantizer_refuses_non_finite_input(make, name):
    torch.manual_seed(0)
    q = make().train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = torch.randn(2, 3, 2, 2)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        q(z)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())  # the codebook is untouched


def test_eval_quantizer_forward_does_not_check_values():
    """Eval mode reads no values (no host sync): a NaN goes through forward, into its own vector's output and the
    loss only, and changes no statistic; encode, which reads the values, refuses it."""
    torch.manual_seed(0)
    q = VectorQuantizer(5, 3, ema=True).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    clean = torch.randn(2, 3, 2, 2)
    z = clean.clone()
    z[0, 0, 0, 0] = float("nan")
    out = q(z)  # no error
    assert torch.isnan(out.z_q[0, 0, 0, 0]) and torch.isnan(out.loss)
    others = torch.ones(2, 2, 2, dtype=torch.bool)
    others[0, 0, 0] = False  # every vector but the one holding the NaN: as for the clean input
    ref = q(clean)
    assert torch.equal(out.indices[others], ref.indices[others])
    assert torch.equal(out.z_q.permute(0, 2, 3, 1)[others], ref.z_q.permute(0, 2, 3, 1)[others])
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    with pytest.raises(ValueError, match="z must be finite"):
        q.encode(z)


# -- item 14: index maps of the wrong size -------------------------------------------------------------------


@pytest.mark.parametrize("quantizer, tokens", [
    ("vq", torch.zeros(1, 2, 2, dtype=torch.long)),
    ("vq", torch.zeros(1, 4, 2, dtype=torch.long)),
    ("rvq", torch.zeros(1, 4, 2, 2, dtype=torch.long)),
    ("fsq", torch.zeros(1, 8, 8, dtype=torch.long)),
    ("kl", torch.zeros(1, 3, 2, 2)),
])
def test_decode_from_indices_refuses_maps_of_another_grid(quantizer, tokens):
    extra = {"fsq": {"fsq_levels": (3, 3, 3)}}.get(quantizer, {})
    tok = VQVAE(VQVAEConfig(image_size=8, downsample=2, width=4, latent_dim=3, num_codes=5, quantizer=quantizer,
                            **extra)).eval()
    with pytest.raises(ValueError, match="indices must be maps of this tokenizer's 4x4 latent grid"):
        tok.decode_from_indices(tokens)
    good = torch.zeros(*tokens.shape[:-2], 4, 4, dtype=tokens.dtype)
    assert tok.decode_from_indices(good).shape == (1, 1, 8, 8)


# -- item 17: use_attention with a name ----------------------------------------------------------------------


@pytest.mark.parametrize("attend", ["plain", None, 3])
def test_use_attention_refuses_a_non_function_on_entry(attend):
    with pytest.raises(TypeError, match="attend must be an attention function"):
        with use_attention(attend):
            pass


@pytest.mark.parametrize("batch_size, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError)])
def test_reconstruct_checks_its_batch_size(batch_size, error):
    tok = VQVAE(VQVAEConfig(num_codes=5, latent_dim=4, width=8, downsample=8)).eval()
    with pytest.raises(error, match="batch_size must be an integer"):
        tok.reconstruct(torch.rand(2, 1, 32, 32), batch_size=batch_size)
    assert tok.reconstruct(torch.rand(3, 1, 32, 32), batch_size=2).shape == (3, 1, 32, 32)
