"""Nothing lost: atomic checkpoint writes, trainers stopped by SIGTERM resume to the weights of an
uninterrupted run, and the trainers' options are checked before any work."""

import importlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ar_course.checkpoint import load_checkpoint, save_checkpoint
from ar_course.cli import main as cli_main
from ar_course.tokenizers import VQVAE
from ar_course.tokenizers.train import default_config
from ar_course.train import (
    TrainConfig, TrainingError, TrainingInterrupted, lr_at, read_train_state, state_path_for, train_loop,
)
from ar_course.utils import content_digest, seed_everything
from cli_helpers import one_torch_thread, run

# ---- (a) atomic checkpoint writes ----------------------------------------------------------------------------


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"n": 1})

    def dies_half_way(self, data):  # the temporary file beside path gets half the bytes
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("No space left on device")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space"):
        patch.setattr(Path, "write_bytes", dies_half_way)
        save_checkpoint(path, {"w": torch.zeros(3)}, {"n": 2})
    state, meta = load_checkpoint(path)
    assert torch.equal(state["w"], torch.ones(3)) and meta["config"] == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left behind


# ---- (b) a real trainer stopped by SIGTERM, then resumed -----------------------------------------------------

AR_ARGS = ["train", "ar", "--steps", "400", "--batch-size", "4", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
           "--eval-per-class", "0", "--train-images", "64", "--checkpoint-every", "10", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _trainer(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ar_course", *AR_ARGS, *extra, "--out", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the trainer ended before writing {path}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


@pytest.mark.timeout(1200)  # generous: a loaded 2-core host can be several times slower
def test_sigterm_keeps_the_last_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path):
    out, reference = tmp_path / "ar.safetensors", tmp_path / "reference.safetensors"
    save_checkpoint(out, {"w": torch.ones(2)}, {}, kind="earlier run")  # what an earlier run left there
    uninterrupted = _trainer(reference)
    state = state_path_for(out)
    run = _trainer(out)
    _wait_for(state, run)  # the first periodic state write (step 10)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted at step ") and last.endswith("; continue with --resume"), err[-2000:]
    step = int(last.split()[4].rstrip(";"))
    assert 10 <= step < 400
    _, meta = load_checkpoint(state)
    assert meta["kind"] == "train-state" and meta["extra"]["step"] == step
    assert len(meta["extra"]["history"]["loss"]) == step
    assert load_checkpoint(out)[1]["kind"] == "earlier run"  # the old checkpoint is intact

    resumed = _trainer(out, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-2000:]
    assert not state.exists()  # removed once the checkpoint is written
    got, got_meta = load_checkpoint(out)
    want, want_meta = load_checkpoint(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key  # exactly the same weights
    for key in ("final_train_loss", "test_loss"):
        assert got_meta["extra"][key] == want_meta["extra"][key], key


# ---- (c) train_loop resumes the tokenizer exactly: dead-code restarts, EMA and torch's RNG ---------------------


def _train_tokenizer(state_path: Path, quantizer: str, resume: bool = False,
                     interrupt_at: int | None = None) -> tuple[VQVAE, list[float]]:
    """8 steps of a tiny tokenizer whose codebook restarts dead codes every 2 steps (with torch's global
    generator); the batch stream sends this process SIGTERM while drawing batch ``interrupt_at``."""
    seed_everything(0)
    model = VQVAE(default_config(quantizer, num_codes=16, width=4, latent_dim=4, usage_window=2, scales=(1, 2, 4, 8),
                                 ema=quantizer == "vq"))
    images = torch.rand(40, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)

    def batches():
        for i in range(10_000):
            if i == interrupt_at:
                os.kill(os.getpid(), signal.SIGTERM)
            yield images[torch.randperm(40, generator=g)[:8]]  # (8, 1, 32, 32)

    config = TrainConfig(steps=8, lr=1e-2, warmup=2, checkpoint_every=3)
    history = train_loop(model, lambda m, x: m(x).loss, batches(), config, progress=False, state_path=state_path,
                         resume=resume)
    return model, history.loss


def _restarts(model: VQVAE) -> int:
    return sum(int(v) for k, v in model.state_dict().items() if k.endswith("num_restarted"))


@pytest.mark.parametrize("quantizer", ["vq", "msvq"])  # vq: with EMA codebook updates
def test_train_loop_resumes_a_tokenizer_exactly(tmp_path, quantizer):
    state = tmp_path / "tok.train-state.safetensors"
    want, want_loss = _train_tokenizer(tmp_path / "unused.safetensors", quantizer)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info:
        _train_tokenizer(state, quantizer, interrupt_at=4)
    assert info.value.step == 5 and signal.getsignal(signal.SIGTERM) is before
    stopped = VQVAE(want.config)
    stopped.load_state_dict({k.removeprefix("model/"): v for k, v in load_checkpoint(state)[0].items()
                             if k.startswith("model/")})
    got, got_loss = _train_tokenizer(state, quantizer, resume=True)
    assert _restarts(got) > _restarts(stopped) > 0  # codes restarted before and after the interruption
    assert got_loss == want_loss
    for (key, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), key


def test_resume_needs_a_state_of_the_same_schedule(tmp_path):
    state = tmp_path / "tok.train-state.safetensors"
    with pytest.raises(TrainingError, match="no training state at"):
        _train_tokenizer(state, "vq", resume=True)
    _train_tokenizer(state, "vq")  # leaves its final state
    with pytest.raises(TrainingError, match=r"other settings \(steps 8 -> 9\)"):
        read_train_state(state, TrainConfig(steps=9, lr=1e-2, warmup=2))


# ---- keep_best: the run ends with the weights of its best evaluation, resumed or not --------------------------


def _keep_best_run(state_path: Path | None = None, resume: bool = False, interrupt_at: int | None = None,
                   keep_best: str = "val", ema: float = 0.0, trained: list | None = None,
                   settings: dict | None = None) -> tuple[torch.nn.Module, object, list[dict]]:
    """12 steps of a linear model on a fixed regression task, evaluated every 2 steps; the "val" metric is
    lowest at step 6 (a hand-made curve), and each evaluation's weights are recorded (``trained``: also the
    model's weights before every step, as each batch is drawn). ``settings``: train_loop's run settings."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
    y = x.sum(1, keepdim=True)
    curve = {2: 3.0, 4: 2.0, 6: 1.0, 8: 1.5, 10: 1.0, 12: 2.5}  # the first 1.0 (step 6) stays the best
    seen: list[dict] = []
    drawn = [0]  # batches drawn so far, replayed ones included: the step an evaluation follows

    def batches():
        for i in range(10_000):
            if i == interrupt_at:
                os.kill(os.getpid(), signal.SIGTERM)
            drawn[0] = i + 1
            if trained is not None:
                trained.append({k: v.clone() for k, v in model.state_dict().items()})
            yield x, y

    def eval_fn(m):
        seen.append({"step": drawn[0], "weights": {k: v.clone() for k, v in m.state_dict().items()}})
        return {"val": curve[drawn[0]], "other": 0.0}

    config = TrainConfig(steps=12, lr=1e-2, warmup=2, eval_every=2, checkpoint_every=0, keep_best=keep_best, ema=ema)
    history = train_loop(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), batches(), config,
                         eval_fn=eval_fn, progress=False, state_path=state_path, resume=resume, settings=settings)
    return model, history, seen


def test_keep_best_ends_with_the_weights_of_the_lowest_evaluation():
    model, history, seen = _keep_best_run()
    assert history.best_step == 6 and history.best_value == 1.0  # a tie later (step 10) does not replace it
    best = next(s["weights"] for s in seen if s["step"] == 6)
    last = seen[-1]["weights"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, best[k]), k
    assert not torch.equal(model.weight, last["weight"])  # training moved on after step 6
    plain, plain_history, _ = _keep_best_run(keep_best="")
    assert plain_history.best_step is None and torch.equal(plain.weight, last["weight"])


def test_keep_best_survives_an_interruption(tmp_path):
    state = tmp_path / "lin.train-state.safetensors"
    want, _, _ = _keep_best_run()
    with pytest.raises(TrainingInterrupted):
        _keep_best_run(state, interrupt_at=8)  # after the best evaluation (step 6): its weights are in the state
    got, history, _ = _keep_best_run(state, resume=True)
    assert history.best_step == 6
    for (key, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), key


def test_keep_best_errors_are_one_line(tmp_path):
    with pytest.raises(TrainingError, match=r"keep_best='nope' is not among the evaluation's metrics \(other, val\)"):
        _keep_best_run(keep_best="nope")
    with pytest.raises(TrainingError, match="needs an eval_fn"):
        train_loop(torch.nn.Linear(1, 1), lambda m, b: m(b).sum(), iter([]), TrainConfig(steps=1, keep_best="val"))
    state = tmp_path / "lin.train-state.safetensors"
    with pytest.raises(TrainingInterrupted):
        _keep_best_run(state, interrupt_at=3)
    with pytest.raises(TrainingError, match=r"other settings \(keep_best 'val' -> ''\)"):
        read_train_state(state, TrainConfig(steps=12, lr=1e-2, warmup=2, eval_every=2, checkpoint_every=0))
    # the evaluations pick the weights the run ends with: another interval would pick among other weights
    with pytest.raises(TrainingError, match=r"other settings \(eval_every 2 -> 3\)"):
        read_train_state(state, TrainConfig(steps=12, lr=1e-2, warmup=2, eval_every=3, checkpoint_every=0,
                                            keep_best="val"))


# ---- ema: a moving average of the weights is what evaluations see and what the run ends with ----------------


def _averages(trained: list[dict], decay: float) -> list[dict]:
    """The plain recurrence over ``trained`` (the initial weights, then those after each step): entry ``n`` is
    the average after step ``n + 1``."""
    avg, out = {k: v.clone() for k, v in trained[0].items()}, []
    for n, weights in enumerate(trained[1:]):
        d = min(decay, (1 + n) / (10 + n))
        avg = {k: d * avg[k] + (1 - d) * weights[k] for k in avg}
        out.append(avg)
    return out


def test_ema_evaluates_and_ends_with_the_average_of_the_weights():
    trained: list[dict] = []
    plain, _, _ = _keep_best_run(keep_best="", trained=trained)  # the trajectory (the average does not change it)
    trained.append(plain.state_dict())  # the weights after the last step
    want = _averages(trained, 0.5)
    model, history, seen = _keep_best_run(keep_best="", ema=0.5)
    for s in seen:  # every evaluation saw the average after its step
        for k, v in s["weights"].items():
            torch.testing.assert_close(v, want[s["step"] - 1][k], rtol=1e-6, atol=1e-7)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[-1][k], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(v, plain.state_dict()[k])  # the average lags the last weights
    best, history, _ = _keep_best_run(ema=0.5)  # keep_best chooses among the averages
    assert history.best_step == 6
    for k, v in best.state_dict().items():
        torch.testing.assert_close(v, want[5][k], rtol=1e-6, atol=1e-7)


def test_ema_survives_an_interruption(tmp_path):
    state = tmp_path / "lin.train-state.safetensors"
    want, _, _ = _keep_best_run(keep_best="", ema=0.9)
    with pytest.raises(TrainingInterrupted):
        _keep_best_run(state, keep_best="", ema=0.9, interrupt_at=7)
    got, _, _ = _keep_best_run(state, resume=True, keep_best="", ema=0.9)
    for (key, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), key
    with pytest.raises(TrainingError, match=r"other settings \(ema 0.9 -> 0.5\)"):
        _keep_best_run(state, resume=True, keep_best="", ema=0.5)
    with pytest.raises(TrainingError, match=r"ema is the decay of the weight average, in \[0, 1\); got 1.0"):
        _keep_best_run(keep_best="", ema=1.0)


# ---- the run's settings (seed, global batch size) travel in the state: a resume must repeat them -------------

RUN = {"seed": 0, "batch_size": 16}


def _other_settings(state: Path, changes: str) -> str:
    return f"the training state at {state} comes from a run with other settings ({changes}); resume with the " \
           f"options of that run"


def test_resume_refuses_other_run_settings(tmp_path):
    state = tmp_path / "lin.train-state.safetensors"
    want, _, _ = _keep_best_run(keep_best="", settings=RUN)
    with pytest.raises(TrainingInterrupted):
        _keep_best_run(state, keep_best="", interrupt_at=5, settings=RUN)
    assert load_checkpoint(state)[1]["extra"]["settings"] == RUN
    with pytest.raises(TrainingError) as info:
        _keep_best_run(state, resume=True, keep_best="", settings={"seed": 7, "batch_size": 4})
    assert str(info.value) == _other_settings(state, "seed 0 -> 7, batch_size 16 -> 4")
    with pytest.raises(TrainingError) as info:  # a setting the state has and this run lacks, or the reverse
        _keep_best_run(state, resume=True, keep_best="", settings={"seed": 0, "shards": 2})
    assert str(info.value) == _other_settings(state, "shards not recorded -> 2, batch_size 16 -> None") + (
        "; a state that does not record a setting (one written by an older ar_course) cannot be resumed: start the "
        "run again without --resume")
    with pytest.raises(TrainingError) as info:  # with a schedule change: all in one line
        read_train_state(state, TrainConfig(steps=13, lr=1e-2, warmup=2, eval_every=2), {**RUN, "seed": 1})
    assert str(info.value) == _other_settings(state, "steps 12 -> 13, seed 0 -> 1")
    got, _, _ = _keep_best_run(state, resume=True, keep_best="", settings=dict(RUN))  # the same: it resumes
    for (key, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), key


def test_resume_accepts_a_state_from_before_settings_were_recorded(tmp_path):
    state = tmp_path / "lin.train-state.safetensors"
    want, _, _ = _keep_best_run(keep_best="", settings=RUN)
    with pytest.raises(TrainingInterrupted):
        _keep_best_run(state, keep_best="", interrupt_at=5, settings=RUN)
    tensors, meta = load_checkpoint(state)
    del meta["extra"]["settings"]  # what an older version wrote
    save_checkpoint(state, tensors, meta["config"], kind=meta["kind"], **meta["extra"])
    got, _, _ = _keep_best_run(state, resume=True, keep_best="", settings={"seed": 7})  # nothing to compare
    for (key, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), key


def _tiny_tokenizer_run(state: Path, resume: bool = False, interrupt_at: int | None = None,
                        **change) -> tuple[VQVAE, object]:
    """6 steps of a tiny VQ tokenizer (``change``: its config) that stops itself at batch ``interrupt_at``."""
    seed_everything(0)
    model = VQVAE(default_config("vq", **{"num_codes": 8, "width": 4, "latent_dim": 4, **change}))
    images = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(1))

    def batches():
        for i in range(100):
            if i == interrupt_at:
                os.kill(os.getpid(), signal.SIGTERM)
            yield images

    history = train_loop(model, lambda m, x: m(x).loss, batches(), TrainConfig(steps=6, lr=1e-2, warmup=1),
                         progress=False, state_path=state, resume=resume, settings=RUN)
    return model, history


def test_resume_refuses_another_model_config_field_by_field(tmp_path):
    """The model's config is part of the run: a changed loss weight resumed silently, and the checkpoint then
    recorded only the new value; a changed width printed torch's twelve-line size-mismatch dump (audit 23)."""
    state = tmp_path / "tok.train-state.safetensors"
    with pytest.raises(TrainingInterrupted):
        _tiny_tokenizer_run(state, interrupt_at=3)
    assert load_checkpoint(state)[1]["extra"]["settings"]["model"]["beta"] == 0.25
    for change, named in (({"beta": 0.5}, "beta 0.25 -> 0.5"), ({"latent_dim": 8, "width": 8},
                                                                  "width 4 -> 8, latent_dim 4 -> 8")):
        with pytest.raises(TrainingError) as info:
            _tiny_tokenizer_run(state, resume=True, **change)
        assert str(info.value) == _other_settings(state, named)
    _, history = _tiny_tokenizer_run(state, resume=True)  # the same config: it resumes
    assert history.steps == list(range(6))


def test_a_state_of_another_kind_of_model_is_named_as_such_not_listed_change_by_change(tmp_path):
    """A VAR's state resumed by the raster trainer listed some twenty 'changes', one per config field."""
    state = tmp_path / "tok.train-state.safetensors"
    with pytest.raises(TrainingInterrupted):
        _tiny_tokenizer_run(state, interrupt_at=3)
    tensors, meta = load_checkpoint(state)
    meta["extra"]["settings"]["model"].update(block_size=16, n_head=2)  # fields a tokenizer's config lacks
    save_checkpoint(state, tensors, meta["config"], kind=meta["kind"], **meta["extra"])
    with pytest.raises(TrainingError) as info:
        _tiny_tokenizer_run(state, resume=True)
    assert str(info.value) == (f"the training state at {state} was written by a run of another kind of model (its "
                               "config has block_size, n_head, which this run's model has not): resume with the command "
                               "that wrote it, or give this run another --out")


def test_resume_accepts_a_state_from_before_the_model_config_was_recorded(tmp_path):
    state = tmp_path / "tok.train-state.safetensors"
    with pytest.raises(TrainingInterrupted):
        _tiny_tokenizer_run(state, interrupt_at=3)
    tensors, meta = load_checkpoint(state)
    del meta["extra"]["settings"]["model"]  # what the previous version wrote
    save_checkpoint(state, tensors, meta["config"], kind=meta["kind"], **meta["extra"])
    _, history = _tiny_tokenizer_run(state, resume=True)
    assert history.steps == list(range(6))


def test_a_state_that_does_not_fit_a_model_without_a_config_is_one_line(tmp_path):
    state = tmp_path / "lin.train-state.safetensors"
    with pytest.raises(TrainingInterrupted):
        _keep_best_run(state, keep_best="", interrupt_at=5, settings=RUN)
    tensors, meta = load_checkpoint(state)
    tensors = {k: torch.cat([v, v], dim=-1) if k.startswith("model/") else v for k, v in tensors.items()}
    save_checkpoint(state, tensors, meta["config"], kind=meta["kind"], **meta["extra"])  # a wider model's weights
    with pytest.raises(TrainingError) as info:
        _keep_best_run(state, resume=True, keep_best="", settings=RUN)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"the training state at {state} does not fit this model: ")
    assert "size mismatch for " in message and "(and 1 more)" in message, message


def test_train_seconds_add_up_over_a_resumed_run(tmp_path, monkeypatch):
    state = tmp_path / "lin.train-state.safetensors"
    ticks = iter(range(0, 10_000, 10))  # every perf_counter call: 10 s later
    monkeypatch.setattr("ar_course.train.time.perf_counter", lambda: float(next(ticks)))
    _, straight, _ = _keep_best_run(keep_best="", settings=RUN)
    with pytest.raises(TrainingInterrupted):
        _keep_best_run(state, keep_best="", interrupt_at=5, settings=RUN)
    first = load_checkpoint(state)[1]["extra"]["history"]["seconds"]
    _, resumed, _ = _keep_best_run(state, resume=True, keep_best="", settings=RUN)
    assert straight.seconds == 12 * 10 and first == 6 * 10  # one clock read per step; stopped after 6 steps
    assert resumed.seconds == first + 6 * 10 == straight.seconds and resumed == straight  # seconds not compared


@pytest.mark.parametrize("settings, error, message", [
    ([("seed", 0)], TypeError, "settings must be a dict of the run's settings (such as seed and batch_size), got list"),
    ({"seed": torch.tensor(0)}, TypeError, "settings must hold numbers, strings, bools, None and lists of them: "
                                           "Object of type Tensor is not JSON serializable"),
    ({"lr": float("nan")}, ValueError, "settings must hold numbers, strings, bools, None and lists of them: "
                                       "Out of range float values are not JSON compliant"),
])
def test_run_settings_are_checked_before_training(settings, error, message):
    with pytest.raises(error) as info:
        _keep_best_run(keep_best="", settings=settings)
    assert str(info.value).startswith(message), info.value


def test_cli_resume_refuses_a_changed_seed_or_batch_size(tmp_path, capsys):
    from dataclasses import replace

    from ar_course.transformer.train import PRESETS, train_lm

    out = tmp_path / "lm.safetensors"
    state = state_path_for(out)
    train_lm(replace(PRESETS["tiny"], steps=2), seed=0, progress=False, state_path=state)  # leaves its final state
    argv = ["train", "lm", "--preset", "tiny", "--steps", "2", "--out", str(out), "--resume", "--no-progress"]
    assert cli_main([*argv, "--seed", "7", "--batch-size", "4"]) == 1
    assert capsys.readouterr().err == f"error: {_other_settings(state, 'seed 0 -> 7, batch_size 16 -> 4')}\n"
    assert not out.exists() and load_checkpoint(state)[1]["extra"]["step"] == 2  # nothing trained or written
    assert cli_main(argv) == 0  # the options of that run
    assert load_checkpoint(out)[1]["extra"]["seed"] == 0 and not state.exists()


# --train-images 16: a resume with another subset is refused too, and with other data of the same size (another
# --tokenizer) through the data's digest
CONDITIONAL = {"p_uncond": 0.1, "examples": 16, "data": "<digest>"}


@pytest.mark.parametrize("what, module, extra, settings", [
    ("ar", "ar_course.raster.train", ["--train-images", "16"], CONDITIONAL),
    ("var", "ar_course.var.train", ["--train-images", "16"], {**CONDITIONAL, "tokenizer": "<digest>"}),
    ("maskgit", "ar_course.masked.train", ["--train-images", "16"], {**CONDITIONAL, "schedule": "cosine"}),
    ("continuous", "ar_course.continuous.train", [], {"p_uncond": 0.1, "examples": 20000, "data": "<digest>"}),
    ("tokenizer", "ar_course.tokenizers.train", [], {"dataset": "mnist", "examples": 20000, "data": "<digest>"}),
    ("classifier", "ar_course.metrics", [], {"dataset": "mnist"}),
    ("lm", "ar_course.transformer.train", [], {"data": "<digest>", "teacher": None}),
    ("lm", "ar_course.transformer.train", ["--preset", "draft"], {"data": "<digest>", "teacher": "<digest>"}),
    ("diffusion_lm", "ar_course.diffusion_lm.train", [], {"data": "<digest>", "init": None}),
])
def test_every_trainer_gives_train_loop_its_seed_and_global_batch(what, module, extra, settings, tmp_path,
                                                                 monkeypatch, capsys):
    given = []

    def train_loop(*args, settings=None, **kwargs):
        given.append(settings)
        raise TrainingError("stopped before training")

    monkeypatch.setattr(importlib.import_module(module), "train_loop", train_loop)
    argv = ["train", what, "--seed", "5", "--batch-size", "8", "--out", str(tmp_path / "m.safetensors"), *extra]
    assert cli_main(argv) == 1
    assert capsys.readouterr().err.endswith("error: stopped before training\n")
    digests = {k: "<digest>" for k, v in given[0].items() if k in ("data", "tokenizer", "teacher") and v is not None
               and len(v) == 12 and int(v, 16) >= 0}  # 12 hex digits
    assert [{**given[0], **digests}] == [{"seed": 5, "batch_size": 8, **settings}]


# ---- --threads and --no-progress: every trainer, the same options and the same effect --------------------------

PROCESS_RUNS = [  # (what, the module whose loop the trainer calls, that loop's name, the options of a small run)
    ("tokenizer", "ar_course.tokenizers.train", "train_loop", ["--batch-size", "8"]),
    ("lm", "ar_course.transformer.train", "train_loop", ["--preset", "tiny", "--batch-size", "8"]),
    ("classifier", "ar_course.metrics", "train_loop", ["--batch-size", "8"]),
    ("ar", "ar_course.raster.train", "train_loop", ["--batch-size", "8", "--train-images", "16"]),
    ("var", "ar_course.var.train", "train_loop", ["--batch-size", "8", "--train-images", "16"]),
    ("maskgit", "ar_course.masked.train", "train_loop", ["--batch-size", "8", "--train-images", "16"]),
    ("diffusion_lm", "ar_course.diffusion_lm.train", "train_loop", ["--batch-size", "8"]),
    ("continuous", "ar_course.continuous.train", "train_loop", ["--batch-size", "8"]),
    ("grpo", "ar_course.align.train", "train_grpo", ["--group-size", "2"]),
    ("cca", "ar_course.align.train", "train_cca", ["--batch-size", "8", "--train-images", "16"]),
]


@pytest.mark.parametrize("what, module, loop, extra", PROCESS_RUNS)
def test_every_trainer_hands_no_progress_and_threads_to_its_loop(what, module, loop, extra, tmp_path, monkeypatch,
                                                                 capsys):
    given = []

    def stop(*args, progress=True, **kwargs):
        given.append((progress, torch.get_num_threads()))
        raise TrainingError("stopped before training")

    trainer = importlib.import_module(module)
    monkeypatch.setattr(trainer, loop, stop)
    if hasattr(trainer, "load_mnist"):  # its first 16 digits: encoding all of them takes seconds (continuous)
        load = trainer.load_mnist
        monkeypatch.setattr(trainer, "load_mnist", lambda *a, **k: tuple(t[:16] for t in load(*a, **k)))
    argv = ["train", what, "--steps", "1", "--out", str(tmp_path / "m.safetensors"), *extra]
    with one_torch_thread():  # --threads sets torch's threads for the process: the helper restores them
        assert cli_main(argv) == 1  # the defaults: a progress bar, torch's threads (1 here)
        assert cli_main([*argv, "--no-progress", "--threads", "2"]) == 1
    assert capsys.readouterr().err.endswith("error: stopped before training\n")
    assert given == [(True, 1), (False, 2)]


def test_a_real_run_with_no_progress_shows_no_progress_bar(tmp_path, capsys):
    out = tmp_path / "classifier.safetensors"
    with one_torch_thread():
        torch.set_num_threads(2)
        status, stdout, err = run(capsys, "train", "classifier", "--steps", "2", "--batch-size", "2", "--no-progress",
                                  "--threads", "1", "--out", out)
        threads = torch.get_num_threads()
    assert status == 0 and out.is_file() and threads == 1
    assert stdout.startswith("mnist: held-out accuracy ")
    assert "classifier/mnist" not in err and "it/s" not in err and "%|" not in err, err  # tqdm's bar and rate


def test_content_digest_tells_data_and_weights_apart():
    x = torch.arange(12).reshape(3, 4)
    assert content_digest(x) == content_digest(x.clone()) == content_digest(x.t().contiguous().t())
    others = [x.float(), x.reshape(4, 3), x + (torch.arange(12).reshape(3, 4) == 7), x[:2]]
    assert len({content_digest(x), *map(content_digest, others)}) == 5
    assert content_digest(x, x[:1]) != content_digest(x[:1], x)  # order counts
    assert content_digest(torch.tensor(1.0, dtype=torch.bfloat16)) != content_digest(torch.tensor(1.0))  # 0-d
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert content_digest(a) != content_digest(b)
    b.load_state_dict(a.state_dict())
    assert content_digest(a) == content_digest(b)
    with pytest.raises(TypeError, match="content_digest takes tensors and modules, got list"):
        content_digest([1, 2])


def test_resume_refuses_other_data_of_the_same_size(tmp_path):
    from ar_course.raster.train import train_ar

    seed_everything(0)
    tokenizer = VQVAE(default_config("vq"))
    maps, labels = torch.randint(0, 256, (8, 8, 8)), torch.arange(8) % 2
    state = tmp_path / "ar.train-state.safetensors"
    small = dict(steps=2, batch_size=4, n_layer=1, n_embd=16, n_head=2, progress=False, state_path=state)
    train_ar(tokenizer, maps, labels, **small)  # leaves its final state
    before = content_digest(maps, labels)
    other = torch.randint(0, 256, (8, 8, 8))  # what another tokenizer would give: the same number of examples
    with pytest.raises(TrainingError) as info:
        train_ar(tokenizer, other, labels, **small, resume=True)
    assert str(info.value) == _other_settings(state, f"data {before!r} -> {content_digest(other, labels)!r}")
    train_ar(tokenizer, maps, labels, **small, resume=True)  # the same data: it resumes


def test_tokenizer_resume_refuses_other_images_of_the_same_count(tmp_path):
    """The tokenizer trainer recorded only how many images it trained on: a resume on other images was taken."""
    from ar_course.tokenizers.train import train_tokenizer

    g = torch.Generator().manual_seed(0)
    images, other = torch.rand(8, 1, 32, 32, generator=g), torch.rand(8, 1, 32, 32, generator=g)
    state = tmp_path / "tok.train-state.safetensors"
    small = dict(steps=2, batch_size=4, progress=False, test_images=images[:2], state_path=state, device="cpu")
    train_tokenizer(default_config("vq"), train_images=images, **small)  # leaves its final state
    with pytest.raises(TrainingError) as info:
        train_tokenizer(default_config("vq"), train_images=other, **small, resume=True)
    assert str(info.value) == _other_settings(
        state, f"data {content_digest(images)!r} -> {content_digest(other)!r}")
    train_tokenizer(default_config("vq"), train_images=images, **small, resume=True)  # the same images: it resumes


def _tiny_diffusion_preset():
    from dataclasses import replace

    from ar_course.diffusion_lm.train import PRESETS

    return replace(PRESETS["small"], batch_size=2, steps=2)


def test_diffusion_lm_resume_refuses_other_text(tmp_path):
    """The diffusion LM recorded neither its training text nor the checkpoint it started from."""
    from ar_course.diffusion_lm.train import train_diffusion_lm

    ids, other = torch.arange(2000) % 90, torch.arange(2000) % 70
    state, preset = tmp_path / "dlm.train-state.safetensors", _tiny_diffusion_preset()
    small = dict(progress=False, val_ids=ids[:800], state_path=state)
    train_diffusion_lm(preset, train_ids=ids, **small)  # leaves its final state
    with pytest.raises(TrainingError) as info:
        train_diffusion_lm(preset, train_ids=other, **small, resume=True)
    assert str(info.value) == _other_settings(state, f"data {content_digest(ids)!r} -> {content_digest(other)!r}")


def test_diffusion_lm_resume_refuses_another_starting_checkpoint(tmp_path):
    from ar_course import checkpoint
    from ar_course.diffusion_lm.train import train_diffusion_lm

    ids, state, preset = torch.arange(2000) % 90, tmp_path / "dlm.train-state.safetensors", _tiny_diffusion_preset()
    small = dict(progress=False, train_ids=ids, val_ids=ids[:800], state_path=state)
    train_diffusion_lm(preset, init="diffusion_lm", **small)  # leaves its final state
    start = content_digest(checkpoint.load("diffusion_lm"))
    with pytest.raises(TrainingError) as info:
        train_diffusion_lm(preset, **small, resume=True)  # without --init: a run from random weights
    assert str(info.value) == _other_settings(state, f"init {start!r} -> None")
    train_diffusion_lm(preset, init="diffusion_lm", **small, resume=True)  # the same start: it resumes


def test_lm_resume_refuses_another_teacher(tmp_path):
    from dataclasses import replace

    from ar_course.transformer.train import PRESETS, train_lm

    state, preset = tmp_path / "lm.train-state.safetensors", replace(PRESETS["tiny"], steps=2)
    teacher = train_lm(preset, seed=1, progress=False)[0]
    train_lm(preset, seed=0, teacher=teacher, progress=False, state_path=state)  # leaves its final state
    with pytest.raises(TrainingError) as info:
        train_lm(preset, seed=0, progress=False, state_path=state, resume=True)  # no teacher now
    assert str(info.value) == _other_settings(state, f"teacher {content_digest(teacher)!r} -> None")


# ---- the learning-rate schedule: linear warmup, then cosine down to min_lr_ratio * lr -----------------------


def _cosine(progress: float) -> float:
    """The cosine factor, from 1 at ``progress`` 0 down to 0 at 1."""
    return 0.5 * (1 + math.cos(math.pi * progress))


def test_lr_warms_up_linearly_then_decays_by_cosine_to_its_floor():
    config = TrainConfig(steps=10, lr=2.0, warmup=2, min_lr_ratio=0.1)
    top, floor = 2.0, 0.2
    assert lr_at(0, config) == pytest.approx(1.0, rel=1e-12)  # lr * 1 / warmup: the first step already moves
    assert lr_at(1, config) == pytest.approx(top, rel=1e-12)  # warmup - 1: the full rate
    assert lr_at(2, config) == pytest.approx(top, rel=1e-12)  # warmup: the cosine starts at its top
    assert lr_at(6, config) == pytest.approx(1.1, rel=1e-12)  # half-way through the 8 decay steps: the mean
    # the last step (9): 7 of the 8 decay steps done; the floor is reached at step 10 = steps, and kept
    assert lr_at(9, config) == pytest.approx(floor + (top - floor) * _cosine(7 / 8), rel=1e-12)
    assert lr_at(10, config) == pytest.approx(floor, rel=1e-12) and lr_at(100, config) == pytest.approx(floor)
    decay = [lr_at(step, config) for step in range(2, 11)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    no_warmup = TrainConfig(steps=4, lr=1.0, warmup=0, min_lr_ratio=0.0)  # the cosine from step 0, down to 0
    assert [lr_at(step, no_warmup) for step in range(5)] == pytest.approx(
        [1.0, _cosine(0.25), 0.5, _cosine(0.75), 0.0], abs=1e-12)


def test_a_callers_optimizer_keeps_its_groups_decay_and_gets_the_schedule():
    """TrainConfig's AdamW decays every parameter; a caller's optimizer with a no-decay group (nanoGPT's split)
    keeps each group's decay, and every group follows the schedule: one step at lr 2 of a weight decays it to
    1 - 2 * 0.5 = 0 (zero gradient, so Adam's step is 0) while the no-decay bias stays."""
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(1.0)
    opt = torch.optim.AdamW([{"params": [model.weight], "weight_decay": 0.5},
                             {"params": [model.bias], "weight_decay": 0.0}], lr=123.0)
    config = TrainConfig(steps=1, lr=2.0, warmup=0, grad_clip=None, log_every=1)
    train_loop(model, lambda m, x: (m(x) * 0).sum(), iter([torch.zeros(1, 1)]), config, optimizer=opt,
               progress=False)
    assert [g["lr"] for g in opt.param_groups] == [lr_at(0, config)] * 2 == [2.0] * 2
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    assert float(model.weight.detach()) == pytest.approx(0.0, abs=1e-12) and float(model.bias.detach()) == 1.0


# ---- trainers' options: one-line usage errors before any work --------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["ar", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["var", "--batch-size", "-4"], "--batch-size must be an integer >= 1"),
    (["lm", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["classifier", "--lr", "0"], "--lr must be a finite number > 0"),
    (["ar", "--p-uncond", "1.5"], "--p-uncond must be a finite number in [0, 1]"),
    (["tokenizer", "--usage-window", "0"], "--usage-window must be an integer >= 1"),
    (["tokenizer", "--scales", "1,x"], "--scales must be comma-separated integers >= 1, got '1,x'"),
    (["tokenizer", "--scales", "0,1"], "--scales must be comma-separated integers >= 1, got '0,1'"),
    (["diffusion_lm", "--train-blocks", "0,x"], "--train-blocks must be comma-separated integers >= 0"),
    (["diffusion_lm", "--train-blocks", "0,5"], "--train-blocks: train_block_sizes: 5 is neither 0 nor a divisor"),
    (["tokenizer", "--quantizer", "msvq", "--scales", "1,2,4"], "last scale must equal the latent side"),
    (["var", "--checkpoint-every", "-1"], "--checkpoint-every must be an integer >= 0"),
    (["ar", "--n-embd", "10", "--n-head", "4"], "--n-embd 10 must divide by --n-head 4"),
    (["lm", "--out", "model.pt"], "must name a .safetensors file"),
    (["lm", "--keep-best"], "--keep-best needs --eval-every N"),
    (["diffusion_lm", "--keep-best", "--eval-every", "0"], "--keep-best needs --eval-every N"),
    (["lm", "--ema", "1"], "--ema must be a finite number in [0, 1), got 1"),
])
def test_trainer_options_are_checked(argv, message, capsys):
    assert cli_main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("error: ") and message in err and err.rstrip().endswith("--help)"), err


@pytest.mark.parametrize("what", ["lm", "ar", "var", "tokenizer", "classifier"])
def test_resume_without_a_state_fails_before_training(what, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert cli_main(["train", what, "--resume", "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"error: no training state at {state_path_for(out)} to resume from\n"


def test_trainers_print_the_accuracy_by_guidance_as_percentages():
    from ar_course.train import format_accuracy

    assert format_accuracy({"0.0": 0.0949999988079071, "1.0": 0.9, "2.0": 1.0}) == (
        "w=0.0: 9.5%, w=1.0: 90.0%, w=2.0: 100.0%")


def test_a_model_config_json_cannot_hold_is_not_compared(tmp_path):
    """A model of your own whose config holds a dtype still trains and resumes (its config is just not compared)."""
    from dataclasses import dataclass

    @dataclass
    class Config:
        dtype: torch.dtype = torch.float32

    state = tmp_path / "lin.train-state.safetensors"
    model = torch.nn.Linear(2, 1)
    model.config = Config()
    x = torch.randn(4, 2)
    config = TrainConfig(steps=3, lr=1e-2, warmup=1)
    train_loop(model, lambda m, b: m(b).pow(2).mean(), iter([x] * 10), config, progress=False, state_path=state)
    assert "model" not in load_checkpoint(state)[1]["extra"]["settings"]


def test_a_setting_named_model_that_is_not_a_config_is_compared_as_a_value(tmp_path):
    state = tmp_path / "lin.train-state.safetensors"
    with pytest.raises(TrainingInterrupted):
        _keep_best_run(state, keep_best="", interrupt_at=5, settings={"model": "small"})
    with pytest.raises(TrainingError) as info:
        _keep_best_run(state, resume=True, keep_best="", settings={"model": "large"})
    assert str(info.value) == _other_settings(state, "model 'small' -> 'large'")
    _, history, _ = _keep_best_run(state, resume=True, keep_best="", settings={"model": "small"})  # was a TypeError
    assert history.steps == list(range(12))


def _tamper(tensors: dict, extra: dict, change: str) -> None:
    """What a hand-edited or damaged state file may hold instead of what save_train_state wrote."""
    history, scalars = extra["history"], extra["optimizer_scalars"]
    {"step_huge": lambda: extra.update(step=10**12), "step_over": lambda: extra.update(step=13),
     "step_neg": lambda: extra.update(step=-5), "step_str": lambda: extra.update(step="abc"),
     "step_bool": lambda: extra.update(step=True), "no_step": lambda: extra.pop("step"),
     "no_opt": lambda: extra.pop("optimizer_scalars"), "opt_list": lambda: extra.update(optimizer_scalars=[1]),
     "opt_key": lambda: extra.update(optimizer_scalars={"x": scalars.get("0", {})}),
     "groups": lambda: extra.update(param_groups={"lr": 1}), "hist": lambda: history.update(bogus=1),
     "settings": lambda: extra.update(settings=[1]), "no_rng": lambda: tensors.pop("rng/cpu"),
     "rng_short": lambda: tensors.update({"rng/cpu": torch.zeros(3, dtype=torch.uint8)})}[change]()


@pytest.mark.parametrize("change, says", [
    ("step_huge", "step must be in 0..12 (the steps of the run that wrote it), got 1000000000000"),
    ("step_over", "step must be in 0..12 (the steps of the run that wrote it), got 13"),
    ("step_neg", "step must be in 0..12 (the steps of the run that wrote it), got -5"),
    ("step_str", "step must be an int, got 'abc'"), ("step_bool", "step must be an int, got True"),
    ("no_step", "it records no step"), ("no_opt", "optimizer_scalars must be a JSON object, got None"),
    ("opt_list", "optimizer_scalars must be a JSON object, got [1]"),
    ("opt_key", "optimizer_scalars must map parameter numbers to objects"),
    ("groups", "param_groups must be a JSON array, got {'lr': 1}"),
    ("hist", "history has unknown field(s) ['bogus']"), ("settings", "settings must be a JSON object, got [1]"),
    ("no_rng", "rng/cpu must be a torch.uint8 tensor of shape (5056,), got none"),
    ("rng_short", "rng/cpu must be a torch.uint8 tensor of shape (5056,), got torch.uint8 of shape (3,)"),
])
def test_a_damaged_state_is_one_training_error_naming_the_file_before_any_batch_is_replayed(tmp_path, change, says):
    state = tmp_path / "lin.train-state.safetensors"
    with pytest.raises(TrainingInterrupted):
        _keep_best_run(state, keep_best="", interrupt_at=5, settings=RUN)
    tensors, meta = load_checkpoint(state)
    _tamper(tensors, meta["extra"], change)
    save_checkpoint(state, tensors, meta["config"], kind=meta["kind"], **meta["extra"])
    with pytest.raises(TrainingError) as info:
        _keep_best_run(state, resume=True, keep_best="", settings=RUN)
    assert str(info.value) == f"the training state at {state} is damaged: {says}"


def test_a_run_whose_update_overflows_the_weights_says_it_diverged_not_what_the_model_checked(capsys, tmp_path):
    """lr 10: a finite loss whose update leaves NaN in the encoder; the next forward pass fails in the quantizer's
    own input check (``z must be finite``), which the loop reports as the divergence it is."""
    with one_torch_thread():
        status, out, err = run(capsys, "train", "tokenizer", "--steps", "20", "--batch-size", "8", "--lr", "10",
                               "--out", tmp_path / "t.safetensors")
    assert status == 1 and out == ""
    line = err.strip().splitlines()[-1]  # after the progress bar
    assert re.match(r"error: training diverged: the weights hold NaN or inf after step \d+ \(\S+ first; step \d+ "
                    r"failed: ValueError: z must be finite, got nan\) \(rerun with a lower --lr\)$", line), line
    assert not (tmp_path / "t.safetensors").exists()


def test_an_error_with_finite_weights_is_not_called_divergence():
    model = torch.nn.Linear(2, 1)

    def loss_fn(m, batch):
        if batch == 2:
            raise ValueError("batch 2 is bad")
        return m(torch.ones(1, 2)).sum()

    with pytest.raises(ValueError, match="^batch 2 is bad$"):
        train_loop(model, loss_fn, iter(range(10)), TrainConfig(steps=5, lr=1e-3, warmup=0), progress=False)


def test_a_state_further_along_than_a_shorter_new_run_is_other_settings_not_damage(tmp_path):
    """Step 5 of a 12-step run, resumed with --steps 3: the state is sound, the run's options are not its own."""
    state = tmp_path / "lin.train-state.safetensors"
    with pytest.raises(TrainingInterrupted):
        _keep_best_run(state, keep_best="", interrupt_at=5, settings=RUN)
    with pytest.raises(TrainingError) as info:
        read_train_state(state, TrainConfig(steps=3, lr=1e-2, warmup=2, eval_every=2), RUN)
    assert str(info.value) == _other_settings(state, "steps 12 -> 3")



def _signalled_in_eval_run(state_path: Path | None, signal_at_eval: int | None, dropout: float = 0.0,
                           fail_at: int | None = None, made: list | None = None) -> object:
    """6 steps of a small model (appended to ``made``), evaluated every 3 steps; SIGINT reaches the process inside
    evaluation number ``signal_at_eval`` (1 or 2; 2 is the last), and the loss raises at step ``fail_at``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(dropout), torch.nn.Linear(8, 1))
    if made is not None:
        made.append(model)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    evals, steps = [0], [0]

    def eval_fn(m):
        evals[0] += 1
        if evals[0] == signal_at_eval:
            os.kill(os.getpid(), signal.SIGINT)
        return {"val": float(m(x).pow(2).mean())}

    def loss_fn(m, batch):
        steps[0] += 1
        if steps[0] == fail_at:
            raise RuntimeError("a failing loss")
        return m(batch).pow(2).mean()

    config = TrainConfig(steps=6, lr=1e-2, warmup=1, eval_every=3, checkpoint_every=0)
    return train_loop(model, loss_fn, iter([x] * 100), config, eval_fn=eval_fn, progress=False,
                      state_path=state_path)


def test_a_signal_during_the_last_evaluation_still_stops_the_run(tmp_path):
    """SIGINT inside the final evaluation came after the last step's check and was dropped (audit 30): the run
    returned as if nothing had been pressed. Now it raises TrainingInterrupted at the last step, whose state is
    complete; a signal during an earlier evaluation (after step 3) stops at the next step's check, as before."""
    state = tmp_path / "m.train-state.safetensors"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        _signalled_in_eval_run(state, signal_at_eval=2)
    assert info.value.step == 6 and signal.getsignal(signal.SIGINT) is before
    assert load_checkpoint(state)[1]["extra"]["step"] == 6
    with pytest.raises(TrainingInterrupted) as info:
        _signalled_in_eval_run(tmp_path / "other.train-state.safetensors", signal_at_eval=1)
    assert info.value.step == 4


def test_an_interrupted_or_failed_run_leaves_the_model_in_eval_mode(tmp_path):
    """The docstring's "left in eval mode" held only for a run that returned (audit 30): with dropout, two
    forward passes of an interrupted model differed."""
    made: list = []
    with pytest.raises(TrainingInterrupted):
        _signalled_in_eval_run(tmp_path / "a.train-state.safetensors", signal_at_eval=1, dropout=0.3, made=made)
    with pytest.raises(RuntimeError, match="a failing loss"):
        _signalled_in_eval_run(None, signal_at_eval=None, dropout=0.3, fail_at=4, made=made)
    _signalled_in_eval_run(None, signal_at_eval=None, dropout=0.3, made=made)
    assert [m.training for m in made] == [False, False, False]
    x = torch.randn(4, 3)
    assert torch.equal(made[0](x), made[0](x))  # no dropout
