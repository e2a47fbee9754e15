"""Run the solution notebooks top to bottom and build a static HTML course from the executed copies.

Course tooling (the course layer: the library never imports it). Two steps, both usable on their own:

    python -m ar_course.site execute solutions/*.ipynb    # run each notebook; errors fail; copies -> build/executed/
    python -m ar_course.site build                        # build/executed/*.ipynb -> build/site/*.html + index.html
    python -m ar_course.site figures                      # build/executed/*.ipynb -> docs/figures/ (committed)

``make test`` runs the first step (``tests/run_solutions.py``, which replaces ``pytest --nbval-lax solutions``
with the same guarantees: any cell's error fails the run and names the cell, ``CELL_TIMEOUT`` s per cell, outputs not
compared, the kernel is this Python) and keeps the executed copies, so ``make site`` (the second step)
only converts them. ``figures`` (``make figures``) copies every figure of the executed solutions into
``docs/figures/`` with one Markdown page, which is committed, so a repository browser shows the course's
figures without running anything. ``build`` executes a solution itself only when its executed copy is
missing or was made from another version of the notebook (the copy records the SHA-256 of the source file
it ran).

Figures are captured as in JupyterLab: the kernel gets matplotlib's inline backend even when the calling
environment sets ``MPLBACKEND=Agg`` (CI does), and widget state is stored. The pages are static: each
widget is drawn from its stored state (an ``interact`` shows its controls' values and the output they
produced, a progress bar its final state), so no page needs JavaScript or a network except MathJax for
formulas.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ar_course.checkout import CheckoutNotFound, find_root, root_path
from ar_course.cli import ArgumentParser, int_in, missing_extra, path_arg

try:
    import nbformat
    from nbformat import NotebookNode
except ModuleNotFoundError as exc:  # a core install: one line for the command, a traceback for an importer
    if __name__ != "__main__":
        raise
    raise SystemExit(f"error: {missing_extra('python -m ar_course.site', 'course', exc)}") from None
from ar_course.checks.core import STRICT_ENV
from ar_course.files import atomic_write_bytes, atomic_write_text

CELL_TIMEOUT = 1800
"""Seconds one cell may run: the slowest cells take a few minutes on a 2-core host, and a loaded host can make
them several times slower."""
MAX_CELL_TIMEOUT = 86400
"""Largest ``--cell-timeout``: a day."""
STARTUP_TIMEOUT = 300
"""Seconds a kernel may take to start (generous: a loaded 2-core host can be 10x slower than usual)."""
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")  # a Markdown heading line; group 1: its text
_NBVAL_TAGS = {"NBVAL_SKIP": "skip-execution", "nbval-skip": "skip-execution",
               "NBVAL_RAISES_EXCEPTION": "raises-exception", "nbval-raises-exception": "raises-exception"}


class NotebookRunError(Exception):
    """A notebook did not run top to bottom. ``str()`` is one line naming the notebook and the cell;
    :attr:`details` holds the cell's source and the traceback."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class SiteError(Exception):
    """The site cannot be built (no executed notebooks, a bad folder...); one-line message."""


# ----------------------------------------------------------------------------------------------- execution

def source_digest(path: Path) -> str:
    """SHA-256 of the notebook file ``path``: an executed copy records the digest of the source it ran."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_current(source: Path, executed: Path) -> bool:
    """Whether ``executed`` exists and was made by running this version of ``source``."""
    if not executed.is_file():
        return False
    try:
        meta = nbformat.read(executed, as_version=4).metadata.get("ar_course", {})
    except Exception:  # noqa: BLE001 - an unreadable copy is simply not current
        return False
    return meta.get("source_sha256") == source_digest(source)


def kernel_environment(strict_checks: bool = True, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a notebook's kernel runs in: ``base`` (default ``os.environ``) with matplotlib's
    inline backend (so ``plt.show()`` produces a figure, as in JupyterLab, even under ``MPLBACKEND=Agg``)
    and, with ``strict_checks``, ``AR_COURSE_STRICT_CHECKS=1`` (a solution's failing check is an error)."""
    env = dict(os.environ if base is None else base)
    env["MPLBACKEND"] = INLINE_BACKEND
    if strict_checks:
        env[STRICT_ENV] = "1"
    return env


