"""The check framework itself: it passes right answers, fails wrong ones with a one-line reason, reports
stubs as not attempted, and `use` falls back to the reference; hints come in levels, diagnoses name known
mistakes, and outside strict mode a check only prints (Run All)."""

import functools
import json

from pathlib import Path

import numpy as np
import pytest
import torch

from ar_course.checks.core import (
    REPORT_ENV, STRICT_ENV, Case, Chapter, CheckFailure, Mistake, NotAttempted, call, check_off_cpu, check_unchanged,
    clone_args, compare, compare_cases, explain,
)
from checks_helpers import assert_fails, assert_not_attempted, assert_passes


def ref_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def make_chapter():
    chapter = Chapter(99, "test chapter")

    @chapter.exercise("99.1", reference=ref_softmax, hints=("nudge: think about overflow",
                                                            "subtract the row max first", "the key line"))
    def softmax(fn, ref):
        g = torch.Generator().manual_seed(0)
        compare_cases(fn, ref, [Case("random 3x5", (torch.randn(3, 5, generator=g),)),
                                Case("large logits", (torch.tensor([[1000.0, 1001.0, 999.0]]),))],
                      mistakes=[Mistake(lambda x: torch.softmax(x, dim=0), "that normalises over dim 0")])

    return chapter, softmax


def test_reference_passes(capsys):
    _, check = make_chapter()
    assert_passes(check, ref_softmax)
    assert capsys.readouterr().out.strip() == "Exercise 99.1 passed"


def naive_softmax(x):
    return x.exp() / x.exp().sum(-1, keepdim=True)


def test_naive_softmax_fails_with_reason_and_the_first_hint(capsys):
    _, check = make_chapter()
    msg = assert_fails(check, naive_softmax, contains="large logits")
    assert msg.endswith("Hint: nudge: think about overflow (more: checks.ch99.hint('99.1'))")
    out = capsys.readouterr().out.strip()
    assert out.startswith("Exercise 99.1 failed:") and "\n" not in out


def test_hint_levels_escalate_but_the_last_one_only_when_asked(capsys):
    chapter, check = make_chapter()
    assert "Hint: nudge" in assert_fails(check, naive_softmax)
    assert "Hint: subtract the row max first (more:" in assert_fails(check, naive_softmax)
    assert "Hint: subtract the row max first (more:" in assert_fails(check, naive_softmax)  # never the key line
    capsys.readouterr()
    chapter.hint("99.1")
    assert capsys.readouterr().out.strip() == "Exercise 99.1, hint 3 of 3: the key line"
    def softmax(x):
        raise NotImplementedError

    chapter.hint(softmax)  # by the learner function's name; stays at the last level
    assert capsys.readouterr().out.strip() == "Exercise 99.1, hint 3 of 3: the key line"


def test_hint_asked_first_starts_at_the_first_level(capsys):
    chapter, check = make_chapter()
    chapter.hint("99.1")
    assert capsys.readouterr().out.strip() == ("Exercise 99.1, hint 1 of 3: nudge: think about overflow "
                                               "(more: checks.ch99.hint('99.1'))")
    assert "Hint: nudge" in assert_fails(check, naive_softmax)
    chapter.reset()
    chapter.hint("99.1")
    assert "hint 1 of 3" in capsys.readouterr().out
    capsys.readouterr()
    chapter.hint("99.2")  # a typo in a notebook: one line, no traceback
    assert capsys.readouterr().out == "'99.2' is not an exercise of chapter 99; known: 99.1 (softmax)\n"
    chapter.hint(99.1)  # the quotes forgotten
    assert capsys.readouterr().out == "99.1 is a number: name the exercise as a string, checks.ch99.hint('99.1')\n"


@pytest.mark.parametrize("hints", ["a single string", (), ("ok", "")])
def test_hints_must_be_levels(hints):
    with pytest.raises(ValueError, match="hints"):
        Chapter(97, "bad").exercise("97.1", reference=ref_softmax, hints=hints)


