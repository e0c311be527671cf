"""Calibration over several processes with torch.distributed (`torchrun --nproc-per-node N -m compressor`).

Each rank runs the same pipeline on its share of the calibration windows (rank r takes windows
r, r + N, ...). At each sub-group, before it is compressed, the input statistics are summed over
the ranks (all-reduce), so every rank compresses from the statistics of all the windows; rank 0's
compressed weights are then broadcast so the ranks propagate identical activations. Only rank 0
writes. Gloo on the CPU, NCCL on CUDA. With one process every function here does nothing.
"""

from __future__ import annotations

import os

import torch

from compressor.errors import CompressorError


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def init_from_environment(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)


def shard_windows(ids: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows: every world_size-th, starting at its rank."""
    if world_size() == 1:
        return ids
    if ids.shape[0] < world_size():
        raise CompressorError(f"{ids.shape[0]} calibration windows cannot be split over "
                              f"{world_size()} processes; use --samples >= {world_size()}")
    return ids[rank()::world_size()]


def _device_of(tensor: torch.Tensor) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _backend() == "nccl" else tensor.device


def _backend() -> str:
    return torch.distributed.get_backend() if active() else "none"


def all_reduce_sum_(tensor: torch.Tensor) -> None:
    _all_reduce_(tensor, "SUM")


def all_reduce_max_(tensor: torch.Tensor) -> None:
    _all_reduce_(tensor, "MAX")


def _all_reduce_(tensor: torch.Tensor, op: str) -> None:
    if not active():
        return
    device = _device_of(tensor)
    moved = tensor.to(device)
    torch.distributed.all_reduce(moved, op=getattr(torch.distributed.ReduceOp, op))
    if moved is not tensor:
        tensor.copy_(moved)


def broadcast_(tensor: torch.Tensor, source: int = 0) -> None:
    if not active():
        return
    device = _device_of(tensor)
    moved = tensor.to(device)
    torch.distributed.broadcast(moved, src=source)
    if moved is not tensor:
        tensor.copy_(moved)


def all_gather_objects(value) -> list:
    if not active():
        return [value]
    gathered = [None] * world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def finish() -> None:
    if active():
        torch.distributed.destroy_process_group()
