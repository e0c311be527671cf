"""`python bench/run.py deploy`: which layouts vLLM serves, proven by vLLM itself.

Each row writes SmolLM2 with RTN in one layout (the layout is what matters here, not the rounding),
then asks vLLM's CPU build, from its own virtual environment (bench/vllm_client.py; $VLLM_PYTHON,
default /work/venvs/vllm/bin/python), for the mean NLL of 8 x 512 WikiText-2 test tokens, and
compares it with transformers (this project's environment, float32) on the same token ids. The
`compress inspect` prediction (compressor.engines) is printed beside what vLLM did.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "deploy"
RESULTS = HERE / "results"
VLLM_PYTHON = os.environ.get("VLLM_PYTHON", "/work/venvs/vllm/bin/python")
WINDOWS, SEQLEN = 8, 512

ROWS = [
    ("w4g64-sym", ["--bits", "4", "--group-size", "64", "--sym"]),
    ("w4g64-asym", ["--bits", "4", "--group-size", "64", "--asym"]),
    ("w4-channel-asym", ["--bits", "4", "--group-size", "0", "--asym"]),
    ("w4g128-sym (default, ragged on 576)", ["--bits", "4", "--group-size", "128", "--sym"]),
    ("w3g64-asym", ["--bits", "3", "--group-size", "64", "--asym"]),
    ("w8g64-sym", ["--bits", "8", "--group-size", "64", "--sym"]),
]


def _windows(model: Path) -> Path:
    import torch  # noqa: F401 - compressor's data helpers return tensors

    from compressor import data
    from compressor.model import ModelSource, load_tokenizer

    path = WORK / "windows.json"
    if not path.is_file():
        tokenizer = load_tokenizer(ModelSource(str(model)))
        ids = data.evaluation_ids(tokenizer, "wikitext2", data.resolve_data_dir(None))
        path.write_text(json.dumps([ids[0, i * SEQLEN:(i + 1) * SEQLEN].tolist() for i in range(WINDOWS)]))
    return path


def transformers_nll(folder: Path, windows: list[list[int]]) -> float:
    import torch

    from compressor.model import ModelSource, load_model

    model, _ = load_model(ModelSource(str(folder)))
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(torch.tensor([window])).logits.float()[0, :-1]
            logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:])[:, None])
            total -= float(logprobs.sum())
            count += len(window) - 1
    return total / count


def run_deploy(model: Path) -> str:
    WORK.mkdir(parents=True, exist_ok=True)
    windows_file = _windows(model)
    windows = json.loads(windows_file.read_text())
    rows = []
    for name, flags in ROWS:
        folder = WORK / name.split(" ")[0]
        if not (folder / "compress.json").is_file():
            done = subprocess.run(["compress", "quantize", "--method", "rtn", *flags, str(model), "-o",
                                   str(folder), "--overwrite", "--json"], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name}: {done.stderr}")
        inspect = json.loads(subprocess.run(["compress", "inspect", str(folder), "--json"],
                                            capture_output=True, text=True, check=True).stdout)
        served = subprocess.run([VLLM_PYTHON, str(HERE / "vllm_client.py"), str(folder), str(windows_file)],
                                capture_output=True, text=True)
        lines = served.stdout.strip().splitlines()
        vllm = json.loads(lines[-1]) if lines else {"served": False, "error": served.stderr[-300:]}
        row = {"name": name, "predicted": inspect["engines"], "vllm": vllm,
               "transformers_nll": transformers_nll(folder, windows), "bpw": inspect["bpw"]["stored"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "deploy.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = markdown(rows)
    (RESULTS / "deploy.md").write_text(text)
    return text


def markdown(rows: list[dict]) -> str:
    version = next((r["vllm"].get("vllm") for r in rows if r["vllm"].get("vllm")), "?")
    kernels = {r["vllm"].get("kernel") for r in rows if r["vllm"].get("served")}
    lines = [
        "# deploy benchmark: which layouts vLLM serves (SmolLM2-135M, RTN, this machine)",
        "",
        f"vLLM {version} CPU build in its own virtual environment (`bench/vllm_client.py`), bfloat16; "
        f"mean NLL of {WINDOWS} x {SEQLEN} WikiText-2 test tokens vs transformers (float32, this "
        "project's environment) on the same ids. Command: `python bench/run.py deploy`.",
        "",
        "| layout | stored bpw | `compress inspect`: vllm / vllm-cpu | vLLM | vLLM NLL "
        "| transformers NLL | gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        predicted = " / ".join("serves" if row["predicted"][e] is None
                               else row["predicted"][e].split(": ", 1)[1] for e in ("vllm", "vllm-cpu"))
        vllm = row["vllm"]
        if vllm.get("served"):
            outcome, nll = "served", f"{vllm['nll']:.4f}"
            gap = f"{vllm['nll'] - row['transformers_nll']:+.4f}"
        else:
            outcome, nll, gap = f"refused: {vllm.get('error', '')[:120]}", "-", "-"
        lines.append(f"| {row['name']} | {row['bpw']:.3f} | {predicted} | {outcome} | {nll} "
                     f"| {row['transformers_nll']:.4f} | {gap} |")
    if "reference" in kernels:
        lines += ["", "This CPU has no AVX-512: vLLM's CPU build has its int4 kernel (cpu_gemm_wna16) only "
                  "in its AVX-512 library, so the client replaced that one kernel by a dequantize-matmul "
                  "over the parameters vLLM loaded (its scheme, loaders and unpacking); see "
                  "bench/vllm_client.py. CUDA was not exercised (no GPU lent)."]
    return "\n".join(lines) + "\n"


# llama.cpp's llama-quantize with an importance matrix from the same calibration windows (REFERENCE.md):
# file MiB and perplexity on the first 8 benchmark windows through transformers (dense fp32: 19.134).
LLAMA_CPP = {"q4_0": (87.6, 21.271), "q4_k_m": (100.6, 19.690), "q3_k_m": (89.2, 20.765),
             "q2_k": (84.1, 22.688), "q8_0": (138.1, 19.163)}
# Those REFERENCE.md has llama-quantize rows for (Q8_0 too: 138.1 MiB, 19.163; not re-run with K-quants).
# (type, solver of `compress quantize --method`, extra options): GPTQ onto every type; llama-quantize's
# own rounding plus the refit (imatrix) at Q4_0, where it is the better one; AWQ first at Q3_K_M and
# Q2_K (the same file size: its scales fold into the norms).
GGUF_ROWS = (("q4_k_m", "gptq", ()), ("q3_k_m", "gptq", ()), ("q2_k", "gptq", ()), ("q4_0", "gptq", ()),
             ("q4_0", "imatrix", ()), ("q3_k_m", "gptq", ("--awq",)), ("q2_k", "gptq", ("--awq",)),
             # block reconstruction on the GGUF grid: rounding and header, or the header alone (the
             # default with --format gguf)
             ("q3_k_m", "gptq", ("--reconstruct", "--reconstruct-train", "rounding")),
             ("q3_k_m", "gptq", ("--reconstruct", "--reconstruct-train", "scales")),
             ("q4_k_m", "gptq", ("--reconstruct", "--reconstruct-train", "scales")),
             ("q2_k", "gptq", ("--reconstruct", "--reconstruct-train", "scales")))


def llama_cpp_ppl(path: Path, windows: int = 8, seqlen: int = 2048) -> float | None:
    """Perplexity llama.cpp itself (llama-cpp-python) gives the file on the first benchmark windows
    (the same token ids as transformers' protocol, every target scored); None without llama_cpp."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import numpy as np
    import torch

    from compressor import data
    from compressor.model import ModelSource, load_tokenizer

    tokenizer = load_tokenizer(ModelSource(str(HERE / "work" / "smollm2-fp32")))
    ids = data.evaluation_ids(tokenizer, "wikitext2", data.resolve_data_dir(None))[0]
    llm = llama_cpp.Llama(str(path), n_ctx=seqlen, logits_all=True, verbose=False, n_threads=2)
    total, count = 0.0, 0
    for i in range(windows):
        window = ids[i * seqlen:(i + 1) * seqlen].tolist()
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.array(llm.scores[:seqlen - 1], dtype=np.float32))
        total -= float(torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:])[:, None]).sum())
        count += seqlen - 1
    return float(np.exp(total / count))


