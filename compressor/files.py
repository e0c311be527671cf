"""Checkpoint files: their names, where a tensor lives, and writing so that a reader never sees half
of one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

from compressor.errors import CompressorError

CACHE_ENV = "COMPRESSOR_CACHE"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def cache_dir(kind: str) -> Path:
    """Where results worth keeping between runs go: $COMPRESSOR_CACHE, else ~/.cache/compressor."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "compressor"
    return Path(root) / kind


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a checkpoint written by write_shards."""
    if (folder / INDEX_NAME).is_file():
        index = json.loads((folder / INDEX_NAME).read_text())
        return {key: folder / name for key, name in index["weight_map"].items()}
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
        return {key: folder / WEIGHTS_NAME for key in handle.keys()}


def tensor_reader(folder: Path):
    """(tensor name -> file, read(key, optional=False) -> tensor) over a checkpoint's files; a
    missing tensor is one clear error (or None when optional)."""
    files = tensor_files(folder)
    handles = {path: safe_open(str(path), framework="pt") for path in set(files.values())}

    def read(key: str, optional: bool = False):
        if key not in files:
            if optional:
                return None
            raise CompressorError(f"{folder}: tensor {key} is missing")
        return handles[files[key]].get_tensor(key)

    return files, read


def atomic_write(path: Path, write) -> None:
    """write(temporary path), then rename: a reader never sees half a file. A failed write (a full
    disk, a quota) is one clear error."""
    partial = path.with_name(path.name + ".tmp")
    try:
        write(partial)
        os.replace(partial, path)
    except Exception as error:  # noqa: BLE001 - safetensors and torch wrap OSError their own way
        partial.unlink(missing_ok=True)
        if isinstance(error, CompressorError):
            raise
        first = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise CompressorError(f"cannot write {path}: {first}")
