"""The learner-notebook builder: solution regions become stubs, outputs are cleared, notebooks/ is in sync."""

from pathlib import Path

import nbformat
import pytest

from ar_course import build_notebooks as bn
from fixtures.make_fixtures import solution_notebook

ROOT = Path(__file__).resolve().parents[1]


def test_strip_solutions_keeps_indentation_and_code_outside():
    src = "# Exercise 1.2: f\ndef f(x):\n    y = x\n    # BEGIN SOLUTION\n    return y + 1\n    # END SOLUTION\n"
    out = bn.strip_solutions(src, "1.2: f")
    assert out == '# Exercise 1.2: f\ndef f(x):\n    y = x\n    raise NotImplementedError("Exercise 1.2: f")'


@pytest.mark.parametrize(
    "src",
    ["# BEGIN SOLUTION\nx = 1\n", "x = 1\n# END SOLUTION\n", "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION"],
)
def test_malformed_regions_are_errors(src):
    with pytest.raises(bn.BuildError):
        bn.strip_solutions(src, "1.1: f")


def test_learner_notebook_from_fixture():
    sol = solution_notebook()
    sol.cells[3].outputs = [nbformat.v4.new_output("stream", text="Exercise 90.1 passed\n")]
    sol.cells[3].execution_count = 3
    learner = bn.learner_notebook(sol)
    text = bn.render(learner)
    assert "BEGIN SOLUTION" not in text and "return x * 2" not in text
    assert 'raise NotImplementedError("Exercise 90.1: double")' in learner.cells[2].source
    assert all(c.get("outputs", []) == [] for c in learner.cells if c.cell_type == "code")
    assert learner.metadata["kernelspec"] == bn.KERNELSPEC
    assert sol.cells[2].source.count("BEGIN SOLUTION") == 1  # the input is untouched


def test_exercise_cell_needs_a_label():
    sol = solution_notebook()
    sol.cells[2].source = sol.cells[2].source.replace("# Exercise 90.1: double\n", "")
    with pytest.raises(bn.BuildError, match="must start with"):
        bn.learner_notebook(sol)


def test_duplicate_exercise_numbers_are_errors():
    sol = solution_notebook()
    sol.cells[5].source = sol.cells[5].source.replace("90.2", "90.1")
    with pytest.raises(bn.BuildError, match="twice"):
        bn.learner_notebook(sol)


def test_build_and_check_round_trip(tmp_path):
    sols, nbs = tmp_path / "solutions", tmp_path / "notebooks"
    sols.mkdir()
    nbformat.write(solution_notebook(), sols / "90_fixture.ipynb")
    assert bn.build(sols, nbs, check=True) == ["90_fixture.ipynb", bn.MANIFEST]
    assert bn.build(sols, nbs) == ["90_fixture.ipynb"]
    assert bn.build(sols, nbs, check=True) == []
    (nbs / bn.MANIFEST).unlink()  # the notebooks as they were, without the record of what was generated
    assert bn.build(sols, nbs, check=True) == [bn.MANIFEST]
    assert bn.build(sols, nbs) == [] and bn.build(sols, nbs, check=True) == []


def _built(tmp_path):
    sols, nbs = tmp_path / "solutions", tmp_path / "notebooks"
    sols.mkdir()
    nbformat.write(solution_notebook(), sols / "90_fixture.ipynb")
    nbformat.write(solution_notebook(), sols / "91_other.ipynb")
    bn.build(sols, nbs)
    return sols, nbs


def test_build_deletes_generated_notebooks_that_have_no_solution_and_check_only_lists_them(tmp_path):
    """A learner notebook whose solution notebook was removed is deleted by a build; --check leaves it in place."""
    sols, nbs = _built(tmp_path)
    (sols / "91_other.ipynb").unlink()
    assert bn.build(sols, nbs, check=True) == ["91_other.ipynb", bn.MANIFEST] and (nbs / "91_other.ipynb").exists()
    assert bn.build(sols, nbs) == ["91_other.ipynb"] and not (nbs / "91_other.ipynb").exists()
    assert sorted(p.name for p in nbs.iterdir()) == [bn.MANIFEST, "90_fixture.ipynb"]
    assert bn.build(sols, nbs, check=True) == []


