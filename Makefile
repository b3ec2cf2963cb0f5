# Two commands: `make test` and `make demo`. Both create .venv if missing and install into it:
# torch 2.13.0 first (the CPU wheel here; never let a dependency pull a newer CUDA build), then the project.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.twofold-installed

.PHONY: test demo bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m bench.kernels --quick

bench: $(STAMP)
	$(PY) -m bench.kernels --out bench/results/cpu.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