def test_a_known_mistake_is_named():
    _, check = make_chapter()
    msg = assert_fails(check, lambda x: torch.softmax(x, dim=0), contains="that normalises over dim 0")
    assert "differs at" in msg  # what differed still comes first
    assert "normalises over dim 0" not in assert_fails(check, naive_softmax)


def test_explain_names_a_mistake_for_custom_checks():
    case = Case("2 values", (torch.tensor([1.0, 2.0]),))
    failure = CheckFailure("output differs")
    mistakes = [Mistake(lambda x: x * 3, "tripled"), Mistake(lambda x: x + 1, "shifted")]
    assert str(explain(failure, mistakes, case, torch.tensor([2.0, 3.0]))) == "output differs; shifted"
    assert explain(failure, mistakes, case, torch.tensor([0.0, 0.0])) is failure


def test_stub_is_not_attempted(capsys):
    _, check = make_chapter()

    def stub(x):
        raise NotImplementedError("Exercise 99.1")

    assert_not_attempted(check, stub)
    assert capsys.readouterr().out.strip() == "Exercise 99.1 not attempted yet"


def test_a_function_calling_an_unwritten_exercise_says_which(capsys, tmp_path, monkeypatch):
    """A learner's 99.1 that calls 98.2's stub (a later exercise built on an earlier one) is attempted: the line
    names the function it calls, and so does the grade report."""
    report = tmp_path / "r.jsonl"
    monkeypatch.setenv(REPORT_ENV, str(report))
    _, check = make_chapter()

    def helper(x):
        raise NotImplementedError("Exercise 98.2: helper")

    why = ("your function calls `helper` (Exercise 98.2), which is not written yet: write it first, or call "
           "checks.ch99.use(helper) instead (the package's until its check passes)")
    with pytest.raises(NotAttempted) as info:  # strict, as in the tests
        check(lambda x: helper(x))
    assert str(info.value) == f"Exercise 99.1 not checked yet: {why}"
    assert capsys.readouterr().out.strip() == f"Exercise 99.1 not checked yet: {why}"
    assert json.loads(report.read_text(encoding="utf-8")) == {"exercise": "99.1", "status": "not attempted",
                                                              "message": why}

    def own_stub(x):  # its own stub, with the label the notebooks give it: plainly not attempted
        raise NotImplementedError("Exercise 99.1: softmax")

    assert_not_attempted(check, own_stub)
    assert capsys.readouterr().out.strip() == "Exercise 99.1 not attempted yet"


def test_a_tuple_named_by_its_items_names_the_item_that_differs():
    with pytest.raises(CheckFailure) as info:
        compare((1, 2.0), (8, 2.0), where="alpha=0.8", name="(gamma, speedup)")
    assert str(info.value) == "gamma (item 0 of the returned tuple) on input 'alpha=0.8' is 1, expected 8"
    with pytest.raises(CheckFailure) as info:  # a plain name: indexed
        compare([1.0, 5.0], [1.0, 3.0], name="losses")
    assert str(info.value).startswith("losses[1] is 5")


def test_an_error_in_the_learners_code_names_its_line_and_none_asks_for_a_return():
    _, check = make_chapter()

    def typo(x):
        y = x.exp()
        return y / y.sum(-1, keepdims=True).undefined

    msg = assert_fails(check, typo, contains="raised AttributeError")
    line = typo.__code__.co_firstlineno + 2
    assert f"(line {line}: return y / y.sum(-1, keepdims=True).undefined)" in msg, msg
    msg = assert_fails(check, lambda x: torch.ones(3) @ x.t)  # raised inside torch: the learner's line is named
    assert "raised TypeError" in msg and "lambda x: torch.ones(3) @ x.t" in msg, msg
    assert "got None (does your function end without a return?)" in assert_fails(check, lambda x: None)


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


def test_a_function_whose_check_fails_again_is_no_longer_used(monkeypatch):
    """A function that passed and then fails its check (same object, now giving wrong answers) is forgotten:
    later cells fall back to the reference instead of building on it."""
    monkeypatch.setenv(STRICT_ENV, "0")
    chapter = Chapter(99, "test chapter")

    def double(x):
        return 2 * x

    @chapter.exercise("99.1", reference=double, hints=("h1", "h2"), name="double")
    def check_double(fn, ref):
        compare_cases(fn, ref, [Case("one", (torch.tensor([1.0]),))])

    offset = [0.0]

    def mine(x):
        return 2 * x + offset[0]

    mine.__name__ = "double"
    check_double(mine)
    assert chapter.passed("double") is mine
    offset[0] = 1.0  # the same function object now gives wrong answers
    check_double(mine)
    assert chapter.results["99.1"] == "failed" and chapter.passed("double") is double


