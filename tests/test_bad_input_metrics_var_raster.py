"""Bad input to the metrics, the image grids, condition dropout, VAR's functional reference and models, and the
raster model: each case fails at once with a one-line ``TypeError``/``ValueError`` naming the argument (never a
silent wrong number or a traceback from inside torch or NumPy); valid inputs of other float dtypes work."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ar_course import images, metrics, viz  # noqa: E402
from ar_course.masked import MaskGIT, maskgit_config  # noqa: E402
from ar_course.raster import condition_dropout, raster_config, raster_loss  # noqa: E402
from ar_course.raster import generate_images as raster_images  # noqa: E402
from ar_course.tokenizers import VQVAE, VQVAEConfig  # noqa: E402
from ar_course.transformer import GPT, GPTConfig  # noqa: E402
from ar_course.var import VAR, VARConfig, scale_step, teacher_forcing_sequence  # noqa: E402
from ar_course.var import functional as vf  # noqa: E402
from ar_course.var import generate_images as var_images  # noqa: E402

nan = float("nan")
torch.manual_seed(0)
SCALES = (1, 2, 4)
BASE = dict(image_size=8, downsample=2, width=4, latent_dim=3, num_codes=5)
TOK = VQVAE(VQVAEConfig(**BASE)).eval()
MS = VQVAE(VQVAEConfig(**BASE, quantizer="msvq", scales=SCALES)).eval()
VAR_KW = dict(vocab_size=5, latent_dim=3, scales=SCALES, n_classes=3, n_layer=1, n_head=2, n_embd=16)
VARM = VAR(VARConfig(**VAR_KW)).eval()
AR = GPT(raster_config(5, grid=(4, 4), n_classes=3, n_layer=1, n_head=2, n_embd=16)).eval()
BIDIR = MaskGIT(maskgit_config(5, (4, 4), n_classes=3, n_layer=1, n_head=2, n_embd=16)).eval()
UNCOND = GPT(GPTConfig(vocab_size=5, block_size=17, n_layer=1, n_head=2, n_embd=16)).eval()
PYR = [torch.randint(0, 5, (2, s, s)) for s in SCALES]
MAPS = torch.randint(0, 5, (2, 4, 4))
CLS = torch.tensor([0, 1])
IMG = torch.rand(4, 1, 32, 32)
A, B = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
FEATS = torch.randn(20, 4)

CASES = {
    # 3: psnr
    "psnr uint8": (lambda: metrics.psnr((A * 255).to(torch.uint8), (B * 255).to(torch.uint8)), ValueError,
                   r"x must be a float tensor.*divide uint8 images by 255"),
    "psnr 0..255": (lambda: metrics.psnr(A * 255, B), ValueError, r"x must be in \[0, 1\], got values in .*255"),
    "psnr [0, 1] as 0..255": (lambda: metrics.psnr(A, B, data_range=255), ValueError,
                              r"x and y hold values only up to \d\.\d\d, far below data_range=255: images in \[0, 1\] "
                              r"take data_range=1 \(with 255 the PSNR would be 48\.1 dB too high\)"),
    "psnr NaN": (lambda: metrics.psnr(torch.full_like(A, nan), B), ValueError, r"x must be finite, got nan"),
    "psnr empty": (lambda: metrics.psnr(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4)), ValueError,
                   r"x and y are empty"),
    "psnr numpy": (lambda: metrics.psnr(A.numpy(), B.numpy()), TypeError, r"x must be a float tensor"),
    "psnr data_range str": (lambda: metrics.psnr(A, B, data_range="1"), TypeError, r"data_range must be a finite"),
    # 4: to_grid / show_images
    "to_grid uint8": (lambda: images.to_grid((IMG * 255).to(torch.uint8)), ValueError,
                      r"images must be a float tensor.*divide uint8 images by 255"),
    "to_grid 0..255": (lambda: images.to_grid(IMG * 255), ValueError, r"images must be in \[0, 1\].*divide"),
    "to_grid [-1, 1]": (lambda: images.to_grid(IMG * 2 - 1), ValueError, r"images must be in \[0, 1\].*\(x \+ 1\)"),
    "to_grid NaN": (lambda: images.to_grid(torch.full_like(IMG, nan)), ValueError, r"images must be finite"),
    # the frame was not clipped: (grid * 255).astype(uint8) wrapped 2.0 to 254 and -0.2 to 205
    "to_grid pad_value": (lambda: images.to_grid(IMG, pad_value=2.0), ValueError,
                          r"^pad_value must be a finite number in \[0, 1\], got 2.0$"),
    "to_grid channels last": (lambda: images.to_grid(torch.rand(2, 8, 8, 3)), ValueError,
                              r"C = 1 or 3 channels first.*permute"),
    "to_grid nrow 0": (lambda: images.to_grid(IMG, nrow=0), ValueError, r"nrow must be an integer >= 1, got 0"),
    "to_grid nrow -1": (lambda: images.to_grid(IMG, nrow=-1), ValueError, r"nrow must be an integer >= 1"),
    "to_grid nrow 2.0": (lambda: images.to_grid(IMG, nrow=2.0), TypeError, r"nrow must be an integer"),
    "to_grid empty": (lambda: images.to_grid(torch.zeros(0, 1, 4, 4)), ValueError, r"images is empty"),
    "to_grid numpy": (lambda: images.to_grid(IMG.numpy()), TypeError, r"images must be a float tensor"),
    "show_images uint8": (lambda: viz.show_images((IMG * 255).to(torch.uint8)), ValueError, r"divide uint8"),
    "show_images nrow 0": (lambda: viz.show_images(IMG, nrow=0), ValueError, r"nrow must be an integer >= 1"),
    "show_images 4 row_labels, 2 rows": (lambda: viz.show_images(IMG, nrow=2, row_labels=list("abcd")), ValueError,
                                         r"row_labels must have one label per row \(2 rows\), got 4"),
    "show_images 1 row_label, 2 rows": (lambda: viz.show_images(IMG, nrow=2, row_labels=["a"]), ValueError,
                                        r"row_labels must have one label per row \(2 rows\), got 1"),
    "plot_losses steps too short": (lambda: viz.plot_losses({"a": [1, 2, 3]}, steps={"a": [0, 10]}), ValueError,
                                    r"steps\['a'\] must have one x value per point of curves\['a'\] \(3\), got 2"),
    "plot_losses no curves": (lambda: viz.plot_losses({}), ValueError, r"curves is empty"),
    # 6: condition dropout
    "raster_loss dropout bad class": (lambda: raster_loss(AR, MAPS, torch.tensor([0, 99]), p_uncond=1.0),
                                      ValueError, r"classes must lie in \[0, 3\], got 99"),
    "VAR.loss dropout bad class": (lambda: VARM.loss(MS.quantizer, PYR, torch.tensor([-5, 99]), p_uncond=1.0),
                                   ValueError, r"classes must lie in \[0, 3\], got -5"),
    "condition_dropout null 2.5": (lambda: condition_dropout(CLS, 1.0, 2.5), TypeError,
                                   r"null_class must be an integer"),
    "condition_dropout null -1": (lambda: condition_dropout(CLS, 1.0, -1), ValueError,
                                  r"null_class must be an integer >= 0"),
    "condition_dropout p str": (lambda: condition_dropout(CLS, "0.5", 3), TypeError, r"p must be a finite number"),
    "condition_dropout p 1.5": (lambda: condition_dropout(CLS, 1.5, 3), ValueError, r"p must be a finite number in"),
    "condition_dropout list": (lambda: condition_dropout([0, 1], 0.5, 3), TypeError, r"classes must be a \(B,\)"),
    # 7: VAR functional
    "scale_step VQVAE": (lambda: scale_step(MS, None, 0, torch.zeros(2, 1, dtype=torch.long)), TypeError,
                         r"vq must be a MultiScaleVQ, got VQVAE \(pass tokenizer.quantizer\)"),
    "teacher_forcing VQVAE": (lambda: teacher_forcing_sequence(MS, PYR), TypeError,
                              r"vq must be a MultiScaleVQ, got VQVAE"),
    "scale_step k 3": (lambda: scale_step(MS.quantizer, None, 3, torch.zeros(2, 1, dtype=torch.long)), ValueError,
                       r"k must be an integer in \[0, 2\], got 3"),
    "scale_step k 1.0": (lambda: scale_step(MS.quantizer, None, 1.0, torch.zeros(2, 4, dtype=torch.long)),
                         TypeError, r"k must be an integer"),
    "unflatten too few": (lambda: vf.unflatten_pyramids(torch.zeros(2, 5, dtype=torch.long), SCALES), ValueError,
                          r"tokens must be \(B, 21\) for scales \(1, 2, 4\)"),
    "unflatten too many": (lambda: vf.unflatten_pyramids(torch.zeros(2, 30, dtype=torch.long), SCALES), ValueError,
                           r"tokens must be \(B, 21\)"),
    "flatten empty": (lambda: vf.flatten_pyramids([]), ValueError, r"pyramids must hold at least one"),
    "scale_bounds 2.5": (lambda: vf.scale_bounds((1, 2.5, 4)), TypeError, r"scales\[1\] must be an integer"),
    # 8: wrong model / config types
    "VAR(dict)": (lambda: VAR(dict(vocab_size=5, latent_dim=3)), TypeError, r"config must be a VARConfig, got dict"),
    "var generate_images(str)": (lambda: var_images("var", MS, torch.tensor([0])), TypeError,
                                 r"model must be a VAR, got str"),
    "raster generate_images swapped": (lambda: raster_images(TOK, AR, torch.tensor([0])), TypeError,
                                       r"model must be a class-conditional GPT, got VQVAE \(pass the model first"),
    "raster_loss(str)": (lambda: raster_loss("gpt", MAPS, CLS), TypeError, r"model must be a class-conditional GPT"),
    # 11: features and counts
    "precision_recall NaN": (lambda: metrics.precision_recall(torch.full_like(FEATS, nan), FEATS), ValueError,
                             r"feats_real must be finite, got nan"),
    "frechet features NaN": (lambda: metrics.frechet_distance_from_features(torch.full_like(FEATS, nan), FEATS),
                             ValueError, r"feats_a must be finite, got nan"),
    "frechet gaussians NaN cov": (lambda: metrics.frechet_distance_gaussians(np.zeros(2), np.full((2, 2), nan),
                                                                             np.zeros(2), np.eye(2)),
                                  ValueError, r"cov1 must be finite, got nan"),
    "precision_recall k 2.5": (lambda: metrics.precision_recall(FEATS, FEATS, k=2.5), TypeError,
                               r"k must be an integer"),
    "precision_recall numpy": (lambda: metrics.precision_recall(FEATS.numpy(), FEATS.numpy()), TypeError,
                               r"feats_real must be a \(N, F\) tensor, got ndarray"),
    "data_baseline repeats 0": (lambda: metrics.data_baseline("mnist", n=50, repeats=0), ValueError,
                                r"repeats must be an integer >= 1, got 0"),
    "data_baseline n 2.5": (lambda: metrics.data_baseline("mnist", n=2.5), TypeError, r"n must be an integer"),
    # 12: codebook usage
    "codebook_usage num_codes 5.0": (lambda: metrics.codebook_usage(torch.tensor([1, 2]), 5.0), TypeError,
                                     r"num_codes must be an integer"),
    "codebook_usage list of floats": (lambda: metrics.codebook_usage([torch.tensor([1.0])], 5), ValueError,
                                      r"indices\[0\] must be an integer tensor"),
    "codebook_usage numpy": (lambda: metrics.codebook_usage(np.array([1, 2]), 5), TypeError,
                             r"indices must be an integer tensor"),
    # 13: VARConfig
    "VARConfig n_classes 2.5": (lambda: VARConfig(**{**VAR_KW, "n_classes": 2.5}), TypeError,
                                r"n_classes must be an integer"),
    "VARConfig n_classes '3'": (lambda: VARConfig(**{**VAR_KW, "n_classes": "3"}), TypeError,
                                r"n_classes must be an integer"),
    "VARConfig scale 2.5": (lambda: VARConfig(**{**VAR_KW, "scales": (1, 2.5, 4)}), TypeError,
                            r"scales\[1\] must be an integer"),
    # 17: misc
    "VAR.start_token class 9": (lambda: VARM.start_token(torch.tensor([9])), ValueError,
                                r"classes must lie in \[0, 3\], got 9"),
    "VAR.step cache None": (lambda: VARM.step(0, None, CLS, None), TypeError, r"cache must be a KVCache"),
    "VAR.step cache of another batch": (lambda: VARM.step(0, None, CLS, VARM.make_cache(3)), ValueError,
                                        r"cache holds 3 rows but classes has 2"),
    "VAR.step k 0.0": (lambda: VARM.step(0.0, None, CLS, VARM.make_cache(2)), TypeError, r"k must be an integer"),
    "sample_pyramid known_mask 1": (lambda: VARM.generate(MS.quantizer, CLS, known=PYR, known_mask=1), TypeError,
                                    r"known_mask must be a \(B, 4, 4\) bool tensor or a list"),
    "raster_loss unconditional": (lambda: raster_loss(UNCOND, MAPS, None), ValueError,
                                  r"model must be a class-conditional GPT .*n_classes = 0"),
    # a MaskGIT (causal=False) passed to the raster sampler said "got multiple values for argument 'classes'"
    "raster generate bidirectional": (lambda: raster_images(BIDIR, TOK, CLS), ValueError,
                                      r"raster AR needs a causal model .*causal=False"),
    "raster_loss bidirectional": (lambda: raster_loss(BIDIR, MAPS, CLS), ValueError, r"needs a causal model"),
    "load_classifier gpu": (lambda: metrics.load_classifier("mnist", device="gpu"), ValueError,
                            r"unknown device 'gpu'"),
    "classify dataset list": (lambda: metrics.classify(IMG, dataset=["mnist"]), TypeError,
                              r"dataset must be one of \['mnist', 'shapes'\], got \['mnist'\]"),
    "classify numpy": (lambda: metrics.classify(IMG.numpy()), TypeError, r"images must be a floating-point tensor"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_one_line(name):
    fn, error, match = CASES[name]
    with pytest.raises(error, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_metrics_accept_other_float_dtypes(dtype):  # finding 1: cast to the classifier's dtype, as VQVAE.encode
    images = torch.rand(4, 1, 32, 32)
    feats = metrics.classifier_features(images)
    assert torch.allclose(metrics.classifier_features(images.to(dtype)), feats, atol=0.05 if dtype == torch.float16
                          else 1e-5)
    assert metrics.classify(images.to(dtype)).shape == (4,)


def test_show_images_row_labels_one_per_row_label_each_row():
    fig = viz.show_images(IMG[:3], nrow=2, row_labels=["top", "bottom"])  # 3 images, 2 per row: 2 rows
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["top", "bottom"]
    assert viz.show_images(IMG, nrow=8, row_labels=["one row"]).axes[0].get_ylim()[0] < IMG.shape[-2] + 4


def test_show_images_draws_grayscale_on_a_fixed_0_1_scale_with_its_title():
    """A single-channel batch is drawn in gray, with 0 black and 1 white whatever the batch's own range (a dark
    batch stays dark), under the title given."""
    fig = viz.show_images(IMG * 0.2, nrow=4, title="samples")
    ax = fig.axes[0]
    assert ax.images[0].get_cmap().name == "gray" and ax.images[0].get_clim() == (0, 1)
    assert ax.get_title() == "samples"
    rgb = viz.show_images(IMG.repeat(1, 3, 1, 1) * 0.2, nrow=4).axes[0]
    assert rgb.images[0].get_clim() == (0, 1) and rgb.get_title() == ""


def test_plot_losses_log_scale_only_when_asked():
    """logy=True puts the loss axis on a log scale (losses that fall by orders of magnitude); the default is linear."""
    assert viz.plot_losses({"train": [3.0, 2.0, 1.0]}, logy=True).axes[0].get_yscale() == "log"
    assert viz.plot_losses({"train": [3.0, 2.0, 1.0]}).axes[0].get_yscale() == "linear"


def test_plot_losses_with_steps_of_the_right_length_plots_them():
    fig = viz.plot_losses({"train": [3.0, 2.0, 1.0], "val": [2.5, 1.5]}, steps={"val": [0, 2]})
    assert [list(line.get_xdata()) for line in fig.axes[0].lines] == [[0, 1, 2], [0, 2]]


def test_codebook_usage_of_a_pyramid_counts_every_map():  # finding 12
    pyramid = [torch.tensor([[[1]]]), torch.tensor([[[2, 3], [3, 3]]])]
    usage = metrics.codebook_usage(pyramid, 5)
    flat = metrics.codebook_usage(torch.tensor([1, 2, 3, 3, 3]), 5)
    assert usage == flat and usage["num_used"] == 3


def test_codebook_usage_of_a_huge_codebook_needs_no_table_of_its_size():  # a 10^12-entry table would not fit
    usage = metrics.codebook_usage(torch.tensor([0, 1, 1, 4]), 10**12)
    assert usage["num_used"] == 3 and usage["fraction_used"] == 3 / 10**12
    assert usage["perplexity"] == pytest.approx(math.exp(-(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))))


def test_to_grid_and_psnr_keep_slightly_out_of_range_values():  # decoder outputs overshoot [0, 1] a little
    x = torch.rand(2, 1, 4, 4) * 1.2 - 0.1
    grid = images.to_grid(x, nrow=2)
    assert grid.min() >= 0 and grid.max() <= 1
    assert metrics.psnr(x, x.clamp(0, 1)) > 0


def test_psnr_takes_dark_or_black_0_255_images():  # only images that all stay within [0, 1.5] are refused
    dark = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 3  # 0..255 images, values up to 3
    assert metrics.psnr(dark, dark.flip(0), data_range=255) > 0
    black = torch.zeros(2, 1, 4, 4)
    assert metrics.psnr(black, black, data_range=255) == math.inf
    assert metrics.psnr(dark / 3, dark.flip(0) / 3, data_range=2) > 0  # a small data_range is left as given


def test_unflatten_round_trip_still_works():
    tokens = vf.flatten_pyramids(PYR)
    assert all(torch.equal(a, b) for a, b in zip(vf.unflatten_pyramids(tokens, SCALES), PYR))


def test_sample_pyramid_refuses_a_seed_for_its_generator():
    from ar_course.tokenizers import MultiScaleVQ
    from ar_course.var import VAR, VARConfig, sample_pyramid
    torch.manual_seed(0)
    model = VAR(VARConfig(vocab_size=5, latent_dim=3, scales=(1, 2), n_classes=3, n_layer=1, n_head=2, n_embd=16))
    vq = MultiScaleVQ(5, 3, scales=(1, 2))
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        sample_pyramid(model.eval(), vq, torch.tensor([0, 1]), generator=0)


def test_encode_dataset_refuses_a_multiscale_tokenizer_in_one_line():
    """It called ``.cpu()`` on msvq's list of maps: ``AttributeError: 'list' object has no attribute 'cpu'``."""
    from ar_course.raster.train import encode_dataset
    from ar_course.tokenizers.train import default_config

    tok = VQVAE(default_config("msvq", "mnist")).eval()
    with pytest.raises(ValueError, match=r"^encode_dataset needs a one-map tokenizer, got quantizer='msvq' .*"
                                         r"encode_pyramids"):
        encode_dataset(tok, torch.rand(2, 1, 32, 32))


def test_plot_losses_on_axes_you_pass_leaves_your_figure_layout_alone():
    """It called ``tight_layout`` on the axes' figure: an AttributeError on a subfigure's axes, and on a
    constrained-layout figure a warning and the layout switched to tight."""
    import warnings

    import matplotlib.pyplot as plt

    fig = plt.figure(layout="constrained")
    left, _ = fig.subfigures(1, 2)
    ax = left.subplots()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert viz.plot_losses({"train": [3.0, 2.0]}, ax=ax) is left
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
    own = viz.plot_losses({"train": [3.0, 2.0]})  # a figure it makes is laid out tight, as before
    assert type(own.get_layout_engine()).__name__ == "PlaceHolderLayoutEngine"
    plt.close("all")


def test_decode_step_without_a_cache_is_a_type_error_that_says_how_to_make_one():
    model = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(TypeError, match=r"^decode_step needs a StaticKVCache: cache=model.make_cache\(batch, "
                                        r"static=True\)$"):
        model.decode_step(torch.zeros(1, 1, dtype=torch.long))
