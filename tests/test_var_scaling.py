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


@pytest.mark.parametrize("widths", [[16], [15, 32], [0, 16]])
def test_scaling_study_rejects_bad_widths(shipped, widths):
    model, tokenizer = shipped
    with pytest.raises(ValueError, match="widths"):
        scaling_study(tokenizer, model.config, widths, steps=1, progress=False)
