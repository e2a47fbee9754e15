"""The README's examples run as written and say what they print: every ```python block runs statement by
statement, a shape comment (`# (3, 1, 32, 32) in [0, 1]`) is checked against the value of its line, the listed
checkpoint names are `checkpoint.available()`; every `python -m ar_course generate` command runs and writes its
grid. CONTRIBUTING.md's sketch of a check module runs and its check judges."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from ar_course import checkpoint
from checks_helpers import assert_fails, assert_passes
from cli_helpers import grid_size, one_torch_thread, run

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SHAPE = re.compile(r"#\s*\((\d+(?:,\s*\d+)*)\)(\s+in \[0, 1\])?")


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _checked_value(statement: ast.stmt, namespace: dict) -> object:
    """The value a statement's shape comment describes: an expression's value, or an assignment's first target."""
    if isinstance(statement, ast.Expr):
        return eval(compile(ast.Expression(statement.value), "<README>", "eval"), namespace)
    target = statement.targets[0]
    if isinstance(target, ast.Tuple):
        target = target.elts[0]
    return namespace[target.id]


def test_the_readme_has_its_python_examples():
    assert len(python_blocks(README)) == 4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", range(4))
def test_a_readme_python_example_runs_and_its_shape_comments_hold(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the files an example writes
    block = python_blocks(README)[index]
    lines = block.splitlines()
    namespace: dict = {}
    checked = 0
    with one_torch_thread():
        for statement in ast.parse(block).body:
            source = ast.get_source_segment(block, statement)
            exec(compile(ast.Module([statement], []), "<README>", "exec"), namespace)
            shape = SHAPE.search(lines[statement.end_lineno - 1])
            if shape is None:
                continue
            value = _checked_value(statement, namespace)
            expected = tuple(int(n) for n in shape.group(1).split(","))
            assert tuple(value.shape) == expected, f"README: {source!r} has shape {tuple(value.shape)}"
            if shape.group(2):
                assert 0 <= float(value.min()) and float(value.max()) <= 1, f"README: {source!r} leaves [0, 1]"
            checked += 1
    assert checked >= 1, "every README example states at least one shape"


def test_the_readme_lists_every_shipped_checkpoint():
    block = python_blocks(README)[1]
    start = block.index("checkpoint.available()")
    listed = re.findall(r"'([a-z_0-9]+)'", block[start:block.index("\nvar =", start)])
    assert listed == checkpoint.available()


GENERATE = [shlex.split(line.split("#")[0]) for line in README.splitlines()
            if line.startswith(".venv/bin/python -m ar_course generate")]


def test_the_readme_has_its_generate_commands():
    assert len(GENERATE) == 2


@pytest.mark.timeout(300)
@pytest.mark.parametrize("argv", GENERATE, ids=lambda argv: " ".join(argv[4:]))
def test_a_readme_generate_command_writes_its_grid(capsys, tmp_path, argv):
    args = argv[3:]  # after ".venv/bin/python -m ar_course"
    out = args.index("--out") + 1
    args[out] = str(tmp_path / args[out])
    with one_torch_thread():
        status, stdout, err = run(capsys, *args)
    assert status == 0 and err == "" and f"wrote {args[out]}" in stdout
    classes = range(10)  # generate's default: every class
    if "--classes" in args:
        after = args[args.index("--classes") + 1:]
        classes = after[:next((i for i, a in enumerate(after) if a.startswith("--")), len(after))]
    per_class = int(args[args.index("--per-class") + 1]) if "--per-class" in args else 1
    with Image.open(args[out]) as img:
        zoom = img.size[0] // grid_size(len(classes), per_class, 1)[0]
        assert img.size == grid_size(len(classes), per_class, zoom)


def test_contributing_check_module_sketch_runs_and_its_check_judges():
    """CONTRIBUTING.md's sketch of a check module, run as written: its check passes the reference and rejects the
    mistake it lists with that mistake's diagnosis."""
    block = python_blocks((ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8"))[0]
    namespace: dict = {}
    exec(compile(block, "<CONTRIBUTING>", "exec"), namespace)
    check = namespace["vq_lookup"]
    assert_passes(check, namespace["ref"].vq_lookup)
    assert_fails(check, lambda z, codebook: (z @ codebook.t()).argmax(1), contains="largest dot product z.e")
    assert_fails(check, lambda z, codebook: torch.cdist(z, codebook).argmax(1))


def test_the_trainer_table_names_functions_that_return_what_it_says():
    """Each row of "Reuse the modules"' trainer table: the function exists where it says, its first arguments
    are the ones listed, and its return annotation names the model class the row gives."""
    import importlib
    import inspect

    rows = re.findall(r"^\| `([\w.]+)\(([^)]*)\)` \| [^|]+ \| `?\(?(\w+)", README, flags=re.M)
    assert len(rows) == 10
    for path, args, returned in rows:
        module, _, name = f"ar_course.{path}".rpartition(".")
        fn = getattr(importlib.import_module(module), name)
        listed = [a.strip() for a in args.split(",") if a.strip() not in ("", "...")]
        assert list(inspect.signature(fn).parameters)[:len(listed)] == listed, path
        assert returned in str(inspect.signature(fn).return_annotation), (path, returned)
