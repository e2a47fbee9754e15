"""What benchmarks/gpu_report.py does that a CPU machine can check: the table and the files written from a
synthetic gpu.json, the one-line error without a GPU, the time budget (parts skipped or cut off, system rows
skipped), and reading pytest's output. The report itself runs on a GPU (`make gpu-report`)."""

import ast
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_report.py"

SYNTHETIC = {  # made-up numbers in the shape the report writes: nothing here was measured
    "device": "Example GPU", "date": "2000-01-01", "versions": {"torch": "0.0"}, "budget_s": 290.0,
    "parts": {"tests": {"status": "ok", "seconds": 1.0}, "kernels": {"status": "ok", "seconds": 1.0},
              "system": {"status": "timed out", "seconds": 1.0, "note": "cut off"}},
    "tests": {"passed": 3, "failed": 1, "skipped": 2, "failures": ["tests/t.py::test_x: AssertionError: no"]},
    "kernels": {"matmul_bf16_tflops": 1.0, "copy_bandwidth_gbs": 2000.0,
                "flash_attention": [{"T": 8, "causal": True, "triton_ms": 2.0, "sdpa_ms": 1.0,
                                     "speed_vs_sdpa": 0.5, "fraction_of_matmul_peak": 0.25}],
                "decode_attention": [{"T": 8, "backend": "triton", "ms": 1.0, "fraction_of_copy_bandwidth": 0.5}],
                "vq_nearest": [{"N": 8, "cdist_ms": 3.0, "triton_ms": 1.0}]},
    "system": {"rows": [
        {"config": "VAR, torch, graphs", "batch": 64, "images_per_second": 1234.0, "first_call_seconds": 1.5,
         "capture_seconds": 0.5, "gpu_busy_fraction": 0.5, "launches_per_call": 12, "backends": {"fallbacks": []}},
        {"config": "VAR, auto, eager", "batch": 64, "error": "RuntimeError: broken"}],
        "skipped": ["raster AR, auto, graphs, batch 1024"]},
}


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_report"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_report"]


