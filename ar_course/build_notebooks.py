"""Write the learner notebooks in ``notebooks/`` from the solution notebooks in ``solutions/``.

For every ``solutions/NN_topic.ipynb``:

* each region between a ``# BEGIN SOLUTION`` line and a ``# END SOLUTION`` line is replaced by
  ``raise NotImplementedError("Exercise N.M: name")`` at the indentation of the ``BEGIN`` line, where
  ``N.M: name`` comes from the cell's first line, ``# Exercise N.M: name``;
* outputs and execution counts are cleared;
* the kernel is set to :data:`KERNELSPEC`, the default ``python3`` kernel that ipykernel gives every Jupyter
  (the Python that Jupyter itself runs in), so a notebook opens without registering a kernel of its own.

``notebooks/`` is where learners work, so a build never destroys their work: ``notebooks/.generated.json``
(:data:`MANIFEST`) records a digest of each notebook as written, and a notebook that differs from it (run,
edited, or saved by Jupyter since) is kept, named, and replaced only with ``--force``; a notebook of the
learner's own (never generated) is left alone.

Usage (from anywhere inside a checkout of the repository, or with ``--root PATH``)::

    python -m ar_course.build_notebooks            # write notebooks/ (exit 2 naming any it kept)
    python -m ar_course.build_notebooks --force    # replace notebooks with changes of yours too
    python -m ar_course.build_notebooks --check    # exit 1 if notebooks/ is out of date
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

from ar_course.checkout import CheckoutNotFound, find_root, root_path
from ar_course.cli import missing_extra, path_arg
from ar_course.files import atomic_write_text

try:
    import nbformat
except ModuleNotFoundError as exc:  # a core install: one line for the command, a traceback for an importer
    if __name__ != "__main__":
        raise
    raise SystemExit(f"error: {missing_extra('python -m ar_course.build_notebooks', 'course', exc)}") from None

EXERCISE_RE = re.compile(r"^#\s*Exercise\s+(\d+\.\d+)\s*:\s*(\w+)")
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


MANIFEST = ".generated.json"
"""The file in ``notebooks/`` that maps each generated notebook's name to the SHA-256 of the text written."""


class BuildError(ValueError):
    """A solution notebook breaks the authoring conventions."""


