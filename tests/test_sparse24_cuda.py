"""torch's semi-structured 2:4 kernels on pruned layers: runs only where CUDA is present."""

import pytest
import torch

from compressor.sparse24 import accelerate_2of4, is_2of4
from compressor.sparsity import pattern_from_args, select_mask


def test_is_2of4_detects_the_pattern():
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    assert not is_2of4(weight)
    weight *= select_mask(weight.abs(), pattern_from_args({"pattern": "2:4"}))
    assert is_2of4(weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparsity needs CUDA")
def test_semi_structured_linear_matches_dense():
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 128, bias=False).half().cuda()
    with torch.no_grad():
        layer.weight *= select_mask(layer.weight.abs(), pattern_from_args({"pattern": "2:4"}))
    x = torch.randn(64, 256, dtype=torch.float16, device="cuda")
    dense = layer(x)
    model = torch.nn.Sequential(layer)
    assert accelerate_2of4(model) == ["0"]
    torch.testing.assert_close(model(x), dense, rtol=1e-2, atol=1e-2)
