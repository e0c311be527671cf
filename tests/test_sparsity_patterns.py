"""N:M and unstructured mask selection: exact counts, the N-kept convention, bad patterns."""

import pytest
import torch

from compressor.errors import CompressorError
from compressor.sparsity import mask_holds, parse_nm, pattern_from_args, pruned_per_row, select_mask


@pytest.mark.parametrize("text, expected", [("2:4", (2, 4)), ("4:8", (4, 8)), (" 1 : 4 ", (1, 4))])
def test_nm_means_n_kept_of_m(text, expected):
    assert parse_nm(text) == expected
    pattern = pattern_from_args({"pattern": text})
    assert pattern.sparsity == pytest.approx(1 - expected[0] / expected[1])


@pytest.mark.parametrize("text", ["4:2", "4:4", "0:4", "2:3:4", "a:b", "2/4", "", "2:1"])
def test_impossible_or_ambiguous_patterns_are_rejected(text):
    with pytest.raises(CompressorError):
        pattern_from_args({"pattern": text})


@pytest.mark.parametrize("args", [{"sparsity": 1.0}, {"sparsity": -0.1}, {"sparsity": "half"},
                                  {"pattern": "2:4", "sparsity": 0.5}, {}])
def test_bad_sparsity_settings_are_rejected(args):
    with pytest.raises(CompressorError):
        pattern_from_args(args)


@pytest.mark.parametrize("cols", [64, 70, 3])
@pytest.mark.parametrize("args", [{"pattern": "2:4"}, {"pattern": "4:8"}, {"pattern": "1:4"},
                                  {"sparsity": 0.5}, {"sparsity": 0.6}, {"sparsity": 0.0}])
def test_masks_have_exact_counts(cols, args):
    torch.manual_seed(cols)
    scores = torch.rand(12, cols)
    pattern = pattern_from_args(args)
    mask = select_mask(scores, pattern)
    assert mask_holds(mask, pattern)
    assert bool(((~mask).sum(1) == pruned_per_row(cols, pattern)).all())
    if pattern.is_nm:
        full = cols // pattern.block * pattern.block
        kept = mask[:, :full].reshape(12, -1, pattern.block).sum(2)
        assert bool((kept == pattern.kept).all())


def test_mask_keeps_the_highest_scores():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.7, 0.9, 0.1]])
    mask = select_mask(scores, pattern_from_args({"pattern": "2:4"}))
    assert mask.tolist() == [[True, False, True, False, False, True, True, False]]
    mask = select_mask(scores, pattern_from_args({"sparsity": 0.25}))
    assert mask.tolist() == [[True, True, True, True, False, True, True, False]]


def test_mask_holds_detects_violations():
    pattern = pattern_from_args({"pattern": "2:4"})
    mask = torch.tensor([[True, True, False, False, True, True, True, False]])
    assert not mask_holds(mask, pattern)
