"""The sequential pipeline against a naive true-sequential loop, on two model families."""

import copy

import pytest
import torch

from compressor.model import block_linears, decoder_blocks
from compressor.passes import LinearState, get_pass
from compressor.pipeline import compress_model, linear_groups
from compressor.plan import build_plan
from compressor.stats import InputStats

from .conftest import make_model

GPTQ = [{"method": "gptq", "bits": 3, "group_size": 32, "symmetric": False}]


def naive_true_sequential(model, passes, ids):
    """For every sub-group, re-run the whole block on all samples to collect its inputs."""
    prefix, blocks = decoder_blocks(model)
    plan = build_plan(model, passes)
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"], captured["kwargs"] = args[0] if args else kwargs.pop("hidden_states"), kwargs
        raise RuntimeError("stop")

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    except RuntimeError:
        pass
    handle.remove()
    hidden, kwargs = captured["hidden"], captured["kwargs"]
    kwargs["use_cache"] = False
    for index, block in enumerate(blocks):
        linears = block_linears(block)
        for group in linear_groups(block, hidden, kwargs, "cpu"):
            seen = {}
            handle = linears[group[0]].register_forward_pre_hook(lambda m, a, seen=seen: seen.update(x=a[0]))
            block(hidden, **kwargs)
            handle.remove()
            stats = InputStats(seen["x"].shape[-1])
            stats.add_batch(seen["x"])
            for name in group:
                steps = plan[f"{prefix}.{index}.{name}"]
                state = LinearState(name, linears[name].weight.data.float().clone(), torch.float32)
                for step in steps:
                    get_pass(step.method).compress(state, stats, step.args)
                linears[name].weight.data.copy_(state.weight)
        out = block(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pipeline_equals_naive_true_sequential(family):
    model = make_model(family)
    ids = torch.randint(0, 320, (6, 48), generator=torch.Generator().manual_seed(0))
    ours = copy.deepcopy(model)
    # One chunk: the same Hessian sums as the reference, so GPTQ's rounding decisions match too.
    records = compress_model(ours, build_plan(ours, GPTQ), ids, batch_size=6)
    reference = naive_true_sequential(copy.deepcopy(model), GPTQ, ids)
    assert len(records) == 14  # 7 linears x 2 blocks
    for (name, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters(), strict=True):
        same = torch.isclose(a, b, atol=1e-5).float().mean().item()
        assert same > 0.995, name
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=2e-3, rtol=1e-3)


def test_chunking_does_not_change_the_result():
    """Chunks only change the order of the Hessian sums: the compressed models agree closely."""
    model = make_model("llama", seed=1)
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    logits = []
    for batch_size in (8, 3, 1):
        copy_ = copy.deepcopy(model)
        compress_model(copy_, build_plan(copy_, GPTQ), ids, batch_size=batch_size)
        with torch.no_grad():
            logits.append(copy_(ids).logits)
    dense = model(ids).logits.detach()
    for other in logits[1:]:
        # Rounding flips from float-order differences are far smaller than the quantization error.
        assert (other - logits[0]).norm() < 0.1 * (logits[0] - dense).norm()


def test_sub_groups_are_found_by_shared_input():
    model = make_model("qwen2")
    _, blocks = decoder_blocks(model)
    hidden = torch.randn(1, 8, 96)
    position = model.model.rotary_emb(hidden, torch.arange(8)[None])
    groups = linear_groups(blocks[0], hidden, {"position_embeddings": position}, "cpu")
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_rtn_needs_no_data_and_quantizes_every_block_linear():
    model = make_model("llama")
    records = compress_model(model, build_plan(model, [{"method": "rtn", "bits": 4, "group_size": 32}]))
    assert len(records) == 14
    for name, state in records.items():
        weight = model.get_submodule(name).weight
        assert state.quant is not None and state.quant.codes.shape == weight.shape
        # Each row of each group holds at most 16 distinct values.
        assert weight[0, :32].unique().numel() <= 16


def test_targets_and_ignore_select_modules():
    model = make_model("llama")
    plan = build_plan(model, [{"method": "rtn", "bits": 8, "targets": ["re:mlp"], "ignore": ["down_proj"]}])
    assert sorted({name.split(".", 3)[-1] for name in plan}) == ["mlp.gate_proj", "mlp.up_proj"]
