"""Tests of ar_course.var: sequence layout, block-causal mask, teacher forcing vs cached generation, guidance,
inpainting, reproducibility, checkpoints. All on tiny randomly initialised models, but for one check that the
shipped model keeps its recorded test loss."""

from __future__ import annotations

import math

import pytest
import torch

from ar_course.checkpoint import CheckpointError, load
from ar_course.sampling import GREEDY, SamplingConfig, cfg_mix
from ar_course.tokenizers import MultiScaleVQ
from ar_course.var import (
    VAR, VARConfig, block_causal_mask, embed_levels_positions, guidance_strength, level_ids,
    sample_pyramid, save_pretrained, scale_bounds, scale_masks, scale_step, teacher_forcing_sequence,
    var_loss,
)
from ar_course.var.functional import flatten_pyramids, unflatten_pyramids

SCALES = (1, 2, 3, 5)
VOCAB, DIM = 23, 6


def _vq(seed: int = 0) -> MultiScaleVQ:
    torch.manual_seed(seed)
    vq = MultiScaleVQ(VOCAB, DIM, scales=SCALES, num_phi=2).eval()
    with torch.no_grad():
        vq.quantizer.codebook.normal_()
    return vq


def _model(cond: str = "ada", attn: str = "sdpa", seed: int = 0) -> VAR:
    torch.manual_seed(seed)
    model = VAR(VARConfig(vocab_size=VOCAB, latent_dim=DIM, scales=SCALES, n_classes=4, n_layer=2, n_head=2,
                          n_embd=16, cond=cond, attn=attn))
    with torch.no_grad():  # the adaptive norms start at zero; randomise them so the condition matters
        for name, p in model.named_parameters():
            if "ada" in name:
                p.normal_(std=0.2)
    return model.eval()


def _pyramid(B: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (B, s, s), generator=g) for s in SCALES]


# -- layout -------------------------------------------------------------------------------------------------


def test_bounds_and_level_ids_follow_the_schedule():
    assert scale_bounds(SCALES) == [(0, 1), (1, 5), (5, 14), (14, 39)]
    lvl = level_ids(SCALES)
    assert lvl.dtype == torch.long and lvl.shape == (39,)
    assert lvl.tolist() == [0] + [1] * 4 + [2] * 9 + [3] * 25
    assert level_ids((1, 2, 3, 4, 6, 8)).numel() == 130  # the MNIST schedule: 130 tokens in 6 steps
    with pytest.raises(ValueError):
        level_ids(())


def test_block_causal_mask_exact():
    mask = block_causal_mask(SCALES)
    assert mask.dtype == torch.bool and mask.shape == (39, 39)
    bounds = scale_bounds(SCALES)
    for i, (bi, ei) in enumerate(bounds):
        for j, (bj, ej) in enumerate(bounds):
            block = mask[bi:ei, bj:ej]
            assert bool(block.all()) if j <= i else not bool(block.any()), (i, j)
    small = block_causal_mask((1, 2))
    expected = torch.tensor([[1, 0, 0, 0, 0]] + [[1, 1, 1, 1, 1]] * 4, dtype=torch.bool)
    assert torch.equal(small, expected)


def test_embed_levels_positions_with_offset():
    x = torch.randn(2, 39, 4)
    lvl, pos = torch.randn(4, 4), torch.randn(39, 4)
    full = embed_levels_positions(x, lvl, pos, SCALES)
    part = embed_levels_positions(x[:, 5:14], lvl, pos, SCALES, start=5)
    torch.testing.assert_close(part, full[:, 5:14])
    torch.testing.assert_close(full[:, 20] - x[:, 20], (lvl[3] + pos[20]).expand(2, 4))
    with pytest.raises(ValueError):
        embed_levels_positions(x, lvl, pos, SCALES, start=1)


# -- teacher forcing --------------------------------------------------------------------------------------


