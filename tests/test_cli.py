"""The command line: help everywhere; every bad input is one ``error:`` line with exit status 2 (bad arguments
or input file) or 1 (failure while working), never a traceback unless --debug; outputs are checked before any
work and written atomically. The tests named after issue #15's table reproduce each of its rows."""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import torch
from PIL import Image

from ar_course import cli, doctor, generate
from ar_course.checkpoint import resolve
from ar_course.system import DEFAULT_CFG, PRETRAINED, GenerationRequest, Generator
from cli_helpers import error_line, grid_size, one_torch_thread, patch_loading, run
from fixtures.make_fixtures import solution_notebook

ROOT = Path(__file__).resolve().parents[1]
GENERATE_HELP = "(see python -m ar_course generate --help)"
GRADE_HELP = "(see python -m ar_course grade --help)"


def run_process(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "ar_course", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def shipped():
    with one_torch_thread():
        yield Generator.from_pretrained("mnist", device="cpu")


@pytest.fixture
def loads(monkeypatch, shipped):
    """Calls of Generator.from_pretrained, which returns the module's generator."""
    return patch_loading(monkeypatch, shipped)


# -- the top level ------------------------------------------------------------------------------------------


def test_help():
    res = run_process("--help")
    assert res.returncode == 0 and "doctor" in res.stdout and "grade" in res.stdout and "train" in res.stdout


def test_no_arguments_prints_help_and_fails(capsys):
    status, out, err = run(capsys)
    assert status == 2 and "usage" in out
    assert error_line(err) == "error: no command given; choose from: generate, doctor, grade, bench, serve, train"


def test_unknown_command(capsys):
    status, _, err = run(capsys, "frobnicate")
    assert status == 2
    assert error_line(err) == ("error: unknown command 'frobnicate'; choose from: generate, doctor, grade, bench, "
                               "serve, train (see python -m ar_course --help)")


def test_train_lists_trainers_and_rejects_unknown(capsys):
    status, out, _ = run(capsys, "train", "--help")
    assert status == 0 and "classifier" in out
    status, _, err = run(capsys, "train", "nothing")
    assert status == 2
    assert error_line(err) == ("error: unknown trainer 'nothing'; choose from: tokenizer, lm, classifier, ar, var, "
                               "maskgit, diffusion_lm, continuous, grpo, cca")
    status, out, err = run(capsys, "train")
    assert status == 2 and "WHAT is one of" in out
    assert error_line(err) == ("error: train needs WHAT to train, one of: tokenizer, lm, classifier, ar, var, "
                               "maskgit, diffusion_lm, continuous, grpo, cca")


@pytest.mark.parametrize("what", ["tokenizer", "lm", "classifier", "ar", "var", "maskgit", "diffusion_lm", "continuous",
                                  "grpo", "cca"])
def test_train_bad_arguments_are_one_line_before_any_training(capsys, what):
    status, _, err = run(capsys, "train", what, "--steps", "many")
    assert status == 2
    assert error_line(err) == (f"error: --steps must be an integer >= 1, got 'many' "
                               f"(see python -m ar_course train {what} --help)")


@pytest.mark.parametrize("command", [*cli.COMMANDS, "train tokenizer"])
def test_every_command_answers_an_unknown_option_with_one_line(capsys, command):
    status, _, err = run(capsys, *command.split(), "--no-such-option")
    assert status == 2  # unrecognized, or a required argument missing first
    assert error_line(err).endswith(f"(see python -m ar_course {command} --help)")


def test_usage_lines_name_the_console_script_when_run_as_it(capsys, monkeypatch):
    """Run as ``ar-course``, the usage and error lines name ``ar-course``, not ``python -m ar_course``."""
    monkeypatch.setattr(sys, "argv", [str(Path("bin") / "ar-course")])
    status, _, err = run(capsys, "generate", "--no-such-option")
    assert status == 2 and error_line(err).endswith("(see ar-course generate --help)")
    status, out, _ = run(capsys, "train")
    assert status == 2 and out.startswith("usage: ar-course train WHAT")
    status, out, _ = run(capsys, "train", "var", "--help")
    assert status == 0 and out.startswith("usage: ar-course train var")
    status, _, err = run(capsys, "train", "var", "--dataset", "shapes", "--steps", "1")  # a command in the message
    assert status == 2 and "(train one with: ar-course train tokenizer --quantizer msvq" in error_line(err)
    monkeypatch.setattr(sys, "argv", [str(Path("ar_course") / "__main__.py")])
    status, _, err = run(capsys, "frobnicate")
    assert status == 2 and error_line(err).endswith("(see python -m ar_course --help)")


def test_the_installed_console_script_names_itself():
    script = Path(sys.executable).with_name("ar-course")
    if not script.exists():
        pytest.skip("the ar-course script is not installed beside this Python (a plain checkout)")
    res = subprocess.run([str(script), "doctor", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("usage: ar-course doctor"), res.stdout + res.stderr


@pytest.mark.parametrize("command", ["grade", "doctor", "generate", "bench", "serve"])
def test_subcommand_help(capsys, command):
    status, out, err = run(capsys, command, "--help")
    assert status == 0 and "usage" in out and err == ""


# -- the safety net -----------------------------------------------------------------------------------------


def _doctor_fails(monkeypatch, exc):
    def run_checks(library_only=False):
        raise exc

    monkeypatch.setattr(doctor, "run_checks", run_checks)


def test_an_unexpected_error_is_one_line_with_status_1(capsys, monkeypatch):
    _doctor_fails(monkeypatch, RuntimeError("the disk is on fire\nsecond line"))
    status, _, err = run(capsys, "doctor")
    assert status == 1
    assert error_line(err) == "error: the disk is on fire (rerun with --debug for the traceback)"
    _doctor_fails(monkeypatch, KeyError("x"))  # a bare message gets its type's name
    status, _, err = run(capsys, "doctor")
    assert status == 1 and error_line(err) == "error: KeyError: 'x' (rerun with --debug for the traceback)"


def test_a_command_whose_extra_is_missing_says_which_extra(capsys, monkeypatch):
    """Without the course extra (Jupyter), grade names the extra to install, in one line with status 1; its
    --help says what the command does and what to install to see its options, with status 0."""
    monkeypatch.delitem(sys.modules, "ar_course.grade", raising=False)
    monkeypatch.setitem(sys.modules, "ipykernel", None)  # import ipykernel now fails as if it were not installed
    status, _, err = run(capsys, "grade", "notebooks/00_tour.ipynb")
    assert status == 1 and error_line(err).startswith("error: grade needs the 'course' extra, which is not installed "
                                                      "(import of ipykernel halted")
    assert error_line(err).endswith("pip install -e '.[course]' in the course's folder")
    status, out, err = run(capsys, "grade", "--help")
    assert status == 0 and err == "" and out.startswith("usage: python -m ar_course grade ...")
    assert "execute a notebook's exercises" in out and out.rstrip().endswith("pip install -e '.[course]' in the "
                                                                             "course's folder")


@pytest.mark.parametrize("module", ["ar_course.site", "ar_course.build_notebooks"])
def test_course_tools_without_the_course_extra_say_which_extra_in_one_line(module):
    """``python -m ar_course.site`` (or build_notebooks) on a core install printed a ModuleNotFoundError traceback."""
    code = (f"import runpy, sys; sys.modules['nbformat'] = None; sys.argv = ['{module}', '--help']; "
            f"runpy.run_module('{module}', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert error_line(done.stderr) == (f"error: python -m {module} needs the 'course' extra, which is not installed "
                                       "(import of nbformat halted; None in sys.modules): pip install -e "
                                       "'.[course]' in the course's folder")


def test_ctrl_c_is_status_130(capsys, monkeypatch):
    _doctor_fails(monkeypatch, KeyboardInterrupt())
    status, _, err = run(capsys, "doctor")
    assert status == 130 and error_line(err) == "error: interrupted"


@pytest.mark.parametrize("where", ["end", "start", "env"])
def test_debug_shows_the_traceback(capsys, monkeypatch, where):
    _doctor_fails(monkeypatch, RuntimeError("the disk is on fire"))
    argv = {"end": ["doctor", "--debug"], "start": ["--debug", "doctor"], "env": ["doctor"]}[where]
    if where == "env":
        monkeypatch.setenv("AR_COURSE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="the disk is on fire"):
        cli.main(argv)


def test_debug_in_a_real_process_prints_a_traceback(tmp_path):
    res = run_process("generate", "--out", str(tmp_path / "x.jpg"), "--debug")
    assert res.returncode == 1 and "Traceback" in res.stderr and "UsageError" in res.stderr


def test_sys_exit_with_a_message_inside_a_command_is_one_line(capsys, monkeypatch):
    _doctor_fails(monkeypatch, SystemExit("cannot go on\nreally"))
    status, _, err = run(capsys, "doctor")
    assert status == 1 and error_line(err) == "error: cannot go on"


# -- type= helpers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parse, text, message", [
    (cli.finite_float, "nan", "must be a finite number, got nan"),
    (cli.finite_float, "x", "must be a finite number, got 'x'"),
    (cli.float_in(0), "-inf", "must be a finite number >= 0, got -inf"),
    (cli.float_in(0, 1, lo_open=True), "0", "must be a finite number in (0, 1], got 0"),
    (cli.float_in(0, 1, lo_open=True), "1.5", "must be a finite number in (0, 1], got 1.5"),
    (cli.float_in(0, 1, hi_open=True), "1", "must be a finite number in [0, 1), got 1"),
    (cli.positive_float, "1e400", "must be a finite number > 0, got 1e400"),
    (cli.int_in(1, 64), "65", "must be an integer in [1, 64], got 65"),
    (cli.positive_int, "1.5", "must be an integer >= 1, got 1.5"),
    (cli.nonnegative_int, "", "must be an integer >= 0, got ''"),
    (cli.nonnegative_int, "x" * 50, "must be an integer >= 0, got '" + "x" * 36 + "..."),
])
def test_type_helpers_refuse_with_the_requirement(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    assert str(info.value) == message


def test_type_helpers_accept_the_bounds():
    assert cli.float_in(0, 1, lo_open=True)("1") == 1.0 and cli.float_in(0)("0") == 0.0
    assert cli.float_in(0, 1, hi_open=True)("0") == 0.0
    assert cli.int_in(1, 64)("64") == 64 and cli.positive_int(" 3 ") == 3 and cli.finite_float("-2.5") == -2.5


# -- generate: issue #15's rows -----------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("--cfg", "nan", "--cfg must be a finite number in [0, 1000], got nan"),
    ("--cfg", "inf", "--cfg must be a finite number in [0, 1000], got inf"),
    ("--temperature", "nan", "--temperature must be 0 (greedy) or a finite number >= 1e-06, got nan"),
    ("--temperature", "1e-40", "--temperature must be 0 (greedy) or a finite number >= 1e-06, got 1e-40"),
    ("--top-p", "0", "--top-p must be a finite number in [1e-06, 1], got 0"),
    ("--top-k", "0", "--top-k must be an integer >= 1, got 0"),
    ("--relaxed-delta", "-0.5", "--relaxed-delta must be a finite number in [0, 1], got -0.5"),
    ("--per-class", "0", "--per-class must be an integer in [1, 1000], got 0"),
    ("--per-class", "100000000", "--per-class must be an integer in [1, 1000], got 100000000"),  # ran out of memory
    ("--zoom", "65", "--zoom must be an integer in [1, 64], got 65"),
    ("--seed", "-1", "--seed must be an integer in [0, 18446744073709551615], got -1"),
    ("--classes", "-1", "--classes must be an integer >= 0, got -1"),
    ("--device", "gpu", "--device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
])
def test_issue15_generate_bad_numbers_are_refused_before_loading(capsys, tmp_path, loads, option, value, message):
    status, _, err = run(capsys, "generate", "--out", tmp_path / "x.png", f"{option}={value}")
    assert status == 2 and error_line(err) == f"error: {message} {GENERATE_HELP}"
    assert loads == [] and list(tmp_path.iterdir()) == []


def _read_only_folder(tmp_path):
    """A folder this process cannot write to, and the reason check_output_path gives."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro, f"no file can be created in {str(ro)!r} (Permission denied)"
    if not os.path.isdir("/proc/self"):
        pytest.skip("root can write anywhere and there is no /proc")
    return "/proc/self", None


@pytest.mark.parametrize("case", ["under a file", "read-only", "a folder", "wrong suffix"])
def test_issue15_generate_bad_out_is_refused_before_loading(capsys, tmp_path, loads, case):
    (tmp_path / "file").write_text("x")
    if case == "read-only":
        folder, reason = _read_only_folder(tmp_path)
        out = f"{folder}/x.png"
        message = f"error: cannot write --out {out!r}: {reason}" if reason else f"error: cannot write --out {out!r}: "
    else:
        out, message = {
            "under a file": (tmp_path / "file" / "x.png",
                             f"error: cannot write --out '{tmp_path}/file/x.png': '{tmp_path}/file' is a file, "
                             "not a folder"),
            "a folder": (tmp_path, f"error: --out '{tmp_path}' is a folder; name a file inside it"),
            "wrong suffix": (tmp_path / "x.jpg", f"error: --out must name a .png file, got '{tmp_path}/x.jpg'"),
        }[case]
    status, _, err = run(capsys, "generate", "--out", out, "--classes", "1")
    assert status == 2 and error_line(err).startswith(message)
    assert loads == []  # the path was checked before any model was loaded


@pytest.mark.parametrize("case", ["unwritable", "a folder", "wrong suffix"])
def test_issue15_generate_bad_stats_json_writes_nothing(capsys, tmp_path, loads, case):
    stats = {"unwritable": tmp_path / "x.png" / "s.json", "a folder": tmp_path, "wrong suffix": tmp_path / "s.txt"}
    (tmp_path / "x.png").write_bytes(b"an older file")  # also the --out of this run: it must stay as it was
    message = {
        "unwritable": f"error: cannot write --stats-json '{tmp_path}/x.png/s.json': '{tmp_path}/x.png' is a file, "
                      "not a folder",
        "a folder": f"error: --stats-json '{tmp_path}' is a folder; name a file inside it",
        "wrong suffix": f"error: --stats-json must name a .json file, got '{tmp_path}/s.txt'",
    }[case]
    status, _, err = run(capsys, "generate", "--out", tmp_path / "x.png", "--stats-json", stats[case])
    assert status == 2 and error_line(err) == message
    assert loads == [] and (tmp_path / "x.png").read_bytes() == b"an older file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_generate_class_out_of_range_for_the_model(capsys, tmp_path, loads):
    status, _, err = run(capsys, "generate", "--out", tmp_path / "x.png", "--classes", "3", "10", "12")
    assert status == 2 and error_line(err) == "error: --classes must lie in [0, 9] for this model, got 10 12"
    assert loads == ["mnist"] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--speculative", "jacobi"], "--speculative applies to --method ar (VAR already samples a whole scale per pass)"),
    (["--method", "ar", "--relaxed-delta", "0.5"], "--relaxed-delta 0.5 applies to --speculative jacobi only"),
    (["--compile", "--kernels", "numba"],
     "--compile applies to batched generation (no --speculative) with torch attention (--kernels auto or torch)"),
    (["--graphs", "--compile"], "--graphs applies to batched generation (no --speculative), without --compile"),
    (["--graphs", "--device", "cpu"], "--graphs needs a CUDA device, got cpu"),
])
def test_generate_option_combinations(capsys, tmp_path, loads, args, message):
    status, _, err = run(capsys, "generate", "--out", tmp_path / "x.png", *args)
    assert status == 2 and error_line(err) == f"error: {message}" and loads == []


def test_generate_aligned_models_default_to_no_guidance_however_they_are_loaded():
    """A model aligned in chapter 11 samples without guidance unless --cfg is given: by --ar-model / --var-model,
    and (it got 1.0 / 2.0 there: class accuracy 0.775 against 0.935 for the CCA raster model) by --ar-checkpoint /
    --var-checkpoint, or a file a trainer wrote, whose recorded method says so."""
    for kwargs, method, default in (({"ar": "grpo"}, "ar", 0.0), ({"ar": "cca"}, "ar", 0.0), ({}, "ar", 1.0),
                                    ({"var": "cca"}, "var", 0.0), ({}, "var", 2.0)):
        gen = Generator.from_pretrained("mnist", device="cpu", **kwargs)
        assert gen.default_cfg[method] == default, kwargs
    by_name = Generator.from_checkpoints(ar_path="ar_mnist_cca", var_path="var_mnist", device="cpu")
    assert by_name.default_cfg == {"ar": 0.0, "var": 2.0}
    args = generate.build_parser().parse_args(["--out", "x.png", "--method", "ar", "--ar-checkpoint", "ar_mnist_cca"])
    assert generate._request(args, [3], by_name).cfg == 0.0
    args = generate.build_parser().parse_args(["--out", "x.png", "--method", "ar", "--cfg", "1.5"])
    assert generate._request(args, [3], by_name).cfg == 1.5  # a strength given is kept
    with one_torch_thread():  # the Python API takes the same default, through generate() and run(request)
        unguided = by_name.generate([3], method="ar", seed=0, cfg=0).images
        assert torch.equal(by_name.generate([3], method="ar", seed=0).images, unguided)
        request = GenerationRequest([3], method="ar", seed=0)
        assert request.cfg_defaulted and request.cfg == 1.0  # DEFAULT_CFG until a Generator runs it
        assert torch.equal(by_name.run(request).images, unguided)
        guided = GenerationRequest([3], method="ar", seed=0, cfg=1.0)
        assert not guided.cfg_defaulted and not torch.equal(by_name.run(guided).images, unguided)


def test_generate_request_lists_the_classes_row_by_row_so_each_grid_column_is_one_class():
    """The request repeats the class list once per row (3 7 3 7, not 3 3 7 7), so each column of the grid is
    one class."""
    args = generate.build_parser().parse_args(["--out", "x.png", "--classes", "3", "7", "--per-class", "2"])
    gen = SimpleNamespace(default_cfg=dict(DEFAULT_CFG))
    assert generate._request(args, [3, 7], gen).classes.tolist() == [3, 7, 3, 7]


def test_generate_bad_checkpoint_is_a_usage_error(capsys, tmp_path):
    bad = tmp_path / "var.safetensors"
    bad.write_bytes(b"\0" * 64)
    status, _, err = run(capsys, "generate", "--out", tmp_path / "x.png", "--var-checkpoint", bad)
    assert status == 2 and error_line(err).startswith(f"error: {bad}")
    status, _, err = run(capsys, "generate", "--out", tmp_path / "x.png", "--ar-checkpoint", tmp_path / "no.st")
    assert status == 2 and error_line(err) == f"error: no checkpoint at {tmp_path}/no.st"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["var.safetensors"]


@pytest.mark.parametrize("args, message", [
    ([], "--method var (the default) needs a VAR model: add --var-checkpoint, or use --method ar"),
    (["--method", "ar", "--speculative", "draft"],
     "--speculative draft needs a draft model, which only the shipped models have; use --speculative jacobi with "
     "--ar-checkpoint"),
])
def test_generate_custom_checkpoint_lacking_what_the_options_need(capsys, tmp_path, args, message):
    ar_path = resolve(PRETRAINED["mnist"]["ar_path"])
    status, _, err = run(capsys, "generate", "--out", tmp_path / "x.png", "--ar-checkpoint", ar_path, *args)
    assert status == 2 and error_line(err) == f"error: {message}" and list(tmp_path.iterdir()) == []


def test_generate_checkpoint_options_take_shipped_names(capsys, tmp_path):
    """--var-checkpoint / --ar-checkpoint read a shipped name as the Python API does (they used to look for a file
    named var_mnist_cca in the current folder)."""
    out = tmp_path / "x.png"
    with one_torch_thread():
        status, stdout, err = run(capsys, "generate", "--out", out, "--var-checkpoint", "var_mnist_cca", "--classes",
                                  "1", "--zoom", "1")
    assert status == 0 and err == "" and f"wrote {out}" in stdout
    status, _, err = run(capsys, "generate", "--out", out, "--ar-checkpoint", "ar_mnist_nope", "--method", "ar")
    assert status == 2 and error_line(err).startswith("error: unknown checkpoint name 'ar_mnist_nope': not a file, "
                                                      "and the shipped ones are ar_mnist, ar_mnist_cca")
    status, _, err = run(capsys, "generate", "--out", out, "--var-checkpoint", "")
    assert status == 2 and error_line(err) == ("error: --var-checkpoint must be a checkpoint file or a shipped "
                                               "checkpoint name, got '' (see python -m ar_course generate --help)")


def test_a_leading_tilde_in_a_path_option_is_the_home_folder(capsys, tmp_path, monkeypatch):
    """``--out=~/x.png`` (which bash leaves unexpanded) wrote into a new folder named ``~`` in the current one; a
    checkpoint option read ``~/...`` the same way."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (home / "var.safetensors").write_bytes(resolve("var_mnist").read_bytes())
    with one_torch_thread():
        status, stdout, err = run(capsys, "generate", "--out=~/x.png", "--stats-json", "~/x.json",
                                  "--var-checkpoint", "~/var.safetensors", "--classes", "1", "--zoom", "1")
    assert status == 0 and err == "" and f"wrote {home / 'x.png'}" in stdout
    assert sorted(p.name for p in home.iterdir()) == ["var.safetensors", "x.json", "x.png"]
    assert list(work.iterdir()) == []


def test_generate_checkpoints_of_different_classes_are_a_usage_error(capsys, tmp_path):
    """A VAR of 3 classes beside the shipped raster model of 10: refused in one line naming both files (it used to
    build a Generator whose class ids meant different things to its two models)."""
    from ar_course import var

    shipped_var = var.load_pretrained()[0]
    config = dataclasses.replace(shipped_var.config, n_classes=3)
    var_path = var.save_pretrained(var.VAR(config), tmp_path / "var3.safetensors", tokenizer="mnist_msvq")
    ar_path = resolve(PRETRAINED["mnist"]["ar_path"])
    status, _, err = run(capsys, "generate", "--out", tmp_path / "x.png", "--var-checkpoint", var_path,
                         "--ar-checkpoint", ar_path)
    assert status == 2 and error_line(err) == (f"error: {var_path}, {ar_path}: var_model models 3 classes, "
                                               "ar_model 10: one Generator's models must share their classes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["var3.safetensors"]


def test_generate_writes_png_and_strict_json_atomically(capsys, tmp_path, loads):
    out, stats = tmp_path / "new" / "grid.png", tmp_path / "new" / "stats.json"
    status, stdout, err = run(capsys, "generate", "--out", out, "--stats-json", stats, "--classes", "2", "5",
                              "--per-class", "2", "--zoom", "1", "--method", "ar", "--cfg=0", "--top-k=5")
    assert status == 0 and err == "" and f"wrote {out}" in stdout
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == grid_size(2, 2, 1)

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    data = json.loads(stats.read_text(encoding="utf-8"), parse_constant=refuse)
    assert data["images"] == 4 and data["method"] == "ar" and data["acceptance_rate"] is None and data["cfg"] == 0.0
    assert sorted(p.name for p in out.parent.iterdir()) == ["grid.png", "stats.json"]  # no temporary files


def test_generate_png_has_one_column_per_class(capsys, tmp_path, monkeypatch):
    """The grid has as many columns as classes, not as --per-class samples (a fake generator: no models run)."""
    images = torch.rand(6, 1, 4, 4)
    stats = SimpleNamespace(as_dict=lambda: {}, summary=lambda: "")
    fake = SimpleNamespace(var=object(), ar=None, ar_draft=None, num_classes=10, default_cfg=dict(DEFAULT_CFG),
                           run=lambda request: SimpleNamespace(images=images, stats=stats))
    patch_loading(monkeypatch, fake)
    out = tmp_path / "g.png"
    status, _, err = run(capsys, "generate", "--out", out, "--classes", "3", "7", "--per-class", "3", "--zoom", "1")
    assert status == 0 and err == ""
    assert out.read_bytes() == generate.png_bytes(images, 2, 1)


def test_generate_failure_while_working_leaves_nothing(capsys, tmp_path, loads, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Generator, "run", broken)
    status, _, err = run(capsys, "generate", "--out", tmp_path / "x.png", "--stats-json", tmp_path / "s.json")
    assert status == 1 and error_line(err) == "error: out of memory (rerun with --debug for the traceback)"
    assert list(tmp_path.iterdir()) == []


def test_generate_interrupted_while_writing_leaves_nothing(capsys, tmp_path, loads, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "_stats_json", interrupted)  # after the PNG's temporary file was written
    status, _, err = run(capsys, "generate", "--out", tmp_path / "x.png", "--stats-json", tmp_path / "s.json",
                         "--classes", "0")
    assert status == 130 and error_line(err) == "error: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_cli_generate_in_a_real_process_has_no_traceback(tmp_path):
    res = run_process("generate", "--cfg", "nan", "--out", str(tmp_path / "x.png"))
    assert res.returncode == 2 and res.stderr == f"error: --cfg must be a finite number in [0, 1000], got nan " \
                                                 f"{GENERATE_HELP}\n"


# -- grade: issue #15's rows --------------------------------------------------------------------------------


BAD_NOTEBOOKS = {
    "x.py": (b"print('hello')\n", "{path} is not a Jupyter notebook (expected a .ipynb file)"),
    "text.ipynb": (b"hello\n", "{path} is not a Jupyter notebook (not valid JSON: Expecting value at line 1 column 1)"),
    "data.ipynb": (b'{"a": 1}', "{path} is not a Jupyter notebook (JSON without an 'nbformat' version)"),
    "list.ipynb": (b"[1, 2]", "{path} is not a Jupyter notebook (JSON without an 'nbformat' version)"),
    "empty.ipynb": (b"", "{path} is not a Jupyter notebook (the file is empty)"),
    "binary.ipynb": (b"\x89PNG\r\n\x1a\n\x00\xff", "{path} is not a Jupyter notebook (a binary file, not UTF-8 text)"),
    "v9.ipynb": (b'{"nbformat": 9, "cells": []}',
                 "{path} is not a Jupyter notebook (invalid notebook structure: Unsupported nbformat version 9)"),
    "cells.ipynb": (b'{"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [1]}',
                    "{path} is not a Jupyter notebook (invalid notebook structure: argument of type 'int' is not "
                    "iterable)"),
    "untagged.ipynb": (nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")])).encode(),
                       "{path} has no exercises to grade (no code cell tagged 'exercise' starting with '# Exercise "
                       "N.M: name')"),
}


@pytest.mark.parametrize("name", BAD_NOTEBOOKS)
def test_issue15_grade_bad_files_are_one_line_naming_the_file(capsys, tmp_path, name):
    content, message = BAD_NOTEBOOKS[name]
    path = tmp_path / name
    path.write_bytes(content)
    status, out, err = run(capsys, "grade", path)
    assert status == 2 and out == "" and error_line(err) == "error: " + message.format(path=path)


def test_grade_missing_notebook_and_folder(capsys, tmp_path):
    status, _, err = run(capsys, "grade", tmp_path / "nope.ipynb")
    assert status == 2 and error_line(err) == f"error: no such notebook: {tmp_path}/nope.ipynb"
    status, _, err = run(capsys, "grade", tmp_path)
    assert status == 2 and error_line(err) == f"error: {tmp_path} is a folder, not a notebook"


def test_grade_names_the_notebook_a_chapter_number_was_meant_for(capsys, tmp_path):
    (tmp_path / "notebooks").mkdir()
    for name in ("01_vector_quantization.ipynb", "02_causal_transformer.ipynb"):
        (tmp_path / "notebooks" / name).write_text("{}")
    status, _, err = run(capsys, "grade", tmp_path / "01")
    assert status == 2 and error_line(err) == (
        f"error: no such notebook: {tmp_path}/01 (did you mean {tmp_path}/notebooks/01_vector_quantization.ipynb?)")
    status, _, err = run(capsys, "grade", tmp_path / "notebooks" / "0")
    assert error_line(err).endswith(f"(did you mean {tmp_path}/notebooks/01_vector_quantization.ipynb or "
                                    f"{tmp_path}/notebooks/02_causal_transformer.ipynb?)")
    status, _, err = run(capsys, "grade", tmp_path / "[1")  # a glob character in the name matches nothing
    assert error_line(err) == f"error: no such notebook: {tmp_path}/[1"


@pytest.mark.parametrize("option, value", [("--timeout", "-1"), ("--timeout", "nan"), ("--cell-timeout", "0"),
                                           ("--timeout", "1e300")])
def test_issue15_grade_time_limits_must_be_positive(capsys, tmp_path, option, value):
    path = tmp_path / "nb.ipynb"
    nbformat.write(solution_notebook(), path)
    status, _, err = run(capsys, "grade", path, option, value)
    assert status == 2
    assert error_line(err) == f"error: {option} must be a finite number in (0, 86400], got {value} {GRADE_HELP}"


def test_grade_checks_every_input_before_grading_any(capsys, tmp_path):
    good = tmp_path / "good.ipynb"
    nbformat.write(solution_notebook(), good)
    (tmp_path / "bad.ipynb").write_text("{")
    status, out, err = run(capsys, "grade", good, tmp_path / "bad.ipynb")
    assert status == 2 and out == ""  # nothing graded: the bad second notebook was found first
    assert error_line(err).startswith(f"error: {tmp_path}/bad.ipynb is not a Jupyter notebook (not valid JSON")
    status, out, err = run(capsys, "grade", good, "--json", tmp_path)
    assert status == 2 and out == "" and error_line(err) == f"error: --json '{tmp_path}' is a folder; name a file " \
                                                            "inside it"


@pytest.mark.timeout(300)
def test_issue15_grade_prints_no_kernel_warning_and_writes_json(tmp_path):
    path = tmp_path / "nb.ipynb"
    nbformat.write(solution_notebook(), path)
    res = run_process("grade", str(path), "--json", str(tmp_path / "out" / "result.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    # no "[IPKernelApp] WARNING | Kernel is running over TCP without encryption" nor "| Parent appears to have
    # exited, shutting down" (the kernel was left running)
    assert res.stderr == ""
    assert "3/3 exercises passed" in res.stdout
    result = json.loads((tmp_path / "out" / "result.json").read_text(encoding="utf-8"))
    assert [r["status"] for r in result[str(path)]] == ["passed"] * 3


# -- bench and doctor ---------------------------------------------------------------------------------------


def test_doctor_reports_and_passes_here():
    res = run_process("doctor")
    assert "numba CUDA simulator" in res.stdout and "torch" in res.stdout
    assert res.returncode == 0, res.stdout


def test_doctor_fails_a_torch_older_than_the_library_needs():
    """torch 2.3 lacks torch.is_autocast_enabled(device_type), which the kernels read: FAIL with the fix."""
    assert doctor.module_finding("torch", "2.3.1", True, "") == doctor.Finding(
        "FAIL", "torch", "2.3.1 (need 2.4+: pip install 'torch>=2.4')")
    assert doctor.module_finding("torch", "2.4.0+cpu", True, "").status == "OK"
    assert doctor.module_finding("ipywidgets", None, False, "course") == doctor.Finding(
        "WARN", "ipywidgets", "not installed (pip install -e '.[course]' in the course's folder)")
    bound = re.search(r'"torch>=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert (int(bound.group(1)), int(bound.group(2))) == doctor.OLDEST["torch"]  # doctor and pyproject agree


def test_bench_table_and_bad_name(capsys):
    status, out, err = run(capsys, "bench", "--table")
    assert status == 0 and err == "" and out.startswith("[")  # the table, not a blank line first
    status, out, err = run(capsys, "bench", "no_such_benchmark")
    assert status == 2 and out == "" and error_line(err).startswith(
        "error: unknown benchmark(s) 'no_such_benchmark'; choose from: ")


# -- make lab -----------------------------------------------------------------------------------------------


def test_make_lab_serves_on_localhost_with_its_token():
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = make.split("\nlab:", 1)[1].split("\n\n", 1)[0]
    assert "jupyter lab" in recipe and "--ServerApp.ip=127.0.0.1" in recipe and "--allow-root" in recipe
    assert "token" not in recipe and "0.0.0.0" not in recipe  # the token stays on; nothing opens it up
    assert "ssh -L 8888:localhost:8888" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_an_empty_path_option_is_refused_not_read_as_the_current_folder(capsys, tmp_path, monkeypatch):
    """``--notebooks ""`` (an unset shell variable) wrote the notebooks into the current folder and deleted the
    other notebooks there."""
    from ar_course import build_notebooks

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.ipynb").write_text("{}", encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        build_notebooks.main(["--notebooks", ""])
    assert info.value.code == 2 and "--notebooks: must be a path, got ''" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.ipynb"]


@pytest.mark.parametrize("module", ["ar_course", "ar_course.build_notebooks", "ar_course.site"])
def test_help_works_without_docstrings(module):
    """``python -OO`` (or PYTHONOPTIMIZE=2) drops docstrings: parsers described by ``__doc__.split(...)`` failed
    with ``AttributeError: 'NoneType' object has no attribute 'split'``."""
    res = subprocess.run([sys.executable, "-OO", "-m", module, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("usage: python -m ") and res.stderr == "", res.stderr
