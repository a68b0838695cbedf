# digits: Kaggle Digit Recognizer with a k-fold ensemble of recurrent networks.
# `make` lists the targets. Every stage skips work whose output is current.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# Inside a Kaggle notebook (Kaggle sets KAGGLE_KERNEL_RUN_TYPE; /kaggle/input exists; KAGGLE_ROOT
# moves /kaggle, for tests) the notebook's own Python and its PyTorch run everything: no virtual
# environment, and set-up only checks what is there (installing what is missing when online).
ifneq ($(KAGGLE_KERNEL_RUN_TYPE)$(wildcard $(or $(KAGGLE_ROOT),/kaggle)/input),)
PY := $(PYTHON)
SETUP ?= notebook-setup
else
PY := $(VENV)/bin/python
endif
# The PyTorch release the project is tested with; on Linux, PyPI's build includes CUDA.
TORCH ?= torch==2.13.0

# Options count only when given on make's command line (`make train EPOCHS=5`), in ARGS or in a
# CONFIG file: a variable a shell exports under an option's name (SEED, MODEL, DEVICE...) changes
# nothing. Each option given travels to the stage CLI as DIGITS_OPT_<NAME>, holding the text as
# typed ($(value ...): Make expands no `$` in it), and `--make` names the options given.
# Settings are declared once, in pipeline/config.py, the other options in pipeline/options.py;
# `make help`, the command line and the README's option tables all come from there.
OPTION_NAMES := $(shell $(PYTHON) -m pipeline.options --make-names)
ifeq ($(OPTION_NAMES),)  # else every option given would be dropped without a word
$(error cannot read the option names with PYTHON=$(PYTHON) (its words are above); name a Python 3.11 or newer: `make ... PYTHON=python3.11`)
endif
given = $(filter command line,$(origin $(1)))
GIVEN := $(strip $(foreach v,$(OPTION_NAMES),$(if $(call given,$(v)),$(v))))
$(foreach v,$(GIVEN),$(eval export DIGITS_OPT_$(v) := $$(value $(v))))
PIPELINE = $(PY) -m pipeline --make "$(GIVEN)"
ARGS := $(if $(call given,ARGS),$(ARGS))

.PHONY: help setup notebook-setup submit download prepare folds train predict distill blend tune \
	tune-status upload lb kaggle-run quota report runs forget test \
	test-fast lint bench bench-accuracy gpu-check clean

help: ## list the targets, the settings and the other options (and the stages that take each)
	@echo "usage: make <target> [OPTION=value ...]"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-zA-Z_-]*:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@$(PYTHON) -m pipeline.options

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

# SETUP= (empty) skips the virtual environment, e.g. `make submit SETUP= PY=python3` on a machine
# whose Python already has the dependencies.
SETUP ?= $(VENV)/.installed
setup: $(SETUP) ## create .venv and install the project (in a Kaggle notebook: check its Python)

notebook-setup:
	@$(PY) -m pipeline.kaggle.notebook

submit: setup ## every stage: download -> prepare -> folds -> train -> predict (each skipped if current)
	$(PIPELINE) submit $(ARGS)

download: setup ## put train.csv and test.csv in input/ (from Kaggle, a folder or the built-in sample)
	$(PIPELINE) download $(ARGS)

prepare: setup ## validate the CSVs and cache them as uint8 arrays in input/prepared/
	$(PIPELINE) prepare $(ARGS)

folds: setup ## write the stratified folds to input/folds.csv
	$(PIPELINE) folds $(ARGS)

train: setup ## train the run of these settings in runs/<id>/; resumes
	$(PIPELINE) train $(ARGS)

predict: setup ## the run's test predictions -> submissions/submission.csv
	$(PIPELINE) predict $(ARGS)

distill: setup ## a run that also learns from the test rows labelled by a teacher run or blend
	$(PIPELINE) distill $(ARGS)

blend: setup ## blend completed runs on their out-of-fold predictions
	$(PIPELINE) blend $(ARGS)

tune: setup ## search settings with Optuna; every trial is a run
	$(PIPELINE) tune $(ARGS)

tune-status: setup ## a study's trials so far and the best five
	@$(PIPELINE) tune-status $(ARGS)

upload: setup ## send submissions/submission.csv to Kaggle and wait for its score
	$(PIPELINE) upload $(ARGS)

lb: setup ## the competition's submissions: date, status, public score, the run that made each
	@$(PIPELINE) lb $(ARGS)

kaggle-run: setup ## train the run of these settings on a Kaggle GPU, then bring it home to runs/<id>/
	$(PIPELINE) kaggle-run $(ARGS)

quota: setup ## Kaggle's GPU hours: used, allowed, left and when they refresh
	@$(PIPELINE) quota $(ARGS)

report: setup ## draw a run (the latest by default) or a study into reports/
	$(PIPELINE) report $(ARGS)

runs: setup ## every run side by side
	@$(PIPELINE) runs $(ARGS)

forget: setup ## delete one run's folder, nothing else
	$(PIPELINE) forget $(ARGS)

# The suite runs in one test process per core it may use, plus one, when pytest-xdist is there
# (each process uses one thread, and many tests spend seconds waiting on a child process, a server
# or a timeout: on 2 cores, 3 processes took 148 s where 2 took 161); a process that runs out of tests
# takes some of another's (worksteal: 122-128 s -> 117-120 s with the slow tests sorted first);
# TEST_WORKERS=0 runs it in one process, as does a Python without pytest-xdist.
CORES = import os; print(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
TEST_WORKERS ?= $$(( $$($(PY) -c '$(CORES)') + 1 ))
XDIST = $$($(PY) -c "import xdist" 2>/dev/null && echo "-n $(TEST_WORKERS) --dist worksteal")
test: setup ## run the whole test suite (no network, no GPU needed)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup ## every test but the end-to-end runs (marked slow)
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

bench: setup ## speed of every stage beside its baseline (BENCH_ARGS="--e2e" adds a full-size submit)
	$(PY) benchmarks/speed.py $(BENCH_ARGS)

bench-accuracy: setup ## k-fold CV of recipes on the same folds, and their blend (TRAIN=, TEST=, SCREEN=1)
	$(PY) benchmarks/accuracy.py $(if $(call given,TRAIN),--train "$(TRAIN)") \
		$(if $(call given,TEST),--test "$(TEST)") $(if $(filter 1,$(SCREEN)),--screen) $(BENCH_ARGS)

gpu-check: ## GPU checks and benchmarks in one command (OUT=folder, TRAIN=real train.csv, FULL_TRAIN=, FULL_TEST=)
	bash benchmarks/gpu_check.sh $(or $(OUT),bench-results/gpu) $(if $(call given,TRAIN),"$(TRAIN)")

lint: setup ## ruff, mypy (types) and vulture (dead code; benchmarks/vulture_allow.py lists what only looks unused)
	$(PY) -m ruff check pipeline tests benchmarks
	$(PY) -m mypy pipeline
	$(PY) -m vulture pipeline benchmarks --min-confidence 60

clean: ## delete the prepared cache, the folds and the report (keeps input CSVs, runs and submissions)
	rm -rf input/prepared input/folds.csv input/folds.json reports
