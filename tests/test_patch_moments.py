"""Patch moments from shifted cross-correlations (datd.patch_moments) against im2col, on random geometries."""

import random

import pytest
import torch
import torch.nn.functional as F

from datd.patch_moments import ConvGeometry, accumulate_shifted, channel_major, prefers_shifts, tap_major

D64 = torch.float64


def _reference(x: torch.Tensor, geometry: ConvGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over patches of x xᵀ (D, D) and each image's patch sum (N, taps, C), from F.unfold."""
    cols = F.unfold(F.pad(x, geometry.pad), geometry.kernel, dilation=geometry.dilation, stride=geometry.stride)
    taps = geometry.kernel[0] * geometry.kernel[1]
    return torch.einsum("ndl,nel->de", cols, cols), cols.sum(2).view(x.shape[0], -1, taps).transpose(1, 2)


def _random_geometries(count: int, seed: int):
    rng = random.Random(seed)
    while count:
        geometry = ConvGeometry((rng.choice([1, 2, 3, 5, 7]), rng.choice([1, 2, 3, 5])),
                                (rng.choice([1, 1, 2, 3]), rng.choice([1, 2])),
                                (rng.choice([1, 1, 2, 3]), rng.choice([1, 2])),
                                tuple(rng.randint(0, 4) for _ in range(4)),  # type: ignore[arg-type]
                                (rng.randint(1, 12), rng.randint(1, 12)))
        if min(geometry.output_hw) >= 1:
            count -= 1
            yield geometry, rng.randint(1, 3), rng.choice([1, 2, 3, 8, 16]), rng.choice([1, 1, 2, 4])


@pytest.mark.parametrize("seed", range(3))
def test_shifted_moments_equal_im2col_on_random_geometries(seed):
    """Any kernel, stride, dilation, padding (also wider than the kernel) and image size, including images smaller
    than the kernel's reach, several independent channel sets and single-channel sets (depthwise)."""
    torch.manual_seed(seed)
    for geometry, n, sets, c in _random_geometries(60, seed):
        x = torch.randn(n, sets * c, *geometry.input_hw, dtype=D64)
        taps = geometry.kernel[0] * geometry.kernel[1]
        blocks = torch.zeros(sets, taps, c, taps, c, dtype=D64)
        per_image = accumulate_shifted(x, geometry, blocks, sets)
        full = channel_major(blocks)
        for s in range(sets):
            outer, sums = _reference(x[:, s * c:(s + 1) * c], geometry)
            assert torch.allclose(full[s], outer, atol=1e-9), (geometry, n, sets, c)
            assert torch.allclose(per_image[:, :, s], sums, atol=1e-9), (geometry, n, sets, c)


def test_only_the_upper_blocks_are_written_and_the_layouts_invert():
    geometry = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), (6, 7))
    x = torch.randn(2, 4, 6, 7, dtype=D64)
    blocks = torch.zeros(1, 9, 4, 9, 4, dtype=D64)
    blocks[0, 5, :, 2, :] = 7.0  # below the block diagonal: left alone, then replaced by the mirror image
    accumulate_shifted(x, geometry, blocks)
    assert (blocks[0, 5, :, 2, :] == 7.0).all()
    outer, _ = _reference(x, geometry)
    matrix = channel_major(blocks)
    assert torch.allclose(matrix[0], outer, atol=1e-9)
    assert torch.equal(tap_major(matrix, 9)[0, 2, :, 5, :], matrix[0].view(4, 9, 4, 9)[:, 2, :, 5])


def test_float32_sums_stay_close_to_the_float64_reference():
    """The weight-gradient kernels reduce over an image's positions in float32: on post-activation inputs at 28×28
    the relative error of Σ is a few 1e-6 (on CIFAR ResNet-20's real inputs ≈ 1e-7), four orders of magnitude
    below the sampling noise of Σ itself (its two folds of 1,024 images differ by 1.5–7 %)."""
    torch.manual_seed(4)
    geometry = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), (28, 28))
    x = torch.randn(40, 32, 28, 28).relu() + 0.1
    fast, exact = torch.zeros(1, 9, 32, 9, 32, dtype=D64), torch.zeros(1, 9, 32, 9, 32, dtype=D64)
    accumulate_shifted(x, geometry, fast)
    accumulate_shifted(x.double(), geometry, exact)
    a, b = channel_major(fast)[0], channel_major(exact)[0]
    assert float((a - b).norm() / b.norm()) < 2e-5


def test_the_cost_model_picks_shifts_for_wide_convs_and_im2col_for_stems_and_1x1_convs():
    resnet_3x3 = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), (56, 56))
    stem = ConvGeometry((7, 7), (2, 2), (1, 1), (3, 3, 3, 3), (224, 224))
    assert prefers_shifts(resnet_3x3, 64) and prefers_shifts(resnet_3x3, 1)  # depthwise: BLOCK channels at a time
    assert not prefers_shifts(stem, 3)
    assert not prefers_shifts(ConvGeometry((1, 1), (1, 1), (1, 1), (0, 0, 0, 0), (14, 14)), 256)  # half a Gram
