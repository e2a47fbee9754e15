"""The logic of benchmarks/bench_system.py that a CPU machine can exercise: the profiler-based attention time
(on CPU ops instead of CUDA kernels), the summary rows with and without a GPU section, and merging a GPU
machine's section into a CPU run's results. Speeds themselves are never asserted."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ar_course.system import Generator

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_system.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_system", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_rows(bench) -> list[dict]:
    """Synthetic CPU configuration rows: VAR + kernels at 300 img/s, raster AR at 100, the rest between."""
    speed = {"VAR + kernels": 300.0, "VAR": 290.0, "VAR compiled": 330.0, "raster AR": 100.0,
             "raster AR compiled": 150.0}
    return [{"name": name, **kwargs, "timing_batch": 10, "images_per_second": speed.get(name, 20.0),
             "class_accuracy": 0.96, "frechet_distance": 3.0, "passes_per_image": 6.0 if kwargs["method"] == "var"
             else 20.0, "acceptance_rate": None, "backends": {"attention": "torch"}}
            for name, kwargs in bench.CONFIGS.items()]


def gpu_result(attention: dict) -> dict:
    ips = {"images_per_second": 5000.0, "batch": 64, "backends": {"attention": "triton"}, "precision": "bfloat16"}
    return {"measured": True, "device": "Some GPU", "date": "2026-11-23", "VAR bf16 + kernels": ips,
            "VAR bf16 torch": {**ips, "images_per_second": 4000.0},
            "VAR bf16 compiled": {**ips, "images_per_second": 6000.0}, "raster AR bf16": ips,
            "raster AR bf16 compiled": ips, "attention_inside_var": attention}


def test_attention_time_on_cpu_counts_the_fused_attention_ops(bench):
    gen = Generator.from_pretrained("mnist", device="cpu")
    t = bench.attention_time_ms(gen, torch.arange(4), 0, "cpu", method="var", kernels="torch")
    assert 0 < t["attention_ms"] < t["total_ms"]
    assert t["attention_kernels"] and all("attention" in k.lower() for k in t["attention_kernels"])


def test_summary_reports_cpu_targets_and_a_missing_gpu(bench):
    sweep = [{"batch": 1, "ratio": 6.0}, {"batch": 10, "ratio": 3.0}]
    rows = {r["what"]: r for r in bench.summarize(cpu_rows(bench), sweep, {"measured": False})}
    ratio = next(r for w, r in rows.items() if w.startswith("VAR + kernels vs raster AR"))
    assert ratio["measured"].startswith("3.0x") and ratio["met"] is False
    fastest = next(r for w, r in rows.items() if w.startswith("fastest configuration"))
    assert fastest["measured"].startswith("VAR compiled") and fastest["met"] is True
    by_batch = next(r for w, r in rows.items() if "by batch size" in w)
    assert by_batch["met"] is False and "batch 10: 3.0x" in by_batch["measured"]
    assert rows["GPU: batch-64 VAR generation"]["measured"].startswith("not measured")


def test_merging_a_gpu_section_keeps_the_cpu_half_and_adds_gpu_rows(bench):
    cpu = {"date": "2026-11-20", "configs": cpu_rows(bench), "batch_sweep": [{"batch": 1, "ratio": 6.0}],
           "gpu": {"measured": False}, "summary": []}
    inside = {"kernels": {"attention_ms": 2.0}, "sdpa": {"attention_ms": 3.0}, "speed_vs_sdpa": 1.5}
    merged = bench.merge_gpu(cpu, gpu_result(inside))
    assert merged["date"] == "2026-11-20" and merged["configs"] == cpu["configs"]
    rows = {r["what"]: r for r in merged["summary"]}
    assert rows["batch-64 VAR generation on Some GPU"]["measured"].startswith("5000 img/s (triton)")
    assert rows["attention kernels inside batch-64 VAR generation vs SDPA (GPU time)"]["measured"] == \
        "1.50x (2.00 vs 3.00 ms)"
    failed = bench.merge_gpu(cpu, gpu_result({"error": "RuntimeError: no attention kernels"}))
    assert any(r["measured"] == "RuntimeError: no attention kernels" for r in failed["summary"])
    json.dumps(merged)  # stays writable as JSON


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_only_without_a_gpu_fails_clearly(bench, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--gpu-only"])
    assert exit_.value.code == 2 and "no CUDA device" in capsys.readouterr().err
