"""Run 2:4-pruned linears through torch's semi-structured sparse kernels (CUDA only).

Checkpoints store pruned weights densely (engines dropped the 2:4 storage formats); on a CUDA
device with fp16/bf16 weights, `accelerate_2of4` swaps every linear whose weight satisfies 2:4
along the input dimension for a `torch.sparse.SparseSemiStructuredTensor`, which keeps the kept
values plus 2-bit indices and multiplies with the sparse tensor cores.
"""

from __future__ import annotations

import torch

from compressor.errors import CompressorError


def is_2of4(weight: torch.Tensor) -> bool:
    """At least two zeros in every block of four consecutive input columns."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight == 0).reshape(rows, -1, 4).sum(2) >= 2).all())


@torch.no_grad()
def accelerate_2of4(model: torch.nn.Module) -> list[str]:
    """Convert the 2:4 linears of a CUDA fp16/bf16 model in place; returns their names."""
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        if weight.device.type != "cuda":
            raise CompressorError("2:4 sparse kernels need the model on a CUDA device")
        if weight.dtype not in (torch.float16, torch.bfloat16) or not is_2of4(weight):
            continue
        module.weight = torch.nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
        converted.append(name)
    return converted
