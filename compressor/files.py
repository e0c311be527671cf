"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
from pathlib import Path

from compressor.errors import CompressorError


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
