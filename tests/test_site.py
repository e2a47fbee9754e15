"""The static course (``ar_course.site``): executed notebooks become HTML pages with their figures embedded
and an index linking them; widgets are drawn from their stored state; ``build`` reuses current executed copies
instead of running notebooks again; the executor fails on any cell's error, naming the cell."""

from __future__ import annotations

import base64
import os
import re
import zlib
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from ar_course import site
from ar_course.checks.core import STRICT_ENV

ROOT = Path(__file__).resolve().parents[1]
VIEW, STATE = site.WIDGET_VIEW, site.WIDGET_STATE


def _png(width: int = 3, height: int = 2) -> str:
    """A tiny valid grey PNG, base64-encoded as notebooks store it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    raw = b"".join(b"\x00" + bytes([128] * width) for _ in range(height))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big")
                                         + b"\x08\x00\x00\x00\x00")
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def _widget(model: str, **state) -> dict:
    return {"model_name": model, "model_module": "@jupyter-widgets/controls", "model_module_version": "2.0.0",
            "state": {"_model_name": model, **state}}


def _executed_chapter(title: str) -> nbformat.NotebookNode:
    """An executed notebook as ``execute_notebook`` leaves it: a figure, an ``interact`` (slider + the figure
    it drew, in an Output widget), a finished tqdm bar and the widget state in the metadata."""
    figure = new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure size 640x480>"})
    plot = new_code_cell("plt.plot([1, 2]); plt.show()", execution_count=1, outputs=[figure])
    interact = new_code_cell("widgets.interact(show, code=widgets.IntSlider(value=5))", execution_count=2, outputs=[
        new_output("display_data", data={VIEW: {"version_major": 2, "version_minor": 0, "model_id": "box"},
                                         "text/plain": "interactive(children=(IntSlider(value=5), Output()))"})])
    progress = new_code_cell("for _ in tqdm(range(7)): pass", execution_count=3, outputs=[
        new_output("display_data", data={VIEW: {"version_major": 2, "version_minor": 0, "model_id": "bar"},
                                         "text/plain": "  0%|          | 0/7"})])
    lost = new_code_cell("w = widgets.Button()", execution_count=4, outputs=[
        new_output("display_data", data={VIEW: {"version_major": 2, "version_minor": 0, "model_id": "gone"},
                                         "text/plain": "Button(description='never stored')"})])
    nb = new_notebook(cells=[new_markdown_cell(f"# {title}\n\nSome *text* and $x^2$."), plot, interact, progress,
                             lost])
    nb.metadata["widgets"] = {STATE: {"version_major": 2, "version_minor": 0, "state": {
        "box": _widget("VBoxModel", children=["IPY_MODEL_slider", "IPY_MODEL_out"]),
        "slider": _widget("IntSliderModel", value=5, max=9, description="code"),
        "out": _widget("OutputModel", outputs=[
            {"output_type": "display_data", "metadata": {},
             "data": {"image/png": _png(4, 4), "text/plain": "<Figure>"}},
            {"output_type": "stream", "name": "stdout", "text": "code 5 is used 12 times\n"}]),
        "bar": _widget("HBoxModel", children=["IPY_MODEL_desc", "IPY_MODEL_prog", "IPY_MODEL_stats"]),
        "desc": _widget("HTMLModel", value="training: 100%"),
        "prog": _widget("FloatProgressModel", value=7.0, max=7.0),
        "stats": _widget("HTMLModel", value=" 7/7 [00:01&lt;00:00]"),
    }}}
    return nb


def test_build_site_embeds_every_figure_and_indexes_the_chapters(tmp_path):
    executed = tmp_path / "executed"
    executed.mkdir()
    paths = []
    for name, title in (("00_first", "00 · The first chapter"), ("01_second", "01 · The `second` one")):
        nbformat.write(_executed_chapter(title), executed / f"{name}.ipynb")
        paths.append(executed / f"{name}.ipynb")
    written = site.build_site(paths, tmp_path / "site", log=lambda _: None)
    assert [p.name for p in written] == ["index.html", "00_first.html", "01_second.html"]

    index = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert re.search(r'<a href="00_first.html">00 · The first chapter</a>', index)
    assert '<a href="01_second.html">01 · The second one</a>' in index

    page = (tmp_path / "site" / "00_first.html").read_text(encoding="utf-8")
    images = re.findall(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2, "the plot and the interact's figure, embedded"
    assert {base64.b64decode(i)[:8] for i in images} == {b"\x89PNG\r\n\x1a\n"}
    assert "code <b>5</b>" in page and "code 5 is used 12 times" in page          # the interact, static
    assert '<progress max="7.0" value="7.0"></progress>' in page and "training: 100%" in page  # tqdm, finished
    assert "Button(description=&#x27;never stored&#x27;)" in page or "never stored" in page  # no state: its text
    assert VIEW not in page and STATE not in page and "html-manager" not in page  # no widget JavaScript
    assert 'href="index.html"' in page and 'href="01_second.html"' in page        # navigation
    assert "<title>00 · The first chapter</title>" in page


def test_static_widgets_leaves_plain_outputs_and_drops_the_state():
    nb = _executed_chapter("x")
    site.static_widgets(nb)
    assert "widgets" not in nb.metadata
    assert [o.output_type for o in nb.cells[1].outputs] == ["display_data"]
    kinds = [(o.output_type, sorted(o.get("data", {}))) for o in nb.cells[2].outputs]
    assert kinds == [("display_data", ["text/html"]), ("display_data", ["image/png", "text/plain"]),
                     ("stream", [])]
    assert nb.cells[4].outputs[0].data == {"text/plain": "Button(description='never stored')"}


def test_notebook_title_is_the_first_heading():
    nb = new_notebook(cells=[new_markdown_cell("Intro text\n\n## 02 · **Causal** transformer ##\n# later")])
    assert site.notebook_title(nb, "fallback") == "02 · Causal transformer"
    assert site.notebook_title(new_notebook(cells=[new_code_cell("1")]), "fallback") == "fallback"


def _solution(folder: Path, name: str = "05_x.ipynb", body: str = "print('hi')") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    nbformat.write(new_notebook(cells=[new_markdown_cell("# 05 · X"), new_code_cell(body)]), path)
    return path


def test_build_reuses_current_executed_copies_and_never_runs_them_again(tmp_path, monkeypatch, capsys):
    source = _solution(tmp_path / "solutions")
    copy = nbformat.read(source, as_version=4)
    copy.metadata["ar_course"] = {"source_sha256": site.source_digest(source)}
    (tmp_path / "executed").mkdir()
    nbformat.write(copy, tmp_path / "executed" / source.name)
    assert site.is_current(source, tmp_path / "executed" / source.name)

    def no_execution(*args, **kwargs):
        raise AssertionError("a current copy was executed again")

    monkeypatch.setattr(site, "execute_notebook", no_execution)
    args = ["build", "--solutions", str(tmp_path / "solutions"), "--executed", str(tmp_path / "executed"),
            "--out", str(tmp_path / "site")]
    assert site.main(args) == 0
    assert (tmp_path / "site" / "05_x.html").is_file() and (tmp_path / "site" / "index.html").is_file()

    source.write_text(source.read_text(encoding="utf-8").replace("hi", "changed"))  # another version of the notebook
    assert not site.is_current(source, tmp_path / "executed" / source.name)
    capsys.readouterr()
    want = [f"error: no current executed copy of 05_x.ipynb in {tmp_path / 'executed'} (drop --no-execute)"]
    assert site.main([*args, "--no-execute"]) == 1  # a stale copy is not built from (it was, silently)
    assert capsys.readouterr().err.strip().splitlines() == want
    (tmp_path / "executed" / source.name).unlink()
    assert site.main([*args, "--no-execute"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == want


def _kernel_children() -> set[int]:
    """Pids of this process's children that are Jupyter kernels (Linux /proc; empty elsewhere)."""
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text(encoding="utf-8").splitlines()
            ppid = int(next(line for line in lines if line.startswith("PPid:")).split()[1])
            cmdline = (status.parent / "cmdline").read_bytes()
        except (OSError, StopIteration, ValueError):
            continue
        if ppid == os.getpid() and b"ipykernel" in cmdline:
            found.add(int(status.parent.name))
    return found


