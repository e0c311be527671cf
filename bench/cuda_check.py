"""The CUDA paths of compressor, checked and timed in one run on a lent GPU:
`python bench/cuda_check.py TOKENIZER_FOLDER OUT_DIR [CHECK...]` (bench/cuda_check.sh runs it with the
tests).

The machine this project is built on has no GPU, and the real SmolLM2 weights are too large to travel
to the GPU machine, so the models here have SmolLM2-135M's configuration and tokenizer and random
weights (initializer_range 0.02). What is checked:
1. The pipeline: the same GPTQ W4 g64 + block-reconstruction job on a 4-block model, run with
   --device cpu and --device cuda; per-layer block errors and perplexity on held-out text side by side.
2. The whole 30-block model on CUDA: plain GPTQ and GPTQ + reconstruct, timed.
3. The packed runtime on CUDA (Triton kernels): logits of compressor.load(device="cuda") against the
   dense dequantized model; prefill and decode tokens/s against the dense bfloat16 model.
4. 2:4: a SparseGPT 2:4 checkpoint loaded on CUDA runs torch's semi-structured kernels; logits
   against the same checkpoint run dense; prefill tokens/s of both.
Results: OUT_DIR/cuda_check.json, and one line per check on stdout.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import compressor
from compressor.eval.perplexity import perplexity
from compressor.infer import measure
from compressor.model import ModelSource, load_model

REPO = Path(__file__).resolve().parents[1]


def calibration_text(folder: Path) -> tuple[Path, str]:
    """The project's own documentation as calibration text, and a held-out part for perplexity."""
    text = "\n\n".join(p.read_text() for p in sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")]))
    cut = int(len(text) * 0.85)
    path = folder / "calibration.txt"
    path.write_text(text[:cut])
    return path, text[cut:]


def random_model(tokenizer_folder: Path, layers: int, folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (folder / "config.json").is_file():
        return folder
    config = AutoConfig.from_pretrained(tokenizer_folder)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(folder)
    return folder


def held_out_perplexity(folder: Path, ids: torch.Tensor) -> float:
    model, _ = load_model(ModelSource(str(folder)), torch.float32)
    return perplexity(model.cuda(), ids, seqlen=256, max_windows=8, device="cuda")["ppl"]


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def block_errors(result) -> dict[str, list[float]]:
    return {name: [round(m["block_error_before"], 6), round(m["block_error_after"], 6)]
            for name, m in result.manifest["modules"].items() if "block_error_after" in m}


def pipeline_cpu_vs_cuda(small: Path, work: Path, cal: Path, ids) -> dict:
    options = dict(bits=4, group_size=64, symmetric=False, reconstruct=True, calibration=str(cal),
                   samples=32, seqlen=256, overwrite=True)
    rows = {}
    for device in ("cpu", "cuda"):
        out = work / f"small-{device}"
        result, seconds = timed(lambda d=device, o=out: compressor.quantize(str(small), o, device=d,
                                                                             **options))
        rows[device] = {"seconds": seconds, "ppl": held_out_perplexity(out, ids),
                        "block_errors": block_errors(result)}
        print(f"[pipeline] 4 blocks, W4 g64 asym + reconstruct on {device}: {seconds:.1f} s, "
              f"held-out ppl {rows[device]['ppl']:.2f}", flush=True)
    rows["dense_ppl"] = held_out_perplexity(small, ids)
    pairs = [(rows["cpu"]["block_errors"][k][1], rows["cuda"]["block_errors"].get(k, [0, float("nan")])[1])
             for k in rows["cpu"]["block_errors"]]
    rows["max_block_error_ratio_cuda_over_cpu"] = max(b / a for a, b in pairs if a > 0) if pairs else None
    print(f"[pipeline] dense ppl {rows['dense_ppl']:.2f}; worst block error cuda/cpu "
          f"{rows['max_block_error_ratio_cuda_over_cpu']}", flush=True)
    return rows


def full_model_on_cuda(full: Path, work: Path, cal: Path, ids, reconstruct: bool) -> dict:
    label = "gptq+reconstruct" if reconstruct else "gptq"
    out = work / f"full-{label.replace('+', '-')}"
    _, seconds = timed(lambda: compressor.quantize(
        str(full), out, bits=4, group_size=64, symmetric=False, reconstruct=reconstruct,
        calibration=str(cal), samples=128, seqlen=512, device="cuda", overwrite=True))
    row = {"seconds": seconds, "ppl": held_out_perplexity(out, ids), "folder": str(out)}
    print(f"[full] 30 blocks, W4 g64 asym {label} on cuda: {seconds:.1f} s, held-out ppl {row['ppl']:.2f}",
          flush=True)
    return row


@torch.no_grad()
def packed_runtime(folder: Path, source: Path, ids) -> dict:
    from compressor.cli import _backends

    window = ids[:, :256].cuda()
    packed, _ = compressor.load(str(folder), dtype="float16", device="cuda")
    dense, _ = load_model(ModelSource(str(folder)), torch.float16)
    dense = dense.cuda().eval()
    got, expected = packed(window).logits.float(), dense(window).logits.float()
    relative = ((got - expected).norm() / expected.norm()).item()
    speed = {"packed-fp16": measure(packed, 512, 64), "dense-fp16 (dequantized)": measure(dense, 512, 64)}
    del packed, dense
    base, _ = load_model(ModelSource(str(source)), torch.bfloat16)
    speed["dense-bf16 (source)"] = measure(base.cuda().eval(), 512, 64)
    repacked, _ = compressor.load(str(folder), dtype="bfloat16", device="cuda")
    speed["packed-bf16"] = measure(repacked, 512, 64)
    row = {"logits_relative_error_vs_dequantized": relative, "backends": _backends(repacked), "speed": speed}
    print(f"[packed] Triton backends {row['backends']}; logits rel. error vs dequantized fp16 {relative:.2e}",
          flush=True)
    for label, m in speed.items():
        print(f"[packed] {label}: prefill {m['prefill_tokens_per_s']:.0f} tok/s, decode "
              f"{m['decode_tokens_per_s']:.1f} tok/s, weights {m['weight_bytes'] / 2**20:.1f} MiB",
              flush=True)
    return row


@torch.no_grad()
def semi_structured(full: Path, work: Path, cal: Path, ids) -> dict:
    from compressor.sparse24 import is_2of4

    out = work / "full-sparsegpt-2of4"
    compressor.sparsify(str(full), out, pattern="2:4", method="sparsegpt", calibration=str(cal),
                        samples=32, seqlen=256, device="cuda", overwrite=True)
    window = ids[:, :256].cuda()
    fast, _ = compressor.load(str(out), dtype="float16", device="cuda")
    accelerated = sum(isinstance(m, torch.nn.Linear) and
                      type(m.weight.data).__name__.startswith("SparseSemiStructured") for m in fast.modules())
    plain, _ = load_model(ModelSource(str(out)), torch.float16)
    plain = plain.cuda().eval()
    assert all(is_2of4(m.weight) for n, m in plain.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}")
    got, expected = fast(window).logits.float(), plain(window).logits.float()
    relative = ((got - expected).norm() / expected.norm()).item()
    row = {"semi_structured_modules": accelerated, "logits_relative_error_vs_dense": relative,
           "prefill_2of4": measure(fast, 2048, 8)["prefill_tokens_per_s"],
           "prefill_dense": measure(plain, 2048, 8)["prefill_tokens_per_s"]}
    print(f"[2:4] {accelerated} linears on semi-structured kernels; logits rel. error {relative:.2e}; "
          f"prefill 2048 tokens: {row['prefill_2of4']:.0f} vs dense {row['prefill_dense']:.0f} tok/s",
          flush=True)
    return row


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench/cuda_check.py needs a CUDA device")
    tokenizer_folder, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    work = Path("/tmp/cuda_check")
    work.mkdir(exist_ok=True)
    cal, held_out = calibration_text(work)
    small = random_model(tokenizer_folder, 4, work / "small")
    full = random_model(tokenizer_folder, 30, work / "full")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(small)(held_out, return_tensors="pt").input_ids
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    checks = {"pipeline_cpu_vs_cuda": lambda: pipeline_cpu_vs_cuda(small, work, cal, ids),
              "full_gptq": lambda: full_model_on_cuda(full, work, cal, ids, reconstruct=False),
              "full_reconstruct": lambda: full_model_on_cuda(full, work, cal, ids, reconstruct=True),
              "packed_runtime": lambda: packed_runtime(work / "full-gptq", full, ids),
              "semi_structured_2of4": lambda: semi_structured(full, work, cal, ids)}
    for name in sys.argv[3:] or checks:  # a subset by name, in this order (packed_runtime needs full_gptq)
        check = checks[name]
        try:
            report[name] = check()
        except Exception as error:  # one broken path must not hide the others' results
            import traceback

            traceback.print_exc()
            report[name] = {"error": f"{type(error).__name__}: {error}"}
        (out_dir / "cuda_check.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
