# The two commands of the README: `make lab` (learn) and `make test` (the whole suite, what CI runs).
# Both create .venv when missing and install the package with every extra: the library's core (torch, numpy,
# safetensors, tqdm) plus course (Jupyter, plots), kernels (numba), triton and dev (pytest...).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.ar-course-installed
EXTRAS ?= course,kernels,triton,serve,dev
PYTEST_FLAGS ?=
# test processes (pytest-xdist): CI has 2 cores; TEST_JOBS=0 runs everything in one process, auto uses every core
TEST_JOBS ?= 2

.PHONY: lab test site figures browser-deps install notebooks bench gpu-report doctor clean-venv help

help:
	@echo "make lab    - set up .venv (first time only) and open JupyterLab on notebooks/"
	@echo "make test   - set up .venv (first time only) and run the whole test suite"
	@echo "make site   - build the course as static HTML with every figure (build/site/index.html)"
	@echo "make figures - copy every figure of the executed solutions to docs/figures/ (after make test)"
	@echo "make browser-deps - install Chromium + chromedriver for the browser test (Debian/Ubuntu, as root)"
	@echo "make notebooks - regenerate notebooks/ from solutions/"
	@echo "make bench  - run the benchmarks (writes benchmarks/results/)"
	@echo "make gpu-report - on a CUDA machine, from a plain checkout: GPU tests, kernels, system (<= 5 min)"
	@echo "make doctor - check this machine"
	@echo "make install - set up .venv only (torch for this machine, the package with every extra)"
	@echo "make clean-venv - delete .venv (the next make sets it up again)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, chosen for this machine: with an NVIDIA GPU the default (CUDA) build; without one a CPU
# build, taken from a local wheel when pip's configuration provides one, else from PyTorch's CPU index on
# Linux (PyPI's Linux wheel is the multi-GB CUDA build), else PyPI (macOS/Windows wheels are CPU builds).
$(STAMP): pyproject.toml | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	elif $(PIP) install --quiet --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null; then \
		echo "using a local CPU build of torch $(TORCH_VERSION)"; $(PIP) install --quiet "torch==$(TORCH_VERSION)"; \
	elif [ "$$(uname -s)" = "Linux" ]; then \
		$(PIP) install "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu \
			--extra-index-url https://pypi.org/simple; \
	else \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	fi
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP)

# The venv's own JupyterLab: the notebooks' default python3 kernel is then the venv's Python (no kernel to
# register; JUPYTER_PREFER_ENV_PATH puts the venv's kernels before any in the user's home).
# Localhost only, with JupyterLab's token (from another machine: an SSH tunnel, see the README).
lab: $(STAMP)
	JUPYTER_PREFER_ENV_PATH=1 $(VENV)/bin/jupyter lab notebooks/ --ServerApp.ip=127.0.0.1 \
		$$( [ "$$(id -u)" = 0 ] && echo --allow-root )

# The unit tests (with the browser test, skipped with its reason when Chromium is missing), then every solution
# notebook top to bottom (any cell's error fails; 1800 s per cell), keeping the executed copies in build/executed/
# for `make site`.
test: $(STAMP)
	$(PY) -m pytest tests -n $(TEST_JOBS) --dist worksteal $(PYTEST_FLAGS)
	$(PY) -m pytest -p no:cacheprovider tests/run_solutions.py -n $(TEST_JOBS) --dist worksteal $(PYTEST_FLAGS)

# Static HTML course from the executed solutions (build/site/index.html): reuses build/executed/ from
# `make test` and runs only a notebook whose executed copy is missing or was made from another version of it.
site: $(STAMP)
	$(PY) -m ar_course.site build

# Every figure of the executed solutions into docs/figures/ (committed, so a repository browser shows them).
figures: $(STAMP)
	$(PY) -m ar_course.site figures

# Debian's Chromium and chromedriver for tests/test_browser.py (needs root; nothing is downloaded at test time).
browser-deps:
	@if command -v chromedriver >/dev/null 2>&1 && { command -v chromium >/dev/null 2>&1 || \
			command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; }; then \
		echo "Chromium and chromedriver are installed"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "no apt-get here: install Chromium and chromedriver with your package manager"; exit 1; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "needs root: sudo make browser-deps (or sudo apt-get install chromium chromium-driver)"; exit 1; \
	else \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

notebooks: $(STAMP)
	$(PY) -m ar_course.build_notebooks

bench: $(STAMP)
	$(PY) -m ar_course bench

# No venv and no install: the machine's own torch / triton / numba, the checkout on PYTHONPATH (a GPU machine's
# Python may lack pip). Writes benchmarks/results/gpu.json and gpu.png; `--table` prints the README's GPU table.
gpu-report:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) benchmarks/gpu_report.py

doctor: $(STAMP)
	$(PY) -m ar_course doctor

clean-venv:
	rm -rf $(VENV)
