"""PTQ1.61 (`--method ptq161`): the layout's bit count by hand, packing round trips, the pass against
its definitions on small tensors (salient channels, two values per row, closed-form refit against
brute force), the block reconstruction of its numbers, and the checkpoint through the CLI, both
loaders and the refusals."""

import json

import pytest
import torch
from safetensors import safe_open

from compressor import binarygrids, budget
from compressor.binarygrids import BinaryGrid
from compressor.checkpoint import inspect_checkpoint
from compressor.errors import CompressorError
from compressor.model import ModelSource, load_model
from compressor.pack import pack_binary_linear, unpack_binary_linear
from compressor.passes import LinearState, get_pass
from compressor.stats import InputStats
from tests.test_cli import run_cli, run_small_eval


def test_stored_bits_hand_count():
    grid = BinaryGrid(salient=0.2)
    # 6 rows of 10 columns, 2 salient: mask 10 bits -> 1 word; 6 x 2 codes of 4 bits = 48 -> 2 words;
    # 6 x 8 signs = 48 -> 2 words; 4 float16 numbers per row; a float16 factor per binary column.
    assert grid.stored_bits(6, 10) == 32 * (1 + 2 + 2) + 6 * 64 + 8 * 16
    assert grid.salient_count(576) == 115 and grid.bits == pytest.approx(1.6)
    assert budget.quantized_linear_bits(6, 10, grid, 16) == grid.stored_bits(6, 10)
    # A 4096 x 4096 linear: the paper's 1.6 bits plus 64 per row and 17 per column, about 1.62.
    assert grid.stored_bits(4096, 4096) / 4096**2 == pytest.approx(1.6 + (64 + 16.8) / 4096, abs=1e-3)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_bits_round_trips(bits):
    codes = torch.randint(0, 2**bits, (7, 13), generator=torch.Generator().manual_seed(bits))
    packed = binarygrids.pack_bits(codes, bits)
    assert packed.dtype == torch.int32 and packed.numel() == binarygrids.words(91, bits)
    assert torch.equal(binarygrids.unpack_bits(packed, bits, 91).view(7, 13).long(), codes)
    if bits == 1:  # the first code is the lowest bit: 1, 0, 1 -> 0b101
        assert int(binarygrids.pack_bits(torch.tensor([1, 0, 1]), 1)[0]) == 5


def test_salient_columns_are_the_largest_inputs():
    absmax = torch.tensor([0.5, 3.0, 0.1, 3.0, 2.0, 0.0, 1.0, 0.2, 0.3, 0.4])
    mask = binarygrids.salient_columns(absmax, BinaryGrid(salient=0.3))
    assert mask.nonzero().squeeze(1).tolist() == [1, 3, 4]


def _layer_and_stats(rows=24, cols=40, tokens=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=generator) @ mixing
    x[:, :4] *= 6  # four outlier channels
    stats = InputStats(cols, absmax=True)
    stats.add_batch(x)
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    return LinearState("layer", weight.clone(), torch.float32), stats, x, weight


def test_pass_binarises_all_but_the_salient_channels():
    layer, stats, x, dense = _layer_and_stats()
    get_pass("ptq161").compress(layer, stats, {"salient": 0.1})
    q = layer.quant
    assert q.mask.nonzero().squeeze(1).tolist() == [0, 1, 2, 3]  # the outlier channels
    assert torch.equal(layer.weight, binarygrids.values(q.mask, q.codes, q.signs, q.row, q.column))
    binary = layer.weight[:, ~q.mask]
    scale, low, alpha, beta = q.row.float().unbind(1)
    # Every binarised weight is beta +- alpha (column factors start at 1); salient ones on 16 levels.
    expected = torch.where(q.signs, beta[:, None] + alpha[:, None], beta[:, None] - alpha[:, None])
    assert torch.equal(binary, expected) and torch.equal(q.column, torch.ones(36, dtype=torch.float16))
    assert all(len(torch.unique(row)) <= 16 for row in layer.weight[:, q.mask])
    assert q.row.dtype == torch.float16 and int(q.codes.max()) <= 15
    # The closed-form refit lowers the output error; GPTQ's error feedback beats plain rounding.
    metrics = layer.metrics
    assert metrics["ptq161_output_error"] <= metrics["ptq161_output_error_before_refit"]
    plain, stats2, _, _ = _layer_and_stats()
    get_pass("ptq161").compress(plain, stats2, {"salient": 0.1, "solver": "rtn"})

    def output_error(w):
        return float((x @ (w - dense).T).square().sum())

    assert output_error(layer.weight) < 0.8 * output_error(plain.weight)