def test_table_and_files_from_a_synthetic_report(report, tmp_path, capsys):
    report.write_report(SYNTHETIC, tmp_path)
    assert json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8")) == SYNTHETIC
    assert (tmp_path / "gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json", "gpu.png"]  # no temporary file left
    table = report.render_table(SYNTHETIC)
    assert table.startswith("Measured on Example GPU on 2000-01-01")
    assert "GPU tests: 3 passed, 1 failed, 2 skipped." in table and "tests/t.py::test_x: AssertionError" in table
    assert "| VAR, torch, graphs | 64 | 1,234 | 1.50 | 0.50 | 50% | 12 | - / - (-) |" in table
    assert "| VAR, auto, eager | 64 | error: RuntimeError: broken |" in table
    assert "not measured (time budget): raster AR, auto, graphs, batch 1024" in table
    assert "| FlashAttention (Triton) causal | T=8 | 2.000 ms | SDPA 1.000 ms | 0.50x | 25% of matmul |" in table
    assert "| nearest code (triton) | N=8 | 1.000 ms | cdist 3.000 ms | 3.00x | |" in table
    assert "- system: timed out: cut off" in table
    assert report.main(["--table", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out == table
    assert report.main(["--table", "--out", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("error: no GPU report at")
    for text, why in (("{not json", "JSONDecodeError"), ('{"date": "2000-01-01"}', "KeyError: 'device'")):
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "gpu.json").write_text(text)
        assert report.main(["--table", "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / 'bad' / 'gpu.json'} is not a GPU report ({why}")
        assert err.count("\n") == 1


def test_without_cuda_the_report_stops_with_one_line(report, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert report.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no CUDA GPU: torch ") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_without_torch_the_report_stops_with_one_line(report, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails, as with a Python that lacks it
    assert report.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {sys.executable} cannot import torch (") and err.count("\n") == 1
    assert err.rstrip().endswith("run the report with the Python that has it") and not list(tmp_path.iterdir())


def test_the_budget_gives_each_part_its_share_at_most_what_is_left(report):
    now = [0.0]
    budget = report.Budget(100.0, clock=lambda: now[0])
    assert budget.share(60.0, later_s=40.0) == 60.0
    now[0] = 70.0
    assert budget.left() == 30.0 and budget.share(60.0, later_s=40.0) == 30.0
    now[0] = 150.0
    assert budget.share(60.0) == 0.0
    status, output = report.run_part("kernels", ["true"], report.MIN_PART_S - 1)
    assert status["status"] == "skipped" and "budget left for kernels" in status["note"] and output == ""


def test_a_part_that_overruns_is_cut_off_and_a_failing_one_noted(report, monkeypatch):
    monkeypatch.setattr(report, "MIN_PART_S", 0.0)
    slow = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"]
    status, output = report.run_part("system", slow, 2.0)
    assert status["status"] == "timed out" and status["seconds"] < 25 and "cut off" in status["note"]
    status, _ = report.run_part("kernels", [sys.executable, "-c", "raise SystemExit('boom')"], 20.0)
    assert status["status"] == "failed" and status["note"] == "exited with an error: boom"


def _ended(pid: int) -> bool:
    """Whether process ``pid`` is gone (or a zombie nobody reaped yet) within 5 s: a kill is delivered at once,
    the kernel may take a moment to reap (Linux /proc)."""
    status_file = Path(f"/proc/{pid}/status")
    for _ in range(50):
        if not status_file.exists() or "\tZ" in status_file.read_text(encoding="utf-8"):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_a_part_interrupted_by_ctrl_c_goes_with_the_report(report, monkeypatch, tmp_path):
    """The part runs in a session of its own, so Ctrl-C reaches only the report: it must take the part along."""
    monkeypatch.setattr(report, "MIN_PART_S", 0.0)
    started = []
    real_popen = report.subprocess.Popen

    class Interrupted(real_popen):  # the part starts, then Ctrl-C arrives while the report waits on it
        def communicate(self, *args, **kwargs):
            if not started:
                started.append(self.pid)
                raise KeyboardInterrupt
            return super().communicate(*args, **kwargs)

    monkeypatch.setattr(report.subprocess, "Popen", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.run_part("tests", [sys.executable, "-c", "import time; time.sleep(60)"], 30.0)
    assert _ended(started[0]), "the part outlived the interrupted report"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_a_part_cut_off_takes_the_processes_it_started_with_it(report, monkeypatch, tmp_path):
    """A part's child process (a test's subprocess) holds the output pipes: killing only the part kept the report
    waiting for the child, past the budget, and left it running on the GPU."""
    monkeypatch.setattr(report, "MIN_PART_S", 0.0)
    pid_file = tmp_path / "child.pid"
    spawn = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
             f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); print('started', flush=True); "
             "time.sleep(60)")
    start = time.monotonic()
    status, output = report.run_part("tests", [sys.executable, "-c", spawn], 3.0)
    assert status["status"] == "timed out" and time.monotonic() - start < 30 and "started" in output
    assert _ended(int(pid_file.read_text(encoding="utf-8"))), "the part's child is still running"


def test_system_measurements_past_the_budget_are_skipped_with_a_note(report, monkeypatch, tmp_path):
    import ar_course.system

    now = [0.0]

    def fake_measure(gen, classes, options):
        now[0] += 10.0  # every measurement takes 10 s of the fake clock
        return {"images_per_second": float(len(classes))}

    monkeypatch.setattr(ar_course.system.Generator, "from_pretrained", classmethod(lambda cls, *a, **k: None))
    monkeypatch.setattr(report, "measure_one", fake_measure)
    out = tmp_path / "system.json"
    report.measure_system(out, 100.0, batches=(64, 256), clock=lambda: now[0])
    system = json.loads(out.read_text(encoding="utf-8"))["system"]
    measured = [(r["config"], r["batch"]) for r in system["rows"]]
    assert measured[:2] == [("VAR, torch, eager", 64), ("VAR, torch, eager", 256)]
    assert len(measured) == 7  # 100 s: a measurement starts while more than 3 x 10 + 5 s are left
    assert len(system["skipped"]) == 2 * len(report.CONFIGS) - 7
    assert system["skipped"][-1] == "raster AR, auto, graphs, batch 256"


def test_pytest_output_is_counted_even_when_cut_off(report):
    complete = "\n".join([
        "tests/a.py::test_one PASSED                [ 25%]",
        "tests/a.py::test_two FAILED                [ 50%]",
        "tests/b.py::test_three SKIPPED (needs x)   [ 75%]",
        "tests/b.py::test_four ERROR                [100%]",
        "FAILED tests/a.py::test_two - AssertionError: 1 != 2",
        "ERROR tests/b.py::test_four - RuntimeError: CUDA",
    ])
    assert report.read_pytest(complete) == {"passed": 1, "failed": 2, "skipped": 1, "failures": [
        "tests/a.py::test_two: AssertionError: 1 != 2", "tests/b.py::test_four: RuntimeError: CUDA"]}
    cut_off = "\n".join(complete.splitlines()[:2])
    assert report.read_pytest(cut_off) == {"passed": 1, "failed": 1, "skipped": 0,
                                           "failures": ["tests/a.py::test_two"]}
    files = report.gpu_test_files()
    assert "tests/test_graphs_gpu.py" in files and "tests/test_gpu_report.py" not in files
    uncollected = complete + "\nERROR tests/c.py - ModuleNotFoundError: No module named 'hypothesis'"
    assert report.read_pytest(uncollected)["failed"] == 3  # a file whose tests never ran is one failure
    assert report.read_pytest(uncollected)["failures"][-1] == "tests/c.py: ModuleNotFoundError: No module named " \
                                                              "'hypothesis'"
    missing_module = "\n".join([  # pytest prints the reason of an import error only in its ERRORS section
        "==================================== ERRORS ====================================",
        "_______________________ ERROR collecting tests/d.py _______________________",
        "ImportError while importing test module '/x/tests/d.py'.",
        "tests/d.py:1: in <module>",
        "    import hypothesis",
        "E   ModuleNotFoundError: No module named 'hypothesis'",
        "=========================== short test summary info ============================",
        "ERROR tests/d.py",
    ])
    assert report.read_pytest(missing_module) == {"passed": 0, "failed": 1, "skipped": 0, "failures": [
        "tests/d.py: ModuleNotFoundError: No module named 'hypothesis'"]}
    assert "--continue-on-collection-errors" in report.tests_command()


DEVICE_PACKAGES = {"pytest", "torch", "numpy", "triton", "numba", "matplotlib", "safetensors", "tqdm", "ar_course"}
"""What the lent GPU machine has besides the standard library (its README): no hypothesis, Jupyter or scipy."""


def _module_imports(path: Path) -> set[str]:
    """The top-level names a test module imports when it is collected (module level, not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_gpu_test_files_import_only_what_the_gpu_machine_has(report):
    """A GPU test file that imports hypothesis (test_serving.py did) fails to collect there, and its tests
    never run: the report then counted nothing (audit 23). Local helper modules are followed."""
    tests = ROOT / "tests"
    todo = [ROOT / f for f in report.gpu_test_files()] + [tests / "conftest.py", ROOT / "conftest.py"]
    seen, missing = set(), {}
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        for name in _module_imports(path):
            if (tests / f"{name}.py").is_file():
                todo.append(tests / f"{name}.py")  # a helper module of the tests: what it imports counts too
            elif name not in sys.stdlib_module_names and name not in DEVICE_PACKAGES:
                missing.setdefault(path.name, set()).add(name)
    assert not missing, missing


def test_kernel_sections_are_written_as_they_finish(report, monkeypatch, tmp_path):
    import bench_kernels  # gpu_report put benchmarks/ on sys.path

    monkeypatch.setattr(bench_kernels, "gpu_ceilings", lambda: {"device": "x", "matmul_bf16_tflops": 2.0,
                                                                "copy_bandwidth_gbs": 3.0})
    monkeypatch.setattr(bench_kernels, "bench_flash", lambda tflops: [{"T": 1, "ceiling": tflops}])

    def cut_off(gbs):
        raise KeyboardInterrupt  # what the part's time limit does to a section still running

    monkeypatch.setattr(bench_kernels, "bench_decode", cut_off)
    out = tmp_path / "kernels.json"
    with pytest.raises(KeyboardInterrupt):
        report.measure_kernels(out)
    assert json.loads(out.read_text(encoding="utf-8")) == {"kernels": {"device": "x", "matmul_bf16_tflops": 2.0,
                                                       "copy_bandwidth_gbs": 3.0,
                                                       "flash_attention": [{"T": 1, "ceiling": 2.0}]}}


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_every_eager_configuration_is_measured_and_profiled_on_cpu(report):
    """The report's own measuring code (Generator options, stats fields, the profiler's event fields) on the CPU,
    so that a GPU run does not lose rows to a typo: no GPU work there, so the busy fraction is 0."""
    from ar_course.system import Generator

    gen = Generator.from_pretrained("mnist", device="cpu")
    eager = {name: options for name, options in report.CONFIGS.items() if not options.get("graphs")}
    assert len(eager) == len(report.CONFIGS) // 2
    pairs = list(report.CONFIGS.items())  # a torch row, then its auto row: a budget cut leaves pairs to compare
    for (torch_name, torch_options), (auto_name, auto_options) in zip(pairs[::2], pairs[1::2]):
        assert torch_options == {**auto_options, "kernels": "torch"} and auto_options["kernels"] == "auto"
        assert auto_name == torch_name.replace("torch", "auto")
    for name, options in eager.items():
        row = report.measure_one(gen, torch.arange(2) % 10, options)
        assert "profile_error" not in row, (name, row)
        assert row["images_per_second"] > 0 and row["first_call_seconds"] > 0 and row["seconds"] > 0, name
        assert row["gpu_busy_fraction"] == 0.0 and row["launches_per_call"] == 0 and row["gpu_kernels_per_call"] == 0
        assert row["backends"]["attention"] == "torch" and row["precision"] == "float32", (name, row)
        json.dumps(row, allow_nan=False, default=str)  # as _write_json writes it


def test_a_kernel_section_that_fails_is_recorded_and_the_next_ones_run(report, monkeypatch, tmp_path):
    """A section raising (numba-cuda or Triton on the device) lost every later section and the rows already
    measured; now it is one ``<section>_error`` line and the table says so."""
    import bench_kernels

    monkeypatch.setattr(bench_kernels, "gpu_ceilings", lambda: {"device": "x", "matmul_bf16_tflops": 2.0,
                                                                "copy_bandwidth_gbs": 3.0})

    def broken(tflops):
        raise RuntimeError("tl.dot: both operands must be same dtype\nmore")

    monkeypatch.setattr(bench_kernels, "bench_flash", broken)
    monkeypatch.setattr(bench_kernels, "bench_decode", lambda gbs: [
        {"T": 8, "backend": "triton", "ms": 1.0, "fraction_of_copy_bandwidth": 0.5},
        {"T": 8, "backend": "numba", "error": "NumbaError: no row_stack"}])
    monkeypatch.setattr(bench_kernels, "bench_vq", lambda: [{"N": 8, "cdist_ms": 3.0, "triton_ms": 1.0,
                                                             "numba_error": "NumbaError: no row_stack"}])
    out = tmp_path / "kernels.json"
    report.measure_kernels(out)
    kernels = json.loads(out.read_text(encoding="utf-8"))["kernels"]
    assert kernels["flash_attention_error"] == "RuntimeError: tl.dot: both operands must be same dtype"
    assert "flash_attention" not in kernels and len(kernels["decode_attention"]) == 2 and kernels["vq_nearest"]
    table = report.render_table({**SYNTHETIC, "kernels": kernels})
    assert "- flash_attention: failed: RuntimeError: tl.dot: both operands must be same dtype" in table
    assert "| decode attention (numba) | T=8 | error: NumbaError: no row_stack | | | |" in table
    assert "| decode attention (triton) | T=8 | 1.000 ms | | | 50% of copy |" in table
    assert "| nearest code (numba) | N=8 | error: NumbaError: no row_stack | | | |" in table


def test_time_a_part_leaves_unused_goes_to_the_next_parts(report):
    """The kernels part kept its 60 s share when the tests took 1 s of their 120 s."""
    now = [0.0]
    budget = report.Budget(290.0, clock=lambda: now[0])
    shares = list(report.PARTS.values())  # tests, kernels, system
    assert budget.share(shares[0], later_s=sum(shares[1:])) == shares[0]
    now[0] = 1.0  # the tests part ended at once
    assert budget.share(shares[1], later_s=shares[2]) == 289.0 - shares[2]
    now[0] = 250.0  # a part that ran long: the next gets what is left, never more
    assert budget.share(shares[2]) == 40.0


def test_the_table_keeps_the_skipped_rows_apart_and_says_skipped_once(report):
    table = report.render_table(SYNTHETIC)
    assert "batch 1024\n\nCeilings measured" in table  # a list item, then a paragraph (not part of the item)
    status, _ = report.run_part("kernels", ["true"], report.MIN_PART_S - 1)
    table = report.render_table({**SYNTHETIC, "parts": {"kernels": status}})
    assert "- kernels: skipped: 9 s of the 290 s budget left for kernels" in table


def test_the_gpu_tests_run_each_triton_kernel_on_its_first_configuration(report, monkeypatch):
    """Autotuning every configuration for every kind of call the GPU tests make was most of the tests' share
    (estimated 115-200 s of 120 s on a cold machine): they check answers, so they run untuned; the kernels part
    measures with autotuning."""
    from ar_course.kernels import env
    from ar_course.kernels import triton_kernels as tk

    assert report._env("tests")[env.AUTOTUNE_ENV] == "0" and env.AUTOTUNE_ENV not in report._env("kernels")
    monkeypatch.setattr(env, "triton_interpreted", lambda: False)  # as on a GPU
    configs = ["first", "second", "third"]
    monkeypatch.delenv(env.AUTOTUNE_ENV, raising=False)
    assert tk._configs(["interpreted"], configs) == configs
    monkeypatch.setenv(env.AUTOTUNE_ENV, "0")
    assert tk._configs(["interpreted"], configs) == ["first"]


def test_the_table_names_the_kernels_that_ran_and_a_cut_off_part_lists_what_it_never_reached(report):
    row = {**SYNTHETIC["system"]["rows"][0], "precision": "bfloat16",
           "backends": {"attention": "triton x6", "decode_attention": "none", "fallbacks": []}}
    table = report.render_table({**SYNTHETIC, "system": {"rows": [row], "skipped": []}})
    assert "| VAR, torch, graphs | 64 | 1,234 | 1.50 | 0.50 | 50% | 12 | triton x6 / none (bfloat16) |" in table
    system = {"rows": [{"config": "VAR, torch, eager", "batch": 64}], "skipped": ["VAR, torch, eager, batch 1024"]}
    missing = report.not_reached(system)
    assert "VAR, torch, eager, batch 256 (the part ended first)" in missing
    assert len(missing) == len(report.CONFIGS) * len(report.BATCHES) - 2


def test_the_report_lists_the_system_rows_a_cut_off_part_never_started(report, monkeypatch, tmp_path):
    """run_report with its parts stood in for: the system part is cut off after one row."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Stand-in GPU")
    monkeypatch.setattr(report, "write_report", lambda rep, out: None)

    def run_part(name, command, seconds):
        if name == "system":
            out = Path(command[command.index("--part-out") + 1])
            out.write_text(json.dumps({"system": {"rows": [{"config": "VAR, torch, eager", "batch": 64,
                                                            "error": "x"}], "skipped": []}}), encoding="utf-8")
            return {"status": "timed out", "seconds": seconds, "note": "cut off"}, ""
        return {"status": "skipped", "seconds": 0.0, "note": "stand-in"}, ""

    monkeypatch.setattr(report, "run_part", run_part)
    got = report.run_report(tmp_path)
    assert got["system"]["skipped"][0] == "VAR, torch, eager, batch 256 (the part ended first)"
    assert len(got["system"]["skipped"]) == len(report.CONFIGS) * len(report.BATCHES) - 1
