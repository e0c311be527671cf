"""LutLinear: an nn.Linear replacement holding codes into learned per-row tables (--format lut4|lut3).

    weight[o, i] = scale[o, i // group_width] * table[o // table_rows, code[o, i]]

The codes stay packed as compressed-tensors int32 words (bits per weight: 4 or 3), the tables and
scales in float16. Each forward unpacks this one layer, looks its codes up in the row tables and
scales them into the workspace all dequantizing layers share (compressor_kernels.packed_linear),
then runs a dense matmul: the memory of the packed layer, only one layer dense at a time. No engine
has a kernel for per-row tables; the lookup itself is one gather.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from compressor_kernels.packed_linear import _Workspace


class LutLinear(torch.nn.Module):
    """y = x W^T + b with W kept as codes into per-row tables and per-group scales."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, bits: int,
                 group_width: int, table_rows: int = 1, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32):
        """codes: unsigned [out, in] in [0, 2^bits); scale: [out, groups]; table: [tables, 2^bits]."""
        super().__init__()
        out_features, in_features = codes.shape
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_width, self.table_rows = group_width, table_rows
        signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        self.register_buffer("packed", pack_to_int32(signed, bits))
        self.register_buffer("scale", scale.to(torch.float16).contiguous())
        self.register_buffer("table", table.to(torch.float16).contiguous())
        self.register_buffer("bias", bias.to(dtype) if bias is not None else None)
        self.dtype = dtype

    @property
    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def codes(self) -> torch.Tensor:
        shape = torch.Size([self.out_features, self.in_features])
        signed = unpack_from_int32(self.packed, self.bits, shape)
        return (signed.to(torch.int16) + 2 ** (self.bits - 1)).to(torch.uint8)

    def dense_weight(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """scale * table[code], computed in float32 from the float16 numbers (as the compression
        pass and compressor.model.load_model compute it), cast to the layer's dtype."""
        rows = torch.arange(self.out_features, device=self.packed.device) // self.table_rows
        groups = torch.arange(self.in_features, device=self.packed.device) // self.group_width
        tables = self.table.float()[rows]
        weight = tables.gather(1, self.codes().long()) * self.scale.float()[:, groups]
        return weight.to(self.dtype) if out is None else out.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features).to(self.dtype)
        buffer = _Workspace.get((self.out_features, self.in_features), self.dtype, x.device)
        y = torch.nn.functional.linear(x2d, self.dense_weight(out=buffer))
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_width={self.group_width}, table_rows={self.table_rows}")
