"""Tests of ar_course.data: the shipped MNIST file, the shapes generator, the text corpus and the batchers."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
import struct

import numpy as np
import pytest
import torch
from conftest import ROOT

from ar_course.data import (MNIST_SHA256, SHAPE_NAMES, TEXT_ALPHABET, CharTokenizer, image_batches,
                            load_mnist, load_text, load_text_dataset, make_shapes, normalise_text,
                            text_batches)
from ar_course.data.mnist import MNIST_PATH

# ---------------------------------------------------------------------------------------------------------
# MNIST


def test_shipped_npz_matches_its_checksum_everywhere_it_is_written():
    digest = hashlib.sha256(MNIST_PATH.read_bytes()).hexdigest()
    assert digest == MNIST_SHA256
    readme = (MNIST_PATH.parent / "README.md").read_text(encoding="utf-8")
    assert re.findall(r"`([0-9a-f]{64})`", readme) == [digest]
    assert MNIST_PATH.stat().st_size < 5_000_000


def test_shipped_npz_arrays():
    with np.load(MNIST_PATH) as npz:
        for split, n, n_orig in (("train", 20_000, 60_000), ("test", 5_000, 10_000)):
            images, labels, index = npz[f"{split}_images"], npz[f"{split}_labels"], npz[f"{split}_index"]
            assert images.shape == (n, 28, 28) and images.dtype == np.uint8
            assert labels.shape == (n,) and labels.dtype == np.uint8
            assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, n // 10))
            assert images.max() == 255 and images.min() == 0
            assert np.all(np.diff(index) > 0) and 0 <= index[0] and index[-1] < n_orig


@pytest.mark.parametrize("split,n", [("train", 20_000), ("test", 5_000)])
@pytest.mark.parametrize("size", [28, 32])
def test_load_mnist_shapes_dtypes_and_range(split, n, size):
    images, labels = load_mnist(split, size=size)
    assert images.shape == (n, 1, size, size) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert images.min() == 0.0 and images.max() == 1.0
    assert labels.min() == 0 and labels.max() == 9


def test_load_mnist_32_is_the_28_image_padded_with_zeros():
    small, _ = load_mnist("test", size=28)
    big, _ = load_mnist("test", size=32)
    assert torch.equal(big[:, :, 2:30, 2:30], small)
    border = big.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.abs().sum() == 0


def test_load_mnist_returns_fresh_tensors():
    images, _ = load_mnist("test")
    images.zero_()
    assert load_mnist("test")[0].max() == 1.0


@pytest.mark.parametrize("kwargs,message", [({"split": "val"}, "split"), ({"split": "Train"}, "split"),
                                            ({"size": 64}, "size"), ({"size": 27}, "size")])
def test_load_mnist_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_mnist(**kwargs)


def _extract_script():
    spec = importlib.util.spec_from_file_location("extract_mnist", ROOT / "scripts" / "extract_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extract_script_parses_idx_and_balances_classes(tmp_path):
    script = _extract_script()
    images = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4)
    raw = bytes([0, 0, 8, 3]) + struct.pack(">3I", 3, 2, 4) + images.tobytes()
    assert np.array_equal(script.parse_idx(raw), images)
    with pytest.raises(ValueError, match="idx"):
        script.parse_idx(bytes([0, 0, 9, 1]) + raw[4:])
    labels = np.random.default_rng(5).integers(0, 10, 1000)
    index = script.choose_subset(labels, 200, seed=3)
    assert np.array_equal(np.bincount(labels[index], minlength=10), np.full(10, 20))
    assert np.array_equal(index, script.choose_subset(labels, 200, seed=3))
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    script.save_npz(a, {"x": images})
    script.save_npz(b, {"x": images})
    assert a.read_bytes() == b.read_bytes()
    with np.load(a) as npz:
        assert np.array_equal(npz["x"], images)


# ---------------------------------------------------------------------------------------------------------
# coloured shapes


def test_make_shapes_shapes_dtypes_range_and_balance():
    images, labels = make_shapes(403, size=24, seed=7)
    assert images.shape == (403, 3, 24, 24) and images.dtype == torch.float32
    assert labels.shape == (403,) and labels.dtype == torch.int64
    assert images.min() >= 0.0 and images.max() <= 1.0
    counts = torch.bincount(labels, minlength=len(SHAPE_NAMES))
    assert counts.max() - counts.min() <= 1
    # a bright shape on a dark background: every image has a full-intensity pixel and a dark corner
    assert torch.all(images.amax(dim=(1, 2, 3)) == 1.0)
    assert torch.all(images[:, :, 0, 0] <= 0.15)


def test_make_shapes_is_deterministic_under_its_seed():
    a, la = make_shapes(64, seed=3)
    b, lb = make_shapes(64, seed=3)
    c, lc = make_shapes(64, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def _guess_shape(image: torch.Tensor) -> int:
    """Class of one rendered shape from its ink mask: how much of its bounding box it fills, its aspect."""
    ink = image.amax(dim=0) > 0.5  # (S, S)
    rows, cols = ink.any(dim=1).nonzero().flatten(), ink.any(dim=0).nonzero().flatten()
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    fill = ink.sum() / (height * width)
    if fill > 0.9:
        return SHAPE_NAMES.index("square")
    if fill > 0.65:
        return SHAPE_NAMES.index("circle")
    return SHAPE_NAMES.index("triangle" if height < 0.93 * width else "cross")


def test_make_shapes_draws_the_shape_its_label_names():
    images, labels = make_shapes(200, size=64, seed=0)
    guesses = torch.tensor([_guess_shape(image) for image in images])
    assert (guesses == labels).float().mean() > 0.95


def test_make_shapes_draws_the_same_scenes_at_every_size():
    small, labels_small = make_shapes(50, size=32, seed=5)
    big, labels_big = make_shapes(50, size=64, seed=5)
    assert torch.equal(labels_small, labels_big)
    assert (torch.nn.functional.avg_pool2d(big, 2) - small).abs().mean() < 0.02


def test_make_shapes_anti_aliases_the_outline_over_one_pixel():
    """Each outline is anti-aliased over about one pixel whatever the shape's radius: a circle has about one
    partly covered pixel per pixel of circumference (a ramp measured in radii would be 3 to 5 times too sharp)."""
    images, labels = make_shapes(40, size=32, seed=0)
    strongest = images.max(1).values  # (n, S, S): colour 1, background <= 0.15
    edge = ((strongest > 0.2) & (strongest < 0.95)).float().sum((1, 2))  # partly covered pixels
    inside = (strongest >= 0.95).float().sum((1, 2))
    circles = labels == SHAPE_NAMES.index("circle")
    radius_px = (inside[circles] / math.pi).sqrt()
    ratio = edge[circles] / (2 * math.pi * radius_px)  # partly covered pixels per pixel of circumference
    assert 0.6 < float(ratio.mean()) < 1.4, ratio


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 4, "size": 4}])
def test_make_shapes_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_shapes(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# text


def test_corpus_is_large_and_uses_the_fixed_alphabet():
    text = load_text()
    assert len(text) > 300_000
    assert set(text) <= set(TEXT_ALPHABET)
    assert len(TEXT_ALPHABET) == 96


def test_normalise_text():
    messy = "\u201cna\u00efve\u201d \u2014 caf\u00e9\u2026\tx\r\n\u2603"
    assert normalise_text(messy) == '"naive" -- cafe...    x\n'
    assert normalise_text("one\rtwo\r\nthree") == "one\ntwo\nthree"  # a lone \r joined the lines (audit 29)


def test_tokenizer_round_trips_the_whole_corpus():
    text = load_text()
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert tok.decode(ids[:50].tolist()) == text[:50]
    assert tok.chars == "".join(sorted(set(text))) and tok.vocab_size == len(tok.chars)


def test_tokenizer_errors():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([0, 3])
    with pytest.raises(ValueError):
        CharTokenizer("")


def test_text_dataset_split():
    tok, train, val = load_text_dataset()
    ids = tok.encode(load_text())
    assert tok.vocab_size == 96
    assert torch.equal(torch.cat([train, val]), ids)
    assert abs(len(val) - 0.1 * len(ids)) <= 1
    with pytest.raises(ValueError):
        load_text_dataset(val_fraction=1.0)


# ---------------------------------------------------------------------------------------------------------
# batches


def test_text_batches_shapes_and_shift():
    ids = torch.arange(1000)
    x, y = next(text_batches(ids, block_size=16, batch_size=5, generator=torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # ids are positions here, so y is x shifted by one token
    assert y.is_contiguous() and y.view(-1).numel() == 80


def test_text_batches_reach_the_last_token_and_are_reproducible():
    ids = torch.arange(10)
    gen = text_batches(ids, block_size=9, batch_size=4, generator=torch.Generator().manual_seed(1))
    x, y = next(gen)
    assert torch.equal(x, ids[:9].expand(4, 9)) and torch.equal(y, ids[1:].expand(4, 9))
    a = text_batches(torch.arange(500), 8, 3, generator=torch.Generator().manual_seed(2))
    b = text_batches(torch.arange(500), 8, 3, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError):
        next(text_batches(ids, block_size=10, batch_size=1))


def test_image_batches_cover_each_pass_and_reshuffle():
    images = torch.arange(10).float().view(10, 1, 1, 1).expand(10, 3, 2, 2)
    labels = torch.arange(10)
    gen = image_batches(images, labels, batch_size=5, generator=torch.Generator().manual_seed(0))
    passes = [torch.cat([next(gen)[1] for _ in range(2)]) for _ in range(3)]
    for p in passes:
        assert sorted(p.tolist()) == list(range(10))
    assert any(not torch.equal(passes[0], p) for p in passes[1:])
    x, y = next(gen)
    assert x.shape == (5, 3, 2, 2) and torch.equal(x[:, 0, 0, 0].long(), y)
    again = image_batches(images, labels, batch_size=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(next(again)[1], passes[0][:5])
    with pytest.raises(ValueError):
        next(image_batches(images, labels[:9], batch_size=5))
    with pytest.raises(ValueError):
        next(image_batches(images, labels, batch_size=11))


def test_image_batches_takes_the_whole_set_as_one_batch():
    """batch_size may equal the number of images (documented: 'between 1 and the number of images'); each batch
    is then a full shuffled pass."""
    images, labels = torch.arange(6.0).view(6, 1, 1, 1), torch.arange(6)
    batches = image_batches(images, labels, batch_size=6, generator=torch.Generator().manual_seed(0))
    x, y = next(batches)
    assert x.shape == (6, 1, 1, 1) and sorted(y.tolist()) == list(range(6))
    assert torch.equal(x.flatten().long(), y)


class _GeneratorOnCuda(torch.Generator):
    """A generator that says it lives on a GPU (a real one needs CUDA; the batches draw on the CPU)."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_batches_refuse_a_generator_that_is_not_on_the_cpu():
    """Both batchers draw on the CPU and refuse a generator on another device with a one-line error."""
    with pytest.raises(ValueError, match="generator must be a CPU torch.Generator, got one on cuda:0"):
        image_batches(torch.zeros(4, 1, 2, 2), torch.zeros(4), 2, generator=_GeneratorOnCuda())
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        text_batches(torch.arange(10), 3, 2, generator=_GeneratorOnCuda())