class ChangedNotebooks(Exception):
    """Learner notebooks that differ from what the last build wrote, so a build kept them (``names``)."""

    def __init__(self, folder: Path, names: list[str]) -> None:
        self.names = names
        super().__init__(f"kept {len(names)} notebook(s) in {folder} that changed since they were generated (your "
                         f"work: run, edited or saved): {', '.join(names)}; copy them elsewhere, then run again "
                         "with --force to replace them")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_manifest(notebooks: Path) -> dict[str, str]:
    """The recorded digests (empty when there is no manifest or it cannot be read)."""
    try:
        data = json.loads((notebooks / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        return {}
    return {name: digest for name, digest in data.items() if isinstance(digest, str)}  # JSON keys are str


def exercise_label(source: str) -> tuple[str, str] | None:
    """``("1.3", "vq_lookup")`` from an exercise cell's first line ``# Exercise 1.3: vq_lookup``; ``None`` when
    the first non-blank line is not one."""
    first = source.lstrip().splitlines()[0] if source.strip() else ""
    m = EXERCISE_RE.match(first)
    return (m.group(1), m.group(2)) if m else None


def strip_solutions(source: str, label: str, where: str = "") -> str:
    """Replace every BEGIN/END SOLUTION region of ``source`` with a ``NotImplementedError("Exercise <label>")``
    stub. :class:`BuildError` (prefixed with ``where``) for a nested region, an END without a BEGIN or a BEGIN
    without an END."""
    out: list[str] = []
    inside = False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise BuildError(f"{where}: nested {BEGIN}")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f'{indent}raise NotImplementedError("Exercise {label}")')
        elif stripped == END:
            if not inside:
                raise BuildError(f"{where}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise BuildError(f"{where}: {BEGIN} without {END}")
    return "\n".join(out)


def learner_notebook(solution: nbformat.NotebookNode, name: str = "") -> nbformat.NotebookNode:
    """The learner version of a solution notebook (a new object; the input is not modified)."""
    nb = nbformat.from_dict(solution)
    seen: set[str] = set()
    for i, cell in enumerate(nb.cells):
        where = f"{name} cell {i}"
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            tags = cell.get("metadata", {}).get("tags", [])
            has_region = BEGIN in cell.source
            if "exercise" in tags or has_region:
                label = exercise_label(cell.source)
                if label is None:
                    raise BuildError(f"{where}: an exercise cell must start with '# Exercise N.M: name'")
                if not has_region:
                    raise BuildError(f"{where}: exercise {label[0]} has no {BEGIN} region")
                if label[0] in seen:
                    raise BuildError(f"{where}: exercise {label[0]} appears twice")
                seen.add(label[0])
                cell.source = strip_solutions(cell.source, f"{label[0]}: {label[1]}", where)
        for key in ("execution", "collapsed", "scrolled"):
            cell.get("metadata", {}).pop(key, None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.pop("widgets", None)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    """Canonical text of a notebook (stable across runs, so the sync test can compare files)."""
    return nbformat.writes(nb, version=4) + "\n"


def build(solutions: Path, notebooks: Path, check: bool = False, force: bool = False) -> list[str]:
    """Write (or with ``check`` compare) every learner notebook and :data:`MANIFEST`, and delete the generated
    notebooks in ``notebooks`` that no longer have a solution (with ``check``, only list them); return the names
    that were stale or extra.

    A notebook whose text differs from the digest the manifest recorded (the learner's work) is neither replaced
    nor deleted unless ``force``: the others are written, then :class:`ChangedNotebooks` names the kept ones. A
    notebook the manifest does not list and no solution has (the learner's own) is left alone and not listed."""
    stale: list[str] = []
    kept: list[str] = []
    recorded = _read_manifest(notebooks)
    manifest: dict[str, str] = {}
    sources = sorted(solutions.glob("*.ipynb"))
    expected_names = {p.name for p in sources}

    def changed(path: Path) -> bool:
        return _digest(path.read_text(encoding="utf-8")) != recorded.get(path.name)

    for path in sources:
        nb = nbformat.read(path, as_version=4)
        text = render(learner_notebook(nb, path.name))
        manifest[path.name] = _digest(text)
        target = notebooks / path.name
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        stale.append(path.name)
        if check:
            continue
        if target.exists() and changed(target) and not force:
            kept.append(path.name)
            manifest[path.name] = recorded.get(path.name, "")  # still not what it was generated as
            continue
        notebooks.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)  # a build cut short leaves the old notebook, not half of the new one
    for extra in sorted(notebooks.glob("*.ipynb")):
        if extra.name in expected_names or extra.name not in recorded:
            continue  # a solution's notebook, or one of the learner's own
        stale.append(extra.name)
        if check:
            continue
        if changed(extra) and not force:
            kept.append(extra.name)
            manifest[extra.name] = recorded[extra.name]
        else:
            extra.unlink()
    if check and recorded != manifest:
        stale.append(MANIFEST)
    if not check and (stale or recorded != manifest):
        notebooks.mkdir(parents=True, exist_ok=True)
        atomic_write_text(notebooks / MANIFEST, json.dumps({k: v for k, v in sorted(manifest.items()) if v}, indent=1)
                          + "\n")
    if kept:
        raise ChangedNotebooks(notebooks, kept)
    return stale


def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course.build_notebooks [--check] [--force] [--root PATH]``: exit status 0, 1 when ``--check``
    finds ``notebooks/`` out of date, 2 for a solution notebook that breaks the conventions, no checkout, or
    notebooks kept because they hold changes of the learner's (:class:`ChangedNotebooks`)."""
    parser = argparse.ArgumentParser(prog="python -m ar_course.build_notebooks",
                                     description=(__doc__ or "").split("\n\n")[0])  # no docstring under -OO
    parser.add_argument("--check", action="store_true", help="only report whether notebooks/ is out of date")
    parser.add_argument("--force", action="store_true",
                        help="also replace (or delete) notebooks that changed since they were generated: your work")
    parser.add_argument("--root", type=root_path, default=None,
                        help="the repository checkout (default: found from the current folder upward)")
    parser.add_argument("--solutions", type=path_arg, default=None, help="default: ROOT/solutions")
    parser.add_argument("--notebooks", type=path_arg, default=None, help="default: ROOT/notebooks")
    args = parser.parse_args(argv)
    try:
        if args.solutions is None or args.notebooks is None:
            root = find_root("solutions", args.root)
            args.solutions = args.solutions or root / "solutions"
            args.notebooks = args.notebooks or root / "notebooks"
        stale = build(args.solutions, args.notebooks, check=args.check, force=args.force)
    except (BuildError, CheckoutNotFound, ChangedNotebooks) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if stale:
            print("notebooks/ is out of date for: " + ", ".join(stale))
            print("run: python -m ar_course.build_notebooks")
            return 1
        print("notebooks/ is up to date")
        return 0
    print(f"wrote {len(stale)} notebook(s)" + (": " + ", ".join(stale) if stale else " (all up to date)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
