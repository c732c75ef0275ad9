# `make test`: create .venv if missing, install filterkit with its test and ray extras, run the suite.
# `make demo`: create .venv if missing, install filterkit, run it on the example photos.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	bash examples/demo.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
