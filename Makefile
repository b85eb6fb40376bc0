# The two commands of the README: `make demo` (the main job) and `make test` (what CI runs).
# Both create .venv on first use; torch is pinned in the same pip command (see pyproject.toml).
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo
# Where PyPI's torch is the CUDA build (Linux x86-64) and pip is not configured otherwise:
#   make test CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu   (installs torch==2.13.0+cpu)
CPU_TORCH_INDEX ?=
TORCH := $(if $(CPU_TORCH_INDEX),torch==2.13.0+cpu --extra-index-url $(CPU_TORCH_INDEX),torch==2.13.0)

.PHONY: demo test install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(TORCH) -e '.[cpu,dev]'
	touch $@

demo: install
	$(VENV)/bin/plsynth demo --out $(OUT)

test: install
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q
