# Two commands do everything on a fresh machine:
#   make serve   - create .venv if missing, install, serve the shipped demo model on 127.0.0.1:8000
#   make test    - create .venv if missing, install with the test extras, run the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve generate test test-gpu

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[test]"
	# DeepSpeed (the EP sanity reference) builds from source and imports torch in its setup.py:
	# without --no-build-isolation pip would fetch a second, CUDA, torch into the build env.
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/moe-rt serve $(ARGS)

generate: $(STAMP)
	$(BIN)/moe-rt generate --prompt "In the beginning" $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

# On a CUDA machine: the GPU-marked tests (kernels, CUDA paths).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m cuda $(ARGS)
