"""JupyterLab in a real browser: Run All on a notebook as a learner does, then look at what the page shows.

A JupyterLab server of this Python (localhost, a free port, a random token, fresh settings and workspaces)
is driven by headless Chromium through selenium. For each notebook under test: every code cell ran (numbered
prompts == code cells), no output holds a traceback, figures rendered; in the widget notebook an
ipywidgets slider answers key presses and its figure follows. Screenshots go to ``tests/artifacts/browser/``
(ignored by git). A notebook with an error cell must fail the same checks (the test can fail).

Needs Chromium and chromedriver on PATH (Debian: ``apt-get install chromium chromium-driver``; ``.ci/run``
installs them when it runs as root, ``make browser-deps`` with sudo) and selenium (the ``dev`` extra);
without them the tests are skipped with the reason. Nothing is downloaded at run time: selenium is handed
the driver's path, so its driver manager never runs. The notebooks run from a temporary copy, so the
browser never saves into the checkout. The kernel is this Python with this checkout first on its path and
checks lenient (``AR_COURSE_STRICT_CHECKS=0``), as in a learner's ``make lab``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import nbformat
import pytest


ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = ("install chromium and chromium-driver (apt) to run the browser test: "
                "sudo apt-get install chromium chromium-driver, or sudo make browser-deps")
SERVER_START_S = 180
PAGE_READY_S = 240
RUN_ALL_S = 600
WIDGET_S = 120

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@dataclass(frozen=True)
class Case:
    """A notebook to Run All in the browser; ``widget``: also drive the ``interact`` slider with that
    description (the notebook may hold other interacts: the one to drive is found by its label)."""

    path: str
    widget: str | None = None

    @property
    def stem(self) -> str:
        return Path(self.path).stem


CASES = [
    # the learner notebook as shipped: Run All must go through, unattempted exercises printing one line each
    Case("notebooks/00_tour.ipynb"),
    # a widget notebook: the code explorer's slider ("code"; the chapter also has a codebook-size slider "K")
    Case("solutions/01_vector_quantization.ipynb", widget="code"),
]


# ------------------------------------------------------------------------------------------ prerequisites

def _tools() -> tuple[str, str]:
    """(browser, driver) paths, or skip with the reason."""
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if p is None)
        pytest.skip(f"{missing} not found on PATH; {INSTALL_HINT}")
    return browser, driver


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- server

@dataclass
class Lab:
    """A running JupyterLab: where it is, its token and the folder it serves."""

    base: str
    token: str
    root: Path
    log: Path

    def api(self, method: str, path: str) -> Any:
        req = urllib.request.Request(f"{self.base}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        for kernel in self.api("GET", "/api/kernels"):
            self.api("DELETE", f"/api/kernels/{kernel['id']}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def _kernel_shim(jupyter_path: Path, name: str) -> None:
    """A kernelspec ``name`` that starts this Python's ipykernel, first on JUPYTER_PATH: the notebooks' kernel
    is then this environment whatever kernels the machine has registered (``python3`` or another name)."""
    _write_json(jupyter_path / "kernels" / name / "kernel.json", {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({name})", "language": "python"})


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """JupyterLab of this Python on 127.0.0.1 serving a temporary copy of the notebooks under test."""
    _tools()
    pytest.importorskip("selenium", reason="selenium is not installed; pip install -e '.[dev]' (the dev extra)")
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    for case in CASES:
        (root / case.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / case.path, root / case.path)
    settings, workspaces, jupyter_path = tmp / "settings", tmp / "workspaces", tmp / "jupyter-path"
    workspaces.mkdir()
    # all cells rendered at once (no gradual loading), no news pop-up, no update check, no autosave
    _write_json(settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings",
                {"windowingMode": "none"})
    _write_json(settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False})
    _write_json(settings / "@jupyterlab" / "docmanager-extension" / "plugin.jupyterlab-settings",
                {"autosave": False})
    for case in CASES:
        _kernel_shim(jupyter_path, nbformat.read(ROOT / case.path, as_version=4).metadata
                     .get("kernelspec", {}).get("name", "python3"))
    _kernel_shim(jupyter_path, "python3")
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "PYTHONPATH", "JUPYTER_CONFIG_PATH")}
    env.update(
        AR_COURSE_STRICT_CHECKS="0",  # a learner's session: checks print their line, Run All goes on
        PYTHONPATH=str(ROOT),  # the kernel imports this checkout's ar_course (and nothing else is added)
        JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(workspaces),
        JUPYTER_PATH=str(jupyter_path), JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTER_DATA_DIR=str(tmp / "data"),
        JUPYTER_PREFER_ENV_PATH="1", PYTHONUNBUFFERED="1")
    port, token = _free_port(), uuid.uuid4().hex
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = tmp / "jupyterlab.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Lab(f"http://127.0.0.1:{port}", token, root, log)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with status {proc.returncode} before it was ready:\n"
                            f"{server.log_tail()}")
            try:
                server.api("GET", "/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s:\n{server.log_tail()}")
                time.sleep(0.5)
        yield server
    finally:
        try:
            if proc.poll() is None:
                server.shutdown_kernels()
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def driver(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium through the system's chromedriver (selenium's driver manager is never used)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = _tools()
    tmp = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", f"--user-data-dir={tmp / 'profile'}"):
        options.add_argument(arg)
    service = Service(executable_path=chromedriver, log_output=str(tmp / "chromedriver.log"))
    drv = webdriver.Chrome(service=service, options=options)
    drv.set_page_load_timeout(PAGE_READY_S)
    try:
        yield drv
    finally:
        drv.quit()


# ------------------------------------------------------------------------------------------ the page

PANEL = "document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)')"

STATE_JS = f"""
const p = {PANEL};
if (!p) return null;
const prompts = [...p.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim());
const outputs = [...p.querySelectorAll('.jp-OutputArea-output')];
const kernel = p.querySelector('.jp-KernelName');
const status = p.querySelector('.jp-Notebook-ExecutionIndicator');
return {{
  codeCells: p.querySelectorAll('.jp-CodeCell').length,
  numbered: prompts.filter(t => /\\[\\d+\\]/.test(t)).length,
  running: prompts.filter(t => t.includes('*')).length,
  firstUnrun: prompts.findIndex(t => !/\\[\\d+\\]/.test(t)),
  status: status ? status.getAttribute('data-status') : null,
  kernel: kernel ? kernel.textContent.trim() : null,
  tracebacks: outputs.filter(e => e.getAttribute('data-mime-type') === 'application/vnd.jupyter.stderr'
                                  && e.textContent.includes('Traceback')).map(e => e.textContent.slice(0, 1500)),
  images: [...p.querySelectorAll('.jp-OutputArea-output img')].filter(i => i.complete && i.naturalWidth > 0).length,
  dialog: document.querySelector('.jp-Dialog') ? document.querySelector('.jp-Dialog').textContent.slice(0, 300) : null,
}};
"""


def _wait(what: str, timeout: float, probe: Callable[[], Any], describe: Callable[[], str] = lambda: "") -> Any:
    """Poll ``probe`` (every 0.5 s) until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}. {describe()}")
        time.sleep(0.5)


