"""PackedLinear: an nn.Linear replacement holding integer codes, group scales and zero points.

    weight[o, i] = (code[o, i] - zero[o, g(i)]) * scale[o, g(i)],  g(i) = g_idx[i] or i // group_width

Backends, chosen per layer when it is built (the first that fits wins):
    aten-int4    2, 3 or 4 bits, no g_idx, output rows a multiple of 16, groups made of whole
                 kernel groups of 32/64/128/256 that divide the input width (so ragged groups of
                 128 over 576 inputs run as groups of 64 sharing scales): torch's CPU int4
                 group-wise matmul (_weight_int4pack_mm_for_cpu), codes pre-packed once. 2- and
                 3-bit codes are held as 4-bit ones: a little more memory, the int4 kernel's speed.
                 From PREFILL_ROWS input rows on the layer is unpacked from that layout into the
                 shared workspace and multiplied densely (prefill).
    aten-int8    8-bit symmetric per-channel: torch's int8 weight-only matmul (_weight_int8pack_mm)
    triton       CUDA with Triton installed (asked for by the loader; any width 2-8, any groups,
                 act-order g_idx): the dequantize-matmul kernels of triton_matmul.py over the
                 compressed-tensors int32 words: a GEMV kernel for decode (up to 4 rows), and for
                 more rows a dequantize kernel into the shared workspace, then the dense matmul;
                 also runs on the CPU under TRITON_INTERPRET=1 (how the tests check it).
    dequant      anything else (5-7 bits, act-order g_idx, groups no kernel group tiles, CUDA
                 without Triton): codes stay packed as compressed-tensors int32 words;
                 each forward unpacks and dequantizes this one layer into a buffer shared by all
                 layers, then runs a dense matmul. Memory stays packed and only one layer is ever
                 dense, but decode is slow (every weight is unpacked in eager torch per token).
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from compressor_kernels.cpu_unpack import unpack_int4_transposed

BACKENDS = ("aten-int4", "aten-int8", "triton", "dequant")


def triton_available() -> bool:
    """Triton importable, and a CUDA device or the interpreter (TRITON_INTERPRET=1) to run it."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
INT4_GROUPS = (32, 64, 128, 256)
# From this many input rows on (prefill), an aten-int4 layer is dequantized into the shared
# workspace and multiplied densely: the int4 kernel is tuned for a few rows (decode), while a dense
# GEMM over many rows is compute-bound and the dequantization is paid once per layer, not per row.
PREFILL_ROWS = 32
# An aten-int8 layer's prefill dequantizes this many output rows at a time (8192 x 576: 9 MiB bfloat16).
INT8_PREFILL_ROWS = 8192


