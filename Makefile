# One place for the setup both README commands use. torch is installed first, pinned to the CPU
# wheel, so nothing later resolves torch to a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup test demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# The last step builds what a machine's first CPU compile would otherwise build inside it (graphgen's
# kernels, torch's precompiled headers): ~20 s once, ~5 s to find them after that.
setup: $(BIN)/python
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/graphgen doctor --build

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(BIN)/graphgen demo

clean:
	rm -rf $(VENV) build *.egg-info
