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


FLOAT_FORMATS = [{"format": "nvfp4"}, {"format": "mxfp4"}, {"format": "fp4", "group_size": 32},
                 {"format": "e2m1"}]


@pytest.mark.parametrize("fp4", FLOAT_FORMATS, ids=lambda f: f["format"])
def test_float_grids_are_learned_on_their_own_grid(fp4):
    """4-bit float layers: the block error drops below the one-shot rounding's, and the records hold
    codes and scales in the format's own storage (NVFP4's scales on FP8 E4M3, MXFP4's powers of two
    untouched) that dequantize to exactly the weights the model computes with."""
    from compressor.passes.fp4 import dequantize

    ids = _ids()
    step = {"method": "fp4", **fp4}
    dense, plain, learned = make_model("llama"), make_model("llama"), make_model("llama")
    plain_records = compress_model(plain, build_plan(plain, [step]), ids, batch_size=4)
    records = compress_model(learned, build_plan(learned, [step, {**RECONSTRUCT, "iters": 60}]), ids,
                             batch_size=4)
    assert _block0_error(dense, learned, ids) < 0.97 * _block0_error(dense, plain, ids)
    for name, state in records.items():
        quant, before = state.quant, plain_records[name].quant
        assert state.metrics["block_error_after"] <= state.metrics["block_error_before"]
        assert torch.equal(dequantize(quant), learned.get_submodule(name).weight.data)
        if fp4["format"] == "nvfp4":
            assert torch.equal(quant.scale, quant.scale.to(torch.float8_e4m3fn).float())
            assert torch.equal(quant.global_scale, before.global_scale)
        if fp4["format"] == "mxfp4":
            assert torch.equal(quant.scale, before.scale)
        if fp4["format"] == "fp4" and ".layers.0." in name:  # each row keeps its searched format
            assert torch.equal(quant.row_format, before.row_format)


@pytest.mark.parametrize("train", ["full", "scales"])
def test_nvfp4_weights_or_scales_are_learned(train):
    from compressor.passes.fp4 import dequantize

    ids = _ids()
    step = {"method": "fp4", "format": "nvfp4"}
    dense, plain, learned = make_model("qwen2"), make_model("qwen2"), make_model("qwen2")
    plain_records = compress_model(plain, build_plan(plain, [step]), ids, batch_size=4)
    records = compress_model(learned, build_plan(learned, [step, {**RECONSTRUCT, "train": train}]), ids,
                             batch_size=4)
    assert _block0_error(dense, learned, ids) < 0.97 * _block0_error(dense, plain, ids)
    for name, state in records.items():
        assert torch.equal(dequantize(state.quant), learned.get_submodule(name).weight.data)
        if train == "scales":  # every code stays, whatever the block's inputs
            assert torch.equal(state.quant.codes, plain_records[name].quant.codes)


def test_learned_float_rounding_starts_at_round_to_nearest():
    """Untouched, the learned NVFP4 quantizer gives the one-shot pass's codes and weight; an offset of
    +-0.5 of the local spacing moves a value to the neighbouring code on E2M1's uneven grid."""
    from compressor import fpgrids
    from compressor.passes import FloatWeight
    from compressor.passes.fp4 import dequantize
    from compressor.passes.reconstruct import LearnedFloat

    torch.manual_seed(0)
    weight = torch.randn(8, 64)
    weight[3, 16:32] = 0  # an all-zero block: scale 0, codes +0, no NaN
    scale, global_scale = fpgrids.nvfp4_qparams(weight)
    codes = fpgrids.block_quantize(weight, scale / global_scale)
    quant = FloatWeight(fpgrids.float_grid("nvfp4"), codes, scale, global_scale)
    state = LinearState(name="w", weight=None, dtype=torch.float32, quant=quant)
    unit = LearnedFloat(state, weight, "rounding")
    final, learned = unit.final(torch.float32)
    assert torch.equal(learned.codes, codes) and torch.equal(final, dequantize(quant))
    assert scale[3, 1] == 0 and bool(unit.weight().isfinite().all())
    units = unit.latent.abs()
    spacing = torch.where(units < 2, 0.5, torch.where(units < 4, 1.0, 2.0))  # E2M1: 0 .5 1 1.5 2 3 4 6
    assert torch.equal(unit.spacing, spacing)
    with torch.no_grad():
        unit.params["offset"].fill_(0.5)
    values = fpgrids.fp_dequantize(unit.final(torch.float32)[1].codes, fpgrids.E2M1, 1.0)
    up = fpgrids.fp_dequantize(codes, fpgrids.E2M1, 1.0)
    inside = unit.latent.abs() < 5.5  # below the top code's rounding boundary
    # every value moved up by about half a step: never down, and to a higher code where it was past mid-step
    assert bool((values[inside] >= up[inside]).all()) and bool((values > up).any())


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


@pytest.mark.parametrize("init", [GPTQ_W3, {"method": "fp4", "format": "nvfp4", "gptq": True}],
                         ids=["int3", "nvfp4"])
