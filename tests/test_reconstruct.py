"""Block-wise reconstruction (compressor/passes/reconstruct.py) and the block scope of the pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import grids
from compressor.errors import CompressorError
from compressor.job import Calibration, run_compression
from compressor.model import ModelSource, block_linears, decoder_blocks
from compressor.passes import LinearState, QuantizedWeight, Scope, scope_of
from compressor.passes.gptq import GPTQOptions, solve
from compressor.passes.reconstruct import LearnedLinear
from compressor.pipeline import capture_block_inputs, compress_model, output_hidden
from compressor.plan import build_plan, validate_recipe
from tests.conftest import make_model
from tests.test_cli import run_cli

GPTQ_W3 = {"method": "gptq", "bits": 3, "group_size": 32, "symmetric": False}
RECONSTRUCT = {"method": "reconstruct", "iters": 40, "batch": 2}


def _ids(n=8, length=32, seed=0):
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def _block0_error(dense, compressed, ids) -> float:
    """Squared error of block 0's output, compressed vs dense, on the same inputs (block 0 sees the
    embeddings either way)."""
    prefix, blocks = decoder_blocks(dense)
    inputs = capture_block_inputs(dense, blocks, prefix, ids, torch.device("cpu"), None)
    _, compressed_blocks = decoder_blocks(compressed)
    total = 0.0
    with torch.no_grad():
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
            want = output_hidden(blocks[0](hidden, **kwargs))
            got = output_hidden(compressed_blocks[0](hidden, **kwargs))
            total += float((want - got).pow(2).sum())
    return total


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("train", ["rounding", "full", "scales"])
def test_reconstruction_lowers_the_block_error_below_gptq(family, train):
    ids = _ids()
    dense = make_model(family)
    plain = make_model(family)
    plain_records = compress_model(plain, build_plan(plain, [GPTQ_W3]), ids, batch_size=4)
    learned = make_model(family)
    records = compress_model(learned, build_plan(learned, [GPTQ_W3, {**RECONSTRUCT, "train": train}]), ids,
                             batch_size=4)
    for state in records.values():
        assert state.methods == ["gptq", "reconstruct"]
        assert state.metrics["block_error_after"] <= state.metrics["block_error_before"]
    gptq_error, learned_error = _block0_error(dense, plain, ids), _block0_error(dense, learned, ids)
    assert learned_error <= gptq_error
    # Random tiny models at 3 bits leave plenty to learn: the error must drop, not only hold.
    assert learned_error < 0.97 * gptq_error, (learned_error, gptq_error)
    if train == "scales":  # only the numbers beside the codes move (block 0: the same inputs as GPTQ's)
        for name, state in records.items():
            if ".layers.0." in name:
                plain_quant, quant = plain_records[name].quant, state.quant
                width = quant.grid.group_width(quant.codes.shape[1])
                zero, plain_zero = (q.zero.repeat_interleave(width, 1) for q in (quant, plain_quant))
                assert torch.equal(quant.codes - zero, plain_quant.codes - plain_zero)


def test_records_hold_the_weights_the_model_computes_with():
    """After reconstruction the codes, scales and zeros in the records dequantize to exactly the
    weights in the model (what the writer packs is what was evaluated)."""
    model = make_model("llama")
    records = compress_model(model, build_plan(model, [GPTQ_W3, RECONSTRUCT]), _ids(), batch_size=4)
    assert any(s.metrics["reconstruct_kept"] for s in records.values())
    for name, state in records.items():
        quant = state.quant
        weight = grids.dequantize(quant.codes, quant.scale.float(), quant.zero, quant.grid)
        assert torch.equal(weight, model.get_submodule(name).weight.data)
        assert state.unrounded is None  # dropped once learned: no extra copy kept


def test_learned_quantizer_starts_exactly_at_gptq_or_at_rtn():
    """With untouched parameters, the learned quantizer reproduces GPTQ's codes from its error-fed
    weights with start: init, and round-to-nearest with start: dense."""
    torch.manual_seed(0)
    weight = torch.randn(24, 80) * 0.1
    x = torch.randn(256, 80)
    grid = grids.IntGrid(bits=3, group_size=32, symmetric=False)  # ragged: 32 + 32 + 16
    result = solve(weight, x.T @ x, grid, GPTQOptions(), keep_unrounded=True)
    codes = grids.quantize(result.weight, result.scale, result.zero, grid)
    assert not torch.equal(codes, grids.quantize(weight, result.scale, result.zero, grid))  # GPTQ moved them
    state = LinearState(name="w", weight=None, dtype=torch.float32, unrounded=result.unrounded,
                        quant=QuantizedWeight(grid, codes, result.scale, result.zero))
    unit = LearnedLinear(state, weight, result.weight, "rounding", start="init")
    final, quant = unit.final(torch.float32)
    assert torch.equal(quant.codes, codes)
    assert torch.equal(final, result.weight)
    # The default, AutoRound's: round-to-nearest of the dense weight on the same scales.
    final, quant = LearnedLinear(state, weight, result.weight, "rounding").final(torch.float32)
    assert torch.equal(quant.codes, grids.quantize(weight, result.scale, result.zero, grid))


def test_sparse_masks_hold_and_survivors_are_learned():
    model = make_model("qwen2")
    prune = {"method": "sparsegpt", "pattern": "2:4"}
    reference = make_model("qwen2")
    compress_model(reference, build_plan(reference, [prune]), _ids(), batch_size=4)
    plan = build_plan(model, [prune, {**RECONSTRUCT, "iters": 20}])
    records = compress_model(model, plan, _ids(), batch_size=4)
    changed = False
    for name, state in records.items():
        weight = model.get_submodule(name).weight.data
        assert torch.equal(weight == 0, reference.get_submodule(name).weight.data == 0) or \
            bool(((weight != 0) <= state.mask).all())
        assert (weight.view(weight.shape[0], -1, 4) != 0).sum(-1).max() <= 2  # 2:4 holds exactly
        changed |= not torch.equal(weight, reference.get_submodule(name).weight.data)
    assert changed


def test_block_pass_sees_dense_targets_and_compressed_inputs():
    """The block scope's contract, with a toy block pass: the targets are the dense block's
    outputs on the dense model's own stream, and the inputs the compressed model's stream."""
    from compressor import passes
    from compressor.passes import reconstruct

    seen = []

    class Toy:
        SCOPE = Scope.BLOCK
        validate = staticmethod(lambda args: None)
        needs_data = staticmethod(lambda args: True)
        target_stream = staticmethod(lambda args: "dense")

        @staticmethod
        def refine(block, records, data, args):
            seen.append((sorted(records), data))

    dense = make_model("llama")
    model = make_model("llama")
    passes.register_pass("toy-block", Toy)
    try:
        ids = _ids(4)
        compress_model(model, build_plan(model, [GPTQ_W3, {"method": "toy-block"}]), ids, batch_size=2)
    finally:
        del passes.PASSES["toy-block"]
    assert [names for names, _ in seen] == [sorted(block_linears(b)) for b in decoder_blocks(model)[1]]
    prefix, blocks = decoder_blocks(dense)
    stream = capture_block_inputs(dense, blocks, prefix, ids, torch.device("cpu"), 2)
    with torch.no_grad():
        for index, (_, data) in enumerate(seen):
            pairs = zip(stream.hidden, stream.kwargs, strict=True)
            dense_out = [output_hidden(blocks[index](h, **k)) for h, k in pairs]
            for got, want in zip(data.targets, dense_out, strict=True):
                torch.testing.assert_close(got, want)
            if index == 0:  # block 0 receives the embeddings either way
                torch.testing.assert_close(data.inputs[0], stream.hidden[0])
            else:  # after a compressed block the two streams differ
                assert not torch.allclose(data.inputs[0], stream.hidden[0])
            stream.hidden = dense_out
    assert reconstruct.SCOPE == Scope.BLOCK


def test_checkpoint_loads_in_transformers_with_the_learned_weights(llama_dir, calibration_file, tmp_path):
    """The checkpoint holds what was learned: transformers' logits equal those of the same run made
    in memory, and differ from plain GPTQ's."""
    from transformers import AutoModelForCausalLM

    from compressor import data
    from compressor.model import load_model

    out = tmp_path / "rec"
    recipe = {"passes": [GPTQ_W3, RECONSTRUCT]}
    manifest = run_compression(ModelSource(str(llama_dir)), recipe, out,
                               Calibration(str(calibration_file), 6, 32, batch_size=2), "cpu").manifest
    assert all(m["methods"] == ["gptq", "reconstruct"] for m in manifest["modules"].values())
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

    def in_memory(passes):
        model, tokenizer = load_model(ModelSource(str(llama_dir)))
        ids = data.calibration_windows(tokenizer, str(calibration_file), 6, 32, seed=0)
        compress_model(model, build_plan(model, passes), ids, batch_size=2)
        return model

    ids = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        got = loaded(ids).logits
        torch.testing.assert_close(got, in_memory(recipe["passes"])(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, in_memory([GPTQ_W3])(ids).logits, rtol=1e-3, atol=1e-3)


def test_resume_with_the_dense_stream_gives_the_uninterrupted_checkpoint(llama_dir, calibration_file,
                                                                        tmp_path, monkeypatch):
    from compressor import job as job_module

    recipe = {"passes": [GPTQ_W3, {**RECONSTRUCT, "iters": 10}]}

    def run(out, **kwargs):
        calibration = Calibration(str(calibration_file), 6, 32, batch_size=2)
        source = ModelSource(str(llama_dir))
        return run_compression(source, recipe, out, calibration, "cpu", **kwargs).manifest

    reference = run(tmp_path / "reference")
    original = job_module.WriteEachBlock.done

    def done(self, index, *args):
        original(self, index, *args)
        if index == 0:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(job_module.WriteEachBlock, "done", done)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "o")
    resumed = run(tmp_path / "o", resume=True)
    assert resumed["resumed_at_block"] == 1
    assert resumed["checksum"] == reference["checksum"]


