"""Offline data for the course: an MNIST subset, a coloured-shapes generator and a text corpus.

Nothing here touches the network: MNIST ships with the package, the shapes are generated from a seed, and the
text comes from the Python standard library. See ``README.md`` in this folder for sources and licences.
"""

from ar_course.data.batches import image_batches, text_batches
from ar_course.data.mnist import MNIST_SHA256, load_mnist
from ar_course.data.shapes import SHAPE_NAMES, make_shapes
from ar_course.data.text import (TEXT_ALPHABET, CharTokenizer, load_text, load_text_dataset, normalise_text,
                                 text_training_data)

__all__ = [
    "CharTokenizer",
    "MNIST_SHA256",
    "SHAPE_NAMES",
    "TEXT_ALPHABET",
    "image_batches",
    "load_mnist",
    "load_text",
    "load_text_dataset",
    "make_shapes",
    "normalise_text",
    "text_batches",
    "text_training_data",
]
