"""Chapter 08 (images): the bidirectional GPT option, MaskGIT's schedule, loss and decoding, the neighbour order."""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from ar_course import masked
from ar_course.masked import functional as M
from ar_course.masked.model import MaskGIT, maskgit_config, maskgit_loss
from ar_course.raster import orders
from ar_course.sampling import SamplingConfig, sample
from ar_course.transformer.model import GPT, GPTConfig


def tiny(seed: int = 0, grid=(3, 4)) -> MaskGIT:
    torch.manual_seed(seed)
    return MaskGIT(maskgit_config(12, grid, n_classes=5, n_layer=1, n_head=2, n_embd=16)).eval()


class Counter:
    """A forward pass that counts its calls and the rows it ran."""

    def __init__(self, model):
        self.model, self.calls, self.rows = model, 0, []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.rows.append(args[0].shape[0])
        return self.model(*args, **kwargs)


# -- the causal flag of the chapter 02 GPT -----------------------------------------------------------------------


def _logits_change(config: GPTConfig) -> torch.Tensor:
    """How much the logits at each position move when only the last token changes: (T,)."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 10))
    other = idx.clone()
    other[:, -1] = (other[:, -1] + 1) % config.vocab_size
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(other)
    return (a - b).abs().amax(dim=(0, 2))  # (T,)


@pytest.mark.parametrize("attn", ["sdpa", "plain"])
def test_bidirectional_model_sees_the_future_and_the_default_does_not(attn):
    base = dict(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16, attn=attn)
    causal = _logits_change(GPTConfig(**base))
    assert torch.all(causal[:-1] == 0) and causal[-1] > 0  # a causal model: no earlier position moves
    bidir = _logits_change(GPTConfig(**base, causal=False))
    assert torch.all(bidir > 1e-6)  # every position sees the changed last token


def test_shipped_causal_models_still_do_not_see_the_future():
    from ar_course import raster

    model, _ = raster.load_pretrained()
    assert model.config.causal
    maps = torch.randint(0, 256, (1, 64))
    other = maps.clone()
    other[0, 40] = (other[0, 40] + 1) % 256
    with torch.no_grad():
        a, _ = model(maps[:, :-1], classes=torch.tensor([3]))
        b, _ = model(other[:, :-1], classes=torch.tensor([3]))
    assert torch.equal(a[:, :41], b[:, :41]) and not torch.equal(a[:, 41:], b[:, 41:])


def test_causal_flag_is_validated_and_old_configs_default_to_causal():
    with pytest.raises(TypeError, match="causal must be True or False"):
        GPTConfig(causal="no")
    assert GPTConfig.from_dict({"vocab_size": 10}).causal is True


def test_bidirectional_attention_maps_are_full_and_causal_ones_triangular():
    torch.manual_seed(0)
    idx = torch.randint(0, 20, (1, 6))
    full = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16, causal=False)).attention_maps(idx)
    tri = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)).attention_maps(idx)
    assert torch.all(full[0] > 0)
    assert torch.all(tri[0].triu(1) == 0)


def test_bidirectional_kv_cache_new_tokens_see_everything_cached_ones_see_only_the_past():
    """With causal=False a cached pass is block-wise: the new tokens attend to every cached position and to each
    other, the cached ones were computed without the new ones. Same logits as one pass under that block mask,
    with the dynamic and the static cache."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=12, n_layer=2, n_head=2, n_embd=16, causal=False)).eval()
    idx = torch.randint(0, 20, (2, 9))
    block = torch.zeros(9, 9, dtype=torch.bool)
    block[:4, :4] = True
    block[4:, :] = True  # (T, T): the second block sees everything
    with torch.no_grad():
        ref = model.lm_head(model.forward_at(idx, torch.arange(9), block))  # (2, 9, V)
        for static in (False, True):
            cache = model.make_cache(2, static=static)
            first, _ = model(idx[:, :4], cache=cache)
            second, _ = model(idx[:, 4:], cache=cache)
            torch.testing.assert_close(torch.cat([first, second], 1), ref, atol=1e-5, rtol=1e-4)


def test_bidirectional_gpt_refuses_left_to_right_generation():
    model = GPT(GPTConfig(vocab_size=20, block_size=12, n_layer=1, n_head=2, n_embd=16, causal=False))
    with pytest.raises(ValueError, match="needs a causal model"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 3)