def test_nothing_to_learn_is_refused():
    with pytest.raises(CompressorError, match="nothing to learn"):
        validate_recipe([{"method": "reconstruct"}])
    with pytest.raises(CompressorError, match="nothing to learn after fp4"):
        validate_recipe([{"method": "fp4", "format": "nvfp4"}, {"method": "reconstruct"}])
    with pytest.raises(CompressorError, match="train must be one of"):
        validate_recipe([GPTQ_W3, {"method": "reconstruct", "train": "everything"}])
    with pytest.raises(CompressorError, match="unknown setting"):
        validate_recipe([GPTQ_W3, {"method": "reconstruct", "epochs": 3}])
    with pytest.raises(CompressorError, match="start must be one of dense, init"):
        validate_recipe([GPTQ_W3, {"method": "reconstruct", "start": "gptq"}])


@pytest.mark.parametrize("args, message", [
    (["quantize", "--reconstruct", "--format", "nvfp4"], "keeps its float grid"),
    (["quantize", "--reconstruct-iters", "5"], "need --reconstruct"),
    (["sparsify", "--pattern", "2:4", "--reconstruct", "--sparsity", "0.5"], "exactly one"),
])
def test_cli_refuses_with_one_line(args, message, llama_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    code, _, stderr = run_cli([*args, llama_dir, "-o", out], capsys, monkeypatch)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_quantize_with_reconstruct(llama_dir, calibration_file, tmp_path, capsys, monkeypatch,
                                       isolated_cache):
    out = tmp_path / "w3r"
    code, stdout, stderr = run_cli(
        ["quantize", llama_dir, "--bits", "3", "--group-size", "32", "--asym", "--reconstruct",
         "--reconstruct-iters", "5", "--calibration", calibration_file, "--samples", "4", "--seqlen", "32",
         "-o", out, "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["recipe"]["passes"][-1] == {"method": "reconstruct", "train": "rounding", "iters": 5}
    assert all("reconstruct" in m["methods"] for m in summary["modules"].values())
    assert (out / "recipe.yaml").is_file()
    assert scope_of("reconstruct") == Scope.BLOCK


def test_python_api_writes_the_bytes_the_cli_writes(llama_dir, calibration_file, tmp_path, capsys,
                                                    monkeypatch, isolated_cache):
    import compressor

    cli_out = tmp_path / "cli"
    code, stdout, stderr = run_cli(
        ["quantize", llama_dir, "--bits", "3", "--group-size", "32", "--asym", "--rotate", "--reconstruct",
         "--reconstruct-iters", "5", "--calibration", calibration_file, "--samples", "4", "--seqlen", "32",
         "-o", cli_out, "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    from_cli = json.loads(stdout)
    result = compressor.quantize(str(llama_dir), output=tmp_path / "api", bits=3, group_size=32,
                                 symmetric=False, rotate=True, reconstruct=True, reconstruct_iters=5,
                                 calibration=str(calibration_file), samples=4, seqlen=32)
    assert result.manifest["checksum"]["sha256"] == from_cli["checksum"]["sha256"]
    assert [p["method"] for p in result.manifest["recipe"]["passes"]] == ["rotate", "gptq", "reconstruct"]
    # compressor.run takes the same recipe as data and writes the same bytes again.
    again = compressor.run(result.manifest["recipe"], str(llama_dir), tmp_path / "run",
                           calibration=str(calibration_file), samples=4, seqlen=32)
    assert again.manifest["checksum"]["sha256"] == from_cli["checksum"]["sha256"]


def test_compressed_target_stream_through_a_recipe(llama_dir, calibration_file, tmp_path):
    """`target_stream: compressed` (the dense block on the compressed model's stream: one stream, no
    copy of the dense one) runs from a recipe; `targets` stays the recipe's module selector."""
    second_block = {**RECONSTRUCT, "target_stream": "compressed", "targets": ["re:layers\\.1$"]}
    recipe = {"passes": [GPTQ_W3, second_block]}
    manifest = run_compression(ModelSource(str(llama_dir)), recipe, tmp_path / "o",
                               Calibration(str(calibration_file), 6, 32, batch_size=2), "cpu").manifest
    methods = {name: m["methods"] for name, m in manifest["modules"].items()}
    assert all(m == (["gptq", "reconstruct"] if ".layers.1." in n else ["gptq"]) for n, m in methods.items())
    with pytest.raises(CompressorError, match="target_stream must be one of"):
        validate_recipe([GPTQ_W3, {"method": "reconstruct", "target_stream": "teacher"}])


def test_norm_tuning_learns_the_gains_and_never_raises_the_error():
    """AdaQuant's statistics tuning (norms: true): the block's norm gains move with the weights,
    only when the block's error drops, and the model computes with what was kept."""
    from compressor.passes.reconstruct import norm_gains

    dense = make_model("llama")
    model = make_model("llama")
    records = compress_model(model, build_plan(model, [GPTQ_W3, {**RECONSTRUCT, "norms": True}]), _ids(),
                             batch_size=4)
    _, blocks = decoder_blocks(model)
    _, dense_blocks = decoder_blocks(dense)
    for index, block in enumerate(blocks):
        kept = records[f"model.layers.{index}.self_attn.q_proj"].metrics["reconstruct_kept"]
        gains, dense_gains = norm_gains(block), norm_gains(dense_blocks[index])
        assert sorted(gains) == ["input_layernorm.weight", "post_attention_layernorm.weight"]
        moved = any(not torch.equal(gains[n], dense_gains[n]) for n in gains)
        assert moved == kept
    assert any(s.metrics["reconstruct_kept"] for s in records.values())
    for state in records.values():
        assert state.metrics["block_error_after"] <= state.metrics["block_error_before"]
    with pytest.raises(CompressorError, match="unknown setting"):
        validate_recipe([GPTQ_W3, {**RECONSTRUCT, "norm": True}])
