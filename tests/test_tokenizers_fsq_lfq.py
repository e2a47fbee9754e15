"""Chapter 10's quantizers: FSQ, LFQ (with its entropy loss), the rotation trick and k-means codebook
initialisation, alone, inside the VQ-VAE and through ``python -m ar_course train tokenizer``."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ar_course.checkpoint import load, load_checkpoint
from ar_course.tokenizers import FSQ, LFQ, VQVAE, VectorQuantizer, VQVAEConfig, functional as Fq
from ar_course.tokenizers import train as tok_train


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def fsq_inverse_bound(values: torch.Tensor, levels, eps: float = 1e-3) -> torch.Tensor:
    """Inputs ``(..., d)`` that :func:`Fq.fsq_bound` maps to ``values`` (the integer grid), written out from the
    formula ``tanh(z + shift) * h - offset``."""
    lv = torch.tensor(levels, dtype=torch.float64)
    half = (lv - 1) * (1 + eps) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0).double()
    return (torch.atanh((values.double() + offset) / half) - torch.atanh(offset / half)).float()


# ---------------------------------------------------------------------------------------------------------
# FSQ


@pytest.mark.parametrize("levels", [(3, 4, 5), (8, 6, 5), (2, 2), (7,)])
def test_fsq_outputs_lie_on_the_declared_grid(levels):
    fsq = FSQ(levels)
    z = torch.randn(4, len(levels), 6, 6, generator=gen()) * 4  # far beyond the bounds too
    z_q = fsq(z).z_q
    for i, L in enumerate(levels):
        grid = torch.tensor([(k - L // 2) / (L // 2) for k in range(L)])
        values = z_q[:, i].flatten()
        assert torch.isclose(values[:, None], grid[None], atol=1e-6).any(1).all(), (L, values.unique())
        assert values.unique().numel() <= L


@pytest.mark.parametrize("levels", [(1001,), (2000,), (2, 1024), (1024, 4)])
def test_fsq_with_more_than_1000_levels_stays_on_its_grid(levels):
    """The bound's 1e-3 margin let a value round one step past the grid once a level passed 1000: indices
    -1 or L (refused by decode), or with two channels a carry into the next digit, the index of another code
    ((1024, 4): the code (1, 0) got index 3072, which decodes to (-1, 0.5))."""
    fsq = FSQ(levels)
    z = torch.linspace(-10, 10, 2001).repeat(len(levels), 1).reshape(1, len(levels), 2001, 1)  # far past the bound
    out = fsq(z)
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < fsq.num_codes
    for i, L in enumerate(levels):
        top = torch.tensor((L - 1) // 2 / (L // 2))  # the grid's last code, rounded to float32 as z_q is
        assert float(out.z_q[:, i].min()) == -1.0 and float(out.z_q[:, i].max()) == float(top)
    assert torch.equal(fsq.decode(out.indices), out.z_q.detach())  # each index names its own code


def test_fsq_indices_of_bfloat16_codes_stay_in_range():
    """bfloat16 holds no odd integer above 256: a digit computed there rounded to L (index out of range). The
    codes themselves of a level above 256 may alias in bfloat16; the indices are computed in float32."""
    fsq = FSQ((300,))
    z = torch.linspace(-10, 10, 4001).reshape(1, 1, 4001, 1)
    indices = fsq(z.bfloat16()).indices
    assert int(indices.min()) == 0 and int(indices.max()) == 299
    torch.testing.assert_close(fsq.decode(indices), fsq(z.bfloat16()).z_q.float(), atol=2 ** -8, rtol=0)


@pytest.mark.parametrize("levels", [(3, 4, 5), (8, 6, 5), (2, 3)])
def test_fsq_every_code_is_reachable_and_round_trips(levels):
    fsq = FSQ(levels)
    n = math.prod(levels)
    assert fsq.num_codes == n
    idx = torch.arange(n)
    codes = Fq.fsq_indices_to_codes(idx, levels)  # (n, d)
    assert torch.equal(Fq.fsq_codes_to_indices(codes, levels), idx)
    assert torch.unique(codes, dim=0).shape[0] == n  # a bijection, not just a surjection onto indices
    assert torch.equal(fsq.codes(), codes)
    # the input that bounds to each grid point is quantized to that code
    digits = torch.stack([(idx // math.prod(levels[:i])) % L for i, L in enumerate(levels)], dim=1)  # (n, d)
    z = fsq_inverse_bound(digits - torch.tensor([L // 2 for L in levels]), levels)  # (n, d)
    out = fsq(z.t().reshape(1, len(levels), 1, n))
    assert torch.equal(out.indices.flatten(), idx)
    assert torch.allclose(out.z_q.reshape(len(levels), n).t(), codes, atol=1e-6)
    assert torch.equal(fsq.decode(out.indices), out.z_q.detach())
    # and random inputs reach all of them too
    hits = fsq.encode(torch.randn(1, len(levels), 100, 100, generator=gen(1)) * 1.5).unique()
    assert hits.numel() == n


def test_fsq_zero_maps_to_the_zero_code_and_the_gradient_is_straight_through_the_rounding():
    levels = (8, 5, 4)
    z = torch.randn(2, 3, 4, 4, generator=gen(2), requires_grad=True)
    w = torch.randn(2, 3, 4, 4, generator=gen(3))
    (FSQ(levels)(z).z_q * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    width = torch.tensor([L // 2 for L in levels]).view(1, 3, 1, 1)
    (Fq.fsq_bound(z2.movedim(1, -1), levels).movedim(-1, 1) / width * w).sum().backward()
    assert z.grad.abs().sum() > 0 and torch.allclose(z.grad, z2.grad)
    zero = FSQ(levels)(torch.zeros(1, 3, 1, 1)).z_q
    assert torch.equal(zero, torch.zeros_like(zero))
    assert FSQ(levels)(z).loss.item() == 0.0


@pytest.mark.parametrize("levels, error", [
    ((), ValueError), ((1, 4), ValueError), ((0,), ValueError),  # out of range: ValueError
    ((2.5, 3), TypeError), ((8.0, 5), TypeError), ((None, 3), TypeError), (("8", 5), TypeError),  # not integers
    ((True, 3), TypeError), ("85", TypeError), (None, TypeError),
])
def test_fsq_bad_levels_raise(levels, error):
    with pytest.raises(error, match="level"):
        FSQ(levels)


def test_fsq_wrong_channels_and_config_mismatch_raise():
    with pytest.raises(ValueError, match="3 channels"):
        FSQ((8, 6, 5))(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="latent_dim"):
        VQVAEConfig(quantizer="fsq", fsq_levels=(8, 6, 5), latent_dim=16)
    with pytest.raises(ValueError, match="indices"):
        FSQ((2, 3)).decode(torch.full((1, 2, 2), 6))


# ---------------------------------------------------------------------------------------------------------
# LFQ


def test_lfq_codes_are_exactly_the_sign_patterns():
    d = 4
    lfq = LFQ(d)
    assert lfq.num_codes == 16
    table = lfq.decode(torch.arange(16).view(1, 4, 4)).permute(0, 2, 3, 1).reshape(16, d)  # (16, d)
    patterns = {tuple(p) for p in itertools.product((-1.0, 1.0), repeat=d)}
    assert {tuple(r.tolist()) for r in table} == patterns
    assert torch.equal(lfq.codes(), table)
    for k, row in enumerate(table):  # index bit i is the sign of channel i
        assert all((row[i] > 0) == bool(k >> i & 1) for i in range(d))
    z = torch.randn(3, d, 5, 5, generator=gen(4))
    z[0, :, 0, 0] = 0.0  # sign(0) is -1
    out = lfq.eval()(z)
    assert torch.equal(out.z_q, torch.where(z > 0, 1.0, -1.0))
    assert torch.equal(lfq.decode(out.indices), out.z_q) and torch.equal(lfq.encode(z), out.indices)
    assert out.indices[0, 0, 0] == 0


def direct_entropies(z: np.ndarray, temperature: float) -> tuple[float, float]:
    """Per-sample and codebook entropy over all sign codes, from the distances, one code at a time."""
    d = z.shape[1]
    codes = np.array(list(itertools.product((-1.0, 1.0), repeat=d)))  # (2^d, d) in some order
    logits = np.array([[-np.sum((x - c) ** 2) / temperature for c in codes] for x in z])  # (N, 2^d)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    per_sample = float(np.mean([-np.sum(row * np.log(row)) for row in p]))
    avg = p.mean(0)
    return per_sample, float(-np.sum(avg * np.log(avg)))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_lfq_entropy_terms_match_a_direct_computation(temperature):
    z = torch.randn(7, 3, generator=gen(5), dtype=torch.float64) * 0.5
    per_sample, codebook = Fq.lfq_entropy_terms(z, temperature, chunk_size=3)
    want_sample, want_codebook = direct_entropies(z.numpy(), temperature)
    assert per_sample.item() == pytest.approx(want_sample, rel=1e-9)
    assert codebook.item() == pytest.approx(want_codebook, rel=1e-9)
    assert 0 < per_sample.item() < codebook.item() <= math.log(8)


def test_lfq_loss_is_commitment_plus_weighted_entropy_terms_and_raises_batch_entropy():
    lfq = LFQ(3, beta=0.25, entropy_weight=0.5, diversity=1.5, temperature=0.5)
    z = torch.randn(2, 3, 4, 4, generator=gen(6)) * 0.3
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    ps, cb = Fq.lfq_entropy_terms(flat, 0.5)
    want = 0.25 * F.mse_loss(flat, torch.where(flat > 0, 1.0, -1.0)) + 0.5 * (ps - 1.5 * cb)
    assert lfq.train()(z).loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert lfq.last_entropy == pytest.approx({"per_sample": ps.item(), "codebook": cb.item()}, rel=1e-6)
    # gradient steps on the entropy loss alone spread a collapsed batch (every vector near one code) over codes
    x = (torch.full((64, 3), 0.2) + 0.05 * torch.randn(64, 3, generator=gen(7))).requires_grad_(True)
    before = Fq.lfq_entropy_terms(x.detach(), 0.5)[1].item()
    assert Fq.lfq_codes_to_indices(x.detach()).unique().numel() == 1
    opt = torch.optim.SGD([x], lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        ps, cb = Fq.lfq_entropy_terms(x, 0.5)
        (ps - cb).backward()
        opt.step()
    assert Fq.lfq_codes_to_indices(x.detach()).unique().numel() == 8 and cb.item() > before + 0.3


@pytest.mark.parametrize("dim, error", [(0, ValueError), (17, ValueError), (2.0, TypeError), (True, TypeError)])
def test_lfq_bad_dims_raise(dim, error):
    with pytest.raises(error, match="LFQ dim must be an integer in \\[1, 16\\]"):
        LFQ(dim)


def test_lfq_bad_options_raise():
    with pytest.raises(ValueError, match="temperature"):
        LFQ(4, temperature=0.0)
    with pytest.raises(ValueError, match="latent_dim"):
        VQVAEConfig(quantizer="lfq", latent_dim=20)


def test_lfq_commitment_term_sends_its_gradient_to_z():
    """The commitment term pulls the encoder's z toward its (detached) sign code: the gradient is
    2 * beta * (z - code) / numel, with nothing flowing through the code."""
    q = LFQ(4, beta=0.25, entropy_weight=0.0).train()
    z = torch.randn(2, 4, 3, 3, generator=gen(0), requires_grad=True)
    q(z).loss.backward()
    code = torch.where(z > 0, 1.0, -1.0)
    torch.testing.assert_close(z.grad, 2 * 0.25 * (z.detach() - code) / z.numel())


def test_lfq_eval_loss_is_the_commitment_term_alone():
    """In eval mode the loss has no entropy terms, whatever entropy_weight is."""
    q = LFQ(4, beta=0.25, entropy_weight=0.1).eval()
    z = torch.randn(2, 4, 3, 3, generator=gen(0))
    code = torch.where(z > 0, 1.0, -1.0)
    torch.testing.assert_close(q(z).loss, 0.25 * (z - code).pow(2).mean())


def test_lfq_encode_refuses_a_nan_map():
    """LFQ.encode checks its input: a NaN in the map is a ValueError, not a code read off its sign."""
    z = torch.randn(1, 4, 2, 2, generator=gen(0))
    z[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        LFQ(4).encode(z)


# ---------------------------------------------------------------------------------------------------------
# the rotation trick


def pair(**kw):
    torch.manual_seed(0)
    plain = VectorQuantizer(12, 5, **kw)
    rot = VectorQuantizer(12, 5, rotation_trick=True, **kw)
    rot.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.codebook.normal_(generator=gen(8))
        rot.codebook.copy_(plain.codebook)
    return plain, rot


@pytest.mark.parametrize("l2_norm", [False, True])
def test_rotation_trick_forward_equals_plain_vq(l2_norm):
    plain, rot = pair(l2_norm=l2_norm)
    z = torch.randn(2, 5, 3, 3, generator=gen(9))
    a, b = plain(z), rot(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.loss, b.loss)
    # the rotation trick outputs the codes exactly; plain VQ's z + sg[z_q - z] equals them up to rounding
    assert torch.equal(b.z_q, rot.decode(b.indices))
    assert torch.allclose(a.z_q, b.z_q, atol=1e-6, rtol=0)


def test_rotation_trick_gradient_matches_the_explicit_rotation_matrix():
    plain, rot = pair()
    z = torch.randn(2, 5, 3, 3, generator=gen(10), dtype=torch.float64)
    plain, rot = plain.double(), rot.double()
    w = torch.randn(2, 5, 3, 3, generator=gen(11), dtype=torch.float64)  # upstream gradient
    zr = z.clone().requires_grad_(True)
    out = rot(zr)
    (out.z_q * w).sum().backward()
    e = z.permute(0, 2, 3, 1).reshape(-1, 5)  # (N, D)
    q = rot.codebook.detach()[out.indices.flatten()]  # (N, D)
    g = w.permute(0, 2, 3, 1).reshape(-1, 5)
    want = []
    for ei, qi, gi in zip(e, q, g):
        u, qh = ei / ei.norm(), qi / qi.norm()
        r = (u + qh) / (u + qh).norm()
        R = torch.eye(5, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(qh, u)
        assert torch.allclose(R @ R.t(), torch.eye(5, dtype=torch.float64), atol=1e-10)  # a rotation
        assert torch.allclose(qi.norm() / ei.norm() * R @ ei, qi, atol=1e-10)  # that maps z onto its code
        want.append((qi.norm() / ei.norm()) * R.t() @ gi)  # d/dz of g . (lambda R z), R and lambda constant
    got = zr.grad.permute(0, 2, 3, 1).reshape(-1, 5)
    assert torch.allclose(got, torch.stack(want), atol=1e-10)
    assert not torch.allclose(got, g, atol=1e-3)  # not the straight-through gradient
    # the codebook's gradient (from the loss only) is the same as plain VQ's
    zp = z.clone().requires_grad_(True)
    plain(zp).loss.backward()
    rot.codebook.grad = None
    rot(z.clone().requires_grad_(True)).loss.backward()
    assert torch.allclose(plain.codebook.grad, rot.codebook.grad)


def test_rotation_trick_survives_a_zero_vector():
    _, rot = pair()
    z = torch.zeros(1, 5, 1, 2, requires_grad=True)
    rot(z).z_q.sum().backward()
    assert torch.isfinite(z.grad).all()


# ---------------------------------------------------------------------------------------------------------
# k-means initialisation


def clustered(n_per=100, k=8, d=4, seed=12):
    g = gen(seed)
    centres = torch.randn(k, d, generator=g) * 3
    return (centres[:, None] + 0.1 * torch.randn(k, n_per, d, generator=g)).reshape(-1, d), centres


def quantization_error(vq: VectorQuantizer, flat: torch.Tensor) -> float:
    return float((flat - vq.codes().detach()[vq.lookup(flat)]).pow(2).mean())


def test_kmeans_init_lowers_the_initial_quantization_error_on_clustered_data():
    flat, _ = clustered()
    z = flat.t().reshape(1, 4, 1, -1)  # (1, D, 1, N)
    torch.manual_seed(0)
    uniform = VectorQuantizer(8, 4)
    torch.manual_seed(0)
    km = VectorQuantizer(8, 4, kmeans_init=True).train()
    assert not bool(km.initialized)
    km(z)
    assert bool(km.initialized)
    err_uniform, err_km = quantization_error(uniform, flat), quantization_error(km, flat)
    assert err_km < 0.05 * err_uniform, (err_km, err_uniform)
    assert err_km < 0.1  # about the within-cluster variance (0.01 per dimension)... up to a bad start
    codebook = km.codebook.detach().clone()
    km(z + 5.0)  # initialised once only
    assert torch.equal(km.codebook.detach(), codebook)
    assert "initialized" not in uniform.state_dict()  # the shipped checkpoints' keys are unchanged


def test_kmeans_is_a_fixed_point_of_lloyd_and_seeded():
    flat, _ = clustered(n_per=30, k=5, d=3, seed=13)
    a = Fq.kmeans(flat, 5, iters=20, generator=gen(14))
    b = Fq.kmeans(flat, 5, iters=20, generator=gen(14))
    assert torch.equal(a, b)
    assign = Fq.vq_lookup(flat, a)
    for j in range(5):
        if (assign == j).any():
            assert torch.allclose(a[j], flat[assign == j].mean(0), atol=1e-5)
    assert Fq.kmeans(flat[:3], 5, iters=2, generator=gen(0)).shape == (5, 3)  # fewer vectors than codes
    with pytest.raises(ValueError, match="k >= 1"):
        Fq.kmeans(flat, 0)


def test_kmeans_init_with_ema_sets_the_running_sums():
    flat, _ = clustered(n_per=20)
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, kmeans_init=True, ema=True).train()
    vq.init_codebook(flat)
    assert torch.equal(vq.ema_embed_sum, vq.codebook) and bool(vq.initialized)


def test_rotation_and_kmeans_are_vq_options_only():
    with pytest.raises(ValueError, match="vq"):
        VQVAEConfig(quantizer="rvq", rotation_trick=True)
    with pytest.raises(ValueError, match="kmeans_iters"):
        VectorQuantizer(8, 4, kmeans_iters=-1)


# ---------------------------------------------------------------------------------------------------------
# inside the VQ-VAE and the trainer

CONFIGS = {
    "fsq": dict(quantizer="fsq", fsq_levels=(5, 4, 3), latent_dim=3),
    "lfq": dict(quantizer="lfq", latent_dim=6),
    "vq_rot_km": dict(quantizer="vq", rotation_trick=True, kmeans_init=True, num_codes=16, latent_dim=4),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_vqvae_trains_and_is_deterministic_under_its_seed(name):
    images = torch.rand(40, 1, 32, 32, generator=gen(15))
    config = tok_train.default_config(width=4, usage_window=2, **CONFIGS[name])
    runs = [tok_train.train_tokenizer(config, steps=3, seed=5, batch_size=8, train_images=images,
                                      test_images=images[:8], progress=False, device="cpu") for _ in range(2)]
    for (key, a), b in zip(runs[0][0].state_dict().items(), runs[1][0].state_dict().values()):
        assert torch.equal(a, b), key
    model, metrics, history = runs[0]
    assert model.config.num_codes == {"fsq": 60, "lfq": 64, "vq_rot_km": 16}[name]
    tokens = model.encode_to_indices(images[:4])
    assert tokens.shape == (4, 8, 8) and int(tokens.max()) < model.config.num_codes
    assert torch.allclose(model.decode_from_indices(tokens), model(images[:4]).recon, atol=1e-6)
    assert 0 < metrics["fraction_used"] <= 1 and math.isfinite(metrics["psnr"])


@pytest.mark.parametrize("args, kind", [(["--quantizer", "fsq", "--fsq-levels", "4,3"], FSQ),
                                        (["--quantizer", "lfq", "--latent-dim", "5"], LFQ),
                                        (["--quantizer", "vq", "--rotation-trick", "--kmeans-init", "--num-codes",
                                          "16"], VectorQuantizer)])
def test_cli_tiny_run_writes_a_loadable_checkpoint(args, kind, tmp_path, monkeypatch):
    images = torch.rand(80, 1, 32, 32, generator=gen(16))
    monkeypatch.setattr(tok_train, "load_images",
                        lambda dataset, split: images[:64] if split == "train" else images[64:])
    out = tmp_path / "tok.safetensors"
    assert tok_train.main([*args, "--steps", "2", "--batch-size", "16", "--device", "cpu", "--out", str(out)]) == 0
    _, meta = load_checkpoint(out)
    model = load(out)
    assert isinstance(model, VQVAE) and isinstance(model.quantizer, kind)
    assert meta["config"]["quantizer"] == args[1]
    if kind is VectorQuantizer:
        assert model.quantizer.rotation_trick and bool(model.quantizer.initialized)
    assert model.config.num_codes == {FSQ: 12, LFQ: 32, VectorQuantizer: 16}[kind]


@pytest.mark.parametrize("levels", ["8,1", "8,x"])
def test_cli_rejects_bad_levels(capsys, levels):
    with pytest.raises(SystemExit) as info:
        tok_train.main(["--quantizer", "fsq", "--fsq-levels", levels])
    assert info.value.code == 2 and capsys.readouterr().err == (
        f"error: --fsq-levels must be comma-separated integers >= 2 such as 8,6,5, got '{levels}' "
        "(see python -m ar_course train tokenizer --help)\n")


@pytest.mark.parametrize("args, says", [
    (["--quantizer", "vq", "--depth", "3"], "--depth does not apply to --quantizer vq (only to rvq)"),
    (["--quantizer", "fsq", "--num-codes", "16"], "--num-codes does not apply to --quantizer fsq (only to vq, rvq, "
                                                  "msvq)"),
    (["--quantizer", "rvq", "--l2-norm"], "--l2-norm does not apply to --quantizer rvq (only to vq)"),
    (["--quantizer", "kl", "--fsq-levels", "4,3"], "--fsq-levels does not apply to --quantizer kl (only to fsq)"),
    (["--quantizer", "msvq", "--ema"], "--ema does not apply to --quantizer msvq (only to vq, rvq)"),
])
def test_cli_refuses_an_option_the_quantizer_would_ignore(capsys, args, says):
    with pytest.raises(SystemExit) as info:
        tok_train.main([*args, "--steps", "1"])
    assert info.value.code == 2 and capsys.readouterr().err == (
        f"error: {says} (see python -m ar_course train tokenizer --help)\n")