# -- schedules -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", M.SCHEDULES)
def test_mask_ratio_falls_from_one_to_zero(schedule):
    r = torch.linspace(0, 1, 101)
    g = M.mask_ratio(r, schedule)
    assert g[0] == 1 and g[-1] == 0
    assert torch.all(g[1:] <= g[:-1]) and torch.all((g >= 0) & (g <= 1))


def test_mask_ratio_shapes_of_the_three_schedules():
    r = torch.tensor([0.25, 0.5, 0.75])
    torch.testing.assert_close(M.mask_ratio(r, "cosine"), torch.cos(math.pi / 2 * r))
    torch.testing.assert_close(M.mask_ratio(r, "linear"), 1 - r)
    torch.testing.assert_close(M.mask_ratio(r, "square"), 1 - r * r)
    # cosine keeps more tokens masked than linear at every interior point (fewer revealed early)
    assert torch.all(M.mask_ratio(r, "cosine") > M.mask_ratio(r, "linear"))


@pytest.mark.parametrize("schedule", M.SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 64])
def test_masked_after_reveals_at_least_one_per_step_and_ends_at_zero(schedule, steps):
    counts = M.masked_after(steps, 64, schedule)
    assert len(counts) == steps and counts[-1] == 0
    assert all(b < a for a, b in zip([64] + counts, counts))


def test_masked_after_follows_the_schedule():
    assert M.masked_after(4, 64, "linear") == [48, 32, 16, 0]
    assert M.masked_after(4, 64, "cosine") == [math.floor(64 * math.cos(math.pi / 2 * t / 4)) for t in (1, 2, 3)] + [0]


def test_masked_after_floors_whole_numbers_to_themselves():
    """``n * gamma`` at a whole number is that number: float32 rounding made 64 cos(pi/3) 31 at K = 12 (audit 23)."""
    assert M.masked_after(12, 64)[7] == 32 and M.masked_after(5, 10, "linear") == [8, 6, 4, 2, 0]
    for n in range(1, 97):
        for steps in range(1, n + 1):
            for schedule, gamma in (("linear", lambda r: 1 - r), ("square", lambda r: 1 - r * r)):
                exact = [math.floor(n * gamma(Fraction(t + 1, steps))) for t in range(steps - 1)]
                left, want = n, []
                for t, target in enumerate([*exact, 0]):  # the schedule's rules, in exact arithmetic
                    left = max(min(target, left - 1), steps - 1 - t)
                    want.append(left)
                assert M.masked_after(steps, n, schedule) == want, (schedule, n, steps)


@pytest.mark.parametrize("schedule", M.SCHEDULES)
def test_masked_after_with_as_many_steps_as_tokens_reveals_one_per_step(schedule):
    """At and near steps == n the floor of the schedule can fall below the steps still to come (linear's
    n * (1 - (t + 1) / n) lands just under an integer): the lower bound keeps every count >= 0, strictly
    decreasing and ending at 0; with steps == n that is exactly one token per step."""
    assert M.masked_after(3, 3, "linear") == [2, 1, 0]
    for n in range(1, 41):
        assert M.masked_after(n, n, schedule) == list(range(n - 1, -1, -1))
        for steps in range(max(1, n - 3), n):
            counts = M.masked_after(steps, n, schedule)
            assert len(counts) == steps and counts[-1] == 0 and min(counts) >= 0
            assert all(b < a for a, b in zip([n] + counts, counts))
            assert all(c >= steps - 1 - t for t, c in enumerate(counts))  # a token left for each later step


def test_random_mask_counts_follow_the_schedule():
    g = torch.Generator().manual_seed(0)
    mask = M.random_mask(20000, 64, "linear", g)
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= 64
    # E[ceil((1 - r) * 64)] = 32.5 for r ~ U(0, 1); floor would give 31.5 (+ 1/64 for the clamp to 1). The
    # count's sd is ~18.5, so the mean of 20000 has a standard error of 0.13: 0.5 is ~4 of them either way
    assert abs(counts.float().mean().item() - 32.5) < 0.5
    cos = M.random_mask(20000, 64, "cosine", torch.Generator().manual_seed(0)).sum(1).float().mean().item()
    assert abs(cos - (64 * 2 / math.pi + 0.5)) < 0.5  # E[cos(pi r / 2)] = 2 / pi
    assert torch.equal(M.random_mask(8, 64, "cosine", torch.Generator().manual_seed(3)),
                       M.random_mask(8, 64, "cosine", torch.Generator().manual_seed(3)))


# -- loss -------------------------------------------------------------------------------------------------------


