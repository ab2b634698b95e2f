"""compact.top_positions: the m largest integer keys, ties by lower position, in ascending order,
bitwise equal to a stable descending sort; many ties and several blocks."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from parity import package_module


def expected_positions(keys: torch.Tensor, m: int) -> torch.Tensor:
    order = torch.sort(keys.long().cpu(), descending=True, stable=True).indices[:m]
    return order.sort().values


@given(
    L=st.one_of(st.integers(1, 40), st.integers(1000, 4200)),
    spread=st.sampled_from([0, 1, 3, 200, 30000]),
    dtype=st.sampled_from([torch.int16, torch.int32]),
    data=st.data(),
)
def test_top_positions_matches_stable_sort(fs, device, L, spread, dtype, data):
    compact = package_module(fs, "primitives.compact")
    m = data.draw(st.integers(1, L))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(-1, spread + 1, (L,), generator=g).to(dtype).to(device)
    got = compact.top_positions(keys, m)
    assert got.dtype == torch.int64 and got.shape == (m,)
    assert torch.equal(got.cpu(), expected_positions(keys, m))


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_top_positions_all_tied_across_blocks(fs, device, dtype):
    """Every key equal, the cut inside the third block: the first m positions, in order."""
    compact = package_module(fs, "primitives.compact")
    keys = torch.full((3 * compact.BLOCK + 17,), 7, dtype=dtype, device=device)
    m = 2 * compact.BLOCK + 5
    assert torch.equal(compact.top_positions(keys, m).cpu(), torch.arange(m))