def _state(drv: Any) -> dict[str, Any]:
    return drv.execute_script(STATE_JS) or {}


def _screenshot(drv: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    drv.save_screenshot(str(path))
    return path


def open_notebook(drv: Any, lab: Lab, rel: str, code_cells: int) -> None:
    """Open ``rel`` in a fresh workspace and wait until its kernel is ready and every code cell is on the page
    ("idle" alone also shows while the page is still loading)."""
    workspace = uuid.uuid4().hex[:8]
    drv.get(f"{lab.base}/lab/workspaces/{workspace}/tree/{rel}?reset&token={lab.token}")

    def ready() -> bool:
        s = _state(drv)
        if s.get("dialog"):
            pytest.fail(f"JupyterLab showed a dialog while opening {rel}: {s['dialog']}")
        return (s.get("status") == "idle" and s.get("kernel") not in (None, "", "No Kernel")
                and s.get("codeCells") == code_cells)

    _wait(f"{rel} to open with its kernel idle", PAGE_READY_S, ready,
          lambda: f"page state: {_state(drv)}; server log:\n{lab.log_tail(1500)}")


def run_all(drv: Any, rel: str, timeout: float = RUN_ALL_S) -> dict[str, Any]:
    """Run > Run All Cells from the menu bar, as a learner does; wait until the kernel is idle with no cell
    running or queued (three polls in a row); return the page state."""
    from selenium.webdriver.common.by import By

    before = _state(drv)
    menu = _wait("the Run menu", 60, lambda: next(
        (e for e in drv.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if e.text.strip() == "Run"), None))
    menu.click()
    item = _wait("Run All Cells in the Run menu", 60, lambda: next(
        iter(drv.find_elements(By.CSS_SELECTOR, '.lm-Menu-item[data-command="runmenu:run-all"]')), None))
    item.click()
    started = {"seen": False}
    settled = {"polls": 0}

    def done() -> dict[str, Any] | None:
        s = _state(drv)
        if s.get("running") or s.get("status") != "idle" or s.get("numbered", 0) > before.get("numbered", 0):
            started["seen"] = True
        quiet = started["seen"] and not s.get("running") and s.get("status") == "idle"
        settled["polls"] = settled["polls"] + 1 if quiet else 0
        return s if settled["polls"] >= 3 else None

    return _wait(f"Run All of {rel} to finish", timeout, done, lambda: f"page state: {_state(drv)}")


def problems(state: dict[str, Any], source: nbformat.NotebookNode) -> list[str]:
    """What is wrong with a page after Run All (empty when every cell ran cleanly and drew its figures)."""
    code = [c for c in source.cells if c.cell_type == "code"]
    found = []
    if state.get("numbered") != len(code):
        first = state.get("firstUnrun", -1)
        where = (f"; first code cell without a result: #{first + 1}: "
                 f"{code[first].source.splitlines()[0] if code[first].source else ''!r}") if 0 <= first < len(code) else ""
        found.append(f"{state.get('numbered')} of {len(code)} code cells ran{where}")
    for tb in state.get("tracebacks", []):
        found.append(f"an output shows a traceback:\n{tb}")
    if not state.get("images"):
        found.append("no figure (img with naturalWidth > 0) rendered")
    return found


# ------------------------------------------------------------------------------------------------ tests

@pytest.mark.timeout(1200)
@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_run_all_in_jupyterlab(lab: Lab, driver: Any, case: Case) -> None:
    source = nbformat.read(lab.root / case.path, as_version=4)
    code_cells = sum(c.cell_type == "code" for c in source.cells)
    for old in ARTIFACTS.glob(f"{case.stem}-*.png"):
        old.unlink()
    try:
        open_notebook(driver, lab, case.path, code_cells)
        start = time.monotonic()
        state = run_all(driver, case.path)
        seconds = time.monotonic() - start
        found = problems(state, source)
        if not found:
            _scroll_to(driver, "img")
            _screenshot(driver, f"{case.stem}-run-all")
        assert not found, f"{case.path} after Run All ({seconds:.0f} s):\n" + "\n".join(found)
        if case.widget:
            _drive_slider(driver, case)
    except BaseException:
        _scroll_to_traceback(driver)
        _screenshot(driver, f"{case.stem}-failure")
        raise
    finally:
        lab.shutdown_kernels()


def _scroll_to(drv: Any, selector: str) -> None:
    """Scroll the first element of the visible notebook matching ``selector`` to the middle of the window."""
    drv.execute_script(f"const p = {PANEL}; const e = p && p.querySelector(arguments[0]);"
                       "if (e) e.scrollIntoView({block: 'center'});", selector)


def _scroll_to_traceback(drv: Any) -> None:
    """Bring the first output showing a traceback (if any) into view, for the failure screenshot."""
    drv.execute_script(
        f"const p = {PANEL}; if (!p) return; const e = [...p.querySelectorAll('.jp-OutputArea-output')]"
        ".find(o => o.textContent.includes('Traceback')); if (e) e.scrollIntoView({block: 'center'});")


WIDGET_JS = f"""
const box = [...{PANEL}.querySelectorAll('.widget-interact')].find(
    b => [...b.querySelectorAll('.widget-label')].some(l => l.textContent.trim() === arguments[0]));
if (!box) return null;
const readout = box.querySelector('.widget-readout');
const img = box.querySelector('img');
return {{slider: !!box.querySelector('.widget-slider'), readout: readout ? readout.textContent.trim() : null,
         src: img && img.complete && img.naturalWidth > 0 ? img.src : null}};
"""

HANDLE_JS = f"""
const box = [...{PANEL}.querySelectorAll('.widget-interact')].find(
    b => [...b.querySelectorAll('.widget-label')].some(l => l.textContent.trim() === arguments[0]));
return box ? box.querySelector('.noUi-handle') : null;
"""


def _drive_slider(drv: Any, case: Case, presses: int = 3) -> None:
    """The slider of the interact labelled ``case.widget``: click its handle, press ArrowRight ``presses``
    times; the readout must move by that much (or stop at the end) and the figure must be redrawn."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    before = _wait("the interact widget with a slider and a figure", WIDGET_S,
                   lambda: (lambda w: w if w and w["slider"] and w["readout"] and w["src"] else None)(
                       drv.execute_script(WIDGET_JS, case.widget)),
                   lambda: f"widget state: {drv.execute_script(WIDGET_JS, case.widget)}")
    handle = drv.execute_script(HANDLE_JS, case.widget)
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
    _screenshot(drv, f"{case.stem}-slider-before")
    top = int(float(handle.get_attribute("aria-valuemax") or 1e9))
    start = int(before["readout"])
    expected = min(start + presses, top)
    assert expected != start, f"the slider already sits at its maximum {top}"
    ActionChains(drv).click(handle).perform()
    for _ in range(presses):
        ActionChains(drv).send_keys(Keys.ARROW_RIGHT).perform()
        time.sleep(0.3)
    after = _wait(f"the readout to read {expected} and the figure to change", WIDGET_S,
                  lambda: (lambda w: w if w and w["readout"] == str(expected) and w["src"]
                           and w["src"] != before["src"] else None)(drv.execute_script(WIDGET_JS, case.widget)),
                  lambda: f"before: readout {before['readout']}; now: {drv.execute_script(WIDGET_JS, case.widget)}")
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
    _screenshot(drv, f"{case.stem}-slider-after")
    assert after["readout"] == str(expected) and after["src"] != before["src"]
    state = _state(drv)
    assert not state.get("tracebacks"), "moving the slider raised:\n" + "\n".join(state["tracebacks"])


@pytest.mark.timeout(600)
def test_an_error_cell_fails_the_checks(lab: Lab, driver: Any) -> None:
    """The checks above can fail: a notebook whose second cell raises stops there, shows the traceback, and
    :func:`problems` reports both."""
    rel = "failing/raises.ipynb"
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([0, 1]); plt.show()"),
        nbformat.v4.new_code_cell("raise ValueError('deliberate error for the browser test')"),
        nbformat.v4.new_code_cell("print('never reached')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (lab.root / rel).parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, lab.root / rel)
    try:
        open_notebook(driver, lab, rel, 3)
        state = run_all(driver, rel, timeout=300)
        _scroll_to_traceback(driver)
        _screenshot(driver, "error-cell-detected")
        found = problems(state, nb)
        assert any("2 of 3 code cells ran" in f and "first code cell without a result: #3" in f for f in found), found
        assert any("ValueError" in f and "deliberate error" in f for f in found), found
        assert state.get("images") == 1
    finally:
        lab.shutdown_kernels()
