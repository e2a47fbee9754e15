"""Bad input to MaskGIT (chapter 08) and the continuous-token AR model (chapter 10) fails at the public entry with
a one-line TypeError/ValueError naming the argument, never deep inside torch or silently (audit items 4, 5, 7, 8,
9 and 17)."""

from __future__ import annotations

import pytest
import torch

from ar_course.continuous import (
    ContinuousAR, ContinuousARConfig, euler_sample, flow_matching_loss, generate_images as c_images,
)
from ar_course.masked import MaskGIT, generate_images as mg_images, masked_cross_entropy, maskgit_config, maskgit_loss
from ar_course.tokenizers import VQVAE, VQVAEConfig
from ar_course.transformer.model import GPT

CLS = torch.tensor([0, 1])


def vq_tokenizer(**kw) -> VQVAE:
    """4x4 maps of 5 codes unless ``kw`` says otherwise."""
    return VQVAE(VQVAEConfig(**{"image_size": 8, "downsample": 2, "width": 4, "latent_dim": 3, "num_codes": 5,
                                **kw})).eval()


def maskgit(grid=(3, 4), num_codes: int = 5) -> MaskGIT:
    torch.manual_seed(0)
    return MaskGIT(maskgit_config(num_codes, grid, n_classes=3, n_layer=1, n_head=2, n_embd=16)).eval()


def continuous(grid=(2, 2)) -> ContinuousAR:
    torch.manual_seed(0)
    return ContinuousAR(ContinuousARConfig(token_dim=3, grid=grid, n_classes=3, n_layer=1, n_head=2, n_embd=16,
                                           head_width=16, head_depth=1)).eval()


def maps(*shape: int) -> torch.Tensor:
    return torch.randint(0, 5, shape, generator=torch.Generator().manual_seed(0))


# -- maskgit_loss (items 4 and 5) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"token_maps": maps(2, 2, 2)}, ValueError, r"token_maps must be a \(B, 3, 4\) long tensor, got \(2, 2, 2\)"),
    ({"token_maps": maps(2, 4, 3)}, ValueError, r"token_maps must be a \(B, 3, 4\)"),
    ({"token_maps": maps(2, 12)}, ValueError, r"token_maps must be a \(B, 3, 4\)"),
    ({"token_maps": torch.full((2, 3, 4), 5)}, ValueError, r"token_maps must lie in \[0, 4\], got 5"),  # [MASK]
    ({"token_maps": torch.full((2, 3, 4), -1)}, ValueError, r"token_maps must lie in \[0, 4\], got -1"),
    ({"token_maps": maps(2, 3, 4).int()}, ValueError, r"token_maps must be .* long tensor"),
    ({"token_maps": maps(2, 3, 4).tolist()}, TypeError, "token_maps"),
    ({"mask": torch.ones(2, 3, 4, dtype=torch.bool)}, ValueError, r"mask must be a \(2, 12\) bool .*\(2, 3, 4\)"),
    ({"mask": torch.ones(2, 12)}, ValueError, r"mask must be a \(2, 12\) bool tensor, got \(2, 12\) torch.float32"),
    ({"mask": torch.ones(1, 12, dtype=torch.bool)}, ValueError, r"mask must be a \(2, 12\)"),
    ({"mask": [[True] * 12] * 2}, TypeError, "mask must be None or"),
    ({"mask": torch.zeros(2, 12, dtype=torch.bool)}, ValueError, "mask has no masked position"),
])
def test_maskgit_loss_refuses_bad_maps_and_masks(kwargs, error, match):
    args = {"token_maps": maps(2, 3, 4), "classes": CLS, **kwargs}
    with pytest.raises(error, match=match):
        maskgit_loss(maskgit(), **args)


def test_maskgit_loss_refuses_a_model_that_is_not_maskgit():
    gpt = GPT(maskgit_config(5, (3, 4), n_classes=3, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(TypeError, match="model must be a MaskGIT, got GPT"):
        maskgit_loss(gpt, maps(2, 3, 4), CLS)


def test_maskgit_loss_still_takes_good_input():
    model = maskgit()
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, ::3] = True
    assert torch.isfinite(maskgit_loss(model, maps(2, 3, 4), CLS, mask=mask))
    assert torch.isfinite(maskgit_loss(model, torch.full((2, 3, 4), 4), CLS))  # the last real code


@pytest.mark.parametrize("grid", [(2, 2, 2), (3,), 8])
def test_maskgit_config_refuses_a_grid_that_is_not_two_sides(grid):
    with pytest.raises(ValueError, match="grid"):
        maskgit_config(5, grid)


# -- masked_cross_entropy (item 8) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("targets, error, match", [
    (torch.full((1, 3), 7), ValueError, r"targets must lie in \[0, 4\], got 7"),
    (torch.full((1, 3), -1), ValueError, r"targets must lie in \[0, 4\], got -1"),
    (torch.zeros(1, 3), ValueError, r"targets must be a \(1, 3\) long tensor"),
    ([[0, 1, 2]], TypeError, "targets"),
])
def test_masked_cross_entropy_refuses_bad_targets(targets, error, match):
    with pytest.raises(error, match=match):
        masked_cross_entropy(torch.zeros(1, 3, 5), targets, torch.ones(1, 3, dtype=torch.bool))


def test_masked_cross_entropy_refuses_integer_logits():
    with pytest.raises(ValueError, match="logits must be float"):
        masked_cross_entropy(torch.zeros(1, 3, 5, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long),
                             torch.ones(1, 3, dtype=torch.bool))


