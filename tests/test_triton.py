"""The Triton dequantize-matmul (PackedLinear backend "triton") against the reference dequantized
matmul: on CUDA where present, else on the CPU under Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

# tests/conftest.py sets TRITON_INTERPRET=1 where there is no CUDA, before anything imports Triton.
pytest.importorskip("triton")

from compressor.model import ModelSource, load_model  # noqa: E402
from compressor.runtime import load  # noqa: E402
from compressor_kernels import PackedLinear, triton_available  # noqa: E402

from .test_kernels import _quantize, random_layer, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton needs CUDA or TRITON_INTERPRET=1")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize(("in_features", "width", "symmetric", "g_idx"), [
    (128, 32, True, False), (80, 48, False, False),  # ragged last group
    (96, 96, True, False), (128, 32, False, True),   # per channel; act-order g_idx
])
def test_triton_backend_matches_the_reference(bits, in_features, width, symmetric, g_idx):
    codes, scale, zero, index = random_layer(bits, 48, in_features, width, symmetric, seed=bits, g_idx=g_idx)
    layer = PackedLinear(codes, scale, zero, bits, width, g_idx=index, backend="triton").to(DEVICE)
    # The packed words are the checkpoint's: the same codes come back out.
    assert torch.equal(layer.codes().cpu(), codes)
    for rows in (1, 3, 40):  # GEMV (decode: up to 4 rows), dequantize + matmul (prefill)
        x = torch.randn(rows, in_features)
        got = layer(x.to(DEVICE)).cpu()
        expected = reference(x, codes, scale, zero, bits, width, index)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # Unit inputs read single weights: the dequantization itself is exact, straddling codes included.
    eye = torch.eye(in_features, device=DEVICE)
    weight = reference(torch.eye(in_features), codes, scale, zero, bits, width, index)
    assert torch.equal(layer(eye).cpu(), weight)
    assert torch.equal(layer(eye[:2]).cpu(), weight[:2])  # through the GEMV kernel


def test_triton_backend_in_half_precision():
    codes, scale, zero, _ = random_layer(4, 64, 128, 32, symmetric=False, seed=7)
    half = PackedLinear(codes, scale, zero, 4, 32, dtype=torch.float16, backend="triton").to(DEVICE)
    for rows in (1, 24):
        x = torch.randn(rows, 128)
        got = half(x.to(DEVICE, torch.float16))
        assert got.dtype == torch.float16
        expected = reference(x, codes, scale, zero, 4, 32, None)
        assert (got.float().cpu() - expected).norm() < 2e-3 * expected.norm()


def test_packed_model_on_triton_matches_the_dense_loader(llama_dir, calibration_file, tmp_path, capsys,
                                                         monkeypatch):
    out = _quantize(llama_dir, calibration_file, tmp_path, capsys, monkeypatch, "--bits", "3",
                    "--group-size", "64", "--asym")
    packed, _ = load(out, device=DEVICE, backend="triton")
    assert {m.backend for m in packed.modules() if isinstance(m, PackedLinear)} == {"triton"}
    dense, _ = load_model(ModelSource(str(out)))
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = packed(ids.to(DEVICE)).logits.cpu(), dense(ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