def int4_layout_codes(packed: torch.Tensor, out_features: int, in_features: int,
                      block: int = 32) -> torch.Tensor:
    """Codes [out, in] from torch's CPU int4 layout: rows in blocks of `block` (32 or 64, by the
    build and CPU); byte [b, column, j] holds row block*b + j in its low nibble and row
    block*b + block/2 + j in its high one."""
    blocks = packed.reshape(out_features // block, in_features, block // 2)
    codes = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # [block, column, rows of the block]
    return codes.permute(0, 2, 1).reshape(out_features, in_features)


_LAYOUT_BLOCK: list[int | None] = []


def int4_layout_block() -> int | None:
    """The row block this machine's torch packs int4 codes in (int4_layout_codes), checked once on a
    128 x 64 layer: 32 on some AVX-512 builds, 64 on others (AMD EPYC with AVX-512 here); None where
    neither reads the codes back, and prefill runs the kernel itself: slower, never wrong."""
    if not _LAYOUT_BLOCK:
        codes = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        found = None
        if packed.dtype == torch.uint8 and packed.numel() == 128 * 32:
            readable = [block for block in (32, 64)
                        if torch.equal(int4_layout_codes(packed, 128, 64, block).to(torch.int32), codes)]
            found = readable[0] if readable else None
        _LAYOUT_BLOCK.append(found)
    return _LAYOUT_BLOCK[0]


def prefill_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dense prefill's dtype: the model's, except bfloat16 on a CPU that only emulates it
    (no AMX / AVX512-BF16: there a float32 GEMM is several times faster; measured on AMD EPYC)."""
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    return dtype


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     group_of: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The reference dequantization: (codes - zero[:, g]) * scale[:, g], into `out` if given."""
    weight = (codes.to(scale.dtype) - zero[:, group_of].to(scale.dtype)) * scale[:, group_of]
    if out is None:
        return weight
    return out.copy_(weight)


def int4_kernel_group(shape: tuple[int, int], group_width: int) -> int | None:
    """The largest group size the int4 kernel takes that tiles both the stored groups and the
    input width (None if none does, or the rows are not a multiple of 16)."""
    out_features, in_features = shape
    if out_features % 16:
        return None
    width = min(group_width, in_features)
    fitting = [g for g in INT4_GROUPS if width % g == 0 and in_features % g == 0]
    return max(fitting, default=None)


class _Workspace:
    """One flat buffer per (dtype, device), grown to the largest layer: the dequant backend's
    dense weight lives here for the duration of one matmul (layers run one after another)."""

    buffers: dict[tuple, torch.Tensor] = {}

    @classmethod
    def get(cls, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, str(device))
        numel = shape[0] * shape[1]
        buffer = cls.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = cls.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


class PackedLinear(torch.nn.Module):
    """y = x W^T + b with W kept as `bits`-bit codes; see the module docstring for the backends."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 group_width: int, bias: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, backend: str | None = None):
        """codes: unsigned integers [out, in] in [0, 2^bits); scale, zero: [out, groups]
        (zero None = symmetric, 2^(bits-1)); group_width: input columns per group (the last
        may be shorter); g_idx: optional group of each input column (act-order checkpoints)."""
        super().__init__()
        out_features, in_features = codes.shape
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_width = group_width
        if zero is None:
            zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.float32)
        group_of = g_idx.long() if g_idx is not None else torch.arange(in_features) // group_width
        self.backend = backend or self.choose_backend(bits, codes.shape, group_width, g_idx, zero)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        scale = scale.float()
        zero = zero.float()
        if self.backend == "aten-int4":
            self.kernel_group = int4_kernel_group(codes.shape, group_width)
            # Each kernel group takes the parameters of the stored group it lies in.
            stored_group = torch.arange(0, in_features, self.kernel_group) // group_width
            scale, zero = scale[:, stored_group], zero[:, stored_group]
            # The kernel computes (code - 8) * scale + offset per group: offset = (8 - zero) * scale.
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.to(torch.int32).contiguous(), 2))
            scales_and_zeros = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1)
            self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous().to(dtype))
        elif self.backend == "aten-int8":
            self.register_buffer("packed", (codes.to(torch.int16) - 128).to(torch.int8).contiguous())
            self.register_buffer("scales", scale[:, 0].contiguous().to(dtype))
        else:  # triton and dequant keep the checkpoint's packed words
            if self.backend == "triton" and not triton_available():
                raise ValueError("the triton backend needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
            signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
            self.register_buffer("packed", pack_to_int32(signed, bits))
            self.register_buffer("scale", scale.to(dtype))
            self.register_buffer("zero", zero.to(dtype))
            self.register_buffer("group_of", group_of.to(torch.int32), persistent=False)
        self.register_buffer("bias", bias.to(dtype) if bias is not None else None)

    @staticmethod
    def choose_backend(bits: int, shape: tuple[int, int], group_width: int, g_idx, zero: torch.Tensor) -> str:
        if g_idx is None and bits <= 4 and int4_kernel_group(shape, group_width):
            return "aten-int4"
        in_features = shape[1]
        if g_idx is None and bits == 8 and group_width >= in_features and bool((zero == 128).all()):
            return "aten-int8"
        return "dequant"

    @property
    def weight_bytes(self) -> int:
        """Bytes this layer keeps resident (codes, scales, zeros, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def codes(self) -> torch.Tensor:
        """The unsigned codes [out, in] (for tests and tools; not used on the fast paths)."""
        if self.backend == "aten-int8":
            return (self.packed.to(torch.int16) + 128).to(torch.uint8)
        if self.backend == "aten-int4":
            raise NotImplementedError("aten-int4 keeps its codes in the kernel's private layout")
        shape = torch.Size([self.out_features, self.in_features])
        return (unpack_from_int32(self.packed, self.bits, shape).to(torch.int16) + 2 ** (self.bits - 1)).to(
            torch.uint8)

    def dense_weight(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's weight, dequantized (for the dequant backend into the shared workspace)."""
        if self.backend == "aten-int4":
            eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype)
            return self._int4(eye).T
        if self.backend == "aten-int8":
            return self.packed.to(self.scales.dtype) * self.scales[:, None]
        return dequantize_codes(self.codes(), self.scale, self.zero, self.group_of.long(), out)

    def _int4_codes(self) -> torch.Tensor | None:
        """The unsigned codes [out, in] read back from the int4 kernel's CPU layout, or None where
        that layout is not one `int4_layout_codes` reads."""
        if not self._int4_codes_readable():
            return None
        return int4_layout_codes(self.packed, self.out_features, self.in_features, int4_layout_block())

    def _int4_dense_t(self, dtype: torch.dtype) -> torch.Tensor:
        """The aten-int4 layer's weight, transposed [in, out], in the shared workspace: the kernel's
        (code - 8) * scale + offset per kernel group, written straight in `dtype` (code - 8 is exact
        in any float type and addcmul rounds once, so bfloat16 comes out bit-equal to a float32
        computation cast once). Transposed because the kernel's layout holds each input column's
        codes for a block of rows side by side, so the nibbles land in runs of block/2 contiguous
        values. The C kernel (int4_unpack.c) writes the same bits in one pass: ~0.11 ms on a
        1536 x 576 layer, against ~0.35 ms for the eager ops below (kept for machines without a C
        compiler; their scales are made contiguous first: addcmul over the strided halves of
        scales_and_zeros ran 5x slower), ~0.36 ms for the bfloat16 GEMM at 512 rows and ~7 ms for
        the int4 kernel."""
        block = int4_layout_block()
        shape = (self.in_features, self.out_features)
        work = _Workspace.get(shape, dtype, self.packed.device)
        if unpack_int4_transposed(self.packed, self.scales_and_zeros, work, block, self.kernel_group):
            return work
        packed = self.packed.view(self.out_features // block, self.in_features, block // 2)
        nibbles = work.view(self.in_features, self.out_features // block, 2, block // 2)
        nibbles[:, :, 0].copy_((packed & 15).view(torch.int8).sub_(8).transpose(0, 1))
        nibbles[:, :, 1].copy_((packed >> 4).view(torch.int8).sub_(8).transpose(0, 1))
        scale, offset = (t.to(dtype).contiguous()[:, None] for t in self.scales_and_zeros.unbind(-1))
        grouped = work.view(-1, self.kernel_group, self.out_features)
        return torch.addcmul(offset, grouped, scale, out=grouped).view(shape)

    def _int8_prefill(self, x2d: torch.Tensor) -> torch.Tensor:
        """Many rows through an 8-bit layer (an int8 head over a 49152-token vocabulary): dequantized
        INT8_PREFILL_ROWS output rows at a time into the workspace (the int8 codes are exact in
        bfloat16 and the product rounds once) and multiplied densely, so no full dense copy of a large
        layer ever exists; torch's int8 kernel is several times slower than the GEMM at 512 rows.
        The 49152 x 576 head at 512 rows: ~31 ms, against ~28 ms dense."""
        dtype = prefill_dtype(self.scales.dtype)
        x2d = x2d.to(dtype)
        y = torch.empty(x2d.shape[0], self.out_features, dtype=dtype, device=x2d.device)
        for start in range(0, self.out_features, INT8_PREFILL_ROWS):
            stop = min(start + INT8_PREFILL_ROWS, self.out_features)
            weight = _Workspace.get((stop - start, self.in_features), dtype, x2d.device)
            weight.copy_(self.packed[start:stop]).mul_(self.scales[start:stop, None])
            y[:, start:stop] = x2d @ weight.T
        return y

    def _int4_codes_readable(self) -> bool:
        block = int4_layout_block()
        return block is not None and self.out_features % block == 0 and self.packed.dtype == torch.uint8

    def _int4(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.packed, self.kernel_group,
                                                          self.scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)
        if self.backend == "aten-int4" and x2d.shape[0] >= PREFILL_ROWS and self._int4_codes_readable():
            dtype = prefill_dtype(self.scales_and_zeros.dtype)
            y = x2d.to(dtype) @ self._int4_dense_t(dtype)
        elif self.backend == "aten-int4":
            y = self._int4(x2d.to(self.scales_and_zeros.dtype).contiguous())
        elif self.backend == "aten-int8" and x2d.shape[0] >= PREFILL_ROWS:
            y = self._int8_prefill(x2d)
        elif self.backend == "aten-int8":
            y = torch.ops.aten._weight_int8pack_mm(x2d.to(self.scales.dtype).contiguous(), self.packed,
                                                   self.scales)
        elif self.backend == "triton":
            from compressor_kernels.triton_matmul import GEMV_MAX_ROWS, packed_matmul

            # Decode (GEMV) needs no dense buffer: the workspace grows only when a prefill uses it.
            buffer = (_Workspace.get((self.out_features, self.in_features), self.scale.dtype, x.device)
                      if x2d.shape[0] > GEMV_MAX_ROWS else None)
            y = packed_matmul(x2d.to(self.scale.dtype), self.packed, self.scale, self.zero, self.group_of,
                              self.bits, self.out_features, workspace=buffer)
        else:
            buffer = _Workspace.get((self.out_features, self.in_features), self.scale.dtype, x.device)
            y = torch.nn.functional.linear(x2d.to(self.scale.dtype), self.dense_weight(out=buffer))
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_width={self.group_width}, backend={self.backend}")


class Int8Embedding(torch.nn.Module):
    """A token embedding kept as int8 rows with one scale each (absmax / 127), as llama.cpp keeps
    its Q8_0 token embeddings. `head()` is the tied output projection over the same int8 tensor."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        w = weight.float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("codes", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.num_embeddings, self.embedding_dim = weight.shape

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Int8Embedding:
        """From stored signed int8 codes [num, dim] and one scale per row (a checkpoint's)."""
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.register_buffer("codes", codes.to(torch.int8).contiguous())
        module.register_buffer("scale", scale.reshape(-1).to(dtype))
        module.num_embeddings, module.embedding_dim = codes.shape
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes[ids].to(self.scale.dtype) * self.scale[ids, None]

    def head(self) -> PackedLinear:
        """lm_head = embedding^T: a PackedLinear sharing the int8 codes (no second copy)."""
        head = PackedLinear.__new__(PackedLinear)
        torch.nn.Module.__init__(head)
        head.out_features, head.in_features = self.num_embeddings, self.embedding_dim
        head.bits, head.group_width, head.backend = 8, self.embedding_dim, "aten-int8"
        head.register_buffer("packed", self.codes)
        head.register_buffer("scales", self.scale)
        head.register_buffer("bias", None)
        return head
