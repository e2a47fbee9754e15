"""Chapter 08, text half: the bidirectional GPT option and the masked diffusion LM (bound, generation, cache)."""

import itertools
import math

import pytest
import torch

from ar_course.checkpoint import load_with_tokenizer
from ar_course.cli import main as cli_main
from ar_course.data import CharTokenizer
from ar_course.diffusion_lm import DiffusionLM, DiffusionLMConfig
from ar_course.diffusion_lm import functional as F
from ar_course.diffusion_lm.train import main as train_main
from ar_course.sampling import SamplingConfig
from ar_course.transformer import GPT, GPTConfig, KVCache, count_forward_passes

GREEDY = SamplingConfig(temperature=0.0)


def tiny(vocab: int = 3, length: int = 4, seed: int = 0, **kw) -> DiffusionLM:
    """A random tiny model with sharp enough outputs that orders and contexts matter."""
    torch.manual_seed(seed)
    model = DiffusionLM(DiffusionLMConfig(vocab_size=vocab, length=length, n_layer=2, n_head=2, n_embd=16,
                                          train_block_sizes=(0,), **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.ndim > 1 else 1.0)
    return model.eval()


# -- the shared model option ---------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_a_causal_false_gpt_sees_the_future_and_the_default_does_not(causal):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, causal=causal)).eval()
    x = torch.randint(0, 11, (1, 8))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 11  # change only the last token
    first = model(x)[0][0, 0], model(y)[0][0, 0]
    assert torch.allclose(*first) is causal  # position 0 sees the last token only without the causal mask
    assert GPTConfig().causal is True


def test_a_causal_false_gpt_refuses_generate_and_a_bad_flag():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16, causal=False))
    with pytest.raises(ValueError, match="needs a causal model"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="causal must be True or False"):
        GPTConfig(causal="no")


# -- the plain pieces ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", F.SCHEDULES)
def test_loss_weight_is_minus_alpha_prime_over_one_minus_alpha(schedule):
    t = torch.linspace(0.05, 1.0, 20, dtype=torch.float64, requires_grad=True)
    a = F.alpha(t, schedule)
    (grad,) = torch.autograd.grad(a.sum(), t)
    assert torch.allclose(F.loss_weight(t.detach(), schedule), -grad / (1 - a.detach()))
    assert float(F.alpha(torch.tensor(0.0), schedule)) == pytest.approx(1.0)
    assert float(F.alpha(torch.tensor(1.0), schedule)) == pytest.approx(0.0, abs=1e-7)


def test_the_cosine_weight_is_finite_and_accurate_for_small_times_in_float32():
    """(pi/2) sin / (1 - cos) cancelled to inf in float32 below t = 1.5e-4 (the model draws t down to ~6e-8) and
    was 7% off at 3e-4; a cosine run's loss was not finite in 27 of 200 batches."""
    t = torch.tensor([6e-8, 1e-7, 1.5e-4, 3e-4, 1e-3, 0.5, 1.0])
    half = [0.5 * math.pi * u for u in t.double().tolist()]
    exact = [math.pi / u if u < 1e-6 else  # there 1 - cos cancels in float64 too; (pi/2) cot(u/2) ~ pi/u = 2/t
             0.5 * math.pi * math.sin(u) / (1 - math.cos(u)) for u in half]
    got = F.loss_weight(t, "cosine")
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), torch.tensor(exact, dtype=torch.float64), rtol=1e-6, atol=0)
    assert F.loss_weight(1e-7, "cosine") == pytest.approx(2e7, rel=1e-6)  # ~ 2 / t as t -> 0


def test_a_cosine_model_has_a_finite_loss_on_every_batch():
    model = tiny(vocab=8, length=16, schedule="cosine")
    ids = torch.randint(0, 8, (64, 16), generator=torch.Generator().manual_seed(0))
    losses = torch.stack([model(ids, generator=torch.Generator().manual_seed(i)) for i in range(100)])  # (100, 64)
    assert torch.isfinite(losses).all()


