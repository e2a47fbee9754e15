# The two commands of the README: `make lab` (learn) and `make test` (the whole suite, what CI runs).
# Both create .venv when missing and install the package with every extra: the library's core (torch, numpy,
# safetensors, tqdm) plus course (Jupyter, plots), kernels (numba), triton and dev (pytest...).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.ar-course-installed
EXTRAS ?= course,kernels,triton,dev
PYTEST_FLAGS ?=

.PHONY: lab test install notebooks bench doctor clean-venv help

help:
	@echo "make lab    - set up .venv (first time only) and open JupyterLab on notebooks/"
	@echo "make test   - set up .venv (first time only) and run the whole test suite"
	@echo "make notebooks - regenerate notebooks/ from solutions/"
	@echo "make bench  - run the benchmarks (writes benchmarks/results/)"
	@echo "make doctor - check this machine"

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

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_FLAGS)
	$(PY) -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 -p no:cacheprovider solutions $(PYTEST_FLAGS)

notebooks: $(STAMP)
	$(PY) -m ar_course.build_notebooks

bench: $(STAMP)
	$(PY) -m ar_course bench

doctor: $(STAMP)
	$(PY) -m ar_course doctor

clean-venv:
	rm -rf $(VENV)
