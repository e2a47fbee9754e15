"""Chapter 11 on VAR: pyramid log-probabilities against VAR's loss and a hand-computed token, the one CCA loop
with VAR's log-probabilities (direction of one run, determinism), ``train cca --model var``, and the shipped
``var_mnist_cca`` through the common loader and the Generator."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from ar_course import checkpoint, var
from ar_course.align import CCAConfig, cca_step, pyramid_log_probs, pyramid_token_log_probs, train_cca, var_log_probs
from ar_course.var import functional as var_ref
from ar_course.var.functional import flatten_pyramids, unflatten_pyramids


@pytest.fixture(scope="module")
def shipped():
    return var.load_pretrained()


def _pyramids(vq, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vq.num_codes, (n, s, s), generator=g) for s in vq.scales]


def test_pyramid_log_probs_are_minus_vars_loss_and_match_a_token_computed_by_hand(shipped):
    model, tokenizer = shipped
    vq = tokenizer.quantizer
    pyramid, classes = _pyramids(vq, 3), torch.tensor([2, 5, 10])  # 10: the null class
    logp = pyramid_token_log_probs(model, vq, pyramid, classes).detach()
    assert logp.shape == (3, model.config.num_tokens) and bool((logp <= 0).all())
    with torch.no_grad():
        loss, _ = model.loss(vq, pyramid, classes, p_uncond=0.0)
    assert float(-logp.mean()) == pytest.approx(float(loss), rel=1e-5)
    assert torch.allclose(pyramid_log_probs(model, vq, pyramid, classes), logp.sum(1))
    # by hand, through the KV-cache path: scale 0 from the start token, then the second token of scale 1
    with torch.no_grad():
        cache = model.make_cache(3)
        first = torch.log_softmax(model.step(0, None, classes, cache), -1)  # (3, 1, V)
        _, x = var_ref.scale_step(vq, None, 0, pyramid[0].flatten(1))
        second = torch.log_softmax(model.step(1, x, classes, cache), -1)  # (3, 4, V)
    for b in range(3):
        assert float(logp[b, 0]) == pytest.approx(float(first[b, 0, pyramid[0][b, 0, 0]]), abs=1e-4)
        assert float(logp[b, 2]) == pytest.approx(float(second[b, 1, pyramid[1][b, 0, 1]]), abs=1e-4)


def _tiny_var(vq) -> var.VAR:
    torch.manual_seed(5)
    return var.VAR(var.VARConfig(vocab_size=vq.num_codes, latent_dim=vq.dim, scales=tuple(vq.scales), n_layer=1,
                                 n_head=2, n_embd=16))


def test_cca_step_on_the_var_raises_the_positive_log_ratio_and_lowers_the_negative_one(shipped):
    model, tokenizer = shipped
    vq = tokenizer.quantizer
    policy, reference = copy.deepcopy(model), copy.deepcopy(model)
    from ar_course.data import load_mnist
    from ar_course.var.train import encode_pyramids

    images, labels = load_mnist("test", size=32)
    tokens, classes = flatten_pyramids(encode_pyramids(tokenizer, images[:4])), labels[:4]  # real digits
    negatives = (classes + 5) % 10
    log_probs, config = var_log_probs(vq), CCAConfig(lr=1e-4)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    steps = [cca_step(policy, reference, tokens, classes, negatives, optimizer, config, log_probs) for _ in range(4)]
    assert steps[0][1:] == (0.0, 0.0)  # the first step starts at the reference
    with torch.no_grad():
        pos = log_probs(policy, tokens, classes) - log_probs(reference, tokens, classes)  # (4,)
        neg = log_probs(policy, tokens, negatives) - log_probs(reference, tokens, negatives)  # (4,)
    assert float(pos.mean()) > steps[-1][1] > 0 > steps[-1][2] > float(neg.mean())
    assert [s[0] for s in steps] == sorted((s[0] for s in steps), reverse=True)  # the loss goes down


def test_var_cca_training_is_deterministic_under_its_seed_and_checks_its_data(shipped):
    vq = shipped[1].quantizer
    tokens, labels = flatten_pyramids(_pyramids(vq, 10, seed=2)), torch.arange(10)
    runs = []
    for _ in range(2):
        policy = _tiny_var(vq)
        log = train_cca(policy, copy.deepcopy(policy), tokens, labels, CCAConfig(steps=3, batch_size=4, seed=7),
                        progress=False, log_probs=var_log_probs(vq))
        runs.append((log.loss, policy.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert any(not torch.equal(runs[0][1][k], v) for k, v in _tiny_var(vq).state_dict().items())  # it trained
    assert [torch.equal(a, b) for a, b in zip(unflatten_pyramids(tokens, tuple(vq.scales)),
                                             _pyramids(vq, 10, seed=2))] == [True] * len(vq.scales)
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        train_cca(policy, policy, tokens[:, None], labels, log_probs=var_log_probs(vq), progress=False)


def test_train_cca_model_var_writes_a_var_checkpoint_and_rejects_an_unknown_model(tmp_path, capsys):
    from ar_course.cli import main as cli_main
    from ar_course.system import Generator

    out = tmp_path / "var_cca.safetensors"
    assert cli_main(["train", "cca", "--model", "var", "--steps", "1", "--batch-size", "4", "--train-images", "40",
                     "--eval-per-class", "0", "--device", "cpu", "--out", str(out)]) == 0
    info = checkpoint.info(out)
    assert info["kind"] == var.CHECKPOINT_KIND and info["method"] == "cca" and info["base"] == "var_mnist"
    assert info["tokenizer"] == "mnist_msvq" and info["options"]["steps"] == 1
    assert (info["options"]["lr"], info["options"]["lam"]) == (3e-4, 3.0)  # VAR's own defaults; the raster
    # model's stay CCAConfig's (the shipped ar_mnist_cca was made with them)
    raster_out = tmp_path / "ar_cca.safetensors"
    assert cli_main(["train", "cca", "--steps", "1", "--batch-size", "2", "--train-images", "10",
                     "--eval-per-class", "0", "--device", "cpu", "--out", str(raster_out)]) == 0
    assert checkpoint.info(raster_out)["options"] == {**dataclasses.asdict(CCAConfig()), "steps": 1, "batch_size": 2}
    gen = Generator.from_checkpoints(var_path=out, device="cpu")
    assert gen.generate([3, 7], method="var", cfg=0.0, seed=0).images.shape == (2, 1, 32, 32)
    capsys.readouterr()
    assert cli_main(["train", "cca", "--model", "maskgit", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "'var'" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["train", "cca", "--model", "var", "--base", "ar_mnist", "--steps", "1",
                     "--out", str(tmp_path / "x.safetensors")]) != 0  # a raster base is not a VAR
    assert "var" in capsys.readouterr().err


def test_shipped_var_cca_loads_through_the_common_loader_and_the_generator():
    from ar_course.system import Generator

    path = checkpoint.resolve("var_mnist_cca")
    info = checkpoint.info(path)
    assert info["kind"] == var.CHECKPOINT_KIND and info["method"] == "cca" and info["tokenizer"] == "mnist_msvq"
    assert path.stat().st_size < 1_000_000
    model, _ = checkpoint.load_with_tokenizer("var_mnist_cca", kind=var.CHECKPOINT_KIND)
    gen, base = (Generator.from_pretrained("mnist", device="cpu", var=v) for v in ("cca", "base"))
    assert gen.var.config == base.var.config == model.config
    assert any(not torch.equal(a, b) for a, b in zip(gen.var.state_dict().values(), base.var.state_dict().values()))
    assert gen.generate([1, 2], method="var", cfg=0.0, seed=0).images.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"unknown VAR model 'grpo' for 'mnist'; choose from \['base', 'cca'\]"):
        Generator.from_pretrained("mnist", device="cpu", var="grpo")


def test_generate_cli_picks_the_aligned_var_model(tmp_path, capsys):
    from ar_course.cli import main as cli_main

    pngs = []
    for name, cfg in (("default", []), ("w0", ["--cfg", "0"]), ("w2", ["--cfg", "2"])):
        out = tmp_path / f"{name}.png"
        assert cli_main(["generate", "--var-model", "cca", "--classes", "4", "7", "--out", str(out), "--device", "cpu",
                         *cfg]) == 0
        pngs.append(out.read_bytes())
    assert pngs[0] == pngs[1] != pngs[2]  # the aligned VAR samples without guidance by default
    capsys.readouterr()
    assert cli_main(["generate", "--method", "ar", "--var-model", "cca", "--out", str(tmp_path / "v.png")]) == 2
    assert "--method var" in capsys.readouterr().err