def test_masked_nll_ignores_the_weight_of_unmasked_tokens_even_an_infinite_one():
    logits = torch.zeros(1, 3, 4)
    targets, masked = torch.tensor([[0, 1, 2]]), torch.tensor([[True, False, True]])
    weight = torch.tensor([[1.0, float("inf"), 2.0]])  # inf * 0 made the row nan
    logits.requires_grad_(True)
    loss = F.masked_nll(logits, targets, masked, weight)
    assert torch.equal(loss.detach(), torch.tensor([3 * math.log(4)]))
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.equal(logits.grad[0, 1], torch.zeros(4))


def test_denoise_step_only_reveals_masks_and_reveals_all_at_time_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([[9, 1, 9, 2, 9, 9]])
    proposal = torch.tensor([[5, 6, 7, 8, 5, 6]])
    mid = F.denoise_step(x, proposal, 1.0, 0.5, mask_id=9, generator=g)
    assert torch.equal(mid[x != 9], x[x != 9])
    assert torch.equal(F.denoise_step(x, proposal, 0.5, 0.0, mask_id=9, generator=g),
                       torch.tensor([[5, 1, 7, 2, 5, 6]]))


def test_block_attention_mask_at_both_ends():
    m1 = F.block_attention_mask(4, 1)  # blocks of 1: a noisy token sees itself and the clean past
    assert torch.equal(m1[:4, :4], torch.eye(4, dtype=torch.bool))
    assert torch.equal(m1[:4, 4:], torch.ones(4, 4, dtype=torch.bool).tril(-1))
    assert torch.equal(m1[4:, 4:], torch.ones(4, 4, dtype=torch.bool).tril())
    assert not m1[4:, :4].any()
    mL = F.block_attention_mask(4, 4)  # one block: the noisy copy sees only itself
    assert mL[:4, :4].all() and not mL[:4, 4:].any()
    with pytest.raises(ValueError, match="positive divisor"):
        F.block_spans(6, 4)


# -- the bound -----------------------------------------------------------------------------------------------


def any_order_log_prob(model: DiffusionLM, x: torch.Tensor, block_size: int) -> float:
    """log p(x) of the sampler with infinitely many steps: inside each block the tokens are revealed one at a time
    in a uniformly random order, so p is the average over orders of the product of the revealed tokens' model
    probabilities (each block given the clean blocks before it)."""
    L, total = x.shape[0], 0.0
    for s, e in F.block_spans(L, block_size):
        probs = []
        for order in itertools.permutations(range(s, e)):
            state = x.clone()
            state[s:e] = model.mask_id
            logp = 0.0
            for i in order:
                logits = model._denoiser_logits(state[None], x[None], block_size)[0, i]  # (V+1,)
                logp += float(torch.log_softmax(logits, -1)[x[i]])
                state[i] = x[i]
            probs.append(math.exp(logp))
        total += math.log(sum(probs) / len(probs))
    return total


@pytest.mark.parametrize("block_size", [4, 2, 1])
def test_the_bound_is_an_upper_bound_on_the_exact_nll_of_a_tiny_model(block_size):
    model = tiny(vocab=2, length=4)
    xs = torch.tensor(list(itertools.product(range(2), repeat=4)))  # (16, 4): every sequence
    with torch.no_grad():
        nll = torch.tensor([-any_order_log_prob(model, x, block_size) for x in xs]) / 4  # nats per token
        bound = model.exact_nll_bound(xs, block_size=block_size).float()
    assert float(torch.exp(-4 * nll).sum()) == pytest.approx(1.0, abs=1e-5)  # a distribution over all 16
    assert (bound >= nll - 1e-5).all()
    if block_size == 1:  # one order only: the bound is the exact NLL
        assert torch.allclose(bound, nll, atol=1e-5)
    else:
        assert float((bound - nll).mean()) > 1e-3


