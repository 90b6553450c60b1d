# Two commands for a fresh clone (see README.md):
#   make demo   set up, then train the built-in demo and print its table
#   make test   set up, then run the test suite, then the interop tests against the real SAELens and
#               sparsify in their own environment (test-peers)
# Setup installs torch 2.14.1 (CUDA build: needed to compile the CUDA kernels), Triton, the
# test tools and this package (--no-build-isolation) into .venv, or into the active
# virtual environment when there is one.

SHELL := /bin/bash
TORCH_VERSION ?= 2.14.1
VENV ?= .venv
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(abspath $(VENV))/bin/python
endif
STAMP := $(dir $(PY)).sparse_sae_setup
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME

.PHONY: setup demo test test-peers peers-env bench bench-peers bench-suite clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install "torch==$(TORCH_VERSION)" "triton>=3.6,<3.10" numpy "safetensors>=0.4" tqdm "transformers>=4.46" pillow matplotlib scipy \
		"pytest>=8" "pytest-benchmark>=4" ninja
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -m sparse_sae info
	@touch $@

demo: setup
	$(PY) -m sparse_sae demo

test: setup
	$(PY) -m pytest
	@$(MAKE) --no-print-directory test-peers

# Benchmark against the peers (README "Benchmark"). The peers (sae-lens pulls transformers,
# datasets, ...) go into their own environment, $(PEERS_VENV), so they cannot change the core
# one; torch is pinned there to the core's version, and the checkout joins its path through a
# .pth file (the in-place extension that `make setup` built matches that torch).
PEERS_VENV ?= .venv-peers
PEERS_PY := $(abspath $(PEERS_VENV))/bin/python
BENCH_ARGS ?= --threads 2 --steps 7 --warmup 2

PEERS_STAMP := $(abspath $(PEERS_VENV))/.sparse_sae_peers

bench-peers: peers-env
	$(PEERS_PY) -c "import sparse_sae, sparsify, overcomplete, sae_lens; print('peers ready')"

peers-env: $(PEERS_STAMP)

$(PEERS_STAMP): bench/peers/requirements.txt $(STAMP)
	@test -x $(PEERS_PY) || python3 -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --upgrade pip
	$(PEERS_PY) -m pip install "torch==$(TORCH_VERSION)" numpy "safetensors>=0.4" tqdm "pytest>=8" "pytest-benchmark>=4" \
		-r bench/peers/requirements.txt
	echo "$(CURDIR)" > "$$($(PEERS_PY) -c 'import site; print(site.getsitepackages()[0])')/sparse_sae_checkout.pth"
	$(PEERS_PY) -c "import sparse_sae, sparsify, sae_lens"
	@touch $@

# Interop checked against SAELens's and sparsify's own loaders (tests/peers), in the peers'
# environment. Where it cannot be built (no network, a broken release) the tests are skipped and
# the skip says why (pytest's exit status 5, nothing collected, is then expected); once it is
# built, a failing test fails `make test`.
PEERS_LOG := build/peers-env.log

test-peers: setup
	@mkdir -p build
	@if $(MAKE) --no-print-directory peers-env > $(PEERS_LOG) 2>&1; then \
		$(PEERS_PY) -m pytest tests/peers; \
	else \
		echo "could not build $(PEERS_VENV) (log: $(PEERS_LOG)):"; grep -v '^WARNING' $(PEERS_LOG) | tail -n 5; \
		SPARSE_SAE_PEERS_UNAVAILABLE="building $(PEERS_VENV) failed: $$(grep -v -e '^WARNING' -e '^make' $(PEERS_LOG) | tail -n 1)" \
			$(PY) -m pytest tests/peers || test $$? -eq 5; \
	fi

# Runs the CPU suite (with the peers when `make bench-peers` was run) and rewrites the README table.
bench-suite: setup
	$(if $(wildcard $(PEERS_PY)),$(PEERS_PY),$(PY)) bench/suite.py $(BENCH_ARGS)
	$(PY) bench/report.py bench/results/suite_cpu.json

clean:
	rm -rf build *.egg-info sparse_sae/_C*.so
