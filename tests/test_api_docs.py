"""Every public function, class and method of the library carries type hints and a docstring (CONTRIBUTING.md:
"type hints and docstrings with shapes on public functions").

Read with ``ast`` (nothing is imported): module-level functions and classes whose names do not start with ``_``,
and their methods that are public or ``__init__`` / ``__call__``. ``__init__`` needs no docstring or return hint
(its class's docstring documents it) and neither does ``extra_repr`` (torch's ``nn.Module`` hook for the repr).
The course layer (``tests/test_layers.py``) is exempt: checks and tooling, not an API to reuse.
"""

from __future__ import annotations

import ast

import pytest

from tests.test_layers import PACKAGE, in_course_layer, module_name

LIBRARY_FILES = sorted(p for p in PACKAGE.rglob("*.py") if not in_course_layer(module_name(p)))
UNDOCUMENTED = ("__init__", "extra_repr")


def _functions(tree: ast.Module):
    """(qualified name, node) of the module's public functions and of its public classes' methods."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        not item.name.startswith("_") or item.name in ("__init__", "__call__")):
                    yield f"{node.name}.{item.name}", item


def _device_kernel(fn: ast.FunctionDef) -> bool:
    """Whether ``fn`` is decorated with a ``jit`` (``@cuda.jit``, ``@triton.jit``, ``@numba.jit(...)``)."""
    return any("jit" in ast.unparse(d) for d in fn.decorator_list)


def problems(source: str) -> list[str]:
    """What ``source`` (a module's text) lacks: ``"NAME: no docstring"``, ``"NAME: ARG has no type hint"``,
    ``"NAME: no return type"``, ``"CLASS: no docstring"``."""
    tree = ast.parse(source)
    found = [f"{node.name}: no docstring" for node in tree.body
             if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and not ast.get_docstring(node)]
    for name, fn in _functions(tree):
        short = name.rpartition(".")[2]
        if short not in UNDOCUMENTED and not ast.get_docstring(fn):
            found.append(f"{name}: no docstring")
        args = fn.args
        params = [*args.posonlyargs, *args.args, *([args.vararg] if args.vararg else []), *args.kwonlyargs,
                  *([args.kwarg] if args.kwarg else [])]
        if _device_kernel(fn):  # numba/Triton compile these from their arguments: no Python type hints
            continue
        in_class = "." in name
        for i, arg in enumerate(params):
            if arg.annotation is None and not (in_class and i == 0 and arg.arg in ("self", "cls")):
                found.append(f"{name}: {arg.arg} has no type hint")
        if fn.returns is None and short != "__init__":
            found.append(f"{name}: no return type")
    return found


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: module_name(p))
def test_public_functions_have_type_hints_and_docstrings(path):
    assert problems(path.read_text(encoding="utf-8")) == []


def test_the_rule_finds_what_it_should():
    source = '''
class Documented:
    """Doc."""

    def __init__(self, n: int):
        self.n = n

    def extra_repr(self) -> str:
        return ""

    def forward(self, x):
        return x

    def _private(self, x):
        return x


class Bare:
    pass


def public(a: int, *rest, b) -> int:
    """Doc."""


def untyped_return(a: int):
    """Doc."""


def _helper(x):
    return x


@cuda.jit
def typed_by_numba(x, out):
    """Doc."""


@triton.jit
def undocumented_kernel(x):
    pass
'''
    assert problems(source) == ["Bare: no docstring", "Documented.forward: no docstring",
                                "Documented.forward: x has no type hint", "Documented.forward: no return type",
                                "public: rest has no type hint", "public: b has no type hint",
                                "untyped_return: no return type", "undocumented_kernel: no docstring"]
