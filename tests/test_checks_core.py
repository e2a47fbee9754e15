"""The check framework itself: it passes right answers, fails wrong ones with a one-line reason, reports
stubs as not attempted, and `use` falls back to the reference."""

import json

import pytest
import torch

from ar_course.checks.core import (
    REPORT_ENV, Case, Chapter, CheckFailure, NotAttempted, call, compare, compare_cases,
)
from checks_helpers import assert_fails, assert_not_attempted, assert_passes


def ref_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def make_chapter():
    chapter = Chapter(99, "test chapter")

    @chapter.exercise("99.1", reference=ref_softmax, hint="subtract the row max first")
    def softmax(fn, ref):
        g = torch.Generator().manual_seed(0)
        compare_cases(fn, ref, [Case("random 3x5", (torch.randn(3, 5, generator=g),)),
                                Case("large logits", (torch.tensor([[1000.0, 1001.0, 999.0]]),))])

    return chapter, softmax


def test_reference_passes(capsys):
    _, check = make_chapter()
    assert_passes(check, ref_softmax)
    assert capsys.readouterr().out.strip() == "Exercise 99.1 passed"


def test_naive_softmax_fails_with_reason_and_hint(capsys):
    _, check = make_chapter()
    msg = assert_fails(check, lambda x: x.exp() / x.exp().sum(-1, keepdim=True), contains="large logits")
    assert "Hint: subtract the row max first" in msg
    out = capsys.readouterr().out.strip()
    assert out.startswith("Exercise 99.1 failed:") and "\n" not in out


def test_stub_is_not_attempted(capsys):
    _, check = make_chapter()

    def stub(x):
        raise NotImplementedError("Exercise 99.1")

    assert_not_attempted(check, stub)
    assert capsys.readouterr().out.strip() == "Exercise 99.1 not attempted yet"


@pytest.mark.parametrize(
    "wrong, fragment",
    [
        (lambda x: torch.softmax(x, dim=0), "differs"),
        (lambda x: torch.softmax(x, -1)[0], "shape"),
        (lambda x: torch.softmax(x, -1).double(), "dtype"),
        (lambda x: torch.softmax(x, -1).tolist(), "torch.Tensor"),
        (lambda x: x.undefined_method(), "raised AttributeError"),
    ],
)
def test_wrong_answers_get_one_line_messages(wrong, fragment):
    _, check = make_chapter()
    msg = assert_fails(check, wrong, contains=fragment)
    assert "\n" not in msg


def test_use_returns_reference_until_passed(capsys):
    chapter, check = make_chapter()

    def softmax(x):
        return torch.softmax(x, dim=-1)

    assert chapter.use(softmax) is ref_softmax
    assert "using the reference" in capsys.readouterr().out
    check(softmax)
    assert chapter.use(softmax) is softmax

    def softmax(x):  # noqa: F811 - a new, unchecked definition
        return x

    assert chapter.use(softmax) is ref_softmax


def test_use_unknown_name():
    chapter, _ = make_chapter()
    with pytest.raises(KeyError):
        chapter.use(lambda x: x)


def test_report_file(tmp_path, monkeypatch):
    report = tmp_path / "r.jsonl"
    monkeypatch.setenv(REPORT_ENV, str(report))
    _, check = make_chapter()
    check(ref_softmax)
    with pytest.raises(CheckFailure):
        check(lambda x: x)
    with pytest.raises(NotAttempted):
        check(lambda x: (_ for _ in ()).throw(NotImplementedError()))
    recs = [json.loads(line) for line in report.read_text().splitlines()]
    assert [r["status"] for r in recs] == ["passed", "failed", "not attempted"]
    assert all(r["exercise"] == "99.1" for r in recs)


def test_gradient_comparison_catches_detached_output():
    chapter = Chapter(98, "grads")

    def ref(z, c):
        return z + (c - z).detach()  # straight-through

    @chapter.exercise("98.1", reference=ref)
    def ste(fn, ref):
        g = torch.Generator().manual_seed(0)
        compare_cases(fn, ref, [Case("4x3", (torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)))],
                      grad_wrt=(0,))

    assert_passes(ste, ref)
    assert_fails(ste, lambda z, c: c.clone(), contains="gradient")
    assert_fails(ste, lambda z, c: z + (c - z), contains="gradient")


def test_compare_structures():
    compare((torch.ones(2), 3, {"a": 1.0}), (torch.ones(2), 3, {"a": 1.0}))
    with pytest.raises(CheckFailure, match="items"):
        compare([1, 2], [1, 2, 3])
    with pytest.raises(CheckFailure, match="missing keys"):
        compare({}, {"a": 1})
    with pytest.raises(CheckFailure, match="expected 3"):
        compare(2.5, 3)
    with pytest.raises(CheckFailure, match="differs at 1 of 3"):
        compare(torch.tensor([1, 2, 3]), torch.tensor([1, 5, 3]))


def test_call_passes_through_not_implemented():
    def stub():
        raise NotImplementedError

    with pytest.raises(NotImplementedError):
        call(stub)
