"""Launch grids stay within CUDA's limits (x <= 2**31 - 1, y and z <= 65,535) at every size the
launchers accept, checked on the pure grid functions at sizes up to 2**31 elements without
launching; and the noise kernel, whose programs are folded onto axis x, covers every element."""

import pytest
import torch

from dp_attn.kernels import clipped_sum, noise
from dp_attn.kernels.flash_attn import attention_grid
from dp_attn.kernels.utils import MAX_GRID, checked_grid

ELEMENTS = 2**31


def within_limits(grid) -> bool:
    return all(0 < size <= limit for size, limit in zip(grid, MAX_GRID, strict=False))


def test_checked_grid_accepts_the_limits_and_names_the_axis_past_them():
    assert checked_grid(2**31 - 1, 65_535, 65_535) == (2**31 - 1, 65_535, 65_535)
    with pytest.raises(ValueError, match="axis x"):
        checked_grid(2**31)
    with pytest.raises(ValueError, match="axis y"):
        checked_grid(1, 65_536)
    with pytest.raises(ValueError, match="axis z"):
        checked_grid(1, 1, 65_536)


@pytest.mark.parametrize("rows", [1, 2, 15, 16, 17, 4096, 2**16, 2**20, 2**27])
def test_noise_grid_covers_every_element_within_limits(rows):
    width = ELEMENTS // rows
    grid, block_r, block_w = noise.noise_grid(rows, width)
    assert len(grid) == 1 and within_limits(grid)
    row_blocks, col_blocks = -(-rows // block_r), -(-width // block_w)
    assert grid[0] == row_blocks * col_blocks
    assert block_w % 8 == 0  # noised_by_quarters: quarters of whole counters (two lanes)


def test_noise_grid_of_one_wide_row_fits_where_axis_y_did_not():
    """A flat 2**31-element tensor: 2**19 column blocks, past axis y's 65,535."""
    grid, block_r, block_w = noise.noise_grid(1, ELEMENTS)
    assert (block_r, block_w) == (1, 4096)
    assert grid == (ELEMENTS // 4096,) and ELEMENTS // 4096 > MAX_GRID[1]


@pytest.mark.parametrize(
    "dout, din", [(2**16, 2**15), (2**15, 2**16), (16, 2**27), (2**27, 16), (50257, 768), (1, 1)]
)
@pytest.mark.parametrize("blocks", [(128, 128), (64, 64), (128, 64)])
def test_clipped_sum_grid_within_limits(dout, din, blocks):
    for bias in (False, True):
        assert within_limits(clipped_sum.clipped_sum_grid(dout, din, *blocks, bias))


@pytest.mark.parametrize("B, H, T, D, block", [
    (1, 1, ELEMENTS // 16, 16, 16),   # one long sequence: 2**23 row blocks on x
    (65_535, 1, 16, 16, 128),         # the most examples one call takes
    (1, 65_535, 32, 1, 16),           # the most heads
    (2**11, 32, 2**10, 32, 64),       # 2**31 elements of [B, H, T, D]
])  # fmt: skip
def test_attention_grid_within_limits(B, H, T, D, block):
    assert B * H * T * D <= ELEMENTS
    grid = attention_grid(T, block, H, B)
    assert within_limits(grid) and grid[0] * block >= T


def test_attention_grid_refuses_more_examples_or_heads_than_an_axis_holds():
    with pytest.raises(ValueError, match="axis z"):
        attention_grid(16, 16, 1, 65_536)
    with pytest.raises(ValueError, match="axis y"):
        attention_grid(16, 16, 65_536, 1)


@pytest.mark.parametrize("shape", [(1, 9000), (40, 300), (3, 5)])
def test_folded_noise_kernel_matches_the_twin(shape):
    """Several row and column blocks on one axis (1 x 9000: 3 column blocks of 4096; 40 x 300:
    3 x 2 blocks of 16 x 256); every element gets its own noise, once."""
    rows, width = shape
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(0))
    got = noise.add_gaussian_noise_(x.clone(), 0.5, seed=2**70 + 9)
    want = x + noise.released_noise(2**70 + 9, rows, width, std=0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
