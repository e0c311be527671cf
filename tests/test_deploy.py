"""Layouts engines serve: asymmetric group/channel layers as llm-compressor writes them (zero points
packed along the rows), loaded by transformers, by compressor.load_model and by the packed runtime;
`--target` and the per-layer engine report of `compress inspect`."""

import json

import pytest
import torch
from safetensors import safe_open

from compressor import engines
from compressor.checkpoint import inspect_checkpoint
from compressor.errors import CompressorError
from compressor.job import Calibration, run_compression
from compressor.model import ModelSource, load_model
from compressor.pack import pack_linear
from compressor.passes import LinearState, rtn
from compressor.upstream import scheme_per_layer

from .test_checkpoint import _apply_packed

ASYM4 = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}
# Two schemes: attention at 8 bits symmetric, the MLP at 4 bits asymmetric, groups of 32 (96 and 160 wide).
TWO_SCHEMES = [{**ASYM4, "bits": 8, "symmetric": True, "targets": ["re:self_attn"]},
               {**ASYM4, "targets": ["re:mlp"]}]


def _logits(model, seed=0):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _reference(source_dir, out):
    """The source model with the checkpoint's codes dequantized by the test itself."""
    model, _ = load_model(ModelSource(str(source_dir)))
    _apply_packed(model, out)
    return model


