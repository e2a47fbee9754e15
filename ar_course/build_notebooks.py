"""Write the learner notebooks in ``notebooks/`` from the solution notebooks in ``solutions/``.

For every ``solutions/NN_topic.ipynb``:

* each region between a ``# BEGIN SOLUTION`` line and a ``# END SOLUTION`` line is replaced by
  ``raise NotImplementedError("Exercise N.M: name")`` at the indentation of the ``BEGIN`` line, where
  ``N.M: name`` comes from the cell's first line, ``# Exercise N.M: name``;
* outputs and execution counts are cleared;
* the kernel is set to :data:`KERNELSPEC`, the default ``python3`` kernel that ipykernel gives every Jupyter
  (the Python that Jupyter itself runs in), so a notebook opens without registering a kernel of its own.

Usage (from anywhere inside a checkout of the repository, or with ``--root PATH``)::

    python -m ar_course.build_notebooks            # write notebooks/
    python -m ar_course.build_notebooks --check    # exit 1 if notebooks/ is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ar_course.checkout import CheckoutNotFound, find_root, root_path
from ar_course.cli import missing_extra, path_arg

try:
    import nbformat
except ModuleNotFoundError as exc:  # a core install: one line for the command, a traceback for an importer
    if __name__ != "__main__":
        raise
    raise SystemExit(f"error: {missing_extra('python -m ar_course.build_notebooks', 'course', exc)}") from None

EXERCISE_RE = re.compile(r"^#\s*Exercise\s+(\d+\.\d+)\s*:\s*(\w+)")
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


class BuildError(ValueError):
    """A solution notebook breaks the authoring conventions."""


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


def build(solutions: Path, notebooks: Path, check: bool = False) -> list[str]:
    """Write (or with ``check`` compare) every learner notebook, and delete the notebooks in ``notebooks`` that
    have no solution (with ``check``, only list them); return the names that were stale or extra."""
    stale: list[str] = []
    sources = sorted(solutions.glob("*.ipynb"))
    expected_names = {p.name for p in sources}
    for path in sources:
        nb = nbformat.read(path, as_version=4)
        text = render(learner_notebook(nb, path.name))
        target = notebooks / path.name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            stale.append(path.name)
            if not check:
                notebooks.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
    for extra in sorted(notebooks.glob("*.ipynb")):
        if extra.name not in expected_names:
            stale.append(extra.name)
            if not check:
                extra.unlink()
    return stale


def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course.build_notebooks [--check] [--root PATH]``: exit status 0, 1 when ``--check`` finds
    ``notebooks/`` out of date, 2 for a solution notebook that breaks the conventions or no checkout."""
    parser = argparse.ArgumentParser(prog="python -m ar_course.build_notebooks",
                                     description=(__doc__ or "").split("\n\n")[0])  # no docstring under -OO
    parser.add_argument("--check", action="store_true", help="only report whether notebooks/ is out of date")
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
        stale = build(args.solutions, args.notebooks, check=args.check)
    except (BuildError, CheckoutNotFound) as exc:
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
