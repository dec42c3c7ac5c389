# Two commands for a fresh clone: `make demo` and `make test`.
# Both create (or reuse) .venv in the repository and install what they need, idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo test venv clean

venv: $(STAMP)

# torch first, from its exact pin, so nothing later resolves a (multi-GB) CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=25"
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/internray demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .cache
