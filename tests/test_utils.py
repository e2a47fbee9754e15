"""ar_course.utils: generate_in_batches, the one chunking loop of every generator (and exercise 7.4's reference),
and the argument checks and counters."""

import pytest
import torch

from ar_course.utils import (
    check_ids, check_image_values, check_number, count_parameters, generate_in_batches, is_integer_tensor,
)


def test_chunks_in_order_with_a_shorter_last_one():
    calls = []

    def fake_images(chunk):
        calls.append(chunk.tolist())
        return chunk[:, None, None].float() * 10  # (b, 1, 1)

    classes = torch.tensor([4, 1, 7, 7, 0, 2, 9, 5, 3, 8, 6])
    out = generate_in_batches(fake_images, classes, 4)
    assert calls == [[4, 1, 7, 7], [0, 2, 9, 5], [3, 8, 6]]
    assert out.shape == (11, 1, 1) and torch.equal(out[:, 0, 0], classes.float() * 10)
    assert generate_in_batches(fake_images, classes, 50).shape == (11, 1, 1)
    assert calls[3:] == [classes.tolist()]  # a batch larger than the request: one call


@pytest.mark.parametrize("classes, batch_size, error", [
    (torch.arange(3), 0, ValueError),
    (torch.arange(3), 2.0, TypeError),
    (torch.arange(0), 2, ValueError),
    (torch.tensor(3), 2, ValueError),
    ([0, 1, 2], 2, TypeError),
])
def test_bad_arguments(classes, batch_size, error):
    with pytest.raises(error):
        generate_in_batches(lambda chunk: chunk, classes, batch_size)


def test_check_image_values_passes_an_empty_tensor():  # torch's amin() of no elements is a RuntimeError
    empty = torch.rand(0, 1, 4, 4)
    assert check_image_values("images", empty) is empty
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\]"):
        check_image_values("images", torch.full((1, 1, 2, 2), 255.0))


def test_check_image_values_refuses_minus_one_to_one_images():
    """Images in [-1, 1] (the other common convention) are refused on their low side, not only too-bright ones."""
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got values in \[-1.00, 1.00\]"):
        check_image_values("images", torch.tensor([-1.0, 0.0, 1.0]))


def test_check_number_open_upper_bound_refuses_the_bound():
    """An open upper bound refuses the bound itself, as an open lower bound does."""
    assert check_number("p", 0.999, 0, 1, lo_open=True, hi_open=True) == 0.999
    with pytest.raises(ValueError, match=r"p must be .*\(0, 1\).*got 1"):
        check_number("p", 1.0, 0, 1, lo_open=True, hi_open=True)


def test_count_parameters_leaves_out_frozen_ones():
    """count_parameters counts the trainable parameters only."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))  # 16 + 10 parameters
    model[0].requires_grad_(False)
    assert count_parameters(model) == 10


def test_check_ids_reads_narrow_dtypes_without_wrapping_high():
    """check_ids widens a narrow dtype before comparing with high: a uint8 map checked against 256 (which a uint8
    cannot hold) passes, and an id of 200 against 100 is named."""
    x = torch.tensor([[3, 200]], dtype=torch.uint8)
    assert check_ids("idx", x, 256, ("B", "T"), dtype=None) is x
    with pytest.raises(ValueError, match=r"idx must lie in \[0, 99\], got 200"):
        check_ids("idx", x, 100, ("B", "T"), dtype=None)
    assert check_ids("idx", x.to(torch.int8).abs(), 256, ("B", "T"), dtype=None) is not None


def test_is_integer_tensor_takes_every_integer_dtype_and_nothing_else():
    integers = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    others = (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64)
    assert all(is_integer_tensor(torch.zeros(2, dtype=d)) for d in integers)
    assert not any(is_integer_tensor(torch.zeros(2, dtype=d)) for d in others)


def test_progress_bars_are_widgets_only_with_ipywidgets(monkeypatch):
    """tqdm.auto in a Jupyter kernel without ipywidgets (a library-only install) warned "IProgress not found" on
    import of ar_course.system or ar_course.train (audit 30): the text bar is used there instead."""
    import importlib.util

    import tqdm.auto
    import tqdm.std

    from ar_course import system, train, utils

    assert utils.progress_bar_class(widgets=True) is tqdm.auto.tqdm
    assert utils.progress_bar_class(widgets=False) is tqdm.std.tqdm
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else object())
    assert utils.progress_bar_class() is tqdm.std.tqdm
    assert train.progress_bar is system.progress_bar is utils.progress_bar
