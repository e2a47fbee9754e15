"""Input checks no other test triggers (coverage audit, finding 8): configs, schedules, traces, orders,
register_kind, data_baseline... Each must raise the documented error at once, naming the argument, in one line.

At the end, cheap checks of code that is right but that no other test runs (finding 7)."""

from __future__ import annotations

import math

import pytest
import torch

from ar_course import checkpoint, metrics
from ar_course.diffusion_lm import functional as DF
from ar_course.diffusion_lm.model import DiffusionLM, DiffusionLMConfig
from ar_course.diffusion_lm.study import StudyConfig, data_constrained
from ar_course.raster import orders
from ar_course.serving.compression import kv_bytes_per_token
from ar_course.serving.engine import EngineConfig
from ar_course.serving.trace import make_trace
from ar_course.tokenizers.vqvae import VQVAEConfig
from ar_course.transformer.model import GPT, GPTConfig, attention_function
from ar_course.var.model import VARConfig


def _unconditional_generate_with_classes():
    g = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=8)).eval()
    return g.generate(torch.zeros(1, 1, dtype=torch.long), 2, classes=torch.tensor([0]))


def _diffusion_lm_default_blocks_on_short_length():
    model = DiffusionLM(DiffusionLMConfig(vocab_size=5, length=8, n_layer=1, n_head=1, n_embd=8))
    return model(torch.zeros(1, 9, dtype=torch.long))


CASES = [
    ("GPTConfig pos", lambda: GPTConfig(vocab_size=5, pos="alibi"), ValueError, r"^pos must be .*got 'alibi'$"),
    ("GPTConfig attn", lambda: GPTConfig(vocab_size=5, attn="flash"), ValueError,
     r"^attn must be one of .*'sdpa'.*got 'flash'$"),
    ("attention_function", lambda: attention_function("flash"), ValueError, r"^impl must be one of .*got 'flash'$"),
    ("GPT.generate classes", _unconditional_generate_with_classes, ValueError,
     r"classes are only taken by a class-conditional model \(n_classes > 0\)"),
    ("VARConfig n_classes", lambda: VARConfig(n_classes=0), ValueError, r"n_classes must be >= 1, got 0"),
    ("VARConfig scales", lambda: VARConfig(scales="abc"), TypeError, r"^scales must be .*got 'abc'$"),
    ("VQVAEConfig image_size", lambda: VQVAEConfig(image_size=30), ValueError,
     r"image_size 30 is not divisible by downsample 4"),
    ("DiffusionLM blocks", _diffusion_lm_default_blocks_on_short_length, ValueError,
     r"^train_block_sizes: 16 is neither 0 nor a divisor of length 8 .*train_block_sizes=\(0,\)"),
    ("mask_tokens schedule", lambda: DF.mask_tokens(torch.zeros(2, 4, dtype=torch.long), 0.5, 4, schedule="cosinus"),
     ValueError, r"^schedule must be one of \('linear', 'cosine'\), got 'cosinus'$"),
    ("mask_tokens noise", lambda: DF.mask_tokens(torch.zeros(2, 4, dtype=torch.long), 0.5, 4,
                                                 noise=torch.rand(2, 3)),
     ValueError, r"^noise must be a float tensor of the shape of ids \(2, 4\) .*, got \(2, 3\) torch.float32$"),
    ("StudyConfig budget", lambda: StudyConfig(budget=10), ValueError,
     r"^budget \(10\) must hold at least two windows of 64 characters$"),
    ("StudyConfig lr", lambda: StudyConfig(lr=-1.0), ValueError, r"^lr must be a finite number > 0, got -1.0$"),
    # a budget past the text: each "epoch" was 2.39 real passes over the 418,530 characters there are
    ("data_constrained budget", lambda: data_constrained(StudyConfig(budget=1_000_000), progress=False), ValueError,
     r"^budget \(1000000\) is more than the training text holds \(\d+ characters\)$"),
    ("data_constrained val", lambda: data_constrained(StudyConfig(val_windows=10 ** 6), progress=False), ValueError,
     r"^val_windows \* length \+ 1 \(64000001\) is more than the validation text holds \(\d+ characters\)$"),
    ("EngineConfig step tokens", lambda: EngineConfig(max_running=8, max_step_tokens=4), ValueError,
     r"^max_step_tokens \(4\) must be >= max_running \(8\)$"),
    ("kv_bytes_per_token method", lambda: kv_bytes_per_token(GPTConfig(vocab_size=5), "int3", 10), ValueError,
     r"^method must be one of .*'h2o'.*got 'int3'$"),
    ("make_trace list", lambda: make_trace([1, 2, 3], 2), TypeError, r"^text_ids must be a 1-D tensor .*got list$"),
    ("make_trace 2-D", lambda: make_trace(torch.zeros(2, 3, dtype=torch.long), 2), ValueError,
     r"^text_ids must be 1-D \(N,\), got shape \(2, 3\)$"),
    ("orders.schedule order", lambda: orders.schedule("spiral", 4, 4), ValueError,
     r"^order must be one of \('raster', 'random', 'neighbour'\), got 'spiral'$"),
    ("orders.schedule size", lambda: orders.schedule("raster", 0, 4), ValueError,
     r"^the token map must be at least 1x1, got 0x4$"),
    ("register_kind empty", lambda: checkpoint.register_kind("", GPT, GPTConfig), ValueError,
     r"^kind must be a non-empty string, got ''$"),
    ("data_baseline n", lambda: metrics.data_baseline("mnist", n=1), ValueError,
     r"^n must be an integer >= 2, got 1$"),
]


