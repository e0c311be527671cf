"""The rotate pass: the rotated model computes what the dense one did, spreads outliers, survives
the checkpoint round trip untied, refuses what it cannot fold untouched, and helps GPTQ."""

from __future__ import annotations

import json

import pytest
import torch

from compressor import rotate
from compressor.errors import CompressorError
from compressor.job import Calibration, run_compression
from compressor.model import ModelSource, load_model
from compressor.passes import get_pass
from compressor.pipeline import compress_model
from compressor.plan import build_plan

from .conftest import make_model

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def outlier_model(family: str, dtype=torch.float32, column: int = 5, factor: float = 30.0):
    """A tiny model whose residual channel `column` is an outlier: large in the embedding (so the
    activations carry it) and in the first block's input norm gain (so q/k/v's folded weights do)."""
    model = make_model(family).to(dtype)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, column] *= factor
        model.model.layers[0].input_layernorm.weight[column] = factor
    return model


# -- orthogonal matrices --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [576, 96, 64, 1536, 36, 12, 24, 20, 28, 44, 100])
def test_orthogonal_matrix_is_orthogonal(n):
    h = rotate.orthogonal_matrix(n, seed=3)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.equal(h, rotate.orthogonal_matrix(n, seed=3))
    assert not torch.equal(h, rotate.orthogonal_matrix(n, seed=4))


@pytest.mark.parametrize("n, label", [(576, "hadamard-36x16"), (1536, "hadamard-12x128"),
                                      (96, "hadamard-12x8"), (36, "hadamard-36"), (12, "hadamard-12"),
                                      (64, "hadamard-64"), (24, "hadamard-12x2")])
def test_hadamard_orders_have_flat_entries(n, label):
    assert rotate.rotation_label(n) == label
    h = rotate.orthogonal_matrix(n, seed=0)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5), rtol=0, atol=1e-15)


def test_other_orders_fall_back_to_a_random_rotation():
    assert rotate.rotation_label(100) == "random-orthogonal"  # 100 = 25 * 4: no Paley factor
    h = rotate.orthogonal_matrix(100, seed=0)
    assert h.abs().max() > 1.5 * 100**-0.5


# -- the dense model is unchanged -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rotation_keeps_the_logits(family, heads, dtype):
    model = make_model(family).to(dtype)
    with torch.no_grad():  # non-trivial gains and biases, so folding them is tested too
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.3)
    before = logits(model)
    embedding_before = model.get_input_embeddings().weight.clone()
    figures = get_pass("rotate").transform(model, {"seed": 1, "heads": heads})
    assert figures["hidden_rotation"] == "hadamard-12x8"
    assert figures["untied_embeddings"] is True
    assert figures["head_rotation"] == ("hadamard-12x2" if heads else None)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert not torch.allclose(model.get_input_embeddings().weight, embedding_before)
    assert all(torch.all(m.weight == 1) for n, m in model.named_modules() if n.endswith("norm"))
    assert relative(logits(model), before) < 1e-4


def test_a_scaled_residual_branch_is_still_rotated():
    # Granite-style: the MLP's output is multiplied by a number before it is added to the stream.
    model = make_model("llama")
    for block in model.model.layers:
        block.mlp.register_forward_hook(lambda module, args, out: out * 0.5)
    before = logits(model)
    get_pass("rotate").transform(model, {})
    assert relative(logits(model), before) < 1e-4


def test_layout_is_found_generically():
    model = make_model("qwen2")
    layout = rotate.find_layout(model)
    block = "model.layers.0"
    assert layout.norms[f"{block}.input_layernorm"] == [f"{block}.self_attn.{p}_proj" for p in "qkv"]
    mlp = [f"{block}.mlp.gate_proj", f"{block}.mlp.up_proj"]
    assert layout.norms[f"{block}.post_attention_layernorm"] == mlp
    assert layout.norms["model.norm"] == ["lm_head"]
    assert layout.writers == [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.o_proj",
                                                                                 "mlp.down_proj")]


def test_rotation_spreads_an_outlier_column():
    model = outlier_model("llama")
    q_proj = model.model.layers[0].self_attn.q_proj

    def peak_to_rms(weight):
        return (weight.abs().max() / weight.pow(2).mean().sqrt()).item()

    rotate.fold_norms(model)  # the outlier gain now sits in q_proj's column
    folded = peak_to_rms(q_proj.weight)
    rotate.rotate_residual(model, rotate.orthogonal_matrix(96, 0))
    rotated = peak_to_rms(q_proj.weight)
    assert rotated < folded / 2, (folded, rotated)


# -- refusals -------------------------------------------------------------------------------------

class BiasedNorm(torch.nn.LayerNorm):
    pass


def _with_layer_norm(family: str):
    model = make_model(family)
    block = model.model.layers[1]
    block.post_attention_layernorm = BiasedNorm(96)
    return model


@pytest.mark.parametrize("breaking", ["layer_norm", "norm_not_into_linear", "gemma_style_gain", "no_v_proj",
                                      "writer_scaled_per_channel"])