def test_refit_rows_equals_brute_force_least_squares():
    from compressor.passes.ptq161 import refit_rows

    layer, stats, x, dense = _layer_and_stats(rows=5, cols=12, seed=3)
    get_pass("ptq161").compress(layer, stats, {"salient": 0.25, "solver": "rtn"})
    q = layer.quant
    column = torch.rand(int((~q.mask).sum()), generator=torch.Generator().manual_seed(4)) + 0.5
    hessian = stats.hessian()
    fitted = refit_rows(dense, q.mask, q.codes, q.signs, column, hessian)
    chol = torch.linalg.cholesky(hessian.double())
    for r in range(5):
        basis = torch.zeros(12, 4, dtype=torch.float64)
        basis[q.mask, 0], basis[q.mask, 1] = q.codes[r].double(), 1
        basis[~q.mask, 2] = (q.signs[r].double() * 2 - 1) * column.double()
        basis[~q.mask, 3] = column.double()
        # min_x ||L^T (w - A x)||: the output error in the metric of H = L L^T.
        best = torch.linalg.lstsq(chol.T @ basis, chol.T @ dense[r].double()).solution
        assert torch.allclose(fitted[r].double(), best, rtol=2e-3, atol=1e-4)


def test_settings_are_checked():
    ptq161 = get_pass("ptq161")
    ptq161.validate({"salient": 0.1, "salient_bits": 8, "solver": "rtn"})
    assert ptq161.statistics({}) == {"hessian", "absmax"}
    for bad in ({"salient": 1.5}, {"salient_bits": 3}, {"solver": "awq"}, {"bits": 2}):
        with pytest.raises(CompressorError):
            ptq161.validate(bad)


def test_packed_layout_round_trips_and_refuses_a_wrong_shape():
    layer, stats, _, _ = _layer_and_stats()
    get_pass("ptq161").compress(layer, stats, {})
    q = layer.quant
    tensors = pack_binary_linear(q)
    mask, codes, signs, row, column = unpack_binary_linear(tensors, q.grid)
    assert torch.equal(mask, q.mask) and torch.equal(codes, q.codes) and torch.equal(signs, q.signs)
    assert torch.equal(binarygrids.values(mask, codes, signs, row, column), layer.weight)
    bits = sum(t.numel() * t.element_size() * 8 for k, t in tensors.items() if k != "weight_shape")
    assert bits == q.grid.stored_bits(24, 40)
    tensors["weight_column"] = tensors["weight_column"][:-1]
    with pytest.raises(ValueError, match="weight_column"):
        unpack_binary_linear(tensors, q.grid)


