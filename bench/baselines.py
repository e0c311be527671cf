"""Baselines through other libraries, written as checkpoints `compress eval` reads, for the tables.

    python bench/baselines.py bnb-nf4 MODEL OUT     # bitsandbytes NF4, blocks of 64, fp32 absmax
    python bench/baselines.py bnb-fp4 MODEL OUT     # bitsandbytes FP4 (E2M1), same blocks

bitsandbytes quantizes while transformers loads the model; the time reported is that load minus a
plain load of the same checkpoint. Prints the fields bench/run.py reads from `compress --json`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from compressor.writer import peak_rss_mb


def bitsandbytes(kind: str, model: Path, output: Path) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    plain = time.perf_counter() - start
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=False)
    start = time.perf_counter()
    quantized = AutoModelForCausalLM.from_pretrained(model, quantization_config=config, dtype=torch.float32)
    seconds = max(time.perf_counter() - start - plain, 0.0)
    quantized.save_pretrained(output)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model).save_pretrained(output)
    size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    return {
        "output": str(output),
        "seconds": {"compress": seconds},
        "peak_rss_mb": peak_rss_mb(),
        # 4-bit codes plus one float32 absmax per block of 64 weights.
        "bpw": {"stored": 4 + 32 / 64, "levels": 4.0},
        "size": {"weights_bytes": size},
        "modules": {},
    }


def main() -> None:
    kind, model, output = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if kind not in ("bnb-nf4", "bnb-fp4"):
        raise SystemExit(f"unknown baseline {kind!r}")
    output.mkdir(parents=True, exist_ok=True)
    print(json.dumps(bitsandbytes(kind.removeprefix("bnb-"), model, output)))


if __name__ == "__main__":
    main()
