"""AWQ's activation-aware scaling: the solver against direct computation on small tensors, the
folding (the dense function is unchanged), and AWQ + GPTQ written and reloaded exactly."""

import pytest
import torch

from compressor.errors import CompressorError
from compressor.grids import IntGrid
from compressor.job import Calibration, run_compression
from compressor.model import ModelSource
from compressor.passes import LinearState, awq
from compressor.stats import InputStats

from .conftest import make_model, make_tokenizer


def _stats(x: torch.Tensor) -> InputStats:
    stats = InputStats(x.shape[-1], moments=True, samples=True)
    stats.add_batch(x)
    return stats


def test_output_error_is_the_summed_squared_output_error():
    torch.manual_seed(0)
    x = torch.randn(200, 24)
    w, r = torch.randn(10, 24), torch.randn(10, 24)
    hessian = _stats(x).hessian()
    direct = float(((x @ (r - w).T) ** 2).sum(1).mean()) * 2  # H = 2/N X^T X
    assert awq.output_error([w], [r], hessian) == pytest.approx(direct, rel=1e-4)


def test_scaled_statistics_are_those_of_the_scaled_inputs():
    torch.manual_seed(1)
    x = torch.randn(2, 50, 16) * torch.linspace(0.1, 5, 16)
    s = torch.rand(16) + 0.5
    scaled, direct = _stats(x), _stats(x / s)
    scaled.scale_inputs_(s)
    torch.testing.assert_close(scaled.hessian(), direct.hessian(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled.column_mean(), direct.column_mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled.column_energy(), direct.column_energy(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled.sample_rows(), direct.sample_rows())
    torch.testing.assert_close(scaled.input_scale, s)


def test_scaling_lowers_the_rounding_error_with_outlier_channels():
    """A few channels carrying 20x the activation: AWQ's search picks alpha > 0 and lowers the
    output error of round-to-nearest; where scaling cannot be folded nothing changes."""
    torch.manual_seed(2)
    x = torch.randn(512, 64)
    x[:, :4] *= 20
    weights = [torch.randn(32, 64), torch.randn(48, 64)]
    stats = _stats(x)
    stats.foldable = True
    layers = [LinearState(name=f"l{i}", weight=w.clone(), dtype=torch.float32) for i, w in enumerate(weights)]
    args = {"bits": 3, "group_size": 32}
    awq.compress_many(layers, stats, args)
    metrics = layers[0].metrics
    assert isinstance(metrics["awq_alpha"], float) and metrics["awq_alpha"] > 0
    assert metrics["awq_rtn_error_after"] < 0.9 * metrics["awq_rtn_error_before"]
    # The layers now hold W diag(s) and the statistics are those of x / s: the product is unchanged.
    s = stats.input_scale
    for layer, w in zip(layers, weights, strict=True):
        torch.testing.assert_close((x / s) @ layer.weight.T, x @ w.T, rtol=1e-4, atol=1e-3)
    # Re-measured from scratch: RTN of the scaled weights really has the lower error.
    grid = IntGrid(bits=3, group_size=32)
    plain = awq.output_error(weights, [awq.rtn_after_scaling(w, torch.ones(64), grid) for w in weights],
                             _stats(x).hessian())
    scaled = awq.output_error(weights, [awq.rtn_after_scaling(w, s, grid) for w in weights],
                              _stats(x).hessian())
    assert scaled == pytest.approx(metrics["awq_rtn_error_after"], rel=1e-3) and scaled < plain

    unfoldable = _stats(x)
    layers = [LinearState(name="l", weight=weights[0].clone(), dtype=torch.float32)]
    awq.compress_many(layers, unfoldable, args)
    assert torch.equal(layers[0].weight, weights[0]) and unfoldable.input_scale is None
    assert layers[0].metrics["awq_alpha"] == "no producer"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("low_memory", [False, True])
def test_awq_alone_leaves_the_dense_function_unchanged(family, low_memory, tmp_path, calibration_file):
    """Scales folded into the norms and up_proj, columns scaled, nothing rounded: the written
    model computes what the dense one does; o_proj (attention input) has no producer."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "dense"
    make_model(family).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    cal = Calibration(source=str(calibration_file), samples=8, seqlen=32)
    recipe = {"passes": [{"method": "awq", "bits": 3, "group_size": 16}]}
    result = run_compression(ModelSource(str(folder)), recipe, tmp_path / "out", cal, "cpu",
                             low_memory=low_memory)
    alphas = {name.split(".", 3)[-1]: m["awq_alpha"] for name, m in result.manifest["modules"].items()
              if ".layers.0." in name}
    assert alphas["self_attn.o_proj"] == "no producer"
    assert alphas["self_attn.q_proj"] == alphas["self_attn.k_proj"] == alphas["self_attn.v_proj"]
    assert all(isinstance(alphas[f"mlp.{n}_proj"], (float, str)) for n in ("gate", "up", "down"))
    scaled = [n for n, a in alphas.items() if isinstance(a, float)]
    assert scaled  # something was scaled, so the comparison below tests the folding
    dense = AutoModelForCausalLM.from_pretrained(folder).eval()
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    changed = [n for n, p in written.named_parameters() if not torch.equal(p, dense.get_parameter(n))]
    assert any("norm" in n for n in changed)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(written(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_awq_gptq_in_memory_equals_reloaded_and_both_pipelines_agree(family, tmp_path):
    """up_proj is quantized before down_proj's scale folds into its rows: its stored scales absorb
    it, so the checkpoint still computes exactly what the pipeline left in memory."""
    from transformers import AutoModelForCausalLM

    from compressor.pipeline import compress_model
    from compressor.plan import build_plan
    from compressor.writer import save_checkpoint

    recipe = [{"method": "awq", "bits": 4, "group_size": 16, "symmetric": False},
              {"method": "gptq", "bits": 4, "group_size": 16, "symmetric": False}]
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    logits = []
    for low_memory in (False, True):
        model = make_model(family)
        records = compress_model(model, build_plan(model, recipe), ids, low_memory=low_memory)
        assert records["model.layers.0.mlp.up_proj"].methods == ["awq", "gptq"]
        assert isinstance(records["model.layers.0.mlp.down_proj"].metrics["awq_alpha"], float)  # folded
        (tmp_path / str(low_memory)).mkdir()
        save_checkpoint(model, make_tokenizer(), records, tmp_path / str(low_memory), ignore=["lm_head"])
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / str(low_memory)).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
            assert torch.equal(logits[-1], reloaded(ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_awq_bad_input(llama_dir, tmp_path, capsys, monkeypatch):
    from tests.test_cli import run_cli

    for extra, message in [(["--format", "nvfp4"], "--awq searches"),
                           (["--budget", "3.5bpw", "--allocate", "lim"], "does not combine")]:
        code, _, stderr = run_cli(["quantize", llama_dir, "--awq", *extra, "-o", tmp_path / "x"], capsys,
                                  monkeypatch)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
        assert not (tmp_path / "x").exists()
    with pytest.raises(CompressorError, match="grid must be"):
        awq.validate({"bits": 4, "grid": 0})
