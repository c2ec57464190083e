# The two commands of the README: `make demo` and `make test`. Both set up .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint format clean-demo

$(BIN)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python scripts/prepare_demo.py --root workspace/demo
	$(BIN)/python scripts/train.py --config-path training_presets/demo.json

test: $(BIN)/.installed
	$(BIN)/ruff check modules scripts tests start-ui.py
	$(BIN)/ruff format --check modules scripts tests start-ui.py
	$(BIN)/python -m pytest -q -n 2

lint: $(BIN)/.installed
	$(BIN)/ruff check modules scripts tests start-ui.py

format: $(BIN)/.installed
	$(BIN)/ruff format modules scripts tests start-ui.py
	$(BIN)/ruff check --fix modules scripts tests start-ui.py

clean-demo:
	rm -rf workspace/demo