def test_checkpoint_loads_in_transformers_with_the_learned_weights(llama_dir, calibration_file, tmp_path,
                                                                   init):
    """The checkpoint holds what was learned: transformers' logits (compressed-tensors' loader) equal
    those of the same run made in memory, and differ from the initialising pass's alone."""
    from transformers import AutoModelForCausalLM

    from compressor import data
    from compressor.model import load_model

    out = tmp_path / "rec"
    recipe = {"passes": [init, RECONSTRUCT]}
    manifest = run_compression(ModelSource(str(llama_dir)), recipe, out,
                               Calibration(str(calibration_file), 6, 32, batch_size=2), "cpu").manifest
    methods = ["fp4+gptq" if init["method"] == "fp4" else "gptq", "reconstruct"]
    assert all(m["methods"] == methods for m in manifest["modules"].values())
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
        assert not torch.allclose(got, in_memory([init])(ids).logits, rtol=1e-3, atol=1e-3)


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
    with pytest.raises(CompressorError, match="nothing to learn after fp4"):  # its inputs are quantized
        validate_recipe([{"method": "fp4", "format": "e2m1", "act_bits": 8}, {"method": "reconstruct"}])
    validate_recipe([{"method": "fp4", "format": "nvfp4"}, {"method": "reconstruct"}])
    with pytest.raises(CompressorError, match="train must be one of"):
        validate_recipe([GPTQ_W3, {"method": "reconstruct", "train": "everything"}])
    with pytest.raises(CompressorError, match="unknown setting"):
        validate_recipe([GPTQ_W3, {"method": "reconstruct", "epochs": 3}])
    with pytest.raises(CompressorError, match="start must be one of dense, init"):
        validate_recipe([GPTQ_W3, {"method": "reconstruct", "start": "gptq"}])


@pytest.mark.parametrize("args, message", [
    (["quantize", "--reconstruct", "--format", "e2m1", "--act-bits", "8"], "inputs are quantized too"),
    (["quantize", "--reconstruct", "--format", "mxfp4", "--reconstruct-train", "scales"], "nothing to learn"),
    (["quantize", "--reconstruct-iters", "5"], "need --reconstruct"),
    (["sparsify", "--pattern", "2:4", "--reconstruct", "--sparsity", "0.5"], "exactly one"),
])
def test_cli_refuses_with_one_line(args, message, llama_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    code, _, stderr = run_cli([*args, llama_dir, "-o", out], capsys, monkeypatch)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layout", [["--bits", "3", "--group-size", "32", "--asym"], ["--format", "mxfp4"]],
                         ids=["int3", "mxfp4"])
