# The two commands of the README: `make demo` and `make test`. Both create or update the
# virtual environment .venv/ first, so each works alone on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test ui install bench-load clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fantasia-assets demo

test: install
	$(BIN)/python -m pytest

bench-load: install
	$(BIN)/python bench/load.py

clean:
	rm -rf .fantasia experiments .pytest_cache
