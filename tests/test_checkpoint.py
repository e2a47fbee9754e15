"""The one loader: shipped names, the kind registry, one strict config rule, clear errors, and set_attention
recorded in saved checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ar_course import checkpoint
from ar_course.checkpoint import CheckpointError, config_from_dict, load, load_with_tokenizer, save_checkpoint
from ar_course.continuous import ContinuousAR, ContinuousARConfig
from ar_course.data import CharTokenizer
from ar_course.diffusion_lm import DiffusionLM, DiffusionLMConfig
from ar_course.masked import MaskGIT
from ar_course.metrics import Classifier, ClassifierConfig
from ar_course.tokenizers import VQVAE, VQVAEConfig
from ar_course.transformer import GPT, GPTConfig, SelfAttention, plain_attention, set_attention
from ar_course.var import VAR, VARConfig

SHIPPED = {"ar_mnist": ("raster_ar", GPT), "ar_mnist_draft": ("raster_ar", GPT), "ar_mnist_cca": ("raster_ar", GPT),
           "ar_mnist_grpo": ("raster_ar", GPT),
           "classifier_mnist": ("classifier", Classifier), "classifier_shapes": ("classifier", Classifier),
           "diffusion_lm": ("diffusion_lm", DiffusionLM), "lm_small": ("lm", GPT),
           "lm_draft": ("lm", GPT), "lm_target": ("lm", GPT), "tokenizer_mnist_msvq": ("tokenizer", VQVAE),
           "tokenizer_mnist_vq": ("tokenizer", VQVAE), "var_mnist": ("var", VAR), "var_mnist_cca": ("var", VAR),
           "maskgit_mnist": ("maskgit", MaskGIT),
           "continuous_ar_mnist": ("continuous_ar", ContinuousAR), "tokenizer_mnist_kl": ("tokenizer", VQVAE)}
CONFIGS = [GPTConfig, VARConfig, VQVAEConfig, ClassifierConfig, DiffusionLMConfig, ContinuousARConfig]


def test_available_lists_every_shipped_checkpoint_in_the_one_assets_folder():
    assert checkpoint.available() == sorted(SHIPPED)
    assert all((checkpoint.ASSETS / f"{name}.safetensors").is_file() for name in SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_checkpoint_loads_through_the_registry(name):
    kind, cls = SHIPPED[name]
    model = load(name, kind=kind)
    assert type(model) is cls and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float16 files load into float32 modules
    info = checkpoint.info(name)
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()}  # JSON: tuples -> lists
    assert info["kind"] == kind and stored.items() <= dataclasses.asdict(model.config).items()


def test_load_with_tokenizer_gives_the_recorded_tokenizer():
    var, tok = load_with_tokenizer("var_mnist")
    assert isinstance(var, VAR) and tok.config.quantizer == "msvq"
    ar, tok = load_with_tokenizer("ar_mnist")
    assert isinstance(ar, GPT) and tok.config.quantizer == "vq"
    lm, chars = load_with_tokenizer("lm_draft")
    assert isinstance(lm, GPT) and isinstance(chars, CharTokenizer) and chars.vocab_size == lm.config.vocab_size
    with pytest.raises(CheckpointError, match="records no tokenizer"):
        load_with_tokenizer("classifier_mnist")


def test_aliases_paths_and_unknown_names():
    assert checkpoint.resolve("mnist_vq") == checkpoint.ASSETS / "tokenizer_mnist_vq.safetensors"
    assert checkpoint.resolve(checkpoint.ASSETS / "var_mnist.safetensors").name == "var_mnist.safetensors"
    with pytest.raises(CheckpointError, match="unknown checkpoint name 'var_cifar'.*var_mnist"):
        load("var_cifar")
    with pytest.raises(CheckpointError, match="no checkpoint at nowhere/x.safetensors"):
        load("nowhere/x.safetensors")
    with pytest.raises(CheckpointError, match="holds a 'raster_ar' checkpoint, expected 'var'"):
        load("ar_mnist", kind="var")


@pytest.mark.parametrize("cls", CONFIGS)
def test_one_strict_config_rule(cls):
    default = cls()
    assert config_from_dict(cls, {}) == default  # missing keys take their defaults
    stored = json.loads(json.dumps(dataclasses.asdict(default)))
    assert config_from_dict(cls, stored) == default
    with pytest.raises(ValueError, match=rf"unknown {cls.__name__} field\(s\) \['colour'\]"):
        config_from_dict(cls, {**stored, "colour": "red"})
    if hasattr(cls, "from_dict"):
        with pytest.raises(ValueError, match="colour"):
            cls.from_dict({"colour": "red"})


def _rewrite_config(src, dst, **changes):
    """A copy of checkpoint ``src`` whose stored config has ``changes`` applied."""
    state, meta = checkpoint.load_checkpoint(src)
    with safe_open(str(src), framework="pt") as f:
        raw = dict(f.metadata())
    raw["config"] = json.dumps({**meta["config"], **changes})
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst), metadata=raw)
    return dst


def test_a_checkpoint_with_an_unknown_config_key_names_the_file_and_the_key(tmp_path):
    bad = _rewrite_config(checkpoint.resolve("var_mnist"), tmp_path / "var.safetensors", colour="red")
    with pytest.raises(CheckpointError, match=r"var.safetensors: its 'var' config .*\['colour'\]"):
        load(bad)


def test_an_unknown_kind_and_a_registered_one(tmp_path):
    @dataclasses.dataclass
    class TinyConfig:
        width: int = 3

    class Tiny(torch.nn.Module):
        def __init__(self, config: TinyConfig) -> None:
            super().__init__()
            self.config, self.lin = config, torch.nn.Linear(config.width, 1)

    model = Tiny(TinyConfig(width=5))
    path = save_checkpoint(tmp_path / "tiny.safetensors", model, model.config, kind="tiny")
    with pytest.raises(CheckpointError, match="'tiny' checkpoint, which load\\(\\) does not know"):
        load(path)
    checkpoint.register_kind("tiny", Tiny, TinyConfig)
    try:
        loaded = load(path, kind="tiny")
        assert loaded.config == TinyConfig(width=5) and torch.equal(loaded.lin.weight, model.lin.weight)
    finally:
        del checkpoint.KINDS["tiny"]


@pytest.mark.parametrize("make", [
    lambda: GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)),
    lambda: VAR(VARConfig(vocab_size=11, latent_dim=4, scales=(1, 2), n_layer=1, n_head=2, n_embd=16)),
])
def test_set_attention_is_recorded_in_a_saved_checkpoint(tmp_path, make):
    model = make()
    set_attention(model, "plain")
    assert model.config.attn == "plain"
    kind = "var" if isinstance(model, VAR) else "lm"
    loaded = load(save_checkpoint(tmp_path / "m.safetensors", model, model.config, kind=kind))
    impls = {m.attention for m in loaded.modules() if isinstance(m, SelfAttention)}
    assert loaded.config.attn == "plain" and impls == {plain_attention}
