# Two commands from a fresh clone: `make train` and `make test` (`make test-fast` while editing). All create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: train test test-fast lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python -m src.train fit $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# The edit-test loop: everything not marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
