"""ar_course.utils.generate_in_batches: the one chunking loop of every generator (and exercise 7.4's reference)."""

import pytest
import torch

from ar_course.utils import generate_in_batches


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
    from ar_course.utils import check_image_values

    empty = torch.rand(0, 1, 4, 4)
    assert check_image_values("images", empty) is empty
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\]"):
        check_image_values("images", torch.full((1, 1, 2, 2), 255.0))