@pytest.mark.parametrize("make, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_in_one_line(make, error, match):
    with pytest.raises(error, match=match) as info:
        make()
    assert type(info.value) is error  # not a subclass standing in for it
    message = str(info.value)
    assert message and "\n" not in message, message


# -- paths no other test runs ------------------------------------------------------------------------------


def test_l2_norm_lookup_is_the_nearest_code_by_angle_and_ignores_scale():
    from ar_course.tokenizers import VectorQuantizer

    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, l2_norm=True).eval()
    x = torch.randn(64, 4)
    codes = vq.codebook.detach()
    expected = (x @ codes.T / codes.norm(dim=1)).argmax(1)  # the largest cosine: x's own norm does not count
    assert torch.equal(vq.lookup(x), expected)
    for factor in (5.0, 0.01):
        assert torch.equal(vq.lookup(factor * x), expected)
    # without l2_norm the nearest code by distance depends on the scale: the same check would fail
    plain = VectorQuantizer(16, 4).eval()
    plain.codebook.data.copy_(codes)
    assert not torch.equal(plain.lookup(100 * x), plain.lookup(0.01 * x))


def test_residual_vq_with_ema_moves_hit_codes_to_their_vectors_and_reports_usage():
    from ar_course.tokenizers import ResidualVQ

    torch.manual_seed(0)
    r = ResidualVQ(16, 4, depth=2, ema=True).train()
    before = [r.layer(d).codebook.detach().clone() for d in range(2)]
    z = torch.randn(2, 4, 3, 3)
    out = r(z)
    assert out.indices.shape == (2, 2, 3, 3) and math.isfinite(float(out.loss))
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)  # level 0 codes the vectors themselves
    idx0 = out.indices[:, 0].reshape(-1)
    after0 = r.layer(0).codebook.detach()
    for code in idx0.unique():
        target = flat[idx0 == code].mean(0)
        assert (after0[code] - target).norm() < (before[0][code] - target).norm(), int(code)
    assert not torch.equal(before[0], after0)
    # usage: mean over the levels of (fraction of the 16 codes hit, exp(entropy) of the hit counts)
    fractions, perplexities = [], []
    for d in range(2):
        counts = torch.bincount(out.indices[:, d].reshape(-1), minlength=16).double()
        p = counts[counts > 0] / counts.sum()
        fractions.append(float((counts > 0).sum()) / 16)
        perplexities.append(math.exp(-float((p * p.log()).sum())))
    usage = r.usage()
    assert usage["fraction_used"] == pytest.approx(sum(fractions) / 2)
    assert usage["perplexity"] == pytest.approx(sum(perplexities) / 2)
    # in eval mode a forward pass leaves the codebooks alone
    r.eval()
    frozen = r.codebooks().clone()
    r(z)
    assert torch.equal(frozen, r.codebooks())


