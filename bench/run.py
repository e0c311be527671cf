"""`make bench`: the quantization table of REFERENCE.md's protocol, measured with this tool.

Protocol: SmolLM2-135M-Instruct dequantized to fp32 (bench/prepare.py); calibration 128 x 512
tokens of the C4 slice (seed 0); WikiText-2 test perplexity over the first 32 windows of 2048 tokens;
KL to the dense model on 16 x 512 held-out tokens; 2 threads. Each row runs `compress quantize`
and `compress eval` as separate processes, so peak RSS is the row's own; the compression time is
the pipeline step alone (model loading and evaluation excluded), as in REFERENCE.md.

    python bench/run.py                  # every row
    python bench/run.py --only gptq-w4g64-sym rtn-w4g64-sym
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from prepare import prepare  # noqa: E402

ROWS = [
    # name, method, bits, group size, symmetric
    ("rtn-w4g64-sym", "rtn", 4, 64, True),
    ("gptq-w4g64-sym", "gptq", 4, 64, True),
    ("gptq-w4g64-asym", "gptq", 4, 64, False),
    ("rtn-w3g64-sym", "rtn", 3, 64, True),
    ("gptq-w3g64-sym", "gptq", 3, 64, True),
    ("gptq-w3g64-asym", "gptq", 3, 64, False),
    ("rtn-w4ch-sym", "rtn", 4, 0, True),
    ("gptq-w4ch-sym", "gptq", 4, 0, True),
    ("rtn-w4g128-sym", "rtn", 4, 128, True),
    ("gptq-w4g128-sym", "gptq", 4, 128, True),
    ("gptq-w2g64-asym", "gptq", 2, 64, False),
]

# llm-compressor 0.14 on this machine, same protocol (../shared/docs/REFERENCE.md).
REFERENCE = {
    "dense": {"ppl": 21.813},
    "rtn-w4g64-sym": {"ppl": 30.948, "seconds": 0.3, "rss": 2879},
    "gptq-w4g64-sym": {"ppl": 29.707, "seconds": 321.8, "rss": 2772},
    "gptq-w3g64-sym": {"ppl": 81.546, "seconds": 303.4, "rss": 2844},
    "gptq-w4ch-sym": {"ppl": 35.403, "seconds": 317.6, "rss": 2795},
    "gptq-w4g128-sym": {"ppl": None, "note": "refused: 576 columns not divisible by 128"},
    "gptq-w2g64-asym": {"ppl": 49701.489, "note": "reference row is symmetric"},
}


def compress(*args: str) -> dict:
    env = {**os.environ, "COMPRESSOR_CACHE": str(WORK / "cache")}
    done = subprocess.run(["compress", *args, "--json"], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"compress {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def quantize_row(model: Path, name: str, method: str, bits: int, group: int, symmetric: bool) -> dict:
    return compress(
        "quantize", str(model), "--method", method, "--bits", str(bits), "--group-size", str(group),
        "--sym" if symmetric else "--asym", "--calibration", "c4", "--samples", "128",
        "--seqlen", "512", "--seed", "0", "--device", "cpu", "-o", str(WORK / name), "--overwrite",
    )


def eval_row(model: Path, quant: dict, name, method, bits, group, symmetric) -> dict:
    evaluation = compress("eval", str(WORK / name), "--baseline", str(model))
    return {
        "name": name, "method": method, "bits": bits, "group_size": group, "symmetric": symmetric,
        "ppl": evaluation["perplexity"]["ppl"], "dense_ppl": evaluation["baseline_perplexity"]["ppl"],
        "kl": evaluation["kl"]["kl"], "top1": evaluation["kl"]["top1_agreement"],
        "compress_seconds": quant["seconds"]["compress"], "peak_rss_mb": quant["peak_rss_mb"],
        "bpw": quant["bpw"]["stored"], "size_mib": quant["size"]["weights_bytes"] / 2**20,
        "perplexity_protocol": {k: evaluation["perplexity"][k] for k in ("seqlen", "windows", "tokens")},
        "kl_protocol": {k: evaluation["kl"][k] for k in ("seqlen", "windows", "tokens")},
    }


def markdown(rows: list[dict], environment: dict) -> str:
    lines = [
        "# Quantization benchmark: SmolLM2-135M-Instruct (fp32), this machine",
        "",
        "Calibration c4 128 x 512 (seed 0). Perplexity: WikiText-2 test, seqlen 2048, 32 windows "
        "(65,536 tokens), stride 2048. KL: dense || compressed on 16 x 512 held-out tokens. "
        f"Threads {environment['threads']}, device cpu. Command: `make bench`.",
        "",
        "| run | wt2 ppl | vs dense | KL | top-1 | compress s | peak RSS MiB | bpw | weights MiB "
        "| reference ppl | reference s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ref = REFERENCE.get(row["name"], {})
        ref_ppl = f"{ref['ppl']:.3f}" if ref.get("ppl") else ref.get("note", "")
        lines.append(
            f"| {row['name']} | {row['ppl']:.3f} | {row['ppl'] / row['dense_ppl']:.2f} "
            f"| {row['kl']:.4f} | {100 * row['top1']:.1f}% | {row['compress_seconds']:.1f} "
            f"| {row['peak_rss_mb']:.0f} | {row['bpw']:.3f} | {row['size_mib']:.1f} | {ref_ppl} "
            f"| {ref.get('seconds', '')} |"
        )
    if rows:
        lines.append(f"\nDense fp32 perplexity: {rows[0]['dense_ppl']:.3f} (reference 21.813).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="row names to run")
    parser.add_argument("--output", default=str(RESULTS / "quantize"), help="results path stem")
    args = parser.parse_args()
    model = prepare(WORK / "smollm2-fp32")
    chosen = [row for row in ROWS if not args.only or row[0] in args.only]
    started = time.time()
    # All compression runs first, back to back, so their timings share the same quiet machine.
    quants = []
    for row in chosen:
        quants.append(quantize_row(model, *row))
        print(f"[{time.time() - started:6.0f}s] {row[0]}: compress {quants[-1]['seconds']['compress']:.1f}s",
              flush=True)
    rows = []
    for row, quant in zip(chosen, quants, strict=True):
        rows.append(eval_row(model, quant, *row))
        print(f"[{time.time() - started:6.0f}s] {row[0]}: ppl {rows[-1]['ppl']:.3f}", flush=True)
    import torch

    environment = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = Path(args.output)
    stem.with_suffix(".json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))
    stem.with_suffix(".md").write_text(markdown(rows, environment))
    print(markdown(rows, environment))


if __name__ == "__main__":
    main()
