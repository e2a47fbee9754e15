"""Bad input to MaskGIT (chapter 08) and the continuous-token AR model (chapter 10) fails at the public entry with
a one-line TypeError/ValueError naming the argument, never deep inside torch or silently (audit items 4, 5, 7, 8,
9 and 17 of the first audit; 8, 9, 10, 11, 17, 18 and 28 of the API audit)."""

from __future__ import annotations

import pytest
import torch

from ar_course.continuous import (
    ContinuousAR, ContinuousARConfig, euler_sample, flow_matching_loss, generate_images as c_images, generate_tokens,
)
from ar_course.continuous.model import map_to_tokens, time_features, tokens_to_map
from ar_course.masked import (
    MaskGIT, confidence_step, generate_images as mg_images, masked_cross_entropy, maskgit_config, maskgit_loss,
    training_mask,
)
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


# -- API audit item 8: FlowHead / time_features take times (N,) only -------------------------------------------------


@pytest.mark.parametrize("x_t, t, cond, match", [
    (torch.randn(4, 3), torch.rand(4, 1), torch.randn(4, 16), r"^t must be a float \(4,\) tensor of flow times, got "
                                                               r"\(4, 1\) torch.float32$"),
    (torch.randn(4, 3), torch.tensor(0.5), torch.randn(4, 16), r"t must be a float \(4,\) tensor .*got \(\)"),
    (torch.randn(4, 3), torch.rand(3), torch.randn(4, 16), r"t must be a float \(4,\) tensor .*got \(3,\)"),
    (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(4, 16), r"t must be a float \(4,\).*torch.int64"),
    (torch.randn(4, 5), torch.rand(4), torch.randn(4, 16), r"x_t must be a \(N, 3\) tensor, got \(4, 5\)"),
    (torch.randn(4, 3), torch.rand(4), torch.randn(2, 16), r"cond must be a \(4, 16\) tensor .*got \(2, 16\)"),
    (torch.randn(4, 3), torch.rand(4), torch.randn(4, 8), r"cond must be a \(4, 16\) tensor .*got \(4, 8\)"),
])
def test_flow_head_refuses_inputs_of_other_shapes(x_t, t, cond, match):
    with pytest.raises(ValueError, match=match):
        continuous().head(x_t, t, cond)


def test_time_features_refuse_times_that_are_not_n():
    with pytest.raises(ValueError, match=r"t must be a float \(N,\) tensor of flow times, got \(2, 1\)"):
        time_features(torch.rand(2, 1))
    assert time_features(torch.rand(5)).shape == (5, 32)


def test_flow_head_still_gives_n_by_d_and_shares_a_single_condition():
    head, x, t, cond = continuous().head, torch.randn(4, 3), torch.rand(4), torch.randn(1, 16)
    assert head(x, t, cond.expand(4, 16)).shape == (4, 3)
    torch.testing.assert_close(head(x, t, cond), head(x, t, cond.expand(4, 16)))


# -- API audit item 9: ContinuousAR.conditions checks its input ----------------------------------------------------


@pytest.mark.parametrize("tokens, classes, match", [
    (torch.zeros(2, 0, 3), torch.tensor([0, 7]), r"^classes must lie in \[0, 3\], got 7$"),
    (torch.zeros(2, 0, 3), None, "classes must be given when the sequence starts"),
    (torch.zeros(2, 0, 3), CLS.float(), r"classes must be a \(2,\) long tensor, got \(2,\) torch.float32"),
    (torch.zeros(2, 1, 3), torch.tensor([0, 1, 2]), r"classes must be a \(2,\) long tensor, got \(3,\)"),
    (torch.zeros(2, 1, 5), CLS, r"^tokens must be a float \(B, T, 3\), got \(2, 1, 5\) torch.float32$"),
    (torch.zeros(2, 3), CLS, r"tokens must be a float \(B, T, 3\), got \(2, 3\)"),
    (torch.zeros(2, 1, 3, dtype=torch.long), CLS, r"tokens must be a float \(B, T, 3\), got \(2, 1, 3\) torch.int64"),
    ([[[0.0] * 3]] * 2, CLS, r"tokens must be a float \(B, T, 3\), got list"),
    (torch.zeros(2, 5, 3), CLS, "6 positions exceed the 5 of this model"),
])
def test_conditions_refuse_bad_tokens_and_classes(tokens, classes, match):
    with pytest.raises(ValueError, match=match):
        continuous().conditions(tokens, classes)