def test_unfoldable_models_are_refused_untouched(breaking):
    model = make_model("llama")
    if breaking == "layer_norm":
        model = _with_layer_norm("llama")
    elif breaking == "norm_not_into_linear":
        # A parallel path: the MLP's input (the norm's output) is also added to its output.
        model.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out + args[0])
    elif breaking == "gemma_style_gain":
        class GemmaRMSNorm(torch.nn.Module):  # output * (1 + w): its gain is not w
            def __init__(self, weight):
                super().__init__()
                self.weight = torch.nn.Parameter(weight)

            def forward(self, x):
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

        model.model.norm = GemmaRMSNorm(torch.zeros(96))
    elif breaking == "writer_scaled_per_channel":  # a per-channel scale does not commute with Q
        scale = torch.linspace(0.5, 2, 96)
        model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out * scale)
    else:  # the values' projection under another name: R2 cannot find it
        attention = model.model.layers[0].self_attn
        attention._modules["value"] = attention._modules.pop("v_proj")

        class Renamed(type(attention)):
            v_proj = property(lambda self: self.value)

        attention.__class__ = Renamed
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(CompressorError) as error:
        get_pass("rotate").transform(model, {})
    assert "\n" not in str(error.value) and str(error.value).startswith("cannot rotate")
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert model.config.tie_word_embeddings is True


@pytest.mark.parametrize("args", [{"seed": -1}, {"seed": "1"}, {"heads": 1}, {"angle": 3}])
def test_bad_settings(args):
    with pytest.raises(CompressorError):
        get_pass("rotate").validate(args)


def test_rotate_needs_no_data():
    assert get_pass("rotate").needs_data({}) is False


# -- through the job and back from disk ------------------------------------------------------------

def _compressed_in_memory(folder, recipe, calibration):
    """What run_compression computes, in memory: the same load, calibration and pipeline."""
    from compressor import data

    model, tokenizer = load_model(ModelSource(str(folder)))
    ids = data.calibration_windows(tokenizer, calibration.source, calibration.samples, calibration.seqlen,
                                   seed=calibration.seed)
    compress_model(model, build_plan(model, recipe["passes"]), ids)
    return model


def test_rotated_gptq_checkpoint_reloads_with_plain_transformers(tiny_model_dir, calibration_file, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = {"passes": [{"method": "rotate"}, {"method": "gptq", "bits": 4, "group_size": 32}]}
    calibration = Calibration(source=str(calibration_file), samples=4, seqlen=32)
    out = tmp_path / "out"
    result = run_compression(ModelSource(str(tiny_model_dir)), recipe, out, calibration, "cpu")
    assert result.manifest["streamed"] is False
    assert result.manifest["transforms"][0] == {
        "method": "rotate", "hidden_rotation": "hadamard-12x8", "untied_embeddings": True,
        "head_rotation": "hadamard-12x2", "norms_folded": 5, "readers": 11, "writers": 4}
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.lm_head.weight.data_ptr() != reloaded.get_input_embeddings().weight.data_ptr()
    expected = _compressed_in_memory(tiny_model_dir, recipe, calibration)
    assert torch.equal(reloaded.lm_head.weight, expected.lm_head.weight)
    assert torch.equal(reloaded.get_input_embeddings().weight, expected.get_input_embeddings().weight)
    assert relative(logits(reloaded), logits(expected)) < 1e-5


def test_rotated_rtn8_stays_close_to_the_dense_model(tiny_model_dir, calibration_file, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = {"passes": [{"method": "rotate", "seed": 2}, {"method": "rtn", "bits": 8, "group_size": 0}]}
    out = tmp_path / "out"
    run_compression(ModelSource(str(tiny_model_dir)), recipe, out, Calibration(source=str(calibration_file)),
                    "cpu")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    dense, _ = load_model(ModelSource(str(tiny_model_dir)))
    # The tiny random models are sensitive: rtn at 8 bits without rotation is about 2% off too.
    assert relative(logits(reloaded), logits(dense)) < 0.05


def test_untied_model_survives_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model("llama")
    get_pass("rotate").transform(model, {})
    assert model.all_tied_weights_keys == {}
    model.tie_weights()  # transformers' own re-tying (it also runs in init_weights) leaves it untied
    model.tie_weights(recompute_mapping=False)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(reloaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(logits(reloaded), logits(model))


# -- what it is for --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rotation_lowers_gptq_error_with_an_outlier_channel(calibration_file, family):
    from compressor import data

    from .conftest import make_tokenizer

    ids = data.calibration_windows(make_tokenizer(), str(calibration_file), 8, 32, seed=0)
    test_ids = IDS
    errors = {}
    for rotated in (False, True):
        model = outlier_model(family)
        dense = logits(model, test_ids)
        gptq = {"method": "gptq", "bits": 3, "group_size": 0}
        passes = [{"method": "rotate"}, gptq] if rotated else [gptq]
        compress_model(model, build_plan(model, passes), ids)
        errors[rotated] = ((logits(model, test_ids) - dense).pow(2).mean() / dense.pow(2).mean()).item()
    # The outlier channel dominates every unrotated per-channel grid (about 100x worse here).
    assert errors[True] < errors[False] / 5, errors
