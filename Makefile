# Two commands do all the set-up on a fresh machine:
#   make example   preprocess the embedded example data and train the tiny model (CPU or GPU)
#   make test      run the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch that the test machines carry; set TORCH_SPEC= to keep an existing torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup example lint test bench gpu-check

setup:
	$(if $(TORCH_SPEC),$(PIP) install -q "$(TORCH_SPEC)")
	$(PIP) install -q -e '.[test]'

example: setup
	bash examples/pretrain_simpo.sh

# ruff (pinned in the test extra): lint and format, as pyproject.toml configures them.
lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: lint
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

bench: setup
	$(PYTHON) tools/bench/bench_train.py
	$(PYTHON) tools/bench/bench_reference.py
	$(PYTHON) tools/bench/bench_logprobs.py
	$(PYTHON) tools/bench/bench_builder.py
	$(PYTHON) tools/bench/bench_preprocess.py

# On a GPU machine with the [gpu] extra installed (no set-up: it keeps the CUDA torch there):
# tests/gpu and the MFU benchmark, one screen of results; without a GPU it says so and exits 0.
gpu-check:
	$(PYTHON) tools/gpu_check.py
