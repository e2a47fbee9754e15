"""Unit tests of ar_course.tokenizers: the pure functions, the three quantizers and the VQ-VAE."""

import math

import pytest
import torch
import torch.nn.functional as F

from ar_course.checkpoint import load, save_checkpoint
from ar_course.checks.reference.ch01 import multiscale_decode
from ar_course.tokenizers import (
    VQVAE, MultiScaleVQ, Phi, ResidualVQ, VectorQuantizer, VQVAEConfig, functional as Fq, token_count,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# functional


def test_vq_lookup_matches_brute_force_and_chunks():
    g = gen()
    z, cb = torch.randn(101, 7, generator=g), torch.randn(13, 7, generator=g)
    brute = torch.cdist(z.double(), cb.double()).argmin(1)
    idx = Fq.vq_lookup(z, cb)
    assert idx.dtype == torch.int64 and idx.shape == (101,)
    assert torch.equal(idx, brute)
    assert torch.equal(Fq.vq_lookup(z, cb, chunk_size=3), idx)
    assert Fq.vq_lookup(z[:0], cb).shape == (0,)


def test_vq_lookup_ties_go_to_lowest_index():
    cb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    z = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, -2.0], [-3.0, 0.0]])
    # [0,0] is equally far from all four codes; [0,-2] from codes 0, 2 and 3
    assert Fq.vq_lookup(z, cb).tolist() == [0, 0, 0, 3]


def test_vq_lookup_bad_input():
    with pytest.raises(ValueError, match="dimension"):
        Fq.vq_lookup(torch.zeros(3, 4), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        Fq.vq_lookup(torch.zeros(3), torch.zeros(5, 3))


def test_straight_through_value_and_gradient():
    z = torch.randn(5, 3, generator=gen(), requires_grad=True)
    z_q = torch.randn(5, 3, generator=gen(1), requires_grad=True)
    out = Fq.straight_through(z, z_q)
    assert torch.allclose(out, z_q)
    w = torch.randn(5, 3, generator=gen(2))
    (out * w).sum().backward()
    assert torch.allclose(z.grad, w)
    assert z_q.grad is None


def test_vq_loss_value_and_gradients():
    z = torch.tensor([[1.0, 2.0]], requires_grad=True)
    z_q = torch.tensor([[0.0, 4.0]], requires_grad=True)
    loss = Fq.vq_loss(z, z_q, beta=0.25)
    assert math.isclose(loss.item(), 1.25 * (1 + 4) / 2)
    loss.backward()
    assert torch.allclose(z.grad, 0.25 * (z - z_q).detach())  # d/dz of beta * mean((z - sg z_q)^2), n = 2
    assert torch.allclose(z_q.grad, (z_q - z).detach())


def test_ema_update_hand_computed():
    size, total = torch.tensor([1.0, 1.0]), torch.tensor([[0.0], [2.0]])
    z, idx = torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 1, 1])
    new_size, new_sum, cb = Fq.ema_update(size, total, z, idx, decay=0.5, eps=0.0)
    assert torch.allclose(new_size, torch.tensor([1.0, 1.5]))
    assert torch.allclose(new_sum, torch.tensor([[0.5], [5.0]]))
    assert torch.allclose(cb, torch.tensor([[0.5], [5.0 / 1.5]]))
    _, _, cb = Fq.ema_update(size, total, z, idx, decay=0.5, eps=0.1)  # Laplace: (N + eps) / (n + K eps) * n
    assert torch.allclose(cb, torch.tensor([[0.5 / (1.1 / 2.7 * 2.5)], [5.0 / (1.6 / 2.7 * 2.5)]]))
    assert torch.equal(size, torch.tensor([1.0, 1.0]))  # inputs untouched