@pytest.mark.timeout(600)  # starts two kernels: slow on a busy machine
def test_execute_notebook_keeps_figures_and_names_the_failing_cell(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as CI sets it: the kernel must still draw inline figures
    good = _solution(tmp_path, "good.ipynb", "import matplotlib.pyplot as plt\nplt.plot([0, 1])\nplt.show()")
    out = tmp_path / "executed" / "good.ipynb"
    before = _kernel_children()
    nb = site.execute_notebook(good, out, startup_timeout=300)
    assert _kernel_children() == before, "the notebook's kernel was left running"
    assert [o.output_type for o in nb.cells[1].outputs] == ["display_data"]
    assert "image/png" in nb.cells[1].outputs[0].data
    assert site.is_current(good, out) and nbformat.read(out, as_version=4).cells[1].execution_count == 1

    bad = tmp_path / "bad.ipynb"
    nbformat.write(new_notebook(cells=[new_markdown_cell("# Bad"), new_code_cell("x = 1"),
                                       new_code_cell("print('before')\nraise ValueError('deliberate')"),
                                       new_code_cell("print('never')")]), bad)
    (tmp_path / "executed" / "bad.ipynb").write_text("stale copy")
    with pytest.raises(site.NotebookRunError) as err:
        site.execute_notebook(bad, tmp_path / "executed" / "bad.ipynb", startup_timeout=300)
    assert str(err.value) == f"{bad}: code cell 2 of 3 (cell 2 of the file) raised ValueError: deliberate"
    assert "raise ValueError('deliberate')" in err.value.details and "Traceback" in err.value.details
    assert not (tmp_path / "executed" / "bad.ipynb").exists(), "a failed run leaves no (stale) copy"
    assert _kernel_children() == before, "a failed run's kernel was left running"


def test_lenient_kernels_get_no_strict_checks():
    """Only ``strict_checks=True`` sets strict checks in the kernel's environment; a lenient run must not."""
    assert STRICT_ENV not in site.kernel_environment(strict_checks=False, base={})
    assert site.kernel_environment(strict_checks=True, base={})[STRICT_ENV] == "1"


def test_an_nbval_marker_on_the_third_line_is_read():
    """A ``# NBVAL_SKIP`` marker below a cell's first line still marks the cell to be skipped."""
    nb = new_notebook(cells=[new_code_cell("import time\n\n# NBVAL_SKIP\ntime.sleep(9)")])
    site._apply_nbval_markers(nb)
    assert "skip-execution" in nb.cells[0].metadata["tags"]


def test_site_cli_errors_are_one_line(tmp_path, capsys):
    """Bad arguments (a missing notebook, a bad number, a folder that is no checkout): one line, status 2; a
    failure while working: status 1."""
    assert site.main(["execute", str(tmp_path / "missing.ipynb"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.ipynb'}: no such notebook"
    for bad in ("nan", "-5"):
        with pytest.raises(SystemExit) as exit_:
            site.main(["build", "--cell-timeout", bad])
        assert exit_.value.code == 2
        assert capsys.readouterr().err == (f"error: --cell-timeout must be an integer in [1, 86400], got {bad} "
                                           "(see python -m ar_course.site build --help)\n")
    assert site.main(["figures", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    (tmp_path / "solutions").mkdir()
    assert site.main(["build", "--solutions", str(tmp_path / "solutions"), "--executed", str(tmp_path / "e"),
                      "--out", str(tmp_path / "s")]) == 1
    assert capsys.readouterr().err.strip() == f"error: no notebooks in {tmp_path / 'solutions'}"


def test_make_site_and_ci_use_the_executed_copies():
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^site: .*\n\t\$\(PY\) -m ar_course\.site build", make, re.M)
    assert "tests/run_solutions.py" in make and "--nbval" not in make  # solutions run once, copies kept
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.index("make test") < ci.index("make site")
    assert "/build/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_gallery_copies_every_figure_under_its_section_and_drops_stale_ones(tmp_path):
    nb = _executed_chapter("01 · Vector quantization")
    nb.cells.insert(2, new_markdown_cell("Text\n\n## 2. The **codebook** explorer"))
    executed = tmp_path / "01_vq.ipynb"
    nbformat.write(nb, executed)
    out = tmp_path / "figures"
    (out / "01_vq").mkdir(parents=True)
    (out / "01_vq" / "figure-09.png").write_bytes(b"stale")
    paths = site.write_gallery([executed], out, log=lambda _: None)
    pngs = sorted(p.name for p in (out / "01_vq").iterdir())
    assert pngs == ["figure-01.png", "figure-02.png"]  # the plot and the interact's figure; the stale one gone
    assert (out / "01_vq" / "figure-02.png").read_bytes() == base64.b64decode(_png(4, 4))
    page = (out / "README.md").read_text(encoding="utf-8")
    assert paths[0] == out / "README.md"
    assert page.index("## 01 · Vector quantization") < page.index("](01_vq/figure-01.png)")
    assert page.index("](01_vq/figure-01.png)") < page.index("### 2. The **codebook** explorer")
    assert page.index("### 2. The **codebook** explorer") < page.index("![2. The codebook explorer, figure 2]"
                                                                      "(01_vq/figure-02.png)")


def test_figures_command_needs_current_executed_copies(tmp_path, capsys):
    (tmp_path / "solutions").mkdir()
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    nbformat.write(_executed_chapter("x"), tmp_path / "solutions" / "00_x.ipynb")
    assert site.main(["figures", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: no current executed copy of 00_x.ipynb in {tmp_path / 'build' / 'executed'}: "
                   "run make test first")


def test_the_committed_gallery_shows_every_chapter():
    page = (ROOT / "docs" / "figures" / "README.md").read_text(encoding="utf-8")
    for source in sorted((ROOT / "solutions").glob("*.ipynb")):
        figures = sorted((ROOT / "docs" / "figures" / source.stem).glob("figure-*.png"))
        assert figures, f"no figures of {source.name} in docs/figures (make test && make figures)"
        assert all(f"]({source.stem}/{f.name})" in page for f in figures)


def test_every_image_the_readme_shows_is_in_the_repository():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / "README.md").read_text(encoding="utf-8"))
    assert images, "the README shows no figure"
    missing = [path for path in images if not (ROOT / path).is_file()]
    assert not missing, f"README.md shows images that are not in the repository: {missing}"


def test_links_to_a_sibling_notebook_point_at_its_page(tmp_path):
    """``03_x.ipynb#guidance`` works in JupyterLab; the site has no notebooks, so it links ``03_x.html#guidance``."""
    nb = _executed_chapter("04 · Four")
    nb.cells.insert(1, new_markdown_cell("See [guidance](03_x.ipynb#guidance), [all of 03](03_x.ipynb) and "
                                         "[the paper](https://example.org/a.ipynb)."))
    page = site.render_page(nb, "04 · Four")
    assert 'href="03_x.html#guidance"' in page and 'href="03_x.html"' in page
    assert 'href="https://example.org/a.ipynb"' in page and ".ipynb#" not in page
    assert "03_x.ipynb" in nb.cells[1].source  # the caller's notebook is left as it was


def test_the_first_page_has_no_previous_link():
    """Chapter 00's page links forward only; it does not wrap around "back" to the last chapter."""
    pages = [site.Page(Path(f"{i}.ipynb"), f"{i}.html", f"Chapter {i}") for i in range(3)]
    nav = site._navigation(pages, 0)
    assert "←" not in nav and "2.html" not in nav and "1.html" in nav


@pytest.mark.parametrize("model, value, fmt, shown", [
    ("FloatLogSliderModel", 0.1007035646656845, ".3g", "0.101"),  # chapter 05's draft cost, as JupyterLab shows it
    ("FloatSliderModel", 0.5, ".2f", "0.50"),
    ("IntSliderModel", 5, "d", "5"),
    ("FloatSliderModel", 0.25, ".2~f", "0.25"),  # a d3 spec Python cannot read: the plain value
])
def test_a_static_slider_shows_its_readout_format(model, value, fmt, shown):
    nb = _executed_chapter("x")
    nb.metadata["widgets"][STATE]["state"]["slider"] = _widget(model, value=value, readout_format=fmt,
                                                                description="c")
    site.static_widgets(nb)
    assert f"c <b>{shown}</b>" in str(nb.cells[2].outputs)
