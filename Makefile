# ccn-sweeps: `make test` and `make demo` each set up their own virtual environment.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo lint bench clean

# (Re)install only when the venv is missing or pyproject.toml changed since the last install.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/ccn run sweeps/demo.toml --results results
	$(BIN)/ccn run sweeps/demo.toml --results results --stage evaluate
	$(BIN)/ccn report results --spec sweeps/demo.toml --out results/demo-report

bench: $(STAMP)
	$(BIN)/python benchmarks/learners.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