@pytest.mark.parametrize("bits, group", [(4, 32), (3, 32), (2, 0), (5, 96)])
def test_zero_points_packed_as_compressed_tensors_packs_them(bits, group):
    """Our packed tensors equal compressed-tensors' own compressor on the same weights (the writer
    of llm-compressor's checkpoints, which vLLM reads)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from compressor.pack import weight_args

    torch.manual_seed(bits)
    layer = LinearState("x", torch.randn(72, 96), torch.float32)
    rtn.compress(layer, None, {"bits": bits, "group_size": group, "symmetric": False})
    ours = pack_linear(layer.quant)
    args = weight_args(layer.quant.grid, 96, act_order=False)
    assert args["strategy"] == ("channel" if group == 0 else "group")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    theirs = PackedQuantizationCompressor.compress(
        {"weight": layer.weight, "weight_scale": layer.quant.scale,
         "weight_zero_point": (layer.quant.zero - 2 ** (bits - 1)).to(torch.int8)}, scheme)
    assert ours["weight_zero_point"].dtype == torch.int32
    assert ours["weight_zero_point"].shape == (-(-72 * bits // 32), layer.quant.scale.shape[1])
    for key in ("weight_packed", "weight_zero_point"):
        assert torch.equal(ours[key], theirs[key]), key


def test_one_scheme_asymmetric_loads_in_stock_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "w4"
    run_compression(ModelSource(str(tiny_model_dir)), {"passes": [ASYM4]}, out, Calibration(), "cpu")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["strategy"] == "group" and config["dequantize"] is True
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(stock), _logits(_reference(tiny_model_dir, out)))
    info = inspect_checkpoint(out)
    assert info["engines"]["transformers"] is None
    # 4-bit asymmetric groups of 32 on CUDA; the CPU build also needs rows in multiples of 32 (k/v: 48).
    assert info["engines"]["vllm"] is None
    assert "multiple of 32" in info["engines"]["vllm-cpu"]


def test_two_schemes_load_through_the_upstream_fix(tiny_model_dir, tmp_path):
    """Several asymmetric group schemes: stock transformers' skeleton expects unpacked zero points and
    its dequantize route applies one scheme; compressor.load_model (dequantize route, each layer with
    its own scheme) and the packed runtime load them."""
    from compressor.runtime import load

    out = tmp_path / "mixed"
    recipe = {"passes": TWO_SCHEMES, "target": "vllm"}  # packed zero points: vLLM's layout
    run_compression(ModelSource(str(tiny_model_dir)), recipe, out, Calibration(), "cpu")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(g["weights"]["num_bits"] for g in config["config_groups"].values()) == [4, 8]
    assert {g["weights"]["strategy"] for g in config["config_groups"].values()} == {"group"}
    assert "dequantize" not in config
    reference = _logits(_reference(tiny_model_dir, out))
    model, _ = load_model(ModelSource(str(out)))
    assert torch.equal(_logits(model), reference)
    packed, _ = load(out)
    assert torch.allclose(_logits(packed), reference, atol=1e-4, rtol=1e-4)
    info = inspect_checkpoint(out)
    assert "several schemes" in info["engines"]["transformers"]
    assert info["engines"]["vllm"] is None


@pytest.mark.parametrize("target", ["any", "transformers"])
def test_several_schemes_are_written_as_blocks_stock_transformers_loads(tiny_model_dir, tmp_path, target):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "mixed-blocks"
    recipe = {"passes": TWO_SCHEMES, "target": target}
    run_compression(ModelSource(str(tiny_model_dir)), recipe, out, Calibration(), "cpu")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    strategies = {g["weights"]["symmetric"]: g["weights"]["strategy"]
                  for g in config["config_groups"].values()}
    assert strategies == {True: "group", False: "block"}  # only zero points need the block layout
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        zero = f.get_tensor("model.layers.0.mlp.down_proj.weight_zero_point")
    assert zero.dtype == torch.int8 and zero.shape == (96, 5)
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(stock), _logits(_reference(tiny_model_dir, out)))
    info = inspect_checkpoint(out)
    assert info["engines"]["transformers"] is None and "block" in info["engines"]["vllm"]


def test_target_vllm_refuses_before_work_one_line_per_reason(tiny_model_dir, tmp_path):
    recipe = {"passes": [{"method": "rtn", "bits": 3, "group_size": 64, "symmetric": True}], "target": "vllm"}
    with pytest.raises(CompressorError) as error:
        run_compression(ModelSource(str(tiny_model_dir)), recipe, tmp_path / "x", Calibration(), "cpu")
    lines = str(error.value).splitlines()
    assert lines[0].startswith("--target vllm")
    # 3 bits on every layer; groups of 64 ragged on 96 and 160 columns (block strategy).
    assert len(lines) == 2 and "block strategy" in lines[1] and "(14 layers" in lines[1]
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))
    recipe["passes"][0]["group_size"] = 32
    with pytest.raises(CompressorError, match="3-bit integers"):
        run_compression(ModelSource(str(tiny_model_dir)), recipe, tmp_path / "x", Calibration(), "cpu")


def test_target_gguf_refuses_what_export_cannot_write(tiny_model_dir, tmp_path):
    step = {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}
    recipe = {"passes": [step], "target": "gguf"}
    with pytest.raises(CompressorError) as error:
        run_compression(ModelSource(str(tiny_model_dir)), recipe, tmp_path / "x", Calibration(), "cpu")
    lines = str(error.value).splitlines()
    assert lines[0].startswith("--target gguf: llama.cpp") and "groups of 32" in lines[1]
    assert not (tmp_path / "x").exists()
    recipe["passes"][0]["group_size"] = 32
    run_compression(ModelSource(str(tiny_model_dir)), recipe, tmp_path / "x", Calibration(), "cpu")
    assert inspect_checkpoint(tmp_path / "x")["engines"]["llama.cpp"] is None


def test_llama_cpp_rules():
    g32 = {"type": "int", "num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32}
    assert engines.llama_cpp_reason(g32, "pack-quantized", (64, 576)) is None
    asym5 = {**g32, "num_bits": 5, "symmetric": False}
    assert engines.llama_cpp_reason(asym5, "pack-quantized", (8, 64)) is None
    assert "no GGUF block" in engines.llama_cpp_reason({**g32, "num_bits": 3}, "pack-quantized", (8, 64))
    assert "no GGUF block" in engines.llama_cpp_reason({**g32, "num_bits": 8, "symmetric": False},
                                                       "pack-quantized", (8, 64))
    assert "channel" in engines.llama_cpp_reason({**g32, "strategy": "channel"}, "pack-quantized", (8, 64))
    assert engines.llama_cpp_reason({"type": "gguf", "num_bits": 3}, "gguf", (8, 256)) is None
    assert "float" in engines.llama_cpp_reason({"type": "float", "num_bits": 4}, "nvfp4-pack-quantized",
                                               (8, 64))


def test_vllm_rules():
    group4 = {"type": "int", "num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 64}
    assert engines.vllm_reason(group4, "pack-quantized", (576, 576)) is None
    assert engines.vllm_cpu_reason(group4, "pack-quantized", (576, 576)) is None
    assert "CPU kernel runs 4-bit" in engines.vllm_cpu_reason({**group4, "num_bits": 8, "symmetric": True},
                                                              "pack-quantized", (576, 576))
    assert "does not divide" in engines.vllm_reason({**group4, "group_size": 128}, "pack-quantized", (64, 64))
    assert "own layout" in engines.vllm_reason({"type": "float"}, "fp4", (64, 64))
    fused = engines.fused_reasons({"l.q_proj": group4, "l.k_proj": group4,
                                   "l.v_proj": {**group4, "num_bits": 8},
                                   "l.gate_proj": group4, "l.up_proj": group4})
    assert set(fused) == {"l.q_proj", "l.k_proj", "l.v_proj"}


def test_upstream_fix_is_scoped():
    from transformers.integrations.compressed_tensors import CompressedTensorsDequantize

    original = CompressedTensorsDequantize.convert
    with scheme_per_layer():
        assert CompressedTensorsDequantize.convert is not original
    assert CompressedTensorsDequantize.convert is original


@pytest.mark.parametrize("linears", [ASYM4, {"method": "rtn", "bits": 8, "group_size": 0, "symmetric": True}],
                         ids=["w4g32-asym", "w8-channel"])
def test_int8_embeddings_in_the_file(llama_dir, tmp_path, linears):
    """--embeddings int8: the tied embedding stored once as int8 rows; compressor.load_model and the
    packed runtime give the model with those rows; a one-scheme checkpoint loads in stock transformers."""
    from transformers import AutoModelForCausalLM

    from compressor.runtime import load

    plain, small = tmp_path / "plain", tmp_path / "e8"
    run_compression(ModelSource(str(llama_dir)), {"passes": [linears]}, plain, Calibration(), "cpu")
    result = run_compression(ModelSource(str(llama_dir)), {"passes": [linears], "embeddings": "int8"}, small,
                             Calibration(), "cpu")
    assert list(result.manifest["embeddings"]) == ["model.embed_tokens"]
    with safe_open(str(small / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "model.embed_tokens.weight" not in keys and "lm_head.weight" not in keys
        codes = f.get_tensor("model.embed_tokens.weight_packed")
    assert codes.dtype == torch.int32 and codes.shape == (320, 96 * 8 // 32)
    def embedding_bytes(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith("model.embed_tokens."))

    # fp32 rows -> int8 rows (packed in int32 words), one fp32 scale each, the shape
    assert embedding_bytes(plain) == 320 * 96 * 4
    assert embedding_bytes(small) == 320 * 96 + 320 * 4 + 16
    # The reference: the plain checkpoint with the embedding rounded to 8 bits per row here.
    reference, _ = load_model(ModelSource(str(plain)))
    weight = reference.model.embed_tokens.weight.data
    low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    scale = torch.maximum(-low, high) * 2 / 255
    weight.copy_(torch.clamp(torch.round(weight / scale) + 128, 0, 255).sub(128) * scale)
    expected = _logits(reference)
    model, _ = load_model(ModelSource(str(small)))
    assert torch.allclose(_logits(model), expected, atol=1e-5, rtol=1e-5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    packed, _ = load(small)
    assert torch.allclose(_logits(packed), expected, atol=1e-3, rtol=1e-3)
    info = inspect_checkpoint(small)
    assert "model.embed_tokens" in {row["module"] for row in info["modules"]}
    assert info["bpw"]["weights"] == inspect_checkpoint(plain)["bpw"]["weights"]  # decoder linears only
    config = json.loads((small / "config.json").read_text())["quantization_config"]
    if len(config["config_groups"]) == 1:  # 8-bit per row everywhere: one scheme
        assert info["engines"]["transformers"] is None
        stock = AutoModelForCausalLM.from_pretrained(small).eval()
        assert torch.allclose(_logits(stock), expected, atol=1e-5, rtol=1e-5)
    else:
        assert "quantized embedding" in info["engines"]["transformers"]
