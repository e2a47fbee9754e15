"""The library never imports the course layer (CONTRIBUTING.md, "Layers").

The course layer is the exercise checks with their reference answers, the grader, the notebook builder, the
site builder, the notebooks' helpers (plots, chapter 04's comparison, the checkout of exercises), the benchmark
runner and the doctor; everything else under ``ar_course/`` is the library. Every import statement of a library
module, relative ones resolved, ``importlib.import_module("...")`` calls and strings that name a module are read
with ``ast``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import ar_course

PACKAGE = Path(ar_course.__file__).resolve().parent
COURSE_LAYER = ("ar_course.checks", "ar_course.grade", "ar_course.build_notebooks", "ar_course.site",
                "ar_course.checkout", "ar_course.bench", "ar_course.doctor", "ar_course.viz", "ar_course.var.compare")
"""Modules (and packages, with everything under them) of the course layer (CONTRIBUTING.md, "Layers")."""
NAMED_ON_USE = {("ar_course.cli", "ar_course.grade"), ("ar_course.cli", "ar_course.doctor"),
                ("ar_course.cli", "ar_course.bench")}
"""(library module, course module) pairs allowed by name only: the command table of ``python -m ar_course``
names the grader, the doctor and the benchmark runner, each imported when its command runs and never
otherwise."""
MODULE_NAME = re.compile(r"ar_course(\.\w+)+")


def module_name(path: Path) -> str:
    """``ar_course/raster/model.py`` -> ``ar_course.raster.model``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def in_course_layer(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COURSE_LAYER)


def named_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module name ``source`` (the text of ``module``) imports or spells out as a string."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(max(node.level - 1, 0)):
                package = package.rpartition(".")[0]
            base = ".".join(p for p in (package if node.level else "", node.module or "") if p)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # from ar_course import checks
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.fullmatch(node.value):
            names.add(node.value)  # importlib.import_module("ar_course.x"), command tables...
    return names


def library_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if not in_course_layer(module_name(p)))


def test_the_course_layer_exists_and_the_library_is_the_rest():
    course = {module_name(p) for p in PACKAGE.rglob("*.py") if in_course_layer(module_name(p))}
    assert {"ar_course.checks", "ar_course.checks.core", "ar_course.checks.reference", "ar_course.grade",
            "ar_course.build_notebooks", "ar_course.site", "ar_course.viz", "ar_course.var.compare"} <= course
    library = {module_name(p) for p in library_files()}
    assert {"ar_course", "ar_course.cli", "ar_course.system", "ar_course.raster.functional"} <= library


@pytest.mark.parametrize("path", library_files(), ids=lambda p: module_name(p))
def test_library_module_does_not_import_the_course_layer(path):
    module = module_name(path)
    source = path.read_text(encoding="utf-8")
    found = {n for n in named_modules(source, module, path.name == "__init__.py") if in_course_layer(n)}
    assert found <= {c for m, c in NAMED_ON_USE if m == module}, f"{module} imports the course layer: {found}"


@pytest.mark.parametrize("source", [
    "from ar_course.checks.reference import ch03",
    "import ar_course.grade",
    "from ar_course import checks",
    "from ..checks import ch01",
    "from ...build_notebooks import exercise_label",
    "importlib.import_module('ar_course.checks.ch01')",
])
def test_a_course_import_is_found(source):
    """The scan sees each way a library module could reach the course layer (relative imports resolved from a
    module two or three levels down)."""
    module = "ar_course.raster.sub.model" if "..." in source else "ar_course.raster.model"
    assert any(in_course_layer(n) for n in named_modules(source, module))


def test_a_library_import_is_not_flagged():
    source = "from .functional import to_raster\nfrom ar_course.checkpoint import load_model\nimport torch\n"
    assert not any(in_course_layer(n) for n in named_modules(source, "ar_course.raster.model"))
