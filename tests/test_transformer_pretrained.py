"""The lm trainer and the shipped character-level target/draft pair."""

from __future__ import annotations

import pytest
import torch

from ar_course.checkpoint import CheckpointError
from ar_course.data import load_text_dataset
from ar_course.sampling import GREEDY
from ar_course.transformer import GPT, checkpoint_info, load_pretrained
from ar_course.transformer.train import evaluate_lm, main


@pytest.fixture(scope="module")
def val_ids() -> torch.Tensor:
    return load_text_dataset()[2]


def test_trainer_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "lm.safetensors"
    assert main(["--preset", "tiny", "--steps", "3", "--seed", "1", "--out", str(out), "--no-progress"]) == 0
    assert "saved" in capsys.readouterr().out
    model, tok = load_pretrained(out)
    info = checkpoint_info(out)
    assert isinstance(model, GPT) and not model.training
    assert info["steps"] == 3 and info["seed"] == 1 and info["preset"] == "tiny"
    assert tok.vocab_size == model.config.vocab_size == 96
    # float16 storage: the stored validation loss is that of the rounded weights
    assert abs(evaluate_lm(model, load_text_dataset()[2], 128) - info["val_loss"]) < 1e-3


def test_trainer_help_works(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--preset" in capsys.readouterr().out


def test_checkpoint_info_leaves_out_the_kind_and_the_vocabulary():
    """checkpoint_info gives what the trainer recorded, without the kind and the vocabulary (its docstring)."""
    info = checkpoint_info("lm_target")
    assert "kind" not in info and "vocab" not in info and "config" in info


def test_unknown_checkpoint_name_is_a_clear_error():
    with pytest.raises(CheckpointError, match="lm_target"):
        load_pretrained("lm_nonexistent")


@pytest.mark.parametrize("name", ["lm_target", "lm_draft"])
def test_shipped_models_load_and_generate(name):
    model, tok = load_pretrained(name)
    out = model.generate(tok.encode("The ")[None], 20, sampling=GREEDY)
    assert out.shape == (1, 24)
    assert tok.decode(out[0]).startswith("The ")


def test_shipped_pair_shares_the_tokenizer_and_the_draft_is_much_smaller():
    target, t_tok = load_pretrained("lm_target")
    draft, d_tok = load_pretrained("lm_draft")
    assert t_tok.chars == d_tok.chars
    assert target.config.vocab_size == draft.config.vocab_size
    assert draft.config.n_layer * 4 <= target.config.n_layer
    assert draft.num_params() * 8 < target.num_params()


@pytest.mark.parametrize("name, max_loss", [("lm_target", 1.3), ("lm_draft", 1.9)])
def test_shipped_validation_loss_is_what_the_checkpoint_says(name, max_loss, val_ids):
    model, _ = load_pretrained(name)
    info = checkpoint_info(name)
    assert info["val_loss"] < max_loss
    sub = evaluate_lm(model, val_ids, 384, max_windows=12)
    assert abs(sub - info["val_loss"]) < 0.15  # a 12-window subset of the full validation set