def test_cli_quantize_with_reconstruct(llama_dir, calibration_file, tmp_path, capsys, monkeypatch,
                                       isolated_cache, layout):
    out = tmp_path / "w3r"
    code, stdout, stderr = run_cli(
        ["quantize", llama_dir, *layout, "--reconstruct",
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


def test_sparsify_learns_longer_by_default():
    """Pruning alone gets 200 steps per block unless told (quantization keeps AutoRound's 50)."""
    from compressor.recipes import quantize_job, sparsify_job

    job = sparsify_job(pattern="2:4", method="sparsegpt", reconstruct=True)
    assert job.recipe["passes"][-1]["iters"] == 200
    assert sparsify_job(sparsity=0.5, method="sparsegpt", reconstruct=True,
                        reconstruct_iters=20).recipe["passes"][-1]["iters"] == 20
    assert quantize_job(bits=4, reconstruct=True).recipe["passes"][-1]["iters"] == 50


def _wide_llama(layers=2):
    """A Llama whose rows are multiples of 256, so the K-quants apply without fallback."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(3.0)
    return model


# (type, what is learned, the most block 0's error may keep of GPTQ's). On these random models GPTQ
# plus the closed-form header refit leaves little for the rounding to find at 4 bits and more (it
# is not kept there), while the header alone (scales) halves the error.
GGUF_CASES = [("q4_1", "scales", 0.8), ("iq4_nl", "rounding", 0.97),
              ("iq4_nl", "scales", 0.8), ("q2_k", "rounding", 0.8), ("q3_k", "rounding", 0.8),
              ("q4_k", "scales", 0.8), ("q6_k", "scales", 1.0)]


@pytest.mark.parametrize("qtype, train, bound", GGUF_CASES, ids=lambda c: str(c))
def test_gguf_blocks_are_learned_on_their_own_grid(qtype, train, bound):
    """GGUF layers: the block error drops below GPTQ's onto the same type, and the records hold codes
    and a header that llama.cpp's own decoder (gguf-py) turns into exactly the weights the model
    computes with; the K-quants' block d and dmin stay as fitted (only the integers beside them move)."""
    from compressor import gguf_quants

    ids = _ids()
    step = {"method": "gguf", "type": qtype}
    dense, plain, learned = _wide_llama(1), _wide_llama(1), _wide_llama(1)
    plain_records = compress_model(plain, build_plan(plain, [step]), ids, batch_size=4)
    learn = {**RECONSTRUCT, "iters": 60, "batch": 8, "train": train}
    records = compress_model(learned, build_plan(learned, [step, learn]), ids, batch_size=4)
    learned_error, plain_error = _block0_error(dense, learned, ids), _block0_error(dense, plain, ids)
    assert learned_error <= bound * plain_error, (learned_error, plain_error)
    for name, state in records.items():
        quant, before = state.quant, plain_records[name].quant
        assert state.methods == [f"gguf-{quant.grid.qtype.value}+gptq", "reconstruct"]
        assert state.metrics["block_error_after"] <= state.metrics["block_error_before"]
        weight = learned.get_submodule(name).weight.data
        assert torch.equal(gguf_quants.values(quant.codes, quant.header), weight)
        decoded = gguf_quants.decode(gguf_quants.encode(quant.codes, quant.header), quant.header.qtype,
                                     weight.shape[1])
        assert torch.equal(decoded, weight), name
        if quant.header.scale is not None and ".layers.0." in name:  # block 0: the same inputs
            assert torch.equal(quant.header.d, before.header.d)
            assert quant.header.dmin is None or torch.equal(quant.header.dmin, before.header.dmin)


def test_learned_gguf_rounding_starts_at_round_to_nearest_or_at_gptq():
    """Untouched, the learned GGUF quantizer rounds the dense weight to nearest on the pass's header
    (start: dense) or reproduces GPTQ's codes from its error-fed weights (start: init); an offset of
    +0.5 of the local spacing moves IQ4_NL's values up only."""
    from compressor import gguf_quants
    from compressor.gguf_quants import GgufGrid, GgufType
    from compressor.passes import GgufWeight
    from compressor.passes.gguf import compress_many
    from compressor.passes.reconstruct import LearnedGguf
    from compressor.stats import InputStats

    torch.manual_seed(0)
    x = torch.randn(512, 256)
    for qtype in ("q3_k", "iq4_nl"):
        stats = InputStats(256)
        stats.add_batch(x)
        weight = torch.randn(16, 256) * 0.1
        state = LinearState(name="w", weight=weight.clone(), dtype=torch.float32, original=weight,
                            keep_unrounded=True)
        # no refit: it moves the header after GPTQ has rounded
        compress_many([state], stats, {"type": qtype, "refit": False})
        header = state.quant.header
        unit = LearnedGguf(state, weight, "rounding", start="init")
        final, quant = unit.final(torch.float32)
        assert torch.equal(quant.codes, state.quant.codes) and torch.equal(final, state.weight)
        unit = LearnedGguf(state, weight, "rounding")
        assert torch.equal(unit.final(torch.float32)[1].codes, gguf_quants.round_to(weight, header))
    with torch.no_grad():
        unit.params["offset"].fill_(0.5)
    moved = gguf_quants.values(unit.final(torch.float32)[1].codes, header)
    nearest = gguf_quants.values(gguf_quants.round_to(weight, header), header)
    step = header.d.float().repeat_interleave(32, 1)
    up = torch.where(step > 0, moved >= nearest, moved <= nearest)  # a negative d turns the table around
    assert bool(up.all()) and not torch.equal(moved, nearest)
    assert isinstance(state.quant, GgufWeight) and state.quant.grid == GgufGrid(GgufType.IQ4_NL)


def test_cli_gguf_preset_with_reconstruct(calibration_file, tmp_path, capsys, monkeypatch, isolated_cache):
    """--format gguf:q3_k_m --reconstruct writes one GGUF file that transformers reads back, with
    other weights than GPTQ alone wrote where a block kept what it learned."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tokenizer

    folder = tmp_path / "wide"
    _wide_llama().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    weights, summaries = {}, {}
    learn = ["--reconstruct", "--reconstruct-iters", "30"]  # on GGUF blocks: train scales by default
    for name, extra in (("plain", []), ("learned", learn)):
        out = tmp_path / name / "m.gguf"
        out.parent.mkdir()
        code, stdout, stderr = run_cli(
            ["quantize", folder, "--format", "gguf:q3_k_m", *extra, "--calibration", calibration_file,
             "--samples", "4", "--seqlen", "32", "-o", out, "--json"], capsys, monkeypatch)
        assert code == 0, stderr
        assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]
        summaries[name] = json.loads(stdout)
        reread = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name)
        weights[name] = {n: p for n, p in reread.named_parameters() if n.endswith("proj.weight")}
    learned = summaries["learned"]
    assert [p["method"] for p in learned["recipe"]["passes"]] == ["gguf", "reconstruct"]
    assert learned["recipe"]["passes"][-1]["train"] == "scales"
    assert all(m["methods"][-1] == "reconstruct" for m in learned["modules"].values())
    kept = [n for n, m in learned["modules"].items() if m["reconstruct_kept"]]
    assert kept
    assert any(not torch.equal(weights["plain"][f"{n}.weight"], weights["learned"][f"{n}.weight"])
               for n in kept)
