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
# What the rules below run (and the Ray workers and CLI runs they start) writes the bytecode of
# what it imports, even where the environment asks Python not to (PYTHONDONTWRITEBYTECODE): the
# install compiles nothing, and hundreds of worker processes would otherwise each compile torch
# and Ray again.
RUNPY  := env -u PYTHONDONTWRITEBYTECODE $(PY)

.PHONY: install run test test-unit test-bench bench readme clean

install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Installs write no bytecode (`--no-compile`, uv without `--compile-bytecode`): compiling every
# module of torch, Ray, transformers and the rest took ~80 of the ~117 s of a fresh install on 2
# cores, and a process compiles only what it imports, once, when it may write `__pycache__`
# (the rules below make sure it may). Measured on a fresh venv: 37 s to install; the imports
# of a test session's whole set compile in ~22 CPU-s the first time.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || { echo "[install] no torch: installing $(TORCH) first"; $(PIP) install -q --no-compile "$(TORCH)"; }
	@$(PY) -W ignore -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	@echo "[install] pinned $$(cat $(VENV)/torch-constraint.txt)"
	@# DeepSpeed is source-only and imports torch in setup.py: build it against our torch.
	@$(PY) -c "import deepspeed" 2>/dev/null || $(PIP) install -q --no-compile --no-build-isolation -c constraints.txt -c $(VENV)/torch-constraint.txt "deepspeed>=0.19.8,<0.20"
	@# The rest with uv when it can be installed: the same versions as pip resolves (compared on a
	@# 2-core machine: identical `pip freeze`), in seconds. pip does it when uv cannot be had or fails.
	$(PIP) install -q --no-compile uv && $(VENV)/bin/uv pip install -q --python $(PY) -c constraints.txt -c $(VENV)/torch-constraint.txt -e '.[dev]' \
		|| $(PIP) install -q --no-compile -c constraints.txt -c $(VENV)/torch-constraint.txt -e '.[dev]'
	@touch $(STAMP)

run: install
	$(RUNPY) -m app run $(CONFIG)

# The benchmark smoke test (every script in --quick mode, ~12 min on 2 cores) is left out of
# `make test` to keep CI time down; `make test-bench` runs it.
# Two pytest processes at once, tests/ray beside the unit and end-to-end tests (a sequential run
# leaves the 2 cores ~30% idle while Ray tests wait); given a test path in PYTEST_ARGS, one pytest.
test: install
	$(RUNPY) tests/parallel_suites.py -ra --durations=15 -m "not bench" $(PYTEST_ARGS)

test-bench: install
	$(RUNPY) -m pytest -ra -m bench tests/ray/test_bench_quick.py $(PYTEST_ARGS)

test-unit: install
	$(RUNPY) -m pytest -ra tests/unit $(PYTEST_ARGS)

# Runs the quickstart in a scratch folder (an embedded Ray, ~2-3 min) and writes its console and
# wall time into README.md's quickstart block, and the registry `compare` example from its registry.
readme: install
	$(RUNPY) tests/e2e/readme_quickstart.py

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
	  echo "[bench] $(RUNPY) $$s $(BENCH_ARGS)"; $(RUNPY) $$s $(BENCH_ARGS) || { echo "[bench] $$s FAILED"; status=1; }; \
	done; $(RUNPY) benchmarks/report.py; exit $$status
