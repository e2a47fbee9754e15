"""The library installed from its wheel, with its core dependencies only (torch, numpy, safetensors, tqdm),
into a fresh virtual environment outside the checkout: the shipped checkpoints load through the registry and
``ar_course.system.Generator`` and ``python -m ar_course generate`` make images, without Jupyter, plotting,
numba, Triton or any file of the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the version the Makefile installs (a local CPU wheel on the CI machine)
COURSE_ONLY = ("matplotlib", "scipy", "numba", "numba-cuda", "triton", "jupyterlab", "jupyter-core", "nbclient",
               "nbformat", "ipywidgets", "ipykernel", "pillow", "pytest")

SCRIPT = r"""
import json, os, sys
import torch
from ar_course import checkpoint
from ar_course.system import Generator

assert "ar_course" in sys.modules and not any(p.startswith(os.environ["CHECKOUT"]) for p in sys.path), sys.path
loaded = {name: type(checkpoint.load(name)).__name__ for name in checkpoint.available()}
out = Generator.from_pretrained("mnist", device="cpu").generate([0, 7, 9], method="var", seed=0)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"matplotlib", "scipy", "numba", "triton", "PIL",
                                                            "nbclient", "ipywidgets", "IPython"})
kernels_imported = "ar_course.kernels" in sys.modules  # kernels="auto" on a CPU: torch, nothing imported
from importlib.metadata import metadata
from ar_course.project import install_command
print(json.dumps({"loaded": loaded, "shape": list(out.images.shape), "min": float(out.images.min()),
                  "max": float(out.images.max()), "package": checkpoint.__file__, "heavy": heavy,
                  "kernels_imported": kernels_imported, "hint": install_command("kernels"),
                  "license": metadata("ar-course")["License-Expression"]}))
"""


def _run(args: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    res = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={**env, "CHECKOUT": str(ROOT), "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert res.returncode == 0, f"{' '.join(map(str, args))} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_with_core_dependencies_generates_images(tmp_path):
    # build from a copy of the package sources (the build writes build/ and *.egg-info beside them)
    src = tmp_path / "src"
    shutil.copytree(ROOT / "ar_course", src / "ar_course", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", src, "-w", wheels],
         cwd=tmp_path)
    (wheel,) = wheels.glob("ar_course-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", TORCH], cwd=tmp_path)
    _run([python, "-m", "pip", "install", "--quiet", wheel], cwd=tmp_path)
    listed = {p["name"].lower() for p in json.loads(
        _run([python, "-m", "pip", "list", "--format", "json"], cwd=tmp_path).stdout)}
    assert {"ar-course", "torch", "numpy", "safetensors", "tqdm"} <= listed
    assert not listed & set(COURSE_ONLY), f"core install pulled in {sorted(listed & set(COURSE_ONLY))}"

    work = tmp_path / "work"  # a folder with nothing of the checkout in or above it
    work.mkdir()
    result = json.loads(_run([python, "-c", SCRIPT], cwd=work).stdout.strip().splitlines()[-1])
    assert result["package"].startswith(str(env_dir)), result["package"]  # the installed copy, not the checkout
    assert result["loaded"] == {
        "ar_mnist": "GPT", "ar_mnist_cca": "GPT", "ar_mnist_draft": "GPT", "ar_mnist_grpo": "GPT",
        "classifier_mnist": "Classifier",
        "classifier_shapes": "Classifier", "diffusion_lm": "DiffusionLM", "lm_draft": "GPT", "lm_small": "GPT",
        "lm_target": "GPT", "tokenizer_mnist_msvq": "VQVAE", "tokenizer_mnist_vq": "VQVAE", "var_mnist": "VAR",
        "var_mnist_cca": "VAR",
        "maskgit_mnist": "MaskGIT", "continuous_ar_mnist": "ContinuousAR", "tokenizer_mnist_kl": "VQVAE"}
    assert result["shape"] == [3, 1, 32, 32] and 0 <= result["min"] <= result["max"] <= 1 and result["max"] > 0.5
    assert result["heavy"] == [] and result["kernels_imported"] is False
    # outside a checkout the hint names the extra's requirements, not "pip install -e '.[kernels]'"
    assert result["hint"].startswith("pip install 'numba==") and "-e" not in result["hint"].split()
    assert result["license"] == "MIT AND CC-BY-SA-3.0"

    res = _run([python, "-m", "ar_course", "generate", "--out", "x.png", "--classes", "1", "2", "--zoom", "1"],
               cwd=work)
    assert "wrote x.png" in res.stdout
    from PIL import Image

    with Image.open(work / "x.png") as img:
        assert img.format == "PNG" and img.size == (2 * 34 + 2, 34 + 2)