def test_use_unknown_name():
    chapter, _ = make_chapter()
    with pytest.raises(KeyError):
        chapter.use(lambda x: x)


def test_outside_strict_mode_a_check_prints_records_and_returns_nothing(tmp_path, monkeypatch, capsys):
    """Run All: in a learner's kernel a failing or unattempted check prints its line and the notebook goes on."""
    report = tmp_path / "r.jsonl"
    monkeypatch.setenv(REPORT_ENV, str(report))
    monkeypatch.setenv(STRICT_ENV, "0")
    chapter, check = make_chapter()

    def softmax(x):
        raise NotImplementedError("Exercise 99.1")

    assert check(softmax) is None
    assert capsys.readouterr().out.strip() == "Exercise 99.1 not attempted yet"
    assert chapter.use(softmax) is ref_softmax
    assert "using the reference" in capsys.readouterr().out
    assert check(naive_softmax) is None
    assert capsys.readouterr().out.strip().startswith("Exercise 99.1 failed: output on input 'large logits'")
    assert check(5) is None
    assert check(ref_softmax) is None
    recs = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert [r["status"] for r in recs] == ["not attempted", "failed", "failed", "passed"]


def test_report_file(tmp_path, monkeypatch):
    report = tmp_path / "r.jsonl"
    monkeypatch.setenv(REPORT_ENV, str(report))
    _, check = make_chapter()
    check(ref_softmax)
    with pytest.raises(CheckFailure):
        check(lambda x: x)
    with pytest.raises(NotAttempted):
        check(lambda x: (_ for _ in ()).throw(NotImplementedError()))
    recs = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert [r["status"] for r in recs] == ["passed", "failed", "not attempted"]
    assert all(r["exercise"] == "99.1" for r in recs)


def test_gradient_comparison_catches_detached_output():
    chapter = Chapter(98, "grads")

    def ref(z, c):
        return z + (c - z).detach()  # straight-through

    @chapter.exercise("98.1", reference=ref, hints=("gradients",))
    def ste(fn, ref):
        g = torch.Generator().manual_seed(0)
        compare_cases(fn, ref, [Case("4x3", (torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)))],
                      grad_wrt=(0,))

    assert_passes(ste, ref)
    assert_fails(ste, lambda z, c: c.clone(), contains="gradient")
    assert_fails(ste, lambda z, c: z + (c - z), contains="gradient")


def test_a_mistake_is_recognised_by_its_gradients():
    chapter = Chapter(98, "grads")
    mistakes = [Mistake(lambda z, c: 2 * z - z.detach() + (c - z).detach(), "doubled the gradient"),
                Mistake(lambda z, c: z.detach() + (c - z), "flipped the gradient")]

    @chapter.exercise("98.1", reference=lambda z, c: z + (c - z).detach(), hints=("gradients",))
    def ste(fn, ref):
        g = torch.Generator().manual_seed(0)
        compare_cases(fn, ref, [Case("4x3", (torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)))],
                      grad_wrt=(0,), mistakes=mistakes)

    assert_fails(ste, lambda z, c: z.detach() + c - z, contains="gradient of argument 0")
    assert_fails(ste, lambda z, c: z.detach() + c - z, contains="flipped the gradient")
    msg = assert_fails(ste, lambda z, c: c + 0 * z, contains="gradient of argument 0")
    assert "flipped" not in msg and "doubled" not in msg


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


def test_compare_counts_nan_equal_to_nan_in_tensors():
    """A learner's correct NaN (e.g. of a fully masked row) matches the reference's NaN."""
    compare(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("nan")]))