# -- generate_images: the tokenizer must fit the model (item 4) ------------------------------------------------------


@pytest.mark.parametrize("model, tokenizer, error, match", [
    (lambda: maskgit((3, 4)), lambda: vq_tokenizer(), ValueError,
     r"tokenizer \('vq', 4x4 maps of 5 codes\) does not match the model \(3x4 maps of 5 codes"),
    (lambda: maskgit((4, 4), num_codes=7), lambda: vq_tokenizer(), ValueError, r"4x4 maps of 5 codes.*4x4 maps of 7"),
    (lambda: maskgit((4, 4)), lambda: vq_tokenizer(quantizer="kl"), ValueError, r"tokenizer \('kl'"),
    (lambda: maskgit((4, 4)), lambda: vq_tokenizer().quantizer, TypeError, "tokenizer must be a VQVAE"),
])
def test_maskgit_generate_images_refuses_a_tokenizer_of_other_maps(model, tokenizer, error, match):
    with pytest.raises(error, match=match):
        mg_images(model(), tokenizer(), CLS, steps=2)


def test_maskgit_generate_images_still_decodes_with_a_matching_tokenizer():
    assert mg_images(maskgit((4, 4)), vq_tokenizer(), CLS, steps=2).shape == (2, 1, 8, 8)


def kl_tokenizer(image_size: int = 16, latent_dim: int = 3) -> VQVAE:
    return VQVAE(VQVAEConfig(image_size=image_size, downsample=2, width=4, latent_dim=latent_dim,
                             quantizer="kl")).eval()


@pytest.mark.parametrize("tokenizer, error, match", [
    (lambda: kl_tokenizer(16), ValueError,
     r"tokenizer \('kl', 8x8 latents of 3 channels\) does not match the model \(2x2 tokens of 3 channels"),
    (lambda: kl_tokenizer(4, latent_dim=5), ValueError, r"2x2 latents of 5 channels"),
    (lambda: vq_tokenizer(image_size=4), ValueError, r"tokenizer \('vq'"),
    (lambda: None, TypeError, "tokenizer must be a VQVAE, got NoneType"),
])
def test_continuous_generate_images_refuses_a_tokenizer_of_other_latents(tokenizer, error, match):
    with pytest.raises(error, match=match):
        c_images(continuous((2, 2)), tokenizer(), CLS, steps=1)


def test_continuous_generate_images_still_decodes_with_a_matching_tokenizer():
    assert c_images(continuous((2, 2)), kl_tokenizer(4), CLS, steps=1).shape == (2, 1, 4, 4)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_samplers_refuse_a_seed_torch_cannot_take_in_one_line(seed):
    for sample in (lambda: mg_images(maskgit((4, 4)), vq_tokenizer(), CLS, steps=2, seed=seed),
                   lambda: c_images(continuous((2, 2)), kl_tokenizer(4), CLS, steps=1, seed=seed)):
        with pytest.raises(ValueError, match=r"^seed must be an integer in \[-9223372036854775808, "
                                             r"18446744073709551615\], got -?\d+$"):
            sample()


# -- ContinuousAR.loss with float64 tokens (item 7) ----------------------------------------------------------------


def test_continuous_loss_casts_float64_tokens_to_the_model_dtype():
    model, tokens = continuous(), torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    loss32 = model.loss(tokens, CLS, generator=torch.Generator().manual_seed(1))
    loss64 = model.loss(tokens.double(), CLS, generator=torch.Generator().manual_seed(1))
    assert loss64.dtype == torch.float32
    torch.testing.assert_close(loss64, loss32)


# -- ContinuousARConfig (item 9) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"grid": (2, 2, 2)}, ValueError, r"grid must be \(rows, cols\), got \(2, 2, 2\)"),
    ({"grid": (8,)}, ValueError, r"grid must be \(rows, cols\)"),
    ({"grid": 8}, ValueError, r"grid must be \(rows, cols\), got 8"),
    ({"grid": (0, 8)}, ValueError, r"grid rows must be an integer >= 1, got 0"),
    ({"grid": (8, -2)}, ValueError, r"grid cols must be an integer >= 1, got -2"),
    ({"grid": (8.0, 8)}, TypeError, "grid rows must be an integer"),
    ({"dropout": float("nan")}, ValueError, r"dropout must be a finite number in \[0, 1\), got nan"),
    ({"dropout": 1.0}, ValueError, "dropout"),
    ({"dropout": "0.1"}, TypeError, "dropout"),
    ({"n_embd": 8, "n_head": 4}, ValueError, "n_embd / n_head divisible by 4"),  # 2-D rotary needs head size 4k
])
def test_continuous_config_refuses_bad_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        ContinuousARConfig(**kwargs)


# -- a velocity of the wrong shape (item 17) -----------------------------------------------------------------------


@pytest.mark.parametrize("velocity, match", [
    (lambda x, t: x[:, :1], r"velocity must return a \(4, 3\) tensor, got \(4, 1\)"),
    (lambda x, t: x.sum(), r"velocity must return a \(4, 3\) tensor, got \(\)"),
    (lambda x, t: t, r"velocity must return a \(4, 3\) tensor, got \(4,\)"),
    (lambda x, t: 0.0, r"velocity must return a \(4, 3\) tensor, got float"),
])
def test_flow_matching_loss_and_euler_sample_refuse_a_velocity_of_another_shape(velocity, match):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        flow_matching_loss(velocity, x, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=match):
        euler_sample(velocity, x, 2)
