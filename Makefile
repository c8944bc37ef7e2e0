# The README's two commands are `make demo` and `make test`; both set the machine up first.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install format lint test bench demo clean

install: $(STAMP)

$(STAMP): pyproject.toml .ci/setup
	bash .ci/setup
	touch $(STAMP)

format: install
	$(BIN)/ruff format indexer plugins tests bench
	$(BIN)/ruff check --fix indexer plugins tests bench

lint: install
	$(BIN)/ruff check indexer plugins tests bench
	$(BIN)/ruff format --check indexer plugins tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m bench.run

demo: install
	$(BIN)/python -m indexer.demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
