"""Every ``benchmarks/bench_*.py`` takes ``--out``, so that a rerun can write somewhere other than the committed
``benchmarks/results`` (nothing is measured: ``--help`` in-process, and bench_code with its measurements stubbed)."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ar_course import cli

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("bench_*.py"))


def load(path: Path, monkeypatch=None):
    """``benchmarks/NAME.py`` as a module, registered in ``sys.modules`` only for the test when ``monkeypatch`` is
    given (a module with dataclasses needs it)."""
    spec = importlib.util.spec_from_file_location(f"bench_out_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_there_are_fifteen_benchmark_scripts():
    assert len(SCRIPTS) == 15, [p.name for p in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_benchmark_script_lists_out_in_its_help(script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import one another
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])  # bench_speculative's main() reads sys.argv
    module = load(script)
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    assert "--out" in capsys.readouterr().out


@pytest.fixture
def bench_code(monkeypatch):
    """bench_code with its measurements stubbed: no fresh interpreters, no git."""
    module = load(BENCHMARKS / "bench_code.py")
    monkeypatch.setattr(module, "git_commit", lambda: "abc1234")
    monkeypatch.setattr(module, "time_import",
                        lambda m, repeats: {"module": m, "seconds": 0.1, "heavy": [], "env_changed": []})
    monkeypatch.setattr(module, "long_functions", lambda package: [])
    return module


def test_bench_code_writes_its_json_and_png_into_a_new_out_folder(bench_code, tmp_path, monkeypatch):
    committed = tmp_path / "committed"
    monkeypatch.setattr(bench_code, "RESULTS", committed)  # the default folder: must stay untouched
    out = tmp_path / "new" / "folder"
    assert bench_code.main(["--out", str(out), "--label", "mine"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["code.json", "code.png"]
    assert list(json.loads((out / "code.json").read_text(encoding="utf-8"))["runs"]) == ["mine"]
    assert not committed.exists()
    assert bench_code.main(["--out", str(out), "--label", "again"]) == 0  # merges with the code.json there
    assert list(json.loads((out / "code.json").read_text(encoding="utf-8"))["runs"]) == ["mine", "again"]


def test_bench_code_without_out_writes_to_the_results_folder_as_before(bench_code, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_code, "RESULTS", tmp_path / "results")
    assert bench_code.main(["--label", "mine"]) == 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["code.json", "code.png"]


class _Parsed(Exception):
    """Raised in place of parsing: carries the parser a script built."""


def _parser_of(script: Path, monkeypatch) -> cli.ArgumentParser:
    """The argument parser ``script``'s ``main()`` builds (caught at ``parse_args``, before any work)."""
    def caught(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.setattr(cli.ArgumentParser, "parse_args", caught)
    module = load(script, monkeypatch)
    with pytest.raises(_Parsed) as parsed:
        module.main()
    return parsed.value.args[0]


FREE_TEXT = {"--label"}
"""Options whose value is any text (a name for the measurement)."""


@pytest.mark.parametrize("script", SCRIPTS + [BENCHMARKS / "gpu_report.py"], ids=lambda p: p.stem)
def test_every_value_a_benchmark_script_takes_is_checked_by_a_cli_type(script, monkeypatch):
    """Each option that takes a value has a ``type=`` helper of :mod:`ar_course.cli` (or fixed choices), so a bad
    value is one ``error:`` line before any work, not a traceback minutes later."""
    parser = _parser_of(script, monkeypatch)
    assert isinstance(parser, cli.ArgumentParser)
    unchecked = [a.option_strings[0] for a in parser._actions
                 if a.option_strings and a.nargs != 0 and a.choices is None and a.option_strings[0] not in FREE_TEXT
                 and getattr(a.type, "__module__", None) != cli.__name__]
    assert unchecked == []


@pytest.mark.parametrize(("script", "argv", "line"), [
    ("bench_kv_cache", ["--repeats", "0"], "error: --repeats must be an integer >= 1, got 0"),
    ("bench_kv_cache", ["--out", ""], "error: --out must be a path, got ''"),
    ("bench_raster", ["--cfgs", "0,x"], "error: --cfgs must be comma-separated finite numbers, got '0,x'"),
    ("bench_align", ["--hack-kls", "0,-1"], "error: --hack-kls must be comma-separated finite numbers >= 0, got "
                                            "'0,-1'"),
    ("bench_speculative", ["--temperatures", "1", "nan"], "error: --temperatures must be a finite number >= 0, "
                                                          "got nan"),
    ("bench_tokenizers", ["--threads", "-1"], "error: --threads must be an integer >= 0, got -1"),
])
def test_a_bad_benchmark_option_is_one_error_line_and_exit_2(script, argv, line, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])  # bench_speculative's main() reads sys.argv
    module = load(BENCHMARKS / f"{script}.py")
    with pytest.raises(SystemExit) as exit_:
        module.main(argv) if script != "bench_speculative" else module.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"{line} (see {script}.py --help)\n"


def test_float_list_reads_comma_separated_numbers():
    assert cli.float_list()("-1,0,0.5") == (-1.0, 0.0, 0.5)
    assert cli.float_list(0, allow_empty=True)(" ") == ()
    for bad in ("", "1,,2", "1,inf", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated finite numbers"):
            cli.float_list()(bad)