def test_multiscale_vq_usage_counts_every_scale_of_the_shared_codebook():
    from ar_course.tokenizers import MultiScaleVQ

    torch.manual_seed(0)
    m = MultiScaleVQ(32, 4, scales=(1, 2, 4)).train()
    out = m(torch.randn(3, 4, 4, 4))
    counts = torch.bincount(torch.cat([i.reshape(-1) for i in out.indices]), minlength=32).double()
    assert counts.sum() == 3 * (1 + 4 + 16)
    p = counts[counts > 0] / counts.sum()
    usage = m.usage()
    assert usage["fraction_used"] == pytest.approx(float((counts > 0).sum()) / 32)
    assert usage["perplexity"] == pytest.approx(math.exp(-float((p * p.log()).sum())))


@pytest.mark.parametrize("context", [200, 50])
def test_kv_bytes_per_token_of_h2o_follows_its_formula(context):
    config = GPTConfig(vocab_size=17, block_size=64, n_layer=2, n_head=2, n_embd=16)  # head size 8
    full = 2 * 2 * 2 * 8 * 2  # keys and values, 2 layers, 2 heads, 8 numbers, 2 bytes (float16) = 128
    assert kv_bytes_per_token(config, "none", context) == full
    kept = min(96, context) / context  # a cache of window=96 positions
    # h2o: one float32 score per cached token, head and layer; h2o_blocks: one float64 score per position
    assert kv_bytes_per_token(config, "h2o", context) == pytest.approx((full + 2 * 2 * 4) * kept)
    assert kv_bytes_per_token(config, "h2o_blocks", context) == pytest.approx((full + 8) * kept)
    if context == 200:
        assert kv_bytes_per_token(config, "h2o", context) == pytest.approx(69.12)
        assert kv_bytes_per_token(config, "h2o_blocks", context) == pytest.approx(65.28)


def test_var_inpainting_with_per_scale_masks_equals_one_full_size_mask():
    from ar_course.tokenizers import VQVAE
    from ar_course.tokenizers.train import default_config
    from ar_course.var.functional import scale_masks
    from ar_course.var.model import VAR, sample_pyramid
    from ar_course.var.train import encode_pyramids

    torch.manual_seed(0)
    tc = default_config("msvq", num_codes=16, width=8)
    vq = VQVAE(tc).eval()
    model = VAR(VARConfig(vocab_size=16, latent_dim=tc.latent_dim, scales=tc.scales, n_classes=10, n_layer=1,
                          n_head=2, n_embd=32)).eval()
    known = encode_pyramids(vq, torch.rand(2, 1, 32, 32))
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True  # keep the left half
    mask[1, 6:, 4:] = True  # and, for the second image, part of the right half
    classes = torch.tensor([3, 7])
    a = sample_pyramid(model, vq.quantizer, classes, known=known, known_mask=mask,
                       generator=torch.Generator().manual_seed(0))
    per_scale = scale_masks(mask, model.config.scales)
    b = sample_pyramid(model, vq.quantizer, classes, known=known, known_mask=per_scale,
                       generator=torch.Generator().manual_seed(0))
    assert len(a) == len(b) == len(tc.scales)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for x, k, m, s in zip(b, known, per_scale, tc.scales):
        assert x.shape == (2, s, s)
        assert torch.equal(x[m], k[m])  # the kept tokens are kept at every scale
    assert torch.equal(b[-1][mask], known[-1][mask])


def test_vq_lookup_of_no_rows_is_an_empty_index_vector():
    from ar_course.tokenizers.functional import vq_lookup

    r = vq_lookup(torch.zeros(0, 4), torch.randn(8, 4))
    assert r.shape == (0,) and r.dtype == torch.int64


def test_weight_average_copies_integer_buffers_and_averages_the_rest():
    from ar_course.train import WeightAverage

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    avg = WeightAverage(net, 0.9)
    old_weight = net[0].weight.detach().clone()
    net[1].num_batches_tracked += 7
    net(torch.randn(4, 2))  # training mode: one more batch tracked
    with torch.no_grad():
        net[0].weight.add_(1.0)
    avg.update(net, 5)
    assert avg.state["1.num_batches_tracked"].dtype == torch.long
    assert int(avg.state["1.num_batches_tracked"]) == int(net[1].num_batches_tracked) == 8
    d = min(0.9, (1 + 5) / (10 + 5))  # 0.4
    assert torch.allclose(avg.state["0.weight"], d * old_weight + (1 - d) * (old_weight + 1.0))


