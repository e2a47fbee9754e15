"""Chapter 03 package: raster flattening, training pairs, condition dropout, guidance, sampling with and
without a KV cache, generation orders, the trainer, and the shipped MNIST model."""

import pytest
import torch

from ar_course import metrics, sampling
from ar_course.sampling import GREEDY, SamplingConfig
from ar_course.checkpoint import load
from ar_course.checks.reference.ch03 import sample_tokens
from ar_course.raster import functional as F_r
from ar_course.raster import model as M
from ar_course.raster import orders
from ar_course.raster.train import encode_dataset, train_ar
from ar_course.tokenizers import VQVAE, VQVAEConfig
from ar_course.transformer import GPT


def tiny_model(seed: int = 0, pos: str = "rope2d", grid=(3, 4), vocab: int = 11) -> GPT:
    torch.manual_seed(seed)
    model = GPT(M.raster_config(vocab, grid, n_classes=5, n_layer=2, n_head=2, n_embd=16, pos=pos))
    with torch.no_grad():  # make the class token matter, so guidance changes something
        model.wce.weight.mul_(50)
    return model.eval()


# ---- raster order -----------------------------------------------------------------------------------------


def test_raster_round_trip_and_order():
    maps = torch.randint(0, 100, (3, 4, 5))
    seq = F_r.to_raster(maps)
    assert seq.shape == (3, 20)
    for i in range(4):
        for j in range(5):
            assert torch.equal(seq[:, i * 5 + j], maps[:, i, j])
    assert torch.equal(F_r.from_raster(seq, 4, 5), maps)


def test_raster_bad_input():
    with pytest.raises(ValueError, match="long"):
        F_r.to_raster(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="tokens"):
        F_r.from_raster(torch.zeros(2, 10, dtype=torch.long), 3, 3)


def test_training_pairs():
    tokens = torch.tensor([[4, 5, 6], [7, 8, 9]])
    inputs, targets = F_r.make_training_pairs(tokens)
    assert torch.equal(inputs, torch.tensor([[4, 5], [7, 8]]))
    assert torch.equal(targets, tokens)
    inputs, targets = F_r.make_training_pairs(torch.tensor([[3]]))  # one token: only the class is read
    assert inputs.shape == (1, 0) and torch.equal(targets, torch.tensor([[3]]))
    with pytest.raises(ValueError, match="no positions"):
        F_r.make_training_pairs(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="long"):
        F_r.make_training_pairs(torch.zeros(2, 3))


def test_training_pairs_fit_the_class_conditional_gpt():
    """The pairs are what GPT(n_classes=...) reads and predicts: logits for every target, the loss of
    raster_loss, and position t of the logits predicting token t from the class and tokens before t."""
    model = tiny_model()
    maps, classes = torch.randint(0, 11, (2, 3, 4)), torch.tensor([1, 4])
    inputs, targets = F_r.make_training_pairs(F_r.to_raster(maps))
    logits, loss = model(inputs, targets=targets, classes=classes)
    assert logits.shape == (2, 12, 11)
    torch.testing.assert_close(loss, M.raster_loss(model, maps, classes))
    prefix, _ = model(inputs[:, :4], classes=classes)  # the class and tokens 0..3 predict tokens 0..4
    torch.testing.assert_close(prefix, logits[:, :5], atol=1e-5, rtol=1e-5)


def test_class_embedding_is_extra_vocabulary_rows():
    """A GPT whose class is an extra vocabulary id ``V + c`` at position 0 computes what GPT(n_classes=...)
    computes with its class-embedding table."""
    model = tiny_model(pos="learned")
    V, C = model.config.vocab_size, model.config.n_classes
    flat = GPT(M.raster_config(V + C + 1, (3, 4), n_classes=0, n_layer=2, n_head=2, n_embd=16, pos="learned"))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("wce", "wte", "lm_head"))}
    emb = torch.cat([model.wte.weight, model.wce.weight])
    flat.load_state_dict({**state, "wte.weight": emb, "lm_head.weight": emb}, strict=True)
    flat.eval()
    tokens, classes = torch.randint(0, V, (2, 12)), torch.tensor([1, 4])
    inputs, _ = F_r.make_training_pairs(tokens)
    logits_flat, _ = flat(torch.cat([(V + classes)[:, None], inputs], dim=1))  # (2, 12): class id, then tokens
    logits, _ = model(inputs, classes=classes)
    torch.testing.assert_close(logits_flat[..., :V], logits, atol=1e-5, rtol=1e-5)


