# gptforge: the two README commands are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Two workers, each test module on one of them (module-scoped fixtures such as the SLURM cluster stay
# single): ~13 min instead of ~25 on 2 cores. PYTEST_ARGS= runs serially.
PYTEST_ARGS ?= -n 2 --dist loadfile

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
