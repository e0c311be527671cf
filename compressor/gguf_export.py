"""`compress export CKPT --to gguf`: a checkpoint of this project as one GGUF file for llama.cpp
(and Ollama, LM Studio; transformers reads it back dequantized).

The integer layouts whose grid GGUF has are written code for code, with no requantization:

    ours                       GGUF   one block of 32 weights            value
    4-bit symmetric, g32       Q4_0   d, 16 bytes of nibbles             d * (q - 8)
    4-bit asymmetric, g32      Q4_1   d, m, 16 bytes                     d * q + m    (m = -d * zero)
    5-bit symmetric, g32       Q5_0   d, 32 high bits, 16 bytes          d * (q - 16)
    5-bit asymmetric, g32      Q5_1   d, m, 32 high bits, 16 bytes       d * q + m
    8-bit symmetric, g32       Q8_0   d, 32 int8                         d * (q - 128)

(byte j of the 16 holds element j in its low nibble and element j + 16 in its high one; d and m
are float16, so a float32 scale is rounded once: that is the only change). A layer on any other
grid has no GGUF block that holds its codes: the export refuses it, or with `--requantize TYPE`
dequantizes it and rounds it again onto TYPE (lossy, said so in the result). Embeddings are
written at `--embeddings` (q8_0 as llama.cpp's presets; f16, f32), norms in float32, unquantized
linears in float16. Llama-family q/k rows are permuted as llama.cpp's converter does (its rotary
embedding pairs adjacent dimensions; transformers undoes the permutation when it reads the file).
Tokenizer metadata is copied from the source GGUF when the model came from one, else built from the
checkpoint's tokenizer.json.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compressor import gguf_quants
from compressor.engines import llama_cpp_reason
from compressor.errors import CompressorError
from compressor.files import tensor_reader
from compressor.fp4load import read_config
from compressor.gguf_quants import GgufType
from compressor.model import BINARY_QUANT_METHOD, GGUF_QUANT_METHOD, LUT_QUANT_METHOD, read_json
from compressor.runtime import PACKED_SUFFIXES, StoredLinear, _targets, read_linear

# model_type -> (llama.cpp architecture, q/k rows permuted as its converter does)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
BLOCK = 32
EMBEDDING_TYPES = ("auto", "q8_0", "q6_k", "q4_k", "f16", "f32")


@dataclass
class ExportResult:
    output: str
    tensors: dict  # GGUF type name -> count
    exact_layers: int
    requantized_layers: int
    bytes: int
    max_scale_rounding: float  # largest relative change of a scale rounded to float16


# The legacy block types that hold this project's integer codes exactly: (bits, symmetric), groups of 32.
LEGACY = {"q4_0": (4, True), "q4_1": (4, False), "q5_0": (5, True), "q5_1": (5, False), "q8_0": (8, True)}


def exact_type(stored: StoredLinear):
    """The GGUF type that holds these codes exactly, or None."""
    from gguf import GGMLQuantizationType

    if stored.width != BLOCK or stored.codes.shape[1] % BLOCK or stored.g_idx is not None:
        return None
    by_grid = {grid: GGMLQuantizationType[name.upper()] for name, grid in LEGACY.items()}
    return by_grid.get((stored.bits, stored.zero is None))


def encode_blocks(stored: StoredLinear, qtype) -> np.ndarray:
    """The GGUF bytes [rows, blocks * block_bytes] of codes on an exact_type grid: our scale is the
    block's d and, asymmetric, m = -scale * zero (compressor.gguf_quants lays the bytes out)."""
    dmin = None if stored.zero is None else (-stored.scale * stored.zero).to(torch.float16)
    header = gguf_quants.BlockHeader(GgufType.parse(qtype.name), stored.scale.to(torch.float16), dmin=dmin)
    return gguf_quants.encode(stored.codes.to(torch.uint8), header)


def dequantized(stored: StoredLinear) -> torch.Tensor:
    index = torch.arange(stored.codes.shape[1]) // stored.width
    if stored.g_idx is not None:
        index = stored.g_idx.long()
    zero = stored.zero if stored.zero is not None else torch.full_like(stored.scale, 2 ** (stored.bits - 1))
    return (stored.codes.float() - zero[:, index]) * stored.scale[:, index]


