# VisionCare — `make help` lists the targets. `make train` and `make test` set up .venv themselves.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

.PHONY: help install train ablate test test-fast bench lint format tensorboard clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and install the project with its dev tools

# Fine-tune ImageNet EfficientNet-Lite0 (offline weights) on the synthetic set
# (conf/experiment/quickstart.yaml); ARGS may override anything, including it.
TRAIN_PRESET ?= experiment=quickstart

train: $(STAMP) ## Fine-tune pretrained Lite0 on the synthetic set; Hydra overrides via ARGS="..."
	$(BIN)/python src/train.py $(TRAIN_PRESET) $(ARGS)

ablate: $(STAMP) ## Recipe ablation: arms x 3 seeds on the hard synthetic set (conf/ablate.yaml); ARGS="..."
	$(BIN)/python src/ablate.py $(ARGS)

test: $(STAMP) ## Run the whole test suite (slow tests included)
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: $(STAMP) ## Run the tests without the slow ones
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

bench: $(STAMP) ## Run the benchmarks in bench/ (report, not tests); ARGS="--only inference"
	$(BIN)/python bench/run_all.py $(ARGS)

lint: $(STAMP) ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

tensorboard: $(STAMP) ## Serve TensorBoard over all runs in logs/
	$(BIN)/tensorboard --logdir logs --bind_all

clean: ## Remove runs, caches and build artefacts (keeps .venv and data/)
	rm -rf logs outputs multirun .pytest_cache .ruff_cache build *.egg-info src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
