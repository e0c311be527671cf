"""Learned lookup tables (`--format lut4|lut3`): the grid functions against hand computations and
brute force on small tensors, the pass, the checkpoint round trip and the CLI's refusals."""

import json

import pytest
import torch
from safetensors import safe_open

from compressor import budget, lutgrids
from compressor.checkpoint import inspect_checkpoint
from compressor.errors import CompressorError
from compressor.gguf_quants import TABLES, GgufType
from compressor.lutgrids import LutGrid
from compressor.model import ModelSource, load_model
from compressor.pack import unpack_lut_codes
from tests.test_cli import run_cli, run_small_eval

GRID = LutGrid(bits=4, group_size=32)


def test_stored_bits_hand_count():
    grid = LutGrid(bits=4, group_size=64, table_rows=3)
    # 10 rows of 100 columns: 13 int32 words of codes per row, 2 float16 scales per row (64 + 36),
    # 4 tables (rows 0-2, 3-5, 6-8, 9) of 16 float16 values.
    assert grid.stored_bits(10, 100) == 10 * 13 * 32 + 10 * 2 * 16 + 4 * 16 * 16
    assert LutGrid(bits=3, group_size=0).stored_bits(2, 64) == 2 * 6 * 32 + 2 * 16 + 2 * 8 * 16
    assert budget.quantized_linear_bits(10, 100, grid, 32) == grid.stored_bits(10, 100)


def test_kmeans_recovers_a_row_made_of_16_values():
    generator = torch.Generator().manual_seed(0)
    levels = torch.tensor([-1.0, -0.75, -0.5, -0.375, -0.25, -0.125, -0.0625, 0.0,
                           0.0625, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0])
    # Every value twice in each group of 32 (so each group spans -1 .. 1), shuffled within the group.
    codes = torch.stack([torch.cat([torch.randperm(32, generator=generator) % 16 for _ in range(4)])
                         for _ in range(3)])
    w = levels[codes]
    scale = lutgrids.fit_scales(w, GRID)
    assert torch.equal(scale, torch.ones(3, 4))
    table = lutgrids.fit_tables(w, scale, GRID)
    assert torch.equal(table, levels.expand(3, 16))
    found = lutgrids.round_to(w, scale, table, GRID)
    assert torch.equal(found.long(), codes) and torch.equal(lutgrids.values(found, scale, table, GRID), w)


def test_learned_tables_beat_the_fixed_iq4_nl_table():
    """On heavy-tailed rows, each row's k-means table has a lower weighted error than IQ4_NL's fixed
    16 values under the same scales: what a learned table buys."""
    generator = torch.Generator().manual_seed(1)
    uniform = torch.rand(32, 256, generator=generator) - 0.5  # Laplace samples, by inverting the CDF
    w = -uniform.sign() * torch.log1p(-2 * uniform.abs()) * torch.rand(32, 1, generator=generator)
    importance = torch.rand(256, generator=generator) + 0.1
    scale = lutgrids.fit_scales(w, GRID)
    learned = lutgrids.fit_tables(w, scale, GRID, importance)
    fixed = (torch.tensor(TABLES[GgufType.IQ4_NL], dtype=torch.float32) / 127).expand(32, 16).contiguous()

    def error(table):
        v = lutgrids.values(lutgrids.round_to(w, scale, table, GRID), scale, table, GRID)
        return float(((v - w).square() * importance).sum())

    assert error(learned) < 0.8 * error(fixed)


