"""numba checksums against the reference definition."""

import numpy as np
import pytest

from mnemosyne.proxy.checksum import checksum_bytes, checksum_reference


@pytest.mark.timeout(90)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 64, 1000, 4099])
def test_njit_matches_reference(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert checksum_bytes(data) == checksum_reference(data)


@pytest.mark.timeout(90)
def test_detects_changes_moves_and_length():
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)
    base = checksum_bytes(data)
    flipped = data.copy()
    flipped[1234] ^= 1
    swapped = data.copy().view("<u8")
    swapped[[3, 4]] = swapped[[4, 3]]
    assert len({base, checksum_bytes(flipped), checksum_bytes(swapped.view(np.uint8)),
                checksum_bytes(np.concatenate([data, np.zeros(8, np.uint8)]))}) == 4
