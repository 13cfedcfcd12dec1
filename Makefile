# Two commands on a fresh machine:  make serve   |   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0
PROFILE ?= monitoring

.PHONY: setup serve stop test test-fast lint proto proto-check k8s-validate loadtest benchmark-cpu clean

setup: $(STAMP)

# The CPU build of torch is installed explicitly first: an unpinned torch pulls a multi-GB CUDA
# build. The pinned wheel lies on this machine class's disk; elsewhere pip fetches the CPU build
# from PyTorch's CPU index.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_CPU) || $(PIP) install -q $(TORCH_CPU) --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

check-java:
	@bash deploy/scripts/check_java.sh

# PROFILE=monitoring (default: batched) | interactive | gpu, see deploy/model-config*.yaml
serve: setup check-java
	PROFILE=$(PROFILE) bash deploy/scripts/serve.sh

proto: setup
	$(PY) proto/generate.py

proto-check: setup
	$(PY) -m pytest -q tests/test_proto_generated.py

# the gateway (by its pid file, logs/gateway.pid), then TorchServe
stop:
	-bash deploy/scripts/serve.sh --stop

test: setup check-java
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not gpu and not slow and not integration" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

# Render every k8s overlay and validate it strictly (built-in kinds + vendored CRD schemas),
# then promtool check/test the alert rules. Needs kubectl; see deploy/scripts/k8s_validate.sh.
k8s-validate: setup
	bash deploy/scripts/k8s_validate.sh

# Load ramp (REST + gRPC, concurrency 1..16, default and monitoring profiles) and the fault
# scenarios, each against a private TorchServe on 127.0.0.1 free ports. Writes runs/load/
# (report.json, table.md, table.txt, load-latency.png, faults/*.json); ~20 min on 2 CPU cores.
# Shorter: make loadtest LOADTEST_ARGS="--concurrency 1,2 --step-seconds 10". See docs/load.md.
loadtest: setup check-java
	$(PY) -m loadtests.run --out runs/load $(LOADTEST_ARGS)
	LVLM_LOAD_FAULTS=1 LVLM_LOAD_OUT=runs/load $(PY) -m pytest -q -s -p no:cacheprovider \
		tests/test_load_faults.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) model_store/*.mar model_store/build logs
