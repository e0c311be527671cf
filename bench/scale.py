"""`python bench/run.py scale`: a model larger than the memory budget, streamed block by block.

Makes a random-initialised Llama shaped like TinyLlama-1.1B (22 blocks, hidden 2048, MLP 5632,
GQA 32/4 heads, vocabulary 32000, untied head) and saves it in bfloat16 (about 2.2 GB), then:

1. quantizes it to W4 g64 (GPTQ, asymmetric) in a fresh process: time and peak RSS (the target is
   under 1.2 GB, about half the model's own size on disk);
2. runs the same command again, SIGKILLs it once half the blocks are written, resumes it with
   --resume, and compares the checkpoint's SHA-256 with the uninterrupted run's;
3. loads the checkpoint in transformers and checks the logits are finite.

The tokenizer is a byte-level BPE trained here on the calibration text (ids stay below 32000);
random weights make the perplexity meaningless, so this suite measures memory, time and bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
MODEL = WORK / "tinyllama-shaped-random-bf16"
CALIBRATION = ["--calibration", "c4", "--samples", "32", "--seqlen", "512", "--seed", "0", "--device", "cpu"]
COMMAND = ["quantize", "--bits", "4", "--group-size", "64", "--asym", "--method", "gptq", *CALIBRATION,
           "--batch-size", "2", "--low-memory"]


def make_model() -> Path:
    if (MODEL / "config.json").is_file():
        return MODEL
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    sys.path.insert(0, str(HERE.parent))
    from compressor.data import load_documents, resolve_data_dir

    config = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    partial = MODEL.with_name(MODEL.name + ".partial")
    model.save_pretrained(partial)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(load_documents("c4", resolve_data_dir())[:5000], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>").save_pretrained(partial)
    os.replace(partial, MODEL)
    return MODEL


def compress(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(["compress", *args, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"compress failed ({process.returncode}):\n{stderr[-3000:]}")
    return json.loads(stdout)


def kill_halfway(out: Path, blocks: int) -> float:
    """Start the run, SIGKILL it once half the blocks are on disk; returns seconds it ran."""
    start = time.perf_counter()
    process = compress([*COMMAND, str(MODEL), "-o", str(out), "--overwrite"])
    progress = out.with_name(f".{out.name}.partial") / ".resume" / "progress.json"
    while process.poll() is None:
        try:
            if json.loads(progress.read_text())["blocks_done"] >= blocks // 2:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return time.perf_counter() - start
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise SystemExit("the run finished before it could be killed")


def load_check(out: Path) -> dict:
    code = (
        "import json, sys, torch; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained('{out}', dtype=torch.bfloat16).eval();"
        "x = torch.randint(0, 8000, (1, 32)); y = m(x).logits;"
        "print(json.dumps({'finite': bool(torch.isfinite(y).all()), 'shape': list(y.shape),"
        " 'class': type(m).__name__}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"transformers could not load {out}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_scale(resume: bool = False) -> dict:
    """`resume`: reuse the uninterrupted run's checkpoint if an earlier run of this command made it."""
    model = make_model()
    disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    done = WORK / "scale-w4g64" / "compress.json"
    if resume and done.is_file() and json.loads(done.read_text())["source"]["path"] == str(model):
        whole = json.loads(done.read_text())
    else:
        whole = finish(compress([*COMMAND, str(model), "-o", str(WORK / "scale-w4g64"), "--overwrite"]))
    # A staging folder left by an earlier interrupted benchmark would look half done at once.
    shutil.rmtree(WORK / ".scale-w4g64-resumed.partial", ignore_errors=True)
    killed_after = kill_halfway(WORK / "scale-w4g64-resumed", 22)
    resumed = finish(compress([*COMMAND, str(model), "-o", str(WORK / "scale-w4g64-resumed"), "--resume"]))
    result = {
        "model": {"path": str(model), "parameters": "1.10B", "bytes_on_disk": disk, "dtype": "bfloat16"},
        "command": "compress " + " ".join(COMMAND) + " MODEL",
        "peak_rss_mb": whole["peak_rss_mb"], "seconds": whole["seconds"],
        "streamed": whole["streamed"], "bpw": whole["bpw"]["stored"],
        "weights_bytes": whole["size"]["weights_bytes"], "sha256": whole["checksum"]["sha256"],
        "killed_after_s": round(killed_after, 1), "resumed_at_block": resumed["resumed_at_block"],
        "resumed_peak_rss_mb": resumed["peak_rss_mb"], "resumed_sha256": resumed["checksum"]["sha256"],
        "identical_after_resume": resumed["checksum"] == whole["checksum"],
        "transformers_load": load_check(WORK / "scale-w4g64"),
    }
    return result
