"""Sparsity end to end: the sparsify command, recipes that prune then quantize, and inspect."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor.checkpoint import inspect_checkpoint
from compressor.errors import CompressorError
from compressor.job import Calibration, run_compression
from compressor.model import ModelSource
from compressor.sparsity import mask_holds, pattern_from_args

from .test_cli import run_cli

REPO_RECIPES = __import__("pathlib").Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("shape", [["--pattern", "2:4"], ["--sparsity", "0.6"]])
def test_sparsify_command(method, shape, llama_dir, calibration_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    code, stdout, stderr = run_cli(
        ["sparsify", llama_dir, "--method", method, *shape, "--dsnot", "--calibration", calibration_file,
         "--samples", "4", "--seqlen", "32", "-o", out, "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    summary = json.loads(stdout)
    pattern = pattern_from_args({"pattern": shape[1]} if shape[0] == "--pattern" else {"sparsity": 0.6})
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    for name, entry in summary["modules"].items():
        assert entry["methods"] == [method, "dsnot"]
        assert entry["pattern"] == pattern.label
        weight = model.get_submodule(name).weight
        assert mask_holds(weight != 0, pattern), name
    info = inspect_checkpoint(out)
    assert info["sparsity"]["verified"] and info["sparsity"]["structure"] == pattern.label
    assert info["sparsity"]["sparsity"] == pytest.approx(pattern.sparsity, abs=0.02)


def test_prune_then_quantize_recipe_shares_one_hessian_and_reloads(llama_dir, calibration_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "s24w4"
    recipe = {"passes": [{"method": "sparsegpt", "pattern": "2:4"},
                         {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False}]}
    cal = Calibration(source=str(calibration_file), samples=4, seqlen=32)
    result = run_compression(ModelSource(str(llama_dir)), recipe, out, cal, "cpu")
    entry = result.manifest["modules"]["model.layers.1.mlp.down_proj"]
    assert entry["methods"] == ["sparsegpt", "gptq"] and entry["bits"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    model(torch.tensor([[1, 2]]))  # packed layers are decompressed on the first forward
    for name in result.manifest["modules"]:
        # Rounding can zero a survivor too, so each block of 4 holds *at least* 2 zeros.
        zeros = model.get_submodule(name).weight == 0
        assert bool((zeros.reshape(zeros.shape[0], -1, 4).sum(2) >= 2).all()), name
    info = inspect_checkpoint(out)
    assert info["sparsity"]["structure"] == "2:4" and info["format"] == "pack-quantized"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["sparsity_config"]["format"] == "dense"


def test_inspect_catches_a_broken_pattern(llama_dir, tmp_path):
    out = tmp_path / "s"
    run_compression(ModelSource(str(llama_dir)), {"passes": [{"method": "magnitude", "pattern": "2:4"}]},
                    out, Calibration(), "cpu")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, :4] = 1.0  # a full block: 4 kept of 4
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CompressorError, match="2:4 sparsity pattern does not hold"):
        inspect_checkpoint(broken)


def test_shipped_recipes_build_plans():
    from compressor.plan import load_recipe, validate_recipe

    recipes = sorted(REPO_RECIPES.glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        validate_recipe(load_recipe(path)["passes"])


BAD = {
    "4:2": (["--pattern", "4:2"], "1 <= N < M"),
    "2:3:4": (["--pattern", "2:3:4"], "N:M"),
    "sparsity 1": (["--sparsity", "1.0"], "[0, 1)"),
    "both": (["--pattern", "2:4", "--sparsity", "0.5"], "exactly one"),
    "neither": ([], "exactly one"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sparsity_input(case, llama_dir, tmp_path, capsys, monkeypatch):
    args, expected = BAD[case]
    code, _, stderr = run_cli(["sparsify", llama_dir, *args, "-o", tmp_path / "o"], capsys, monkeypatch)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0]
    assert not (tmp_path / "o").exists()


def test_dsnot_needs_a_mask_first(llama_dir, calibration_file, tmp_path):
    cal = Calibration(source=str(calibration_file), samples=2, seqlen=32)
    with pytest.raises(CompressorError, match="refines a mask"):
        run_compression(ModelSource(str(llama_dir)), {"passes": [{"method": "dsnot"}]}, tmp_path / "o",
                        cal, "cpu")
    assert not (tmp_path / "o").exists()


def test_dsnot_never_worsens_layer_error_on_the_tiny_model(llama_dir, calibration_file):
    """Per layer, DSnoT lowers (never raises) the Wanda mask's calibration reconstruction error."""
    from compressor.model import load_model
    from compressor.pipeline import compress_model
    from compressor.plan import build_plan

    model, tokenizer = load_model(ModelSource(str(llama_dir)))
    ids = torch.tensor([tokenizer(calibration_file.read_text()).input_ids[:256]]).reshape(4, 64)
    base = [{"method": "wanda", "pattern": "2:4"}]
    plain = compress_model(model, build_plan(model, base), ids)
    model2, _ = load_model(ModelSource(str(llama_dir)))
    refined = compress_model(model2, build_plan(model2, base + [{"method": "dsnot"}]), ids)
    assert sum(r.metrics["dsnot_swaps"] for r in refined.values()) > 0
    assert set(plain) == set(refined)
    for name, record in refined.items():
        assert record.metrics["dsnot_after"] <= record.metrics["dsnot_before"] * (1 + 1e-9), name
        assert (~record.mask).sum() == (~plain[name].mask).sum()
    assert any(r.metrics["dsnot_after"] < 0.99 * r.metrics["dsnot_before"] for r in refined.values())