def test_ema_update_decay_zero_is_kmeans_step_and_unused_codes_stay_finite():
    g = gen()
    z = torch.randn(50, 4, generator=g)
    idx = torch.randint(0, 3, (50,), generator=g)  # codes 3 and 4 unused
    _, _, cb = Fq.ema_update(torch.zeros(5), torch.zeros(5, 4), z, idx, decay=0.0, eps=1e-8)
    for k in range(3):
        assert torch.allclose(cb[k], z[idx == k].mean(0), atol=1e-5)
    assert torch.isfinite(cb).all() and torch.equal(cb[3:], torch.zeros(2, 4))


def test_dead_code_restart_replaces_exactly_the_dead_codes():
    cb = torch.arange(12.0).view(6, 2)
    counts = torch.tensor([5.0, 0.0, 1.0, 0.0, 0.5, 3.0])
    cands = -torch.arange(1.0, 5.0).view(2, 2)
    new, dead = Fq.dead_code_restart(cb, counts, cands, threshold=1.0)
    assert dead.tolist() == [False, True, False, True, True, False]
    assert torch.equal(new[~dead], cb[~dead])
    assert torch.equal(new[[1, 3, 4]], cands[[0, 1, 0]])  # j-th dead code gets candidates[j % M]
    assert torch.equal(cb, torch.arange(12.0).view(6, 2))


def test_usage_from_counts():
    assert Fq.usage_from_counts(torch.full((8,), 3)) == pytest.approx((1.0, 8.0))
    assert Fq.usage_from_counts(torch.eye(16)[5] * 6) == pytest.approx((1 / 16, 1.0))
    frac, ppl = Fq.usage_from_counts(torch.tensor([3, 1, 0, 0]))
    assert frac == 0.5 and ppl == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert Fq.usage_from_counts(torch.zeros(4)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        Fq.usage_from_counts(torch.zeros(2, 3))


def test_residual_quantize_round_trip_and_error_falls_with_depth():
    g = gen()
    z = torch.randn(64, 4, generator=g)
    cbs = torch.randn(5, 32, 4, generator=g)
    cbs[:, 0] = 0  # a zero code: a level can always keep the error as it is
    idx, z_hat = Fq.residual_quantize(z, cbs)
    assert idx.shape == (64, 5) and idx.dtype == torch.int64
    decode = lambda d: sum(cbs[level][idx[:, level]] for level in range(d))  # noqa: E731  (first d levels)
    assert torch.allclose(decode(5), z_hat)
    assert torch.equal(idx[:, 0], Fq.vq_lookup(z, cbs[0]))
    errors = [(z - decode(d)).pow(2).sum().item() for d in range(1, 6)]
    assert all(a >= b for a, b in zip(errors, errors[1:])) and errors[-1] < errors[0]


def test_token_counts():
    assert token_count((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) == 680
    assert token_count((1, 2, 3, 4, 6, 8)) == 130


def test_phi_index_follows_var():
    assert [Fq.phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [Fq.phi_index(k, 6, 4) for k in range(6)] == [0, 0, 1, 2, 3, 3]
    assert [Fq.phi_index(k, 6, 6) for k in range(6)] == list(range(6))
    assert Fq.phi_index(0, 1, 4) == 0 and Fq.phi_index(3, 6, 1) == 0
    with pytest.raises(ValueError):
        Fq.phi_index(6, 6, 4)


# ---------------------------------------------------------------------------------------------------------
# VectorQuantizer


def test_vector_quantizer_forward_shapes_values_gradients():
    torch.manual_seed(0)
    vq = VectorQuantizer(11, 5)
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(3, 5, 4, 6, requires_grad=True)
    out = vq(z)
    assert out.z_q.shape == z.shape and out.z_q.dtype == torch.float32
    assert out.indices.shape == (3, 4, 6) and out.indices.dtype == torch.int64
    assert torch.equal(out.indices, vq.encode(z))
    assert torch.allclose(out.z_q, vq.decode(out.indices), atol=1e-6)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 5)
    assert torch.allclose(out.loss, Fq.vq_loss(flat, vq.codebook[out.indices.flatten()].detach(), 0.25))
    w = torch.randn_like(z)
    ((out.z_q * w).sum() + out.loss).backward()
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0
    expected = w + torch.autograd.grad(Fq.vq_loss(z, vq.decode(out.indices).detach(), 0.25), z)[0]
    assert torch.allclose(z.grad, expected, atol=1e-6)  # straight-through + commitment


def test_vector_quantizer_rejects_wrong_channels():
    vq = VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match="4 channels"):
        vq(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="feature map"):
        vq(torch.zeros(2, 4))


def test_vector_quantizer_ema_updates_match_reference():
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 3, ema=True, decay=0.9)
    assert "codebook" not in dict(vq.named_parameters())
    size0, sum0, cb0 = vq.ema_cluster_size.clone(), vq.ema_embed_sum.clone(), vq.codebook.clone()
    z = torch.randn(2, 3, 4, 4)
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    size, total, cb = Fq.ema_update(size0, sum0, flat, out.indices.flatten(), 0.9, 1e-5)
    assert torch.allclose(vq.ema_cluster_size, size) and torch.allclose(vq.codebook, cb)
    assert torch.allclose(out.loss, 0.25 * (flat - cb0[out.indices.flatten()]).pow(2).mean())  # commitment only
    vq.eval()
    before = vq.codebook.clone()
    vq(z)
    assert torch.equal(before, vq.codebook)  # eval mode never updates


