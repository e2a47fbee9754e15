"""Data-parallel training over 2 CPU processes (gloo, launched by torchrun) equals one process trained on
the same global batches."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ar_course import distributed as ddp
from ar_course.checkpoint import load_checkpoint

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.timeout(300)
def test_two_gloo_processes_match_one_process(tmp_path):
    single, double = tmp_path / "single.safetensors", tmp_path / "ddp.safetensors"
    subprocess.run([sys.executable, str(WORKER), str(single)], check=True, timeout=120)
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(WORKER), str(double)],
        capture_output=True, text=True, timeout=240,
    )
    # on failure, show the lines that name the cause (C++ aborts print them well before the launcher's summary)
    causes = [ln for ln in res.stderr.splitlines() if any(w in ln for w in ("terminate", "what()", "Error:"))]
    assert res.returncode == 0, "\n".join(causes[:20]) + "\n...\n" + res.stderr[-1500:]
    s1, m1 = load_checkpoint(single)
    s2, m2 = load_checkpoint(double)
    assert m1["config"]["world_size"] == 1 and m2["config"]["world_size"] == 2
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], atol=1e-5, rtol=1e-4)
    assert abs(m1["extra"]["final_loss"] - m2["extra"]["final_loss"]) < 1e-5
    # and training actually moved the weights
    from ddp_worker import make_model

    init = make_model().state_dict()
    assert any(not torch.allclose(init[k], s1[k]) for k in s1)


def test_close_distributed_is_a_no_op_alone():
    ddp.close_distributed()
    assert not ddp.is_distributed()


def test_shard_batch_is_identity_alone():
    x = torch.arange(6)
    assert ddp.shard_batch((x, {"y": x})) [0] is x
    assert ddp.world_size() == 1 and ddp.is_main_process()
