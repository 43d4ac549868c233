# Temper: `make run` (quickstart end to end) and `make test` (the test suite).
# Both create/use a virtualenv in $(VENV), install torch==2.13.0 first when no torch is
# present (a CPU wheel; an unpinned torch would pull gigabytes of CUDA packages), then the
# project with constraints that pin torch to the installed build.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.temper-installed
CONFIG ?= configs/quickstart.yaml
PYTEST_ARGS ?=

.PHONY: install run test test-unit bench clean

install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml constraints.txt | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || { echo "[install] no torch: installing $(TORCH) first"; $(PIP) install -q "$(TORCH)"; }
	@$(PY) -W ignore -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	@echo "[install] pinned $$(cat $(VENV)/torch-constraint.txt)"
	@# DeepSpeed is source-only and imports torch in setup.py: build it against our torch.
	@$(PY) -c "import deepspeed" 2>/dev/null || $(PIP) install -q --no-build-isolation -c constraints.txt -c $(VENV)/torch-constraint.txt "deepspeed>=0.19.8,<0.20"
	$(PIP) install -q -c constraints.txt -c $(VENV)/torch-constraint.txt -e '.[dev]'
	@touch $(STAMP)

run: install
	$(PY) -m app run $(CONFIG)

test: install
	$(PY) -m pytest -ra --durations=15 $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -ra tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) temper_runs .pytest_cache