def test_history_smoothed_past_its_window():
    from ar_course.train import History

    h = History()
    h.loss = [1.0, 2.0, 3.0, 4.0, 5.0, 10.0]
    # window 2: the mean of the last (at most) two losses at each step
    assert h.smoothed(2) == pytest.approx([1.0, 1.5, 2.5, 3.5, 4.5, 7.5])
    assert h.smoothed(3) == pytest.approx([1.0, 1.5, 2.0, 3.0, 4.0, 19 / 3])
    assert h.smoothed(100) == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0, 25 / 6])
    h.loss = [float(i) for i in range(30)]
    expected = [sum(h.loss[max(0, i - 19):i + 1]) / (i + 1 - max(0, i - 19)) for i in range(30)]
    assert h.smoothed() == pytest.approx(expected)


# -- the package loaders and trainers read devices and checkpoint names as the rest of the library does ----------

def test_trainers_read_device_names_like_the_loaders():
    """A device torch does not know is one line naming it (train_ar said "Expected one of cpu, cuda, ipu, ..."),
    and "auto" is a device here too."""
    from ar_course.raster.train import train_ar
    from ar_course.tokenizers import VQVAE

    with torch.random.fork_rng():
        torch.manual_seed(0)
        tok = VQVAE(VQVAEConfig(image_size=32, downsample=4, width=4, latent_dim=4, num_codes=16)).eval()
    maps = torch.randint(0, 16, (8, 8, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 10
    kw = dict(steps=1, batch_size=8, n_layer=1, n_embd=16, n_head=2, progress=False)
    with pytest.raises(ValueError, match="^unknown device 'gpu': use 'cpu', 'cuda', 'cuda:N' or 'auto'$"):
        train_ar(tok, maps, labels, device="gpu", **kw)
    with pytest.raises(ValueError, match="^unknown device 'gpu'"):
        metrics.train_classifier(steps=1, device="gpu", progress=False)
    model, _ = train_ar(tok, maps, labels, device="auto", **kw)
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_package_loaders_take_shipped_names_as_path_and_say_when_one_is_passed_as_device():
    from ar_course import raster, var

    model, _ = raster.load_pretrained(path="ar_mnist_cca")  # a name: was "no checkpoint at ar_mnist_cca"
    assert raster.pretrained_info("ar_mnist_cca")["method"] == "cca" and model.config.n_classes == 10
    assert var.pretrained_info("var_mnist_cca") == checkpoint.info("var_mnist_cca")
    with pytest.raises(ValueError, match="^device 'ar_mnist_cca' is a checkpoint name, not a device: pass it as "
                                         "path='ar_mnist_cca'"):
        raster.load_pretrained("ar_mnist_cca")


def test_raster_generate_tokens_takes_the_models_grid_by_default():
    from ar_course.raster import generate_tokens, raster_config

    torch.manual_seed(0)
    model = GPT(raster_config(5, grid=(2, 3), n_classes=3, n_layer=1, n_head=2, n_embd=16)).eval()
    classes = torch.tensor([0, 2])
    default = generate_tokens(model, classes, generator=torch.Generator().manual_seed(1))
    assert torch.equal(default, generate_tokens(model, classes, (2, 3), generator=torch.Generator().manual_seed(1)))
    assert default.shape == (2, 2, 3)
    no_grid = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=16, n_classes=3)).eval()
    with pytest.raises(ValueError, match="^grid is needed: this model has no config.grid"):
        generate_tokens(no_grid, classes)
    assert generate_tokens(no_grid, classes, (1, 7)).shape == (2, 1, 7)


# -- a seed where a torch.Generator goes, and values a function used to take silently -------------------------

def _continuous_model():
    from ar_course.continuous import ContinuousAR, ContinuousARConfig

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ContinuousAR(ContinuousARConfig(token_dim=2, grid=(2, 2), n_classes=3, n_layer=1, n_head=2,
                                               n_embd=16)).eval()


