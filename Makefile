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

.PHONY: install run test test-unit test-bench bench readme clean

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
	@# The rest with uv when it can be installed: the same versions as pip resolves (compared on a
	@# 2-core machine: identical `pip freeze`) in 45 s instead of 112 s, most of it byte-compiling
	@# on both cores. pip does it when uv cannot be had or fails.
	$(PIP) install -q uv && $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -c constraints.txt -c $(VENV)/torch-constraint.txt -e '.[dev]' \
		|| $(PIP) install -q -c constraints.txt -c $(VENV)/torch-constraint.txt -e '.[dev]'
	@touch $(STAMP)

run: install
	$(PY) -m app run $(CONFIG)

# The benchmark smoke test (every script in --quick mode, ~12 min on 2 cores) is left out of
# `make test` to keep CI time down; `make test-bench` runs it.
# Two pytest processes at once, tests/ray beside the unit and end-to-end tests (a sequential run
# leaves the 2 cores ~30% idle while Ray tests wait); given a test path in PYTEST_ARGS, one pytest.
test: install
	$(PY) tests/parallel_suites.py -ra --durations=15 -m "not bench" $(PYTEST_ARGS)

test-bench: install
	$(PY) -m pytest -ra -m bench tests/ray/test_bench_quick.py $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -ra tests/unit $(PYTEST_ARGS)

# Runs the quickstart in a scratch folder (an embedded Ray, ~2-3 min) and writes its console and
# wall time into README.md's quickstart block, and the registry `compare` example from its registry.
readme: install
	$(PY) tests/e2e/readme_quickstart.py

clean:
	rm -rf $(VENV) temper_runs .pytest_cache

# `make bench`: every script in benchmarks/ (full mode: tens of minutes on 2 cores; a smoke run of
# a few minutes with `make bench BENCH_ARGS=--quick`), each writing benchmarks/results/<name>.json,
# then benchmarks/RESULTS.md from those files. A failing script does not stop the others; the rule
# fails at the end if any did.
BENCH_ARGS ?=
BENCH_SCRIPTS = $(filter-out benchmarks/report.py,$(sort $(wildcard benchmarks/*.py)))

bench: install
	@status=0; for s in $(BENCH_SCRIPTS); do \
	  echo "[bench] $(PY) $$s $(BENCH_ARGS)"; $(PY) $$s $(BENCH_ARGS) || { echo "[bench] $$s FAILED"; status=1; }; \
	done; $(PY) benchmarks/report.py; exit $$status
