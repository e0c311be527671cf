"""BinaryLinear: an nn.Linear replacement holding PTQ1.61's layout (--method ptq161).

A few salient input channels S hold 4-bit codes on a per-row grid; every other channel holds one
sign bit, scaled per row and per column:

    y[r] = scale[r] * (x_S . code[r]) + low[r] * sum(x_S)
         + alpha[r] * ((x_B * column) . sign[r]) + beta[r] * sum(x_B * column)

so the layer runs as two small matmuls against the codes and the +-1 signs, with the per-row numbers
applied to the outputs: no weight is multiplied by its scale. The codes and signs stay packed in
int32 words in memory (as on disk: about 1.7 bits per weight); each forward unpacks this one layer
into the workspace all dequantizing layers share (compressor_kernels.packed_linear).
"""

from __future__ import annotations

import torch

from compressor_kernels.packed_linear import _Workspace


def _unpack(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of `bits` bits from int32 words, lowest bits first."""
    shifts = torch.arange(32 // bits, device=words.device, dtype=torch.int64) * bits
    codes = ((words.to(torch.int64) & 0xFFFFFFFF)[:, None] >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:count]


class BinaryLinear(torch.nn.Module):
    """y = x W^T + b with W in PTQ1.61's layout (see the module docstring)."""

    def __init__(self, mask: torch.Tensor, salient: torch.Tensor, signs: torch.Tensor, row: torch.Tensor,
                 column: torch.Tensor, salient_bits: int, out_features: int, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32):
        """mask: bool [in] (salient channels); salient, signs: the packed int32 words of the
        checkpoint (weight_salient, weight_signs); row: [out, 4] scale, low, alpha, beta;
        column: [in - k] the binary channels' factors."""
        super().__init__()
        self.in_features, self.out_features, self.salient_bits = len(mask), out_features, salient_bits
        self.register_buffer("salient_index", mask.nonzero().squeeze(1))
        self.register_buffer("binary_index", (~mask).nonzero().squeeze(1))
        self.register_buffer("salient", salient.to(torch.int32).contiguous())
        self.register_buffer("signs", signs.to(torch.int32).contiguous())
        self.register_buffer("row", row.to(torch.float16).contiguous())
        self.register_buffer("column", column.to(torch.float16).contiguous())
        self.register_buffer("bias", bias.to(dtype) if bias is not None else None)
        self.dtype = dtype

    @property
    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[out, k] codes and [out, in - k] +-1 signs in the layer's dtype, in the shared workspace."""
        k, n = len(self.salient_index), len(self.binary_index)
        buffer = _Workspace.get((self.out_features, self.in_features), self.dtype, self.row.device)
        flat = buffer.view(-1)
        codes = flat[: self.out_features * k].view(self.out_features, k)
        signs = flat[self.out_features * k: self.out_features * (k + n)].view(self.out_features, n)
        codes.copy_(_unpack(self.salient, self.salient_bits, self.out_features * k).view_as(codes))
        signs.copy_(_unpack(self.signs, 1, self.out_features * n).view_as(signs)).mul_(2).sub_(1)
        return codes, signs

    def dense_weight(self) -> torch.Tensor:
        """The weight the layer computes with (float32 from the float16 numbers, as
        compressor.model.load_model computes it), cast to the layer's dtype."""
        codes, signs = (m.float() for m in self._matrices())
        scale, low, alpha, beta = self.row.float().unbind(1)
        weight = torch.empty(self.out_features, self.in_features, device=self.row.device)
        weight[:, self.salient_index] = codes * scale[:, None] + low[:, None]
        weight[:, self.binary_index] = (beta[:, None] + alpha[:, None] * signs) * self.column.float()
        return weight.to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features).to(self.dtype)
        codes, signs = self._matrices()
        scale, low, alpha, beta = self.row.to(self.dtype).unbind(1)
        x_salient = x2d[:, self.salient_index]
        x_binary = x2d[:, self.binary_index] * self.column.to(self.dtype)
        y = torch.nn.functional.linear(x_salient, codes) * scale + x_salient.sum(1, keepdim=True) * low
        y += torch.nn.functional.linear(x_binary, signs) * alpha + x_binary.sum(1, keepdim=True) * beta
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"salient={len(self.salient_index)}, salient_bits={self.salient_bits}")
