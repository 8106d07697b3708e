# `make test`: create .venv if missing, install the pinned CPU set and the project, run the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test unit bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements-cpu.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -r requirements-cpu.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Everything, integration tests included (they start a local Ray head node, a moto S3 server and an
# MLflow server unless .ci/run already did; each is stopped by its PID).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Unit tests only: seconds, no services.
unit: $(STAMP)
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py

clean-venv:
	rm -rf $(VENV)
