"""The one loader: shipped names, the kind registry, one strict config rule, clear errors, set_attention
recorded in saved checkpoints, and a recorded tokenizer found from any folder."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ar_course import checkpoint
from ar_course.checkpoint import (
    CheckpointError, config_from_dict, load, load_checkpoint, load_with_tokenizer, recorded_tokenizer, save_checkpoint,
    tokenizer_reference,
)
from ar_course.continuous import ContinuousAR, ContinuousARConfig
from ar_course.data import CharTokenizer
from ar_course.diffusion_lm import DiffusionLM, DiffusionLMConfig
from ar_course.masked import MaskGIT
from ar_course.metrics import Classifier, ClassifierConfig
from ar_course.tokenizers import VQVAE, VQVAEConfig
from ar_course.transformer import GPT, GPTConfig, SelfAttention, plain_attention, set_attention
from ar_course.utils import content_digest
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
    for short in ("mnist_vq", "mnist_msvq", "mnist_kl"):  # every name tokenizers.load_pretrained takes
        assert checkpoint.resolve(short) == checkpoint.ASSETS / f"tokenizer_{short}.safetensors"
    assert checkpoint.resolve(checkpoint.ASSETS / "var_mnist.safetensors").name == "var_mnist.safetensors"
    with pytest.raises(CheckpointError, match="unknown checkpoint name 'var_cifar'.*var_mnist"):
        load("var_cifar")
    with pytest.raises(CheckpointError, match="no checkpoint at nowhere/x.safetensors"):
        load("nowhere/x.safetensors")
    with pytest.raises(CheckpointError, match="holds a 'raster_ar' checkpoint, expected 'var'"):
        load("ar_mnist", kind="var")


def test_a_missing_file_name_with_a_suffix_is_a_missing_path_not_an_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in ("foo.safetensors", Path("foo")):  # a suffix, or a Path: meant as a file here
        with pytest.raises(CheckpointError) as info:
            checkpoint.resolve(missing)
        assert str(info.value) == f"no checkpoint at {missing}"
    with pytest.raises(CheckpointError, match="^unknown checkpoint name 'foo': not a file, and the shipped ones"):
        checkpoint.resolve("foo")
    for read in (checkpoint.resolve, checkpoint.load_checkpoint):  # the two say the same (load_checkpoint said
        with pytest.raises(CheckpointError, match=r"^no checkpoint at foo\.safetensors$"):  # "checkpoint not found")
            read("foo.safetensors")
        with pytest.raises(CheckpointError, match=r"is a folder, expected a \.safetensors file$"):
            read(tmp_path)


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


@pytest.mark.parametrize("change, words", [
    ("missing", r"Missing key\(s\) in state_dict: [\"']norm_f\.weight"),
    ("extra", r"Unexpected key\(s\) in state_dict: [\"']head2\.weight"),
], ids=["missing", "extra"])
def test_weights_with_a_missing_or_an_extra_key_are_refused(tmp_path, change, words):
    """load is strict: a state dict without one of the model's tensors (which would keep its random init) or with
    one the model does not have is a CheckpointError naming the file and the key, not a half-loaded model."""
    config = GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8)
    state = GPT(config).state_dict()
    if change == "missing":
        del state["norm_f.weight"]
    else:
        state["head2.weight"] = torch.zeros(2, 2)
    path = save_checkpoint(tmp_path / "lm.safetensors", state, config, kind="lm")
    with pytest.raises(CheckpointError, match=r"lm\.safetensors does not match the model built from") as info:
        load(path)
    assert re.search(words, str(info.value))


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
        checkpoint.register_kind("tiny", Tiny, TinyConfig)  # a user kind again (a notebook cell re-run): allowed
        loaded = load(path, kind="tiny")
        assert loaded.config == TinyConfig(width=5) and torch.equal(loaded.lin.weight, model.lin.weight)
    finally:
        del checkpoint.KINDS["tiny"]


@dataclasses.dataclass
class OtherConfig:
    width: int = 3


@pytest.mark.parametrize("kind", sorted({kind for kind, _ in SHIPPED.values()}))
def test_register_kind_refuses_to_replace_a_built_in_kind(kind):
    before = dict(checkpoint.KINDS)
    with pytest.raises(ValueError) as info:
        checkpoint.register_kind(kind, torch.nn.Linear, OtherConfig)
    assert str(info.value) == (f"register_kind: {kind!r} is a built-in kind (the library's own checkpoints load "
                               f"with it) and cannot be replaced; register your model under another kind name")
    assert checkpoint.KINDS == before
    if kind == "var":
        assert type(load("var_mnist")) is VAR


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


# -- a recorded tokenizer is found from any folder ------------------------------------------------------------


def _project(folder, tokenizer_record=None):
    """``folder/tok.safetensors`` (the shipped mnist_vq) and ``folder/ar.safetensors``, a tiny raster model that
    records it as ``tokenizer_record`` (default: the trainers' record, :func:`tokenizer_reference`)."""
    folder.mkdir(parents=True)
    shutil.copyfile(checkpoint.resolve("mnist_vq"), folder / "tok.safetensors")
    cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=2, n_embd=32, n_classes=10)
    record = tokenizer_record or tokenizer_reference(folder / "tok.safetensors", folder / "ar.safetensors")
    return save_checkpoint(folder / "ar.safetensors", GPT(cfg), cfg, kind="raster_ar", tokenizer=record)


