# `make test`: create .venv if missing, install filterkit with its test and ray extras, run the suite.
# `make demo`: create .venv if missing, install filterkit, filter the example photos.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TEST_STAMP := $(VENV)/.installed-test
DEMO_STAMP := $(VENV)/.installed

.PHONY: test demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(DEMO_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $(DEMO_STAMP)

$(TEST_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $(TEST_STAMP) $(DEMO_STAMP)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

demo: $(DEMO_STAMP)
	bash examples/demo.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