def test_dead_code_restart_in_module_and_usage_window():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, dead_code_threshold=1.0, usage_window=2)
    with torch.no_grad():
        vq.codebook.copy_(torch.stack([torch.zeros(2)] + [torch.full((2,), 100.0 + i) for i in range(7)]))
    before = vq.codebook.detach().clone()
    z = torch.randn(1, 2, 3, 3) * 0.1  # every vector picks code 0
    vq(z)
    assert torch.equal(vq.codebook.detach(), before)  # window not complete yet
    assert vq.usage()["fraction_used"] == pytest.approx(1 / 8)
    vq(z)
    after = vq.codebook.detach()
    assert torch.equal(after[0], before[0])
    data = set(map(tuple, z.permute(0, 2, 3, 1).reshape(-1, 2).tolist()))
    assert all(tuple(v) in data for v in after[1:].tolist())  # the 7 dead codes now hold batch vectors
    assert int(vq.num_restarted) == 7 and int(vq.window_steps) == 0
    assert vq.usage() == pytest.approx({"fraction_used": 1 / 8, "perplexity": 1.0})


def test_a_restart_in_forward_leaves_the_l2_codebook_gradient_of_that_forward():
    """With l2_norm, a restart at a window's end rewrote the codebook after normalize had kept it for backward:
    the gradient of codes hit in that batch and restarted was taken at their new vectors (off by 1.6e-2 with
    threshold 3; audit 29). The gradient is now the one of the loss the forward computed."""
    def step(threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        vq = VectorQuantizer(6, 3, l2_norm=True, dead_code_threshold=threshold, usage_window=1).double()
        with torch.no_grad():
            vq.codebook.normal_()
        before = vq.codebook.detach().clone()
        torch.manual_seed(1)
        vq(torch.randn(1, 3, 3, 3, dtype=torch.float64)).loss.backward()
        return vq.codebook.grad, (vq.codebook.detach() != before).any(1)

    grad, restarted = step(3.0)
    reference, none = step(0.0)  # the same forward without restarts
    assert restarted.sum() >= 2 and not none.any()
    assert torch.allclose(grad, reference, rtol=0, atol=1e-12)


def test_l2_normalised_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, l2_norm=True)
    out = vq(torch.randn(2, 4, 3, 3) * 7)
    assert torch.allclose(out.z_q.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# ResidualVQ and MultiScaleVQ


def test_residual_vq_shapes_and_round_trip():
    torch.manual_seed(0)
    rvq = ResidualVQ(16, 4, depth=3)
    for layer in rvq.layers:
        with torch.no_grad():
            layer.codebook.normal_()
    z = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = rvq(z)
    assert out.indices.shape == (2, 3, 5, 5) and len(rvq.layers) == 3
    assert torch.equal(rvq.encode(z), out.indices)
    assert torch.allclose(rvq.decode(out.indices), out.z_q, atol=1e-6)
    out.z_q.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))
    assert len(ResidualVQ(16, 4, depth=3, shared_codebook=True).layers) == 1