def llama_cpp_speed(path: Path, prompt: int = 512, decode: int = 64) -> dict | None:
    """llama.cpp's own speed on the file (llama-cpp-python, 2 threads): prompt tokens/s over one
    `prompt`-token batch, and decode tokens/s over `decode` single-token steps after it (what
    llama-bench's pp512 / tg64 measure)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import time

    from compressor import data
    from compressor.model import ModelSource, load_tokenizer

    tokenizer = load_tokenizer(ModelSource(str(HERE / "work" / "smollm2-fp32")))
    ids = data.evaluation_ids(tokenizer, "wikitext2", data.resolve_data_dir(None))[0].tolist()
    llm = llama_cpp.Llama(str(path), n_ctx=prompt + decode, n_batch=prompt, verbose=False, n_threads=2)
    llm.eval(ids[:prompt])  # warm-up
    llm.reset()
    started = time.perf_counter()
    llm.eval(ids[:prompt])
    prefill = prompt / (time.perf_counter() - started)
    started = time.perf_counter()
    for token in ids[prompt:prompt + decode]:
        llm.eval([token])
    return {"prefill_tps": prefill, "decode_tps": decode / (time.perf_counter() - started)}


def cpu_name() -> str:
    """The CPU's model name and widest vector extension: llama.cpp's speeds depend on both."""
    import platform

    flags, name = "", platform.processor()
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                     if line.startswith("model name")), name)
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    return f"{name}, {'AVX-512' if ' avx512f' in flags else 'AVX2'}"


def run_gguf(model: Path) -> str:
    """GPTQ onto each GGUF type or preset (compress quantize --format gguf:TYPE), one GGUF file each,
    evaluated through transformers on the first 8 windows of the benchmark protocol."""
    WORK.mkdir(parents=True, exist_ok=True)
    calibration = ["--calibration", "c4", "--samples", "128", "--seqlen", "512", "--seed", "0",
                   "--device", "cpu"]
    rows = []
    for gguf_type, solver, options in GGUF_ROWS:
        name = "-".join([solver, *(option.lstrip("-") for option in options), gguf_type])
        path = WORK / f"{name}.gguf"
        record = WORK / f"{name}.json"
        done_row = WORK / f"{name}.row.json"  # a finished row is kept (resumable suite)
        if done_row.is_file() and (not path.is_file() or done_row.stat().st_mtime >= path.stat().st_mtime):
            rows.append(json.loads(done_row.read_text()))
            continue
        if not record.is_file() or not path.is_file():
            done = subprocess.run(["compress", "quantize", "--format", f"gguf:{gguf_type}",
                                   "--method", solver, *options, str(model), *calibration, "-o", str(path),
                                   "--overwrite", "--json"],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{gguf_type}: {done.stderr}")
            record.write_text(done.stdout)
        made = json.loads(record.read_text())
        evaluation = json.loads(subprocess.run(
            ["compress", "eval", str(path), "--baseline", str(model), "--windows", "8", "--json"],
            capture_output=True, text=True, check=True).stdout)
        rows.append({"type": gguf_type, "solver": " ".join([solver, *options]), "cpu": cpu_name(),
                     "mib": path.stat().st_size / 2**20,
                     "llama_cpp_ppl": llama_cpp_ppl(path), **(llama_cpp_speed(path) or {}),
                     "ppl": evaluation["perplexity"]["ppl"],
                     "dense_ppl": evaluation["baseline_perplexity"]["ppl"],
                     "kl": evaluation["kl"]["kl"], "compress_seconds": made["seconds"]["compress"],
                     "exact": made["gguf"]["max_scale_rounding"] == 0.0})
        done_row.write_text(json.dumps(rows[-1]))
        print(json.dumps(rows[-1]), flush=True)
    header = ["| type | solver | file MiB | wt2 ppl (8 windows) | vs dense | KL | same file in llama.cpp "
              "| llama.cpp prompt / decode tok/s | compress s | llama-quantize MiB | llama-quantize ppl "
              "| vs llama-quantize | CPU |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def table(rows: list[dict]) -> list[str]:
        lines = []
        for row in rows:
            ref = LLAMA_CPP.get(row["type"])
            versus = f"{row['ppl'] / ref[1] - 1:+.1%}" if ref else "-"
            lines.append(f"| {row['type'].upper()} | {row.get('solver', 'gptq')} | {row['mib']:.1f} "
                         f"| {row['ppl']:.3f} | {row['ppl'] / row['dense_ppl']:.3f} "
                         f"| {row['kl']:.4f} | {row['llama_cpp_ppl'] or 0:.3f} "
                         f"| {row.get('prefill_tps', 0):.0f} / {row.get('decode_tps', 0):.0f} "
                         f"| {row['compress_seconds']:.0f} "
                         f"| {ref[0] if ref else '-'} | {ref[1] if ref else '-'} "
                         f"| {versus} | {row.get('cpu', '-')} |")
        return lines

    lines = ["# gguf benchmark: this project onto llama.cpp's block types vs llama-quantize "
             "(SmolLM2-135M)", "",
             "`compress quantize --format gguf:TYPE --method SOLVER` (calibration c4 128 x 512): gptq = "
             "GPTQ onto the blocks fitted with the Hessian's diagonal as importance; imatrix = "
             "llama-quantize's importance-weighted rounding onto the same blocks; both then refit the "
             "blocks' float16 numbers for the least output error. One GGUF file, read back through "
             "transformers; perplexity on the first 8 windows of the benchmark protocol (as "
             "REFERENCE.md's llama.cpp rows, llama-quantize with an importance matrix from the same "
             "calibration windows). "
             "Command: `python bench/run.py gguf`.", "", *header, *table(rows)]
    if rows:
        lines.append(f"\nDense fp32 on the same 8 windows: {rows[0]['dense_ppl']:.3f} (REFERENCE: 19.134).")
    ablation = sorted((WORK / "ablation-llama-fallback").glob("*.row.json"))
    if ablation:
        lines += ["", "Ablation, the same presets with llama.cpp's own fallback for Q2_K/Q3_K rows that are "
                  "not a multiple of 256 (Q4_0 instead of IQ4_NL; the same file size), made before the "
                  "fallback changed:", "",
                  "| type | file MiB | wt2 ppl (8 windows) | KL | same file in llama.cpp |",
                  "|---|---|---|---|---|"]
        for path in ablation:
            row = json.loads(path.read_text())
            lines.append(f"| {row['type'].upper()} (Q4_0 fallback) | {row['mib']:.1f} | {row['ppl']:.3f} "
                         f"| {row['kl']:.4f} | {row['llama_cpp_ppl'] or 0:.3f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gguf.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = "\n".join(lines) + "\n"
    (RESULTS / "gguf.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from prepare import prepare

    print(run_deploy(prepare(HERE / "work" / "smollm2-fp32")))
