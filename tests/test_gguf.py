"""`compress export --to gguf`: GGUF blocks encoded code for code (checked against gguf-py's own
decoder), files transformers reads back with our model's logits, refusals that write nothing, and
llama.cpp itself running the file (slow; llama-cpp-python)."""

import json

import numpy as np
import pytest
import torch

from compressor.errors import CompressorError
from compressor.gguf_export import encode_blocks, exact_type, export_gguf, permute_rows
from compressor.job import Calibration, run_compression
from compressor.model import ModelSource, load_model
from compressor.passes import LinearState, rtn
from compressor.runtime import StoredLinear

from .test_cli import run_cli


def _stored(bits, symmetric, rows=8, columns=64, group=32):
    layer = LinearState("x", torch.randn(rows, columns, generator=torch.Generator().manual_seed(bits)),
                        torch.float32)
    rtn.compress(layer, None, {"bits": bits, "group_size": group, "symmetric": symmetric})
    q = layer.quant
    zero = None if symmetric else q.zero.float()
    return StoredLinear(q.codes, q.scale.float(), zero, bits, q.grid.group_width(columns), None)


@pytest.mark.parametrize("bits, symmetric, name", [(4, True, "Q4_0"), (4, False, "Q4_1"), (5, True, "Q5_0"),
                                                   (5, False, "Q5_1"), (8, True, "Q8_0")])
def test_blocks_decode_to_our_values(bits, symmetric, name):
    """gguf-py's decoder reads our bytes as d*(q - offset) or d*q + m, with d and m in float16."""
    from gguf import quants

    stored = _stored(bits, symmetric)
    qtype = exact_type(stored)
    assert qtype.name == name
    data = encode_blocks(stored, qtype)
    decoded = quants.dequantize(data, qtype)
    d = stored.scale.to(torch.float16).float()
    index = torch.arange(64) // 32
    q = stored.codes.float()
    if symmetric:
        expected = d[:, index] * (q - 2 ** (bits - 1))
    else:
        m = (-stored.scale * stored.zero).to(torch.float16).float()
        expected = d[:, index] * q + m[:, index]
    assert np.array_equal(decoded, expected.numpy())


def test_grids_without_a_block_type():
    assert exact_type(_stored(3, False)) is None  # 3 bits
    assert exact_type(_stored(4, True, group=64)) is None  # groups of 64
    assert exact_type(_stored(8, False)) is None  # Q8_0 has no zero point


def test_permutation_interleaves_the_rotary_halves():
    rows = torch.arange(8)[:, None].float()  # 2 heads of 4 rows: [a0 a1 b0 b1] -> [a0 b0 a1 b1]
    assert permute_rows(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.fixture(scope="module")
def w4g32(tmp_path_factory, llama_dir):
    out = tmp_path_factory.mktemp("gguf") / "w4g32"
    step = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}
    run_compression(ModelSource(str(llama_dir)), {"passes": [step]}, out, Calibration(), "cpu")
    return out


def test_transformers_reads_the_export_back(w4g32, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = export_gguf(w4g32, tmp_path / "m.gguf", embeddings="f32")
    assert result.tensors == {"Q4_1": 14, "F32": 6} and result.exact_layers == 14
    assert result.max_scale_rounding < 1e-3
    reread = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    ours, tokenizer = load_model(ModelSource(str(w4g32)))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = reread(ids).logits, ours(ids).logits
    # Only the float16 rounding of d and m separates them.
    assert (got - expected).abs().max() < 5e-3 * expected.abs().max()
    text = "Hello world, the quick brown fox."
    assert AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")(text)["input_ids"] == \
        tokenizer(text)["input_ids"]


def test_refusals_write_nothing(tmp_path, llama_dir, capsys, monkeypatch):
    out = tmp_path / "w3"
    step = {"method": "rtn", "bits": 3, "group_size": 32, "symmetric": False}
    run_compression(ModelSource(str(llama_dir)), {"passes": [step]}, out, Calibration(), "cpu")
    code, _, err = run_cli(["export", str(out), "--to", "gguf", "-o", str(tmp_path / "w3.gguf")],
                           capsys, monkeypatch)
    assert code == 2 and "no GGUF block type" in err and "--requantize" in err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))
    code, _, err = run_cli(["export", str(out), "-o", str(tmp_path / "w3.gguf"), "--requantize", "q7_k"],
                           capsys, monkeypatch)
    assert code == 2 and "unknown GGUF type" in err
    code, stdout, _ = run_cli(["export", str(out), "-o", str(tmp_path / "w3.gguf"), "--requantize", "q4_1",
                               "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(stdout)["requantized_layers"] == 14
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(CompressorError, match="no llama.cpp name"):
        export_gguf(out, tmp_path / "x.gguf")


@pytest.mark.slow
def test_llama_cpp_runs_the_export(w4g32, tmp_path):
    """llama.cpp (through llama-cpp-python) loads the file and its logits follow ours."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup-llama`")
    export_gguf(w4g32, tmp_path / "m.gguf", embeddings="f32")
    ours, _ = load_model(ModelSource(str(w4g32)))
    ids = [1, 17, 42, 99, 150, 7, 256, 3]
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        expected = ours(torch.tensor([ids])).logits[0]
    assert theirs.shape == expected.shape
    assert (theirs - expected).abs().max() < 2e-2 * expected.abs().max()
    assert torch.equal(theirs.argmax(-1), expected.argmax(-1))


def test_quantize_onto_a_gguf_type(llama_dir, tmp_path, calibration_file):
    """--format gguf:q4_0: GPTQ onto Q4_0's grid (float16 scales, every code), one GGUF file whose
    linears transformers reads back equal, weight for weight, to the same run written as a folder."""
    from transformers import AutoModelForCausalLM

    import compressor

    options = dict(number_format="gguf:q4_0", calibration=str(calibration_file), samples=4, seqlen=32,
                   device="cpu")
    result = compressor.quantize(str(llama_dir), tmp_path / "m.gguf", **options)
    assert result.manifest["gguf"]["max_scale_rounding"] == 0.0
    assert result.manifest["gguf"]["tensors"]["Q4_0"] == 14
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # the checkpoint is gone
    from compressor.recipes import quantize_job

    job = quantize_job(number_format="gguf:q4_0")
    cal = Calibration(source=str(calibration_file), samples=4, seqlen=32)
    run_compression(ModelSource(str(llama_dir)), job.recipe, tmp_path / "folder", cal, "cpu")
    ours, _ = load_model(ModelSource(str(tmp_path / "folder")))
    reread = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    theirs = dict(reread.named_parameters())
    for name, param in ours.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            assert torch.equal(theirs[name], param), name


@pytest.mark.parametrize("options, message", [
    (dict(number_format="gguf:q4_0", bits=3), "fixes the grid"),
    (dict(number_format="gguf:q7_k"), "unknown GGUF type"),
])
def test_gguf_format_refusals(options, message):
    from compressor.recipes import quantize_job

    with pytest.raises(CompressorError, match=message):
        quantize_job(**options)


def test_gguf_format_needs_a_gguf_name(llama_dir, tmp_path):
    import compressor

    with pytest.raises(CompressorError, match="-o NAME.gguf"):
        compressor.quantize(str(llama_dir), tmp_path / "folder", number_format="gguf:q8_0", method="rtn")
    assert not list(tmp_path.iterdir())
