"""Chapter 10's continuous tokens: the KL-regularised autoencoder, flow matching and its Euler sampler (a
statistical test on a 1-D toy with the exact velocity field), the continuous AR model (cache vs plain path,
seeded determinism, guidance), the shipped model's recorded loss, and clear errors for bad arguments."""

import math
import re

import pytest
import torch

from ar_course.continuous import (
    ContinuousAR, ContinuousARConfig, euler_sample, flow_matching_loss, flow_matching_pair, generate_tokens,
    map_to_tokens, tokens_to_map,
)
from ar_course.tokenizers import VQVAE, VQVAEConfig
from ar_course.tokenizers.continuous import GaussianBottleneck, gaussian_kl
from ar_course.tokenizers.train import default_config, evaluate
from cli_helpers import error_line, run

# -- flow matching on a 1-D toy ----------------------------------------------------------------------------


def gaussian_velocity(m: float, s: float):
    """The exact rectified-flow velocity from N(0, 1) noise to N(m, s^2) data: E[x1 - x0 | x_t = x]."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t[:, None].double()
        var = (1 - tt) ** 2 + tt**2 * s**2  # Var x_t
        cov = tt * s**2 - (1 - tt)  # Cov(x1 - x0, x_t)
        return m + cov / var * (x - tt * m)

    return velocity


def ks_statistic(samples: torch.Tensor, m: float, s: float) -> float:
    """Kolmogorov-Smirnov distance between the samples' empirical CDF and that of N(m, s^2)."""
    x, _ = samples.flatten().double().sort()
    n = x.numel()
    cdf = 0.5 * (1 + torch.erf((x - m) / (s * math.sqrt(2))))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


N_TOY = 4000
KS_CRITICAL = 1.95 / math.sqrt(N_TOY)  # the 0.1% level


def test_euler_with_the_exact_velocity_recovers_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    m, s = 2.0, 0.5
    x0 = torch.randn(N_TOY, 1, generator=g, dtype=torch.float64)
    x1 = euler_sample(gaussian_velocity(m, s), x0, 100)
    assert ks_statistic(x1, m, s) < KS_CRITICAL
    # the same test rejects what a wrong field gives: the straight path of each noise to the mean (no spread)
    # the same test rejects what a wrong field gives: a constant drift to the mean keeps the noise's spread
    wrong = euler_sample(lambda x, t: torch.full_like(x, m), x0, 100)
    assert ks_statistic(wrong, m, s) > KS_CRITICAL
    # and too few steps of the exact field miss it (Euler's error), which the test also sees
    assert ks_statistic(euler_sample(gaussian_velocity(m, s), x0, 1), m, s) > KS_CRITICAL


def test_flow_matching_loss_is_smallest_at_the_exact_velocity():
    g = torch.Generator().manual_seed(1)
    m, s = 2.0, 0.5
    x1 = m + s * torch.randn(20000, 1, generator=g, dtype=torch.float64)
    exact = flow_matching_loss(gaussian_velocity(m, s), x1, torch.Generator().manual_seed(2))
    for wrong in (gaussian_velocity(m + 0.3, s), gaussian_velocity(m, 1.0), lambda x, t: torch.full_like(x, m)):
        assert flow_matching_loss(wrong, x1, torch.Generator().manual_seed(2)) > exact


def test_flow_matching_pair_endpoints():
    x0, x1 = torch.randn(3, 2), torch.randn(3, 2)
    x_t, v = flow_matching_pair(x0, x1, torch.tensor([0.0, 1.0, 0.5]))
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], x1[1])
    torch.testing.assert_close(x_t[2], (x0[2] + x1[2]) / 2)
    torch.testing.assert_close(v, x1 - x0)


def test_flow_functions_reject_bad_arguments():
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        euler_sample(lambda x, t: x, torch.zeros(2, 1), 0)
    with pytest.raises(ValueError, match=r"t must be \(N,\)"):
        flow_matching_pair(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="one shape"):
        flow_matching_pair(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))


# -- the KL-regularised autoencoder --------------------------------------------------------------------------