def test_compare_matches_ints_exactly_and_prints_them_in_full():
    """A 64-bit hash one unit off is within any relative tolerance of a float comparison: ints are exact."""
    h = 5_821_993_344_106_123_456
    with pytest.raises(CheckFailure, match=f"is {h + 1}, expected {h}$"):
        compare(h + 1, h)
    with pytest.raises(CheckFailure, match="is 1000001, expected 1000000"):
        compare(torch.tensor(1_000_001), 1_000_000)  # a one-element tensor counts as its number
    with pytest.raises(CheckFailure, match="is 2.5, expected 3"):
        compare(np.float32(2.5), 3)
    for same in (7, 7.0, np.int64(7), torch.tensor(7)):
        compare(same, 7)
    compare(1.0 + 5e-6, 1.0)  # floats keep their tolerance
    with pytest.raises(CheckFailure, match=r"^loss is 2.5, expected 2$"):
        compare(torch.tensor(2.5), torch.tensor(2.0), name="loss")  # a 0-d tensor reads as its value


def test_call_passes_through_not_implemented():
    def stub():
        raise NotImplementedError

    with pytest.raises(NotImplementedError):
        call(stub)


def test_every_course_exercise_has_tiered_hints():
    """86 exercises, each with two or more distinct hint levels and a `hint` entry point in its chapter."""
    import importlib

    import ar_course.checks

    names = sorted(p.stem for p in Path(ar_course.checks.__file__).parent.glob("ch[0-9][0-9].py"))
    modules = [importlib.import_module(f"ar_course.checks.{name}") for name in names]
    exercises = [ex for m in modules for ex in m.chapter.exercises.values()]
    # 61 in chapters 00-07 (chapter 03 folded its guidance mix into the sampling loop; chapter 02 assembles the
    # model), 7 in chapter 08 (4 images, 3 text), 6 in chapter 09, 6 in chapter 10 (its guided sampler merged two),
    # 6 in chapter 11
    assert len(exercises) == 86
    for m in modules:
        assert m.hint == m.chapter.hint
    for ex in exercises:
        assert len(ex.hints) >= 2 and len(set(ex.hints)) == len(ex.hints), ex.number


def test_the_readme_chapter_table_counts_each_chapters_exercises():
    """The README's table says "done (N exercises)" for each chapter: N is what the chapter's checks define."""
    import importlib
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| (\d\d) \| `\d\d_\w+` \|.*?\| done \((\d+) exercises?\)", readme, re.M))
    assert sorted(rows) == [f"{n:02d}" for n in range(12)]
    for number, count in rows.items():
        chapter = importlib.import_module(f"ar_course.checks.ch{number}").chapter
        assert int(count) == len(chapter.exercises), f"README says chapter {number} has {count} exercises"


def test_compare_cases_keep_fails_a_function_that_changes_its_arguments_in_place():
    cases = [Case("a vector and a cache", (torch.tensor([1.0, -2.0, 3.0]), torch.zeros(3)))]

    def ref(x, cache):
        cache.copy_(x)  # the cache is meant to change
        return x.clamp(min=0)

    def in_place(x, cache):
        cache.copy_(x)
        return x.clamp_(min=0)

    compare_cases(ref, ref, cases, keep=("x", None))
    compare_cases(in_place, ref, cases, keep=())  # nothing watched: the same output passes
    with pytest.raises(CheckFailure, match=r"changed its argument `x` in place on input 'a vector and a cache'; the "
                                           r"caller still uses it: build new values"):
        compare_cases(in_place, ref, cases, keep=("x", None))
    with pytest.raises(CheckFailure, match=r"changed its argument `cache` in place"):  # by default: every argument,
        compare_cases(ref, ref, cases)  # named as the reference names its parameters


def test_a_case_with_its_own_atol_is_compared_and_diagnosed_at_it_and_only_it():
    x = torch.tensor([1.0, 2.0])
    ill = Case("ill-conditioned", (x,), atol=1e-3)
    plain = Case("plain", (x,))

    def ref(v):
        return v

    def off_by(delta):
        return lambda v: v + delta

    compare_cases(off_by(5e-4), ref, [ill])  # within the case's own tolerance
    with pytest.raises(CheckFailure, match="on input 'plain'"):  # the next case is back at the check's atol
        compare_cases(off_by(5e-4), ref, [ill, plain])
    with pytest.raises(CheckFailure, match="on input 'ill-conditioned'.*; shifted by 0.01"):  # the mistake, at 1e-3
        compare_cases(off_by(1e-2 + 4e-4), ref, [ill], mistakes=[Mistake(off_by(1e-2), "shifted by 0.01")])