def _equalise(rvq: ResidualVQ, msvq: MultiScaleVQ) -> None:
    with torch.no_grad():
        msvq.quantizer.codebook.normal_()
        rvq.layers[0].codebook.copy_(msvq.quantizer.codebook)


def test_residual_vq_equals_multiscale_at_full_size_without_phi():
    torch.manual_seed(0)
    rvq = ResidualVQ(32, 6, depth=4, shared_codebook=True)
    msvq = MultiScaleVQ(32, 6, scales=(5, 5, 5, 5), phi_ratio=0.0)
    _equalise(rvq, msvq)
    f = torch.randn(3, 6, 5, 5)
    a, b = rvq(f), msvq(f)
    assert torch.equal(a.indices, torch.stack(b.indices, dim=1))
    assert torch.allclose(a.z_q, b.z_q, atol=1e-6) and torch.allclose(a.loss, b.loss)
    assert torch.allclose(rvq.decode(a.indices), msvq.decode(b.indices), atol=1e-6)


def test_multiscale_losses_final_and_every_scale():
    """"final": beta*|sg[f_hat] - f|^2 + |f_hat - sg[f]|^2 of the complete sum; "every_scale": VAR's mean of that
    term over the partial sums after each scale, plus final_weight times the complete sum's term."""
    torch.manual_seed(1)
    f = torch.randn(2, 6, 8, 8)
    final = MultiScaleVQ(32, 6, scales=(1, 2, 4, 8), beta=0.3, loss="final")
    every = MultiScaleVQ(32, 6, scales=(1, 2, 4, 8), beta=0.3)
    every.load_state_dict(final.state_dict())
    a, b = final(f), every(f)
    assert torch.allclose(a.z_q, b.z_q) and all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    with torch.no_grad():
        partial = [final.decode(a.indices[:k]) for k in range(1, 5)]  # f_hat after each scale
    term = [1.3 * F.mse_loss(p, f) for p in partial]  # beta * commitment + codebook term, same value
    assert torch.allclose(a.loss, term[-1], atol=1e-6)
    assert torch.allclose(b.loss, torch.stack(term).mean(), atol=1e-6)
    weighted = MultiScaleVQ(32, 6, scales=(1, 2, 4, 8), beta=0.3, final_weight=5.0)
    weighted.load_state_dict(final.state_dict())
    assert torch.allclose(weighted(f).loss, torch.stack(term).mean() + 5.0 * term[-1], atol=1e-6)
    with pytest.raises(ValueError, match="loss must be one of"):
        MultiScaleVQ(32, 6, loss="sum")
    with pytest.raises(ValueError, match="final_weight must be >= 0"):
        MultiScaleVQ(32, 6, final_weight=-1.0)
    with pytest.raises(ValueError, match="only adds to loss='every_scale'"):
        MultiScaleVQ(32, 6, loss="final", final_weight=2.0)


