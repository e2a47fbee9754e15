"""Bad input to the image models' losses, samplers and alignment helpers (raster, VAR, align): each case fails at
once with a ``TypeError``/``ValueError`` naming the argument, not deep inside torch."""

from __future__ import annotations

import pytest
import torch

from ar_course import align
from ar_course.raster import generate_images as raster_images
from ar_course.raster import generate_tokens, raster_config, raster_loss, token_losses
from ar_course.tokenizers import VQVAE, VQVAEConfig
from ar_course.transformer import GPT, GPTConfig
from ar_course.var import VAR, VARConfig, guidance_strength, var_loss
from ar_course.var import generate_images as var_images

torch.manual_seed(0)
SCALES = (1, 2, 4)
TOK = VQVAE(VQVAEConfig(image_size=8, downsample=2, width=4, latent_dim=3, num_codes=5)).eval()  # 4x4 maps
MS = VQVAE(VQVAEConfig(image_size=8, downsample=2, width=4, latent_dim=3, num_codes=5, quantizer="msvq",
                       scales=SCALES)).eval()
MS9 = VQVAE(VQVAEConfig(image_size=8, downsample=2, width=4, latent_dim=3, num_codes=9, quantizer="msvq",
                        scales=SCALES)).eval()
TOK9 = VQVAE(VQVAEConfig(image_size=8, downsample=2, width=4, latent_dim=3, num_codes=9)).eval()
TOK_2X2 = VQVAE(VQVAEConfig(image_size=8, downsample=4, width=4, latent_dim=3, num_codes=5)).eval()  # 2x2 maps
AR = GPT(raster_config(5, grid=(4, 4), n_classes=3, n_layer=1, n_head=2, n_embd=16)).eval()
AR_2X2 = GPT(raster_config(5, grid=(2, 2), n_classes=3, n_layer=1, n_head=2, n_embd=16)).eval()
UNCOND = GPT(GPTConfig(vocab_size=5, block_size=17, n_layer=1, n_head=2, n_embd=16)).eval()
VAR_MODEL = VAR(VARConfig(vocab_size=5, latent_dim=3, scales=SCALES, n_classes=3, n_layer=1, n_head=2,
                          n_embd=16)).eval()
CLS = torch.tensor([0, 1])
PYR = [torch.randint(0, 5, (2, s, s)) for s in SCALES]
MAPS = torch.randint(0, 5, (2, 4, 4))


def _var_config(**kw) -> VARConfig:
    return VARConfig(**{"vocab_size": 5, "latent_dim": 3, "scales": SCALES, "n_classes": 3, "n_layer": 1,
                        "n_head": 2, "n_embd": 16, **kw})


