"""`--group-size auto`: FineQuant's group size per matrix (compressor.finequant), checked against a
hand computation of the rule on crafted matrices, through the pipeline and the CLI."""

import json

import pytest
import torch

from compressor import finequant
from compressor.errors import CompressorError
from compressor.grids import IntGrid
from compressor.passes import LinearState
from tests.test_cli import run_cli


def reference_error(weight: torch.Tensor, group: int, bits: int = 4) -> float:
    """Symmetric round to nearest written out group by group (GPTQ's grid: scale = 2 absmax / maxq,
    zero at 2^(bits-1)), mean squared error: what the rule compares."""
    maxq = 2**bits - 1
    width = weight.shape[1] if group == 0 else group
    total = 0.0
    for row in weight.double():
        for start in range(0, len(row), width):
            part = row[start:start + width]
            scale = 2 * part.abs().max() / maxq
            zero = (maxq + 1) / 2
            codes = (torch.round(part / scale) + zero).clamp(0, maxq)
            total += float(((codes - zero) * scale - part).pow(2).sum())
    return total / weight.numel()


def on_own_grid(steps: list[float], width: int = 64, rows: int = 4, seed: int = 0) -> torch.Tensor:
    """Rows whose every group of `width` columns is (code - 8) * step with codes 0 and 15 present: on
    that group's own asymmetric 4-bit grid, so round to nearest at `width` is exact (powers of two:
    exact in float32 too)."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for step in steps:
        codes = torch.randint(0, 16, (rows, width), generator=generator).float()
        codes[:, 0], codes[:, 1] = 0, 15
        parts.append((codes - 8) * step)
    return torch.cat(parts, dim=1)


def test_candidates_coarsest_first_and_divisors():
    assert finequant.candidate_groups(576) == [0, 512, 256, 128, 64]
    assert finequant.candidate_groups(1536) == [0, 1024, 512, 256, 128, 64]
    assert finequant.candidate_groups(1536, divide=True) == [0, 512, 256, 128, 64]
    assert finequant.candidate_groups(576, finequant.VLLM_GROUPS, divide=True) == [0, 64]
    assert finequant.candidate_groups(96) == [0, 64]  # 1024 ... 128 are the whole row: per channel
    with pytest.raises(CompressorError, match="divides"):
        finequant.candidate_groups(100, (64, 32), divide=True)


def test_weight_error_matches_the_written_out_reference():
    weight = torch.randn(6, 192, generator=torch.Generator().manual_seed(1))
    for group in (0, 128, 64):
        ours = finequant.weight_error(weight, IntGrid(bits=4, group_size=group))
        assert ours == pytest.approx(reference_error(weight, group), rel=1e-5)


def test_choice_equals_hand_computation_on_crafted_matrices():
    asymmetric = IntGrid(bits=4, group_size=64, symmetric=False)
    # Every group of 64 on its own grid with the same range: one scale per row is exactly as good
    # as one per 64 columns (both errors 0), so the rule keeps per-channel.
    even = on_own_grid([0.125] * 4)
    chosen, errors = finequant.choose_group_size(even, asymmetric, (0, 128, 64))
    assert errors == {0: 0.0, 128: 0.0, 64: 0.0} and chosen == 0
    # An outlier group (range 16x the others) collapses the rest of its row onto a few codes at
    # per-channel and in its group of 128: only groups of 64 keep every group exact, so the rule
    # halves to 64 (bound: 1.25 x 0).
    outlier = on_own_grid([0.125, 0.125, 2.0, 0.125])
    chosen, errors = finequant.choose_group_size(outlier, asymmetric, (0, 128, 64))
    assert errors[64] == 0.0 and errors[0] > errors[128] > 0 and chosen == 64
    # The outlier in the last group of 128 only: g128 is exact for the first half, still not zero.
    assert finequant.choose_group_size(outlier[:, :128], asymmetric, (0, 128, 64))[0] == 0

    grid = IntGrid(bits=4, group_size=64, symmetric=True)

    # Random rows with outlier columns: the rule applied by hand to the reference errors.
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 512, generator=generator)
    weight[:, 5] *= 30  # one outlier input channel, in the first group of 64
    for tolerance in (0.1, 0.25, 1.0, 5.0):
        chosen, errors = finequant.choose_group_size(weight, grid, (0, 256, 128, 64), tolerance)
        hand = {g: reference_error(weight, g) for g in (0, 256, 128, 64)}
        expected = next(g for g in (0, 256, 128, 64) if hand[g] <= (1 + tolerance) * hand[64])
        assert chosen == expected, (tolerance, hand)
    # The outlier's column makes g64 much better than per-channel; a large tolerance accepts coarse.
    assert finequant.choose_group_size(weight, grid, (0, 256, 128, 64), 0.1)[0] == 64
    assert finequant.choose_group_size(weight, grid, (0, 256, 128, 64), 100.0)[0] == 0


def test_fused_sets_take_the_finest_member_choice():
    even = on_own_grid([1.0, 1.0, 1.0, 1.0])
    outlier = on_own_grid([1.0, 1.0, 16.0, 1.0])
    names = {"q_proj": outlier, "k_proj": even, "v_proj": even, "o_proj": even,
             "gate_proj": even, "up_proj": even, "down_proj": outlier}
    layers = [LinearState(name=f"model.layers.0.x.{n}", weight=w, dtype=torch.float32)
              for n, w in names.items()]
    args = {"bits": 4, "group_size": "auto", "auto_groups": [0, 128, 64]}
    split = finequant.subgroup_args(layers, args)
    chosen = {layer.name.rsplit(".", 1)[1]: settings["group_size"] for members, settings in split
              for layer in members}
    # q's outlier pulls k and v to 64 (vLLM fuses them); gate/up keep per-channel; down alone at 64.
    assert chosen == {"q_proj": 64, "k_proj": 64, "v_proj": 64, "o_proj": 0, "gate_proj": 0, "up_proj": 0,
                      "down_proj": 64}
    assert all("auto" not in json.dumps(settings) for _, settings in split)
    k = next(layer for layer in layers if layer.name.endswith("k_proj"))
    assert k.metrics["group_size_rule"]["own_choice"] == 0


def test_settings_are_checked():
    from compressor.passes import get_pass

    rtn = get_pass("rtn")
    rtn.validate({"bits": 4, "group_size": "auto", "auto_tolerance": 0.5, "auto_groups": [0, 64]})
    assert rtn.output_grid({"bits": 4, "group_size": "auto"}).group_size == 0
    for bad in ({"group_size": "auto", "auto_groups": []}, {"group_size": "auto", "auto_tolerance": -1},
                {"group_size": "auto", "auto_groups": ["x"]}, {"group_size": 64, "auto_tolerance": 0.5}):
        with pytest.raises(CompressorError):
            rtn.validate(bad)
    with pytest.raises(CompressorError, match="rtn and gptq"):
        get_pass("sparsegpt").validate({"sparsity": 0.5, "bits": 4, "group_size": "auto"})


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_cli_group_size_auto_records_the_rule(llama_dir, calibration_file, tmp_path, capsys, monkeypatch,
                                              isolated_cache, method):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "auto"
    code, stdout, stderr = run_cli(
        ["quantize", llama_dir, "--method", method, "--bits", "4", "--group-size", "auto", "--calibration",
         calibration_file, "--samples", "4", "--seqlen", "32", "-o", out, "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    manifest = json.loads((out / "compress.json").read_text())
    dense = AutoModelForCausalLM.from_pretrained(llama_dir)
    grid = IntGrid(bits=4, group_size=0)
    own = {}
    for name, entry in manifest["modules"].items():
        weight = dense.get_submodule(name).weight.data.float()
        own[name] = finequant.choose_group_size(weight, grid)[0]
        assert entry["group_size_rule"]["own_choice"] == own[name]
    for name, entry in manifest["modules"].items():
        parent, local = name.rsplit(".", 1)
        fused = next((f for f in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")) if local in f),
                     (local,))
        members = [own[f"{parent}.{m}"] for m in fused]
        assert entry["group_size"] == min(members, key=lambda g: g if g > 0 else 10**9)
    assert manifest["recipe"]["passes"][0]["group_size"] == "auto"
    assert "gauto" in str(out) or json.loads(stdout)["output"] == str(out)
    from compressor import hub

    assert "chosen per matrix from its weights (FineQuant)" in hub.model_card(out)
    # Stock transformers loads what was written, each layer with the group it got.
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    assert torch.isfinite(loaded(ids).logits).all()


def test_cli_group_size_auto_for_vllm_keeps_servable_groups(llama_dir, tmp_path, capsys, monkeypatch,
                                                            isolated_cache):
    out = tmp_path / "auto-vllm"
    code, _, stderr = run_cli(["quantize", llama_dir, "--method", "rtn", "--bits", "4", "--group-size",
                               "auto", "--target", "vllm", "-o", out], capsys, monkeypatch)
    assert code == 0, stderr
    manifest = json.loads((out / "compress.json").read_text())
    for entry in manifest["modules"].values():
        in_features = entry["shape"][1]
        assert entry["group_size"] in (0, 64, 128) and (entry["group_size"] == 0
                                                         or in_features % entry["group_size"] == 0)
        # 96 and 160 columns: none of vLLM's 128 / 64 cuts them evenly, so per channel was the only one.
        assert in_features in (96, 160) and set(entry["group_size_rule"]["error_vs_finest"]) == {"0"}
    from compressor.checkpoint import inspect_checkpoint

    assert inspect_checkpoint(out)["engines"]["vllm"] is None


@pytest.mark.parametrize("args, message", [
    (["--group-size", "wide"], "number of columns or auto"),
    (["--group-size", "auto", "--awq"], "does not combine"),
    (["--group-size", "auto", "--allocate", "zd", "--bits", "3.5"], "does not combine"),
])
def test_cli_group_size_auto_bad_input(llama_dir, tmp_path, capsys, monkeypatch, args, message):
    out = tmp_path / "bad"
    code, _, stderr = run_cli(["quantize", llama_dir, "--method", "rtn", *args, "-o", out], capsys,
                              monkeypatch)
    assert code == 2 and message in stderr and not out.exists()
    assert len(stderr.strip().splitlines()) == 1
