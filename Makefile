# gptforge: the two README commands are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo lint bench clean

install:
	@bash scripts/install.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	@bash scripts/demo.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) bench/model_step.py

clean:
	rm -rf runs demo .pytest_cache