@pytest.mark.parametrize("value, change", [
    (torch.tensor([1.0, float("nan")]), lambda t: t.mul_(2)),
    (np.array([1, 2]), lambda a: a.__setitem__(0, 5)),
    ([torch.zeros(2), 3], lambda lst: lst[0].add_(1)),
    ({"logp": torch.zeros(2)}, lambda d: d["logp"].sub_(1)),
    ({1, 2}, lambda s: s.discard(1)),
    ([3, 1, 2], lambda lst: lst.sort()),
])
def test_check_unchanged_sees_changes_inside_containers_and_ignores_nan(value, change):
    before = clone_args([value])
    check_unchanged(["v"], before, [value], "case")  # untouched, NaN included: fine
    change(value)
    with pytest.raises(CheckFailure, match=r"changed its argument `v` in place on input 'case'; the caller still "
                                           r"uses it, for the next step: build"):
        check_unchanged(["v"], before, [value], "case", why="for the next step")


def test_check_off_cpu_fails_only_a_device_mismatch():
    """On the meta device (a stand-in for a GPU) a tensor made on the CPU is named; the meta device's own gaps
    (.item(), bincount...) and right answers pass."""
    case = Case("a (4, 3) input", (torch.randn(4, 3), [torch.randn(3)]))
    check_off_cpu(lambda x, vs: x + vs[0], case)  # follows its inputs (a list of tensors moves too)
    check_off_cpu(lambda x, vs: x + torch.zeros(3, device=x.device), case)
    check_off_cpu(lambda x, vs: x.sum().item(), case)  # no data on meta: not the learner's fault
    # a 0-d CPU tensor as masked_fill's value moves along on a GPU; only the meta device refuses it (audit 29)
    inf = torch.tensor(float("inf"))
    check_off_cpu(lambda x, vs: x.masked_fill(x > 0, -inf), case)
    check_off_cpu(lambda x, vs: x.clone().masked_fill_(x > 0, inf), case)
    check_off_cpu(lambda x, vs: torch.masked_fill(x, x > 0, value=inf), case)
    cpu_mask = torch.ones(4, 3, dtype=torch.bool)  # ... but a mask or a filled tensor made on the CPU is named
    for mixed in (lambda x, vs: x.masked_fill(cpu_mask, -inf),
                  lambda x, vs: torch.zeros(4, 3).masked_fill(x > 0, x.max()),
                  lambda x, vs: x.masked_fill(x > 0, -inf) + torch.arange(3)):
        with pytest.raises(CheckFailure, match="mixed devices"):
            check_off_cpu(mixed, case)
    with pytest.raises(CheckFailure, match="on input 'a \\(4, 3\\) input' moved off the CPU .* mixed devices"):
        check_off_cpu(lambda x, vs: x + torch.zeros(3), case)
    with pytest.raises(CheckFailure, match="mixed devices"):
        check_off_cpu(lambda x, vs: torch.zeros(4).index_add_(0, torch.arange(4, device=x.device), x[:, 0]), case)