def test_masked_cross_entropy_counts_only_the_masked_positions():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    mask = torch.rand(3, 5) < 0.5
    mask[0, 0] = True
    expected = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), reduction="none")[mask.reshape(-1)].mean()
    torch.testing.assert_close(M.masked_cross_entropy(logits, targets, mask), expected)
    moved = logits.clone()
    moved[~mask] += 5 * torch.randn_like(moved[~mask])  # visible positions do not matter
    torch.testing.assert_close(M.masked_cross_entropy(moved, targets, mask), expected)


def test_maskgit_loss_is_the_masked_cross_entropy_of_the_masked_inputs():
    """maskgit_loss skips masked_cross_entropy's second range check; the value is the checked function's."""
    model = tiny().eval()
    maps = torch.randint(0, model.num_codes, (4, 3, 4), generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 1, 2, 3])
    mask = torch.rand(4, 12, generator=torch.Generator().manual_seed(2)) < 0.5
    mask[:, 0] = True
    inputs = maps.reshape(4, 12).masked_fill(mask, model.mask_id)  # (B, N)
    expected = M.masked_cross_entropy(model.map_logits(inputs, classes), maps.reshape(4, 12), mask)
    torch.testing.assert_close(maskgit_loss(model, maps, classes, mask=mask), expected, rtol=0, atol=0)


def test_maskgit_loss_trains_the_masked_positions():
    model = tiny().train()
    classes = torch.arange(5).repeat(2)  # (10,)
    maps = (2 * classes)[:, None, None].expand(10, 3, 4).contiguous()  # every token tells the class
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(40):
        loss = maskgit_loss(model, maps, classes, generator=torch.Generator().manual_seed(step))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.3 * losses[0]


# -- decoding ---------------------------------------------------------------------------------------------------


def test_confidence_step_keeps_the_most_confident_and_never_remasks_known_tokens():
    tokens = torch.tensor([[5, 0, 0, 7, 0]])
    mask = torch.tensor([[False, True, True, False, True]])
    sampled = torch.tensor([[1, 2, 3, 4, 5]])
    log_probs = torch.full((1, 5, 8), -10.0)
    log_probs[0, torch.arange(5), sampled[0]] = torch.tensor([-9.0, -0.1, -3.0, -9.0, -1.0])
    new, new_mask = M.confidence_step(tokens, mask, log_probs, sampled, 1)
    assert new_mask.tolist() == [[False, False, True, False, False]]  # the least confident masked one
    assert new.tolist() == [[5, 2, 0, 7, 5]]  # known kept, confident ones taken, the re-masked one as it was
    noise = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0]])  # noise can overturn the order
    _, new_mask = M.confidence_step(tokens, mask, log_probs, sampled, 1, noise, 1.0)
    assert new_mask.tolist() == [[False, False, False, False, True]]
    new, new_mask = M.confidence_step(tokens, mask, log_probs, sampled, 0)
    assert not new_mask.any() and new.tolist() == [[5, 2, 3, 7, 5]]


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 12])
@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_generate_makes_exactly_steps_forward_passes(steps, cfg):
    model = tiny()
    count = Counter(model)
    maps = model.generate(torch.tensor([0, 3, 5]), steps=steps, cfg=cfg, forward=count,
                          generator=torch.Generator().manual_seed(0))
    assert count.calls == steps
    assert count.rows == [3 * (2 if cfg else 1)] * steps  # guidance: one doubled batch per pass
    assert maps.shape == (3, 3, 4) and maps.dtype == torch.long
    assert 0 <= int(maps.min()) and int(maps.max()) < model.num_codes  # never [MASK]


def test_generate_counts_passes_with_a_hook_too():
    model = tiny(grid=(8, 8))
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        for k in (1, 2, 4, 8, 16, 64):
            calls.clear()
            model.generate(torch.tensor([1]), steps=k, generator=torch.Generator().manual_seed(0))
            assert len(calls) == k
    finally:
        hook.remove()


def test_generate_reveals_monotonically_following_the_schedule():
    model = tiny(grid=(8, 8))
    trace: list[torch.Tensor] = []
    out = model.generate(torch.tensor([1, 2]), steps=8, schedule="cosine", trace=trace,
                         generator=torch.Generator().manual_seed(0))
    assert len(trace) == 8
    masked_counts = [int((t == model.mask_id).sum(1).max()) for t in trace]
    assert masked_counts == M.masked_after(8, 64, "cosine")
    for before, after in zip(trace, trace[1:]):
        known = before != model.mask_id
        assert torch.equal(after[known], before[known])  # a revealed token never changes
    assert torch.equal(trace[-1].view(2, 8, 8), out)