def test_build_never_replaces_or_deletes_the_learners_work_without_force(tmp_path, capsys):
    """notebooks/ is where learners work: a build overwrote their edited and executed notebooks with fresh stubs,
    and deleted notebooks of their own (audit 29). Now a notebook changed since it was generated is kept and
    named (exit 2), the others are still written, and --force replaces it; a notebook of their own stays."""
    sols, nbs = _built(tmp_path)
    mine, own = nbs / "90_fixture.ipynb", nbs / "my_experiments.ipynb"
    work = mine.read_text(encoding="utf-8").replace("raise NotImplementedError", "return 42  # mine\n    raise")
    mine.write_text(work, encoding="utf-8")
    own.write_text("{}", encoding="utf-8")
    changed = solution_notebook()
    changed.cells[0].source += "\n\nA new paragraph."  # the course moved on: both notebooks are stale
    nbformat.write(changed, sols / "90_fixture.ipynb")
    nbformat.write(changed, sols / "91_other.ipynb")
    with pytest.raises(bn.ChangedNotebooks, match=r"^kept 1 notebook\(s\) in .* \(your work: run, edited or "
                                                  r"saved\): 90_fixture.ipynb; copy them elsewhere, then run again "
                                                  r"with --force to replace them$"):
        bn.build(sols, nbs)
    assert mine.read_text(encoding="utf-8") == work and own.read_text(encoding="utf-8") == "{}"
    assert "A new paragraph." in (nbs / "91_other.ipynb").read_text(encoding="utf-8")  # the untouched one moved on
    with pytest.raises(bn.ChangedNotebooks):  # still kept on the next build: the record is not overwritten
        bn.build(sols, nbs)
    assert bn.main(["--solutions", str(sols), "--notebooks", str(nbs)]) == 2
    assert "90_fixture.ipynb; copy them elsewhere" in capsys.readouterr().err
    assert bn.build(sols, nbs, force=True) == ["90_fixture.ipynb"]
    assert "A new paragraph." in mine.read_text(encoding="utf-8") and own.exists()
    assert bn.build(sols, nbs, check=True) == []



def test_a_build_cut_short_leaves_whole_notebooks_and_record(tmp_path, monkeypatch):
    """Ctrl-C while a build wrote a notebook left half of it, which the next build then kept as "your work"
    (audit 30). The notebooks and the manifest are written through a temporary file and a rename: cut short
    before the rename, the old files are whole, nothing temporary is left, and the next build simply runs."""
    import ar_course.files as files

    sols, nbs = _built(tmp_path)
    before = {p.name: p.read_text(encoding="utf-8") for p in nbs.iterdir()}
    changed = solution_notebook()
    changed.cells[0].source += "\n\nA new paragraph."
    nbformat.write(changed, sols / "90_fixture.ipynb")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bn.build(sols, nbs)
    monkeypatch.undo()
    assert {p.name: p.read_text(encoding="utf-8") for p in nbs.iterdir()} == before  # no half file, no .tmp
    assert bn.build(sols, nbs) == ["90_fixture.ipynb"]
    assert "A new paragraph." in (nbs / "90_fixture.ipynb").read_text(encoding="utf-8")


def test_learner_notebook_drops_saved_widget_state():
    """Widget state saved in a solution notebook (large, and stale without its outputs) is not copied into the
    learner notebook; the rest of the notebook metadata is kept."""
    sol = solution_notebook()
    sol.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"abc": {}}}}
    sol.metadata["language_info"] = {"name": "python"}
    learner = bn.learner_notebook(sol)
    assert "widgets" not in learner.metadata and "widgets" not in bn.render(learner)
    assert learner.metadata["language_info"] == {"name": "python"}
    assert "widgets" in sol.metadata  # the input is untouched


def test_notebooks_use_the_default_python3_kernel():
    """Any Jupyter with ipykernel opens them: no kernel to register (`make lab` starts the venv's Jupyter, whose
    python3 kernel is the venv's Python)."""
    assert bn.KERNELSPEC["name"] == "python3"
    for path in sorted((ROOT / "solutions").glob("*.ipynb")) + sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert nbformat.read(path, as_version=4).metadata["kernelspec"] == bn.KERNELSPEC, path.name


def test_repository_notebooks_are_up_to_date():
    """notebooks/ must be regenerated whenever solutions/ changes: `python -m ar_course.build_notebooks`."""
    stale = bn.build(ROOT / "solutions", ROOT / "notebooks", check=True)
    assert stale == [], f"notebooks/ is out of date for {stale}: run `python -m ar_course.build_notebooks`"
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        assert "BEGIN SOLUTION" not in nb.read_text(encoding="utf-8")
