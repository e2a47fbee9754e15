"""Every ``benchmarks/bench_*.py`` takes ``--out``, so that a rerun can write somewhere other than the committed
``benchmarks/results`` (nothing is measured: ``--help`` in-process, and bench_code with its measurements stubbed)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("bench_*.py"))


def load(path: Path):
    """``benchmarks/bench_NAME.py`` as a module (not registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(f"bench_out_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
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
