"""Finding the ar-course source checkout for the course tools that work on it (``build_notebooks``, ``bench``).

The installed package holds the library and the shipped checkpoints, not ``solutions/``, ``notebooks/`` or
``benchmarks/``: those live only in a checkout of the repository. The tools take ``--root`` or search upward
from the current folder, and say so in one line when there is no checkout to find. Notebooks read files of the
checkout (benchmark results) through :func:`checkout_file`, which also finds the checkout the package was
installed from in editable mode, so a notebook copied elsewhere still runs.
"""

from __future__ import annotations

from pathlib import Path

from ar_course.cli import invalid, path_arg
from ar_course.project import SOURCE, is_project_root


class CheckoutNotFound(Exception):
    """No ar-course checkout where one was needed."""


def is_checkout(folder: Path, marker: str) -> bool:
    """Whether ``folder`` holds the ar-course ``pyproject.toml`` and a ``marker`` folder (``"solutions"``...)."""
    return (folder / marker).is_dir() and is_project_root(folder)


def root_path(text: str) -> Path:
    """argparse ``type=`` for ``--root``: a path, not the empty string (which :class:`Path` would read as ``.``)."""
    if not text:
        raise invalid("a folder", text)
    return path_arg(text)


def _first_checkout(folders: tuple[Path, ...], marker: str) -> Path | None:
    """The first of ``folders`` that :func:`is_checkout` with ``marker``, or None."""
    return next((folder for folder in folders if is_checkout(folder, marker)), None)


def find_root(marker: str, root: str | Path | None = None) -> Path:
    """The checkout to work on: ``root`` when given (checked), else the first folder from the current one upward
    that :func:`is_checkout`. Raises :class:`CheckoutNotFound` with a one-line message otherwise."""
    if root is not None:
        folder = Path(root).resolve()
        if not is_checkout(folder, marker):
            raise CheckoutNotFound(f"--root {root} is not an ar-course checkout (looked for pyproject.toml with "
                                   f"{marker}/)")
        return folder
    here = Path.cwd().resolve()
    found = _first_checkout((here, *here.parents), marker)
    if found is not None:
        return found
    raise CheckoutNotFound(f"no ar-course checkout found from {here} upward (looked for pyproject.toml with "
                           f"{marker}/); pass --root")


def checkout_file(*parts: str) -> Path:
    """The path ``parts`` inside the ar-course checkout (``checkout_file("benchmarks", "results", "var.json")``):
    the checkout above the current folder, else the one this package was installed from (:data:`SOURCE`). Raises
    :class:`CheckoutNotFound` with a one-line message when neither holds ``parts[0]``."""
    here = Path.cwd().resolve()
    found = _first_checkout((here, *here.parents, SOURCE), parts[0])
    if found is not None:
        return found.joinpath(*parts)
    raise CheckoutNotFound(f"{'/'.join(parts)} is part of the ar-course repository, which is neither above "
                           f"{here} nor where this package is installed from ({SOURCE}): open the notebook inside "
                           "a checkout of the repository")
