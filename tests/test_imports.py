"""Importing the library has no side effects: no environment variable changes and none of the course layer's
or the kernels' heavy dependencies (that no library module imports the course layer is
``tests/test_layers.py``); ``ar_course.kernels`` configures the kernel back-ends itself, also after
torch has imported Triton (an optimizer step does)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ["ar_course", "ar_course.system", "ar_course.transformer", "ar_course.var", "ar_course.tokenizers",
           "ar_course.speculative", "ar_course.raster", "ar_course.checkpoint", "ar_course.metrics",
           "ar_course.generate", "ar_course.sampling", "ar_course.data", "ar_course.train", "ar_course.cli",
           "ar_course.serving", "ar_course.align", "ar_course.masked", "ar_course.diffusion_lm",
           "ar_course.continuous"]
HEAVY = ("matplotlib", "scipy", "numba", "triton", "jupyter", "jupyter_core", "jupyter_client", "jupyterlab",
         "nbclient", "nbformat", "ipywidgets", "ipykernel", "IPython", "PIL")


def _python(code: str, env: dict | None = None) -> str:
    """Run ``code`` in a fresh interpreter with this checkout first on the path; its last stdout line."""
    clean = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "TRITON_INTERPRET")}
    clean["PYTHONPATH"] = os.pathsep.join([str(ROOT), clean.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**clean, **(env or {})}, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("module", LIBRARY)
def test_library_import_changes_no_environment_and_imports_nothing_heavy(module):
    code = f"""
import json, os, sys
before = dict(os.environ)
import {module}
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({list(HEAVY)!r}))
print(json.dumps({{"changed": changed, "heavy": heavy}}))
"""
    assert json.loads(_python(code)) == {"changed": [], "heavy": []}


needs_kernels = pytest.mark.skipif(importlib.util.find_spec("numba") is None or importlib.util.find_spec("triton")
                                   is None, reason="needs the kernels and triton extras")


@needs_kernels
@pytest.mark.slow
def test_kernels_configure_themselves_after_torch_imported_triton():
    # an AdamW step imports torch._dynamo, which imports Triton with its language built for the compiler;
    # importing ar_course.kernels afterwards must still run Triton in the interpreter and numba in the simulator
    code = """
import json, os, sys
import torch
import torch.nn.functional as F
model = torch.nn.Linear(4, 4)
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 4)).sum().backward()
opt.step()
triton_first = "triton.language" in sys.modules
from ar_course import kernels
from ar_course.kernels import env
torch.manual_seed(0)
q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
errors = {b: float((kernels.flash_attention(q, k, v, "causal", backend=b) - want).abs().max())
          for b in ("triton", "numba")}
dec = {b: float((kernels.decode_attention(q[:, :, -1], k, v, 9, backend=b) - want[:, :, -1]).abs().max())
       for b in ("triton", "numba")}
print(json.dumps({"triton_first": triton_first, "simulator": env.CUDA_SIMULATOR, "where": env.describe(),
                  "errors": errors, "decode": dec, "env": [os.environ.get("NUMBA_ENABLE_CUDASIM"),
                                                          os.environ.get("TRITON_INTERPRET")]}))
"""
    out = json.loads(_python(code))
    if "no CUDA GPU" not in out["where"]:
        pytest.skip("a CUDA machine compiles the kernels instead")
    assert out["triton_first"] and out["simulator"] and out["env"] == ["1", "1"]
    assert max(out["errors"].values()) < 1e-5 and max(out["decode"].values()) < 1e-5, out


@needs_kernels
def test_kernel_defaults_keep_values_the_user_set():
    code = """
import json
from ar_course.kernels import env
print(json.dumps([env.CUDA_SIMULATOR, env.NUMBA_CUDA_USABLE, env.triton_interpreted()]))
"""
    simulator, usable, interpreted = json.loads(_python(code, {"NUMBA_ENABLE_CUDASIM": "0", "TRITON_INTERPRET": "0"}))
    assert not simulator and not interpreted
    if usable:
        pytest.skip("a CUDA machine: numba.cuda runs on the GPU")