@pytest.mark.parametrize("args, message", [
    (["--source", "{tmp}/missing"], "--source {tmp}/missing does not exist"),
    (["--source", "{tmp}/notes.txt"], "notes.txt is neither a folder, a zip/wheel nor a tar archive"),
    (["--source", "{tmp}"], "no idx file for ['t10k-images', 't10k-labels', 'train-images', 'train-labels'] in {tmp}"),
    (["--n-train", "15"], "--n-train must be a multiple of 10 in [10, 60000] (the split's size), got 15"),
    (["--n-test", "0"], "--n-test must be a multiple of 10 in [10, 10000] (the split's size), got 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
])
def test_extract_script_names_bad_input_in_one_line(tmp_path, capsys, args, message):
    """Bad input is ``error: ...`` with status 2, before any download (it was a traceback)."""
    (tmp_path / "notes.txt").write_text("not mnist")
    argv = [a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out.npz")]
    with pytest.raises(SystemExit) as stop:
        _extract_script().main(argv)
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage line, then the error
    assert last.startswith("extract_mnist.py: error: ") and last.endswith(message.format(tmp=tmp_path))
    assert not (tmp_path / "out.npz").exists()


def _npz(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("content, says", [
    (lambda data: data[: len(data) // 2], "is not a readable .npz archive (empty, truncated or damaged: BadZipFile"),
    (lambda data: b"", "is not a readable .npz archive (empty, truncated or damaged: EOFError"),
    (lambda data: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
     "is a git-lfs pointer, not the data: fetch it with `git lfs pull`"),
    (lambda data: _npz(test_images=np.zeros((5000, 28, 28), np.uint8)), "has no array 'train_images'"),
    (lambda data: _npz(train_images=np.array([object()], dtype=object), train_labels=np.zeros(1)),
     "is not a readable .npz archive (empty, truncated or damaged: ValueError: Object arrays cannot be loaded"),
    (lambda data: _npz(train_images=np.zeros((3, 5)), train_labels=np.zeros(3, np.uint8)),
     "holds train_images of float64 (3, 5), expected uint8 (20000, 28, 28)"),
    (lambda data: _npz(train_images=np.zeros((20000, 28, 28), np.uint8), train_labels=np.zeros(20000, np.int64)),
     "holds train_labels of int64 (20000,), expected uint8 (20000,)"),
    (lambda data: _npz(train_images=np.zeros((20000, 28, 28), np.uint8), train_labels=np.full(20000, 99, np.uint8)),
     "holds train_labels outside 0..9 (up to 99)"),
    (lambda data: _npz(train_images=np.zeros((20000, 28, 28), np.uint8), train_labels=np.zeros(20000, np.uint8)),
     "is not the shipped file: its SHA-256 is "),
])
def test_a_damaged_mnist_file_is_one_line_naming_it(tmp_path, monkeypatch, content, says):
    from ar_course.data import mnist

    path = tmp_path / "mnist_subset.npz"
    path.write_bytes(content(MNIST_PATH.read_bytes()))
    monkeypatch.setattr(mnist, "MNIST_PATH", path)
    mnist._arrays.cache_clear()
    try:
        with pytest.raises(RuntimeError) as info:
            mnist.load_mnist("train")
    finally:
        mnist._arrays.cache_clear()
    message = str(info.value)
    assert message.startswith(f"the MNIST subset {path} {says}") and "\n" not in message, message
