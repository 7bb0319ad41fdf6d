"""Checksums of state buffers, computed where the bytes live.

One definition, two implementations that give the same 64-bit value: numba ``njit`` over
host memory here, a numba CUDA kernel over device memory in :mod:`mnemosyne.proxy.arena.cuda`.
The bytes are read as little-endian 64-bit words ``w_i`` (a last partial word padded with
zeros); the checksum is ``mix(n ^ sum_i mix(w_i + (i + 1) * G))`` modulo 2**64, where ``mix``
is the splitmix64 finalizer and ``n`` the byte count. The sum makes it parallel (any order,
any number of threads); the position term makes a moved word count.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["GOLDEN", "checksum_bytes", "checksum_reference", "mix64"]

GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK = (1 << 64) - 1

_kernel: Any = None


def mix64(z: int) -> int:
    """The splitmix64 finalizer on a Python int (reference implementation)."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def checksum_reference(data: bytes) -> int:
    """Pure-Python checksum (slow; the definition the fast versions are tested against)."""
    n = len(data)
    padded = data + b"\0" * (-n % 8)
    words = np.frombuffer(padded, dtype="<u8")
    total = 0
    for i, w in enumerate(words.tolist()):
        total = (total + mix64(w + (i + 1) * GOLDEN)) & _MASK
    return mix64(n ^ total)


def _build_kernel() -> Any:
    import numba

    m1, m2, golden = np.uint64(_M1), np.uint64(_M2), np.uint64(GOLDEN)
    s30, s27, s31 = np.uint64(30), np.uint64(27), np.uint64(31)

    @numba.njit(cache=True, nogil=True)
    def words_sum(words: Any) -> Any:  # pragma: no cover - compiled
        total = np.uint64(0)
        for i in range(words.shape[0]):
            z = words[i] + (np.uint64(i) + np.uint64(1)) * golden
            z = (z ^ (z >> s30)) * m1
            z = (z ^ (z >> s27)) * m2
            total += z ^ (z >> s31)
        return total

    return words_sum


def checksum_bytes(view: Any) -> int:
    """Checksum of a host buffer (numpy uint8 array, memoryview, bytes), with numba njit."""
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    arr = np.frombuffer(view, dtype=np.uint8) if not isinstance(view, np.ndarray) else view.reshape(-1)
    n = int(arr.shape[0])
    full = n // 8 * 8
    total = int(_kernel(arr[:full].view("<u8"))) if full else 0
    if full < n:
        tail = np.zeros(8, dtype=np.uint8)
        tail[: n - full] = arr[full:]
        total = (total + mix64(int(tail.view("<u8")[0]) + (full // 8 + 1) * GOLDEN)) & _MASK
    return mix64(n ^ total)