def test_conditions_refuse_a_cache_of_another_batch_or_type():
    model = continuous()
    with pytest.raises(ValueError, match=r"cache must be None or a KVCache of batch size 2 .*got batch size 3"):
        model.conditions(torch.zeros(2, 0, 3), CLS, model.make_cache(3))
    with pytest.raises(ValueError, match="cache must be None or a KVCache of batch size 2.*got dict"):
        model.conditions(torch.zeros(2, 0, 3), CLS, {})


def test_conditions_still_match_with_and_without_a_cache_and_cast_float64():
    model = continuous()
    tokens = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0))
    whole = model.conditions(tokens, CLS)  # (2, 4, 16)
    cache = model.make_cache(2)
    first = model.conditions(tokens[:, :0], CLS, cache)  # the class token
    rest = model.conditions(tokens, cache=cache)  # classes are not needed once the sequence has started
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole)
    torch.testing.assert_close(model.conditions(tokens.double(), CLS), whole)


# -- API audit item 17: flow_matching_loss names x1 and noise ----------------------------------------------------


@pytest.mark.parametrize("x1, noise, error, match", [
    (torch.ones(4, 3, dtype=torch.long), None, ValueError,
     r"^x1 must be a non-empty float \(N, D\) tensor, got \(4, 3\) torch.int64$"),
    (torch.ones(0, 3), None, ValueError, r"x1 must be a non-empty float \(N, D\) tensor, got \(0, 3\)"),
    (torch.ones(4), None, ValueError, r"x1 must be a non-empty float \(N, D\) tensor, got \(4,\)"),
    (torch.ones(4, 3), torch.randn(4, 3), TypeError,
     r"^noise must be None or a pair of tensors \(x0 \(4, 3\), t \(4,\)\), got Tensor$"),
    (torch.ones(4, 3), (torch.randn(4, 3),), TypeError, r"noise must be None or a pair .*got \(Tensor,\)"),
    (torch.ones(4, 3), ([[0.0] * 3] * 4, [0.0] * 4), TypeError, r"noise must be None or a pair .*got \(list, list\)"),
    (torch.ones(4, 3), (torch.randn(4, 3), torch.rand(4, 1)), ValueError, r"noise must be \(x0 \(4, 3\), t \(4,\)\)"),
])
def test_flow_matching_loss_refuses_bad_data_and_noise(x1, noise, error, match):
    with pytest.raises(error, match=match):
        flow_matching_loss(lambda x, t: x, x1, noise=noise)


# -- API audit item 18: the continuous samplers check the model and use_cache ---------------------------------------


@pytest.mark.parametrize("sample", [
    lambda: generate_tokens("continuous", CLS, steps=1),
    lambda: generate_tokens(maskgit(), CLS, steps=1),
    lambda: c_images("continuous", kl_tokenizer(4), CLS, steps=1),
])
def test_continuous_samplers_refuse_a_model_that_is_not_continuous_ar(sample):
    with pytest.raises(TypeError, match=r"^model must be a ContinuousAR, got (str|MaskGIT)$"):
        sample()


@pytest.mark.parametrize("use_cache", ["no", 1, None])
def test_generate_tokens_refuses_a_use_cache_that_is_not_a_bool(use_cache):
    with pytest.raises(TypeError, match="use_cache must be True or False"):
        generate_tokens(continuous(), CLS, steps=1, use_cache=use_cache)


def test_generate_tokens_gives_the_same_tokens_with_and_without_the_cache():
    model = continuous()
    runs = [generate_tokens(model, CLS, steps=2, cfg=1.0, use_cache=c, generator=torch.Generator().manual_seed(0))
            for c in (True, False)]
    torch.testing.assert_close(*runs)


# -- API audit item 28: a dict config is refused by name -----------------------------------------------------------


def test_continuous_ar_refuses_a_dict_config():
    with pytest.raises(TypeError, match=r"^config must be a ContinuousARConfig, got dict \(ContinuousARConfig\.from"):
        ContinuousAR({"token_dim": 3})


# -- API audit item 10: confidence_step keeps its rules ------------------------------------------------------------


def step_args(B: int = 2, N: int = 6, V: int = 5, **kw) -> dict:
    g = torch.Generator().manual_seed(0)
    args = {"tokens": torch.full((B, N), V), "mask": torch.ones(B, N, dtype=torch.bool),
            "log_probs": torch.log_softmax(torch.randn(B, N, V, generator=g), -1),
            "sampled": torch.randint(0, V, (B, N), generator=g), "n_masked": 3}
    return {**args, **kw}


