"""Inputs or a tokenizer on another device than the model: one line naming both devices, where torch would fail
deep inside a layer (on a GPU: "Expected all tensors to be on the same device"). The meta device stands in for a
GPU (audit 30: only MaskGIT said so; GPT, VAR and the image generators failed inside F.embedding)."""

from __future__ import annotations

import copy

import pytest
import torch

from ar_course import continuous, masked, raster, var
from ar_course.system import Generator


@pytest.fixture(scope="module")
def shipped():
    return {"raster": raster.load_pretrained(), "var": var.load_pretrained(), "masked": masked.load_pretrained(),
            "continuous": continuous.load_pretrained()}


def on_meta(module):
    return copy.deepcopy(module).to("meta")


def test_ids_and_classes_on_another_device_than_the_model(shipped):
    gpt, _ = shipped["raster"]
    idx, classes = torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, 2])
    moved = on_meta(gpt)
    with pytest.raises(ValueError, match=r"^idx is on cpu, the model on meta: move it with .to\('meta'\)$"):
        moved(idx, classes=classes)
    with pytest.raises(ValueError, match=r"^idx is on cpu, the model on meta"):
        moved.generate(idx, 2, classes=classes)
    with pytest.raises(ValueError, match=r"^classes are on meta, the model on cpu"):
        gpt(idx, classes=classes.to("meta"))
    vq_var = shipped["var"][0]
    with pytest.raises(ValueError, match=r"^classes are on cpu, the model on meta"):
        var.sample_pyramid(on_meta(vq_var), shipped["var"][1].quantizer, classes)
    with pytest.raises(ValueError, match=r"^classes are on cpu, the model on meta"):
        on_meta(shipped["masked"][0]).generate(classes)
    with pytest.raises(ValueError, match=r"^classes are on cpu, the model on meta"):
        continuous.generate_tokens(on_meta(shipped["continuous"][0]), classes)


def test_a_tokenizer_on_another_device_than_the_model(shipped):
    classes = torch.tensor([3])
    for name, generate in (("raster", raster.generate_images), ("var", var.generate_images),
                           ("masked", masked.generate_images), ("continuous", continuous.generate_images)):
        model, tokenizer = shipped[name]
        with pytest.raises(ValueError, match=r"^the tokenizer is on meta, the model on cpu: move it with "
                                             r".to\('cpu'\)$"):
            generate(model, on_meta(tokenizer), classes)
    with pytest.raises(ValueError, match=r"^var_tokenizer is on meta, var_model on cpu"):
        Generator(var_model=shipped["var"][0], var_tokenizer=on_meta(shipped["var"][1]))
    with pytest.raises(ValueError, match=r"^ar_model does not fit ar_tokenizer: the tokenizer is on meta, the model "
                                         r"on cpu"):
        Generator(ar_model=shipped["raster"][0], ar_tokenizer=on_meta(shipped["raster"][1]))

