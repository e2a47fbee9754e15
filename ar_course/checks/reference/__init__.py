"""Reference answers that the library itself does not use, one module per chapter.

An exercise's reference comes from the library when the library has that function (chapter 01's
``vq_lookup`` is :func:`ar_course.tokenizers.functional.vq_lookup`, which the quantizers call); it lives
here when only the course needs it: a teaching version of something the library does differently (a
functional pre-norm block beside :class:`~ar_course.transformer.Block`), a thin wrapper that gives a
library function the exercise's signature, or a tool that only the chapter uses. The checks in
``ar_course.checks.chNN`` import these modules; the library never does (``tests/test_layers.py``).
"""