def test_condition_dropout():
    classes = torch.arange(1000) % 10
    assert torch.equal(F_r.condition_dropout(classes, 0.0, 10), classes)
    assert (F_r.condition_dropout(classes, 1.0, 10) == 10).all()
    out = F_r.condition_dropout(classes, 0.1, 10, torch.Generator().manual_seed(0))
    assert 0.07 < (out == 10).float().mean() < 0.13
    kept = out != 10
    assert torch.equal(out[kept], classes[kept])
    assert torch.equal(classes, torch.arange(1000) % 10)  # input untouched
    again = F_r.condition_dropout(classes, 0.1, 10, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="p must"):
        F_r.condition_dropout(classes, 1.5, 10)


def test_condition_dropout_batches_drops_every_class_at_p_one():
    """The trainer's batch stream must apply the dropout, not only validate ``p_uncond``."""
    batches = iter([(torch.zeros(3, 4), torch.tensor([0, 1, 2]))])
    (_, classes), = list(M.condition_dropout_batches(batches, 1.0, null_class=10))
    assert classes.tolist() == [10, 10, 10]


# ---- guidance and sampling --------------------------------------------------------------------------------


def test_guidance_strength_zero_is_conditional_minus_one_is_unconditional():
    model = tiny_model()
    classes = torch.tensor([0, 2, 4])
    null = torch.full_like(classes, model.null_class)
    tokens = torch.randint(0, 11, (3, 5))
    cond, _ = model(tokens, classes=classes)
    uncond, _ = model(tokens, classes=null)
    torch.testing.assert_close(sampling.cfg_mix(cond, uncond, 0.0), cond)
    torch.testing.assert_close(sampling.cfg_mix(cond, uncond, -1.0), uncond)
    assert not torch.allclose(sampling.cfg_mix(cond, uncond, 2.0), cond)
    # end to end: w = -1 samples what the null class samples, a tiny w (greedy) what the class does
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    w_minus_one = M.generate_tokens(model, classes, (3, 4), cfg=-1.0, generator=g())
    un = M.generate_tokens(model, null, (3, 4), generator=g())
    assert torch.equal(w_minus_one, un)
    tiny = M.generate_tokens(model, classes, (3, 4), cfg=1e-9, sampling=GREEDY)
    c0 = M.generate_tokens(model, classes, (3, 4), sampling=GREEDY)
    assert torch.equal(tiny, c0)


def test_guidance_changes_samples():
    model = tiny_model()
    classes = torch.tensor([0, 1, 2, 3, 4] * 4)
    a = M.generate_tokens(model, classes, (3, 4), cfg=0.0, generator=torch.Generator().manual_seed(0))
    b = M.generate_tokens(model, classes, (3, 4), cfg=3.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)


def test_a_learned_position_model_refuses_maps_of_another_grid():
    """A learned table's positions belong to its grid's cells: a 4x4 model sampled 2x2 maps from the first
    four cells of its top row, and a tokenizer of 2x2 maps took them for whole images, without an error.
    raster_config records the grid of a learned model too, and it is refused as for rope2d."""
    model = tiny_model(pos="learned", grid=(4, 4))
    assert model.config.grid == (4, 4)
    with pytest.raises(ValueError, match=r"grid must match the model's 4x4 grid, got \(2, 2\)"):
        M.generate_tokens(model, torch.tensor([1]), (2, 2))
    with pytest.raises(ValueError, match="grid must match the model's 4x4 grid, got \\(2, 8\\)"):
        M.generate_tokens(model, torch.tensor([1]), (2, 8))  # as many cells, another layout
    small = VQVAE(VQVAEConfig(num_codes=11, image_size=8, downsample=4, width=8, latent_dim=4))  # 2x2 maps
    with pytest.raises(ValueError, match="tokenizer maps must match the model's 4x4 grid, got \\(2, 2\\)"):
        M.check_tokenizer(small, model)
    assert M.generate_tokens(model, torch.tensor([1]), (4, 4)).shape == (1, 4, 4)


