"""A text corpus every Python install has, and a character-level tokenizer for it.

The corpus is the English help text in the standard library's ``pydoc_data.topics`` (what ``help("if")``
prints): about 465,000 characters of prose and code. It is normalised to printable ASCII plus newline (the 96
characters of ``TEXT_ALPHABET``), so the vocabulary, and with it any model trained on it, is the same on every
Python version, even though the text itself changes a little between versions.
"""

from __future__ import annotations

import functools
import unicodedata
from typing import Sequence

import numpy as np
import torch
from pydoc_data.topics import topics

from ar_course.utils import check_ids, check_int, check_number, is_integer_tensor

# Printable ASCII (space to tilde) and newline: 96 characters, in code-point order.
TEXT_ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
_ALPHABET_SET = frozenset(TEXT_ALPHABET)
_TYPOGRAPHY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                             "\u2014": "--", "\u2026": "...", "\u00df": "ss", "\t": "    "})


def normalise_text(text: str) -> str:
    """Map ``text`` onto ``TEXT_ALPHABET``.

    Typographic quotes become straight quotes, en and em dashes become ``-`` and ``--``, ``...`` replaces the
    ellipsis, tabs become four spaces, and ``\\r\\n`` and a lone ``\\r`` become ``\\n``; accented letters lose their
    accents (NFKD decomposition); any other character outside the alphabet is dropped.

    Raises ``TypeError`` when ``text`` is not a str."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_TYPOGRAPHY)  # Windows, old Mac line ends
    text = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in text if ch in _ALPHABET_SET)


@functools.lru_cache(maxsize=1)
def load_text() -> str:
    """The ``pydoc_data.topics`` help texts joined in sorted-topic order, normalised by ``normalise_text``."""
    return normalise_text("".join(topics[key] for key in sorted(topics)))


class CharTokenizer:
    """Maps each character of a fixed alphabet to its index in that alphabet (sorted by code point).

    ``chars``: a str, or any other iterable of str (a list, a tuple, a set). ``TypeError`` for anything else
    (``None``, a list of ints, bytes), ``ValueError`` for no characters at all."""

    def __init__(self, chars: str | Sequence[str]):
        if not isinstance(chars, str):
            what = "chars must be a str or an iterable of str"
            try:
                chars = list(chars)
            except TypeError:
                raise TypeError(f"{what}, got {type(chars).__name__}") from None
            bad = [c for c in chars if not isinstance(c, str)]
            if bad:
                raise TypeError(f"{what}, got an item {bad[0]!r} ({type(bad[0]).__name__})")
        chars = "".join(sorted(set(chars)))
        if not chars:
            raise ValueError("a tokenizer needs at least one character")
        self.chars = chars
        self._index = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """A tokenizer whose vocabulary is exactly the distinct characters of ``text``."""
        return cls(text)

    @property
    def vocab_size(self) -> int:
        """Number of characters in the vocabulary (ids are ``0 .. vocab_size - 1``)."""
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` of length ``T`` -> int64 ids ``(T,)``; ``ValueError`` on a character not in the vocabulary,
        ``TypeError`` for anything but a str (bytes included: decode them first)."""
        if not isinstance(text, str):
            hint = " (decode bytes first: data.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
            raise TypeError(f"text must be a str, got {type(text).__name__}{hint}")
        try:
            ids = [self._index[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the tokenizer's vocabulary "
                             f"({self.vocab_size} characters)") from None
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | np.ndarray | Sequence[int]) -> str:
        """Ids ``(T,)`` (an integer tensor on any device or NumPy array, or a list or tuple of ints) -> a
        string of length ``T``.

        Raises:
            TypeError: ``ids`` is none of those (a string...), or holds something other than integers
                (floats, bools).
            ValueError: a tensor or array that is not 1-D or not of an integer dtype, or an id outside the
                vocabulary.
        """
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            if isinstance(ids, torch.Tensor):
                integer = is_integer_tensor(ids)
            else:
                integer = np.issubdtype(ids.dtype, np.integer)
            if ids.ndim != 1 or not integer:
                raise ValueError(f"ids must be a 1-D integer tensor or array, got shape {tuple(ids.shape)} "
                                 f"{ids.dtype}")
            ids = ids.tolist()
        elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"ids must be a 1-D tensor, array or sequence of integer ids, got {type(ids).__name__}")
        out = []
        for k, i in enumerate(ids):
            if type(i) is not int:  # a NumPy integer or 0-d tensor is fine; a float or bool is not
                i = check_int(f"ids[{k}]", i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary 0..{self.vocab_size - 1}")
            out.append(self.chars[i])
        return "".join(out)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def load_text_dataset(val_fraction: float = 0.1) -> tuple[CharTokenizer, torch.Tensor, torch.Tensor]:
    """The corpus tokenized with a ``TEXT_ALPHABET`` tokenizer and split in two without shuffling.

    Returns ``(tokenizer, train_ids, val_ids)``: int64 tensors ``(T_train,)`` and ``(T_val,)``; the last
    ``val_fraction`` of the characters (rounded) is the validation part.

    Raises:
        TypeError: ``val_fraction`` is not a number.
        ValueError: it is not strictly between 0 and 1, or so close to either end that a part would be empty.
    """
    val_fraction = check_number("val_fraction", val_fraction, 0, 1, lo_open=True, hi_open=True)
    text = load_text()
    n_val = int(round(len(text) * val_fraction))
    if not 0 < n_val < len(text):
        raise ValueError(f"val_fraction={val_fraction} leaves a part empty: {len(text) - n_val} training and "
                         f"{n_val} validation characters of {len(text)}")
    tokenizer = CharTokenizer(TEXT_ALPHABET)
    ids = tokenizer.encode(text)  # (T,)
    return tokenizer, ids[: len(ids) - n_val], ids[len(ids) - n_val:]


def text_training_data(train_ids: torch.Tensor | None = None, val_ids: torch.Tensor | None = None,
                       tokenizer: CharTokenizer | None = None, *, evaluates: bool = False,
                       ) -> tuple[CharTokenizer, torch.Tensor, torch.Tensor | None]:
    """The vocabulary and ids a text trainer trains and evaluates on: ``(tokenizer, train_ids (N,), val_ids
    (M,) or None)``.

    Without ``train_ids``: the course corpus (:func:`load_text_dataset`), whose validation split is the default
    of ``val_ids``. Text of your own: ``train_ids`` / ``val_ids`` are ids of ``tokenizer`` (e.g.
    ``CharTokenizer.from_text(text)``; without one, of the course's alphabet), and ``val_ids`` has no default.

    Raises:
        ValueError: a ``tokenizer`` without ``train_ids``, ids that are not a 1-D integer tensor of ids inside the
            vocabulary, or ``evaluates`` (the run measures on ``val_ids``) with ``train_ids`` but no ``val_ids``.
    """
    if tokenizer is not None and train_ids is None:
        raise ValueError("tokenizer is for text of your own: give train_ids (and val_ids) encoded with it")
    if train_ids is None:
        tokenizer, train_ids, corpus_val = load_text_dataset()
        val_ids = corpus_val if val_ids is None else val_ids
    elif tokenizer is None:
        tokenizer = CharTokenizer(TEXT_ALPHABET)
    if evaluates and val_ids is None:
        raise ValueError("eval_every and keep_best evaluate on val_ids: give val_ids with your own train_ids")
    for name, ids in (("train_ids", train_ids), ("val_ids", val_ids)):
        if ids is not None:
            check_ids(name, ids, tokenizer.vocab_size, ("N",))
    return tokenizer, train_ids, val_ids