def test_teacher_forcing_sequence_matches_the_tokenizer():
    vq, pyr = _vq(), _pyramid(3)
    inputs, targets = teacher_forcing_sequence(vq, pyr)
    assert inputs.shape == (3, 38, DIM) and targets.shape == (3, 39) and targets.dtype == torch.long
    torch.testing.assert_close(inputs, vq.teacher_forcing_inputs(pyr, flatten=True))
    assert torch.equal(targets[:, 14:].view(3, 5, 5), pyr[3])


def test_scale_step_returns_the_canvas_and_next_input():
    vq, pyr = _vq(), _pyramid(2)
    f_hat, nxt = scale_step(vq, None, 0, pyr[0].flatten(1))
    assert nxt.shape == (2, 4, DIM)
    f_hat, nxt = scale_step(vq, f_hat, 1, pyr[1].flatten(1))
    f_hat, nxt = scale_step(vq, f_hat, 2, pyr[2].flatten(1))
    f_hat, nxt = scale_step(vq, f_hat, 3, pyr[3].flatten(1))
    assert nxt is None
    torch.testing.assert_close(f_hat, vq.decode(pyr))


def test_var_loss_weights_tokens_not_scales():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(2, 39, VOCAB, generator=g), torch.randint(0, VOCAB, (2, 39), generator=g)
    loss, per_scale = var_loss(logits, targets, SCALES)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, ce)
    sizes = torch.tensor([1.0, 4, 9, 25])
    torch.testing.assert_close((per_scale * sizes).sum() / sizes.sum(), loss)


# -- the model ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", ["ada", "token"])
def test_teacher_forced_logits_equal_cached_steps(cond):
    vq, pyr, model = _vq(), _pyramid(3), _model(cond)
    classes = torch.tensor([0, 3, 4])  # 4 = the null class
    inputs, _ = teacher_forcing_sequence(vq, pyr)
    full = model(inputs, classes)  # (B, L, V)
    assert full.shape == (3, 39, VOCAB)
    cache, f_hat, x, steps = model.make_cache(3), None, None, []
    for k in range(len(SCALES)):
        steps.append(model.step(k, x, classes, cache))
        f_hat, x = scale_step(vq, f_hat, k, pyr[k].flatten(1))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_plain_and_fused_attention_agree():
    vq, pyr = _vq(), _pyramid(2)
    inputs, _ = teacher_forcing_sequence(vq, pyr)
    classes = torch.tensor([1, 2])
    fused, plain = _model(attn="sdpa"), _model(attn="plain")
    torch.testing.assert_close(fused(inputs, classes), plain(inputs, classes), atol=1e-5, rtol=1e-4)


def test_a_scale_does_not_see_later_scales():
    vq, model = _vq(), _model()
    pyr = _pyramid(1)
    other = [p.clone() for p in pyr]
    other[3] = (other[3] + 1) % VOCAB  # change only the last scale: inputs of scales <= 3 are unchanged
    other[2] = (other[2] + 1) % VOCAB  # ... and the second-to-last: the input of scale 3 changes
    a, _ = teacher_forcing_sequence(vq, pyr)
    b, _ = teacher_forcing_sequence(vq, other)
    classes = torch.tensor([1])
    la, lb = model(a, classes), model(b, classes)
    torch.testing.assert_close(la[:, :14], lb[:, :14])  # scales 0..2 read identical inputs
    assert not torch.allclose(la[:, 14:], lb[:, 14:])


def test_class_conditioning_matters_in_both_modes():
    vq, pyr = _vq(), _pyramid(2)
    inputs, _ = teacher_forcing_sequence(vq, pyr)
    for cond in ("ada", "token"):
        model = _model(cond)
        a = model(inputs, torch.tensor([0, 0]))
        b = model(inputs, torch.tensor([1, 1]))
        assert not torch.allclose(a, b)


def test_loss_and_backward():
    vq, pyr, model = _vq(), _pyramid(4), _model()
    model.train()
    loss, per_scale = model.loss(vq, pyr, torch.tensor([0, 1, 2, 3]), p_uncond=0.5,
                                 generator=torch.Generator().manual_seed(0))
    assert per_scale.shape == (4,) and loss.ndim == 0
    loss.backward()
    assert model.pos_emb.grad is not None and model.word_embed.weight.grad.abs().sum() > 0


