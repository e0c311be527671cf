"""Fixes for bugs in the libraries this project loads through, applied only around our own calls.
Reports ready to file: docs/upstream/.

The two routes transformers 5.24 has for a compressed-tensors checkpoint are each broken for some of
this project's layouts:

- the compressed route builds an empty ("meta") model compressed by compressed-tensors 0.20.1, whose
  `PackedQuantizationCompressor.compress` has a meta shortcut that leaves an asymmetric group/channel
  layer's `weight_zero_point` unpacked (int8 [out, groups]) while the same method on real tensors,
  which wrote the checkpoint, packs it (int32 [ceil(out*bits/32), groups]): every asymmetric group
  checkpoint, llm-compressor's W4A16_ASYM included, stops with a size mismatch. It also leaves a
  quantized embedding no `weight` for the tied head. (Fix upstream: emit the packed shape in the meta
  branch; see the report.)
- the dequantize route (`dequantize=True`) decompresses every dense layer with one scheme
  (`get_dense_scheme`: the first config group), so a checkpoint of several schemes is dequantized
  wrongly. compressor.pack writes `dequantize: true` into one-scheme checkpoints that need it, so that
  stock transformers loads them.

scheme_per_layer fixes the second: the converter picks the config group whose targets name the layer
it converts. compressor.model.load_model takes the dequantize route with it for every layout.
"""

from __future__ import annotations

import contextlib
import re


def _scheme_of(config, module: str):
    """The config group whose targets (names or 're:' patterns) match `module`, or None."""
    if config is None:  # a sparse-only checkpoint: no quantization, no scheme
        return None
    for group in config.config_groups.values():
        for target in group.targets:
            if (re.match(target[3:], module) if target.startswith("re:") else target == module):
                return group
    return None


@contextlib.contextmanager
def scheme_per_layer():
    """Within the block, transformers' dequantize route uses each layer's own scheme (see above)."""
    from transformers.integrations.compressed_tensors import CompressedTensorsDequantize

    original = CompressedTensorsDequantize.convert

    def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, **kwargs):
        if self.scheme is not None or full_layer_name is None:
            return original(self, input_dict, source_patterns, target_patterns, full_layer_name, **kwargs)
        self.scheme = _scheme_of(self.hf_quantizer.compressor.quantization_config,
                                 full_layer_name.rsplit(".", 1)[0])
        try:
            return original(self, input_dict, source_patterns, target_patterns, full_layer_name, **kwargs)
        finally:
            self.scheme = None

    CompressedTensorsDequantize.convert = convert
    try:
        yield
    finally:
        CompressedTensorsDequantize.convert = original