def _generator_cases():
    from ar_course.align import wrong_classes
    from ar_course.continuous import flow_matching_loss, generate_tokens
    from ar_course.masked.functional import gumbel_noise, random_mask, training_mask
    from ar_course.raster import condition_dropout

    ids = torch.zeros(2, 4, dtype=torch.long)
    return {
        "continuous.generate_tokens": lambda g: generate_tokens(_continuous_model(), torch.tensor([0]), generator=g),
        "flow_matching_loss": lambda g: flow_matching_loss(lambda x, t: x, torch.zeros(3, 2), generator=g),
        "wrong_classes": lambda g: wrong_classes(torch.tensor([0, 1]), 3, g),
        "random_mask": lambda g: random_mask(2, 4, generator=g),
        "training_mask": lambda g: training_mask(torch.rand(2), 4, generator=g),
        "gumbel_noise": lambda g: gumbel_noise((2, 3), generator=g),
        "condition_dropout": lambda g: condition_dropout(torch.tensor([0, 1]), 0.5, 3, generator=g),
        "mask_tokens": lambda g: DF.mask_tokens(ids, 0.5, 9, generator=g),
        "denoise_step": lambda g: DF.denoise_step(torch.full((1, 4), 9), torch.zeros(1, 4, dtype=torch.long), 0.5,
                                                  0.25, 9, generator=g),
    }


@pytest.mark.parametrize("name", list(_generator_cases()))
def test_a_seed_where_the_generator_goes_is_one_line(name):
    """torch's own message was 4-6 lines (``randn() received an invalid combination of arguments``)."""
    call = _generator_cases()[name]
    call(torch.Generator().manual_seed(0))  # a generator works
    with pytest.raises(TypeError, match=r"^generator must be a torch.Generator or None, got int \(make one with"):
        call(0)


@pytest.mark.parametrize("call, error, match", [
    # mask_id 5.7 became 5, True became 1 and -1 was written into the ids
    (lambda: DF.mask_tokens(torch.zeros(2, 4, dtype=torch.long), 0.5, 5.7), TypeError, "^mask_id must be an integer"),
    (lambda: DF.mask_tokens(torch.zeros(2, 4, dtype=torch.long), 0.5, -1), ValueError,
     "^mask_id must be an integer >= 0, got -1$"),
    (lambda: DF.mask_tokens(torch.zeros(2, 4, dtype=torch.long), 0.5, 9, noise=torch.zeros(2, 4, dtype=torch.long)),
     ValueError, r"^noise must be a float tensor of the shape of ids \(2, 4\)"),
    (lambda: DF.alpha(torch.tensor([True, False])), ValueError, "^t must be a floating-point tensor of times"),
    (lambda: __import__("ar_course.continuous", fromlist=["x"]).flow_matching_pair(
        torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3), torch.zeros(2)), ValueError,
     "^x0 must be a floating-point tensor, got torch.bool$"),
    (lambda: __import__("ar_course.masked.functional", fromlist=["x"]).neighbour_steps(2, 2.5), TypeError,
     r"^w must be an integer, got 2.5 \(float\)$"),
    (lambda: __import__("ar_course.align", fromlist=["x"]).sequence_log_probs(None, torch.zeros(1, 2, 2,
     dtype=torch.long), torch.tensor([0])), TypeError, "^model must be a class-conditional GPT .*got NoneType$"),
])
def test_values_once_taken_silently_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


P3 = torch.softmax(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), -1)  # (L + 1, V), L = 2
DRAFT = torch.tensor([1, 2])


@pytest.mark.parametrize("u, q, match", [
    (torch.tensor([float("nan"), 0.5]), P3[:2], r"^u must hold uniform numbers in \[0, 1\), got nan$"),
    (torch.tensor([2.0, 0.5]), P3[:2], r"^u must hold uniform numbers in \[0, 1\), got 2.0$"),
    (torch.tensor([0, 0]), P3[:2], r"^u must be a floating-point tensor of uniform numbers in \[0, 1\), got "),
    (torch.tensor([0.1, 0.5]), torch.full((2, 5), float("nan")), "^q must be finite, got nan$"),
    (torch.tensor([0.1, 0.5]), P3[:2] > 0.1, "^q must be a floating-point tensor"),
])
def test_speculative_verification_refuses_what_would_reject_every_draft_silently(u, q, match):
    """A NaN (or 2.0) uniform number or a NaN draft probability rejected the drafts without an error."""
    from ar_course.speculative import accepted_prefix, jacobi_verify, speculative_round

    for call in (lambda: speculative_round(P3, q, DRAFT, u), lambda: jacobi_verify(P3, q, DRAFT, u),
                 lambda: accepted_prefix(P3[None, :2], q[None], DRAFT[None], u[None])):
        with pytest.raises(ValueError, match=match):
            call()
    assert speculative_round(P3, P3[:2], DRAFT, torch.tensor([0.0, 0.999])).shape[0] >= 1  # valid still runs