def small_kl_config(**kw) -> VQVAEConfig:
    return default_config("kl", width=8, **kw)


def test_kl_autoencoder_shapes_and_loss():
    torch.manual_seed(0)
    model = VQVAE(small_kl_config())
    x = torch.rand(3, 1, 32, 32)
    h = model.encode(x)
    assert h.shape == (3, 8, 8, 8)  # means and log-variances of 4 channels
    model.eval()
    out = model(x)
    mean, logvar = model.quantizer.split(h)
    kl = model.config.kl_weight * gaussian_kl(mean, logvar).mean()
    recon = model.decoder(mean)
    torch.testing.assert_close(out.quant_loss, kl)
    torch.testing.assert_close(out.recon_loss, torch.nn.functional.mse_loss(recon, x))
    torch.testing.assert_close(out.loss, out.recon_loss + out.quant_loss)
    assert out.recon.shape == x.shape and out.indices.shape == (3, 4, 8, 8)
    tokens = model.encode_to_indices(x)
    assert tokens.dtype == torch.float32 and tokens.shape == (3, 4, 8, 8)
    torch.testing.assert_close(model.decode_from_indices(tokens), out.recon)  # eval: decode the mean


def test_kl_training_mode_samples_and_the_kl_is_zero_at_the_prior():
    torch.manual_seed(0)
    bottleneck = GaussianBottleneck(2, kl_weight=1.0)
    h = torch.cat([torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)], dim=1)  # mean 0, logvar 0: the prior
    out = bottleneck(h)
    assert float(out.loss) == 0.0
    assert out.z_q.std() > 0.5  # a sample of N(0, 1), not the mean
    assert torch.equal(bottleneck.eval()(h).z_q, torch.zeros(1, 2, 3, 3))


def test_kl_training_sample_uses_the_standard_deviation():
    """A training-mode sample is mean + eps * exp(logvar / 2): scaled by the standard deviation (3 here), not by
    the variance."""
    bottleneck = GaussianBottleneck(2).train()
    mean, logvar = torch.randn(3, 2, 4, 4), torch.full((3, 2, 4, 4), 2 * math.log(3.0))  # std 3
    torch.manual_seed(0)
    z = bottleneck(torch.cat([mean, logvar], 1)).z_q
    torch.manual_seed(0)
    eps = torch.randn_like(mean)
    torch.testing.assert_close(z, mean + 3 * eps)


def test_kl_log_variances_are_clamped_before_use():
    """The log-variances are clamped to [-30, 20] before the sample and the KL use them: the loss stays finite."""
    bottleneck = GaussianBottleneck(1).eval()
    mean, logvar = torch.zeros(1, 1, 1, 2), torch.tensor([[[[100.0, -100.0]]]])
    _, clamped = bottleneck.split(torch.cat([mean, logvar], 1))
    assert clamped.flatten().tolist() == [20.0, -30.0]
    loss = bottleneck(torch.cat([mean, logvar], 1)).loss
    expected = bottleneck.kl_weight * gaussian_kl(mean, torch.tensor([[[[20.0, -30.0]]]])).mean()
    assert torch.isfinite(loss) and torch.allclose(loss, expected)


def test_kl_indices_are_the_standardised_means_in_training_mode_too():
    """The tokens (indices) are the standardised means, not the standardised sample, in training mode as well."""
    bottleneck = GaussianBottleneck(2).train()
    h = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    out = bottleneck(h)
    torch.testing.assert_close(out.indices, bottleneck.normalize(h[:, :2]))


