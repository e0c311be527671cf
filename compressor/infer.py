"""Running and timing a model: greedy generation, prefill / decode tokens per second, the bytes of
weights it keeps, and how close decode comes to the machine's memory bandwidth.

Decode at batch 1 reads every weight once per token, so its speed limit is
    bandwidth / bytes of weights read per token;
`measure` reports the measured decode time against that bound (bandwidth from a large sum).
"""

from __future__ import annotations

import time

import torch

from compressor.runtime import weight_bytes


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> dict:
    """Greedy continuation of `prompt` (chat template not applied: the raw text is continued)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    start = time.perf_counter()
    output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    new = output[0, ids.shape[1]:]
    return {"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True),
            "new_tokens": int(new.numel()), "seconds": round(seconds, 3)}


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second that a reduction over a large buffer reads (best of `repeats`)."""
    buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def _median_seconds(run, repeats: int, device: torch.device | None = None) -> float:
    """Median wall time of `run`; on CUDA the queued kernels are waited for, else only their launch
    would be timed."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def measure(model, prefill_tokens: int = 512, decode_tokens: int = 64, prompt_tokens: int = 32,
            repeats: int = 3, seed: int = 0) -> dict:
    """Prefill tokens/s (one forward of prefill_tokens), decode tokens/s at batch 1 with the KV
    cache (after a prompt of prompt_tokens), and the bytes of weights the model keeps."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prefill_tokens), generator=generator).to(device)
    model(ids[:, :64], use_cache=False)  # warm-up: kernels, packing caches, allocator
    prefill = _median_seconds(lambda: model(ids, use_cache=False), repeats, device)

    def decode() -> None:
        out = model(ids[:, :prompt_tokens], use_cache=True)
        for _ in range(decode_tokens):
            out = model(out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)

    prompt = _median_seconds(lambda: model(ids[:, :prompt_tokens], use_cache=True), repeats, device)
    decode_total = _median_seconds(decode, repeats, device)
    per_token = max(decode_total - prompt, 1e-9) / decode_tokens
    return {"prefill_tokens_per_s": prefill_tokens / prefill, "decode_tokens_per_s": 1 / per_token,
            "decode_ms_per_token": per_token * 1e3, "weight_bytes": weight_bytes(model)}


def compare(rows: dict[str, dict], reference: str, bandwidth: float) -> dict[str, dict]:
    """Add each row's ratios to the reference row and its decode speed against the bandwidth bound."""
    base = rows[reference]
    for row in rows.values():
        row["decode_vs_" + reference] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["prefill_vs_" + reference] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        row["weights_vs_" + reference] = row["weight_bytes"] / base["weight_bytes"]
        bound = bandwidth / row["weight_bytes"]  # tokens/s if decode only streamed the weights
        row["bandwidth_bound_tokens_per_s"] = bound
        row["decode_fraction_of_bound"] = row["decode_tokens_per_s"] / bound
    return rows