def test_a_fresh_adaptive_head_norm_is_the_plain_rms_norm():
    """adaLN-zero: the head's modulation starts as the identity, ``x * (1 + 0) + 0``, not as ``x * 0``."""
    torch.manual_seed(0)
    model = VAR(VARConfig(vocab_size=VOCAB, latent_dim=DIM, scales=SCALES, n_classes=4, n_layer=1, n_head=2,
                          n_embd=16)).eval()
    x, cond = torch.randn(2, 5, 16), torch.randn(2, 16)
    torch.testing.assert_close(model.head_norm(x, cond), model.head_norm.norm(x))


def test_bad_inputs_raise():
    model = _model()
    with pytest.raises(ValueError, match="inputs"):
        model(torch.randn(2, 10, DIM), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="classes"):
        model(torch.randn(2, 38, DIM), torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="cache"):
        model.step(1, torch.randn(1, 4, DIM), torch.tensor([0]), model.make_cache(1))
    with pytest.raises(ValueError):
        VARConfig(scales=(2, 1))
    # one start token predicts the first map: (2, 3, 4) built, then its loss blamed the input's shape and its
    # sampling failed inside a reshape
    with pytest.raises(ValueError, match=r"^scales must start at 1 \(the start token predicts the 1x1 first map\), "
                                         r"got \(2, 3, 4\)$"):
        VARConfig(scales=(2, 3, 4))
    with pytest.raises(ValueError):
        VARConfig(cond="cross")


def test_a_tokenizer_of_another_latent_size_is_refused_with_a_value_error():
    """A tokenizer whose codes are not the model's latent size would otherwise fail deep inside the pass."""
    torch.manual_seed(0)
    vq = MultiScaleVQ(VOCAB, DIM + 1, scales=SCALES, num_phi=2).eval()
    with pytest.raises(ValueError, match="does not match the model"):
        _model().generate(vq, torch.tensor([0, 1]))


# -- generation --------------------------------------------------------------------------------------------


def _count_steps(model: VAR) -> list[int]:
    calls: list[int] = []
    original = model.step

    def counted(k, *args, **kwargs):
        calls.append(k)
        return original(k, *args, **kwargs)

    model.step = counted  # type: ignore[method-assign]
    return calls


def test_generation_takes_one_pass_per_scale_and_is_reproducible():
    vq, model = _vq(), _model()
    calls = _count_steps(model)
    classes = torch.tensor([0, 1, 2])
    kw = dict(cfg=1.5, sampling=SamplingConfig(top_k=10))
    a = model.generate(vq, classes, generator=torch.Generator().manual_seed(7), **kw)
    assert calls == [0, 1, 2, 3]
    b = model.generate(vq, classes, generator=torch.Generator().manual_seed(7), **kw)
    assert [p.shape for p in a] == [(3, s, s) for s in SCALES]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = model.generate(vq, classes, generator=torch.Generator().manual_seed(8), **kw)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_greedy_generation_follows_teacher_forced_argmax():
    vq, model = _vq(), _model()
    classes = torch.tensor([1, 2])
    pyr = model.generate(vq, classes, sampling=GREEDY)
    inputs, targets = teacher_forcing_sequence(vq, pyr)
    assert torch.equal(model(inputs, classes).argmax(-1), targets)


def test_guidance_zero_is_conditional_sampling():
    vq, model = _vq(), _model()
    classes = torch.tensor([0, 3])
    guided = model.generate(vq, classes, cfg=0.0, generator=torch.Generator().manual_seed(3))
    calls = _count_steps(model)
    cond = sample_pyramid(model, vq, classes, cfg=0.0, generator=torch.Generator().manual_seed(3))
    assert len(calls) == 4 and all(torch.equal(x, y) for x, y in zip(guided, cond))
    # with the ramp, the first scale is unguided whatever cfg is
    ramped = model.generate(vq, classes, cfg=5.0, sampling=GREEDY, ramp=True)
    plain = model.generate(vq, classes, cfg=0.0, sampling=GREEDY)
    assert torch.equal(ramped[0], plain[0])


