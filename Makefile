# The two commands a newcomer needs:  make demo  and  make test
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test test-fast venv clean bench

$(STAMP): pyproject.toml requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/mimlab reproduce --preset quick --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)     # the edit-test loop: everything but the tests marked slow (CI runs the full `make test`)
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/python benchmarks/probe_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
