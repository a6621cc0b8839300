# The two commands of the README: `make demo` and `make test`. Both create or update the
# virtual environment .venv/ first, so each works alone on a fresh machine. `make demo` and
# `make ui` use data/config_fasta.yaml (the sample queries as FASTA) unless FANTASIA_CONFIG is set.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test ui install bench-load clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	# PIS's model definitions, for the schema tests; without its deps (torch, esm, Bio…)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps protein-information-system==3.1.2
	# the project's bytecode, as pip writes it for installed packages: where PYTHONDONTWRITEBYTECODE
	# is set, an editable install would otherwise compile every module on each command (≈ 0.3 s)
	$(BIN)/python -m compileall -q fantasia_assets > /dev/null
	touch $(STAMP)

install: $(STAMP)

export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/fantasia-assets demo

test: install
	bash scripts/ensure_chromium.sh
	$(BIN)/python -m pytest

ui: install $(DAGSTER_HOME)/dagster.yaml
	FANTASIA_CONFIG=$${FANTASIA_CONFIG:-$(CURDIR)/data/config_fasta.yaml} $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench-load: install
	$(BIN)/python bench/load.py

clean:
	rm -rf .fantasia .dagster_home experiments .pytest_cache
