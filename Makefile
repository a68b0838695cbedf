# digits: Kaggle Digit Recognizer with a k-fold ensemble of recurrent networks.
# `make` lists the targets. Every stage skips work whose output is current.

SHELL := /bin/bash
.DEFAULT_GOAL := help
# The upload message travels in the environment, so no quote or $ in it can break the command.
export MESSAGE

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch release the project is tested with; on Linux, PyPI's build includes CUDA.
TORCH ?= torch==2.13.0

# Options for the stage CLIs, passed only when set (e.g. `make submit EPOCHS=5 MODEL=gru`).
opt = $(if $($(1)),--$(2) "$($(1))")
flag = $(if $($(1)),$(if $(filter 0 no false,$($(1))),--no-$(2),--$(2)))
CONFIG_ARGS = $(call opt,PRESET,preset) $(call opt,CONFIG,config) $(call opt,MODEL,model) \
	$(call opt,EPOCHS,epochs) $(call opt,FOLDS,folds) $(call opt,HIDDEN,hidden) \
	$(call opt,LAYERS,layers) $(call opt,BATCH,batch) $(call opt,LR,lr) $(call opt,SEED,seed) \
	$(call opt,DEVICE,device) $(call opt,TTA,tta) $(call opt,JOBS,jobs) \
	$(call opt,DROPOUT,dropout) $(call flag,BIDIRECTIONAL,bidirectional) \
	$(call flag,AUGMENT,augment) $(call flag,AMP,amp) $(call flag,CUDA_GRAPH,cuda-graph) $(ARGS)
SOURCE_ARGS = $(call opt,SOURCE,source) $(call opt,DIR,dir) $(call opt,TIMEOUT,timeout)
FORCE_ARG = $(if $(filter 1 yes true,$(FORCE)),--force)
RUN = $(PY) -m pipeline

.PHONY: help setup submit download prepare folds train predict upload report runs test lint \
	bench bench-accuracy gpu-check clean

help: ## list the targets and the options they take
	@echo "usage: make <target> [OPTION=value ...]"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-zA-Z_-]*:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "options: MODEL=rnn|gru|lstm EPOCHS FOLDS HIDDEN LAYERS BATCH LR SEED DEVICE=auto|cpu|cuda"
	@echo "         BIDIRECTIONAL=1 DROPOUT TTA JOBS AUGMENT=0 AMP=1 CUDA_GRAPH=0 PRESET=tutorial"
	@echo "         CONFIG=file.toml FOLD=k"
	@echo "         SOURCE=auto|kaggle|dir|sample DIR=path FORCE=1 TIMEOUT=s MESSAGE=\"...\""
	@echo "         ARGS=\"--any --stage-option\"   (see: .venv/bin/python -m pipeline <stage> --help)"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

# SETUP= (empty) skips the virtual environment, e.g. `make submit SETUP= PY=python3` on a machine
# whose Python already has the dependencies.
SETUP ?= $(VENV)/.installed
setup: $(SETUP) ## create .venv and install the project (done on first use of any target)

submit: setup ## every stage: download -> prepare -> folds -> train -> predict
	$(RUN) submit $(SOURCE_ARGS) $(FORCE_ARG) $(CONFIG_ARGS)

download: setup ## put train.csv/test.csv in input/ (SOURCE=auto|kaggle|dir|sample, FORCE=1)
	$(RUN) download $(SOURCE_ARGS) $(FORCE_ARG)

prepare: setup ## validate the CSVs and cache them as uint8 arrays in input/prepared/
	$(RUN) prepare $(FORCE_ARG)

folds: setup ## write the stratified folds to input/folds.csv (FOLDS, SEED)
	$(RUN) folds $(CONFIG_ARGS)

train: setup ## train every fold, or one with FOLD=k (FORCE=1: even if current); resumes
	$(RUN) train $(call opt,FOLD,fold) $(FORCE_ARG) $(CONFIG_ARGS)

predict: setup ## ensemble the fold models into submissions/submission.csv (TTA=n)
	$(RUN) predict $(FORCE_ARG) $(CONFIG_ARGS)

upload: setup ## send submissions/submission.csv to Kaggle (MESSAGE="...")
	$(RUN) upload $(call opt,TIMEOUT,timeout)

report: setup ## draw the latest run into reports/index.html (curves, confusion matrix, mistakes)
	$(RUN) report

runs: setup ## list every finished run, newest first, with its settings, OOF accuracy and submission
	$(RUN) runs

test: setup ## run the test suite (no network, no GPU needed)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup ## speed of every stage beside its baseline (BENCH_ARGS="--e2e" adds a full-size submit)
	$(PY) benchmarks/speed.py $(BENCH_ARGS)

bench-accuracy: setup ## k-fold CV: tutorial recipe vs default RNN vs GRU (TRAIN=path/to/train.csv)
	$(PY) benchmarks/accuracy.py $(call opt,TRAIN,train) $(BENCH_ARGS)

gpu-check: ## GPU checks and benchmarks in one command (OUT=folder, TRAIN=real train.csv)
	bash benchmarks/gpu_check.sh $(or $(OUT),bench-results/gpu) $(TRAIN)

lint: setup ## ruff
	$(PY) -m ruff check pipeline tests benchmarks

clean: ## delete prepared data, models, logs and predictions (keeps input CSVs and submissions)
	rm -rf input/prepared input/folds.csv input/folds.json reports
	find models logs preds -type f ! -name .gitkeep -delete
