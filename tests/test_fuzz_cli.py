"""Fuzzing ``python -m ar_course`` over its argument space (Hypothesis), in-process through ``cli.main``.

Whatever the arguments, a command exits 0, 1 or 2; a non-zero exit prints exactly one ``error: `` line on
stderr and no traceback; nothing else escapes ``main``. Beyond that, per command:

* ``generate``: bad numbers (nan, inf, negative, huge, not numbers), class ids out of range, bad ``--out`` /
  ``--stats-json`` paths, option combinations and unknown flags exit 2 -- never 1, which would mean a failure
  the argument checks let through; a bad path is refused before any model is loaded; a failed run leaves no
  file (not even a temporary one); a successful one writes a PNG of the right size and strict JSON.
* ``grade``: random bytes, empty files, text, JSON that is not a notebook, broken notebooks and notebooks
  without exercises exit 2 with a line naming the file, before any kernel starts.
* ``train``, ``bench``, ``doctor``, unknown commands: only arguments that fail fast (or ``--help``) -- no
  training, benchmark or machine check ever runs here.

Examples are few and small (1-3 classes, 1-2 per class, speculative decoding drawn rarely) so the file runs in
well under a minute on a shared 2-core CPU; ``derandomize=True`` makes every run try the same cases.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import nbformat
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ar_course import bench, cli
from ar_course.system import Generator
from cli_helpers import error_line, grid_size, one_torch_thread, patch_loading, run
from fuzz_report import record


def fuzz(max_examples: int) -> settings:
    # capsys and the module's folder are shared by the examples on purpose: each example reads capsys first
    # and works in a fresh sub-folder
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def loads():
    """The shipped models, loaded once; ``Generator.from_pretrained`` returns them and records each call."""
    generator = Generator.from_pretrained("mnist", device="cpu")
    with one_torch_thread(), pytest.MonkeyPatch.context() as mp:
        yield patch_loading(mp, generator)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh_folder(base: Path) -> Path:
    """A new empty folder holding only ``file`` (a regular file, for paths 'under a file')."""
    folder = Path(tempfile.mkdtemp(dir=base))
    (folder / "file").write_text("a regular file")
    return folder


def unknown_flag() -> st.SearchStrategy[str]:
    """Flags no parser knows, and that abbreviate none of the real options (argparse expands prefixes)."""
    letters = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=8)
    return st.one_of(st.sampled_from(["--frobnicate", "-z", "stray"]), letters.map(lambda t: f"--unknown-{t}"))


def number_text(valid: Sequence[str], special: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """The text of a number option: valid values, edge values, and any float or int Hypothesis comes up with
    (nan, inf, -0.0, 1e+308, 5e-324, huge ints...), or something that is not a number."""
    return st.one_of(
        st.sampled_from(valid), st.sampled_from(["nan", "inf", "-inf", "-1", "", "x", "1e400", *special]),
        st.floats().map(repr), st.integers(-10, 10**30).map(str),
    )


def is_nonfinite(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


# -- generate -----------------------------------------------------------------------------------------------

GOOD_OUT = ["g.png", "sub/dir/g.png"]
BAD_OUT = ["file/g.png", ".", "g.jpg", "", "/proc/self/g.png"]
GOOD_STATS = ["s.json", "sub/s.json"]
BAD_STATS = ["file/s.json", ".", "s.txt", "/proc/self/s.json"]

# option -> (values that must work, values that must not: wrong, edge or anything)
GENERATE_OPTIONS = {
    "--per-class": (st.sampled_from(["1", "2"]), st.sampled_from(["0", "-1", "1.5", "x", ""])),
    "--zoom": (st.sampled_from(["1", "2", "3"]), st.sampled_from(["0", "65", "-2", "x", "2.0"])),
    "--cfg": (st.floats(0, 1000).map(repr) | st.sampled_from(["0", "1000", "1e3"]),
              number_text(["-0.001", "1000.5", "1e38"])),
    "--temperature": (st.floats(1e-6, 1e30).map(repr) | st.sampled_from(["0", "1e-06", "1e30"]),
                      number_text(["1e-40", "5e-7", "-1e-300"])),
    "--top-k": (st.integers(1, 10**20).map(str), number_text(["0", "-5"])),
    "--top-p": (st.floats(1e-6, 1).map(repr) | st.sampled_from(["1", "1e-06"]),
                number_text(["0", "1e-300", "1.0001"])),
    "--seed": (st.sampled_from(["0", "7", str(2**64 - 1)]), st.sampled_from([str(2**64), "-1", "x", "1.0"])),
    "--device": (st.sampled_from(["cpu", "auto"]), st.sampled_from(["gpu", "cuda:x", "", "meta"])),
    "--kernels": (st.sampled_from(["auto", "torch"]), st.sampled_from(["bogus", "TORCH"])),
    "--precision": (st.sampled_from(["auto", "float32"]), st.sampled_from(["float8", ""])),
    "--var-checkpoint": (st.nothing(), st.sampled_from(["missing.safetensors", "file"])),  # never a good one
    "--relaxed-delta": (st.floats(0, 1).map(repr), number_text(["1.5", "-0.0001"])),
}


PARTS = ["--speculative", "--method", "--out", "--stats-json", "--classes", "--compile", "unknown flag",
         *GENERATE_OPTIONS]


@st.composite
def generate_case(draw) -> dict:
    """One ``generate`` command line and what the test needs to judge it. About a third of the cases are
    "wild": one or two of their parts are wrong or anything at all; the others must succeed."""
    broken = draw(st.sets(st.sampled_from(PARTS), min_size=1, max_size=2) if draw(st.integers(0, 2)) == 0
                  else st.just(set()))

    def pick(part, good, bad):
        return draw(bad if part in broken else good)

    speculative = pick("--speculative", st.sampled_from([None] * 4 + ["draft", "jacobi"]),
                       st.sampled_from(["medusa", "draft", "jacobi"]))
    method = pick("--method", st.sampled_from(["ar"] if speculative in ("draft", "jacobi") else ["ar", "var"]),
                  st.sampled_from(["gpt", "var", ""]))
    out = pick("--out", st.sampled_from(GOOD_OUT), st.sampled_from(BAD_OUT))
    stats = pick("--stats-json", st.sampled_from([None, *GOOD_STATS]), st.sampled_from(BAD_STATS))
    few = st.lists(st.integers(0, 9), min_size=1, max_size=1 if speculative else 3)
    classes = pick("--classes", few | st.none() if speculative is None else few,  # None: all 10 classes
                   st.lists(st.integers(-3, 12), min_size=1, max_size=3) | st.lists(st.integers(10, 10**30),
                                                                                     max_size=1))
    names = set(draw(st.lists(st.sampled_from(sorted(GENERATE_OPTIONS)), max_size=4)))
    names = (names - {"--var-checkpoint", "--relaxed-delta"}) | (broken & set(GENERATE_OPTIONS))
    if speculative == "jacobi" or "--relaxed-delta" in broken:
        names.add("--relaxed-delta")
    values = {name: pick(name, *GENERATE_OPTIONS[name]) for name in sorted(names)}
    argv = ["generate", "--out", out, "--method", method]
    if speculative is not None:
        argv += ["--speculative", speculative]
    if "--compile" in broken:
        argv += ["--compile", "--speculative", "jacobi"]  # must fail before compiling anything
    if stats is not None:
        argv += ["--stats-json", stats]
    if classes is not None:
        argv += ["--classes", *map(str, classes)] if classes else ["--classes"]
    for name, value in values.items():
        argv += [f"{name}={value}"] if draw(st.booleans()) else [name, value]
    if "unknown flag" in broken:
        argv.insert(draw(st.integers(1, len(argv))), draw(unknown_flag()))
    return {"argv": argv, "out": out, "stats": stats, "classes": classes, "values": values, "wild": bool(broken)}


def _resolve(folder: Path, path: str) -> Path:
    """Where a path of the command line landed (the example ran in ``folder``)."""
    return Path(path) if path.startswith("/") else folder / path


@fuzz(250)
@given(case=generate_case())
def test_fuzz_generate(capsys, loads, base, case):
    record("generate CLI", 1)
    folder = fresh_folder(base)
    cwd = os.getcwd()
    os.chdir(folder)  # relative paths land in the example's own folder
    try:
        loaded_before = len(loads)
        status, _, err = run(capsys, *case["argv"])
    finally:
        os.chdir(cwd)
    bad_path = case["out"] in BAD_OUT or case["stats"] in BAD_STATS
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if status != 0:
        line = error_line(err)
        assert status == 2, f"a failure the argument checks let through: {line} <- {case['argv']}"
        assert case["wild"], f"a valid command line failed: {line} <- {case['argv']}"
        assert written == ["file"], f"left behind {written} <- {case['argv']}"  # no output, no temporary file
        if bad_path:
            assert len(loads) == loaded_before, "a bad output path must be refused before loading any model"
        return
    assert not bad_path and not any(is_nonfinite(v) for v in case["values"].values()), case["argv"]
    per_class = int(case["values"].get("--per-class", "1"))
    zoom = int(case["values"].get("--zoom", "2"))
    n_classes = 10 if case["classes"] is None else len(case["classes"])
    with Image.open(_resolve(folder, case["out"])) as img:
        assert img.format == "PNG" and img.size == grid_size(n_classes, per_class, zoom)
    if case["stats"] is not None:
        stats = json.loads(_resolve(folder, case["stats"]).read_text(encoding="utf-8"), parse_constant=pytest.fail)
        assert stats["images"] == n_classes * per_class
    expected = {case["out"], *([case["stats"]] if case["stats"] else [])}
    assert written == sorted({"file", *expected}), written


# -- grade --------------------------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)


@st.composite
def broken_notebook(draw) -> bytes:
    """JSON shaped more or less like a notebook: a version, cells of random shapes, maybe metadata."""
    cell = st.one_of(JSON, st.fixed_dictionaries(
        {"cell_type": st.sampled_from(["code", "markdown", "raw", "weird", 3]), "source": JSON | st.text(max_size=20),
         "metadata": st.sampled_from([{}, {"tags": ["exercise"]}, {"tags": "setup"}, []])},
        optional={"outputs": JSON, "execution_count": JSON}))
    nb = {"nbformat": draw(st.sampled_from([4, 4, 3, 5, 2, 1, 0, "4", None, 4.0, True, -1])),
          "nbformat_minor": draw(st.sampled_from([0, 4, 5, 99, -1, "a", None])),
          "cells": draw(st.one_of(st.lists(cell, max_size=3), JSON))}
    if draw(st.booleans()):
        nb["metadata"] = draw(st.sampled_from([{}, [], None, {"kernelspec": 1}]))
    return json.dumps(nb).encode()


UNTAGGED = nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])).encode()


@fuzz(150)
@given(content=st.one_of(st.binary(max_size=300), st.just(b""), st.text(max_size=100).map(str.encode),
                         JSON.map(lambda v: json.dumps(v).encode()), broken_notebook(), broken_notebook(),
                         st.just(UNTAGGED)),
       suffix=st.sampled_from([".ipynb"] * 6 + [".py", ".txt", ".IPYNB", ""]),
       options=st.lists(st.tuples(st.sampled_from(["--timeout", "--cell-timeout"]),
                                  number_text(["1", "600", "86400"], ["0", "86401"])),
                        max_size=2),
       json_out=st.sampled_from([None, None, "r.json", "r.json", "file/r.json", ".", "r.txt"]))
def test_fuzz_grade_bad_files(capsys, base, content, suffix, options, json_out):
    record("grade CLI", 1)
    folder = fresh_folder(base)
    path = folder / f"nb{suffix}"
    path.write_bytes(content)
    argv = ["grade", path, *[f"{o}={v}" for o, v in options]]
    if json_out is not None:
        argv += ["--json", folder / json_out]
    status, out, err = run(capsys, *argv)
    line = error_line(err)
    assert status == 2 and out == "", line  # refused before any kernel started (it would print a table)
    assert str(path) in line or "--json" in line or "timeout" in line, line
    assert sorted(p.name for p in folder.iterdir()) == sorted(["file", path.name])  # no JSON written


# -- train, bench, doctor, the top level --------------------------------------------------------------------

BAD_INT = st.sampled_from(["many", "1.5", "nan", "", "1e3", "0x10"])


@fuzz(60)
@given(what=st.one_of(st.sampled_from(sorted(cli.TRAINERS)), st.text(max_size=10)),
       bad=st.lists(st.tuples(st.sampled_from(["--steps", "--seed", "--batch-size", "--lr"]), BAD_INT), max_size=2),
       ending=st.one_of(unknown_flag().filter(lambda f: f.startswith("-")), st.just("--help")))
def test_fuzz_train_fails_fast(capsys, what, bad, ending):
    record("train CLI", 1)
    # every command line ends in an unknown flag or --help: a trainer's parser stops before any training
    argv = ["train", what, *[f"{o}={v}" for o, v in bad], ending]
    status, out, err = run(capsys, *argv)
    if status == 0:
        assert "--help" in argv or what in ("-h", "--help") and "usage" in out.lower()
    else:
        error_line(err)
        assert status == 2


@fuzz(40)
@given(names=st.lists(st.one_of(st.sampled_from(sorted(bench.available())),
                                st.text(max_size=12).filter(lambda t: not t.startswith("-"))), max_size=3),
       extra=st.lists(unknown_flag(), max_size=1))
def test_fuzz_bench_names(capsys, names, extra):
    record("bench CLI", 1)
    known = set(bench.available())
    argv = ["bench", *names, *extra]
    if all(n in known for n in names) and not extra:
        argv.append("--table")  # only print results: never run a benchmark here
    status, _, err = run(capsys, *argv)
    if status == 0:
        assert "--table" in argv and err == ""
    else:
        error_line(err)
        assert status == 2


@fuzz(40)
@given(command=st.sampled_from(["doctor", "bench", "grade", "generate", "frobnicate", "", "GENERATE", "train "]),
       tokens=st.lists(st.one_of(unknown_flag(), st.text(min_size=1, max_size=8)), min_size=1, max_size=3))
def test_fuzz_flags_of_every_command(capsys, command, tokens):
    record("command flags CLI", 1)
    # doctor and bench must not start their work: at least one token is a flag no parser knows
    argv = [command, *tokens, "--unknown-option"]
    status, out, err = run(capsys, *argv)
    assert status == 2 or (status == 0 and "usage" in out), (argv, err)
    if status:
        error_line(err)
