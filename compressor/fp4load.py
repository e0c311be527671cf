"""Loading a checkpoint in the LLM-FP4 layout, which no engine reads: each row of a linear has its
own 4-bit format (E3M0, E2M1 or E1M2) and exponent bias, stored as

    weight_packed  uint8 [out, in/2]   two codes per byte, the even column in the low nibble
    weight_format  uint8 [out]         index into quantization_config["row_formats"]
    weight_scale   float32 [out, 1]    2^-bias
    weight_shape   int64 [2]

The model is built from its config and every weight is filled from the files, the packed linears
dequantized exactly as the compression pass computed them (so logits match bit for bit).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from compressor import fpgrids
from compressor.errors import CompressorError

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"


def _tensor_files(folder: Path) -> dict[str, Path]:
    if (folder / INDEX_NAME).is_file():
        index = json.loads((folder / INDEX_NAME).read_text())
        return {key: folder / name for key, name in index["weight_map"].items()}
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
        return {key: folder / WEIGHTS_NAME for key in handle.keys()}


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, path in _tensor_files(folder).items():
        with safe_open(str(path), framework="pt") as handle:
            tensors[key] = handle.get_tensor(key)
    return tensors


def dequantized_state_dict(folder: Path, qconfig: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with every packed linear replaced by its float32 weight."""
    names = qconfig.get("row_formats")
    if names != [f.name for f in fpgrids.ROW_FORMATS]:
        raise CompressorError(f"unsupported LLM-FP4 row formats {names!r}")
    tensors = read_state_dict(folder)
    for module in qconfig.get("targets", []):
        try:
            packed = tensors.pop(f"{module}.weight_packed")
            row_format = tensors.pop(f"{module}.weight_format")
            scale = tensors.pop(f"{module}.weight_scale")
            shape = tensors.pop(f"{module}.weight_shape").tolist()
        except KeyError as missing:
            raise CompressorError(f"{folder}: {module} lacks tensor {missing}")
        codes = fpgrids.unpack_nibbles(packed)
        if list(codes.shape) != shape or row_format.shape[0] != shape[0]:
            raise CompressorError(f"{folder}: {module} packed tensors do not match shape {shape}")
        tensors[f"{module}.weight"] = fpgrids.row_dequantize(codes, row_format, scale)
    return tensors


def load_llm_fp4(folder: Path, config, dtype):
    """A transformers model with the LLM-FP4 weights dequantized into it."""
    from transformers import AutoModelForCausalLM

    qconfig = config.quantization_config
    config.__dict__.pop("quantization_config", None)
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in dequantized_state_dict(folder, qconfig).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CompressorError(
            f"{folder}: checkpoint does not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    model.config.quantization_config = qconfig  # kept for reports; the weights are dense now
    return model
