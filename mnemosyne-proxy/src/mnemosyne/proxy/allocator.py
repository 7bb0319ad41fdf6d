"""Route every CUDA allocation of a trainer through the proxy's arena (a ctypes allocator).

:func:`install_arena_allocator` takes one block of the arena (``scratch/allocator/<device>``,
found again by a restarted trainer) and installs a pair of ctypes callbacks as torch's CUDA
allocator (the pluggable-allocator hook). Activations, temporaries and anything else torch
allocates then live in the proxy's memory too; sub-allocation is local (a first-fit free list,
no round trip to the proxy per tensor). It must run before torch initialises CUDA in the
process (torch cannot swap an allocator once CUDA is initialised), so: create the holder,
install the allocator, then build the model and ``adopt`` it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

from mnemosyne.core.errors import ConfigError
from mnemosyne.proxy.holder import ProxyStateHolder
from mnemosyne.proxy.table import ALIGN, FreeList

__all__ = ["ArenaAllocator", "install_arena_allocator"]

logger = logging.getLogger(__name__)

_ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p)
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p)


class ArenaAllocator:
    """First-fit sub-allocator over one arena block, callable from torch through ctypes.

    Args:
        base: Device address of the block.
        size: Bytes.
        device: CUDA device index of the block.
    """

    def __init__(self, base: int, size: int, device: int) -> None:
        self.base = base
        self.size = size
        self.device = device
        self._free = FreeList(size)
        self._live: dict[int, int] = {}
        self._lock = threading.Lock()  # backward runs on autograd threads
        self.peak = 0
        self.in_use = 0
        self.failed = 0
        self._alloc_cb = _ALLOC(self._alloc)
        self._free_cb = _FREE(self._release)

    def _alloc(self, size: int, device: int, stream: Any) -> int:
        need = max(ALIGN, (size + ALIGN - 1) // ALIGN * ALIGN)
        with self._lock:
            off = self._free.find(need)
            if off is None or device != self.device:
                self.failed += 1
                return 0  # torch turns a null pointer into an out-of-memory error
            self._free.take(off, need)
            ptr = self.base + off
            self._live[ptr] = need
            self.in_use += need
            self.peak = max(self.peak, self.in_use)
            return ptr

    def _release(self, ptr: int | None, size: int, device: int, stream: Any) -> None:
        if not ptr:
            return
        with self._lock:
            need = self._live.pop(ptr, None)
            if need is None:
                logger.error("arena allocator asked to free %#x, which it did not allocate", ptr)
                return
            self._free.give(ptr - self.base, need)
            self.in_use -= need

    @property
    def function_pointers(self) -> tuple[int, int]:
        """Addresses of the alloc and free callbacks."""
        a = ctypes.cast(self._alloc_cb, ctypes.c_void_p).value
        f = ctypes.cast(self._free_cb, ctypes.c_void_p).value
        assert a is not None and f is not None
        return a, f


def install_arena_allocator(holder: ProxyStateHolder, nbytes: int, device: int = 0) -> ArenaAllocator:
    """Make torch allocate CUDA memory from a block of the proxy's arena.

    Args:
        holder: A holder of a cuda arena (not attached yet: attaching initialises torch's CUDA).
        nbytes: Size of the block for all of torch's allocations.
        device: CUDA device.

    Raises:
        ConfigError: The holder has no cuda space or torch already initialised CUDA.
    """
    import torch
    from torch.cuda.memory import CUDAPluggableAllocator, change_current_allocator

    if torch.cuda.is_initialized():
        msg = "install_arena_allocator() must run before torch initialises CUDA in this process"
        raise ConfigError(msg)
    spaces = [m for m in holder.map() if m.space.kind == "cuda" and m.space.device == device]
    if not spaces:
        msg = f"the proxy's arena has no memory on cuda:{device}"
        raise ConfigError(msg)
    name = f"scratch/allocator/{device}"
    entry = holder.client.allocate(name, spaces[0].space.space, "uint8", [nbytes], nbytes).entry
    alloc = ArenaAllocator(spaces[0].address + entry.offset, nbytes, device)
    a, f = alloc.function_pointers
    plug = CUDAPluggableAllocator.__new__(CUDAPluggableAllocator)
    plug._allocator = torch._C._cuda_customAllocator(a, f)
    change_current_allocator(plug)
    holder._allocator = alloc  # type: ignore[attr-defined]  # keeps the callbacks alive
    logger.info("torch's CUDA allocations now come from a %d-byte arena block at %#x", nbytes, alloc.base)
    return alloc
