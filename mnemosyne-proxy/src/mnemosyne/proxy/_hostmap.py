"""Mapping a host arena's memory file into the trainer at a chosen address (no torch).

Python's :mod:`mmap` cannot ask for an address, so this calls libc ``mmap`` with
``MAP_FIXED_NOREPLACE``: a re-attaching trainer gets its tensors back at the addresses its
predecessor used when that range is free (it is, in a fresh process, almost always), and
never clobbers an existing mapping when it is not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap

from mnemosyne.proxy.errors import ProxyError

__all__ = ["map_shared", "unmap"]

_MAP_FIXED_NOREPLACE = 0x100000
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def map_shared(fd: int, size: int, hint: int = 0) -> int:
    """Map ``size`` bytes of ``fd`` read-write and shared; return the address.

    With a ``hint``, try exactly that address first and fall back to any address.

    Raises:
        ProxyError: The kernel refused the mapping.
    """
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if hint:
        addr = _libc.mmap(hint, size, prot, mmap.MAP_SHARED | _MAP_FIXED_NOREPLACE, fd, 0)
        if addr not in (None, _MAP_FAILED):
            if addr == hint:
                return int(addr)
            _libc.munmap(addr, size)  # an old kernel took the flag as a mere hint
    addr = _libc.mmap(None, size, prot, mmap.MAP_SHARED, fd, 0)
    if addr in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        msg = f"mmap of the arena ({size} bytes) failed: errno {err}"
        raise ProxyError(msg)
    return int(addr)


def unmap(addr: int, size: int) -> None:
    """Unmap a range returned by :func:`map_shared`."""
    _libc.munmap(addr, size)
