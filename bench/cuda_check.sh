#!/usr/bin/env bash
# Every CUDA check of the project in one run on a lent GPU machine (bench/cuda_check.py says what
# is checked): `bash bench/cuda_check.sh OUT_DIR [CHECK...]`, from the repository root, with the
# Python wheels the GPU machine lacks in .whl/ (transformers 5.2x, compressed-tensors, gguf,
# pydantic, greenlet, typer) and SmolLM2's config and tokenizer in bench/work/cuda-carry/.
# SUITE_SECONDS=N also runs the fast test suite (pipeline --device auto = cuda) for up to N seconds.
set -u
out=${1:?usage: bash bench/cuda_check.sh OUT_DIR [CHECK...]}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__)"; } > "$out/env.txt" 2>&1
# The Triton kernels (every width 2-8, ragged groups, act-order) and the 2:4 kernels against their
# references, on the GPU instead of Triton's CPU interpreter.
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_sparse24_cuda.py \
    tests/test_kernels.py > "$out/kernel_tests.log" 2>&1
timeout 150 python3 bench/gpu_kernels.py "$out/gpu_kernels.json" > "$out/gpu_kernels.md" 2>&1
timeout 200 python3 bench/cuda_check.py bench/work/cuda-carry "$out" "$@" > "$out/cuda_check.log" 2>&1
if [ "${SUITE_SECONDS:-0}" -gt 0 ]; then
    timeout "$SUITE_SECONDS" python3 -m pytest -q -p no:cacheprovider -m "not slow" -n 12 --timeout 100 \
        > "$out/suite.log" 2>&1
fi
tail -n 3 "$out/kernel_tests.log"; grep '^\[' "$out/cuda_check.log"; tail -n 20 "$out/gpu_kernels.md"