@pytest.mark.parametrize("pos", ["rope2d", "learned"])
def test_seeded_sampling_reproducible_and_cache_equals_no_cache(pos):
    model = tiny_model(pos=pos)
    classes = torch.tensor([3, 1, 0, 4])
    kw = dict(cfg=1.5, sampling=SamplingConfig(temperature=1.0, top_k=6))
    a = M.generate_tokens(model, classes, (3, 4), generator=torch.Generator().manual_seed(7), **kw)
    b = M.generate_tokens(model, classes, (3, 4), generator=torch.Generator().manual_seed(7), **kw)
    c = M.generate_tokens(model, classes, (3, 4), generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    d = M.generate_tokens(model, classes, (3, 4), generator=torch.Generator().manual_seed(8), **kw)
    assert a.shape == (4, 3, 4) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    assert not torch.equal(a, d)


def test_sample_tokens_is_generate_tokens_in_raster_order():
    model = tiny_model()
    classes = torch.tensor([2, 2, 1])
    top5 = SamplingConfig(top_k=5)
    seq = sample_tokens(model, classes, 12, cfg=1.0, sampling=top5, generator=torch.Generator().manual_seed(1))
    maps = M.generate_tokens(model, classes, (3, 4), cfg=1.0, sampling=top5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(F_r.to_raster(maps), seq)


def test_one_forward_pass_per_token_with_cache():
    model = tiny_model()
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: lengths.append(args[0].shape[1]), with_kwargs=True)
    try:
        M.generate_tokens(model, torch.tensor([0, 1]), (3, 4), cfg=2.0)
    finally:
        hook.remove()
    assert len(lengths) == 12  # one pass per token of the 3x4 map
    assert lengths == [0] + [1] * 11  # the class token alone, then one new token per pass


# ---- losses -----------------------------------------------------------------------------------------------


def test_raster_loss_and_token_losses():
    model = tiny_model()
    maps = torch.randint(0, 11, (4, 3, 4))
    classes = torch.tensor([0, 1, 2, 3])
    loss = M.raster_loss(model, maps, classes)
    per_token = M.token_losses(model, maps, classes)
    assert per_token.shape == (4, 3, 4)
    torch.testing.assert_close(per_token.mean(), loss)
    null = M.raster_loss(model, maps, torch.full_like(classes, model.null_class))
    torch.testing.assert_close(M.raster_loss(model, maps, classes, p_uncond=1.0), null)


def test_raster_config_rejects_bad_pos():
    with pytest.raises(ValueError, match="pos"):
        M.raster_config(16, pos="rope")


# ---- orders -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(8, 8), (3, 5), (1, 1)])
def test_orders_cover_the_map(h, w):
    for order in orders.ORDERS:
        steps = orders.schedule(order, h, w, torch.Generator().manual_seed(0))
        assert len(steps) == orders.num_steps(order, h, w)
        positions = torch.cat(steps)
        assert positions.shape == (h * w, 2)
        assert len({tuple(p) for p in positions.tolist()}) == h * w
        orders.step_map(steps, h, w)


def test_neighbour_order_steps_and_dependencies():
    assert orders.num_steps("neighbour", 8, 8) == 15  # 2n - 1
    assert orders.num_steps("raster", 8, 8) == 64
    step = orders.step_map(orders.schedule("neighbour", 8, 8), 8, 8)
    assert (step[1:, :] > step[:-1, :]).all() and (step[:, 1:] > step[:, :-1]).all()  # up and left come first
    raster = orders.step_map(orders.schedule("raster", 3, 4), 3, 4)
    assert torch.equal(raster.flatten(), torch.arange(12))
    with pytest.raises(ValueError, match="order"):
        orders.num_steps("spiral", 4, 4)


def test_random_order_is_drawn_from_the_generator():
    """The random order depends on the generator passed in only, not on the global random state."""
    torch.manual_seed(1)
    a = orders.schedule("random", 4, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(2)
    b = orders.schedule("random", 4, 4, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- images, trainer, checkpoint ----------------------------------------------------------------------------


def tiny_tokenizer() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(image_size=32, downsample=4, width=4, latent_dim=4, num_codes=16)).eval()


def test_train_generate_save_load(tmp_path):
    from ar_course.checkpoint import load_checkpoint, save_checkpoint

    tok = tiny_tokenizer()
    images = torch.rand(64, 1, 32, 32)
    maps = encode_dataset(tok, images, batch_size=20)
    assert maps.shape == (64, 8, 8) and maps.dtype == torch.long
    labels = torch.arange(64) % 10
    model, history = train_ar(tok, maps, labels, steps=3, batch_size=8, n_layer=1, n_embd=16, n_head=2,
                              progress=False)
    assert len(history.loss) == 3 and model.config.vocab_size == 16 and model.config.block_size == 65
    out = M.generate_images(model, tok, torch.tensor([0, 3, 9]), cfg=1.0, seed=0)
    assert out.shape == (3, 1, 32, 32) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, M.generate_images(model, tok, torch.tensor([0, 3, 9]), cfg=1.0, seed=0))
    assert torch.equal(out, M.generate_images(model, tok, torch.tensor([0, 3, 9]), cfg=1.0, seed=0, cache="static"))
    path = save_checkpoint(tmp_path / "ar.safetensors", {k: v.half() for k, v in model.state_dict().items()},
                           model.config, kind=M.CHECKPOINT_KIND, tokenizer="mnist_vq", steps=3)
    state, _ = load_checkpoint(path)
    rebuilt = GPT(model.config)
    rebuilt.load_state_dict(state)
    assert rebuilt.wte.weight.dtype == torch.float32
    assert M.pretrained_info(path)["steps"] == 3


def test_trainer_help(capsys):
    from ar_course.raster.train import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--steps" in capsys.readouterr().out


shipped = pytest.mark.skipif(not M.PRETRAINED_PATH.exists(), reason="ar_mnist.safetensors not built yet")


@shipped
def test_shipped_model_class_accuracy():
    model, tokenizer = M.load_pretrained()
    info = M.pretrained_info()
    assert M.PRETRAINED_PATH.stat().st_size < 2.5e6
    assert model.config.n_classes == 10 and model.config.block_size == 65
    classes = torch.arange(10).repeat_interleave(10)  # 100 digits
    images = M.generate_images(model, tokenizer, classes, cfg=1.0, seed=0)
    acc = metrics.class_accuracy(images, classes)
    assert acc >= 0.9, (acc, info["accuracy_by_cfg"])  # 0.98 on 200 samples when it was trained


@shipped
def test_shipped_accuracy_by_scale_reads_as_accuracy_by_strength():
    """The shipped checkpoint recorded its accuracy by the scale s = 1 + w; the metadata stays as it was, and
    pretrained_info gives it by the strength w as well."""
    info = M.pretrained_info()
    assert info["accuracy_by_cfg"] == {str(float(s) - 1): acc for s, acc in info["accuracy_by_scale"].items()}
    best_w = max(info["accuracy_by_cfg"], key=info["accuracy_by_cfg"].get)
    assert float(best_w) == 1.0  # s = 2


def test_load_tokenizer_by_path(tmp_path):
    from ar_course.checkpoint import save_checkpoint

    tok = tiny_tokenizer()
    path = save_checkpoint(tmp_path / "tok.safetensors", tok, tok.config, kind="tokenizer")
    loaded = load(path, kind="tokenizer")
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded.encode_to_indices(x), tok.encode_to_indices(x))


def test_a_training_subset_that_misses_a_class_still_conditions_on_every_class():
    """``train ar --train-images 4`` saw labels 0..6 only, built a 7-class model, then failed scoring the test set
    ("classes must lie in [0, 6], got 9"): the trainers take the dataset's class count."""
    from ar_course.masked.train import train_maskgit

    tok = tiny_tokenizer()
    maps = encode_dataset(tok, torch.rand(4, 1, 32, 32))
    labels = torch.tensor([5, 0, 4, 1])
    small = dict(steps=1, batch_size=2, n_layer=1, n_embd=16, n_head=2, progress=False)
    for train in (train_ar, train_maskgit):
        assert train(tok, maps, labels, **small)[0].config.n_classes == 6  # default: the largest label + 1
        model = train(tok, maps, labels, **small, n_classes=10)[0]
        assert model.config.n_classes == 10
        with pytest.raises(ValueError, match=r"^labels must lie in \[0, 4\] \(n_classes=5\), got 5$"):
            train(tok, maps, labels, **small, n_classes=5)