def permute_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k order: within each head, the two rotate-half halves interleaved."""
    rows = tensor.shape[0]
    order = torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)
    return tensor[order]


def _stored_permuted(stored: StoredLinear, heads: int) -> StoredLinear:
    return StoredLinear(permute_rows(stored.codes, heads), permute_rows(stored.scale, heads),
                        None if stored.zero is None else permute_rows(stored.zero, heads),
                        stored.bits, stored.width, stored.g_idx)


def embedding_type(kind: str, width: int) -> str:
    """`auto`: llama.cpp's presets' type for the output (and a tied token embedding): Q6_K, or Q8_0
    where rows are not a multiple of 256."""
    if kind != "auto":
        return kind
    return "q6_k" if width % gguf_quants.QK_K == 0 else "q8_0"


def _float_tensor(tensor: torch.Tensor, kind: str):
    """(data, raw type) for a float tensor at f32 / f16 / q8_0 (gguf-py's, as llama.cpp rounds it) /
    a K-quant (compressor.gguf_quants, round to nearest)."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    array = tensor.float().numpy()
    if kind == "f32":
        return array, T.F32
    if kind == "f16":
        return array.astype(np.float16), T.F16
    if kind == "q8_0":
        return quants.quantize(array, T.Q8_0), T.Q8_0
    qtype = GgufType.parse(kind)
    codes, header = gguf_quants.quantize(tensor.float(), qtype)
    return gguf_quants.encode(codes, header), qtype.ggml


def _architecture_metadata(writer, config, arch: str) -> None:
    text = getattr(config, "text_config", config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    rope = getattr(text, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise CompressorError(f"rope scaling {rope.get('rope_type')!r}: not written to GGUF here")
    theta = rope.get("rope_theta") or getattr(text, "rope_theta", 10000.0)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(text, "num_key_value_heads", heads))
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(text.vocab_size)


def _tokenizer_metadata(writer, folder: Path, source_gguf: str | None, vocab_size: int) -> None:
    from gguf import GGUFReader, GGUFValueType, SpecialVocab, TokenType
    from gguf.vocab import BpeVocab

    if source_gguf and Path(source_gguf).is_file():
        reader = GGUFReader(source_gguf)
        for key, field in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = field.types[0]
            sub_type = field.types[1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type)
        return
    if not (folder / "tokenizer.json").is_file():
        raise CompressorError(f"{folder}: no tokenizer.json to describe the vocabulary in the GGUF file")
    vocab = BpeVocab(folder)
    tokens, scores, types = (list(column) for column in zip(*vocab.all_tokens(), strict=True))
    # llama.cpp sizes the embedding by the token list: pad it to the model's vocabulary (a
    # vocabulary rounded up for the matmuls) with unused placeholders, as its converter does.
    padding = vocab_size - len(tokens)
    tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), vocab_size)]
    types += [TokenType.UNUSED] * max(padding, 0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)


