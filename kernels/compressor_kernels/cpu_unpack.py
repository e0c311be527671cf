"""A small C kernel for the packed CPU prefill: int4_unpack.c, compiled once per machine.

The aten-int4 prefill dequantizes each layer into a dense bfloat16 buffer before a dense GEMM
(packed_linear.py). In eager torch that takes eight ops and two strided copies, ~0.3 ms for a
1536 x 576 layer, as long as the GEMM itself at 512 rows; the C loop does it in one pass.

torch ships no such kernel for the CPU, so the source is compiled here with the system's C compiler
(`cc`, or $CC) into ~/.cache/compressor/kernels (or $COMPRESSOR_KERNEL_CACHE), keyed by the
source, the compiler and this CPU's flags (the build is -march=native), written to a temporary name
and renamed, so concurrent first uses never load a half-written library. With OpenMP it runs on
the OpenMP runtime torch has already loaded (both link libgomp.so.1), so no second thread pool
competes with torch's. Without a compiler, or with COMPRESSOR_C_KERNELS=0, `unpack_int4_transposed`
returns False and the caller keeps the eager path: slower, the same values.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("int4_unpack.c")
_LIBRARY: list[ctypes.CDLL | None] = []


def _cache_dir() -> Path:
    folder = os.environ.get("COMPRESSOR_KERNEL_CACHE")
    return Path(folder) if folder else Path.home() / ".cache" / "compressor" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str, target: Path) -> bool:
    """Compile SOURCE into `target` through a temporary name (False where that fails: no OpenMP,
    an unwritable cache, ...)."""
    staged = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, staged = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(handle)
        flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
        subprocess.run([compiler, *flags, str(SOURCE), "-o", staged], capture_output=True, check=True,
                       timeout=120)
        os.replace(staged, target)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if staged is not None:
            Path(staged).unlink(missing_ok=True)


def _compile() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, _cpu_flags()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"int4_unpack-{key}.so"
    if not target.exists() and not _build(compiler, target):
        return None
    try:
        library = ctypes.CDLL(str(target))
    except OSError:  # e.g. a cache on a noexec mount
        return None
    library.int4_unpack_transposed.restype = ctypes.c_int
    pointer, flag, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    library.int4_unpack_transposed.argtypes = [pointer, pointer, flag, pointer, flag, size, size, size, size]
    return library


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built or COMPRESSOR_C_KERNELS=0."""
    if os.environ.get("COMPRESSOR_C_KERNELS", "1") == "0":
        return None
    if not _LIBRARY:
        _LIBRARY.append(_compile())
    return _LIBRARY[0]


def unpack_int4_transposed(packed: torch.Tensor, scales_and_zeros: torch.Tensor, weight_t: torch.Tensor,
                           block: int, kernel_group: int) -> bool:
    """Write an aten-int4 layer's weight, transposed, into `weight_t` [in, out] (bfloat16 or float32)
    from the kernel layout `packed` (row blocks of `block`) and `scales_and_zeros` [groups, out, 2].
    False (nothing written) where the C kernel is unavailable or the dtypes are not ones it reads."""
    kinds = {torch.bfloat16: 1, torch.float32: 0}
    lib = library()
    if (lib is None or weight_t.dtype not in kinds or scales_and_zeros.dtype not in kinds
            or packed.device.type != "cpu" or not weight_t.is_contiguous()):
        return False
    in_features, out_features = weight_t.shape
    params, codes = scales_and_zeros.contiguous(), packed.contiguous()  # held: ctypes takes raw pointers
    failed = lib.int4_unpack_transposed(codes.data_ptr(), params.data_ptr(),
                                        kinds[params.dtype], weight_t.data_ptr(), kinds[weight_t.dtype],
                                        out_features, in_features, block, kernel_group)
    return failed == 0