@pytest.mark.parametrize("kwargs, error, match", [
    # the audit's case: one masked position, n_masked = 2 re-masked the known token 9
    ({"tokens": torch.tensor([[7, 3, 9, 1]]), "mask": torch.tensor([[True, False, False, False]]),
      "log_probs": torch.zeros(1, 4, 10), "sampled": torch.zeros(1, 4, dtype=torch.long), "n_masked": 2}, ValueError,
     r"^n_masked must be an integer in \[0, 1\] \(the fewest masked positions of a row: more would re-mask known "
     r"tokens\), got 2$"),
    ({"n_masked": 7}, ValueError, r"n_masked must be an integer in \[0, 6\].*got 7"),
    ({"n_masked": -1}, ValueError, r"n_masked must be an integer >= 0, got -1"),
    ({"n_masked": 2.0}, TypeError, r"n_masked must be an integer >= 0, got 2.0 \(float\)"),
    ({"sampled": torch.full((2, 6), 9)}, ValueError, r"^sampled must lie in \[0, 4\], got 9$"),
    ({"sampled": torch.zeros(2, 6)}, ValueError, r"sampled must be a long tensor, got torch.float32"),
    ({"mask": torch.ones(2, 6, dtype=torch.long)}, ValueError, r"mask must be a bool tensor, got torch.int64"),
    ({"mask": torch.ones(1, 6, dtype=torch.bool)}, ValueError, r"mask must be \(2, 6\) like log_probs .*got \(1, 6\)"),
    ({"tokens": torch.zeros(2, 6)}, ValueError, r"tokens must be an integer tensor, got torch.float32"),
    ({"log_probs": torch.zeros(2, 6)}, ValueError, r"log_probs must be a float \(B, N, V\) tensor, got \(2, 6\)"),
    ({"noise": torch.zeros(2, 5), "noise_scale": 1.0}, ValueError, r"noise must be \(2, 6\) like log_probs"),
    ({"noise_scale": -1.0}, ValueError, r"noise_scale must be a finite number >= 0, got -1.0"),
    ({"tokens": [[0] * 6] * 2}, TypeError, "tokens must be a tensor, got list"),
])
def test_confidence_step_refuses_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        confidence_step(**step_args(**kwargs))


def test_confidence_step_still_keeps_known_tokens_up_to_every_masked_position():
    args = step_args(mask=torch.tensor([[True] * 3 + [False] * 3, [True] * 6]), n_masked=3)
    args["tokens"] = torch.where(args["mask"], 5, 1)
    tokens, mask = confidence_step(**args)
    assert mask.sum(1).tolist() == [3, 3] and torch.equal(mask[0], args["mask"][0])  # n_masked = all of row 0
    assert torch.equal(tokens[0], args["tokens"][0])
    assert confidence_step(**step_args(n_masked=0))[1].sum() == 0


# -- API audit item 11: training_mask takes a (B,) tensor of progresses --------------------------------------------


@pytest.mark.parametrize("r, error, match", [
    (0.5, TypeError, r"^r must be a \(B,\) tensor of progresses in \[0, 1\], got float$"),
    (torch.tensor(0.5), ValueError, r"r must be a \(B,\) tensor of progresses in \[0, 1\], got shape \(\)$"),
    (torch.rand(2, 3), ValueError, r"r must be a \(B,\) tensor .*got shape \(2, 3\)"),
    (torch.tensor([2.0]), ValueError, r"r must lie in \[0, 1\]"),
])
def test_training_mask_refuses_r_that_is_not_b(r, error, match):
    with pytest.raises(error, match=match):
        training_mask(r, 4)


def test_training_mask_still_hides_the_scheduled_count():
    mask = training_mask(torch.tensor([0.0, 1.0, 0.5]), 4, "linear", torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [4, 1, 2]


@pytest.mark.parametrize("call, match", [
    (lambda: euler_sample(lambda x, t: x, [[0.0, 1.0]], 2), "x0 must be a float"),
    (lambda: euler_sample(lambda x, t: x, torch.zeros(2, 3, dtype=torch.long), 2), "x0 must be a float"),
    (lambda: tokens_to_map(torch.zeros(2, 5, 3), (2, 2)), r"tokens must be a \(B, 4, D\)"),
    (lambda: tokens_to_map(torch.zeros(2, 4, 3), (2, 0)), "grid cols must be an integer >= 1"),
    (lambda: map_to_tokens(torch.zeros(2, 3, 4)), r"latents must be a \(B, D, rows, cols\)"),
])
def test_token_map_helpers_and_euler_name_their_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_token_map_helpers_round_trip():
    latents = torch.randn(2, 3, 2, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens_to_map(map_to_tokens(latents), (2, 4)), latents)