def test_refit_equals_brute_force_least_squares_and_lowers_the_output_error():
    generator = torch.Generator().manual_seed(2)
    grid = LutGrid(bits=3, group_size=16, table_rows=2)
    w = torch.randn(6, 48, generator=generator)
    x = torch.randn(200, 48, generator=generator)
    hessian = x.T @ x
    scale = lutgrids.fit_scales(w, grid)
    table = lutgrids.fit_tables(w, scale, grid, hessian.diagonal())
    codes = lutgrids.round_to(w, scale, table, grid)
    refitted = lutgrids.refit_tables(w, codes, scale, grid, hessian)
    # Brute force: per table, least squares of sum over its rows ||X (w_r - A_r t)||^2 in float64.
    s = lutgrids.spread(scale, 48, grid).double()
    for t in range(3):
        rows = (2 * t, 2 * t + 1)
        one_hot = torch.nn.functional.one_hot(codes.long(), 8).double()
        design = torch.cat([x.double() @ (one_hot[r] * s[r, :, None]) for r in rows])
        target = torch.cat([x.double() @ w[r].double() for r in rows])
        best = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(refitted[t].double(), best.half().double(), atol=2e-3)

    def output_error(tab):
        error = lutgrids.values(codes, scale, tab, grid) - w
        return float(((error @ hessian) * error).sum())

    assert output_error(refitted) < output_error(table)
    ordered, renumbered = lutgrids.sort_tables(refitted, codes, grid)
    assert (ordered.diff(dim=1) >= 0).all()
    assert torch.equal(lutgrids.values(renumbered, scale, ordered, grid),
                       lutgrids.values(codes, scale, refitted, grid))


def test_settings_are_checked():
    from compressor.passes import get_pass

    lut = get_pass("lut")
    lut.validate({"format": "lut3", "group_size": 0, "table_rows": 4, "solver": "rtn"})
    assert not lut.needs_data({"solver": "rtn"}) and lut.needs_data({})
    for bad in ({"format": "lut5"}, {"group_size": -2}, {"table_rows": 0}, {"solver": "awq"}, {"bits": 4}):
        with pytest.raises(CompressorError):
            lut.validate(bad)