def test_calibration_standardises_the_tokens_and_decode_inverts_encode():
    g = torch.Generator().manual_seed(3)
    bottleneck = GaussianBottleneck(3)
    h = torch.randn(50, 6, 4, 4, generator=g) * 5 + 2
    bottleneck.calibrate(h)
    tokens = bottleneck.encode(h)  # (50, 3, 4, 4)
    flat = tokens.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(flat.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(0), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(bottleneck.decode(tokens), h[:, :3])


def test_kl_calibration_keeps_a_constant_channel_finite():
    """A channel whose means do not spread gets the floor scale 1e-6, not 0: its tokens stay finite."""
    bottleneck = GaussianBottleneck(2)
    h = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    h[:, 1] = 0.5  # the second channel's means are all 0.5: no spread
    bottleneck.calibrate(h)
    assert float(bottleneck.scale[1]) == pytest.approx(1e-6, rel=1e-6)
    assert torch.isfinite(bottleneck.encode(h)).all()


def test_kl_evaluate_reports_psnr_without_codebook_usage():
    torch.manual_seed(0)
    result = evaluate(VQVAE(small_kl_config()), torch.rand(4, 1, 32, 32))
    assert set(result) == {"psnr", "mse"}


def test_kl_bad_arguments():
    with pytest.raises(ValueError, match="dim must be an integer >= 1, got 0"):
        GaussianBottleneck(0)
    with pytest.raises(TypeError, match="dim must be an integer >= 1, got 2.0"):
        GaussianBottleneck(2.0)
    with pytest.raises(ValueError, match="kl_weight must be >= 0"):
        GaussianBottleneck(2, kl_weight=-1.0)
    with pytest.raises(ValueError, match="rotation_trick applies to quantizer 'vq' only, got quantizer='kl'"):
        VQVAEConfig(quantizer="kl", rotation_trick=True)
    with pytest.raises(ValueError, match="expects 8 channels"):
        VQVAE(small_kl_config()).quantizer(torch.zeros(1, 4, 8, 8))


def test_train_tokenizer_cli_rejects_a_negative_kl_weight(capsys):
    status, _, err = run(capsys, "train", "tokenizer", "--quantizer", "kl", "--kl-weight", "-1")
    assert status == 2 and "--kl-weight" in error_line(err)


# -- the continuous AR model -----------------------------------------------------------------------------------


def tiny_model(seed: int = 0) -> ContinuousAR:
    torch.manual_seed(seed)
    model = ContinuousAR(ContinuousARConfig(token_dim=3, grid=(2, 3), n_classes=4, n_layer=2, n_head=2, n_embd=16,
                                            head_width=16, head_depth=2))
    for p in model.parameters():  # zero-initialised modulations would hide the condition: give them values
        torch.nn.init.normal_(p, std=0.3) if p.ndim > 1 else None
    return model.eval()


def test_conditions_are_causal():
    model = tiny_model()
    tokens = torch.randn(2, 6, 3)
    cond = model.conditions(tokens[:, :-1], torch.tensor([0, 1]))  # (2, 6, 16)
    changed = tokens.clone()
    changed[:, 3] += 1.0
    cond2 = model.conditions(changed[:, :-1], torch.tensor([0, 1]))
    torch.testing.assert_close(cond[:, :4], cond2[:, :4])  # positions 0..3 have not seen token 3
    assert not torch.allclose(cond[:, 4:], cond2[:, 4:])


def test_loss_is_a_finite_scalar_with_gradients():
    model = tiny_model().train()
    loss = model.loss(torch.randn(4, 6, 3), torch.tensor([0, 1, 2, 4]))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.head.out.weight.grad is not None and model.inp.weight.grad is not None


def test_the_loss_conditions_token_i_on_the_class_and_tokens_before_i_only():
    """The velocity head's condition at position i is built from the class and tokens < i; a shift by one
    would let each token see itself."""
    model, classes = tiny_model(), torch.tensor([0, 3])
    tokens = torch.randn(2, 6, 3)
    seen = []
    forward = model.head.forward
    model.head.forward = lambda x_t, t, cond: (seen.append(cond), forward(x_t, t, cond))[1]
    model.loss(tokens, classes, generator=torch.Generator().manual_seed(0))
    want = model.conditions(tokens[:, :-1], classes).reshape(-1, 16)
    torch.testing.assert_close(seen[0], want)


def test_cached_sampling_equals_the_plain_path():
    model = tiny_model()
    classes = torch.tensor([0, 3, 4])
    for cfg in (0.0, 1.5):
        a = generate_tokens(model, classes, steps=4, cfg=cfg, generator=torch.Generator().manual_seed(5))
        b = generate_tokens(model, classes, steps=4, cfg=cfg, generator=torch.Generator().manual_seed(5),
                            use_cache=False)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded():
    model = tiny_model()
    classes = torch.tensor([1, 2])
    a = generate_tokens(model, classes, steps=3, generator=torch.Generator().manual_seed(0))
    b = generate_tokens(model, classes, steps=3, generator=torch.Generator().manual_seed(0))
    c = generate_tokens(model, classes, steps=3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 6, 3) and torch.equal(a, b) and not torch.allclose(a, c)
    zero = generate_tokens(model, classes, steps=3, temperature=0.0, generator=torch.Generator().manual_seed(0))
    zero2 = generate_tokens(model, classes, steps=3, temperature=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(zero, zero2)  # temperature 0: the deterministic path from x0 = 0


def test_guidance_at_w_zero_is_conditional_and_changes_samples_otherwise():
    model = tiny_model()
    classes = torch.tensor([0, 2])
    cond = generate_tokens(model, classes, steps=3, generator=torch.Generator().manual_seed(0))
    guided = generate_tokens(model, classes, steps=3, cfg=2.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(cond, guided)
    with torch.no_grad():  # every class the null class: the guided path must give the conditional samples
        model.wce.weight.copy_(model.wce.weight[model.null_class].expand_as(model.wce.weight))
    same_cond = generate_tokens(model, classes, steps=3, generator=torch.Generator().manual_seed(0))
    same_guided = generate_tokens(model, classes, steps=3, cfg=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same_guided, same_cond, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_guided_sampling_of_a_half_precision_model_stays_in_its_dtype(dtype):
    """Guidance mixes half-precision velocities in float32; fed back as float32, the next Euler step met the
    head's half weights: "mat1 and mat2 must have the same dtype"."""
    model, classes = tiny_model().to(dtype), torch.tensor([0, 2])
    tokens = generate_tokens(model, classes, steps=3, cfg=1.0, generator=torch.Generator().manual_seed(0))
    assert tokens.dtype == dtype and tokens.shape == (2, 6, 3) and bool(tokens.float().isfinite().all())


def test_guided_sampling_integrates_cond_plus_w_times_cond_minus_uncond():
    """Guidance follows ``(1 + w) v(cond) - w v(uncond)``: the class's and the null class's conditions must not
    be swapped."""
    model, classes, w = tiny_model(), torch.tensor([1, 2]), 2.0
    model.head.forward = lambda x, t, cond: cond[:, :3]  # a velocity that only reads the condition
    first = generate_tokens(model, classes, steps=1, temperature=0.0, cfg=w)[:, 0]  # from 0, one Euler step
    empty = torch.zeros(2, 0, 3)
    cond = model.conditions(empty, classes)[:, -1, :3]
    uncond = model.conditions(empty, torch.full_like(classes, model.null_class))[:, -1, :3]
    torch.testing.assert_close(first, (1 + w) * cond - w * uncond)


def test_token_map_round_trip():
    x = torch.randn(2, 4, 8, 8)
    tokens = map_to_tokens(x)
    assert tokens.shape == (2, 64, 4)
    torch.testing.assert_close(tokens[:, 9], x[:, :, 1, 1])  # raster order: row 1, column 1
    torch.testing.assert_close(tokens_to_map(tokens, (8, 8)), x)


def test_continuous_ar_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        generate_tokens(model, torch.tensor([0]), steps=0)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        generate_tokens(model, torch.tensor([0]), temperature=-1.0)
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        generate_tokens(model, torch.tensor([0]), cfg=float("nan"))
    with pytest.raises(ValueError, match="classes"):
        generate_tokens(model, torch.tensor([5]))
    with pytest.raises(ValueError, match=r"tokens must be non-empty float \(B, 6, 3\)"):
        model.loss(torch.zeros(2, 5, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="divisible by n_head"):
        ContinuousARConfig(n_embd=10, n_head=4)



@pytest.mark.parametrize("temperature, cfg", [(1e20, 0.0), (1e39, 0.0), (1.0, 1e30), (0.0, 1e38)])
def test_sampling_that_overflows_raises_instead_of_returning_nan_tokens(temperature, cfg):
    """A finite temperature or cfg too large for float32 gave all-NaN tokens (and images) without a word; the
    discrete samplers refuse NaN logits, and this one refuses NaN tokens alike."""
    values = re.escape(f"temperature={temperature:g} or cfg={cfg:g}")
    with pytest.raises(ValueError, match=rf"^sampled token \d \(of 6\) of sample 0 is NaN or inf: {values} "
                                         rf"overflows the model's float32 numbers \(lower it\), or the model's "
                                         rf"weights are not finite$"):
        generate_tokens(tiny_model(), torch.tensor([0, 1]), steps=2, temperature=temperature, cfg=cfg)
    assert torch.isfinite(generate_tokens(tiny_model(), torch.tensor([0, 1]), steps=2, temperature=1e12,
                                          cfg=1e10)).all()  # large but within float32: still tokens


def test_sampling_a_model_with_nan_weights_raises():
    model = tiny_model()
    with torch.no_grad():
        model.head.out.bias[1] = float("nan")  # a diverged run's weights
    with pytest.raises(ValueError, match=r"^sampled token 0 \(of 6\) of sample 0 is NaN or inf: .* or the model's "
                                         r"weights are not finite$"):
        generate_tokens(model, torch.tensor([0, 1]), steps=2)

def test_the_shipped_model_keeps_its_recorded_test_loss():
    """The velocity head's time features, its ``1 + scale`` modulation and its use of t cannot be told apart on
    tiny random models; a change to any of them breaks the shipped model, whose test loss would jump."""
    from ar_course.continuous.model import load_pretrained, pretrained_info
    from ar_course.continuous.train import encode_dataset
    from ar_course.data.mnist import load_mnist

    model, tok = load_pretrained()
    images, labels = load_mnist("test", size=32)
    with torch.no_grad():
        tokens = encode_dataset(tok, images[:200])  # (200, 64, 4)
        loss = float(model.loss(tokens, labels[:200], generator=torch.Generator().manual_seed(0)))
    assert loss < 1.3 * pretrained_info()["test_loss"], loss


def test_train_continuous_cli_errors(capsys):
    status, _, err = run(capsys, "train", "continuous", "--steps", "0")
    assert status == 2 and "--steps" in error_line(err)
    status, _, err = run(capsys, "train", "continuous", "--tokenizer", "mnist_vq", "--steps", "1")
    assert status == 2 and "a continuous ('kl') one is needed" in error_line(err)


def test_flow_matching_loss_draws_its_times_from_the_generator_given():
    """Seeded with a generator, the loss must not read the global random state (t was drawn from it)."""
    x1 = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    velocity = lambda x, t: x * t[:, None]  # noqa: E731  (depends on t)
    torch.manual_seed(0)
    first = flow_matching_loss(velocity, x1, torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    assert torch.equal(flow_matching_loss(velocity, x1, torch.Generator().manual_seed(3)), first)


def test_euler_evaluates_the_velocity_at_the_start_of_each_step():
    """x_{i+1} = x_i + v(x_i, i / steps) / steps: with v = t, four steps from 0 reach (0 + 1 + 2 + 3) / 16."""
    x = euler_sample(lambda x, t: t[:, None].expand_as(x), torch.zeros(2, 3), steps=4)
    torch.testing.assert_close(x, torch.full((2, 3), 6 / 16))


def test_conditions_with_a_cache_continue_a_prefill_of_several_tokens():
    """The built-in sampler feeds one token at a time; a cache fed chunks of 3 then 2 tokens must advance by each
    chunk and give the conditions of one full pass."""
    model, classes = tiny_model(), torch.tensor([0, 3])
    tokens = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    cache = model.make_cache(2)
    first = model.conditions(tokens[:, :3], classes, cache)  # the class token and 3 tokens
    assert cache.length == 4
    rest = model.conditions(tokens[:, 3:], None, cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), model.conditions(tokens, classes))
