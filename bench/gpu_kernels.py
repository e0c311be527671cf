"""The W4 Triton kernels against the fp16 dense matmul, CUDA only: `python bench/gpu_kernels.py [OUT.json]`.

Layer shapes of a 7B Llama (4096x4096, 11008x4096, 4096x11008) and of SmolLM2-135M (1536x576,
576x1536), W4 g128 asymmetric, at 1 row (decode: the GEMV kernel), 16 and 512 rows (the dequantize
kernel, then cuBLAS). Every tile configuration
in the sweeps below is timed (median of 20 runs after 5 warm-ups, CUDA events) and checked against
the dense product; the table gives the fastest per cell, the JSON every configuration (the defaults
in compressor_kernels/triton_matmul.py are chosen from it).
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

from compressor_kernels import PackedLinear
from compressor_kernels import triton_matmul as tm

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (576, 1536)]  # (out, in)
BATCHES = [1, 16, 512]
GEMV_SWEEP = [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": w}
              for n, k, w in itertools.product((4, 8, 16, 32), (128, 256, 512), (4,)) if n * k <= 8192]
DEQUANTIZE_SWEEP = [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": 4} for n, k in ((32, 128), (16, 256), (64, 64))]


def _time(fn) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def _candidates(layer: PackedLinear, x: torch.Tensor):
    """(label, function) for every kernel configuration that can compute x @ W^T at this batch."""
    args = (layer.packed, layer.scale, layer.zero, layer.group_of, layer.bits, layer.out_features)
    if x.shape[0] <= tm.GEMV_MAX_ROWS:
        for config in GEMV_SWEEP:
            yield f"gemv {config}", lambda c=config: tm.packed_matmul(x, *args, config=c)
        return
    buffer = torch.empty(layer.out_features, layer.in_features, dtype=x.dtype, device=x.device)
    for config in DEQUANTIZE_SWEEP:
        yield f"dequantize {config} + cuBLAS", lambda c=config: x @ tm.dequantize(*args[:5], buffer, c).T


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_kernels.py needs a CUDA device")
    rows = []
    for out_features, in_features in SHAPES:
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)
        scale = torch.rand(out_features, -(-in_features // 128), generator=gen) * 0.01
        zero = torch.randint(0, 16, scale.shape, generator=gen).float()
        layer = PackedLinear(codes, scale, zero, 4, 128, dtype=torch.float16, backend="triton").cuda()
        dense = layer.dense_weight().to(torch.float16)
        for batch in BATCHES:
            x = torch.randn(batch, in_features, device="cuda", dtype=torch.float16)
            expected = x @ dense.T
            timings = {}
            for label, run in _candidates(layer, x):
                error = _error(run(), expected)
                timings[label] = {"ms": _time(run), "relative_error": error}
            correct = [t for t in timings.items() if t[1]["relative_error"] < 1e-2]
            best = min(correct, key=lambda t: t[1]["ms"])
            layer_ms = _time(lambda x=x, layer=layer: layer(x))  # PackedLinear's default at this batch
            dense_ms = _time(lambda x=x, dense=dense: x @ dense.T)
            rows.append({"shape": f"{out_features}x{in_features}", "batch": batch, "best": best[0],
                         "best_ms": best[1]["ms"], "default_ms": layer_ms, "fp16_ms": dense_ms,
                         "speedup_default": dense_ms / layer_ms, "speedup_best": dense_ms / best[1]["ms"],
                         "weight_bytes_w4": layer.weight_bytes, "weight_bytes_fp16": dense.numel() * 2,
                         "relative_error_default": _error(layer(x), expected), "sweep": timings})
            print(f"{out_features}x{in_features} batch {batch}: default {layer_ms:.4f} ms, best {best[0]} "
                  f"{best[1]['ms']:.4f} ms, fp16 {dense_ms:.4f} ms", flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name()}\n")
    print("| layer | batch | W4 g128 default ms | best ms (config) | fp16 ms | default speed-up "
          "| rel. error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']} | {r['default_ms']:.4f} | {r['best_ms']:.4f} ({r['best']}) | "
              f"{r['fp16_ms']:.4f} | {r['speedup_default']:.2f}x | {r['relative_error_default']:.1e} |")
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "gpu_kernels.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
