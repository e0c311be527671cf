"""Streaming a model from its safetensors shards: one decoder block in memory at a time.

The model is built from its config with every parameter on the `meta` device (no memory), then
only what the step at hand needs is read from disk: the embeddings and norms to capture the
calibration inputs, then one decoder block, which is compressed, written and dropped again. The
input model is therefore never whole in memory, and neither is the output (compressor.writer).

Tensors are read with plain positioned reads at the offsets the safetensors header gives, rather
than through a memory map: mapped pages that have been touched count in the resident set size
until the mapping closes, and reading exactly the bytes of one block keeps the footprint at one
block. Every header is checked against the file's size when the source is opened, so a truncated
or corrupt shard fails before any work, and each tensor is checked for shape and NaN/Inf as read.
"""

from __future__ import annotations

import ctypes
import json
import struct
import warnings
from pathlib import Path

import torch

from compressor.errors import CompressorError
from compressor.files import INDEX_NAME
from compressor.model import ModelSource, decoder_blocks, load_tokenizer

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit


class SafetensorsReader:
    """Tensor name -> tensor, read on demand from the safetensors files of a model folder."""

    def __init__(self, files: list[Path]):
        self.entries: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for path in files:
            if not path.is_file():
                raise CompressorError(f"shard listed in the index is missing: {path}")
            for key, entry in read_header(path).items():
                self.entries[key] = (path, *entry)

    @classmethod
    def of_file(cls, path: Path) -> SafetensorsReader:
        return cls([Path(path)])

    @classmethod
    def of_folder(cls, folder: Path) -> SafetensorsReader:
        """Every shard of a model folder (by its index when there is one)."""
        folder = Path(folder)
        if (folder / INDEX_NAME).is_file():
            try:
                weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CompressorError(f"{folder / INDEX_NAME} is not a valid shard index: {error}")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise CompressorError(f"no .safetensors weights in {folder}")
        return cls([folder / name for name in files])

    def keys(self):
        return self.entries.keys()

    def shape(self, key: str) -> list[int]:
        return self.entries[key][2]

    def read(self, key: str) -> torch.Tensor:
        """The tensor's bytes straight into a new CPU tensor."""
        path, dtype, shape, start, end = self.entries[key]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        with open(path, "rb") as handle:
            handle.seek(start)
            if handle.readinto(buffer.numpy()) != end - start:
                raise CompressorError(f"{path}: truncated while reading {key}")
        return buffer.view(DTYPES[dtype]).reshape(shape)


