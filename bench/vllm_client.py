"""vLLM as a real client of our checkpoints: run with the Python of vLLM's own virtual environment
(vLLM pins another transformers; see README "Serving with vLLM"), never the project's.

    VENV/bin/python bench/vllm_client.py CHECKPOINT WINDOWS.json

WINDOWS.json holds token-id windows (lists of ints). Prints one JSON line: the mean negative
log-likelihood vLLM gives the windows' tokens (each window scored from its second token, as
prompt log-probabilities), or the first line of the error when vLLM refuses the checkpoint.
Imports nothing from this project: the environment has vLLM and its own dependencies only.

vLLM's CPU build ships its int4 weight-only kernel (cpu_gemm_wna16) in its AVX-512 library only;
on an AVX2 CPU (this AMD EPYC) every int4 checkpoint fails at the first forward. There the client
swaps that one kernel for a reference: the layer's parameters as vLLM loaded them (its scheme, its
weight loaders, its transposes) dequantized with vLLM's own unpacking and type bias, then a plain
matmul. Everything up to the kernel is vLLM's; the result says which path ran ("kernel").
"""

from __future__ import annotations

import json
import os
import sys
import time

ENVIRONMENT = {  # the CPU build, one process, no thread pinning, weight-only int4 kernel
    "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_INT4_W4A8": "0",
}


def use_reference_kernel() -> None:
    """Replace CPUWNA16LinearKernel's packing and kernel call by dequantize + matmul (see above)."""
    import torch
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32

    def process_weights_after_loading(self, layer):
        w_q, w_s, w_zp = self._get_weight_params(layer)
        codes = w_q.data.t() if w_q.input_dim == 1 else w_q.data  # -> [in/8, out], packed along in
        scales = w_s.data.t() if w_s.output_dim == 0 else w_s.data  # -> [groups, out]
        codes = unpack_quantized_values_into_int32(codes.contiguous(), self.config.weight_type, 0)
        if self.config.zero_points:
            zeros = w_zp.data.t() if w_zp.output_dim == 0 else w_zp.data  # -> [groups, out/8]
            zeros = unpack_quantized_values_into_int32(zeros.contiguous(), self.config.weight_type, 1)
        else:
            zeros = torch.full_like(scales, self.config.weight_type.bias, dtype=torch.int32)
        group = self.config.group_size if self.config.group_size != -1 else codes.shape[0]
        index = torch.arange(codes.shape[0]) // group
        dense = (codes - zeros[index]).to(torch.float32) * scales[index].to(torch.float32)
        layer.reference_weight = torch.nn.Parameter(dense.to(scales.dtype), requires_grad=False)

    def apply_weights(self, layer, x, bias=None):
        out = x @ layer.reference_weight
        return out if bias is None else out + bias

    CPUWNA16LinearKernel.process_weights_after_loading = process_weights_after_loading
    CPUWNA16LinearKernel.apply_weights = apply_weights


def main() -> None:
    folder, windows_file = sys.argv[1], sys.argv[2]
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    windows = json.loads(open(windows_file).read())
    started = time.perf_counter()
    try:
        import torch
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform

        current_platform.import_kernels()  # loads vllm._C_AVX512 or vllm._C_AVX2 as torch.ops._C
        kernel = "cpu_gemm_wna16" if hasattr(torch.ops._C, "cpu_gemm_wna16") else "reference"
        if kernel == "reference":
            use_reference_kernel()

        llm = LLM(model=folder, dtype="bfloat16", max_model_len=max(len(w) for w in windows) + 16,
                  enforce_eager=True)
    except Exception as error:  # noqa: BLE001 - the refusal is the result
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        print(json.dumps({"served": False, "error": lines[0][:300]}))
        return
    load_seconds = time.perf_counter() - started
    prompts = [TokensPrompt(prompt_token_ids=list(w)) for w in windows]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0))
    total, count = 0.0, 0
    for window, output in zip(windows, outputs, strict=True):
        for token, logprobs in zip(window[1:], output.prompt_logprobs[1:], strict=True):
            total -= logprobs[token].logprob
            count += 1
    print(json.dumps({"served": True, "nll": total / count, "tokens": count, "vllm": vllm.__version__,
                      "kernel": kernel, "load_seconds": round(load_seconds, 1)}))


if __name__ == "__main__":
    main()
