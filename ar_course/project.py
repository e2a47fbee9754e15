"""Whether a folder is the ar-course source tree: it holds the ``pyproject.toml`` of the ``ar-course`` project.

The library asks it of the folder above the package (a trainer's default ``--out`` may regenerate a shipped
checkpoint only in a source checkout, never in site-packages); the course tools ask it while looking for the
checkout they work on (:mod:`ar_course.checkout`).
"""

from __future__ import annotations

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
