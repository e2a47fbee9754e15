"""Integer ids in uint8/int8/int16 and log-probabilities or weights in half precision or float64 give what int64 and
float32 give, or a one-line error (audit 30: torch does arithmetic in the tensor's own dtype, so 256 compared with a
uint8 is 0, and a block number times the block size wraps)."""

from __future__ import annotations

import math

import pytest
import torch

from ar_course import sampling
from ar_course.align import functional as align_fn
from ar_course.diffusion_lm import denoise_step, mask_tokens
from ar_course.serving import paged_attention, slot_mapping
from ar_course.serving.compression import dequantize, quantize, sink_window_visible

NARROW = (torch.uint8, torch.int8, torch.int16, torch.int32)


def test_a_mask_id_the_ids_dtype_cannot_hold_is_refused():
    """uint8 byte ids with mask_id 256: torch would compare 256 as 0 and reveal every real 0 as if masked."""
    x = torch.tensor([[0, 65, 0, 66, 10]], dtype=torch.uint8)
    proposal = torch.full_like(x, 7)
    with pytest.raises(ValueError, match=r"^mask_id=256 does not fit the dtype of x, torch.uint8 \(0..255\): pass "
                                         r"x.long\(\)$"):
        denoise_step(x, proposal, 1.0, 0.0, mask_id=256)
    with pytest.raises(ValueError, match=r"^mask_id=300 does not fit the dtype of ids, torch.int8 \(-128..127\)"):
        mask_tokens(x.to(torch.int8), 0.5, mask_id=300)
    # ids as int64 (the advice) leave the row, which holds no mask, as it was
    assert denoise_step(x.long(), proposal.long(), 1.0, 0.0, mask_id=256).tolist() == [[0, 65, 0, 66, 10]]


@pytest.mark.parametrize("dtype", NARROW)
def test_narrow_ids_that_hold_the_mask_id_denoise_and_mask_like_int64(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 100, (3, 12), generator=g)
    x[:, ::3] = 120  # the mask id, which every dtype here holds
    proposal, u = torch.randint(0, 100, (3, 12), generator=g), torch.rand(3, 12, generator=g)
    want = denoise_step(x, proposal, 0.8, 0.3, mask_id=120, u=u)
    assert torch.equal(denoise_step(x.to(dtype), proposal.to(dtype), 0.8, 0.3, mask_id=120, u=u).long(), want)
    noise = torch.rand(3, 12, generator=g)
    got, masked = mask_tokens(x.to(dtype), 0.5, mask_id=120, noise=noise)
    want_ids, want_masked = mask_tokens(x, 0.5, mask_id=120, noise=noise)
    assert torch.equal(got.long(), want_ids) and torch.equal(masked, want_masked)


@pytest.mark.parametrize("dtype", NARROW)
def test_slot_mapping_and_sink_window_in_any_integer_dtype_match_int64(dtype):
    table, positions = torch.tensor([20, 3, 40, 100]), torch.tensor([0, 5, 17, 40, 63])
    want = slot_mapping(table, positions, 16)  # block 100 * 16 = 1600: past uint8 and int8
    assert want.tolist() == [320, 325, 49, 648, 1615]
    got = slot_mapping(table.to(dtype), positions.to(dtype), 16)
    assert got.dtype == torch.long and torch.equal(got, want)
    q, k = torch.tensor([[3]]), torch.arange(4)[None, :]
    assert torch.equal(sink_window_visible(q.to(dtype), k.to(dtype), 1, 8), sink_window_visible(q, k, 1, 8))
    assert bool(sink_window_visible(q.to(dtype), k.to(dtype), 1, 8).all())  # 3 - 7 < 0 wraps in uint8


def test_slot_mapping_of_an_int16_table_past_its_range():
    assert slot_mapping(torch.tensor([3000, 7], dtype=torch.int16), torch.tensor([1, 20]), 16).tolist() == [48001, 116]


def test_paged_attention_takes_uint8_lengths_up_to_the_tables_size():
    g = torch.Generator().manual_seed(0)
    q, kp, vp = torch.randn(2, 2, 8, generator=g), torch.randn(40, 16, 2, 8, generator=g), torch.randn(40, 16, 2, 8,
                                                                                                        generator=g)
    tables = torch.stack([torch.arange(0, 16), torch.arange(16, 32)])  # 16 blocks of 16: 256 positions each
    lengths = torch.tensor([200, 30])
    want = paged_attention(q, kp, vp, tables, lengths)
    for dtype in (torch.uint8, torch.int16):
        assert torch.equal(paged_attention(q, kp, vp, tables.to(dtype), lengths.to(dtype)), want)


