"""4-bit float weights: NVFP4 / MXFP4 checkpoints transformers reloads, the LLM-FP4 search and its
own layout, the bit accounting, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from compressor import budget, fpgrids
from compressor.checkpoint import inspect_checkpoint
from compressor.errors import CompressorError
from compressor.fpgrids import E2M1, ROW_FORMATS
from compressor.job import Calibration, run_compression
from compressor.model import ModelSource, load_model
from compressor.pack import pack_linear
from compressor.passes import LinearState, fp4
from compressor.stats import InputStats

from .test_cli import run_cli

FORMATS = ["nvfp4", "mxfp4", "e2m1", "fp4"]


@pytest.mark.parametrize("number_format", FORMATS)
def test_checkpoint_reloads_with_identical_logits(tiny_model_dir, calibration_file, tmp_path, number_format):
    out = tmp_path / "out"
    cal = Calibration(source=str(calibration_file), samples=4, seqlen=32)
    step = {"method": "fp4", "format": number_format, "steps": 20, "group_size": 32}
    if number_format in ("nvfp4", "mxfp4"):
        step = {"method": "fp4", "format": number_format}
    result = run_compression(ModelSource(str(tiny_model_dir)), {"passes": [step]}, out, cal, "cpu")
    reloaded, _ = load_model(ModelSource(str(out)))
    dense, _ = load_model(ModelSource(str(tiny_model_dir)))
    # Rebuild the in-memory result independently: quantize the dense model's linears ourselves.
    expected = {}
    for name, entry in result.manifest["modules"].items():
        assert entry["format"] == number_format and entry["bits"] == 4
        expected[name] = dense.get_submodule(name).weight.detach().clone()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    if number_format in ("nvfp4", "mxfp4"):
        assert config["quant_method"] == "compressed-tensors"
        assert config["format"] == f"{number_format}-pack-quantized"
        for name, weight in expected.items():
            layer = LinearState(name=name, weight=weight.float(), dtype=weight.dtype)
            fp4.compress(layer, None, {"format": number_format})
            dense.get_submodule(name).weight.data.copy_(layer.weight)
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, dense(ids).logits)
    else:
        assert config["quant_method"] == "compressor-fp4" and config["format"] == number_format
    info = inspect_checkpoint(out)
    assert {m["format"] for m in info["modules"]} == {number_format}
    assert info["bpw"]["stored"] == pytest.approx(result.manifest["bpw"]["stored"])
    with torch.no_grad():
        kl = torch.nn.functional.kl_div(reloaded(ids).logits.log_softmax(-1),
                                        load_model(ModelSource(str(tiny_model_dir)))[0](ids).logits
                                        .log_softmax(-1), log_target=True, reduction="batchmean")
    assert 0 < float(kl) < 0.5


def test_llm_fp4_layout_reloads_exactly_through_our_loader(llama_dir, calibration_file, tmp_path):
    """The in-memory model after the pass equals what compressor.model.load_model rebuilds."""
    from compressor.pack import save_checkpoint
    from compressor.pipeline import compress_model
    from compressor.plan import build_plan

    from .conftest import make_model, make_tokenizer

    model = make_model("llama")
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    records = compress_model(model, build_plan(model, [{"method": "fp4", "format": "fp4", "steps": 20}]), ids)
    save_checkpoint(model, make_tokenizer(), records, tmp_path, ignore=["lm_head"])
    reloaded, _ = load_model(ModelSource(str(tmp_path)))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    chosen = {f for state in records.values() for f, n in state.metrics["fp4_rows"].items() if n}
    assert len(chosen) >= 2  # random layers: the search does not simply keep E2M1 everywhere


def synthetic_layer(rows=64, cols=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Rows of different shapes: Gaussian, heavy-tailed, and near-uniform (favour different formats).
    w = torch.randn(rows, cols, generator=gen)
    w[: rows // 3] = torch.randn(rows // 3, cols, generator=gen) ** 3
    w[rows // 3: 2 * rows // 3] = torch.rand(rows // 3, cols, generator=gen) * 2 - 1
    x = torch.randn(512, cols, generator=gen) * (0.2 + torch.rand(cols, generator=gen) * 2)
    stats = InputStats(cols)
    stats.add_batch(x)
    return w, x, stats


def row_output_error(x, w, q):
    return (((x @ (w - q).T) ** 2).mean(0)).double()


@pytest.mark.parametrize("group_size", [0, 32])
def test_search_is_never_worse_than_plain_e2m1_on_any_row(group_size):
    w, x, stats = synthetic_layer()
    plain = LinearState(name="l", weight=w.clone(), dtype=torch.float32)
    fp4.compress(plain, None, {"format": "e2m1", "group_size": group_size})
    searched = LinearState(name="l", weight=w.clone(), dtype=torch.float32)
    fp4.compress(searched, stats, {"format": "fp4", "group_size": group_size})
    before = row_output_error(x, w, plain.weight)
    after = row_output_error(x, w, searched.weight)
    assert (after <= before * (1 + 1e-5)).all()
    assert after.sum() < 0.8 * before.sum()
    rows = searched.metrics["fp4_rows"]
    assert sum(rows.values()) == 64 and sum(1 for n in rows.values() if n) >= 2
    # The chosen per-row scale is 2^-bias and every code decodes within the row's format.
    q = searched.quant
    assert q.scale.shape == (64, 128 // (group_size or 128)) and q.row_format.shape == (64,)
    assert torch.equal(fpgrids.row_dequantize(q.codes, q.row_format, q.scale), searched.weight)


def test_search_with_one_format_and_bias_matches_a_brute_force_over_the_same_candidates():
    w, x, stats = synthetic_layer(rows=12, cols=64, seed=1)
    hessian = stats.hessian()
    fmt_index, bias = fp4.search(w, hessian, [E2M1], steps=30, refine=30)  # refine all: exact
    assert (fmt_index == ROW_FORMATS.index(E2M1)).all()
    absmax = w.abs().amax(1, keepdim=True)
    best = torch.full((12,), float("inf"), dtype=torch.float64)
    for factor in torch.linspace(0.01, 1.2, 30).tolist() + [1.0]:
        b = fpgrids.default_bias(E2M1, absmax * factor)
        scale = torch.exp2(-b).float()
        d = fpgrids.fp_round(w / scale, E2M1, 0.0) * scale - w
        best = torch.minimum(best, ((d @ hessian) * d).sum(1).double())
    scale = torch.exp2(-bias).float()
    d = fpgrids.fp_round(w / scale, E2M1, 0.0) * scale - w
    assert torch.allclose(((d @ hessian) * d).sum(1).double(), best, rtol=1e-5)


def test_pruned_weights_stay_zero_in_every_format():
    w = torch.randn(32, 64)
    mask = torch.rand(32, 64) > 0.5
    for number_format in ("nvfp4", "mxfp4", "e2m1"):
        layer = LinearState(name="l", weight=w * mask, dtype=torch.float32, mask=mask.clone())
        fp4.compress(layer, None, {"format": number_format})
        assert torch.equal(layer.weight[~mask], torch.zeros(int((~mask).sum())))


@pytest.mark.parametrize(("number_format", "group_size", "expected"), [
    ("nvfp4", 0, 4 + 8 / 16 + 32 / (48 * 96)), ("mxfp4", 0, 4 + 8 / 32),
    ("fp4", 0, 4 + 40 / 96), ("fp4", 32, 4 + 32 / 32 + 8 / 96), ("e2m1", 48, 4 + 32 / 48 + 8 / 96)])
def test_budget_counts_the_packed_bytes(number_format, group_size, expected):
    w = torch.randn(48, 96)
    layer = LinearState(name="l", weight=w, dtype=torch.float32)
    stats = InputStats(96)
    stats.add_batch(torch.randn(64, 96))
    fp4.compress(layer, stats, {"format": number_format, "steps": 5, "group_size": group_size})
    packed = pack_linear(layer.quant)
    payload = sum(t.numel() * t.element_size() * 8 for k, t in packed.items() if k != "weight_shape")
    grid = layer.quant.grid
    assert budget.quantized_linear_bits(48, 96, grid, 32) == payload
    assert budget.bits_per_weight([(48, 96, grid, 32)])["stored"] == pytest.approx(expected)


def test_nvfp4_tensors_have_the_compressed_tensors_layout():
    layer = LinearState(name="l", weight=torch.randn(8, 64), dtype=torch.float32)
    fp4.compress(layer, None, {"format": "nvfp4"})
    packed = pack_linear(layer.quant)
    assert packed["weight_packed"].dtype == torch.uint8 and packed["weight_packed"].shape == (8, 32)
    assert packed["weight_scale"].dtype == torch.float8_e4m3fn and packed["weight_scale"].shape == (8, 4)
    assert packed["weight_global_scale"].dtype == torch.float32
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    values = unpack_fp4_from_uint8(packed["weight_packed"], 8, 64, dtype=torch.float32)
    scale = packed["weight_scale"].float() / packed["weight_global_scale"]
    rebuilt = (values * scale.repeat_interleave(16, 1)).to(torch.bfloat16).float()
    assert torch.equal(rebuilt, layer.weight)


def test_bad_fp4_settings():
    with pytest.raises(CompressorError, match="unknown format"):
        fp4.validate({"format": "fp5"})
    with pytest.raises(CompressorError, match="unknown FP4 format"):
        fp4.validate({"format": "fp4", "formats": ["E2M1", "E5M0"]})
    with pytest.raises(CompressorError, match="steps must be a positive integer"):
        fp4.validate({"format": "fp4", "steps": 0})
    with pytest.raises(CompressorError, match="unknown setting"):
        fp4.validate({"format": "nvfp4", "bits": 4})
    with pytest.raises(CompressorError, match="needs calibration data"):
        fp4.compress(LinearState(name="l", weight=torch.randn(4, 32), dtype=torch.float32), None,
                     {"format": "fp4"})
    with pytest.raises(CompressorError, match="multiple of the block size 32"):
        fp4.compress(LinearState(name="l", weight=torch.randn(4, 48), dtype=torch.float32), None,
                     {"format": "mxfp4"})


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--format", "fp5"], "unknown format"), (["--format", "nvfp4", "--bits", "3"], "is 4-bit")],
)
def test_cli_rejects_bad_formats(llama_dir, tmp_path, capsys, monkeypatch, extra, message):
    code, _, stderr = run_cli(["quantize", str(llama_dir), "-o", str(tmp_path / "o"), *extra],
                              capsys, monkeypatch)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_quantize_nvfp4_json_and_inspect(llama_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "nv"
    code, stdout, _ = run_cli(["quantize", str(llama_dir), "--format", "nvfp4", "-o", str(out), "--json"],
                              capsys, monkeypatch)
    assert code == 0
    summary = json.loads(stdout)
    code, stdout, _ = run_cli(["inspect", str(out)], capsys, monkeypatch)
    assert code == 0 and "4 nvfp4" in stdout
    assert summary["bpw"]["stored"] == pytest.approx(4.5, abs=0.01)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert "model.layers.0.mlp.down_proj.weight_global_scale" in handle.keys()
