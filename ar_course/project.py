"""Whether a folder is the ar-course source tree: it holds the ``pyproject.toml`` of the ``ar-course`` project.

The library asks it of the folder above the package (a trainer's default ``--out`` may regenerate a shipped
checkpoint only in a source checkout, never in site-packages; an install hint is ``pip install -e`` there); the
course tools ask it while looking for the checkout they work on (:mod:`ar_course.checkout`).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1]
"""The folder above the package: the checkout itself when ``ar_course`` runs from one (or an editable install of
one), ``site-packages`` for a plain install."""

_PROJECT_NAME = re.compile(r'^name\s*=\s*"ar-course"\s*$', re.MULTILINE)


def is_project_root(folder: Path) -> bool:
    """Whether ``folder`` holds the ar-course ``pyproject.toml`` (its ``name = "ar-course"`` line)."""
    pyproject = folder / "pyproject.toml"
    return pyproject.is_file() and bool(_PROJECT_NAME.search(pyproject.read_text(encoding="utf-8", errors="replace")))


def is_source_checkout() -> bool:
    """Whether ``ar_course`` runs from a source checkout (the folder above the package holds the ar-course
    ``pyproject.toml``: a clone, or an editable install of one); ``False`` for an installed package
    (site-packages)."""
    return is_project_root(SOURCE)


_EXTRA_MARKER = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")


def install_command(extras: str) -> str:
    """The command that adds the optional dependencies ``extras`` (``"kernels"``, ``"course,kernels"``): in a
    source checkout ``pip install -e '.[kernels]' in the course's folder``; in an installed package the extras'
    own requirements, read from its metadata (``pip install 'numba==0.68.1' ...``: ``'.[kernels]'`` run in a
    user's project would name that project's extras, and ar-course may not come from an index)."""
    if is_source_checkout():
        return f"pip install -e '.[{extras}]' in the course's folder"
    wanted = set(extras.split(","))
    try:
        declared = importlib.metadata.requires("ar-course") or []
    except importlib.metadata.PackageNotFoundError:  # run from a copy of the package without its metadata
        declared = []
    requirements = []
    for entry in declared:  # "numba==0.68.1; extra == \"kernels\""
        requirement, _, marker = entry.partition(";")
        if (m := _EXTRA_MARKER.search(marker)) and m.group(1) in wanted:
            requirements.append(requirement.strip())
    if not requirements:
        return f"pip install 'ar-course[{extras}]'"
    return "pip install " + " ".join(f"'{r}'" for r in requirements)