def test_generate_is_deterministic_under_a_seed():
    model = tiny()
    classes = torch.tensor([0, 1, 2, 3, 4, 5])
    run = lambda seed, **kw: model.generate(classes, steps=4, cfg=1.0,  # noqa: E731
                                            generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    from ar_course.sampling import GREEDY
    assert torch.equal(run(0, sampling=GREEDY, noise=0.0), run(1, sampling=GREEDY, noise=0.0))  # no randomness left


def test_confidence_is_the_models_log_probability_whatever_the_sampling_config():
    """Tokens are drawn with temperature and top-k but kept by the model's own log-probability (as MaskGIT does):
    after a top-k of 1 or a tiny temperature every drawn token has log-probability 0, and the order would be
    left to ties."""
    model, classes = tiny(), torch.tensor([0, 3])
    sampling = SamplingConfig(temperature=3.0, top_k=3)
    trace: list[torch.Tensor] = []
    model.generate(classes, steps=2, sampling=sampling, noise=0.0, generator=torch.Generator().manual_seed(0),
                   trace=trace)
    tokens = torch.full((2, 12), model.mask_id)
    logits = model.map_logits(tokens, classes)
    sampled = sample(logits, sampling=sampling, generator=torch.Generator().manual_seed(0))
    log_probs = F.log_softmax(logits, dim=-1)
    expected, _ = M.confidence_step(tokens, tokens == model.mask_id, log_probs, sampled,
                                    M.masked_after(2, 12, "cosine")[0])
    assert torch.equal(trace[0], expected)


@pytest.mark.parametrize("sampling", [SamplingConfig(top_k=1), SamplingConfig(temperature=1e-6),
                                      SamplingConfig(top_p=1e-9)], ids=["top_k=1", "T=1e-6", "top_p=1e-9"])
def test_sampling_that_always_draws_the_argmax_decodes_as_greedy(sampling):
    """Without noise, any sampling that draws the most likely token reveals the same positions as greedy (the old
    confidence under the sampling config tied every position at 0, and the reveal order followed the ties)."""
    model, classes = tiny(seed=1), torch.tensor([0, 3, 5])
    greedy: list[torch.Tensor] = []
    got: list[torch.Tensor] = []
    model.generate(classes, steps=4, sampling=SamplingConfig(temperature=0), noise=0.0, trace=greedy)
    model.generate(classes, steps=4, sampling=sampling, noise=0.0, generator=torch.Generator().manual_seed(0),
                   trace=got)
    assert all(torch.equal(a, b) for a, b in zip(got, greedy, strict=True))  # every step reveals the same


def test_neighbour_order_takes_2n_minus_1_passes_and_respects_dependencies():
    steps = M.neighbour_steps(8, 8)
    assert len(steps) == 15 == orders.num_steps("neighbour", 8, 8)
    assert torch.equal(torch.stack(steps).sum(0), torch.ones(64, dtype=torch.long))
    for k, step in enumerate(steps):  # step k is the anti-diagonal i + j = k
        idx = step.nonzero()[:, 0]
        assert torch.all(idx // 8 + idx % 8 == k)
    model = tiny(grid=(8, 8))
    count = Counter(model)
    trace: list[torch.Tensor] = []
    model.generate_in_order(torch.tensor([1, 2]), steps, cfg=1.0, forward=count, trace=trace,
                            generator=torch.Generator().manual_seed(0))
    assert count.calls == 15
    for k, tokens in enumerate(trace):  # after step k, exactly the diagonals 0..k are known
        known = tokens[0] != model.mask_id
        assert torch.equal(known, torch.stack(steps[: k + 1]).any(0))


def test_generate_images_of_both_orders():
    from ar_course.tokenizers import VQVAE, VQVAEConfig

    model = tiny(grid=(8, 8))
    torch.manual_seed(0)
    tok = VQVAE(VQVAEConfig(num_codes=12)).eval()  # untrained: only shapes and determinism are tested here
    for order in ("confidence", "neighbour"):
        images = masked.generate_images(model, tok, torch.tensor([0, 1, 2]), steps=4, order=order, seed=0)
        assert images.shape == (3, 1, 32, 32)
        assert torch.equal(images, masked.generate_images(model, tok, torch.tensor([0, 1, 2]), steps=4, order=order,
                                                          seed=0))


def test_generate_images_passes_noise_on():
    """``generate_images(noise=...)`` reaches the sampler: the same tokens as ``generate`` with that noise."""
    from ar_course.tokenizers import VQVAE, VQVAEConfig

    model, classes = tiny(grid=(2, 2)), torch.tensor([0, 1, 4])
    tok = VQVAE(VQVAEConfig(image_size=8, downsample=4, width=4, latent_dim=4, num_codes=12)).eval()
    tok.decode_from_indices = lambda maps: maps.flatten(1).float()  # see the tokens
    for noise in (0.0, 50.0):
        got = masked.generate_images(model, tok, classes, steps=2, noise=noise, seed=0)
        want = model.generate(classes, steps=2, noise=noise, generator=torch.Generator().manual_seed(0))
        assert torch.equal(got, want.flatten(1).float()), noise


# -- bad arguments ----------------------------------------------------------------------------------------------


def test_bad_arguments_give_clear_errors():
    model = tiny()
    cls = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"steps must be .*\[1, 12\]"):
        model.generate(cls, steps=0)
    with pytest.raises(ValueError, match=r"steps"):
        model.generate(cls, steps=13)
    with pytest.raises(TypeError, match="steps"):
        model.generate(cls, steps=2.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        model.generate(cls, schedule="exp")
    with pytest.raises(ValueError, match="noise"):
        model.generate(cls, noise=-1.0)
    with pytest.raises(ValueError, match="classes"):
        model.generate(torch.tensor([6]))
    with pytest.raises(ValueError, match="classes"):
        model.generate(torch.tensor([[0]]))
    with pytest.raises(ValueError, match="cfg"):
        model.generate(cls, cfg=float("nan"))
    with pytest.raises(TypeError):
        model.generate(cls, 8)  # steps is keyword-only
    with pytest.raises(ValueError, match="order must be"):
        model.generate_in_order(cls, [torch.ones(12, dtype=torch.bool)] * 2)
    with pytest.raises(ValueError, match="r must lie in"):
        M.mask_ratio(1.5)
    with pytest.raises(ValueError, match="no masked position"):
        M.masked_cross_entropy(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=bool))
    with pytest.raises(ValueError, match="causal=False"):
        MaskGIT(GPTConfig(vocab_size=13, block_size=13, n_classes=5, pos="rope2d", grid=(3, 4)))
    with pytest.raises(ValueError, match=r"^vocab_size must be >= 2 \(at least one code, then \[MASK\]\), got 1$"):
        MaskGIT(GPTConfig(vocab_size=1, block_size=13, n_classes=5, pos="rope2d", grid=(3, 4), causal=False))
    with pytest.raises(ValueError, match="order must be"):
        masked.generate_images(model, None, cls, order="raster")


# -- the shipped model and its trainer -----------------------------------------------------------------------------


def test_shipped_maskgit_is_bidirectional_and_draws_the_requested_digits_in_8_passes():
    from ar_course import metrics

    model, tokenizer = masked.load_pretrained()
    assert isinstance(model, MaskGIT) and not model.config.causal and model.mask_id == 256
    info = masked.pretrained_info()
    assert info["steps"] == 2000 and info["seed"] == 0 and info["schedule"] == "cosine"
    classes = torch.arange(10).repeat(2)
    count = Counter(model)
    maps = model.generate(classes, steps=8, cfg=2.0, forward=count, generator=torch.Generator().manual_seed(0))
    assert count.calls == 8
    assert metrics.class_accuracy(tokenizer.decode_from_indices(maps), classes) >= 0.9


def test_train_maskgit_cli_writes_a_loadable_checkpoint(tmp_path):
    from ar_course.masked.train import main

    out = tmp_path / "mg.safetensors"
    assert main(["--steps", "2", "--batch-size", "8", "--train-images", "64", "--eval-per-class", "1",
                 "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--schedule", "square", "--out", str(out)]) == 0
    model, _ = masked.load_pretrained(path=out)
    info = masked.pretrained_info(out)
    assert isinstance(model, MaskGIT) and info["schedule"] == "square" and info["steps"] == 2
    assert set(info["accuracy_by_cfg_8_steps"]) == {"0.0", "1.0", "2.0"}


def test_map_logits_takes_a_compiled_forward():
    """``forward or self`` asked the compiled module for its truth value: "MaskGIT does not support len()"."""
    torch._dynamo.reset()
    model, classes = tiny(), torch.tensor([0, 3])
    tokens = torch.full((2, 12), model.mask_id)
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(model.map_logits(tokens, classes, forward=compiled), model.map_logits(tokens, classes))
    torch._dynamo.reset()