def test_cli_ptq161_round_trips_and_runs_packed(llama_dir, calibration_file, tmp_path, capsys, monkeypatch,
                                                isolated_cache):
    from transformers import AutoModelForCausalLM

    import compressor
    from compressor_kernels import BinaryLinear

    out = tmp_path / "b161"
    code, stdout, stderr = run_cli(
        ["quantize", llama_dir, "--method", "ptq161", "--reconstruct-iters", "4", "--calibration",
         calibration_file, "--samples", "4", "--seqlen", "32", "-o", out, "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    manifest = json.loads((out / "compress.json").read_text())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressor-ptq161" and config["salient"] == 0.2
    loaded, _ = load_model(ModelSource(str(out)))
    dense = AutoModelForCausalLM.from_pretrained(llama_dir)
    grid = BinaryGrid()
    total_bits = 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        for name, entry in manifest["modules"].items():
            assert entry["methods"] == ["ptq161+gptq", "reconstruct"]
            stored = {local: handle.get_tensor(f"{name}.{local}") for local in binarygrids.TENSORS}
            mask, codes, signs, row, column = unpack_binary_linear(stored, grid)
            weight = loaded.get_submodule(name).weight.data
            assert torch.equal(weight, binarygrids.values(mask, codes, signs, row, column))
            assert torch.count_nonzero(weight != dense.get_submodule(name).weight.data) > 0
            # Every stored bit is counted: the tensors' sizes, weight_shape aside.
            shape = stored["weight_shape"].tolist()
            bits = sum(t.numel() * t.element_size() * 8 for k, t in stored.items() if k != "weight_shape")
            assert bits == grid.stored_bits(*shape)
            total_bits += bits
            assert entry["bpw"] == pytest.approx(bits / (shape[0] * shape[1]), abs=1e-4)
    weights = sum(e["shape"][0] * e["shape"][1] for e in manifest["modules"].values())
    assert manifest["bpw"]["stored"] == pytest.approx(total_bits / weights)
    info = inspect_checkpoint(out)
    assert info["bpw"]["stored"] == pytest.approx(manifest["bpw"]["stored"])
    assert all(row["format"] == "ptq161" for row in info["modules"])
    assert "ternary" in info["engines"]["llama.cpp"] and "own layout" in info["engines"]["vllm"]
    with pytest.raises(Exception, match="custom code|trust_remote_code|compressor"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    # compressor.load keeps the codes and signs packed; the same logits as the dequantized model.
    packed, _ = compressor.load(out)
    layers = [m for m in packed.modules() if isinstance(m, BinaryLinear)]
    assert len(layers) == 14
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(packed.get_submodule(name).dense_weight(), loaded.get_submodule(name).weight.data)
    assert packed.get_submodule(name).weight_bytes < loaded.get_submodule(name).weight.numel() * 4 / 8
    ids = torch.tensor([[3, 17, 42, 99, 7, 250]])
    with torch.no_grad():
        assert torch.allclose(packed(ids).logits, loaded(ids).logits, atol=1e-4)
    from compressor import hub

    assert "PTQ1.61" in hub.model_card(out)
    code, stdout, stderr = run_small_eval(out, tmp_path, capsys, monkeypatch)
    assert code == 0, stderr
    code, _, stderr = run_cli(["export", out, "--to", "gguf", "-o", tmp_path / "x.gguf"], capsys, monkeypatch)
    assert code == 2 and "ternary" in stderr and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("args, message", [
    (["--bits", "2"], "drop --bits"),
    (["--group-size", "64"], "drop --group-size"),
    (["--asym"], "drop --asym"),
    (["--rotate"], "drop --rotate"),
    (["--embeddings", "int8"], "--embeddings int8 is not combined"),
])
def test_cli_ptq161_bad_input(llama_dir, tmp_path, capsys, monkeypatch, args, message):
    out = tmp_path / "bad"
    code, _, stderr = run_cli(["quantize", llama_dir, "--method", "ptq161", *args, "-o", out], capsys,
                              monkeypatch)
    assert code == 2 and message in stderr and not out.exists()
    assert len(stderr.strip().splitlines()) == 1


def test_block_reconstruction_learns_the_numbers_and_keeps_codes_and_signs():
    """train: scales on PTQ1.61's records: codes, signs and mask stay; the learned numbers lower the
    block's error and are exactly what the model computes with."""
    from compressor.pipeline import compress_model
    from compressor.plan import build_plan
    from tests.conftest import make_model
    from tests.test_reconstruct import _block0_error, _ids

    ids = _ids()
    dense = make_model("llama")
    init = make_model("llama")
    first = compress_model(init, build_plan(init, [{"method": "ptq161"}]), ids, batch_size=4)
    learned = make_model("llama")
    records = compress_model(learned, build_plan(learned, [
        {"method": "ptq161"}, {"method": "reconstruct", "train": "scales", "iters": 40, "batch": 2}]), ids,
        batch_size=4)
    name = "model.layers.0.mlp.gate_proj"
    assert records[name].metrics["reconstruct_kept"]
    assert torch.equal(records[name].quant.codes, first[name].quant.codes)
    assert torch.equal(records[name].quant.signs, first[name].quant.signs)
    assert not torch.equal(records[name].quant.column, first[name].quant.column)  # column factors learned
    for name, state in records.items():
        q = state.quant
        assert torch.equal(learned.get_submodule(name).weight.data,
                           binarygrids.values(q.mask, q.codes, q.signs, q.row, q.column))
    assert _block0_error(dense, learned, ids) < 0.97 * _block0_error(dense, init, ids)


def test_pass_keeps_each_weight_before_binarising_when_a_block_pass_follows():
    """keep_unrounded: every binarised weight's sign is its pre-binarisation value's side of the
    row's beta (fitted on the dense weights), and the learner built on it starts exactly at the
    stored codes and signs."""
    from compressor.passes.reconstruct import LearnedBinary

    layer, stats, _, dense = _layer_and_stats()
    layer.keep_unrounded = True
    get_pass("ptq161").compress(layer, stats, {"salient": 0.1})
    q = layer.quant
    assert layer.unrounded.shape == dense.shape
    beta, _ = binarygrids.fit_binary(dense[:, ~q.mask])
    assert torch.equal(q.signs, layer.unrounded[:, ~q.mask] >= beta[:, None])
    assert not torch.equal(layer.unrounded, dense)  # error-fed, not the dense weights
    learner = LearnedBinary(layer, torch.device("cpu"), "rounding")
    assert "offset" in learner.params
    with torch.no_grad():
        assert torch.allclose(learner.weight(), binarygrids.values(q.mask, q.codes, q.signs, q.row, q.column))
        start_weight, start_quant = learner.final(torch.float32)
    assert torch.equal(start_quant.codes, q.codes) and torch.equal(start_quant.signs, q.signs)
    plain, stats2, _, _ = _layer_and_stats()
    get_pass("ptq161").compress(plain, stats2, {"salient": 0.1})
    assert plain.unrounded is None  # not kept unless a block pass follows


def test_block_reconstruction_with_rounding_flips_signs_and_codes_and_lowers_the_error():
    """train: rounding on PTQ1.61's records: signs and salient codes move too (signed descent from
    their pre-binarisation values); what is stored is what the model computes with, and the block's
    error ends below both the initialisation's and the numbers-only learning's. train: full moves
    the same positions by Adam and lowers the error too."""
    from compressor.pipeline import compress_model
    from compressor.plan import build_plan
    from tests.conftest import make_model
    from tests.test_reconstruct import _block0_error, _ids

    ids = _ids()
    dense = make_model("llama")
    init = make_model("llama")
    first = compress_model(init, build_plan(init, [{"method": "ptq161"}]), ids, batch_size=4)
    runs = {}
    for train in ("scales", "rounding", "full"):
        model = make_model("llama")
        records = compress_model(model, build_plan(model, [
            {"method": "ptq161"}, {"method": "reconstruct", "train": train, "iters": 40, "batch": 2}]), ids,
            batch_size=4)
        runs[train] = (model, records)
    model, records = runs["rounding"]
    block0 = [n for n in first if ".layers.0." in n]  # later blocks see other inputs, so other masks
    flipped = sum(int((records[n].quant.signs != first[n].quant.signs).sum()) for n in block0)
    moved = sum(int((records[n].quant.codes != first[n].quant.codes).sum()) for n in block0)
    assert flipped > 0 and moved > 0
    assert all(torch.equal(records[n].quant.mask, first[n].quant.mask) for n in block0)
    for name, state in records.items():
        q = state.quant
        assert q.codes.dtype == torch.uint8 and q.signs.dtype == torch.bool
        assert torch.equal(model.get_submodule(name).weight.data,
                           binarygrids.values(q.mask, q.codes, q.signs, q.row, q.column))
    error = _block0_error(dense, model, ids)
    assert error < 0.97 * _block0_error(dense, init, ids)
    assert error < _block0_error(dense, runs["scales"][0], ids)
    # full (Block-AP): the same positions moved by Adam, unbounded; it flips signs and codes too
    model, records = runs["full"]
    assert sum(int((records[n].quant.signs != first[n].quant.signs).sum()) for n in block0) > 0
    assert _block0_error(dense, model, ids) < 0.97 * _block0_error(dense, init, ids)
