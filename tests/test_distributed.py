"""Data-parallel training: every trainer of ``python -m ar_course train`` run by torchrun in 2 gloo processes
(global batch b, so b/2 examples per process) ends where 1 process with batch b ends -- including the losses
that draw random numbers per example (ddp.draw_rows) and MaskGIT's mean over a varying number of masked tokens
(ddp.share_of_global_mean)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ar_course import distributed as ddp
from ar_course.checkpoint import load, load_checkpoint

WORKER = Path(__file__).with_name("ddp_worker.py")
sys.path.insert(0, str(WORKER.parent))
from ddp_worker import RUNS  # noqa: E402

# Training losses recorded in each checkpoint's metadata (and held-out losses measured after training).
LOSSES = {"lm": ("train_loss_last50", "val_loss"), "ar": ("final_train_loss", "test_loss"),
          "var": ("final_train_loss", "test_loss"), "tokenizer_msvq": ("final_loss",),
          "tokenizer_rvq_ema": ("final_loss",), "tokenizer_lfq": ("final_loss",), "tokenizer_kl": ("final_loss",),
          "classifier": ("final_train_loss",),
          "diffusion_lm": ("train_loss_last50", "val_bound"), "maskgit": ("final_train_loss", "test_loss"),
          "continuous": ("final_train_loss", "test_loss")}
KINDS = {"lm": "lm", "ar": "raster_ar", "var": "var", "tokenizer_msvq": "tokenizer", "tokenizer_rvq_ema": "tokenizer",
         "tokenizer_lfq": "tokenizer", "tokenizer_kl": "tokenizer",
         "classifier": "classifier", "diffusion_lm": "diffusion_lm", "maskgit": "maskgit",
         "continuous": "continuous_ar"}
ROUNDED = ("lm", "diffusion_lm")  # the text trainers round their losses to 4 places


def _run(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    res = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    # on failure, show the lines that name the cause (C++ aborts print them well before the launcher's summary)
    causes = [ln for ln in res.stderr.splitlines() if any(w in ln for w in ("terminate", "what()", "Error", "error:"))]
    assert res.returncode == 0, "\n".join(causes[:20]) + "\n...\n" + res.stderr[-2000:]
    return res


def _assert_same_weights(name: str, one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> None:
    """Two processes average their gradients in another order than one process sums them: last-bit
    differences, which Adam's first steps (each gradient divided by its own magnitude) turn into weight
    differences up to about 1e-6 where a gradient is nearly zero (measured: 9.8e-7 for the lm in float32).
    Hence 1e-5 absolute for float32 weights, and for float16 checkpoints (lm, ar, var) one float16 rounding
    step more (relative 2**-10): float32 weights that differ slightly can round to neighbouring float16 values."""
    assert one.keys() == two.keys()
    for key, a in one.items():
        b = two[key]
        assert a.dtype == b.dtype, (name, key)
        if not a.is_floating_point():
            assert torch.equal(a, b), (name, key)
        else:
            rtol = 2**-10 if a.dtype == torch.float16 else 1e-6
            torch.testing.assert_close(b.float(), a.float(), rtol=rtol, atol=1e-5, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.timeout(1800)  # generous: a loaded 2-core host can be several times slower
def test_every_trainer_on_two_gloo_processes_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _run([sys.executable, str(WORKER), str(one)], timeout=600)
    res = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
                str(two)], timeout=900)
    assert res.stdout.count("saved ") == len(RUNS)  # rank 0 alone prints...
    assert sorted(p.name for p in two.iterdir()) == sorted(f"{n}.safetensors" for n in RUNS)  # ...and writes
    failures = []
    for name in RUNS:
        s1, m1 = load_checkpoint(one / f"{name}.safetensors")
        s2, m2 = load_checkpoint(two / f"{name}.safetensors")
        try:
            _assert_same_weights(name, s1, s2)
        except AssertionError as exc:
            failures.append(" ".join(str(exc).split()))
        for key in LOSSES[name]:
            if abs(m2["extra"][key] - m1["extra"][key]) > (1.01e-4 if name in ROUNDED else 1e-5):
                failures.append(f"{name} {key}: {m1['extra'][key]} (1 process) vs {m2['extra'][key]} (2 processes)")
        load(two / f"{name}.safetensors", kind=KINDS[name])
    assert not failures, "\n".join(failures)
    # the tokenizers restarted dead codes (identically in both runs, as the weights show)
    for name in ("tokenizer_msvq", "tokenizer_rvq_ema"):
        state, _ = load_checkpoint(two / f"{name}.safetensors")
        assert sum(int(v) for k, v in state.items() if k.endswith("num_restarted")) > 0


def test_helpers_are_identities_alone():
    ddp.close_distributed()  # a no-op without a process group
    x = torch.arange(6)
    assert not ddp.is_distributed() and ddp.world_size() == 1 and ddp.is_main_process()
    assert ddp.shard_batch((x, {"y": x}))[0] is x
    assert ddp.sum_across_processes(x) is x and ddp.gather_in_rank_order(x) is x
    calls = []
    with ddp.global_batch_draws():
        assert ddp.draw_rows(lambda n: calls.append(n) or x[:n], 4) is not None and calls == [4]
        assert ddp.global_batch_sum(x) is x
    assert ddp.share_of_global_mean(torch.tensor(7)) == 1.0


def test_sync_batch_norm_alone_is_batch_norm():
    torch.manual_seed(0)
    plain, synced = torch.nn.BatchNorm2d(3), ddp.SyncBatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(synced.running_var, plain.running_var, rtol=0, atol=0)
    assert synced.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_batch_norm_over_two_processes_matches_batch_norm_on_the_global_batch(monkeypatch, momentum):
    """Two processes holding the same half batch x (simulated: every all_reduce doubles its tensor) must compute
    what BatchNorm2d computes on the global batch [x; x]: the same outputs, running mean and unbiased running
    variance (momentum 0.1 or the cumulative average), and the same gradient for x -- which needs the other
    process's gradient summed in through the cross-process sums."""
    monkeypatch.setattr(ddp, "is_distributed", lambda: True)
    monkeypatch.setattr(ddp, "world_size", lambda: 2)
    monkeypatch.setattr(ddp.dist, "all_reduce", lambda t: t.mul_(2))
    torch.manual_seed(0)
    plain, synced = torch.nn.BatchNorm2d(3, momentum=momentum), ddp.SyncBatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([0.5, 1.0, 2.0])), plain.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    synced.load_state_dict(plain.state_dict())
    w = torch.randn(2, 3, 2, 3)
    for step in range(2):
        x = (torch.randn(2, 3, 2, 3) * (step + 1) + step).requires_grad_()
        xx = torch.cat([x.detach(), x.detach()]).requires_grad_()
        out, ref = synced(x), plain(xx)
        torch.testing.assert_close(out, ref[:2])
        (out * w).sum().backward()
        (ref * torch.cat([w, w])).sum().backward()
        torch.testing.assert_close(x.grad, xx.grad[:2])
        torch.testing.assert_close(synced.running_mean, plain.running_mean)
        torch.testing.assert_close(synced.running_var, plain.running_var)


def test_shard_batch_gives_each_process_its_contiguous_slice(monkeypatch):
    """Under 2 processes, rank r trains on rows [r*n/2, (r+1)*n/2) of every global batch tensor -- the rows whose
    random numbers draw_rows gives it -- and a batch that does not divide is refused."""
    monkeypatch.setattr(ddp, "world_size", lambda: 2)
    monkeypatch.setattr(ddp, "rank", lambda: 1)
    x = torch.arange(6)
    images, labels = ddp.shard_batch((x.view(6, 1), {"y": x}))
    assert images.flatten().tolist() == [3, 4, 5] and labels["y"].tolist() == [3, 4, 5]
    with ddp.global_batch_draws():
        assert ddp.draw_rows(lambda n: torch.arange(n), 3).tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="not divisible by the world size 2"):
        ddp.shard_batch(torch.arange(5))