def test_check_off_cpu_reads_inputs_back_and_follows_the_result():
    """As on a GPU, an input copied back to the host (.cpu(), .tolist(), .item(), float()) has its values, so the
    function runs on; with result_follows a result left on the CPU is named, one moved back to the input's device
    passes, and without it nothing is said of the result."""
    case = Case("a (4,) input", (torch.tensor([0.5, 1.0, 2.0, 3.0]),))
    seen = []

    def copies_back(x):
        seen.append((x.cpu().sum().item(), x.tolist(), x.cpu()[0].item(), float(x.to("cpu")[1])))
        return (x.cpu() * 2).to(x.device)

    check_off_cpu(copies_back, case, result_follows=True)
    assert seen == [(6.5, [0.5, 1.0, 2.0, 3.0], 0.5, 1.0)]
    check_off_cpu(lambda x: x.to(torch.float64) + 1, case, result_follows=True)  # .to(dtype) stays on its device
    left = (lambda x: x.cpu() * 2, lambda x: (x + 1, x.cpu()), lambda x: [torch.zeros(4)])
    for fn in left:
        check_off_cpu(fn, case)
        with pytest.raises(CheckFailure, match="'a \\(4,\\) input' .* returned a tensor on the cpu device: the result "
                                               "must be on its inputs' device"):
            check_off_cpu(fn, case, result_follows=True)
    with pytest.raises(CheckFailure, match="mixed devices"):  # a value read back, then mixed with the input
        check_off_cpu(lambda x: x + x.cpu(), case)
    check_off_cpu(lambda x: (x + 1).cpu(), case, result_follows=True)  # a computed tensor has no values: not judged


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # new_tensor(tensor), on purpose
def test_check_off_cpu_refuses_what_a_gpu_refuses_and_takes_what_it_takes():
    """The meta device alone takes CPU operands in F.embedding, index_select, gather, a matrix product (audit 30);
    a GPU does not, so neither does the check. Indexing an input with CPU indices, copies and 0-d CPU tensors are
    fine on a GPU and here; tensors bound into a functools.partial move off the CPU with the rest."""
    case = Case("a (4, 3) input", (torch.randn(4, 3),))
    ids = torch.tensor([0, 2])
    for mixed in (lambda x: torch.nn.functional.embedding(ids, x), lambda x: x.index_select(0, ids),
                  lambda x: x.gather(0, torch.zeros(1, 3, dtype=torch.long)), lambda x: x @ torch.ones(3),
                  lambda x: torch.einsum("ij,j->i", x, torch.ones(3)), lambda x: torch.ones(2, 4) @ x,
                  lambda x: torch.cat([x, torch.zeros(1, 3)])):
        with pytest.raises(CheckFailure, match="mixed devices"):
            check_off_cpu(mixed, case)
    for fine in (lambda x: x[ids], lambda x: x[torch.tensor([True, False, True, False])],
                 lambda x: x.clone().index_put_((ids,), torch.zeros(3, device=x.device)),
                 lambda x: x * torch.tensor(2.0), lambda x: torch.where(x > 0, x, torch.tensor(0.0)),
                 lambda x: torch.zeros(4, 3, device=x.device).copy_(torch.ones(4, 3)),
                 lambda x: x.to(torch.float64) + torch.ones(3, dtype=torch.float64, device=x.device),
                 # a dtype or shape taken from the other tensor (diff review 30: type_as is RoPE's usual idiom)
                 lambda x: x * torch.arange(3).type_as(x), lambda x: x + x.new_tensor(torch.ones(3)),
                 lambda x: torch.ones(12).view_as(x).to(x.device) + x,
                 lambda x: torch.ones(3).expand_as(x).to(x.device) * x,
                 lambda x: torch.ones(12).reshape_as(x).to(x.device) - x):
        check_off_cpu(fine, case, result_follows=True)
    weight = torch.randn(3, 3)
    bound = functools.partial(lambda x, w: x @ w, w=weight)
    check_off_cpu(lambda x, f: f(x), Case("a (4, 3) input, a bound weight", (torch.randn(4, 3), bound)))


def test_compare_cases_off_cpu_runs_the_first_case_off_the_cpu():
    cases = [Case("T=5", (torch.randn(2, 5),)), Case("T=3", (torch.randn(1, 3),))]

    def ref(x):
        return x.masked_fill(torch.arange(x.shape[1], device=x.device) > 2, 0.0)

    def cpu_mask(x):
        return x.masked_fill(torch.arange(x.shape[1]) > 2, 0.0)

    compare_cases(cpu_mask, ref, cases)  # on CPU tensors the values agree
    compare_cases(ref, ref, cases, off_cpu=True)
    with pytest.raises(CheckFailure, match="on input 'T=5' moved off the CPU"):
        compare_cases(cpu_mask, ref, cases, off_cpu=True)