def read_header(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """{name: (dtype, shape, absolute start, absolute end)}, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CompressorError(f"corrupt safetensors file {path}: shorter than its header")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise CompressorError(f"corrupt safetensors file {path}: header length {length} "
                                  f"does not fit in the file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CompressorError(f"corrupt safetensors file {path}: unreadable header ({error})")
    if not isinstance(header, dict):
        raise CompressorError(f"corrupt safetensors file {path}: header is not a JSON object")
    header.pop("__metadata__", None)
    entries = {}
    base = 8 + length
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CompressorError(f"corrupt safetensors file {path}: bad entry for {key}")
        if dtype not in DTYPES:
            raise CompressorError(f"{path}: tensor {key} has unsupported dtype {dtype}")
        expected = DTYPES[dtype].itemsize * _numel(shape)
        if not 0 <= start <= end or end - start != expected:
            raise CompressorError(f"corrupt safetensors file {path}: {key} spans {end - start} bytes, "
                                  f"its shape {shape} needs {expected}")
        if base + end > size:
            raise CompressorError(f"truncated safetensors file {path}: {key} ends at byte {base + end}, "
                                  f"the file has {size}")
        entries[key] = (dtype, list(shape), base + start, base + end)
    return entries


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def can_stream(source: ModelSource) -> bool:
    """A local folder of plain (not already quantized) safetensors weights."""
    folder = Path(source.path)
    if source.gguf_file or not folder.is_dir() or not (folder / "config.json").is_file():
        return False
    if not ((folder / INDEX_NAME).is_file() or any(folder.glob("*.safetensors"))):
        return False
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False  # the regular loader words the error
    return not config.get("quantization_config")


class NamesDiffer(CompressorError):
    """The checkpoint names its tensors otherwise than the model class (transformers renames some
    on load): the caller loads the model whole instead."""


class StreamedModel:
    """A model whose decoder blocks stay on disk until `load_block` (moving a block to the meta
    device drops it again)."""

    def __init__(self, source: ModelSource):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from compressor.model import _first_line, _quiet_loading

        _quiet_loading()
        self.source = source
        self.reader = SafetensorsReader.of_folder(Path(source.path))  # validates every shard first
        try:
            config = AutoConfig.from_pretrained(source.path)
        except Exception as error:  # noqa: BLE001 - any loader failure is a bad input here
            raise CompressorError(f"cannot read model config from {source.label}: {_first_line(error)}")
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        try:
            with init_empty_weights(include_buffers=False), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as error:
            raise CompressorError(f"{source.label} is not a causal language model: {_first_line(error)}")
        model.eval()
        model.tie_weights()  # from_config under init_empty_weights leaves them untied
        self.model = model
        self.dtype = dtype
        self.prefix, self.blocks = decoder_blocks(model)
        # named_parameters() names a tied parameter (lm_head = embed_tokens) once: the stored one.
        self.parameters = [name for name, _ in model.named_parameters()]
        missing = [key for key in self.parameters if key not in self.reader.keys()]
        if missing:
            raise NamesDiffer(f"{source.label}: the weights lack {len(missing)} tensors the config "
                              f"implies, e.g. {missing[0]}")
        self._check_all()
        buffers = set(model.state_dict()) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.outside = [k for k in self.parameters + sorted(buffers) if not self._in_blocks(k)]
        self.load_outside()

    def _check_all(self) -> None:
        """Shapes against the config, then every tensor for NaN/Inf, one tensor in memory at a time:
        a bad input fails here, not hours later at its block."""
        shapes = {name: list(param.shape) for name, param in self.model.named_parameters()}
        for key in self.parameters:
            if self.reader.shape(key) != shapes[key]:
                raise CompressorError(f"{self.source.label}: {key} has shape {self.reader.shape(key)} "
                                      f"in the weights but {shapes[key]} in config.json")
        for key in self.parameters:
            check_tensor(key, self.reader.read(key), shapes[key], self.source.label)
        return_freed_memory()

    def _in_blocks(self, key: str) -> bool:
        return key.startswith(self.prefix + ".")

    def _materialize(self, keys: list[str]) -> None:
        for key in keys:
            module_name, _, local = key.rpartition(".")
            module = self.model.get_submodule(module_name)
            tensor = self.reader.read(key)  # shape and values were checked when opened
            if tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
            module._parameters[local] = torch.nn.Parameter(tensor, requires_grad=False)

    def load_outside(self) -> None:
        """Embeddings, final norm and head: what calibration needs before block 0."""
        self._materialize([k for k in self.parameters if not self._in_blocks(k)])
        self.model.tie_weights()

    def release_outside(self) -> None:
        """Drop the embeddings and head while the blocks are processed (the writer reads them again)."""
        for key in self.parameters:
            if not self._in_blocks(key):
                module_name, _, local = key.rpartition(".")
                module = self.model.get_submodule(module_name)
                module._parameters[local] = torch.nn.Parameter(
                    torch.empty_like(module._parameters[local], device="meta"), requires_grad=False)

    def load_block(self, index: int, block: torch.nn.Module) -> None:
        block_prefix = f"{self.prefix}.{index}."
        self._materialize([k for k in self.parameters if k.startswith(block_prefix)])

    def outside_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors outside the decoder blocks as the checkpoint stores them (tied ones once)."""
        state = self.model.state_dict()
        tensors = {}
        for key in self.outside:
            if key in self.reader.keys():
                tensor = self.reader.read(key)
                tensors[key] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
            else:
                tensors[key] = state[key].detach().cpu().contiguous()  # a persistent buffer
        return tensors

    def tokenizer(self):
        return load_tokenizer(self.source)


M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc mallopt parameters


def keep_heap_small(mmap_threshold: int = 1 << 20) -> None:
    """glibc: serve allocations from 1 MiB up with their own mappings, returned to the OS when
    freed, and use two arenas. By default glibc raises that threshold up to 32 MiB as large blocks
    are freed and gives each thread an arena, so freed tensors stay resident: about half a GB
    on a 1B model. A little slower (fresh pages are faulted in). A no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it for reuse otherwise, and it would
    count in the resident set size as if still in use). A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def keep_freed_memory() -> None:
    """Make glibc reuse freed memory instead of returning it to the OS: a training step frees and
    allocates the same gigabytes of activations every step, and on a VM each re-touched page is a
    fault (measured on this machine: a SmolLM2 distillation step 45 s -> 27 s). Large blocks come
    from the heap instead of mmap, and the heap is never trimmed. A no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no block from mmap (unmapped when freed): all from the heap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD (a C int): trim only past 2 GiB free at the top
        libc.mallopt(-2, 2**31 - 1)  # M_TOP_PAD: and keep 2 GiB when it does
    except (OSError, AttributeError):
        pass


def check_tensor(key: str, tensor: torch.Tensor, shape: list[int], label: str) -> None:
    if list(tensor.shape) != shape:
        raise CompressorError(f"{label}: {key} has shape {list(tensor.shape)} in the weights but "
                              f"{shape} in config.json")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CompressorError(f"{label}: tensor {key} contains NaN or Inf values")
