"""GGUF K-quants and presets: block bytes decoded by gguf-py equal our weights for every type, the
importance-weighted fit, GPTQ onto the fixed block grids, llama.cpp's per-tensor preset rules (checked
against llama.cpp's own quantizer in a slow test), and the --format gguf:PRESET file end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compressor import gguf_quants
from compressor.errors import CompressorError
from compressor.gguf_quants import SPECS, GgufType
from compressor.job import Calibration, run_compression
from compressor.model import ModelSource, load_model
from compressor.passes import LinearState
from compressor.passes import gguf as gguf_pass
from compressor.stats import InputStats

from .conftest import make_tokenizer
from .test_cli import run_cli


def _weights(rows=6, cols=512, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator) * 0.05
    w[0, :32] = 0  # an all-zero sub-block (any scale represents it)
    w[1, 5] = 1.5  # an outlier
    w[2] += 0.04  # a shifted row: the asymmetric types' mins matter
    return w


@pytest.mark.parametrize("qtype", list(GgufType))
def test_every_type_decodes_to_our_values(qtype):
    """The bytes we write, decoded by gguf-py's reference decoder, are exactly the weights we compute."""
    w = _weights()
    importance = torch.rand(512, generator=torch.Generator().manual_seed(1)) + 0.1
    codes, header = gguf_quants.quantize(w, qtype, importance)
    data = gguf_quants.encode(codes, header)
    spec = SPECS[qtype]
    assert data.dtype == np.uint8 and data.shape == (6, 512 // spec.block * spec.nbytes)
    ours = gguf_quants.values(codes, header)
    assert torch.equal(gguf_quants.decode(data, qtype, 512), ours)
    assert ours[0, :32].abs().max() == 0  # zero stays zero
    # Rounding error shrinks with the bits the type spends.
    error = ((ours - w).square().mean() / w.square().mean()).item()
    assert error < {2: 0.09, 3: 0.03, 4: 0.016, 5: 0.0055, 6: 0.0008, 8: 1e-4}[spec.bits]


@pytest.mark.parametrize("qtype", [GgufType.Q4_0, GgufType.Q8_0, GgufType.Q4_1])
def test_round_to_nearest_is_no_worse_than_gguf_py(qtype):
    """Without importance our fitted legacy blocks err no more than gguf-py's (llama.cpp's reference
    rounding, the extreme on the last code)."""
    from gguf import quants

    w = _weights(rows=32, cols=256, seed=3)
    codes, header = gguf_quants.quantize(w, qtype)
    ours = (gguf_quants.values(codes, header) - w).square().sum()
    theirs = gguf_quants.decode(quants.quantize(w.numpy(), qtype.ggml), qtype, 256)
    assert ours <= (theirs - w).square().sum() * 1.0001


def test_importance_steers_the_fit():
    """Columns with large mean square input are reproduced more closely when the fit knows it."""
    w = _weights(rows=64, cols=256, seed=4)
    importance = torch.ones(256)
    importance[::16] = 1000.0
    plain_codes, plain = gguf_quants.quantize(w, GgufType.Q3_K)
    codes, weighted = gguf_quants.quantize(w, GgufType.Q3_K, importance)
    error_plain = (gguf_quants.values(plain_codes, plain) - w)[:, ::16].square().sum()
    error_weighted = (gguf_quants.values(codes, weighted) - w)[:, ::16].square().sum()
    assert error_weighted < 0.7 * error_plain


def test_fallback_types():
    assert gguf_quants.fitting_type("q4_k", 576) == GgufType.Q5_0
    assert gguf_quants.fitting_type("q3_k", 576) == GgufType.IQ4_NL  # llama.cpp's Q4_0, finer
    assert gguf_quants.fitting_type("q3_k", 576, gguf_quants.LLAMA_CPP_FALLBACK) == GgufType.Q4_0
    assert gguf_quants.fitting_type("q6_k", 1536) == GgufType.Q6_K
    with pytest.raises(CompressorError, match="no GGUF block type"):
        gguf_quants.fitting_type("q4_0", 100)
    with pytest.raises(CompressorError, match="unknown GGUF type"):
        gguf_quants.fitting_type("q7_k", 256)


def test_gptq_onto_k_blocks_beats_round_to_nearest():
    """On correlated inputs, GPTQ's error feedback onto the fixed Q3_K grids cuts the output error."""
    generator = torch.Generator().manual_seed(5)
    mixing = torch.randn(256, 256, generator=generator) / 16
    x = torch.randn(2048, 256, generator=generator) @ mixing
    x += 0.3 * torch.randn(2048, 256, generator=generator)
    stats = InputStats(256)
    stats.add_batch(x)
    w = _weights(rows=48, cols=256, seed=6)
    errors = {}
    for solver in ("rtn", "gptq"):
        layer = LinearState("model.layers.0.mlp.down_proj", w.clone(), torch.float32)
        gguf_pass.compress_many([layer], stats, {"type": "q3_k", "solver": solver})
        assert layer.quant.grid.qtype == GgufType.Q3_K
        # What is stored is what the layer computes.
        data = gguf_quants.encode(layer.quant.codes, layer.quant.header)
        assert torch.equal(gguf_quants.decode(data, "q3_k", 256), layer.weight)
        errors[solver] = (x @ (layer.weight - w).T).square().mean().item()
    assert errors["gptq"] < 0.7 * errors["rtn"]


@pytest.mark.parametrize("solver", ["gptq", "imatrix"])
@pytest.mark.parametrize("qtype", ["q4_1", "q4_0", "q4_k"])
def test_refit_lowers_the_output_error(qtype, solver):
    """Once GPTQ or the importance-weighted rounding chose the codes, the closed-form refit of the
    blocks' float16 numbers can only lower (w - v)^T H (w - v), and the bytes still decode to the
    layer's weights."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2048, 256, generator=generator) @ (torch.randn(256, 256, generator=generator) / 16)
    stats = InputStats(256)
    stats.add_batch(x)
    w = _weights(rows=32, cols=256, seed=8)
    errors = {}
    for refit in (False, True):
        layer = LinearState("model.layers.0.mlp.down_proj", w.clone(), torch.float32)
        gguf_pass.compress_many([layer], stats, {"type": qtype, "refit": refit, "solver": solver})
        data = gguf_quants.encode(layer.quant.codes, layer.quant.header)
        assert torch.equal(gguf_quants.decode(data, qtype, 256), layer.weight)
        errors[refit] = (x @ (layer.weight - w).T).square().mean().item()
    assert errors[True] < errors[False]


def test_imatrix_solver_is_llama_quantize_rounding_then_the_refit():
    """solver imatrix: the codes are round-to-nearest on the grid fitted with the Hessian's diagonal as
    importance (llama-quantize with an importance matrix); rtn fits without it and ignores the data;
    the refit then moves only the float16 numbers, never the codes."""
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(1024, 256, generator=generator) * torch.linspace(0.1, 3.0, 256)
    stats = InputStats(256)
    stats.add_batch(x)
    w = _weights(rows=16, cols=256, seed=10)
    importance = stats.hessian().diagonal().float()
    codes, header = gguf_quants.quantize(w, "q4_0", importance)
    plain_codes, plain_header = gguf_quants.quantize(w, "q4_0")
    layers = {}
    for solver, refit in (("imatrix", False), ("imatrix", True), ("rtn", True)):
        layer = LinearState("model.layers.0.mlp.up_proj", w.clone(), torch.float32)
        gguf_pass.compress_many([layer], stats, {"type": "q4_0", "solver": solver, "refit": refit})
        layers[solver, refit] = layer
    assert torch.equal(layers["imatrix", False].quant.codes, codes)
    assert torch.equal(layers["imatrix", False].quant.header.d, header.d)
    assert torch.equal(layers["imatrix", True].quant.codes, codes)
    assert not torch.equal(layers["imatrix", True].quant.header.d, header.d)
    assert torch.equal(layers["rtn", True].quant.codes, plain_codes)
    assert torch.equal(layers["rtn", True].quant.header.d, plain_header.d)
    assert not gguf_pass.needs_data({"type": "q4_0", "solver": "rtn"})
    assert gguf_pass.needs_data({"type": "q4_0", "solver": "imatrix"})


# llama.cpp's Q4_K_M / Q3_K_M / Q2_K on SmolLM2-135M (30 layers, 576 wide, 3 query heads per KV
# head): what its llama-quantize writes (llama-quant.cpp's rules and fallbacks).
SMOLLM2_EXPECTED = {
    "q4_k_m": {"attn_q": "q5_0", "attn_v": {0: "q8_0", 3: "q5_0", 5: "q8_0", 29: "q8_0"},
               "ffn_down": {0: "q6_k", 3: "q4_k", 5: "q6_k", 26: "q6_k"}, "attn_output": "q5_0"},
    "q3_k_m": {"attn_q": "q4_0", "attn_v": {0: "q5_1", 1: "q5_1", 2: "q5_0"},
               "ffn_down": {0: "q5_k", 1: "q4_k", 29: "q4_k"}, "attn_output": "q5_0"},
    "q2_k": {"attn_q": "q4_0", "attn_v": {0: "q4_0"}, "ffn_down": {0: "q3_k", 15: "q3_k"},
             "attn_output": "q4_0"},
}


@pytest.mark.parametrize("preset", sorted(SMOLLM2_EXPECTED))
def test_presets_on_a_576_wide_model(preset):
    """llama.cpp's choices with its fallbacks; ours differ only where it falls back to Q4_0."""
    widths = {"attn_q": 576, "attn_v": 576, "attn_output": 576, "ffn_down": 1536}
    for role, expected in SMOLLM2_EXPECTED[preset].items():
        for layer, qtype in (expected.items() if isinstance(expected, dict) else [(7, expected)]):
            chosen = gguf_pass.preset_type(preset, role, layer, 30, gqa=3, calibrated=True)
            llama_cpp = gguf_quants.fitting_type(chosen, widths[role], gguf_quants.LLAMA_CPP_FALLBACK)
            assert llama_cpp.value == qtype, (preset, role, layer)
            ours = gguf_quants.fitting_type(chosen, widths[role]).value
            assert ours == ("iq4_nl" if qtype == "q4_0" else qtype)


def _wide_model(folder, layers=8):
    """A Llama whose rows are multiples of 256, so the K types apply without fallback."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(3.0)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    return _wide_model(tmp_path_factory.mktemp("wide-llama"))


def _gguf_types(path) -> dict[str, str]:
    from gguf import GGUFReader

    return {tensor.name: tensor.tensor_type.name.lower() for tensor in GGUFReader(str(path)).tensors}


def test_preset_file_end_to_end(wide_dir, tmp_path, calibration_file):
    """--format gguf:q4_k_m: one GGUF file; transformers reads it back with the weights the run
    computed (the intermediate checkpoint, decoded by compressor.load_model, equals it tensor for
    tensor; q/k rows permuted and restored); the file's types follow the preset."""
    from transformers import AutoModelForCausalLM

    import compressor
    from compressor.recipes import quantize_job

    cal = dict(calibration=str(calibration_file), samples=4, seqlen=32, device="cpu")
    result = compressor.quantize(str(wide_dir), tmp_path / "m.gguf", number_format="gguf:q4_k_m", **cal)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    types = _gguf_types(tmp_path / "m.gguf")
    assert types["token_embd.weight"] == "q6_k"  # tied output: Q6_K where rows fit
    assert types["blk.0.attn_q.weight"] == "q4_k" and types["blk.0.ffn_down.weight"] == "q6_k"
    assert types["blk.1.attn_v.weight"] == "q4_k" and types["blk.3.attn_v.weight"] == "q6_k"  # i % 3 == 0
    assert result.manifest["gguf"]["tensors"]["Q4_K"] >= 40
    assert result.manifest["modules"]["model.layers.0.mlp.down_proj"]["gguf_type"] == "q6_k"

    job = quantize_job(number_format="gguf:q4_k_m")
    folder = tmp_path / "folder"
    run_compression(ModelSource(str(wide_dir)), job.recipe, folder,
                    Calibration(source=str(calibration_file), samples=4, seqlen=32), "cpu")
    ours, _ = load_model(ModelSource(str(folder)))
    reread = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    theirs = dict(reread.named_parameters())
    for name, param in ours.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            assert torch.equal(theirs[name], param), name
    from compressor.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(folder)
    row = next(r for r in info["modules"] if r["module"] == "model.layers.0.mlp.down_proj")
    assert row["format"] == "q6_k" and row["bpw"] == 6.5625 and "export --to gguf" in info["engines"]["vllm"]
    manifest = json.loads((folder / "compress.json").read_text())
    assert info["bpw"]["stored"] == pytest.approx(manifest["bpw"]["stored"])
    # Stock transformers refuses the intermediate folder instead of running random weights.
    with pytest.raises(Exception, match="custom code|own layout"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_gguf_preset_refusals(wide_dir, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["quantize", str(wide_dir), "--format", "gguf:q7_k",
                            "-o", str(tmp_path / "x.gguf")], capsys, monkeypatch)
    assert code == 2 and "unknown GGUF type" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_llama_cpp_agrees_on_types_and_logits(wide_dir, tmp_path, calibration_file):
    """llama.cpp's own quantizer, given the same model as F32 GGUF and the same preset, picks the same
    type for every tensor; and llama.cpp runs our K-quant file with the logits transformers gets."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup-llama`")

    import compressor
    from compressor.gguf_export import export_gguf

    export_gguf(wide_dir, tmp_path / "f32.gguf", embeddings="f32")
    # export writes the dense linears as float16; llama.cpp requantizes them.
    cal = dict(calibration=str(calibration_file), samples=4, seqlen=32, device="cpu")
    for preset, ftype in (("q4_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M),
                          ("q3_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M),
                          ("q2_k", llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K)):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        theirs = tmp_path / f"llama-{preset}.gguf"
        assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(theirs).encode(),
                                              params) == 0
        ours = tmp_path / f"ours-{preset}.gguf"
        compressor.quantize(str(wide_dir), ours, number_format=f"gguf:{preset}", method="rtn", **cal)
        expected, got = _gguf_types(theirs), _gguf_types(ours)
        assert {k: v for k, v in got.items() if k.startswith("blk.")} == \
            {k: v for k, v in expected.items() if k.startswith("blk.")}, preset
        assert got["token_embd.weight"] == expected["token_embd.weight"]

    _llama_cpp_follows_transformers(llama_cpp, tmp_path / "ours-q4_k_m.gguf")


def _llama_cpp_follows_transformers(llama_cpp, path) -> None:
    """llama.cpp's logits on the file follow those of transformers reading the same file (llama.cpp
    rounds the activations to 8 bits for its quantized dot products: a few percent)."""
    from transformers import AutoModelForCausalLM

    reread = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = [1, 17, 42, 99, 150, 7, 256, 3]
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        expected = reread(torch.tensor([ids])).logits[0]
    assert (theirs - expected).abs().max() < 6e-2 * expected.abs().max()
    assert (theirs.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


def test_export_requantizes_onto_k_types(tmp_path, wide_dir):
    from compressor.gguf_export import export_gguf

    out = tmp_path / "w3"
    step = {"method": "rtn", "bits": 3, "group_size": 64, "symmetric": False}
    run_compression(ModelSource(str(wide_dir)), {"passes": [step]}, out, Calibration(), "cpu")
    result = export_gguf(out, tmp_path / "w3.gguf", requantize="q3_k")
    assert result.tensors["Q3_K"] == 56 and result.requantized_layers == 56
    assert json.loads(json.dumps(result.tensors))  # plain data for --json


def test_allocated_gguf_types_meet_the_budget(wide_dir, tmp_path, calibration_file):
    """--format gguf --allocate zd --budget 4bpw: the blocks judged most important get the dearer of
    two neighbouring GGUF types (here Q3_K / Q4_K), the stored bits per weight stay within budget,
    and the file holds exactly those types."""
    import compressor

    result = compressor.quantize(str(wide_dir), tmp_path / "mixed.gguf", number_format="gguf",
                                 allocate="zd", budget="4bpw", calibration=str(calibration_file),
                                 samples=4, seqlen=32, device="cpu")
    decided = result.manifest["recipe"]["allocation"]
    assert set(decided["type_per_block"]) == {"q3_k", "q4_k"}
    assert decided["achieved"] <= 4.0 and result.manifest["bpw"]["stored"] <= 4.0
    types = _gguf_types(tmp_path / "mixed.gguf")
    for block, qtype in enumerate(decided["type_per_block"]):
        assert types[f"blk.{block}.ffn_down.weight"] == qtype
    with pytest.raises(CompressorError, match="allocates types"):
        compressor.quantize(str(wide_dir), tmp_path / "x.gguf", number_format="gguf", allocate="ip",
                            budget="4bpw")


def test_search_over_gguf_types_writes_one_gguf_file(wide_dir, tmp_path, calibration_file, capsys,
                                                     monkeypatch):
    """compress search --format gguf -o X.gguf: per tensor one of the GGUF levels, within the budget,
    written as one file whose tensors carry exactly the chosen types (and decode to the database's
    weights)."""
    from transformers import AutoModelForCausalLM

    from compressor.search.database import LevelDatabase

    args = ["search", str(wide_dir), "--format", "gguf", "--budget", "4.25bpw", "--granularity", "module",
            "--samples", "4", "--seqlen", "32", "--fitness-windows", "4", "--fitness-seqlen", "32",
            "--stages", "2x32,1x64", "--generations", "3", "--offspring", "3", "--database-reference",
            "dense", "--calibration", str(calibration_file), "--json", "-o", str(tmp_path / "mixed.gguf")]
    code, stdout, stderr = run_cli(args, capsys, monkeypatch)
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["output"].endswith("mixed.gguf") and result["search"]["achieved"] <= 4.25
    chosen = result["search"]["per_module_level"]
    assert len(set(chosen.values())) >= 2  # a budget between two types mixes them
    types = _gguf_types(tmp_path / "mixed.gguf")
    database = LevelDatabase(tmp_path / "mixed.gguf.search" / "database")
    reread = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="mixed.gguf")
    for name, level in chosen.items():
        block, role = name.split(".")[2], gguf_pass.ROLES[name.rsplit(".", 1)[-1]]
        assert types[f"blk.{block}.{role}.weight"] == level, name
        assert torch.equal(reread.get_submodule(name).weight,
                           database.weight(name, database.levels.index(level))), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.gguf", "mixed.gguf.search"]


def test_fallback_to_iq4_nl_end_to_end(llama_dir, tmp_path, calibration_file):
    """Rows of 96 and 160 weights cannot hold Q3_K: they fall back to IQ4_NL (a 16-value table per
    block of 32), which transformers reads back as the weights the run computed."""
    from transformers import AutoModelForCausalLM

    import compressor

    cal = dict(calibration=str(calibration_file), samples=4, seqlen=32, device="cpu")
    result = compressor.quantize(str(llama_dir), tmp_path / "m.gguf", number_format="gguf:q3_k", **cal)
    assert result.manifest["gguf"]["tensors"]["IQ4_NL"] == 14
    from compressor.recipes import quantize_job

    folder = tmp_path / "folder"
    run_compression(ModelSource(str(llama_dir)), quantize_job(number_format="gguf:q3_k").recipe, folder,
                    Calibration(source=str(calibration_file), samples=4, seqlen=32), "cpu")
    ours, _ = load_model(ModelSource(str(folder)))
    theirs = dict(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").named_parameters())
    for name, param in ours.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            assert torch.equal(theirs[name], param), name


@pytest.mark.slow
def test_llama_cpp_runs_iq4_nl(llama_dir, tmp_path, calibration_file):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup-llama`")

    import compressor

    compressor.quantize(str(llama_dir), tmp_path / "m.gguf", number_format="gguf:q3_k", method="rtn")
    assert set(_gguf_types(tmp_path / "m.gguf").values()) == {"iq4_nl", "f32", "q8_0"}
    _llama_cpp_follows_transformers(llama_cpp, tmp_path / "m.gguf")


def test_quantize_method_imatrix_end_to_end(llama_dir, tmp_path, calibration_file):
    """`--method imatrix` reaches the gguf pass (its recipe, its layers' methods), writes a file
    transformers reads, and an unknown method is refused in one line before any work."""
    import compressor

    cal = dict(calibration=str(calibration_file), samples=4, seqlen=32, device="cpu")
    result = compressor.quantize(str(llama_dir), tmp_path / "m.gguf", number_format="gguf:q4_0",
                                 method="imatrix", **cal)
    step = result.manifest["recipe"]["passes"][-1]
    assert (step["method"], step["solver"]) == ("gguf", "imatrix")
    assert (tmp_path / "m.gguf").stat().st_size > 0
    with pytest.raises(CompressorError, match="--method gptq or imatrix or rtn"):
        compressor.quantize(str(llama_dir), tmp_path / "x.gguf", number_format="gguf:q4_0", method="awq",
                            **cal)
    assert not (tmp_path / "x.gguf").exists()


def test_awq_before_a_preset_whose_types_differ_within_one_input(llama_dir, tmp_path, calibration_file):
    """Q3_K_M gives attn_v another type than attn_q / attn_k, which read the same input: AWQ's scaling
    runs on the three together, then each takes its own type (before, the run was refused)."""
    import compressor

    cal = dict(calibration=str(calibration_file), samples=4, seqlen=32, device="cpu")
    result = compressor.quantize(str(llama_dir), tmp_path / "m.gguf", number_format="gguf:q3_k_m", awq=True,
                                 **cal)
    assert [step["method"] for step in result.manifest["recipe"]["passes"]] == ["awq", "gguf"]
    types = _gguf_types(tmp_path / "m.gguf")
    assert types["blk.0.attn_v.weight"] != types["blk.0.attn_q.weight"]
    assert types["blk.0.attn_q.weight"] == types["blk.0.attn_k.weight"]