def test_a_reused_static_cache_is_reset_between_calls():
    """A static cache handed in again must start empty, or the second call writes past its end."""
    vq, model, classes = _vq(), _model(), torch.tensor([0, 2])
    kv = model.make_cache(2, static=True)
    first = sample_pyramid(model, vq, classes, sampling=GREEDY, cache=kv)
    again = sample_pyramid(model, vq, classes, sampling=GREEDY, cache=kv)
    fresh = sample_pyramid(model, vq, classes, sampling=GREEDY)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, again, fresh))


def test_guidance_formula_and_ramp():
    cond, uncond = torch.randn(3, 7), torch.randn(3, 7)
    torch.testing.assert_close(cfg_mix(cond, uncond, 0.0), cond)
    torch.testing.assert_close(cfg_mix(cond, uncond, 2.0), 3 * cond - 2 * uncond)
    assert [guidance_strength(3.0, k, 4) for k in range(4)] == [0.0, 1.0, 2.0, 3.0]
    assert [guidance_strength(3.0, k, 4, ramp=False) for k in range(4)] == [3.0] * 4
    with pytest.raises(ValueError):
        guidance_strength(1.0, 4, 4)


def test_guided_sampling_pushes_towards_the_conditional_logits():
    """Guidance samples from ``(1 + w) cond - w uncond``: with the two halves swapped it would push away from
    the class."""
    vq, model = _vq(), _model()

    def run(h, cond, start, mask, cache):  # conditional rows favour code 0, null-class rows code 1
        logits = torch.zeros(h.shape[0], h.shape[1], VOCAB)
        logits[: h.shape[0] // 2, :, 0] = 1.0
        logits[h.shape[0] // 2:, :, 1] = 1.0
        return logits

    pyr = sample_pyramid(model, vq, torch.tensor([0, 2]), cfg=2.0, ramp=False, sampling=GREEDY, run=run)
    assert all(bool((p == 0).all()) for p in pyr)  # code 0 wins at every scale


def test_inpainting_keeps_known_tokens_at_every_scale():
    vq, model = _vq(), _model()
    known = _pyramid(2, seed=5)
    mask = torch.zeros(2, 5, 5, dtype=torch.bool)
    mask[:, :, :2] = True  # the left two columns are known
    mask[1] = ~mask[1]  # the second image keeps the right part instead (outpainting to the left)
    out = model.generate(vq, torch.tensor([1, 2]), cfg=1.0, known=known, known_mask=mask,
                         generator=torch.Generator().manual_seed(0))
    masks = scale_masks(mask, SCALES)
    assert torch.equal(masks[-1], mask)
    for k in range(len(SCALES)):
        assert torch.equal(out[k][masks[k]], known[k][masks[k]]), k
    assert not torch.equal(out[-1], known[-1])  # the unknown part was generated
    with pytest.raises(ValueError):
        model.generate(vq, torch.tensor([1, 2]), known=known)


def test_scale_masks_threshold():
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, :, :3] = True
    m = scale_masks(mask, (1, 2, 5))
    assert m[0].tolist() == [[[True]]]  # 60% of the area is known
    with pytest.raises(ValueError):
        scale_masks(mask.long(), (1, 2, 5))


def test_scale_masks_count_a_token_known_when_exactly_half_its_area_is():
    """The documented threshold is "at least half" of a coarse token's area known, not more than half."""
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    mask[0, 0] = True  # 2 of the 4 finest tokens known
    assert scale_masks(mask, (1, 2))[0].tolist() == [[[True]]]


# -- checkpoints -------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    vq, model = _vq(), _model("token")
    path = save_pretrained(model, tmp_path / "var.safetensors", tokenizer="test", steps=0)
    loaded = load(path, kind="var")
    assert loaded.config == model.config
    inputs, _ = teacher_forcing_sequence(vq, _pyramid(2))
    classes = torch.tensor([0, 1])
    # float16 storage: logits agree to half precision
    torch.testing.assert_close(loaded(inputs, classes), model.half().float()(inputs, classes), atol=1e-5, rtol=1e-4)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        load(bad)


# -- trainer and comparison --------------------------------------------------------------------------------


def _tiny_tokenizer():
    from ar_course.tokenizers import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(quantizer="msvq", num_codes=VOCAB, latent_dim=DIM, width=4,
                             scales=(1, 2, 4, 8))).eval()


