# make test   set up .venv (if missing), build fusedrect._C, run the whole test suite
# make bench  set up .venv (if missing), build fusedrect._C, run the benchmarks on this machine's device
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CUDA toolkit the extension's CUDA part compiles with (where one is installed).
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda)
export MAX_JOBS ?= 2

.PHONY: build test bench clean

$(VENV)/.installed: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

build: $(VENV)/.installed
	$(PY) -m pip install --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest tests

DEVICE = $(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null)

bench: build
	$(PY) benchmarks/bench_bn_prelu.py --json benchmarks/results/bn_prelu_$(DEVICE).json \
		--plot benchmarks/results/bn_prelu_$(DEVICE).png

clean:
	rm -rf build fusedrect/_C*.so *.egg-info