def test_tokenizer_reference_keeps_names_and_makes_paths_relative_to_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tokenizer_reference("mnist_vq", "runs/ar.safetensors") == "mnist_vq"
    assert tokenizer_reference("tokenizer_mnist_kl", tmp_path / "x.safetensors") == "tokenizer_mnist_kl"
    assert tokenizer_reference("runs/tok.safetensors", "runs/ar.safetensors") == "tok.safetensors"
    assert tokenizer_reference("toks/tok.safetensors", "runs/deep/ar.safetensors") == "../../toks/tok.safetensors"
    assert tokenizer_reference(tmp_path / "tok.safetensors", "ar.safetensors") == "tok.safetensors"
    assert tokenizer_reference(Path("runs/mnist_vq"), "runs/ar.safetensors") == "./mnist_vq"  # a file, not the name
    with pytest.raises(TypeError, match=r"^tokenizer must be a checkpoint name or path \(str or Path\), got None"):
        tokenizer_reference(None, "ar.safetensors")
    with pytest.raises(ValueError, match=r"^output path is empty$"):
        tokenizer_reference("runs/tok.safetensors", "")


def test_a_recorded_tokenizer_path_is_relative_to_the_checkpoint_and_moves_with_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _project(Path("proj"))
    assert checkpoint.info("proj/ar.safetensors")["tokenizer"] == "tok.safetensors"
    monkeypatch.chdir(tmp_path / "proj")  # the folder it was made in, and elsewhere
    assert recorded_tokenizer("ar.safetensors") == Path("tok.safetensors")
    (tmp_path / "proj").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    model, tok = load_with_tokenizer("moved/ar.safetensors")
    assert isinstance(model, GPT) and isinstance(tok, VQVAE) and tok.config.quantizer == "vq"
    assert recorded_tokenizer("moved/ar.safetensors") == Path("moved/tok.safetensors")
    assert recorded_tokenizer("ar_mnist") == "mnist_vq"
    # a fine-tuned copy elsewhere (train grpo / cca) records the base's tokenizer relative to itself
    assert tokenizer_reference(recorded_tokenizer("moved/ar.safetensors"), "out/ft.safetensors") == (
        "../moved/tok.safetensors")


def test_an_older_record_relative_to_the_current_folder_still_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _project(Path("proj"), tokenizer_record="proj/tok.safetensors")  # as trainers recorded --tokenizer before
    assert recorded_tokenizer("proj/ar.safetensors") == Path("proj/tok.safetensors")
    assert isinstance(load_with_tokenizer("proj/ar.safetensors")[1], VQVAE)


def test_the_tokenizer_beside_the_checkpoint_wins_over_one_of_the_same_name_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _project(Path("proj"))  # records "tok.safetensors": proj/tok.safetensors, the VQ tokenizer
    shutil.copyfile(checkpoint.resolve("mnist_msvq"), "tok.safetensors")  # another tokenizer of that name here
    assert recorded_tokenizer("proj/ar.safetensors") == Path("proj/tok.safetensors")
    assert load_with_tokenizer("proj/ar.safetensors")[1].config.quantizer == "vq"


def test_a_missing_recorded_tokenizer_names_the_checkpoint_and_the_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _project(Path("proj"))
    Path("proj/tok.safetensors").unlink()
    message = "proj/ar.safetensors records tokenizer 'tok.safetensors', which is not at proj/tok.safetensors"
    for call in (load_with_tokenizer, recorded_tokenizer):
        with pytest.raises(CheckpointError) as info:
            call("proj/ar.safetensors")
        assert str(info.value) == message
    bad = _project(Path("bad"), tokenizer_record=["tok.safetensors"])  # not a str: a damaged record
    with pytest.raises(CheckpointError) as info:
        load_with_tokenizer(bad)
    assert str(info.value) == ("bad/ar.safetensors records tokenizer ['tok.safetensors'], which is neither a name "
                               "nor a path")