def check_gguf_architecture(config) -> tuple[str, bool]:
    """(llama.cpp architecture, q/k rows permuted) of a config (a dict or a transformers config)."""
    raw = config if isinstance(config, dict) else config.to_dict()
    model_type = raw.get("compressor_model_type", raw.get("model_type"))  # guarded own layouts
    if model_type not in ARCHITECTURES:
        raise CompressorError(f"architecture {model_type!r} has no llama.cpp name known here; supported: "
                              f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def export_gguf(folder: str | Path, output: str | Path, embeddings: str = "auto",
                requantize: str | None = None, overwrite: bool = False) -> ExportResult:
    """Write `folder` (a checkpoint of this project, or a dense model folder) as a GGUF file."""
    import gguf
    from transformers import AutoConfig

    folder, output = Path(folder), Path(output)
    if embeddings not in EMBEDDING_TYPES:
        raise CompressorError(f"unknown --embeddings {embeddings!r}; choose {', '.join(EMBEDDING_TYPES)}")
    if requantize is not None:
        requantize = GgufType.parse(requantize)
    if output.exists() and not overwrite:
        raise CompressorError(f"output file exists: {output} (pass --overwrite to replace it)")
    if not (folder / "config.json").is_file():
        raise CompressorError(f"{folder} is not a checkpoint folder (no config.json)")
    raw = read_json(folder / "config.json")
    arch, permute = check_gguf_architecture(raw)
    qconfig = raw.get("quantization_config") or {}
    blocks = qconfig.get("types", {}) if qconfig.get("quant_method") == GGUF_QUANT_METHOD else {}
    own_type = {LUT_QUANT_METHOD: "lut", BINARY_QUANT_METHOD: "binary"}.get(qconfig.get("quant_method"))
    if own_type is not None:
        raise CompressorError(f"{folder}: " + llama_cpp_reason({"type": own_type}, qconfig.get("format", ""),
                                                               (0, 0)))
    if qconfig and not blocks and qconfig.get("quant_method") != "compressed-tensors":
        raise CompressorError(f"{folder}: {qconfig.get('quant_method')} layouts are not exported to GGUF")
    config = read_config(folder) if "compressor_model_type" in raw else AutoConfig.from_pretrained(folder)
    text = getattr(config, "text_config", config)
    files, read = tensor_reader(folder)

    modules = {key.rsplit(".", 1)[0] for key in files}
    targets = {}
    if qconfig and not blocks:
        targets = _targets(qconfig, {name: torch.nn.Linear(1, 1) for name in modules})
    for name, args in targets.items():
        if args.get("type", "int") != "int":
            raise CompressorError(f"{name}: 4-bit float layers are not exported to GGUF yet")
    manifest = read_json(folder / "compress.json") if (folder / "compress.json").is_file() else {}
    source_gguf = (manifest.get("source") or {}).get("gguf_file")
    if source_gguf and not Path(source_gguf).is_absolute():
        source_gguf = str(Path((manifest.get("source") or {}).get("path", "")) / source_gguf)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], text.num_hidden_layers)
    heads = {"q_proj": text.num_attention_heads,
             "k_proj": getattr(text, "num_key_value_heads", text.num_attention_heads)}
    staging = output.with_name(f".{output.name}.partial")
    writer = gguf.GGUFWriter(staging, arch)
    counts: dict[str, int] = {}
    exact = requantized = 0
    worst = 0.0
    try:
        writer.add_name(manifest.get("source", {}).get("path", folder.name) if manifest else folder.name)
        _architecture_metadata(writer, config, arch)
        _tokenizer_metadata(writer, folder, source_gguf, text.vocab_size)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tied = bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
        packed = {f"{name}.{suffix}" for name in targets for suffix in PACKED_SUFFIXES}
        packed |= {f"{name}.{suffix}" for name in blocks for suffix in ("weight_gguf", "weight_shape")}
        keys = sorted((files.keys() - packed) | {f"{name}.weight" for name in (*targets, *blocks)})
        for key in keys:
            module, _, suffix = key.rpartition(".")
            if tied and key == "lm_head.weight":
                continue
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise CompressorError(f"{key}: no GGUF tensor name for it in llama.cpp's {arch} map")
            local = module.rsplit(".", 1)[-1]
            row_heads = heads.get(local) if permute and suffix == "weight" else None
            if module in blocks and suffix == "weight":  # GGUF blocks already: rows copied as they are
                data = read(f"{module}.weight_gguf")
                if row_heads:
                    data = permute_rows(data, row_heads)
                qtype = GgufType.parse(blocks[module]).ggml
                data = data.numpy()
                exact += 1
                writer.add_tensor(gguf_name, data, raw_dtype=qtype)
            elif module in targets and suffix == "weight":
                stored = read_linear(module, targets[module], read)
                if row_heads:
                    stored = _stored_permuted(stored, row_heads)
                qtype = exact_type(stored)
                if qtype is not None:
                    data = encode_blocks(stored, qtype)
                    half = stored.scale.to(torch.float16).float()
                    rounding = ((half - stored.scale).abs() / stored.scale.abs().clamp_min(1e-30)).max()
                    worst = max(worst, float(rounding))
                    exact += 1
                elif requantize is not None:
                    weight = dequantized(stored)
                    fitting = gguf_quants.fitting_type(requantize, weight.shape[1])
                    data = gguf_quants.encode(*gguf_quants.quantize(weight, fitting))
                    qtype = fitting.ggml
                    requantized += 1
                else:
                    kind = "symmetric" if stored.zero is None else "asymmetric"
                    raise CompressorError(
                        f"{module}: {stored.bits}-bit {kind} groups of {stored.width} have no GGUF block "
                        "type (exact: 4/5-bit or 8-bit symmetric in groups of 32); --requantize TYPE rounds "
                        "the dequantized weights again (lossy)")
                writer.add_tensor(gguf_name, data, raw_dtype=qtype)
            else:
                tensor = read(key)
                if row_heads and tensor.dim() >= 1:
                    tensor = permute_rows(tensor, row_heads)
                if "embed" in module or module == "lm_head":
                    data, qtype = _float_tensor(tensor, embedding_type(embeddings, tensor.shape[-1]))
                elif tensor.dim() == 2:
                    data, qtype = _float_tensor(tensor, "f16")
                else:
                    data, qtype = _float_tensor(tensor, "f32")
                writer.add_tensor(gguf_name, data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        main = max((t for t in counts if t not in ("F32", "F16")), key=counts.get, default="F16")
        writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{main}", gguf.LlamaFileType.MOSTLY_F16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, output)
    except BaseException:
        writer.close()
        staging.unlink(missing_ok=True)
        raise
    return ExportResult(str(output), counts, exact, requantized, output.stat().st_size, worst)


def summary(result: ExportResult) -> dict:
    return dataclasses.asdict(result)
