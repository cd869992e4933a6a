# make test   set up .venv (if missing), build fusedrect._C, run the whole test suite
# make bench  set up .venv (if missing), build fusedrect._C, run the benchmarks on this machine's device
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CUDA toolkit the extension's CUDA part compiles with (where one is installed).
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda)
export MAX_JOBS ?= 2

.PHONY: build test bench experiments gpu-check gpu-build gpu-test gpu-bench clean

$(VENV)/.installed: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

build: $(VENV)/.installed
	$(PY) -m pip install --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest tests

DEVICE = $(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null)

# The main job: pre-activation units and ResNet training steps, then the BatchNorm + PReLU/ReLU layers; on a
# CPU, then the training loops with the CPU ops' buffer cache on and off.
bench: build
	$(PY) benchmarks/bench_preact.py --json benchmarks/results/preact_$(DEVICE).json \
		--plot benchmarks/results/preact_$(DEVICE).png
	$(PY) benchmarks/bench_bn_prelu.py --json benchmarks/results/bn_prelu_$(DEVICE).json \
		--plot benchmarks/results/bn_prelu_$(DEVICE).png
	$(if $(filter cpu,$(DEVICE)),$(PY) benchmarks/bench_buffer_cache.py --json benchmarks/results/buffer_cache_cpu.json)

# The experiments that reproduce the papers' claims: figures and JSON in docs/figures/ (one to two minutes each
# on a 2-core CPU).
experiments: build
	for script in prelu_cost he_init_depth learned_slopes preact_gradient_flow; do \
		$(PY) examples/$$script.py || exit 1; \
	done

# On a lent GPU machine (torch and triton preinstalled, no package registry): build with the machine's own
# python (the CUDA part must be there), run the GPU tests of both CUDA backends (triton and cuda) and the CUDA
# benchmarks of every available backend, keep the JSON in $OUT (else benchmarks/results/). The tests and the
# benchmarks are separate targets, so `make -k gpu-check` still benchmarks after a failed test;
# GPU_PYTEST_ARGS passes more pytest options (e.g. -n 8 with pytest-xdist).
GPU_PY ?= python3
GPU_PYTEST_ARGS ?=
RESULTS = $(if $(OUT),$(OUT),benchmarks/results)

gpu-check: gpu-test gpu-bench

gpu-build:
	$(GPU_PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit('make gpu-check: no CUDA device visible to torch')"
	$(GPU_PY) -m pip install --no-build-isolation --no-deps -e .
	$(GPU_PY) -c "import sys; from fusedrect.ops import _backend; _backend.cuda_module() or sys.exit('make gpu-check: fusedrect._C was built without its CUDA part (is CUDA_HOME set?)')"

gpu-test: gpu-build
	$(GPU_PY) -m pytest tests -m gpu -q -p no:cacheprovider $(GPU_PYTEST_ARGS)

gpu-bench: gpu-build
	mkdir -p $(RESULTS)
	for dtype in fp32 bf16; do \
		$(GPU_PY) benchmarks/bench_bn_prelu.py --device cuda --dtype $$dtype \
			--json $(RESULTS)/bn_prelu_cuda_$$dtype.json || exit 1; \
	done
	$(GPU_PY) benchmarks/bench_preact.py --device cuda --dtype bf16 --json $(RESULTS)/preact_cuda_bf16.json

clean:
	rm -rf build fusedrect/_C*.so *.egg-info
