"""Checksums of state buffers, computed where the bytes live.

One definition, several implementations that give the same 64-bit value, so the two ends of
a pull can compare sums whichever implementation each of them ran:

* host memory: numba ``njit`` (:func:`checksum_bytes`), or numpy when numba is not
  installed (it is the optional extra ``mnemosyne-proxy[numba]``) or cannot compile;
* device memory: a numba-cuda kernel (:mod:`mnemosyne.proxy.arena.cuda`), or torch ops on the
  device (:func:`checksum_torch`) when numba-cuda cannot be imported or compiled (e.g. a
  numba-cuda release that does not support the installed numpy).

The bytes are read as little-endian 64-bit words ``w_i`` (a last partial word padded with
zeros); the checksum is ``mix(n ^ sum_i mix(w_i + (i + 1) * G))`` modulo 2**64, where ``mix``
is the splitmix64 finalizer and ``n`` the byte count. The sum makes it parallel (any order,
any number of threads); the position term makes a moved word count. torch has no unsigned
64-bit arithmetic, so :func:`checksum_torch` computes in int64: addition and multiplication
are the same modulo 2**64, and right shifts are masked to be logical.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

__all__ = ["GOLDEN", "checksum_bytes", "checksum_numpy", "checksum_reference", "checksum_torch", "host_path",
           "mix64"]

logger = logging.getLogger(__name__)

GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK = (1 << 64) - 1

_kernel: Any = None
_numba_error: str | None = None
#: Words per chunk of the numpy and torch versions (bounds their temporary memory).
CHUNK_WORDS = 1 << 23


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

    @numba.njit(cache=True, nogil=True)  # type: ignore[untyped-decorator,unused-ignore]
    def words_sum(words: Any) -> Any:  # pragma: no cover - compiled
        total = np.uint64(0)
        for i in range(words.shape[0]):
            z = words[i] + (np.uint64(i) + np.uint64(1)) * golden
            z = (z ^ (z >> s30)) * m1
            z = (z ^ (z >> s27)) * m2
            total += z ^ (z >> s31)
        return total

    return words_sum


def _words_sum_numpy(words: Any) -> int:
    m1, m2, golden = np.uint64(_M1), np.uint64(_M2), np.uint64(GOLDEN)
    total = np.uint64(0)
    with np.errstate(over="ignore"):
        for start in range(0, int(words.shape[0]), CHUNK_WORDS):
            w = words[start : start + CHUNK_WORDS]
            z = w + np.arange(start + 1, start + 1 + w.shape[0], dtype=np.uint64) * golden
            z ^= z >> np.uint64(30)
            z *= m1
            z ^= z >> np.uint64(27)
            z *= m2
            z ^= z >> np.uint64(31)
            total += z.sum(dtype=np.uint64)  # wraps modulo 2**64, like the kernels
    return int(total)


def _words_sum(words: Any) -> int:
    """Sum of mixed words with numba njit; numpy when numba cannot compile (any failure)."""
    global _kernel, _numba_error
    if _kernel is None and _numba_error is None:
        try:
            _kernel = _build_kernel()
            return int(_kernel(words))
        except Exception as exc:
            _numba_error = f"{type(exc).__name__}: {exc}"[:300]
            if isinstance(exc, ModuleNotFoundError) and exc.name == "numba":  # an optional extra, not a fault
                logger.info("numba not installed, host checksums use numpy (pip install "
                            "'mnemosyne-proxy[numba]' for the faster njit path)")
            else:
                logger.warning("numba njit checksum unavailable, using numpy: %s", _numba_error)
    if _kernel is not None:
        return int(_kernel(words))
    return _words_sum_numpy(words)


def host_path() -> str:
    """Which implementation :func:`checksum_bytes` uses: ``numba njit`` or ``numpy (...)``."""
    if _numba_error is not None:
        return f"numpy (numba njit failed: {_numba_error})"
    return "numba njit"


def _finish(total: int, n: int, tail: Any) -> int:
    """Add the padded partial last word (``tail``: its bytes) and apply the final mix."""
    full = n // 8 * 8
    if full < n:
        pad = np.zeros(8, dtype=np.uint8)
        pad[: n - full] = tail
        total = (total + mix64(int(pad.view("<u8")[0]) + (full // 8 + 1) * GOLDEN)) & _MASK
    return mix64(n ^ total)


def checksum_numpy(view: Any) -> int:
    """Checksum of a host buffer with numpy only (the fallback; also a cross-check in tests)."""
    arr = np.frombuffer(view, dtype=np.uint8) if not isinstance(view, np.ndarray) else view.reshape(-1)
    n = int(arr.shape[0])
    full = n // 8 * 8
    total = _words_sum_numpy(arr[:full].view("<u8")) if full else 0
    return _finish(total, n, arr[full:])


def checksum_torch(buf: Any) -> int:
    """Checksum of a 1-D contiguous uint8 torch tensor, computed with torch ops where it lives.

    The device fallback of the numba-cuda kernel (same value); runs on CPU tensors too.
    """
    import torch

    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        msg = f"checksum_torch wants a 1-D contiguous uint8 tensor, got {buf.dtype}{tuple(buf.shape)}"
        raise ValueError(msg)
    n = int(buf.numel())
    full = n // 8
    acc = torch.zeros((), dtype=torch.int64, device=buf.device)
    if full:
        words = buf[: full * 8].view(torch.int64)
        for start in range(0, full, CHUNK_WORDS):
            w = words[start : start + CHUNK_WORDS]
            z = torch.arange(start + 1, start + 1 + w.numel(), dtype=torch.int64, device=buf.device)
            z.mul_(_signed(GOLDEN)).add_(w)
            z = _mix_torch(z)
            acc += z.sum()  # int64 sums wrap modulo 2**64
    total = int(acc.item()) & _MASK
    tail = buf[full * 8 :].cpu().numpy() if n % 8 else None
    return _finish(total, n, tail)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix_torch(z: Any) -> Any:
    """splitmix64's finalizer on an int64 tensor (logical shifts by masking), in place."""
    z ^= (z >> 30) & ((1 << 34) - 1)
    z.mul_(_signed(_M1))
    z ^= (z >> 27) & ((1 << 37) - 1)
    z.mul_(_signed(_M2))
    z ^= (z >> 31) & ((1 << 33) - 1)
    return z


def checksum_bytes(view: Any) -> int:
    """Checksum of a host buffer (numpy uint8 array, memoryview, bytes), with numba njit (numpy fallback)."""
    arr = np.frombuffer(view, dtype=np.uint8) if not isinstance(view, np.ndarray) else view.reshape(-1)
    n = int(arr.shape[0])
    full = n // 8 * 8
    total = _words_sum(arr[:full].view("<u8")) if full else 0
    return _finish(total, n, arr[full:])