def _final_loss_grads(beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, f_hat, grad of f, grads of the codebook and refinements)`` of a loss="final" MultiScaleVQ's loss
    alone."""
    torch.manual_seed(2)
    m = MultiScaleVQ(16, 4, scales=(1, 2, 4), beta=beta, loss="final")
    with torch.no_grad():
        m.quantizer.codebook.normal_()
    f = torch.randn(2, 4, 4, 4, generator=gen(3), requires_grad=True)
    out = m(f)
    out.loss.backward()
    params = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])  # codebook, refinements
    return out.loss.detach(), out.z_q.detach(), f.grad, params


def test_multiscale_final_loss_puts_beta_on_the_commitment_and_not_on_the_codebook_term():
    """beta * |sg[f_hat] - f|^2 + |f_hat - sg[f]|^2: the input's gradient is beta * 2 (f - f_hat) / numel, the
    codebook's (and the refinements') does not depend on beta; the value is (1 + beta) * mse."""
    loss, f_hat, f_grad, cb_grad = _final_loss_grads(0.25)
    f = torch.randn(2, 4, 4, 4, generator=gen(3))
    torch.testing.assert_close(loss, 1.25 * F.mse_loss(f_hat, f))
    torch.testing.assert_close(f_grad, 0.25 * 2 * (f - f_hat) / f.numel())
    loss1, f_hat1, f_grad1, cb_grad1 = _final_loss_grads(1.0)
    assert torch.equal(f_hat1, f_hat) and cb_grad.abs().sum() > 0
    torch.testing.assert_close(cb_grad, cb_grad1)  # the codebook/refinement term has weight 1 whatever beta is
    torch.testing.assert_close(f_grad1, 4 * f_grad)


def test_phi_refine_mixes_with_any_ratio():
    """phi(h) = h * (1 - r) + conv(h) * r for a ratio other than 0.5 (where the two weights are equal) and 0."""
    torch.manual_seed(0)
    h = torch.randn(2, 3, 4, 4)
    for ratio in (0.25, 0.9, 1.0):
        phi = Phi(3, ratio=ratio)
        conv = F.conv2d(h, phi.weight, phi.bias, padding=1)
        expected = h * (1 - ratio) + conv * ratio
        torch.testing.assert_close(Fq.phi_refine(h, phi.weight, phi.bias, ratio), expected)
        torch.testing.assert_close(phi(h), expected)
    torch.testing.assert_close(Fq.phi_refine(h, phi.weight, None, 1.0), F.conv2d(h, phi.weight, padding=1))


def make_msvq(scales=(1, 2, 3, 4, 6, 8), dim=5, seed=0):
    torch.manual_seed(seed)
    m = MultiScaleVQ(64, dim, scales=scales)
    with torch.no_grad():
        m.quantizer.codebook.normal_()
    return m


def test_multiscale_encode_decode_agree_with_reference_and_forward():
    m = make_msvq()
    f = torch.randn(2, 5, 8, 8)
    idx = m.encode(f)
    assert [tuple(i.shape) for i in idx] == [(2, s, s) for s in m.scales]
    out = m(f)
    assert all(torch.equal(a, b) for a, b in zip(idx, out.indices))
    f_hat = m.decode(idx)
    assert torch.allclose(f_hat, out.z_q, atol=1e-5)
    assert torch.allclose(f_hat, multiscale_decode(idx, m.quantizer.codebook, m.refinements()), atol=1e-6)
    assert m.num_tokens == 130 and len(m.phis) == 4


def test_multiscale_error_falls_as_scales_are_added():
    m = make_msvq(dim=3)
    with torch.no_grad():
        m.quantizer.codebook[0] = 0
    f = torch.nn.functional.interpolate(torch.randn(4, 3, 3, 3), size=(8, 8), mode="bicubic")
    idx = m.encode(f)
    errors = [(f - m.decode(idx[:k])).pow(2).mean().item() for k in range(1, 7)]
    assert errors[-1] < errors[0]


def test_teacher_forcing_inputs_and_incremental_generation_agree():
    m = make_msvq()
    f = torch.randn(2, 5, 8, 8)
    idx = m.encode(f)
    maps = m.teacher_forcing_inputs(idx)
    assert [tuple(x.shape) for x in maps] == [(2, 5, s, s) for s in m.scales[1:]]
    flat = m.teacher_forcing_inputs(idx, flatten=True)
    assert flat.shape == (2, 130 - 1, 5)
    assert torch.allclose(flat[:, :4], maps[0].flatten(2).transpose(1, 2))
    f_hat = None
    for k in range(len(m.scales) - 1):
        f_hat = m.accumulate(f_hat, k, idx[k])
        assert torch.allclose(m.next_input(f_hat, k), maps[k], atol=1e-6)
    assert torch.allclose(m.accumulate(f_hat, 5, idx[5]), m.decode(idx), atol=1e-6)


def test_phi_follows_var_formula():
    torch.manual_seed(0)
    phi = Phi(4, ratio=0.5)
    h = torch.randn(2, 4, 5, 5)
    expected = 0.5 * h + 0.5 * torch.nn.functional.conv2d(h, phi.weight, phi.bias, padding=1)
    assert torch.allclose(phi(h), expected, atol=1e-5)


def test_multiscale_gradients_reach_input_codebook_and_phi():
    m = make_msvq()
    f = torch.randn(2, 5, 8, 8, requires_grad=True)
    out = m(f)
    (out.z_q.sum() + out.loss).backward()
    assert f.grad is not None and m.quantizer.codebook.grad.abs().sum() > 0
    assert all(p.weight.grad is not None for p in m.phis[:4])


def test_multiscale_bad_input():
    m = make_msvq()
    with pytest.raises(ValueError, match="square"):
        m(torch.randn(1, 5, 8, 6))
    with pytest.raises(ValueError, match="does not fit"):
        m(torch.randn(1, 5, 4, 4))  # scale 8 > 4
    with pytest.raises(ValueError, match="5 channels"):
        m(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="last scale"):
        MultiScaleVQ(8, 4, scales=(1, 2, 8, 4))
    with pytest.raises(ValueError, match="index map"):
        m.decode([torch.zeros(1, 2, 2, dtype=torch.long)])


# ---------------------------------------------------------------------------------------------------------
# VQVAE


@pytest.mark.parametrize("quantizer", ["vq", "rvq", "msvq"])
def test_vqvae_round_trip_and_gradients(quantizer, tmp_path):
    torch.manual_seed(0)
    config = VQVAEConfig(quantizer=quantizer, num_codes=32, latent_dim=8, width=8, depth=2)
    model = VQVAE(config)
    x = torch.rand(3, 1, 32, 32)
    out = model(x)
    assert out.recon.shape == x.shape and out.loss.ndim == 0
    out.loss.backward()
    assert model.encoder.net[0].weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    model.eval()
    tokens = model.encode_to_indices(x)
    assert torch.allclose(model.decode_from_indices(tokens), model(x).recon, atol=1e-6)
    expected_tokens = {"vq": 64, "rvq": 128, "msvq": 130}[quantizer]
    assert model.tokens_per_image == expected_tokens
    path = save_checkpoint(tmp_path / "tok.safetensors", model, config, kind="tokenizer")
    loaded = load(path, kind="tokenizer")
    assert torch.equal(loaded(x).recon, model(x).recon)


def test_vqvae_bad_input_and_config():
    model = VQVAE(VQVAEConfig(width=8, num_codes=16))
    with pytest.raises(ValueError, match="1-channel"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="32x32"):
        model(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="power of two"):
        VQVAEConfig(downsample=3)
    with pytest.raises(ValueError, match="last scale"):
        VQVAEConfig(quantizer="msvq", downsample=2)
    with pytest.raises(ValueError, match="quantizer"):
        VQVAEConfig(quantizer="pq")


@CUDA
@pytest.mark.gpu
def test_quantizers_on_cuda():
    for q in ["vq", "rvq", "msvq"]:
        model = VQVAE(VQVAEConfig(quantizer=q, num_codes=32, width=8)).cuda()
        out = model(torch.rand(2, 1, 32, 32, device="cuda"))
        out.loss.backward()
        idx = out.indices[0] if isinstance(out.indices, list) else out.indices
        assert idx.device.type == "cuda"
