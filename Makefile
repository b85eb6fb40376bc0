# The two commands of the README: `make demo` (the main job) and `make test` (what CI runs).
# Both create .venv on first use; torch is pinned in the same pip command (see pyproject.toml).
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: demo test install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[cpu,dev]'
	touch $@

demo: install
	$(VENV)/bin/plsynth demo --out $(OUT)

test: install
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q