@pytest.mark.parametrize("dtype", (torch.int8, torch.int16, torch.uint8))
def test_quantize_integer_rows_round_trips_like_floats(dtype):
    x = torch.tensor([[0, 60, 127], [10, 50, 100]]).to(dtype)
    codes, scale, lo = quantize(x, 8, dim=-1)
    assert torch.equal(codes, quantize(x.float(), 8, dim=-1)[0])
    assert torch.allclose(dequantize(codes, scale, lo), x.float(), atol=0.5)
    if dtype == torch.int8:  # hi - lo = 255 wraps to -1 in int8
        codes, scale, lo = quantize(torch.tensor([[-128, 0, 127]], dtype=torch.int8), 8, dim=-1)
        assert dequantize(codes, scale, lo).tolist() == [[-128.0, 0.0, 127.0]]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_k3_and_the_clipped_ratio_of_half_precision_log_probs_are_taken_in_float32(dtype):
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(4, 64, generator=g) - 3).to(dtype)
    logp_ref = (logp.double() + 0.05 * torch.randn(4, 64, generator=g, dtype=torch.float64)).to(dtype)
    exact_d = logp_ref.double() - logp.double()
    exact = torch.exp(exact_d) - exact_d - 1  # (4, 64) from the same rounded inputs
    got = align_fn.k3_kl(logp, logp_ref)
    assert got.dtype == torch.float32
    assert float((got.double() - exact).abs().max()) < 1e-6 < float(exact.mean()) * 1e-3
    adv = torch.randn(4, generator=g)
    ratio = torch.exp(logp.double() - logp_ref.double())  # logp_ref stands in for the old policy
    want = torch.minimum(ratio * adv[:, None].double(), ratio.clamp(0.8, 1.2) * adv[:, None].double())
    got = align_fn.clipped_surrogate(logp, logp_ref, adv)
    assert float((got.double() - want).abs().max()) < 1e-5


def test_k3_of_float32_and_float64_log_probs_is_unchanged():
    logp, logp_ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    d = logp_ref - logp
    assert torch.equal(align_fn.k3_kl(logp, logp_ref), torch.exp(d) - d - 1)
    assert align_fn.k3_kl(logp.double(), logp_ref.double()).dtype == torch.float64


@pytest.mark.parametrize("scale", (1e-50, 1e300))
def test_sample_from_probs_takes_float64_weights_of_any_scale(scale):
    """The docs take unnormalised rows: 1e-50 or 1e300 leave float32's range unless scaled first."""
    p = torch.tensor([[1.0, 3.0]], dtype=torch.float64).expand(4000, 2) * scale
    draws = sampling.sample_from_probs(p, torch.Generator().manual_seed(0))
    assert abs(float(draws.double().mean()) - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 4000)
    with pytest.raises(ValueError, match="is not a distribution"):  # a zero row is still refused
        sampling.sample_from_probs(torch.zeros(1, 2, dtype=torch.float64))



def test_float64_inputs_keep_their_precision_through_norms_losses_and_log_probs():
    """rms_norm, var_loss and token_log_probs computed float64 inputs in float32 (audit 29): errors of 1e-7
    where float64 gives 1e-16. Half precision still goes up to float32, and float32 is unchanged."""
    from ar_course import raster
    from ar_course.align.model import token_log_probs
    from ar_course.transformer.functional import rms_norm
    from ar_course.var.functional import var_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, dtype=torch.float64, generator=g) * 3
    exact = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert rms_norm(x).dtype == torch.float64 and float((rms_norm(x) - exact).abs().max()) < 1e-14
    assert torch.equal(rms_norm(x.float()), (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True)
                                                                        + 1e-6)))
    assert rms_norm(x.bfloat16()).dtype == torch.bfloat16
    logits = torch.randn(2, 5, 7, dtype=torch.float64, generator=g)  # scales (1, 2): 5 tokens
    targets = torch.randint(0, 7, (2, 5), generator=g)
    want = -logits.log_softmax(-1).gather(-1, targets[..., None]).mean()
    loss, _ = var_loss(logits, targets, (1, 2))
    assert loss.dtype == torch.float64 and abs(float(loss - want)) < 1e-14
    assert var_loss(logits.bfloat16(), targets, (1, 2))[0].dtype == torch.float32
    model, _ = raster.load_pretrained()
    model = model.double()
    maps, classes = torch.randint(0, model.config.vocab_size, (2, 8, 8), generator=g), torch.tensor([1, 2])
    with torch.no_grad():
        logp = token_log_probs(model, maps, classes)
        logits = model(maps.flatten(1)[:, :-1], classes=classes)[0]  # (2, 64, V): the class token predicts the first
    full = logits.log_softmax(-1).gather(-1, maps.flatten(1)[..., None])[..., 0]
    assert logp.dtype == torch.float64 and float((logp - full).abs().max()) < 1e-12