CASES = {
    # align's VAR log-probabilities check the tokenizer and the pyramid as VAR.loss does
    "pyramid log-probs with the VQVAE": (lambda: align.pyramid_log_probs(VAR_MODEL, MS, PYR, CLS), TypeError,
                                         r"vq must be a MultiScaleVQ"),
    "pyramid log-probs, 9-code tokenizer": (lambda: align.pyramid_log_probs(VAR_MODEL, MS9.quantizer, PYR, CLS),
                                            ValueError, r"does not match the model"),
    "pyramid log-probs, a scale missing": (lambda: align.pyramid_token_log_probs(VAR_MODEL, MS.quantizer, PYR[:2],
                                                                                  CLS),
                                           ValueError, r"pyramid must hold 3 maps"),
    "pyramid log-probs, id out of range": (lambda: align.pyramid_log_probs(
        VAR_MODEL, MS.quantizer, [*PYR[:2], PYR[2].clamp(max=4) + 1], CLS), ValueError, r"pyramid\[2\] must lie in"),
    # item 2: VAR.loss checks its tokenizer and index maps as sample_pyramid does
    "var loss with the VQVAE": (lambda: VAR_MODEL.loss(MS, PYR, CLS), TypeError, r"vq must be a MultiScaleVQ"),
    "var loss int32 maps": (lambda: VAR_MODEL.loss(MS.quantizer, [p.int() for p in PYR], CLS), ValueError,
                            r"indices\[0\] must be a \(B, 1, 1\) long"),
    "var loss 9-code tokenizer": (lambda: VAR_MODEL.loss(MS9.quantizer, [torch.full((2, s, s), 7) for s in SCALES],
                                                         CLS), ValueError, r"tokenizer .* does not match"),
    "var loss id out of range": (lambda: VAR_MODEL.loss(MS.quantizer, [torch.full((2, s, s), 5) for s in SCALES],
                                                        CLS), ValueError, r"indices\[0\] must lie in \[0, 4\]"),
    "var loss two maps": (lambda: VAR_MODEL.loss(MS.quantizer, PYR[:2], CLS), ValueError, r"indices must hold 3"),
    "var loss maps of another batch": (lambda: VAR_MODEL.loss(MS.quantizer, [PYR[0], PYR[1][:1], PYR[2]], CLS),
                                       ValueError, r"indices\[1\] must be a \(2, 2, 2\)"),
    "var loss tensor pyramid": (lambda: VAR_MODEL.loss(MS.quantizer, PYR[2], CLS), TypeError,
                                r"indices must be a list"),
    "var images with the quantizer": (lambda: var_images(VAR_MODEL, MS.quantizer, CLS), TypeError,
                                      r"tokenizer must be a VQVAE"),
    "raster images with a quantizer": (lambda: raster_images(AR, MS.quantizer, CLS), TypeError,
                                       r"tokenizer must be a VQVAE"),
    "raster images with a msvq tokenizer": (lambda: raster_images(AR, MS, CLS), ValueError,
                                            r"tokenizer must give one code map"),
    "raster images with 9 codes": (lambda: raster_images(AR, TOK9, CLS), ValueError, r"tokenizer has 9 codes"),
    "raster images with 2x2 maps": (lambda: raster_images(AR, TOK_2X2, CLS), ValueError,
                                    r"tokenizer maps must match the model's 4x4 grid"),
    # item 4: maps and grids off the model's 2-D grid
    "raster loss 3x3 maps": (lambda: raster_loss(AR, torch.randint(0, 5, (2, 3, 3)), CLS), ValueError,
                             r"token_maps must match the model's 4x4 grid"),
    "raster loss 2x8 maps": (lambda: raster_loss(AR, torch.randint(0, 5, (2, 2, 8)), CLS), ValueError,
                             r"token_maps must match the model's 4x4 grid"),
    "token losses 2x8 maps": (lambda: token_losses(AR, torch.randint(0, 5, (2, 2, 8)), CLS), ValueError,
                              r"token_maps must match"),
    "generate_tokens 3x3 grid": (lambda: generate_tokens(AR, CLS, (3, 3)), ValueError,
                                 r"grid must match the model's 4x4 grid"),
    "token_log_probs 1x4 maps": (lambda: align.token_log_probs(AR_2X2, torch.randint(0, 5, (2, 1, 4)), CLS),
                                 ValueError, r"token_maps must match the model's 2x2 grid"),
    # item 7: VAR inputs must be float (any float dtype is cast)
    "var forward long inputs": (lambda: VAR_MODEL(torch.zeros(2, 20, 3, dtype=torch.long), CLS), ValueError,
                                r"inputs must be a float"),
    "var forward list inputs": (lambda: VAR_MODEL([[0.0]], CLS), TypeError, r"inputs must be"),
    # item 8: targets and classes
    "var_loss target out of range": (lambda: var_loss(torch.zeros(2, 21, 5), torch.full((2, 21), 5), SCALES),
                                     ValueError, r"targets must lie in \[0, 4\]"),
    "var_loss float targets": (lambda: var_loss(torch.zeros(2, 21, 5), torch.zeros(2, 21), SCALES), ValueError,
                               r"targets must be a \(2, 21\) long"),
    "var_loss targets of another length": (lambda: var_loss(torch.zeros(2, 21, 5), torch.zeros(2, 20).long(), SCALES),
                                           ValueError, r"targets must be a \(2, 21\) long tensor, got \(2, 20\)"),
    "var_loss long logits": (lambda: var_loss(torch.zeros(2, 21, 5).long(), torch.zeros(2, 21).long(), SCALES),
                             ValueError, r"logits must be a float"),
    "class_probability null class": (lambda: align.class_probability(torch.rand(2, 1, 32, 32), torch.tensor([0, 10])),
                                     ValueError, r"classes must lie in \[0, 9\]"),
    # item 9: configs
    "VARConfig n_head=0": (lambda: _var_config(n_head=0), ValueError, r"n_head must be an integer >= 1"),
    "VARConfig n_layer=0": (lambda: _var_config(n_layer=0), ValueError, r"n_layer must be an integer >= 1"),
    "VARConfig vocab_size=0": (lambda: _var_config(vocab_size=0), ValueError, r"vocab_size must be an integer >= 1"),
    "VARConfig latent_dim=0": (lambda: _var_config(latent_dim=0), ValueError, r"latent_dim must be an integer >= 1"),
    "VARConfig n_embd=16.0": (lambda: _var_config(n_embd=16.0), TypeError, r"n_embd must be an integer"),
    "raster_config grid (0, 4)": (lambda: raster_config(5, grid=(0, 4)), ValueError, r"grid rows must be an integer"),
    "raster_config grid (4,)": (lambda: raster_config(5, grid=(4,)), ValueError, r"grid must be \(rows, cols\)"),
    # item 16: hyper-parameters
    "raster_loss p_uncond nan": (lambda: raster_loss(AR, MAPS, CLS, p_uncond=float("nan")), ValueError,
                                 r"p_uncond must be a finite number in \[0, 1\]"),
    "var loss p_uncond -1": (lambda: VAR_MODEL.loss(MS.quantizer, PYR, CLS, p_uncond=-1.0), ValueError,
                             r"p_uncond must be a finite number in \[0, 1\]"),
    "var loss p_uncond str": (lambda: VAR_MODEL.loss(MS.quantizer, PYR, CLS, p_uncond="0.1"), TypeError, r"p_uncond"),
    "guidance_strength nan": (lambda: guidance_strength(float("nan"), 1, 3), ValueError, r"w must be a finite"),
    "guidance_strength k=1.0": (lambda: guidance_strength(1.0, 1.0, 3), TypeError, r"k must be an integer"),
    # item 17: alignment with a single class
    "wrong_classes one class": (lambda: align.wrong_classes(CLS, 1, torch.Generator()), ValueError,
                                r"n_classes must be an integer >= 2"),
    "train_cca unconditional policy": (lambda: align.train_cca(UNCOND, UNCOND, MAPS, torch.zeros(2, dtype=torch.long),
                                                               align.CCAConfig(steps=1, batch_size=2), progress=False),
                                       ValueError, r"n_classes >= 2"),
    # seeds outside what torch.Generator takes: one message everywhere, not torch's "Overflow when unpacking"
    "raster images seed 2**64": (lambda: raster_images(AR, TOK, CLS, seed=2**64), ValueError,
                                 r"seed must be an integer in \[-9223372036854775808, 18446744073709551615\]"),
    "VAR images seed below -2**63": (lambda: var_images(VAR_MODEL, MS, CLS, seed=-(2**63) - 1), ValueError,
                                     r"seed must be an integer in \[-9223372036854775808, "),
    "raster images seed 1.0": (lambda: raster_images(AR, TOK, CLS, seed=1.0), TypeError, r"seed must be an integer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_a_one_line_message(case):
    call, error, match = CASES[case]
    with pytest.raises(error, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_good_input_still_runs():
    """The inputs next to the bad ones above are accepted: float64 VAR inputs are cast to the model's dtype."""
    inputs = torch.randn(2, 20, 3)
    torch.testing.assert_close(VAR_MODEL(inputs.double(), CLS), VAR_MODEL(inputs, CLS))
    loss, per_scale = VAR_MODEL.loss(MS.quantizer, PYR, CLS, p_uncond=0.5, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and per_scale.shape == (3,)
    assert raster_loss(AR, MAPS, CLS, p_uncond=1.0).ndim == 0
    assert generate_tokens(AR, CLS, (4, 4)).shape == (2, 4, 4)
    assert raster_images(AR, TOK, CLS).shape == (2, 1, 8, 8)
    assert torch.equal(raster_images(AR, TOK, CLS, seed=2**64 - 1), raster_images(AR, TOK, CLS, seed=-1))
    assert var_images(VAR_MODEL, MS, CLS).shape == (2, 1, 8, 8)
    assert guidance_strength(2.0, 1, 3) == 1.0 and guidance_strength(2.0, 1, 3, ramp=False) == 2.0
    assert align.token_log_probs(AR, MAPS, CLS).shape == (2, 16)
    assert bool((align.wrong_classes(CLS, 2, torch.Generator().manual_seed(0)) == 1 - CLS).all())


@pytest.mark.parametrize("p, error", [(float("nan"), ValueError), (1.5, ValueError), ("0.1", TypeError)])
def test_condition_dropout_batches_checks_p_when_called(p, error):
    from ar_course.raster import model as raster_model

    with pytest.raises(error, match="p_uncond must be a"):
        raster_model.condition_dropout_batches(iter([]), p, null_class=3)  # before any batch is drawn
