"""Bad input to the training loop (``ar_course.train``) and the data helpers (``ar_course.data``): one-line
TypeError / ValueError naming the argument, at call time, never a deep error or a silently wrong result."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ar_course.data import CharTokenizer, image_batches, load_mnist, load_text_dataset, make_shapes, text_batches
from ar_course.train import History, TrainConfig, TrainingError, train_loop


def _linear_problem() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    x = torch.randn(16, 2)
    return model, (x, x @ torch.tensor([[1.0], [-2.0]]))


def _mse(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _train(config, loss_fn=_mse, batches=None, **kwargs) -> tuple[torch.nn.Module, History]:
    model, batch = _linear_problem()
    batches = itertools.repeat(batch) if batches is None else batches(batch)
    return model, train_loop(model, loss_fn, batches, config, progress=False, **kwargs)


def _one_line(exc_info) -> None:
    assert "\n" not in str(exc_info.value)


# ---- TrainConfig: every field checked when it is made ------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, message", [
    ({"grad_clip": -1.0}, ValueError, r"grad_clip must be a finite number >= 0, got -1.0"),  # was gradient ascent
    ({"grad_clip": float("nan")}, ValueError, r"grad_clip must be a finite number >= 0, got nan"),
    ({"log_every": 0}, ValueError, r"log_every must be an integer >= 1, got 0"),
    ({"steps": -3}, ValueError, r"steps must be an integer >= 1, got -3"),
    ({"steps": 0}, ValueError, r"steps must be an integer >= 1, got 0"),
    ({"steps": 2.5}, TypeError, r"steps must be an integer >= 1, got 2.5 \(float\)"),
    ({"lr": "3e-3"}, TypeError, r"lr must be a finite number > 0, got '3e-3' \(str\)"),
    ({"lr": float("nan")}, ValueError, r"lr must be a finite number > 0, got nan"),
    ({"lr": 0.0}, ValueError, r"lr must be a finite number > 0, got 0.0"),
    ({"weight_decay": -0.1}, ValueError, r"weight_decay must be a finite number >= 0"),
    ({"warmup": -1}, ValueError, r"warmup must be an integer >= 0, got -1"),
    ({"warmup": True}, TypeError, r"warmup must be an integer >= 0, got True \(bool\)"),
    ({"min_lr_ratio": 1.5}, ValueError, r"min_lr_ratio must be a finite number in \[0, 1\], got 1.5"),
    ({"betas": (0.9,)}, ValueError, r"betas must be two numbers in \[0, 1\), got \(0.9,\)"),
    ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be a finite number in \[0, 1\), got 1.0"),
    ({"betas": 0.9}, ValueError, r"betas must be two numbers"),
    ({"eval_every": -1}, ValueError, r"eval_every must be an integer >= 0, got -1"),
    ({"checkpoint_every": 1.0}, TypeError, r"checkpoint_every must be an integer >= 0, got 1.0 \(float\)"),
    ({"keep_best": None}, TypeError, r"keep_best must be the name of an eval metric \(a str"),
    ({"ema": "0.9"}, TypeError, r"ema must be a finite number, got '0.9' \(str\)"),
])
def test_train_config_checks_every_field(kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        TrainConfig(**kwargs)
    _one_line(info)


def test_train_config_defaults_and_documented_values_are_valid():
    assert TrainConfig() == TrainConfig(steps=1000, lr=3e-3, weight_decay=0.0, warmup=50, min_lr_ratio=0.1,
                                        grad_clip=1.0, betas=(0.9, 0.99), eval_every=0, log_every=10,
                                        checkpoint_every=200, keep_best="", ema=0.0)
    assert TrainConfig(grad_clip=None).grad_clip is None and TrainConfig(grad_clip=0).grad_clip == 0
    assert TrainConfig(steps=np.int64(5)).steps == 5 and type(TrainConfig(steps=np.int64(5)).steps) is int
    assert TrainConfig(betas=[0.5, 0.9]).betas == (0.5, 0.9)


def test_train_loop_refuses_a_config_that_is_not_a_train_config():
    with pytest.raises(TypeError, match=r"config must be a TrainConfig, got dict"):
        _train({"steps": 3})


# ---- batches: any iterable, and a clear error when it runs out ----------------------------------------------


def test_train_loop_says_when_batches_run_out():
    with pytest.raises(ValueError, match=r"batches ran out at step 4 \(after 3 batches\): it must yield at least "
                                         r"steps=10 batches") as info:
        _train(TrainConfig(steps=10), batches=lambda b: iter([b] * 3))
    _one_line(info)


@pytest.mark.parametrize("make", [lambda b: [b] * 3, lambda b: (b, b, b),
                                  lambda b: torch.utils.data.DataLoader([b] * 3, batch_size=None)])
def test_train_loop_accepts_an_iterable_and_trains_as_on_its_iterator(make):
    want, want_history = _train(TrainConfig(steps=3, warmup=1), batches=lambda b: iter([b] * 3))
    got, history = _train(TrainConfig(steps=3, warmup=1), batches=make)
    assert history.loss == want_history.loss
    for k, v in want.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k


def test_train_loop_refuses_batches_that_are_not_iterable():
    with pytest.raises(TypeError, match=r"batches must be an iterator or an iterable of batches, got int"):
        _train(TrainConfig(steps=3), batches=lambda b: 5)


# ---- loss_fn must return a 0-d tensor that requires grad ---------------------------------------------------


@pytest.mark.parametrize("loss_fn, error, message", [
    (lambda m, b: (m(b[0]) - b[1]) ** 2, ValueError, r"got a tensor of shape \(16, 1\)"),  # per-example loss
    (lambda m, b: 1.0, TypeError, r"got float"),
    (lambda m, b: _mse(m, b).detach(), ValueError, r"got a tensor of shape \(\) that does not require grad"),
])
def test_train_loop_checks_what_loss_fn_returns(loss_fn, error, message):
    with pytest.raises(error, match=r"loss_fn must return a scalar tensor \(0-d\) that requires grad, " + message) \
            as info:
        _train(TrainConfig(steps=3), loss_fn=loss_fn)
    _one_line(info)


# ---- keep_best never keeps the weights of a NaN evaluation -------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_keep_best_refuses_a_metric_that_is_not_finite(bad):
    values = iter([2.0, bad, 1.0, 0.5])
    with pytest.raises(TrainingError, match=rf"keep_best='val': the evaluation at step 2 gave {bad}, not a "
                                            r"finite number"):
        _train(TrainConfig(steps=4, eval_every=1, keep_best="val"), eval_fn=lambda m: {"val": next(values)})
    with pytest.raises(TrainingError, match=r"evaluation at step 1 gave nan"):  # was: ends with step-1 weights
        _train(TrainConfig(steps=4, eval_every=1, keep_best="val"), eval_fn=lambda m: {"val": math.nan})


@pytest.mark.parametrize("window, error, message", [
    (0, ValueError, r"window must be an integer >= 1, got 0"),
    (-1, ValueError, r"window must be an integer >= 1, got -1"),
    (2.0, TypeError, r"window must be an integer >= 1, got 2.0 \(float\)"),
])
def test_history_smoothed_checks_its_window(window, error, message):
    with pytest.raises(error, match=message):
        History(loss=[1.0, 2.0, 3.0]).smoothed(window)


# ---- data: batches are checked when made, not at the first next() ------------------------------------------


@pytest.mark.parametrize("call, error, message", [
    (lambda: text_batches(torch.arange(20.0), 3, 2), ValueError, r"ids must be a 1-D tensor of integer token ids, "
                                                                 r"got dtype torch.float32"),
    (lambda: text_batches(torch.ones(20, dtype=torch.bool), 3, 2), ValueError, r"got dtype torch.bool"),
    (lambda: text_batches(torch.zeros(4, 5, dtype=torch.long), 3, 2), ValueError, r"got shape \(4, 5\)"),
    (lambda: text_batches(torch.tensor(3), 3, 2), ValueError, r"ids must be a 1-D \(N,\) integer tensor"),
    (lambda: text_batches(list(range(20)), 3, 2), TypeError, r"ids must be a 1-D \(N,\) integer tensor, got list"),
    (lambda: text_batches(torch.arange(20), 2.5, 2), TypeError, r"block_size must be an integer >= 1, got 2.5"),
    (lambda: text_batches(torch.arange(20), 3, 0), ValueError, r"batch_size must be an integer >= 1, got 0"),
    (lambda: text_batches(torch.arange(3), 3, 2), ValueError, r"need more than block_size=3 tokens"),
    (lambda: text_batches(torch.arange(20), 3, 2, generator=0), TypeError, r"generator must be a CPU "
                                                                           r"torch.Generator or None, got int"),
    (lambda: text_batches(torch.arange(20), 3, 2, device="gpu"), ValueError, r"unknown device 'gpu'"),
    (lambda: image_batches(torch.rand(10, 1, 2, 2), torch.arange(10), 4.0), TypeError,
     r"batch_size must be an integer, got 4.0 \(float\)"),
    (lambda: image_batches(torch.rand(10, 1, 2, 2), torch.arange(10), 11), ValueError,
     r"batch_size must be between 1 and the number of images \(10\), got 11"),
    (lambda: image_batches(torch.rand(10, 1, 2, 2), list(range(10)), 4), TypeError,
     r"labels must be a \(N,\) tensor, got list"),
    (lambda: image_batches(np.zeros((10, 2)), torch.arange(10), 4), TypeError, r"images must be a \(N, \.\.\.\) "
                                                                               r"tensor, got ndarray"),
    (lambda: image_batches(torch.rand(10, 2), torch.arange(9), 4), ValueError, r"differ in length: 10 vs 9"),
    (lambda: image_batches(torch.rand(10, 2), torch.arange(10), 4, generator=1), TypeError, r"generator must be"),
])
def test_batch_streams_check_their_arguments_when_called(call, error, message):
    with pytest.raises(error, match=message) as info:
        call()  # no next(): the error comes at once
    _one_line(info)


def test_batch_streams_still_yield_as_documented():
    x, y = next(text_batches(torch.arange(50), 4, 3, generator=torch.Generator().manual_seed(0), device="cpu"))
    assert x.shape == y.shape == (3, 4) and x.dtype == torch.int64 and torch.equal(y, x + 1)
    images, labels = next(image_batches(torch.arange(6.0), torch.arange(6), np.int64(3)))
    assert images.shape == labels.shape == (3,) and torch.equal(images.long(), labels)


# ---- CharTokenizer.decode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ids, error, message", [
    (torch.tensor([0.0, 1.0]), ValueError, r"ids must be a 1-D integer tensor or array, got shape \(2,\) "
                                           r"torch.float32"),
    ([True, False], TypeError, r"ids\[0\] must be an integer, got True \(bool\)"),  # was silently 'ba'
    ([0, 1.0], TypeError, r"ids\[1\] must be an integer, got 1.0 \(float\)"),
    (np.array([[0, 1]]), ValueError, r"got shape \(1, 2\) int64"),
    (np.array([True]), ValueError, r"got shape \(1,\) bool"),
    (torch.tensor([[0, 1]]), ValueError, r"got shape \(1, 2\) torch.int64"),
    ("ab", TypeError, r"ids must be a 1-D tensor, array or sequence of integer ids, got str"),
    (1, TypeError, r"got int"),
    ([[0, 1]], TypeError, r"ids\[0\] must be an integer, got \[0, 1\] \(list\)"),
])
def test_decode_refuses_what_is_not_a_1d_sequence_of_ints(ids, error, message):
    with pytest.raises(error, match=message) as info:
        CharTokenizer("abc").decode(ids)
    _one_line(info)


@pytest.mark.parametrize("text, message", [
    (5, r"^text must be a str, got int$"),  # 'int' object is not iterable
    (b"ab", r"^text must be a str, got bytes \(decode bytes first: data.decode\('utf-8'\)\)$"),  # "character 97"
    (["a", "b"], r"^text must be a str, got list$"),
])
def test_encode_takes_a_str_only(text, message):
    with pytest.raises(TypeError, match=message) as info:
        CharTokenizer("abc").encode(text)
    _one_line(info)


@pytest.mark.parametrize("ids", [[0, 1, 2], (0, 1, 2), range(3), np.array([0, 1, 2]), np.array([0, 1, 2], np.uint8),
                                 torch.tensor([0, 1, 2], dtype=torch.int32), [np.int64(0), torch.tensor(1), 2]])
def test_decode_accepts_integer_ids(ids):
    assert CharTokenizer("abc").decode(ids) == "abc"


# ---- MNIST, shapes and the text split ----------------------------------------------------------------------


@pytest.mark.parametrize("call, error, message", [
    (lambda: load_mnist(device="gpu"), ValueError, r"unknown device 'gpu'"),
    (lambda: make_shapes(2, 8, device="gpu"), ValueError, r"unknown device 'gpu'"),
    (lambda: make_shapes(2.5, 8), TypeError, r"n must be an integer >= 1, got 2.5 \(float\)"),
    (lambda: make_shapes(2, 8.0), TypeError, r"size must be an integer >= 8, got 8.0 \(float\)"),
    (lambda: make_shapes(2, 8, seed=-1), ValueError, r"seed must be an integer >= 0, got -1"),
    (lambda: make_shapes(2, 8, seed=None), TypeError, r"seed must be an integer >= 0, got None"),  # was random
    (lambda: load_text_dataset(1e-9), ValueError, r"val_fraction=1e-09 leaves a part empty: \d+ training and 0 "
                                                  r"validation characters"),
    (lambda: load_text_dataset(1 - 1e-9), ValueError, r"leaves a part empty: 0 training and \d+ validation"),
    (lambda: load_text_dataset("0.1"), TypeError, r"val_fraction must be a finite number in \(0, 1\), got '0.1'"),
    (lambda: load_text_dataset(True), TypeError, r"val_fraction must be a finite number in \(0, 1\), got True"),
])
def test_data_sources_check_their_arguments(call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    _one_line(info)


def test_make_shapes_accepts_numpy_integers_and_a_cpu_device():
    a, la = make_shapes(np.int64(3), 8, seed=np.int64(2), device="cpu")
    b, lb = make_shapes(3, 8, seed=2)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_image_trainers_refuse_labels_outside_the_classes_before_training():
    """A label equal to ``config.n_classes`` is the null class: train_var and train_continuous trained every image
    of it as the unconditional class, without an error (audit 29); a negative label reached the first step."""
    from ar_course.continuous.model import ContinuousARConfig
    from ar_course.continuous.train import train_continuous
    from ar_course.raster.train import class_count
    from ar_course.var.model import VARConfig
    from ar_course.var.train import train_var

    labels = torch.tensor([0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 3\], got 4$"):
        train_var(None, torch.zeros(5, 30, dtype=torch.long), labels, VARConfig(n_classes=4), steps=1,
                  progress=False)
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 3\], got 4$"):
        train_continuous(torch.zeros(5, 16, 4), labels, ContinuousARConfig(token_dim=4, n_classes=4), steps=1,
                         progress=False)
    with pytest.raises(ValueError, match=r"^labels must be a \(5,\) long tensor"):
        train_var(None, torch.zeros(5, 30, dtype=torch.long), labels.float(), VARConfig(n_classes=5), steps=1,
                  progress=False)
    with pytest.raises(ValueError, match=r"^labels must be class ids >= 0, got -1$"):
        class_count(torch.tensor([-1, 0, 3]), None)
    assert class_count(labels, None) == 5 and class_count(labels, 7) == 7


@pytest.mark.parametrize("trainer", ["ar", "maskgit"])
def test_token_map_trainers_name_their_token_maps(trainer):
    """An array of token maps was refused as 'images must be a (N, ...) tensor' (audit 29); codes beyond the
    tokenizer's reached the first step."""
    from ar_course.checkpoint import load
    from ar_course.masked.train import train_maskgit
    from ar_course.raster.train import train_ar

    train = train_ar if trainer == "ar" else train_maskgit
    tok, labels = load("mnist_vq"), torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match=r"^token_maps must be a \(N, h, w\) long tensor, got ndarray$"):
        train(tok, np.zeros((4, 8, 8), dtype=np.int64), labels, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"^token_maps must lie in \[0, 255\], got 256$"):
        train(tok, torch.full((4, 8, 8), 256), labels, steps=1, progress=False)
