"""Bad input to ``python -m ar_course train <what>``: one line ``error: ...``, exit 2 for bad arguments or input
files, found before any data is loaded; exit 1 for a run that diverged, which writes no checkpoint."""

from __future__ import annotations

import re

import pytest
import torch

from ar_course import checkpoint, cli
from ar_course.checkpoint import NonFiniteWeightsError, save_checkpoint
from ar_course.data import load_text_dataset
from ar_course.tokenizers.train import default_config, train_tokenizer
from ar_course.train import format_accuracy, is_source_checkout, prepare_run, trainer_main
from cli_helpers import error_line, one_torch_thread, run


@pytest.fixture(autouse=True)
def no_data_loading(monkeypatch):
    """Every bad command line below must be refused before the training data is loaded or made."""
    import ar_course.data as data

    def refuse(*args, **kwargs):
        raise AssertionError("the training data was loaded before the bad input was refused")

    for module in ("ar_course.raster.train", "ar_course.masked.train", "ar_course.continuous.train"):
        monkeypatch.setattr(f"{module}.load_mnist", refuse)
    monkeypatch.setattr("ar_course.metrics.dataset_split", refuse)  # train var's (and train tokenizer's) data
    monkeypatch.setattr("ar_course.tokenizers.train.load_images", refuse)
    monkeypatch.setattr("ar_course.metrics.train_classifier", refuse)
    monkeypatch.setattr(data, "make_shapes", refuse)


def refused(capsys, tmp_path, *argv: str) -> str:
    """The one error line of ``train ARGV --out tmp/x.safetensors``, after checking its exit status 2 and that
    nothing was written."""
    status, _, err = run(capsys, "train", *argv, "--out", tmp_path / "x.safetensors")
    line = error_line(err)
    assert status == 2, line
    assert list(tmp_path.iterdir()) == []
    return line


IMAGE_TRAINERS = ["tokenizer", "classifier", "ar", "var", "maskgit", "continuous"]


# -- items 1 and 2: a batch larger than the training set -----------------------------------------------------


@pytest.mark.parametrize("what", IMAGE_TRAINERS)
def test_batch_larger_than_the_training_images_is_a_usage_error(capsys, tmp_path, what):
    line = refused(capsys, tmp_path, what, "--steps", "1", "--batch-size", "30000")
    assert "--batch-size 30000 is larger than the 20000 training images of mnist" in line


@pytest.mark.parametrize("argv, message", [
    (["var", "--dataset", "shapes", "--batch-size", "20001"], "--batch-size 20001 is larger than the 20000 training "
                                                              "images of shapes"),
    (["classifier", "--dataset", "shapes", "--batch-size", "20001"], "larger than the 20000 training images of shapes"),
    (["tokenizer", "--dataset", "shapes", "--batch-size", "20001"], "larger than the 20000 training images of shapes"),
    (["cca", "--batch-size", "30000", "--train-images", "40000"], "--batch-size 30000 is larger than the 20000"),
    (["cca", "--batch-size", "64", "--train-images", "32"], "--train-images 32 is smaller than --batch-size 64"),
    # the corpus comes with Python (pydoc's topics): its length, so the count, depends on the Python version
    (["lm", "--preset", "tiny", "--batch-size", "100000000"], f"--batch-size 100000000 is larger than the "
                                                              f"{len(load_text_dataset()[1]) // 128} windows of 128 "
                                                              "characters in the training text"),
    (["diffusion_lm", "--batch-size", "100000000"], "--batch-size 100000000 is larger than the"),
])
def test_batch_larger_than_the_data_other_trainers(capsys, tmp_path, argv, message):
    assert message in refused(capsys, tmp_path, *argv)


def test_train_tokenizer_refuses_a_batch_it_could_never_draw():
    images = torch.rand(4, 1, 32, 32)
    with pytest.raises(ValueError, match="batch_size must be an integer in \\[1, 4\\], got 8"):
        train_tokenizer(default_config(), steps=1, batch_size=8, device="cpu", progress=False, train_images=images,
                        test_images=images)


