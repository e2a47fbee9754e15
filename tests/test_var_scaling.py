"""The mini scaling study of chapter 04 / benchmarks/bench_var_scaling.py, on a toy budget."""

import math

import numpy as np
import pytest

from ar_course.var import load_pretrained
from ar_course.var.scaling import scaling_study


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained()


def test_scaling_study_trains_one_model_per_width_and_fits_the_power_law(shipped):
    model, tokenizer = shipped
    study = scaling_study(tokenizer, model.config, [4, 8], steps=2, n_train=64, n_test=16, progress=False)
    assert study["widths"] == [4, 8]
    assert study["params"][0] < study["params"][1]
    assert all(math.isfinite(x) and x > 0 for x in study["test_loss"])
    slope, intercept = np.polyfit(np.log(study["params"]), np.log(study["test_loss"]), 1)
    assert study["slope"] == pytest.approx(slope) and study["intercept"] == pytest.approx(intercept)
    assert abs(study["correlation"]) == pytest.approx(1.0)  # two points always lie on a line
    again = scaling_study(tokenizer, model.config, [4, 8], steps=2, n_train=64, n_test=16, progress=False)
    assert again["test_loss"] == study["test_loss"]  # seeded


@pytest.mark.parametrize("widths", [[16], [15, 32], [0, 16], [8, 8], [8, 8, 16]])
def test_scaling_study_rejects_bad_widths(shipped, widths):
    model, tokenizer = shipped
    with pytest.raises(ValueError, match="widths"):
        scaling_study(tokenizer, model.config, widths, steps=1, progress=False)


@pytest.mark.parametrize("counts, message", [
    ({"n_test": 9000}, r"^n_test must be an integer in \[1, 5000\], got 9000$"),  # gave the 5000-digit losses
    ({"n_train": 20001}, r"^n_train must be an integer in \[48, 20000\], got 20001$"),
    ({"n_train": -19936, "n_test": -4984}, r"^n_train must be an integer in \[48, 20000\]"),  # sliced from the end
    ({"n_train": 40}, r"^n_train must be an integer in \[48, 20000\], got 40$"),  # named a batch size not its own
])
def test_scaling_study_refuses_digit_counts_it_cannot_use(shipped, counts, message):
    model, tokenizer = shipped
    with pytest.raises(ValueError, match=message):
        scaling_study(tokenizer, model.config, [4, 8], steps=1, progress=False, **counts)
    with pytest.raises(TypeError, match="n_train must be an integer"):
        scaling_study(tokenizer, model.config, [4, 8], steps=1, n_train=2.5, progress=False)
