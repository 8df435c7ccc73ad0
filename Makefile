# Orchard — the two commands a newcomer runs: `make demo` and `make test`.
SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/orchard
VENV := $(CACHE)/venv
ORCHARD := bin/orchard
PYTEST := $(VENV)/bin/python -m pytest

.PHONY: help deps demo test lint unit integration chaos bench stack-up stack-down secrets clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

deps: ## install everything (idempotent; cached under ~/.cache/orchard)
	@bash deps/install.sh

unit: deps ## pure-logic tests only (no services)
	$(PYTEST) tests/unit

lint: deps ## ruff (lint + format check), mypy and the import-layer contract
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports

test: deps lint ## lint, then the whole test suite: unit + integration on the real native stack
	@bash tests/run.sh

chaos: deps ## fault, load and bad-input suite (kills real processes)
	@bash tests/run.sh --no-stack tests/chaos

demo: deps ## the main job end to end; KEEP=1 leaves the stack running
	$(ORCHARD) demo $(if $(KEEP),--keep,)

bench: deps ## benchmarks (print JSON)
	$(VENV)/bin/python bench/upload.py
	$(VENV)/bin/python bench/inference.py --cleanup
	$(VENV)/bin/python bench/transfer.py
	$(VENV)/bin/python bench/bovw.py
	PYTHONPATH=$(CURDIR) $(VENV)/bin/python bench/serve.py
	PYTHONPATH=$(CURDIR) $(VENV)/bin/python bench/spark_start.py

stack-up: deps ## start the native stack
	$(ORCHARD) stack up

stack-down: ## stop the native stack (data kept)
	$(ORCHARD) stack down

secrets: ## generate compose/.env with random secrets (never committed)
	@bash compose/make-secrets.sh

clean: ## stop the stack and delete its data
	-$(ORCHARD) stack down --purge