def _apply_nbval_markers(nb: NotebookNode) -> None:
    """nbval's ``# NBVAL_SKIP`` / ``# NBVAL_RAISES_EXCEPTION`` comments (and tags) as nbclient's tags."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tags = set(cell.metadata.get("tags", []))
        first_lines = [line.strip().lstrip("#").strip() for line in cell.source.splitlines()[:3]]
        for marker, tag in _NBVAL_TAGS.items():
            if marker in tags or marker in first_lines:
                tags.add(tag)
        if tags:
            cell.metadata["tags"] = sorted(tags)


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def execute_notebook(source: str | Path, dest: str | Path | None = None, *, cell_timeout: int = CELL_TIMEOUT,
                     startup_timeout: int = STARTUP_TIMEOUT, strict_checks: bool = True,
                     env: Mapping[str, str] | None = None) -> NotebookNode:
    """Run every code cell of ``source`` in a fresh kernel of this Python, in the notebook's folder; return
    the executed notebook and, with ``dest``, write it there (atomically; a failed run writes nothing and
    removes a stale ``dest``).

    Any cell's error (or a cell running over ``cell_timeout`` seconds, or the kernel dying) raises
    :class:`NotebookRunError` naming the notebook and the code cell. Outputs are not compared with any
    stored ones. Cells tagged ``skip-execution`` or marked ``# NBVAL_SKIP`` are skipped; cells tagged
    ``raises-exception`` or marked ``# NBVAL_RAISES_EXCEPTION`` may raise. The copy's metadata records
    the source's digest (:func:`is_current`) and how long the run took."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    from ar_course.grade import CURRENT_ENV, kernel_manager  # the grader's kernel: this Python, local IPC sockets

    source = Path(source)
    dest = None if dest is None else Path(dest)
    if not source.is_file():
        raise NotebookRunError(f"{source}: no such notebook")
    digest = source_digest(source)
    try:
        nb = nbformat.read(source, as_version=4)
    except Exception as exc:  # noqa: BLE001 - any parse error is a one-line message
        raise NotebookRunError(f"{source}: not a readable notebook ({exc})") from None
    _apply_nbval_markers(nb)
    code_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    current: dict[str, int] = {"index": -1}

    def on_cell_start(cell: NotebookNode, cell_index: int) -> None:
        current["index"] = cell_index

    client = NotebookClient(
        nb, km=kernel_manager(), timeout=cell_timeout, startup_timeout=startup_timeout, kernel_name=CURRENT_ENV,
        allow_errors=False, store_widget_state=True,
        record_timing=True, resources={"metadata": {"path": str(source.resolve().parent)}},
        on_cell_start=on_cell_start)
    if dest is not None and dest.exists():
        dest.unlink()
    start = time.perf_counter()

    def where() -> tuple[str, str]:
        index = current["index"]
        if index < 0:
            return f"{source}: before the first cell", ""
        number = code_cells.index(index) + 1 if index in code_cells else 0
        return (f"{source}: code cell {number} of {len(code_cells)} (cell {index} of the file)",
                nb.cells[index].source)

    try:  # cleanup_kc: shut the kernel down at the end (nbclient keeps kernels of a manager passed in alive)
        client.execute(env=kernel_environment(strict_checks, env), cleanup_kc=True)
    except CellExecutionError as exc:
        place, cell_source = where()
        raise NotebookRunError(f"{place} raised {exc.ename}: {_strip_ansi(exc.evalue).strip()}",
                               _strip_ansi(str(exc))) from None
    except CellTimeoutError:
        place, cell_source = where()
        raise NotebookRunError(f"{place} ran over the {cell_timeout} s limit per cell", cell_source) from None
    except DeadKernelError as exc:
        place, cell_source = where()
        raise NotebookRunError(f"{place}: the kernel died ({exc})", cell_source) from None
    except RuntimeError as exc:  # the kernel did not start (nbclient raises RuntimeError on a startup timeout)
        raise NotebookRunError(f"{source}: the kernel did not start: {exc}") from None
    seconds = time.perf_counter() - start
    nb.metadata["ar_course"] = {"source": source.name, "source_sha256": digest, "seconds": round(seconds, 1),
                                "executed_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if dest is not None:
        atomic_write_text(dest, nbformat.writes(nb))
    return nb


def ensure_executed(solutions: Sequence[Path], executed_dir: Path, *, cell_timeout: int = CELL_TIMEOUT,
                    log: Any = print) -> list[Path]:
    """The executed copy of each notebook in ``solutions`` (in ``executed_dir``, same name), running a
    notebook only when its copy is missing or not :func:`is_current`. Returns the copies' paths."""
    copies = []
    for source in solutions:
        copy = executed_dir / source.name
        if is_current(source, copy):
            log(f"{source.name}: executed copy is current")
        else:
            log(f"{source.name}: executing (no current executed copy in {executed_dir})")
            start = time.perf_counter()
            execute_notebook(source, copy, cell_timeout=cell_timeout)
            log(f"{source.name}: ran in {time.perf_counter() - start:.0f} s")
        copies.append(copy)
    return copies


# ------------------------------------------------------------------------------------------ static widgets

@dataclass
class _Html:
    """A piece of HTML that belongs on one line with its neighbours (a slider's value, a progress bar)."""

    text: str


_CONTROLS = ("Slider", "Dropdown", "ToggleButtons", "RadioButtons", "Select", "Checkbox", "Text", "Play",
             "Combobox", "ColorPicker", "DatePicker", "ToggleButton")


def _model_id(ref: Any) -> str | None:
    return ref[len("IPY_MODEL_"):] if isinstance(ref, str) and ref.startswith("IPY_MODEL_") else None


def _widget_pieces(model_id: str, states: Mapping[str, Any], seen: set[str]) -> list[Any]:
    """The static rendering of one widget (and its children): a list of :class:`_Html` pieces and ordinary
    notebook outputs (an ``Output`` widget's captured outputs)."""
    if model_id in seen or model_id not in states:
        return []
    seen.add(model_id)
    state = states[model_id].get("state", {})
    name = str(state.get("_model_name", ""))
    if name.endswith("BoxModel") or name in ("AccordionModel", "TabModel", "StackModel"):
        pieces: list[Any] = []
        for child in state.get("children", []):
            child_id = _model_id(child)
            if child_id:
                pieces += _widget_pieces(child_id, states, seen)
        return pieces
    if name == "OutputModel":
        return [nbformat.from_dict(out) for out in state.get("outputs", [])]
    if name in ("HTMLModel", "HTMLMathModel"):
        return [_Html(str(state.get("value", "")))] if state.get("value") else []
    if name == "LabelModel":
        return [_Html(html.escape(str(state.get("value", ""))))] if state.get("value") else []
    if name.endswith("ProgressModel"):
        value, top = state.get("value", 0), state.get("max", 100)
        return [_Html(f'<progress value="{value}" max="{top}"></progress>')]
    if name == "ButtonModel":
        return [_Html(f"<button disabled>{html.escape(str(state.get('description', '')))}</button>")]
    if any(name.endswith(kind + "Model") for kind in _CONTROLS):
        value = state.get("value")
        labels = state.get("_options_labels")
        if labels is not None and isinstance(state.get("index"), int) and 0 <= state["index"] < len(labels):
            value = labels[state["index"]]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and state.get("readout_format"):
            value = _readout(value, str(state["readout_format"]))
        label = html.escape(str(state.get("description", "")))
        return [_Html(f'<span class="ar-static-control">{label} <b>{html.escape(str(value))}</b> '
                      f"<small>(interactive in JupyterLab)</small></span>")]
    return []


def _readout(value: float, spec: str) -> str:
    """A slider's value as JupyterLab shows it: its ``readout_format`` (a d3-format spec such as ``.3g``, which
    Python's format reads the same for the common cases); the plain value where Python cannot read the spec."""
    try:
        return format(value, spec)
    except ValueError:
        return str(value)


def static_widgets(nb: NotebookNode) -> NotebookNode:
    """Replace every widget view in ``nb``'s outputs (in place) by a static rendering from the stored widget
    state (``nb.metadata.widgets``, which is then removed): controls as their values, an ``Output`` widget
    as the outputs it captured (an ``interact``'s figure), a progress bar as its final state. A view whose
    state was not stored keeps its plain-text form. Returns ``nb``."""
    states = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW not in data:
                outputs.append(out)
                continue
            pieces = _widget_pieces(str(data[WIDGET_VIEW].get("model_id", "")), states, set())
            if not pieces:
                fallback = {k: v for k, v in data.items() if k != WIDGET_VIEW}
                if fallback:
                    outputs.append(nbformat.from_dict({**out, "data": fallback}))
                continue
            line: list[str] = []
            for piece in [*pieces, None]:
                if isinstance(piece, _Html):
                    line.append(piece.text)
                    continue
                if line:
                    outputs.append(nbformat.v4.new_output(
                        "display_data", data={"text/html": '<div class="ar-static-widget">' + " ".join(line)
                                              + "</div>"}))
                    line = []
                if piece is not None:
                    outputs.append(piece)
        cell.outputs = outputs
    nb.metadata.pop("widgets", None)
    return nb


# ---------------------------------------------------------------------------------------------- the site

def notebook_title(nb: NotebookNode, fallback: str) -> str:
    """The text of the notebook's first Markdown heading (``# 00 · A tour of the course``), else ``fallback``."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                m = _HEADING.match(line)
                if m:
                    return re.sub(r"[*_`]", "", m.group(1)).strip()
    return fallback


@dataclass
class Page:
    """One chapter of the site: its executed notebook, the HTML file written for it and its title."""

    notebook: Path
    html_name: str
    title: str


def _navigation(pages: Sequence[Page], i: int) -> str:
    links = ["[Course index](index.html)"]
    if i > 0:
        links.insert(0, f"[← {pages[i - 1].title}]({pages[i - 1].html_name})")
    if i + 1 < len(pages):
        links.append(f"[{pages[i + 1].title} →]({pages[i + 1].html_name})")
    return " · ".join(links)


_NOTEBOOK_LINK = re.compile(r"\]\(([\w.-]+)\.ipynb(#[^)\s]*)?\)")
"""A Markdown link to a notebook beside this one, ``](03_x.ipynb#guidance)``: its page is ``03_x.html``."""


def render_page(nb: NotebookNode, title: str, navigation: str = "") -> str:
    """One notebook as a self-contained HTML page (nbconvert's ``lab`` template; figures embedded as data
    URIs; widgets static), with ``navigation`` (Markdown) above the first cell and below the last. Links to
    a sibling notebook (``03_x.ipynb#anchor``) point at its page (``03_x.html#anchor``)."""
    from nbconvert import HTMLExporter

    nb = nbformat.from_dict(nb)  # a copy: the caller's notebook is left as it was
    static_widgets(nb)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = _NOTEBOOK_LINK.sub(r"](\1.html\2)", cell.source)
    if navigation:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(navigation))
        nb.cells.append(nbformat.v4.new_markdown_cell(navigation))
    exporter = HTMLExporter(template_name="lab", embed_images=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    return body


def _index_html(pages: Sequence[Page], note: str) -> str:
    items = "\n".join(f'    <li><a href="{html.escape(p.html_name)}">{html.escape(p.title)}</a></li>' for p in pages)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Autoregressive Generation from Scratch</title>
  <style>
    body {{ font-family: system-ui, sans-serif; max-width: 48rem; margin: 3rem auto; padding: 0 1rem;
           line-height: 1.5; color: #222; }}
    li {{ margin: 0.4rem 0; font-size: 1.1rem; }}
    .note {{ color: #555; font-size: 0.95rem; }}
  </style>
</head>
<body>
  <h1>Autoregressive Generation from Scratch</h1>
  <p>Every chapter of the course, run top to bottom with its exercises solved, with all its figures.
     To do the exercises yourself, open <code>notebooks/</code> in JupyterLab (<code>make lab</code>).</p>
  <ol start="0">
{items}
  </ol>
  <p class="note">{html.escape(note)}</p>
</body>
</html>
"""


def build_site(executed: Sequence[Path], out_dir: Path, log: Any = print) -> list[Path]:
    """Write one HTML page per executed notebook (in the given order) and ``index.html`` linking them into
    ``out_dir``; return the paths written (index first). Raises :class:`SiteError` when there is nothing
    to build or a notebook cannot be read."""
    if not executed:
        raise SiteError("no executed notebooks to build the site from")
    notebooks, pages = [], []
    for path in executed:
        try:
            nb = nbformat.read(path, as_version=4)
        except Exception as exc:  # noqa: BLE001
            raise SiteError(f"cannot read executed notebook {path}: {exc}") from None
        notebooks.append(nb)
        pages.append(Page(path, path.with_suffix(".html").name, notebook_title(nb, path.stem)))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (nb, page) in enumerate(zip(notebooks, pages)):
        target = out_dir / page.html_name
        atomic_write_text(target, render_page(nb, page.title, _navigation(pages, i)))
        log(f"wrote {target}")
        written.append(target)
    runs = [nb.metadata.get("ar_course", {}).get("executed_at") for nb in notebooks]
    when = max((r for r in runs if r), default=None)
    note = f"Built {time.strftime('%Y-%m-%d')} from notebooks executed" + (f" (latest {when})." if when else ".")
    index = atomic_write_text(out_dir / "index.html", _index_html(pages, note))
    log(f"wrote {index}")
    return [index, *written]


# ------------------------------------------------------------------------------------------- the gallery

def _figures(nb: NotebookNode) -> Iterable[tuple[str, bytes]]:
    """``(section, png bytes)`` of every PNG figure in ``nb``'s outputs (widgets drawn from their stored
    state, so an ``interact``'s figure counts), in order; ``section`` is the nearest Markdown heading above
    (its text as written)."""
    nb = static_widgets(nbformat.from_dict(nb))
    section = ""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                m = _HEADING.match(line)
                if m:
                    section = m.group(1).strip()
            continue
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                yield section, base64.b64decode("".join(png) if isinstance(png, list) else png)


def write_gallery(executed: Sequence[Path], out_dir: Path, log: Any = print) -> list[Path]:
    """Copy every figure of the ``executed`` notebooks to ``out_dir/<notebook stem>/figure-NN.png`` and write
    ``out_dir/README.md``: per chapter its title and each figure under the section heading it belongs to.
    A chapter's folder is emptied of old figures first. Returns the paths written (README first). Raises
    :class:`SiteError` when there is nothing to read or a notebook cannot be read."""
    if not executed:
        raise SiteError("no executed notebooks to take figures from")
    lines = ["# The course's figures", "",
             "Every figure of the solution notebooks as they last ran top to bottom (`make test`, then "
             "`make figures`). Open `notebooks/` in JupyterLab (`make lab`) to make them yourself; "
             "`make site` builds each chapter as a web page with its text.", ""]
    written: list[Path] = []
    for path in executed:
        try:
            nb = nbformat.read(path, as_version=4)
        except Exception as exc:  # noqa: BLE001
            raise SiteError(f"cannot read executed notebook {path}: {exc}") from None
        folder = out_dir / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("figure-*.png"):
            old.unlink()
        lines += [f"## {notebook_title(nb, path.stem)}", ""]
        last_section = None
        for i, (section, png) in enumerate(_figures(nb), start=1):
            target = atomic_write_bytes(folder / f"figure-{i:02d}.png", png)
            written.append(target)
            if section != last_section:
                lines += [f"### {section}" if section else "", ""]
                last_section = section
            # bold and code marks go; a lone * (keyword-only) stays
            alt = re.sub(r"\*\*|[`\[\]]", "", section) or path.stem
            lines += [f"![{alt}, figure {i}]({path.stem}/{target.name})", ""]
        log(f"{path.stem}: {sum(1 for p in written if p.parent == folder)} figures")
    index = atomic_write_text(out_dir / "README.md", "\n".join(lines).rstrip() + "\n")
    return [index, *written]


# ------------------------------------------------------------------------------------------------- CLI

def _cmd_execute(args: argparse.Namespace) -> int:
    for source in args.notebooks:
        start = time.perf_counter()
        execute_notebook(source, args.out / source.name, cell_timeout=args.cell_timeout)
        print(f"{source}: ran in {time.perf_counter() - start:.0f} s -> {args.out / source.name}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    if args.solutions is None or args.executed is None or args.out is None:
        root = find_root("solutions", args.root)
        args.solutions = args.solutions or root / "solutions"
        args.executed = args.executed or root / "build" / "executed"
        args.out = args.out or root / "build" / "site"
    sources = sorted(args.solutions.glob("*.ipynb"))
    if not sources:
        raise SiteError(f"no notebooks in {args.solutions}")
    start = time.perf_counter()
    if args.no_execute:
        copies = [args.executed / s.name for s in sources]
        stale = [c.name for s, c in zip(sources, copies) if not is_current(s, c)]
        if stale:
            raise SiteError(f"no current executed copy of {', '.join(stale)} in {args.executed} (drop --no-execute)")
    else:
        copies = ensure_executed(sources, args.executed, cell_timeout=args.cell_timeout)
    build_site(copies, args.out)
    print(f"site built in {time.perf_counter() - start:.0f} s: open {args.out / 'index.html'}")
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:
    root = find_root("solutions", args.root)
    executed, out = args.executed or root / "build" / "executed", args.out or root / "docs" / "figures"
    sources = sorted((root / "solutions").glob("*.ipynb"))
    copies = [executed / s.name for s in sources]
    stale = [c.name for s, c in zip(sources, copies) if not is_current(s, c)]
    if stale:
        raise SiteError(f"no current executed copy of {', '.join(stale)} in {executed}: run make test first")
    paths = write_gallery(copies, out)
    print(f"{len(paths) - 1} figures: {paths[0]}")
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m ar_course.site {execute,build,figures}``; one line ``error: ...`` and exit status 1 on failure
    (2 for bad arguments), the failing cell's traceback above it."""
    parser = ArgumentParser(prog="python -m ar_course.site", description=(__doc__ or "").split("\n\n")[0])  # -OO
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("execute", help="run notebooks top to bottom (errors fail) and write the executed copies")
    ex.add_argument("notebooks", nargs="+", type=path_arg)
    ex.add_argument("--out", type=path_arg, default=Path("build/executed"), help="default: build/executed")
    ex.add_argument("--cell-timeout", type=int_in(1, MAX_CELL_TIMEOUT), default=CELL_TIMEOUT,
                    help=f"seconds per cell (default {CELL_TIMEOUT})")
    bd = sub.add_parser("build", help="HTML pages + index from the executed solutions (executing stale ones)")
    bd.add_argument("--root", type=root_path, default=None, help="the checkout (default: found from here upward)")
    bd.add_argument("--solutions", type=path_arg, default=None, help="default: ROOT/solutions")
    bd.add_argument("--executed", type=path_arg, default=None, help="default: ROOT/build/executed")
    bd.add_argument("--out", type=path_arg, default=None, help="default: ROOT/build/site")
    bd.add_argument("--no-execute", action="store_true", help="fail instead of executing a missing or stale copy")
    bd.add_argument("--cell-timeout", type=int_in(1, MAX_CELL_TIMEOUT), default=CELL_TIMEOUT,
                    help=f"seconds per cell (default {CELL_TIMEOUT})")
    fg = sub.add_parser("figures", help="every figure of the executed solutions -> docs/figures/ (committed)")
    fg.add_argument("--root", type=root_path, default=None, help="the checkout (default: found from here upward)")
    fg.add_argument("--executed", type=path_arg, default=None, help="default: ROOT/build/executed")
    fg.add_argument("--out", type=path_arg, default=None, help="default: ROOT/docs/figures")
    args = parser.parse_args(None if argv is None else list(argv))
    missing = [str(p) for p in getattr(args, "notebooks", []) if not p.is_file()]
    if missing:
        print(f"error: {missing[0]}: no such notebook", file=sys.stderr)
        return 2
    commands = {"execute": _cmd_execute, "build": _cmd_build, "figures": _cmd_figures}
    try:
        return commands[args.command](args)
    except NotebookRunError as exc:
        if exc.details:
            print(exc.details, file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except CheckoutNotFound as exc:  # a bad --root, or run outside a checkout: bad arguments
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (SiteError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
