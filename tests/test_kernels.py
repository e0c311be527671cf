"""Packed inference: PackedLinear against the reference dequantized matmul for every bit width and
group layout, the packed loader against the dense loader, and the generate / bench-infer commands."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.errors import CompressorError
from compressor.model import ModelSource, load_model
from compressor.runtime import load, weight_bytes
from compressor_kernels import PackedLinear, dequantize_codes

from .test_cli import run_cli


def random_layer(bits, out_features, in_features, width, symmetric, seed=0, g_idx=False):
    gen = torch.Generator().manual_seed(seed)
    groups = -(-in_features // width)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen, dtype=torch.uint8)
    scale = torch.rand(out_features, groups, generator=gen) * 0.05 + 0.005
    zero = None if symmetric else torch.randint(0, 2**bits, (out_features, groups), generator=gen).float()
    index = None
    if g_idx:  # act-order checkpoints: columns belong to groups in a permuted order
        index = (torch.randperm(in_features, generator=gen) // width).to(torch.int32)
    return codes, scale, zero, index


def reference(x, codes, scale, zero, bits, width, index):
    zero = torch.full_like(scale, 2 ** (bits - 1)) if zero is None else zero
    group_of = index.long() if index is not None else torch.arange(codes.shape[1]) // width
    return x @ dequantize_codes(codes, scale, zero, group_of).T


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize(("in_features", "width", "symmetric", "g_idx"), [
    (128, 32, True, False), (128, 64, False, False), (80, 48, False, False),  # ragged last group
    (96, 96, True, False), (128, 32, False, True),
])
def test_packed_linear_matches_the_reference(bits, in_features, width, symmetric, g_idx):
    codes, scale, zero, index = random_layer(bits, 48, in_features, width, symmetric, g_idx=g_idx)
    layer = PackedLinear(codes, scale, zero, bits, width, g_idx=index)
    x = torch.randn(3, 5, in_features)
    expected = reference(x, codes, scale, zero, bits, width, index)
    got = layer(x)
    assert got.shape == (3, 5, 48)
    if layer.backend == "dequant":
        assert torch.equal(got, expected)  # the same float operations: exact
        assert torch.equal(layer.codes(), codes)
    else:
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    # The int4 kernel takes 2-4 bits when groups of 32/64/... tile the stored groups (not 48 over 80).
    expected_backend = ("aten-int4" if bits <= 4 and width != 48 and not g_idx
                        else "aten-int8" if bits == 8 and symmetric and width == in_features else "dequant")
    assert layer.backend == expected_backend
    # Packed: about bits/8 bytes a weight, never a dense float copy.
    code_bits = max(bits, 4) if layer.backend == "aten-int4" else bits  # 2/3-bit codes held as 4-bit
    code_bytes = 48 * -(-in_features * code_bits // 32) * 4  # whole 32-bit words per row
    groups = max(scale.shape[1], in_features // 32)  # the int4 kernel's groups may be finer
    assert layer.weight_bytes <= code_bytes + 48 * groups * 8 + 4 * in_features


@pytest.mark.parametrize("out_features", [64, 48])  # 48: not whole blocks of 32 rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_prefill_unpacks_the_kernel_layout(out_features, dtype):
    """From PREFILL_ROWS rows on, an aten-int4 layer is read back from the kernel's own layout and
    multiplied densely: the same result as the int4 kernel, the codes exactly as given."""
    from compressor_kernels.packed_linear import PREFILL_ROWS, int4_layout_block

    codes, scale, zero, _ = random_layer(4, out_features, 128, 64, False)
    layer = PackedLinear(codes, scale, zero, 4, 64, dtype=dtype)
    assert layer.backend == "aten-int4"
    if int4_layout_block() and out_features % int4_layout_block() == 0:  # else prefill runs the kernel itself
        assert torch.equal(layer._int4_codes(), codes)
    x = torch.randn(PREFILL_ROWS + 3, 128, dtype=dtype)
    prefill, kernel = layer(x), layer._int4(x)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(prefill.float(), kernel.float(), rtol=tolerance, atol=tolerance)
    expected = reference(x.float(), codes, scale, zero, 4, 64, None)
    assert torch.allclose(prefill.float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_unpack_is_bit_equal_to_the_eager_unpack(dtype, monkeypatch, tmp_path):
    """The compiled prefill unpack (int4_unpack.c) writes exactly the eager path's bits, on SmolLM2's
    shapes and group layouts (ragged g128 over 576 runs as kernel groups of 64), and is what prefill
    uses wherever a C compiler exists."""
    import shutil

    from compressor_kernels import cpu_unpack
    from compressor_kernels.packed_linear import int4_layout_block

    if int4_layout_block() is None:
        pytest.skip("this torch build's int4 layout is not one the prefill reads")
    monkeypatch.setenv("COMPRESSOR_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_unpack, "_LIBRARY", [])
    if shutil.which("cc") or shutil.which("gcc"):
        assert cpu_unpack.library() is not None
        assert len(list(tmp_path.glob("int4_unpack-*.so"))) == 1  # compiled once, renamed into place
    shapes = [(192, 576, 32), (576, 1536, 128), (64, 576, 128)]  # (out, in, group width)
    for index, (out_features, in_features, width) in enumerate(shapes):
        codes, scale, zero, _ = random_layer(4, out_features, in_features, width, index == 1, seed=index)
        layer = PackedLinear(codes, scale, zero, 4, width, dtype=dtype)
        compiled = layer._int4_dense_t(dtype).clone()
        monkeypatch.setattr(cpu_unpack, "_LIBRARY", [None])  # as on a machine without a compiler
        eager = layer._int4_dense_t(dtype).clone()
        monkeypatch.setattr(cpu_unpack, "_LIBRARY", [])
        assert torch.equal(compiled, eager)
        zero = torch.full_like(scale, 8.0) if zero is None else zero
        expected = dequantize_codes(codes, scale, zero, torch.arange(in_features) // width)  # [out, in]
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16 scales and offsets
        assert torch.allclose(compiled.float().T, expected, rtol=tolerance, atol=tolerance)


def test_prefill_without_the_c_kernel_falls_back_to_eager_ops(monkeypatch, tmp_path):
    """A cache that cannot be written (or no compiler) leaves the kernel unbuilt, never a broken
    prefill: the eager unpack runs instead, with the same result as the int4 kernel."""
    from compressor_kernels import cpu_unpack
    from compressor_kernels.packed_linear import PREFILL_ROWS

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("COMPRESSOR_KERNEL_CACHE", str(tmp_path / "a-file" / "kernels"))
    monkeypatch.setattr(cpu_unpack, "_LIBRARY", [])
    assert cpu_unpack.library() is None
    assert [path.name for path in tmp_path.iterdir()] == ["a-file"]  # nothing half-written beside it
    codes, scale, zero, _ = random_layer(4, 64, 128, 64, False, seed=5)
    layer = PackedLinear(codes, scale, zero, 4, 64, dtype=torch.float32)
    x = torch.randn(PREFILL_ROWS + 1, 128)
    assert torch.allclose(layer(x), layer._int4(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_prefill_in_chunks_matches_the_int8_kernel(dtype, monkeypatch):
    """From PREFILL_ROWS rows on, an aten-int8 layer is dequantized a few output rows at a time and
    multiplied densely: the int8 kernel's result and the reference's, across chunk boundaries."""
    from compressor_kernels import packed_linear
    from compressor_kernels.packed_linear import PREFILL_ROWS

    monkeypatch.setattr(packed_linear, "INT8_PREFILL_ROWS", 20)  # 48 rows: chunks of 20, 20, 8
    codes, scale, zero, _ = random_layer(8, 48, 128, 128, True, seed=4)
    layer = PackedLinear(codes, scale, zero, 8, 128, dtype=dtype)
    assert layer.backend == "aten-int8"
    x = torch.randn(PREFILL_ROWS + 5, 128, dtype=dtype)
    prefill = layer(x).float()
    kernel = torch.ops.aten._weight_int8pack_mm(x, layer.packed, layer.scales).float()
    expected = reference(x.float(), codes, scale, zero, 8, 128, None)
    tolerance = 1e-6 if dtype == torch.float32 else 5e-3  # bfloat16: rounding and summation order
    assert (prefill - kernel).norm() < tolerance * kernel.norm()
    assert (prefill - expected).norm() < tolerance * expected.norm()


def test_every_backend_agrees_with_the_dequant_fallback_and_in_bfloat16():
    for bits, width, zero_ok in ((4, 32, True), (8, 128, False)):
        codes, scale, zero, _ = random_layer(bits, 32, 128, width, symmetric=not zero_ok, seed=3)
        fast = PackedLinear(codes, scale, zero, bits, width, dtype=torch.bfloat16)
        slow = PackedLinear(codes, scale, zero, bits, width, dtype=torch.bfloat16, backend="dequant")
        assert fast.backend != "dequant"
        x = torch.randn(4, 128, dtype=torch.bfloat16)
        assert fast(x).dtype == torch.bfloat16
        a, b = fast(x).float(), slow(x).float()
        assert (a - b).norm() < 0.01 * b.norm()  # bfloat16 rounding and summation order only
        exact = PackedLinear(codes, scale, zero, bits, width, backend="dequant")
        fast32 = PackedLinear(codes, scale, zero, bits, width)
        assert torch.allclose(fast32.dense_weight(), exact.dense_weight(), rtol=1e-5, atol=1e-6)


def _quantize(llama_dir, calibration_file, tmp_path, capsys, monkeypatch, *extra):
    out = tmp_path / "q"
    code, _, stderr = run_cli(["quantize", llama_dir, "--calibration", calibration_file, "--samples", "4",
                               "--seqlen", "32", "-o", out, "--json", *extra], capsys, monkeypatch)
    assert code == 0, stderr
    return out


@pytest.mark.parametrize(("extra", "backend"), [
    (["--bits", "4", "--group-size", "32"], "aten-int4"),
    (["--bits", "3", "--group-size", "64", "--asym"], "aten-int4"),  # 96 inputs: run as groups of 32
    (["--bits", "5", "--group-size", "64", "--asym"], "dequant"),
    (["--bits", "8", "--group-size", "0", "--sym"], "aten-int8"),
    (["--bits", "4", "--group-size", "32", "--full-range"], "aten-int4"),  # negative scales
])
def test_packed_model_matches_the_dense_loader(llama_dir, calibration_file, tmp_path, capsys, monkeypatch,
                                               extra, backend):
    out = _quantize(llama_dir, calibration_file, tmp_path, capsys, monkeypatch, *extra)
    packed, _ = load(out)
    dense, _ = load_model(ModelSource(str(out)))  # compressed-tensors decompresses to float
    linears = [m for m in packed.modules() if isinstance(m, torch.nn.Linear)]
    assert [type(m) for m in linears] == [torch.nn.Linear]  # only the (tied) head stays dense
    assert {m.backend for m in packed.modules() if isinstance(m, PackedLinear)} == {backend}
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = packed(ids).logits, dense(ids).logits
    if backend == "dequant":
        assert torch.equal(a, b)
    else:
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert weight_bytes(packed) < 0.8 * weight_bytes(dense)
    assert packed.get_submodule("lm_head").weight is packed.get_submodule("model.embed_tokens").weight


def test_int8_embeddings_share_one_tensor_and_barely_move_the_logits(
        llama_dir, calibration_file, tmp_path, capsys, monkeypatch):
    out = _quantize(llama_dir, calibration_file, tmp_path, capsys, monkeypatch,
                    "--bits", "4", "--group-size", "32")
    plain, _ = load(out)
    small, _ = load(out, embeddings="int8")
    embed, head = small.get_input_embeddings(), small.get_output_embeddings()
    assert head.packed.data_ptr() == embed.codes.data_ptr() and head.backend == "aten-int8"
    stored = plain.get_input_embeddings().weight
    assert (embed.codes.float() * embed.scale[:, None] - stored).abs().max() <= embed.scale.max() / 2 + 1e-7
    assert weight_bytes(small) < weight_bytes(plain) - 0.7 * stored.numel() * stored.element_size()
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = small(ids).logits.log_softmax(-1), plain(ids).logits.log_softmax(-1)
    assert torch.nn.functional.kl_div(a, b, log_target=True, reduction="batchmean") < 1e-3 * 20
    with pytest.raises(CompressorError, match="unknown embeddings"):
        load(out, embeddings="int4")


def test_generate_and_bench_infer_commands(llama_dir, calibration_file, tmp_path, capsys, monkeypatch):
    out = _quantize(llama_dir, calibration_file, tmp_path, capsys, monkeypatch,
                    "--bits", "5", "--group-size", "32", "--asym")
    code, stdout, stderr = run_cli(["generate", out, "hello world", "--max-new-tokens", "6", "--json"],
                                   capsys, monkeypatch)
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["backends"] == {"dequant": 14}
    # The packed model's greedy tokens are the dense loader's (the dequant path is exact).
    dense, tokenizer = load_model(ModelSource(str(out)))
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    expected = dense.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert result["text"] == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    code, stdout, stderr = run_cli(["bench-infer", out, "--prefill-tokens", "32", "--decode-tokens", "4",
                                    "--repeats", "1", "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    rows = json.loads(stdout)["rows"]
    assert set(rows) == {"dense-bfloat16", "dense-float32", "packed"}
    assert rows["dense-bfloat16"]["decode_vs_dense-bfloat16"] == 1.0
    assert rows["dense-float32"]["weights_vs_dense-bfloat16"] == pytest.approx(2.0, rel=0.01)
    assert rows["packed"]["weights_vs_dense-bfloat16"] < 0.9
    assert all(row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 for row in rows.values())


def test_packed_loader_refuses_what_it_cannot_run(llama_dir, tmp_path, capsys, monkeypatch):
    with pytest.raises(CompressorError, match="no integer compressed-tensors quantization"):
        load(llama_dir)
    with pytest.raises(CompressorError, match="no config.json"):
        load(tmp_path)
    code, _, stderr = run_cli(["generate", str(llama_dir), "hi"], capsys, monkeypatch)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
