"""Low-bit linear layers that stay packed in memory: compressor's inference kernels.

Importable as `compressor_kernels` (the folder is kernels/ in the repository; `kernels` on PyPI is an
unrelated package). PackedLinear keeps a linear's integer codes packed and multiplies with the best
kernel this machine has (see packed_linear.py for the choice); LutLinear keeps codes into learned
per-row tables (lut_linear.py); BinaryLinear PTQ1.61's salient and binarised channels (binary_linear.py).
"""

from compressor_kernels.binary_linear import BinaryLinear
from compressor_kernels.lut_linear import LutLinear
from compressor_kernels.packed_linear import (
    BACKENDS,
    Int8Embedding,
    PackedLinear,
    dequantize_codes,
    triton_available,
)

__all__ = ["BACKENDS", "BinaryLinear", "Int8Embedding", "LutLinear", "PackedLinear", "dequantize_codes",
           "triton_available"]
