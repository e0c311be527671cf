"""W4 g128 Triton GEMV / GEMM against the fp16 dense matmul on the layer shapes of a 7B Llama
(4096x4096 and 11008x4096, batch 1 and 16), CUDA only: `python bench/gpu_kernels.py`.

Each timing is the median of 50 runs after 10 warm-ups, measured with CUDA events; the result is
printed as a markdown table and written to bench/results/gpu_kernels.json.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from compressor_kernels import PackedLinear

SHAPES = [(4096, 4096), (11008, 4096)]  # (out, in): q/k/v/o and gate/up of Llama-7B
BATCHES = [1, 16]


def _time(fn) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_kernels.py needs a CUDA device")
    rows = []
    for out_features, in_features in SHAPES:
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)
        scale = torch.rand(out_features, in_features // 128, generator=gen) * 0.01
        packed = PackedLinear(codes, scale, None, 4, 128, dtype=torch.float16, backend="triton").cuda()
        dense = packed.dense_weight().to(torch.float16)
        for batch in BATCHES:
            x = torch.randn(batch, in_features, device="cuda", dtype=torch.float16)
            error = (packed(x).float() - (x @ dense.T).float()).norm() / (x @ dense.T).float().norm()
            packed_ms = _time(lambda layer=packed, x=x: layer(x))
            dense_ms = _time(lambda x=x, weight=dense: x @ weight.T)
            rows.append({"shape": f"{out_features}x{in_features}", "batch": batch, "w4_ms": packed_ms,
                         "fp16_ms": dense_ms, "speedup": dense_ms / packed_ms,
                         "weight_bytes_w4": packed.weight_bytes, "weight_bytes_fp16": dense.numel() * 2,
                         "relative_error": float(error)})
    print(f"device: {torch.cuda.get_device_name()}\n")
    print("| layer | batch | W4 g128 Triton ms | fp16 ms | speed-up | rel. error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']} | {r['w4_ms']:.4f} | {r['fp16_ms']:.4f} | {r['speedup']:.2f}x "
              f"| {r['relative_error']:.1e} |")
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "gpu_kernels.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
