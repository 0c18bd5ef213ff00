import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tsquant.export.packing import (
    PackingError,
    bits_per_code,
    pack_codes,
    packed_nbytes,
    unpack_codes,
)
from tsquant.quantizers.weight import WeightGrid

GRIDS = ["ternary", "narrow:2", "narrow:4", 2, 3, 4, 8]


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(GRIDS),
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_round_trip_on_every_grid(spec, shape, seed):
    grid = WeightGrid.from_spec(spec)
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, grid.num_levels, tuple(shape), generator=g)
    codes = grid.low + grid.spacing * index
    packed = pack_codes(codes, grid.low, grid.high, grid.spacing)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(codes.numel(), grid.num_levels)
    back = unpack_codes(packed, tuple(shape), grid.low, grid.high, grid.spacing)
    assert back.dtype == grid.code_dtype
    assert torch.equal(back.long(), codes.long())


def test_ternary_is_five_per_byte_in_base_three():
    codes = torch.tensor([-1, 0, 1, 1, 0, 1])  # level indices 0, 1, 2, 2, 1 | 2
    assert pack_codes(codes, -1, 1, 1).tolist() == [0 + 1 * 3 + 2 * 9 + 2 * 27 + 1 * 81, 2]
    assert bits_per_code(3) == 1.6 and bits_per_code(4) == 2 and bits_per_code(5) == 8 / 3


def test_two_bit_grids_stay_four_per_byte_little_endian():
    codes = torch.tensor([-3, -1, 1, 3, 1])  # level indices 0, 1, 2, 3, 2
    assert pack_codes(codes, -3, 3, 2).tolist() == [0b11_10_01_00, 0b10]


@pytest.mark.parametrize(
    "codes, low, high, spacing",
    [([2], -1, 1, 1), ([-2], -1, 1, 1), ([0], -3, 3, 2), ([5], -3, 3, 2)],
)
def test_off_grid_codes_are_refused(codes, low, high, spacing):
    with pytest.raises(PackingError, match="off the grid"):
        pack_codes(torch.tensor(codes), low, high, spacing)


def test_wrong_buffer_size_is_refused():
    packed = pack_codes(torch.zeros(11, dtype=torch.int8), -1, 1, 1)
    with pytest.raises(PackingError, match="expected 3 uint8"):
        unpack_codes(packed[:-1], (11,), -1, 1, 1)


def test_a_level_beyond_the_grid_is_detected():
    packed = torch.tensor([243], dtype=torch.uint8)  # 3^5: no five ternary codes make it
    with pytest.raises(PackingError, match="top level"):
        unpack_codes(packed, (1,), -1, 1, 1)
    packed = torch.tensor([0b111], dtype=torch.uint8)  # level index 7 of a 5-level bit grid
    with pytest.raises(PackingError, match="top level"):
        unpack_codes(packed, (1,), 0, 6, 1)