def test_trainer_help_and_a_few_steps():
    from ar_course.var import train

    with pytest.raises(SystemExit) as info:
        train.main(["--help"])
    assert info.value.code == 0
    tok = _tiny_tokenizer()
    images = torch.rand(40, 1, 32, 32)
    pyr = train.encode_pyramids(tok, images, batch_size=16)
    assert [p.shape for p in pyr] == [(40, s, s) for s in (1, 2, 4, 8)]
    flat = flatten_pyramids(pyr)
    assert all(torch.equal(a, b) for a, b in zip(unflatten_pyramids(flat, (1, 2, 4, 8)), pyr))
    config = VARConfig(vocab_size=VOCAB, latent_dim=DIM, scales=(1, 2, 4, 8), n_classes=10, n_layer=1, n_head=2,
                       n_embd=16)
    model, history = train.train_var(tok, flat, torch.arange(40) % 10, config, steps=3, batch_size=8,
                                     progress=False)
    assert len(history.loss) == 3 and not model.training


def test_compare_generators_counts_passes():
    from ar_course.var.compare import compare_generators, var_sampler

    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    model = VAR(VARConfig(vocab_size=VOCAB, latent_dim=DIM, scales=(1, 2, 4, 8), n_classes=10, n_layer=1,
                          n_head=2, n_embd=16)).eval()
    rows = compare_generators({"VAR": var_sampler(model, tok, cfg=1.0)}, per_class=2, batch_size=10, repeats=1,
                              reference=torch.rand(20, 1, 32, 32))
    (row,) = rows
    assert row["forward_passes"] == 4 and row["batch_size"] == 10 and 0 <= row["class_accuracy"] <= 1
    assert row["seconds_per_batch"] > 0 and math.isfinite(row["frechet_distance"])
    assert row["device"] == "cpu"  # where the seconds were measured: the comparison's plot names it


@pytest.mark.parametrize("devices, device, title", [
    (["cpu", "cpu"], None, "seconds per batch (cpu)"), (["cuda", "cuda"], None, "seconds per batch (cuda)"),
    ([None, None], None, "seconds per batch"), (["cpu", "cuda"], None, "seconds per batch"),
    ([None, None], "mps", "seconds per batch (mps)")])
def test_plot_comparison_names_the_device_of_its_timings_not_always_the_cpu(devices, device, title):
    from ar_course.var.compare import plot_comparison

    rows = [{"name": f"m{i}", "forward_passes": 6, "seconds_per_batch": 0.01, "class_accuracy": 0.9,
             "frechet_distance": 3.0, **({"device": d} if d else {})} for i, d in enumerate(devices)]  # made up
    fig = plot_comparison(rows, device=device)
    assert fig.axes[1].get_title() == title


def test_interleaved_timing_calls_each_function_in_turn_and_keeps_the_best():
    from ar_course.var.compare import best_seconds_interleaved

    calls: list[str] = []
    best = best_seconds_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] * 4  # a warm-up call of each, then one of each per repeat
    assert set(best) == {"a", "b"} and all(0 <= t < 1 for t in best.values())


# -- the shipped model -------------------------------------------------------------------------------------


def test_the_shipped_var_keeps_its_recorded_test_loss():
    """The adaptive norms' ``1 + scale`` (head and blocks) cannot be told from ``scale`` on tiny random models;
    the shipped weights can: their test loss would jump."""
    from ar_course.data import load_mnist
    from ar_course.var.model import load_pretrained, pretrained_info
    from ar_course.var.train import encode_pyramids

    model, tok = load_pretrained()
    images, labels = load_mnist("test", size=32)
    with torch.no_grad():
        loss, _ = model.loss(tok.quantizer, encode_pyramids(tok, images[:100]), labels[:100])
    assert float(loss) < 1.1 * pretrained_info()["test_loss"], float(loss)