def test_train_ar_records_its_tokenizer_relative_to_out_and_says_when_accuracy_was_not_measured(
        capsys, tmp_path, monkeypatch):
    from cli_helpers import one_torch_thread, run

    monkeypatch.chdir(tmp_path)
    Path("runs").mkdir()
    shutil.copyfile(checkpoint.resolve("mnist_vq"), "runs/tok.safetensors")
    with one_torch_thread():
        status, out, err = run(capsys, "train", "ar", "--steps", "1", "--batch-size", "32", "--train-images", "32",
                               "--n-layer", "1", "--n-embd", "16", "--eval-per-class", "0", "--tokenizer",
                               "runs/tok.safetensors", "--out", "runs/ar.safetensors", "--device", "cpu")
    assert status == 0, err
    assert "; class accuracy by guidance strength not measured (--eval-per-class 0)\n" in out
    assert checkpoint.info("runs/ar.safetensors")["tokenizer"] == "tok.safetensors"
    assert checkpoint.info("runs/ar.safetensors")["tokenizer_digest"] == content_digest(load("mnist_vq"))
    monkeypatch.chdir(tmp_path / "runs")
    assert isinstance(load_with_tokenizer("ar.safetensors")[1], VQVAE)


def test_a_tokenizer_retrained_or_replaced_since_the_model_was_trained_is_refused(tmp_path, monkeypatch):
    """A model records its tokenizer's path; a tokenizer retrained to that path (or another found by the older,
    current-folder rule) decoded the model's codes with another codebook, without an error. The digest of the
    tokenizer's weights recorded beside the path is compared."""
    monkeypatch.chdir(tmp_path)
    Path("proj").mkdir()
    shutil.copyfile(checkpoint.resolve("mnist_vq"), "proj/tok.safetensors")
    cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=2, n_embd=32, n_classes=10)
    record = checkpoint.tokenizer_record(load("proj/tok.safetensors"), "proj/tok.safetensors", "proj/ar.safetensors")
    assert record == {"tokenizer": "tok.safetensors", "tokenizer_digest": content_digest(load("mnist_vq"))}
    save_checkpoint("proj/ar.safetensors", GPT(cfg), cfg, kind="raster_ar", **record)
    assert isinstance(load_with_tokenizer("proj/ar.safetensors")[1], VQVAE)
    other = load("mnist_vq")
    with torch.no_grad():
        other.quantizer.codebook.add_(0.01)  # "retrained": same config and size, other weights
    save_checkpoint("proj/tok.safetensors", other, other.config, kind="tokenizer")
    with pytest.raises(CheckpointError) as info:
        load_with_tokenizer("proj/ar.safetensors")
    assert str(info.value) == ("proj/ar.safetensors was trained with another tokenizer than the one at "
                               "proj/tok.safetensors (retrained or replaced since: its weights differ from those the "
                               "model learned codes of)")


# ------------------------------------------------------------------------------------ hostile checkpoint files

def _tiny_lm(tmp_path: Path, vocab: object = "abcdefgh", changes: dict | None = None,
             tensors: dict | None = None, **metadata: str) -> Path:
    """A tiny 'lm' checkpoint recording ``vocab``, its config fields changed by ``changes``, its tensors replaced
    by ``tensors`` and its raw metadata by ``metadata``: what a crafted file may hold."""
    model = GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=2, n_embd=8))
    path = save_checkpoint(tmp_path / "lm.safetensors", model, model.config, kind="lm", vocab=vocab)
    with safe_open(str(path), framework="pt") as f:
        raw, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    raw["config"] = json.dumps({**json.loads(raw["config"]), **(changes or {})})
    save_file({**state, **(tensors or {})}, str(path), metadata={**raw, **metadata})
    return path


@pytest.mark.parametrize("vocab, says", [
    ("abcde", "got 5 characters"), ("abcdefgha", "got 9 characters (some repeated)"), (["ab", "c"], "got list"),
    (5, "got int"),
])
def test_a_vocabulary_that_does_not_fit_the_model_is_refused(tmp_path, vocab, says):
    """Else the server loads it and every completion fails (a token id past the vocabulary)."""
    path = _tiny_lm(tmp_path, vocab)
    with pytest.raises(CheckpointError) as info:
        load_with_tokenizer(path)
    assert str(info.value) == f"{path} records a vocabulary that does not fit its model: expected a str of 8 " \
                              f"distinct characters (the model's vocab_size), {says}"
    assert load_with_tokenizer(_tiny_lm(tmp_path, "hgfedcba"))[1].vocab_size == 8  # any order of 8 characters