@pytest.mark.parametrize("extra, methods", [
    ([], ["lut4+gptq"]),
    (["--reconstruct", "--reconstruct-iters", "6"], ["lut4+gptq", "reconstruct"]),  # learned per block
])
def test_cli_lut4_round_trips_bit_exactly(llama_dir, calibration_file, tmp_path, capsys, monkeypatch,
                                          isolated_cache, extra, methods):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lut4"
    code, stdout, stderr = run_cli(
        ["quantize", llama_dir, "--format", "lut4", "--group-size", "32", "--calibration", calibration_file,
         "--samples", "4", "--seqlen", "32", *extra, "-o", out, "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    manifest = json.loads((out / "compress.json").read_text())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressor-lut" and config["format"] == "lut4"
    loaded, _ = load_model(ModelSource(str(out)))
    dense = AutoModelForCausalLM.from_pretrained(llama_dir)
    grid = LutGrid(bits=4, group_size=32)
    total_bits = 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        for name, entry in manifest["modules"].items():
            assert entry["methods"] == methods and entry["format"] == "lut4"
            # The closed-form refit only lowers the layer's output error.
            assert entry["lut_output_error"] <= entry["lut_output_error_before_refit"] * (1 + 1e-4)
            table = handle.get_tensor(f"{name}.weight_table")
            scale = handle.get_tensor(f"{name}.weight_scale")
            shape = handle.get_tensor(f"{name}.weight_shape").tolist()
            codes = unpack_lut_codes(handle.get_tensor(f"{name}.weight_packed"), 4, shape)
            assert table.dtype == scale.dtype == torch.float16 and (table.float().diff(dim=1) >= 0).all()
            weight = loaded.get_submodule(name).weight.data
            # The loaded weight is exactly scale * table[code]; re-rounding it gives the same codes.
            assert torch.equal(weight, lutgrids.values(codes, scale, table, grid))
            assert torch.equal(lutgrids.round_to(weight, scale.float(), table.float(), grid), codes)
            assert torch.count_nonzero(weight != dense.get_submodule(name).weight.data) > 0
            total_bits += grid.stored_bits(*shape)
            assert entry["bpw"] == pytest.approx(grid.stored_bits(*shape) / (shape[0] * shape[1]), abs=1e-4)
    weights = sum(e["shape"][0] * e["shape"][1] for e in manifest["modules"].values())
    assert manifest["bpw"]["stored"] == pytest.approx(total_bits / weights)
    info = inspect_checkpoint(out)
    assert info["bpw"]["stored"] == pytest.approx(manifest["bpw"]["stored"])
    assert all(row["format"] == "lut4" for row in info["modules"])
    assert "lookup tables" in info["engines"]["llama.cpp"] and "own layout" in info["engines"]["vllm"]
    # Stock transformers is stopped, not handed random weights.
    with pytest.raises(Exception, match="custom code|trust_remote_code|compressor"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


def test_cli_lut3_rtn_needs_no_data(llama_dir, tmp_path, capsys, monkeypatch, isolated_cache):
    out = tmp_path / "lut3"
    monkeypatch.delenv("COMPRESSOR_DATA", raising=False)
    code, _, stderr = run_cli(["quantize", llama_dir, "--format", "lut3", "--method", "rtn", "--group-size",
                               "0", "-o", out], capsys, monkeypatch)
    assert code == 0, stderr
    manifest = json.loads((out / "compress.json").read_text())
    assert manifest["calibration"] is None
    assert {e["methods"][0] for e in manifest["modules"].values()} == {"lut3+rtn"}
    loaded, _ = load_model(ModelSource(str(out)))
    weight = loaded.get_submodule("model.layers.0.mlp.up_proj").weight.data
    assert (torch.unique(weight, dim=None).numel() <= 8 * weight.shape[0])  # 8 values per row at most
    assert all(len(torch.unique(row)) <= 8 for row in weight)


@pytest.mark.parametrize("args, message", [
    (["--method", "awq"], "only --method gptq or rtn"),
    (["--asym"], "drop --asym"),
    (["--bits", "3"], "drop --bits"),
    (["--group-size", "auto"], "drop --group-size auto"),
    (["--embeddings", "int8"], "--embeddings int8 is not combined"),
])
def test_cli_lut_bad_input(llama_dir, tmp_path, capsys, monkeypatch, args, message):
    out = tmp_path / "bad"
    code, _, stderr = run_cli(["quantize", llama_dir, "--format", "lut4", *args, "-o", out], capsys,
                              monkeypatch)
    assert code == 2 and message in stderr and not out.exists()
    assert len(stderr.strip().splitlines()) == 1


def test_export_to_gguf_refuses_tables(llama_dir, tmp_path, capsys, monkeypatch, isolated_cache):
    out = tmp_path / "lut"
    code, _, stderr = run_cli(["quantize", llama_dir, "--format", "lut4", "--method", "rtn", "-o", out],
                              capsys, monkeypatch)
    assert code == 0, stderr
    code, _, stderr = run_cli(["export", out, "--to", "gguf", "-o", tmp_path / "x.gguf"], capsys, monkeypatch)
    assert code == 2 and "lookup" in stderr and not (tmp_path / "x.gguf").exists()


def test_runs_packed_with_lut_linear(llama_dir, tmp_path, capsys, monkeypatch, isolated_cache):
    import compressor
    from compressor_kernels import LutLinear

    out = tmp_path / "lut"
    code, _, stderr = run_cli(["quantize", llama_dir, "--format", "lut4", "--method", "rtn", "--group-size",
                               "32", "-o", out], capsys, monkeypatch)
    assert code == 0, stderr
    packed, _ = compressor.load(out)
    dense, _ = load_model(ModelSource(str(out)))
    layers = [m for m in packed.modules() if isinstance(m, LutLinear)]
    assert len(layers) == 14
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(packed.get_submodule(name).dense_weight(), dense.get_submodule(name).weight.data)
    # Packed: 4-bit codes and float16 scales / tables instead of float32 weights.
    assert packed.get_submodule(name).weight_bytes < dense.get_submodule(name).weight.numel() * 4 / 4
    ids = torch.tensor([[3, 17, 42, 99, 7, 250]])
    with torch.no_grad():
        assert torch.allclose(packed(ids).logits, dense(ids).logits, atol=1e-5)
    from compressor import hub

    assert "learned lookup tables (LUT4" in hub.model_card(out)
    # `compress eval --json` reads the guarded folder (tokenizer included) without asking anything.
    code, stdout, stderr = run_small_eval(out, tmp_path, capsys, monkeypatch)
    assert code == 0, stderr
    assert json.loads(stdout)["perplexity"]["ppl"] > 1 and "custom code" not in stdout + stderr


def _lut_state(train_rows=12, cols=64, seed=0):
    from compressor.passes import LinearState, get_pass
    from compressor.stats import InputStats

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, cols, generator=generator)
    stats = InputStats(cols)
    stats.add_batch(x)
    dense = torch.randn(train_rows, cols, generator=generator) * 0.05
    layer = LinearState("layer", dense.clone(), torch.float32)
    get_pass("lut").compress(layer, stats, {"format": "lut4", "group_size": 32})
    return layer, dense


def test_learned_lut_starts_where_the_format_says():
    """Untouched, the learner reproduces the stored weights (scales) or round to nearest of the dense
    weights on the stored tables (rounding); its final() stores ascending float16 tables whose values
    are what the forward computed."""
    from compressor.passes.reconstruct import LearnedLut

    layer, dense = _lut_state()
    q = layer.quant
    stored = lutgrids.values(q.codes, q.scale, q.table, q.grid)
    with torch.no_grad():
        assert torch.equal(LearnedLut(layer, dense, stored, "scales").weight(), stored)
        # full (Block-AP): latent weights from the stored values (start: init), or the dense ones
        assert torch.allclose(LearnedLut(layer, dense, stored, "full").weight(), stored, atol=1e-7)
        from_dense = LearnedLut(layer, dense, stored, "full", start="dense")
        assert torch.equal(from_dense.params["weight"], dense)
        rounding = LearnedLut(layer, dense, stored, "rounding")
        nearest = lutgrids.values(lutgrids.round_to(dense, q.scale.float(), q.table.float(), q.grid), q.scale,
                                  q.table, q.grid)
        assert torch.allclose(rounding.weight(), nearest, atol=1e-7)
        # Moving every offset by +0.5 of the local spacing never lowers a weight's value.
        rounding.params["offset"].fill_(0.5)
        assert (rounding.weight() >= nearest - 1e-7).all() and (rounding.weight() > nearest).any()
        # Learned tables may leave their order: final() sorts them and renumbers the codes.
        scales = LearnedLut(layer, dense, stored, "scales")
        scales.params["table"][:, 0] += 3.0  # the smallest value moves past others
        expected = scales.weight()
        weight, quant = scales.final(torch.float32)
    assert (quant.table.float().diff(dim=1) >= 0).all() and quant.table.dtype == torch.float16
    assert torch.equal(weight, lutgrids.values(quant.codes, quant.scale, quant.table, q.grid))
    assert torch.allclose(weight, expected, rtol=2e-3, atol=1e-4)  # float16 storage


@pytest.mark.parametrize("train, iters, gain", [("scales", 40, 0.9), ("rounding", 200, 0.99),
                                                ("full", 200, 0.8)])
def test_block_reconstruction_learns_tables(train, iters, gain):
    """lut then reconstruct on a tiny Llama: block 0's error falls below the tables' own; the model's
    weights are exactly what the stored codes, scales and ascending float16 tables give."""
    from compressor.pipeline import compress_model
    from compressor.plan import build_plan
    from tests.conftest import make_model
    from tests.test_reconstruct import _block0_error, _ids

    ids = _ids()
    dense, init, learned = make_model("llama"), make_model("llama"), make_model("llama")
    step = {"method": "lut", "format": "lut4", "group_size": 32}
    compress_model(init, build_plan(init, [step]), ids, batch_size=4)
    records = compress_model(learned, build_plan(learned, [
        step, {"method": "reconstruct", "train": train, "iters": iters, "batch": 2}]), ids, batch_size=4)
    assert records["model.layers.0.mlp.up_proj"].metrics["reconstruct_kept"]
    for name, state in records.items():
        q = state.quant
        assert (q.table.float().diff(dim=1) >= 0).all()
        assert torch.equal(learned.get_submodule(name).weight.data, lutgrids.values(q.codes, q.scale, q.table,
                                                                                    q.grid))
    assert _block0_error(dense, learned, ids) < gain * _block0_error(dense, init, ids)