def test_the_sampled_bound_estimates_the_exact_one():
    model = tiny(vocab=3, length=4)
    xs = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0], [1, 0, 0, 1]])
    for b in (4, 2):
        exact = float(model.exact_nll_bound(xs, block_size=b).mean())
        est = model.nll_bound(xs.repeat(2000, 1), block_size=b, samples=1, batch_size=6000,
                              generator=torch.Generator().manual_seed(0))
        assert est == pytest.approx(exact, rel=0.05)


def test_nll_bound_takes_a_text_and_cuts_it_into_windows():
    model = tiny(vocab=3, length=4)
    text = torch.tensor([0, 1, 2, 0, 2, 2, 1, 0, 1])  # two windows and a leftover
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert model.nll_bound(text, generator=g()) == model.nll_bound(text[:8].view(2, 4), generator=g())


def test_nll_bound_leaves_a_training_model_in_training_mode():
    """The bound evaluates in eval mode but must hand the model back as it found it, dropout on."""
    model = tiny().train()
    model.nll_bound(torch.randint(0, 3, (2, 4)), samples=1)
    assert model.training


def test_nll_bound_averages_over_the_samples():
    """Two samples give the mean of the two one-sample bounds, not their sum."""
    model, ids = tiny(), torch.randint(0, 3, (3, 4), generator=torch.Generator().manual_seed(1))
    two = model.nll_bound(ids, samples=2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the same draws, one sample at a time
    one_by_one = (model.nll_bound(ids, samples=1, generator=g) + model.nll_bound(ids, samples=1, generator=g)) / 2
    assert two == pytest.approx(one_by_one, abs=1e-5)


# -- generation ----------------------------------------------------------------------------------------------


def test_block_size_one_reveals_left_to_right_one_token_per_pass():
    model = tiny(vocab=5, length=8)
    _, states = model.generate(3, 8, steps=8, block_size=1, return_states=True,
                               generator=torch.Generator().manual_seed(0))
    revealed = states != model.mask_id  # (9, 3, 8)
    for k in range(9):
        assert revealed[k].equal(torch.arange(8).expand(3, 8) < k)


def test_block_size_one_greedy_is_greedy_left_to_right_decoding():
    model = tiny(vocab=5, length=6)
    out = model.generate(2, 6, steps=6, block_size=1, sampling=GREEDY)
    for i in range(6):  # each token is the argmax given the clean tokens before it and a mask at its place
        x_t = out.clone()
        x_t[:, i:] = model.mask_id
        logits = model._denoiser_logits(x_t, out, 1)[:, i]  # (2, V+1)
        assert torch.equal(logits.argmax(-1), out[:, i])


def test_blocks_finish_left_to_right():
    model = tiny(vocab=5, length=8)
    _, states = model.generate(2, 8, steps=8, block_size=4, return_states=True,
                               generator=torch.Generator().manual_seed(1))
    done = (states != model.mask_id).all(dim=1)  # (9, 8): revealed in every row
    assert not (states[1:5, :, 4:] != model.mask_id).any()  # block 2 untouched during block 1's passes
    assert done[4, :4].all() and done[8].all()


@pytest.mark.parametrize("block_size,steps", [(None, 4), (8, 12), (4, 4), (2, 8), (1, 8), (2, 12)])
def test_cached_block_wise_generation_agrees_with_the_uncached_path(block_size, steps):
    model = tiny(vocab=7, length=8)
    kw = dict(steps=steps, block_size=block_size, return_states=True)
    a = model.generate(3, 8, generator=torch.Generator().manual_seed(5), **kw)
    b = model.generate(3, 8, generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[0] < model.config.vocab_size).all()  # no mask left, never a mask proposed


def test_logits_take_a_pass_that_fills_the_cache_to_its_end():
    """A pass that exactly fills the KV cache fits; only one past its end is refused."""
    model = tiny()
    c = model.gpt.config
    cache = KVCache(c.n_layer, 1, c.n_head, 4, c.head_dim)
    out = model.logits(torch.tensor([[0, 1, 2, 3]]), torch.arange(4), cache=cache)
    assert out.shape == (1, 4, 4)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("block_size,steps", [(None, 1), (None, 5), (4, 2), (4, 6), (1, 8), (2, 16)])
def test_generation_takes_exactly_steps_passes(block_size, steps, use_cache):
    model = tiny(vocab=5, length=8)
    passes = count_forward_passes(model, lambda: model.generate(2, 8, steps=steps, block_size=block_size,
                                                                use_cache=use_cache))
    assert passes == steps


def test_generation_is_seeded():
    model = tiny(vocab=7, length=8)
    run = lambda s: model.generate(4, 8, steps=4, generator=torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_bad_arguments_give_clear_errors():
    model = tiny(vocab=5, length=8)
    with pytest.raises(ValueError, match=r"steps \(6\) must be a multiple of the number of blocks \(4"):
        model.generate(1, 8, steps=6, block_size=2)
    with pytest.raises(ValueError, match=r"block_size \(3\) must divide the sequence length \(8\)"):
        model.generate(1, 8, steps=8, block_size=3)
    with pytest.raises(ValueError, match="length must be"):
        model.generate(1, 9, steps=9)
    with pytest.raises(ValueError, match="steps must be"):
        model.generate(1, 8, steps=0)
    with pytest.raises(ValueError, match="n must be"):
        model.generate(0, 8, steps=2)
    with pytest.raises(TypeError, match="steps"):
        model.generate(1, 8, steps=2.0)
    with pytest.raises(ValueError, match="ids"):
        model.nll_bound(torch.tensor([[0, 1, 5, 0]]))
    with pytest.raises(ValueError, match="fewer than one window"):
        model.nll_bound(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="over 12"):
        tiny(vocab=2, length=16).exact_nll_bound(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="schedule must be one of"):
        DiffusionLMConfig(schedule="square")
    with pytest.raises(ValueError, match="neither 0 nor a divisor"):
        DiffusionLMConfig(length=8, train_block_sizes=(3,))


def test_training_lowers_the_loss_and_the_trainer_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "dlm.safetensors"
    assert train_main(["--steps", "3", "--batch-size", "2", "--no-progress", "--threads", "1", "--out", str(out)]) == 0
    model, tok = load_with_tokenizer(out, kind="diffusion_lm")
    assert isinstance(model, DiffusionLM) and isinstance(tok, CharTokenizer)
    assert model.generate(1, 16, steps=4).shape == (1, 16)
    # a few steps on one batch lower the full and the block-wise loss
    torch.manual_seed(0)
    model = tiny(vocab=5, length=6)
    model.train()
    x = torch.randint(0, 5, (8, 6))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [model.exact_nll_bound(x, block_size=b).mean() for b in (6, 2)]
    for step in range(30):
        loss = model(x, block_size=(6, 2)[step % 2], generator=torch.Generator().manual_seed(step)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = [model.exact_nll_bound(x, block_size=b).mean() for b in (6, 2)]
    assert all(a < b for a, b in zip(after, before))


def test_init_continues_from_a_checkpoint_and_records_the_chain(tmp_path):
    """``--init`` starts from the saved weights (a near-zero learning rate leaves them as they were; the same run
    without it does not), ``--train-blocks`` replaces the block sizes, and the record adds up the chain."""
    from ar_course import checkpoint

    def run(out: str, *extra: str) -> dict:
        argv = ["--steps", "2", "--batch-size", "2", "--eval-every", "1", "--no-progress", "--threads", "1",
                "--float32", "--out", str(tmp_path / out), *extra]
        assert train_main(argv) == 0
        return checkpoint.info(tmp_path / out)

    def weights(name: str) -> dict:
        return checkpoint.load(tmp_path / name).state_dict()

    first = run("a.safetensors")
    second = run("b.safetensors", "--init", str(tmp_path / "a.safetensors"), "--lr", "1e-12", "--seed", "1",
                 "--train-blocks", "0,16")
    run("fresh.safetensors", "--lr", "1e-12", "--seed", "1", "--train-blocks", "0,16")
    a, b, fresh = weights("a.safetensors"), weights("b.safetensors"), weights("fresh.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], fresh[k], atol=1e-3) for k in a)
    assert first.get("init_steps") is None and second["init"] == "a.safetensors"  # its name: no folder of this machine
    assert second["init_steps"] == 2 and second["config"]["train_block_sizes"] == [0, 16]
    assert [e["step"] for e in second["evals"]] == [1, 2, 3, 4] and second["evals"][:2] == first["evals"]
    third = run("c.safetensors", "--init", str(tmp_path / "b.safetensors"))
    assert third["init_steps"] == 4 and [e["step"] for e in third["evals"]] == [1, 2, 3, 4, 5, 6]
    assert third["config"]["train_block_sizes"] == [0, 0, 1, 4, 16]  # the preset's again, unless given


def test_own_text_trains_with_its_own_tokenizer_and_validation_ids():
    """A tokenizer of your own sets the vocabulary and comes back in info; without it, own ids had the course's
    96-character vocabulary and tokenizer, and were evaluated on the course corpus (audit 29)."""
    from dataclasses import replace

    from ar_course.diffusion_lm.train import PRESETS, train_diffusion_lm

    text = "caf\u00e9 na\u00efve \u00c5ngstr\u00f6m, co\u00f6perate; " * 120
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    preset = replace(PRESETS["small"], batch_size=2, steps=2)
    model, info = train_diffusion_lm(preset, progress=False, eval_every=1, train_ids=ids[:2000],
                                     val_ids=ids[2000:], tokenizer=tok)
    assert info["tokenizer"] is tok and model.config.vocab_size == tok.vocab_size < 96
    assert info["val_ids"] is not None and len(info["history"].evals) == 2
    with pytest.raises(ValueError, match="tokenizer is for text of your own: give train_ids"):
        train_diffusion_lm(preset, progress=False, tokenizer=tok)
    with pytest.raises(ValueError, match="eval_every and keep_best evaluate on val_ids"):
        train_diffusion_lm(preset, progress=False, eval_every=1, train_ids=ids)
    with pytest.raises(ValueError, match=r"train_ids must lie in \[0, 1\]"):
        train_diffusion_lm(preset, progress=False, train_ids=ids, tokenizer=CharTokenizer.from_text("ab"))


def test_init_refuses_another_kind_or_shape(tmp_path, capsys):
    from ar_course.checkpoint import save_checkpoint

    other = DiffusionLM(DiffusionLMConfig(vocab_size=len(load_with_tokenizer("diffusion_lm")[1].chars), n_embd=64))
    save_checkpoint(tmp_path / "narrow.safetensors", other.state_dict(), other.config, kind="diffusion_lm",
                    steps=1)
    for init, message in (("lm_small", "holds a 'lm' checkpoint, expected 'diffusion_lm'"),
                          (str(tmp_path / "narrow.safetensors"), "is not the preset's"),
                          (str(tmp_path / "missing.safetensors"), "missing.safetensors")):
        argv = ["train", "diffusion_lm", "--init", init, "--steps", "1", "--no-progress",
                "--out", str(tmp_path / "x.safetensors")]
        assert cli_main(argv) == (1 if "narrow" in init else 2)  # a file of the wrong kind or none: a usage error
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x.safetensors").exists()


def test_the_shipped_text_models_are_what_their_documented_runs_train():
    """chapter 08 compares `diffusion_lm` with `lm_small`: their checkpoints record the runs documented in
    `ar_course.diffusion_lm.train` (AR: the `small` preset; diffusion: the `small` preset's 40,000 steps, then a
    second schedule of 28,000 full-sequence steps from it), with a validation curve each."""
    from ar_course import checkpoint
    from ar_course.diffusion_lm.train import PRESETS as DIFFUSION
    from ar_course.transformer.train import PRESETS as AR

    dlm, ar = checkpoint.info("diffusion_lm"), checkpoint.info("lm_small")
    preset = AR["small"]
    assert (ar["preset"], ar["seed"], ar["steps"], ar["batch_size"], ar["lr"]) == (
        "small", 0, preset.steps, preset.batch_size, preset.lr) == ("small", 0, 1_500, 16, 2e-3)
    assert ar["tokens_seen"] == preset.steps * preset.batch_size * ar["seq_len"]
    assert ar["evals"][-1]["step"] == preset.steps and ar.get("best_step") is None
    first = DIFFUSION["small"]
    assert (dlm["init_steps"], first.steps, first.batch_size, first.lr) == (40_000, 40_000, 16, 2e-3)
    assert (dlm["preset"], dlm["seed"], dlm["steps"], dlm["batch_size"], dlm["lr"]) == ("small", 1, 28_000, 16, 1e-3)
    assert dlm["config"]["train_block_sizes"] == [0] and dlm.get("best_step") is None
    assert dlm["tokens_seen"] == 28_000 * 16 * dlm["seq_len"] and dlm["seq_len"] == ar["seq_len"] == 64
    steps = [e["step"] for e in dlm["evals"]]
    assert steps == sorted(steps) and 40_000 in steps and steps[-1] == 68_000


def test_mask_tokens_masks_where_the_noise_equals_the_kept_probability():
    """A token is masked when its uniform draw is at least alpha(t): at t = 1 (alpha = 0) a draw of 0 masks."""
    x, masked = F.mask_tokens(torch.tensor([[1, 2, 3]]), torch.tensor(1.0), 9, noise=torch.zeros(1, 3))
    assert bool(masked.all()) and bool((x == 9).all())


def test_unmask_probability_values_of_both_schedules():
    """(alpha(s) - alpha(t)) / (1 - alpha(t)): linear alpha = 1 - t gives (t - s) / t."""
    t, s = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    assert float(F.unmask_probability(t, s)) == 0.5
    assert float(F.unmask_probability(torch.tensor(0.8), torch.tensor(0.2))) == pytest.approx(0.75, abs=1e-6)
    alpha = lambda u: math.cos(u * math.pi / 2)  # noqa: E731  (the cosine schedule)
    assert float(F.unmask_probability(t, s, "cosine")) == pytest.approx((alpha(0.5) - alpha(1.0)) / (1 - alpha(1.0)))


def test_the_training_loss_draws_times_in_0_1_as_one_minus_a_uniform():
    """The loss of one full-sequence row, rebuilt by hand from the same generator: t = 1 - u lies in (0, 1] (t = u
    could be 0, whose weight 1/t is infinite)."""
    model, ids = tiny(length=4), torch.tensor([[0, 1, 2, 1]])
    got = model(ids, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = (1.0 - torch.rand((), generator=g)).expand(1, 4)  # one row, one block
    x_t, masked = F.mask_tokens(ids, t, model.mask_id, noise=torch.rand((1, 4), generator=g))
    logits = model.logits(x_t, torch.arange(4))
    torch.testing.assert_close(got, F.masked_nll(logits, ids, masked, F.loss_weight(t)) / 4)


def test_load_pretrained_is_the_shipped_checkpoint_and_refuses_other_kinds():
    """diffusion_lm.load_pretrained as each image package has one (audit 30): the shipped checkpoint, in eval mode,
    with its character tokenizer; another kind of checkpoint is named."""
    from ar_course import checkpoint
    from ar_course.checkpoint import CheckpointError
    from ar_course.data import CharTokenizer
    from ar_course.diffusion_lm import load_pretrained

    model, tok = load_pretrained()
    want, want_tok = checkpoint.load_with_tokenizer("diffusion_lm", kind="diffusion_lm")
    assert isinstance(model, DiffusionLM) and not model.training and isinstance(tok, CharTokenizer)
    assert tok.chars == want_tok.chars
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
    with pytest.raises(CheckpointError, match="holds a 'lm' checkpoint, expected 'diffusion_lm'"):
        load_pretrained(path="lm_small")