def test_train_tokenizer_needs_test_images_like_its_own_train_images():
    """Own train_images without test_images were scored on MNIST's test split (or failed after every step for
    28x28 images); an array reached an internal function's error (audit 29)."""
    images = torch.rand(8, 3, 32, 32)
    run = dict(steps=1, batch_size=4, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"^train_images of your own need test_images too .* the default is mnist's "
                                         r"test split\)$"):
        train_tokenizer(default_config(), train_images=images, **run)
    with pytest.raises(ValueError, match=r"^test_images must be images like train_images \(3, 32, 32\), got "
                                         r"\(1, 32, 32\)$"):
        train_tokenizer(default_config(), train_images=images, test_images=torch.rand(2, 1, 32, 32), **run)
    with pytest.raises(TypeError, match=r"^train_images must be a \(N, C, H, W\) float tensor, got ndarray$"):
        train_tokenizer(default_config(), train_images=images.numpy(), test_images=images, **run)


# -- items 3, 5, 14, 16, 17: option values checked when parsed ----------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["lm", "--threads", "100000"], "--threads must be an integer in [1, "),
    (["diffusion_lm", "--threads", "20000"], "--threads must be an integer in [1, "),
    (["grpo", "--kl-coef", "inf"], "--kl-coef must be a finite number >= 0, got inf"),
    (["grpo", "--kl-coef", "nan"], "--kl-coef must be a finite number >= 0, got nan"),
    (["cca", "--lam", "inf"], "--lam must be a finite number >= 0, got inf"),
    (["cca", "--lam", "-1"], "--lam must be a finite number >= 0, got -1"),
    (["tokenizer", "--num-codes", "1000000000000"], "--num-codes must be an integer in [1, 65536]"),
    (["tokenizer", "--quantizer", "rvq", "--depth", "1000000"], "--depth must be an integer in [1, 64]"),
    (["tokenizer", "--latent-dim", "1000000000"], "--latent-dim must be an integer in [1, 1024]"),
    (["ar", "--eval-per-class", "1000000000000"], "--eval-per-class must be an integer in [0, 1000]"),
    (["grpo", "--eval-per-class", "1000000000000"], "--eval-per-class must be an integer in [0, 1000]"),
    (["var", "--n-layer", "1000000000"], "--n-layer must be an integer in [1, 128]"),
    (["maskgit", "--n-embd", "1000000000"], "--n-embd must be an integer in [1, 8192]"),
    (["continuous", "--head-repeats", "1000000000"], "--head-repeats must be an integer in [1, 256]"),
    (["tokenizer", "--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    (["ar", "--device", "gpu"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    (["lm", "--device", "cuda:x"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
    (["grpo", "--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    (["classifier", "--device", "cuda:99"], "--device must be a device of this machine"),
    (["tokenizer", "--seed", "100000000000000000000000"], "--seed must be an integer in [0, 9223372036854775807]"),
    (["lm", "--seed", "-1"], "--seed must be an integer in [0, 9223372036854775807], got -1"),
    (["cca", "--seed", "1e3"], "--seed must be an integer in [0, 9223372036854775807], got 1e3"),
    (["diffusion_lm", "--seed", "18446744073709551615"], "--seed must be an integer in [0, 9223372036854775807]"),
])
def test_option_values_are_checked_when_parsed(capsys, tmp_path, argv, message):
    assert message in refused(capsys, tmp_path, *argv)


THREADS_HELP = (r"--threads THREADS torch CPU threads, at most (\d+) \(default: torch's choice; 1 is faster on a busy "
                r"machine\)")


@pytest.mark.parametrize("what", list(cli.TRAINERS))
def test_every_trainer_takes_threads_and_no_progress_with_the_same_help(capsys, what):
    status, out, _ = run(capsys, "train", what, "--help")
    help_text = " ".join(out.split())
    assert status == 0
    assert re.search(THREADS_HELP, help_text) and "--no-progress hide the progress bar" in help_text, help_text


@pytest.mark.parametrize("what", list(cli.TRAINERS))
def test_threads_0_is_a_one_line_usage_error_for_every_trainer(capsys, tmp_path, what):
    line = refused(capsys, tmp_path, what, "--no-progress", "--threads", "0")
    assert re.fullmatch(rf"error: --threads must be an integer in \[1, \d+\], got 0 \(see python -m ar_course "
                        rf"train {what} --help\)", line), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("what", ["tokenizer", "lm", "classifier", "ar", "cca"])
def test_cuda_on_a_machine_without_it_is_a_usage_error(capsys, tmp_path, what):
    line = refused(capsys, tmp_path, what, "--device", "cuda")
    assert "--device must be a device of this machine, which has no CUDA GPU, got 'cuda'" in line


@pytest.mark.parametrize("text", ["auto", "cpu", "cpu:0"])
def test_device_accepts_this_machines_devices(text):
    assert cli.device_name(text) == text


# -- item 9: options that conflict ----------------------------------------------------------------------------


def test_teacher_and_no_distill_conflict(capsys, tmp_path):
    line = refused(capsys, tmp_path, "lm", "--preset", "tiny", "--teacher", "lm_target", "--no-distill")
    assert "--teacher and --no-distill conflict" in line


# -- items 4 and 15: an input checkpoint of the wrong kind, missing or damaged --------------------------------


@pytest.fixture
def damaged(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "text.safetensors"
    path.write_text("not a checkpoint")
    return path


@pytest.mark.parametrize("argv, message", [
    (["ar", "--tokenizer", "mnist_msvq"], "--tokenizer mnist_msvq is a 'msvq' tokenizer; a single-scale"),
    (["ar", "--tokenizer", "tokenizer_mnist_kl"], "--tokenizer tokenizer_mnist_kl is a 'kl' tokenizer; a single-scale"),
    (["maskgit", "--tokenizer", "mnist_msvq"], "--tokenizer mnist_msvq is a 'msvq' tokenizer; a single-scale"),
    (["maskgit", "--tokenizer", "tokenizer_mnist_kl"], "is a 'kl' tokenizer; a single-scale ('vq', 'fsq' or 'lfq')"),
    (["var", "--tokenizer", "mnist_vq"], "--tokenizer mnist_vq is a 'vq' tokenizer; a multi-scale ('msvq') one"),
    (["var", "--dataset", "shapes", "--tokenizer", "mnist_msvq"], "--tokenizer mnist_msvq takes 1-channel images"),
    (["continuous", "--tokenizer", "mnist_vq"], "is a 'vq' tokenizer; a continuous ('kl') one is needed"),
    (["ar", "--tokenizer", "nope"], "--tokenizer: unknown checkpoint name 'nope'"),
    (["ar", "--tokenizer", "var_mnist"], "--tokenizer: "),
    (["maskgit", "--tokenizer", "no/such.safetensors"], "--tokenizer: no checkpoint at no/such.safetensors"),
    (["ar", "--tokenizer", "DAMAGED"], "is not a valid ar_course checkpoint"),
    (["lm", "--preset", "tiny", "--teacher", "DAMAGED"], "--teacher: "),
    (["lm", "--preset", "tiny", "--teacher", "diffusion_lm"], "--teacher: "),
    (["diffusion_lm", "--init", "lm_target"], "--init lm_target holds a 'lm' checkpoint, expected 'diffusion_lm'"),
    (["diffusion_lm", "--init", "DAMAGED"], "--init: "),
    (["grpo", "--base", "var_mnist"], "--base: "),
    (["cca", "--model", "var", "--base", "ar_mnist"], "--base: "),
    (["cca", "--base", "nope"], "--base: unknown checkpoint name 'nope'"),
])
def test_bad_input_checkpoints_are_usage_errors(capsys, tmp_path, damaged, argv, message):
    argv = [str(damaged) if a == "DAMAGED" else a for a in argv]
    line = refused(capsys, tmp_path, *argv, "--steps", "1")
    assert message in line and "--debug" not in line


@pytest.mark.parametrize("what", ["grpo", "cca"])
def test_alignment_of_a_base_of_other_classes_is_refused_before_any_data(capsys, tmp_path, what):
    """A VAR trained on the shapes set (4 classes, 3 channels) reached CCA's MNIST encoding and failed there:
    'this VQ-VAE takes 3-channel images, got 1 channels', exit 1, naming neither --base nor the data."""
    from ar_course.raster import raster_config
    from ar_course.transformer import GPT

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    model = GPT(raster_config(256, (8, 8), n_classes=4, n_layer=1, n_head=2, n_embd=16))
    base = save_checkpoint(base_dir / "four.safetensors", model, model.config, kind="raster_ar", tokenizer="mnist_vq")
    out = tmp_path / "out"
    out.mkdir()
    line = refused(capsys, out, what, "--base", str(base), "--steps", "1")
    assert line == (f"error: --base {base} is a model of 4 classes over 1-channel 32-pixel images; python -m "
                    f"ar_course train {what} fine-tunes on MNIST digits only (10 classes, 1 channel, 32 pixels) (see "
                    f"python -m ar_course train {what} --help)")


# -- an installed package: no --out is a usage error, not a replaced shipped checkpoint ----------------------


@pytest.fixture
def installed(monkeypatch):
    """ar_course as pip installs it (no source checkout around the package)."""
    assert is_source_checkout()  # this repository: the default --out regenerates the shipped checkpoints
    monkeypatch.setattr("ar_course.train.is_source_checkout", lambda: False)


@pytest.mark.parametrize("argv, shipped", [
    (["ar"], "ar_mnist"), (["var"], "var_mnist"), (["maskgit"], "maskgit_mnist"),
    (["continuous"], "continuous_ar_mnist"), (["tokenizer"], "tokenizer_mnist_vq"),
    (["classifier"], "classifier_mnist"), (["lm"], "lm_target"), (["diffusion_lm"], "diffusion_lm"),
    (["grpo"], "ar_mnist_grpo"), (["cca"], "ar_mnist_cca"), (["cca", "--model", "var"], "var_mnist_cca"),
])
def test_an_installed_package_needs_out_instead_of_replacing_a_shipped_checkpoint(capsys, installed, argv,
                                                                                 shipped):
    asset = checkpoint.ASSETS / f"{shipped}.safetensors"
    before = asset.stat().st_mtime_ns
    status, out, err = run(capsys, "train", *argv, "--steps", "1")
    assert status == 2 and out == ""
    assert error_line(err) == (f"error: --out is required: ar_course is installed as a package, and the default "
                               f"would replace its shipped {shipped}.safetensors (see python -m ar_course train "
                               f"{argv[0]} --help)")
    assert asset.stat().st_mtime_ns == before


def test_an_installed_package_refuses_a_new_file_inside_it_and_takes_an_out_elsewhere(capsys, tmp_path, installed):
    status, _, err = run(capsys, "train", "tokenizer", "--quantizer", "rvq", "--steps", "1")
    assert status == 2 and error_line(err) == ("error: --out is required: ar_course is installed as a package, and "
                                               "the default would write tokenizer_mnist_rvq.safetensors inside it "
                                               "(see python -m ar_course train tokenizer --help)")
    assert not (checkpoint.ASSETS / "tokenizer_mnist_rvq.safetensors").exists()
    parser = cli.ArgumentParser(prog="train")
    assert prepare_run(parser, tmp_path / "m.safetensors", False, None) == tmp_path / "m.train-state.safetensors"


def test_train_help_says_when_out_is_required(capsys):
    status, out, _ = run(capsys, "train", "ar", "--help")
    assert status == 0
    assert ("checkpoint path (default in a source checkout: the shipped ar_mnist.safetensors; required when "
            "ar_course is installed as a package)") in " ".join(out.split())
    for what in cli.TRAINERS:
        status, out, _ = run(capsys, "train", what, "--help")
        assert status == 0 and "required when ar_course is installed as a package)" in " ".join(out.split()), what


def test_a_trainer_without_its_evaluation_says_so_on_its_last_line():
    assert format_accuracy({}) == "not measured (--eval-per-class 0)"  # not a dangling "...guidance strength "


# -- item 6: a run that diverged writes no checkpoint ---------------------------------------------------------


def test_save_checkpoint_refuses_non_finite_weights_and_keeps_the_earlier_file(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", {"w": torch.ones(2)}, {})
    before = path.read_bytes()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteWeightsError, match="w must be finite, got (nan|inf); nothing was written"):
            save_checkpoint(path, {"w": torch.tensor([1.0, bad]), "n": torch.tensor([1])}, {})
    with pytest.raises(NonFiniteWeightsError, match="w must be finite"):
        save_checkpoint(path, {"w": torch.tensor([7e4]).half()}, {})  # float16 rounds it to inf
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_a_trainer_that_saves_non_finite_weights_says_it_diverged(capsys, tmp_path):
    @trainer_main
    def main(argv):
        save_checkpoint(tmp_path / "m.safetensors", {"w": torch.full((2,), float("nan"))}, {})
        return 0

    assert main([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: training diverged: w must be finite, got nan")
    assert err.rstrip().endswith("(rerun with a lower --lr)") and list(tmp_path.iterdir()) == []


def test_a_run_whose_loss_diverges_stops_with_status_1_and_writes_nothing(capsys, tmp_path):
    with one_torch_thread():  # --threads 1 sets torch's threads for the process: the helper restores them
        status, out, err = run(capsys, "train", "lm", "--preset", "tiny", "--steps", "3", "--lr", "1e30",
                               "--no-progress", "--threads", "1", "--out", tmp_path / "lm.safetensors")
    assert status == 1 and out == ""
    assert error_line(err).startswith("error: training diverged: the loss is nan at step ")
    assert err.rstrip().endswith("(rerun with a lower --lr)")
    assert not (tmp_path / "lm.safetensors").exists()


@pytest.mark.parametrize("what", ["ar", "grpo"])
def test_a_trainer_names_its_out_option_as_generate_does(capsys, tmp_path, what):
    status, _, err = run(capsys, "train", what, "--steps", "1", "--out", tmp_path)
    assert status == 2 and error_line(err) == (f"error: --out {str(tmp_path)!r} is a folder; name a file inside it "
                                               f"(see python -m ar_course train {what} --help)")  # it said "output"


@pytest.mark.parametrize("what, option, shipped", [
    ("ar", "--tokenizer", "tokenizer_mnist_vq"), ("maskgit", "--tokenizer", "tokenizer_mnist_vq"),
    ("var", "--tokenizer", "tokenizer_mnist_msvq"), ("continuous", "--tokenizer", "tokenizer_mnist_kl"),
    ("lm", "--teacher", "lm_target"), ("grpo", "--base", "ar_mnist"), ("cca", "--base", "ar_mnist"),
])
def test_out_that_is_the_runs_own_input_checkpoint_is_refused(capsys, tmp_path, what, option, shipped):
    """``--out`` naming the file of ``--tokenizer`` (or ``--teacher``) replaced it with the new model, which then
    recorded itself as its own tokenizer; the file is refused before any work and left as it was."""
    source = tmp_path / "in.safetensors"
    source.write_bytes(checkpoint.resolve(shipped).read_bytes())
    before = source.read_bytes()
    status, _, err = run(capsys, "train", what, "--steps", "1", option, source, "--out", tmp_path / "." / source.name)
    assert status == 2
    assert error_line(err).startswith(f"error: --out {str(tmp_path / '.' / source.name)!r} is the {option} checkpoint "
                                      "this run reads: saving would replace it; choose another --out")
    assert source.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


@pytest.mark.parametrize("config, says", [
    ({"block_size": 128}, "the teacher's context of 128 positions is shorter than the preset's 384-character windows"),
    ({"vocab_size": 50, "block_size": 384}, "the teacher models 50 characters, the corpus has 96"),
])
def test_a_teacher_that_cannot_read_the_presets_windows_is_refused_before_training(capsys, tmp_path, config, says):
    """It failed in the first distillation step: 'sequence of 384 positions exceeds block_size 128', exit 1."""
    from ar_course.data import TEXT_ALPHABET
    from ar_course.transformer import GPT, GPTConfig

    folder = tmp_path / "teacher"
    folder.mkdir()
    model = GPT(GPTConfig(**{"vocab_size": 96, "n_layer": 1, "n_head": 2, "n_embd": 16, **config}))
    teacher = save_checkpoint(folder / "t.safetensors", model, model.config, kind="lm",
                              vocab=TEXT_ALPHABET[:model.config.vocab_size])
    out = tmp_path / "out"
    out.mkdir()
    line = refused(capsys, out, "lm", "--preset", "draft", "--teacher", str(teacher), "--steps", "1")
    assert line == f"error: --teacher {teacher}: {says} (see python -m ar_course train lm --help)"


@pytest.mark.parametrize("what, quantizer", [("ar", "vq"), ("maskgit", "vq"), ("var", "msvq"),
                                             ("continuous", "kl")])
def test_a_tokenizer_of_another_image_size_is_a_usage_error(capsys, tmp_path, what, quantizer):
    """A 16x16 tokenizer failed after loading with 'this VQ-VAE takes 16x16 images, got 32x32', exit 1, naming
    no option (audit 29)."""
    from ar_course.tokenizers import VQVAE, VQVAEConfig

    folder = tmp_path / "tok"
    folder.mkdir()
    scales = (1, 2, 4) if quantizer == "msvq" else VQVAEConfig.scales
    tok = VQVAE(VQVAEConfig(quantizer=quantizer, image_size=16, scales=scales, num_codes=16, latent_dim=4, width=8))
    path = save_checkpoint(folder / "tok16.safetensors", tok, tok.config, kind="tokenizer")
    out = tmp_path / "out"
    out.mkdir()
    line = refused(capsys, out, what, "--tokenizer", str(path), "--steps", "1")
    assert line == (f"error: --tokenizer {path} takes 16x16 images but the training images are 32x32 (see python -m "
                    f"ar_course train {what} --help)")


def test_var_refuses_a_tokenizer_whose_scales_do_not_start_at_1(capsys, tmp_path):
    """It failed after loading with VARConfig's 'scales must start at 1 ..., got (2, 4, 8)', exit 1, naming
    scales the user never passed to train var."""
    from ar_course.tokenizers import VQVAE, VQVAEConfig

    folder = tmp_path / "tok"
    folder.mkdir()
    tok = VQVAE(VQVAEConfig(quantizer="msvq", scales=(2, 4, 8), num_codes=16, latent_dim=4, width=8))
    path = save_checkpoint(folder / "ms248.safetensors", tok, tok.config, kind="tokenizer")
    out = tmp_path / "out"
    out.mkdir()
    line = refused(capsys, out, "var", "--tokenizer", str(path), "--steps", "1")
    assert line == (f"error: --tokenizer {path} has scales 2,4,8: VAR's start token predicts a 1x1 first map, so "
                    "they must start at 1 (train the tokenizer with --scales 1,...) (see python -m ar_course train "
                    "var --help)")
