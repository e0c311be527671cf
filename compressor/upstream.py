"""Fixes for bugs in the libraries this project loads through, applied only around our own calls.

packed_zero_point_skeleton — compressed-tensors 0.20.1 (and main of 2026-08), transformers 5.24:
transformers builds an empty ("meta") model and asks compressed-tensors to turn each quantized
linear into its compressed form before the checkpoint's tensors are copied in.
`PackedQuantizationCompressor.compress` has a meta-device shortcut that makes `weight_packed` and
`weight_shape` but leaves an asymmetric group/channel layer's `weight_zero_point` unpacked
(int8 [out, groups]), while the same method on real tensors — what wrote the checkpoint — packs it
to int32 [ceil(out*bits/32), groups]. So every asymmetric group/channel checkpoint, llm-compressor's
W4A16_ASYM included, fails to load ("size mismatch ... ignore_mismatched_sizes"), unless
`dequantize=True` is asked for, which applies the first config group's scheme to every layer and so
only suits one-scheme checkpoints (compressor.pack writes that flag into those). The fix belongs in
the meta branch: emit the zero point in its packed shape, as below; report text in
docs/upstream/compressed-tensors-packed-zero-point.md.
"""

from __future__ import annotations

import contextlib

import torch


def _packed_meta_zero_point(compress):
    def compress_with_packed_zero(cls, state_dict, scheme):
        from compressed_tensors.compressors.pack_quantized.base import PACK_ZP_STRATS

        weight = state_dict.get("weight")
        zero = state_dict.get("weight_zero_point")
        result = compress(state_dict, scheme)
        args = scheme.weights
        if (weight is not None and weight.device.type == "meta" and zero is not None
                and not args.symmetric and args.strategy in PACK_ZP_STRATS):
            rows = -(-zero.shape[0] * args.num_bits // 32)
            result["weight_zero_point"] = torch.empty((rows, *zero.shape[1:]), dtype=torch.int32,
                                                      device="meta")
        return result

    return classmethod(compress_with_packed_zero)


@contextlib.contextmanager
def packed_zero_point_skeleton():
    """Within the block, transformers' loading skeleton holds packed zero points (see above)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    original = PackedQuantizationCompressor.__dict__["compress"]
    PackedQuantizationCompressor.compress = _packed_meta_zero_point(PackedQuantizationCompressor.compress)
    try:
        yield
    finally:
        PackedQuantizationCompressor.compress = original