@pytest.mark.parametrize("config, says", [
    ({"n_layer": 300}, ' does not match the model built from its config: Missing key(s) in state_dict: '
                       '"blocks.1.norm1.weight" (and 2092 more)'),
    ({"vocab_size": 10**12}, " does not match the model built from its config: size mismatch for wte.weight: "
                             "copying a param with shape torch.Size([8, 8]) from checkpoint, the shape in current "
                             "model is torch.Size([1000000000000, 8]). (and 1 more)"),
    ({"n_embd": 10**12}, ": the model its 'lm' config describes cannot be built"),
])
def test_a_config_describing_a_huge_model_is_one_short_error_before_it_is_allocated(tmp_path, config, says):
    """The weights are compared with a model built on the meta device: no memory, one line whatever the count."""
    path = _tiny_lm(tmp_path, changes=config)
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}{says}") and "\n" not in message and len(message) < 400, message[:1000]


def test_weights_of_the_wrong_shapes_are_one_line_naming_the_first(tmp_path):
    state = {k: v[:1].clone() for k, v in GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=2, n_embd=8))
             .state_dict().items()}
    path = _tiny_lm(tmp_path, tensors=state)
    with pytest.raises(CheckpointError) as info:
        load(path)
    assert str(info.value) == f"{path} does not match the model built from its config: size mismatch for " \
                              "wte.weight: copying a param with shape torch.Size([1, 8]) from checkpoint, the shape " \
                              "in current model is torch.Size([8, 8]). (and 9 more)"


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_weights_that_are_not_floating_point_are_refused(tmp_path, dtype):
    path = _tiny_lm(tmp_path, tensors={"norm_f.weight": torch.ones(8, dtype=dtype)})
    with pytest.raises(CheckpointError) as info:
        load(path)
    assert str(info.value) == f"{path} does not match the model built from its config: dtype mismatch for " \
                              f"norm_f.weight: the checkpoint holds {dtype}, the model a floating-point torch.float32"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused_as_save_checkpoint_refuses_them(tmp_path, bad):
    path = _tiny_lm(tmp_path, tensors={"norm_f.weight": torch.tensor([1.0] * 7 + [bad])})
    with pytest.raises(CheckpointError) as info:
        load(path)
    assert str(info.value) == f"{path} holds weights that are not finite (a run that diverged?): norm_f.weight " \
                              f"must be finite, got {bad}"
    big = _tiny_lm(tmp_path, tensors={"norm_f.weight": torch.full((8,), 6e4, dtype=torch.float16)})
    load(big)  # finite values whose norm overflows float16 still load


@pytest.mark.parametrize("key", ["config", "extra"])
@pytest.mark.parametrize("value", ["[1]", "5", '"text"', "null"])
def test_config_and_extra_metadata_must_be_json_objects(tmp_path, key, value):
    path = _tiny_lm(tmp_path, **{key: value})
    for call in (checkpoint.info, load_with_tokenizer):
        with pytest.raises(CheckpointError) as info:
            call(path)
        assert str(info.value) == f"{path} is not a valid ar_course checkpoint: its {key!r} metadata must be a " \
                                  f"JSON object, got a {type(json.loads(value)).__name__}"


def test_a_file_named_like_a_shipped_checkpoint_is_not_taken_for_it_silently(tmp_path, monkeypatch):
    """A run saved with --out ar_mnist (no suffix) and loaded by that string used to give the shipped model: the
    name is now refused as ambiguous, and ./ar_mnist is the file."""
    monkeypatch.chdir(tmp_path)
    model = GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=2, n_embd=8))
    save_checkpoint(tmp_path / "ar_mnist", model, model.config, kind="lm", vocab="abcdefgh")
    with pytest.raises(CheckpointError, match=r"^'ar_mnist' is both a shipped checkpoint name and a file in .*: "
                                              r"write \./ar_mnist"):
        load("ar_mnist")
    assert load("./ar_mnist").config.vocab_size == 8


def test_a_folder_named_like_a_shipped_checkpoint_does_not_shadow_it(tmp_path, monkeypatch):
    """Run from ar_course/, the package folder diffusion_lm/ is no checkpoint: the shipped name still loads."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "diffusion_lm").mkdir()
    assert checkpoint.resolve("diffusion_lm") == checkpoint.ASSETS / "diffusion_lm.safetensors"


def test_equal_weights_and_metadata_give_equal_bytes(tmp_path):
    """safetensors writes its metadata in a random order (a Rust hash map: 5 different files in 20 saves of one
    state); the checkpoint sorts it, so a rerun that reproduces the weights reproduces the file, and it loads."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=8))
    files = {save_checkpoint(tmp_path / "m.safetensors", model, model.config, kind="lm", note="é").read_bytes()
             for _ in range(12)}
    assert len(files) == 1
    blob = files.pop()
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    assert list(header["__metadata__"]) == ["config", "extra", "kind"]
    loaded = load(tmp_path / "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert load_checkpoint(tmp_path / "m.safetensors")[1]["extra"] == {"note": "é"}
