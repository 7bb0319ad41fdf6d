"""The ``cuda`` arena: CUDA virtual memory (VMM) exported as POSIX file descriptors.

The proxy creates one physical allocation on its device with ``cuMemCreate`` (requesting
POSIX-fd export), maps it into its own address space (for checksums and peer copies) and
hands a descriptor of it to each trainer (``cuMemExportToShareableHandle``, sent with
``SCM_RIGHTS``). A trainer imports it, reserves virtual addresses at the address the previous
trainer used (the proxy remembers it) and maps the memory there, so tensors come back at the
same device addresses. The physical memory belongs to the proxy: a trainer that dies,
including of a sticky CUDA error that poisons its own context, takes none of it along.

A small host space (memfd, as in the host arena) holds CPU-side state such as an optimizer's
step counters. Checksums of device memory run as a numba CUDA kernel computing the same
function as :mod:`mnemosyne.proxy.checksum`.

Needs ``cuda-python`` (``cuda.bindings``) and ``numba-cuda``:
``pip install "mnemosyne-proxy[cuda]"``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from mnemosyne.core.errors import ConfigError, MissingDependencyError
from mnemosyne.proxy.arena import Arena, PeerMapping, SpaceInfo
from mnemosyne.proxy.arena.host import HostArena, HostPeerMapping
from mnemosyne.proxy.checksum import _M1, _M2, _MASK, GOLDEN, checksum_bytes, mix64
from mnemosyne.proxy.errors import ProxyError

__all__ = ["CudaArena", "CudaPeerMapping", "cuda_checksum", "driver", "map_cuda_space"]

_INSTALL = 'pip install "mnemosyne-proxy[cuda]"'

logger = logging.getLogger(__name__)


def driver() -> Any:
    """The CUDA driver bindings of cuda-python."""
    try:
        from cuda.bindings import driver as drv
    except ImportError:
        try:
            from cuda import cuda as drv  # cuda-python < 12.6
        except ImportError:
            msg = "cuda-python (the cuda arena)"
            raise MissingDependencyError(msg, _INSTALL) from None
    return drv


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-python result tuple, raising on an error code."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        drv = driver()
        _e, name = drv.cuGetErrorName(err)
        msg = f"{what} failed: {name.decode() if isinstance(name, bytes) else name} ({int(err)})"
        raise ProxyError(msg)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def _set_context(device: int) -> Any:
    drv = driver()
    _check(drv.cuInit(0), "cuInit")
    dev = _check(drv.cuDeviceGet(device), f"cuDeviceGet({device})")
    ctx = _check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    _check(drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    return dev


def _set_location(obj: Any, device: int) -> None:
    """Point ``obj.location`` (an allocation prop or access descriptor) at a device."""
    drv = driver()
    obj.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    obj.location.id = device


def _fd_type() -> Any:
    return driver().CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR


def _granularity(device: int) -> int:
    drv = driver()
    prop = drv.CUmemAllocationProp()
    prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    _set_location(prop, device)
    prop.requestedHandleTypes = _fd_type()
    flag = drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
    return int(_check(drv.cuMemGetAllocationGranularity(prop, flag), "cuMemGetAllocationGranularity"))


def _map(handle: Any, size: int, device: int, hint: int = 0) -> int:
    """Reserve ``size`` bytes of virtual addresses (at ``hint`` if free), map ``handle``, allow ``device``."""
    drv = driver()
    gran = _granularity(device)
    ptr = int(_check(drv.cuMemAddressReserve(size, gran, hint, 0), "cuMemAddressReserve"))
    try:
        _check(drv.cuMemMap(ptr, size, 0, handle, 0), "cuMemMap")
        desc = drv.CUmemAccessDesc()
        _set_location(desc, device)
        desc.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        _check(drv.cuMemSetAccess(ptr, size, [desc], 1), "cuMemSetAccess")
    except ProxyError:
        drv.cuMemUnmap(ptr, size)
        drv.cuMemAddressFree(ptr, size)
        raise
    return ptr


def _unmap(ptr: int, size: int) -> None:
    drv = driver()
    drv.cuMemUnmap(ptr, size)
    drv.cuMemAddressFree(ptr, size)


_kernel: Any = None


def _build_kernel() -> Any:
    try:
        from numba import cuda as numba_cuda
    except ImportError:
        msg = "numba-cuda (checksums on the cuda arena)"
        raise MissingDependencyError(msg, _INSTALL) from None
    import numba

    cuda: Any = numba_cuda  # numba ships no types for its CUDA target
    m1, m2, golden = np.uint64(_M1), np.uint64(_M2), np.uint64(GOLDEN)
    s30, s27, s31 = np.uint64(30), np.uint64(27), np.uint64(31)

    @cuda.jit  # type: ignore[untyped-decorator]
    def words_sum(words: Any, out: Any) -> None:  # pragma: no cover - runs on the GPU
        i = cuda.grid(1)
        stride = cuda.gridsize(1)
        acc = numba.uint64(0)
        n = words.shape[0]
        while i < n:
            z = words[i] + (numba.uint64(i) + numba.uint64(1)) * golden
            z = (z ^ (z >> s30)) * m1
            z = (z ^ (z >> s27)) * m2
            acc += z ^ (z >> s31)
            i += stride
        cuda.atomic.add(out, 0, acc)

    return words_sum


def cuda_checksum(ptr: int, nbytes: int) -> int:
    """Checksum of ``nbytes`` of device memory at ``ptr`` (same value as the host version)."""
    global _kernel
    from numba import cuda as numba_cuda

    cuda: Any = numba_cuda
    if _kernel is None:
        _kernel = _build_kernel()
    full = nbytes // 8
    total = 0
    if full:
        desc = {"shape": (full,), "typestr": "<u8", "data": (ptr, False), "version": 3, "strides": None}
        words = cuda.from_cuda_array_interface(desc, owner=None, sync=False)
        out = cuda.to_device(np.zeros(1, dtype=np.uint64))
        threads = 256
        blocks = max(1, min(4096, (full + threads - 1) // threads))
        _kernel[blocks, threads](words, out)
        total = int(out.copy_to_host()[0])
    rest = nbytes - full * 8
    if rest:
        tail = np.zeros(8, dtype=np.uint8)
        _check(driver().cuMemcpyDtoH(tail.ctypes.data, ptr + full * 8, rest), "cuMemcpyDtoH")
        total = (total + mix64(int(tail.view("<u8")[0]) + (full + 1) * GOLDEN)) & _MASK
    return mix64(nbytes ^ total)


class CudaPeerMapping(PeerMapping):
    """A same-node peer's device memory (and host space) mapped into this proxy."""

    def __init__(self, ptr: int, size: int, host: HostPeerMapping | None) -> None:
        self.ptr = ptr
        self.size = size
        self.host = host

    def close(self) -> None:
        """Unmap."""
        _unmap(self.ptr, self.size)
        if self.host is not None:
            self.host.close()


class CudaArena(Arena):
    """Device memory from CUDA VMM plus a small host space.

    Args:
        capacity: Bytes of device memory (rounded up to the allocation granularity).
        device: CUDA device index.
        host_capacity: Bytes of the host space (memfd).
    """

    kind = "cuda"

    def __init__(self, capacity: int, device: int = 0, host_capacity: int = 1 << 20) -> None:
        if device < 0:
            msg = f"the cuda arena needs a device index >= 0, got {device}"
            raise ConfigError(msg)
        drv = driver()
        _set_context(device)
        gran = _granularity(device)
        size = (capacity + gran - 1) // gran * gran
        super().__init__(size, device, host_capacity)
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        _set_location(prop, device)
        prop.requestedHandleTypes = _fd_type()
        self.handle = _check(drv.cuMemCreate(size, prop, 0), f"cuMemCreate({size} bytes on device {device})")
        self.ptr = _map(self.handle, size, device)
        self.host = HostArena(max(host_capacity, 4096))
        self._kernel_ok = True
        _check(drv.cuMemsetD8(self.ptr, 0, size), "cuMemsetD8")  # fresh memory reads as zeros, like memfd
        _check(drv.cuCtxSynchronize(), "cuCtxSynchronize")

    @property
    def spaces(self) -> list[SpaceInfo]:
        """Space 0: device memory; space 1: host memory."""
        return [SpaceInfo("cuda", self.device, self.capacity), SpaceInfo("host", -1, self.host.capacity)]

    def export_fds(self, read_only: bool) -> list[int]:
        """A POSIX fd of the device memory (CUDA has no read-only export) and one of the host space."""
        fd = int(_check(driver().cuMemExportToShareableHandle(self.handle, _fd_type(), 0),
                        "cuMemExportToShareableHandle"))
        return [fd, *self.host.export_fds(read_only)]

    def _dev(self, space: int, offset: int, nbytes: int) -> bool:
        limit = self.capacity if space == 0 else self.host.capacity
        if space not in (0, 1) or offset < 0 or nbytes < 0 or offset + nbytes > limit:
            msg = f"range space={space} [{offset}, {offset + nbytes}) is outside the cuda arena"
            raise ConfigError(msg)
        return space == 0

    checksum_path = "numba CUDA kernel (device)"

    def checksum(self, space: int, offset: int, nbytes: int) -> int:
        """A CUDA kernel on device memory, numba njit on the host space."""
        if not self._dev(space, offset, nbytes):
            return checksum_bytes(self.host.view[offset : offset + nbytes])
        if self._kernel_ok:
            try:
                return cuda_checksum(self.ptr + offset, nbytes)
            except Exception as exc:  # numba-cuda missing or refusing VMM memory: say so, stay correct
                self._kernel_ok = False
                self.checksum_path = f"host fallback: device copy + numba njit (CUDA kernel failed: {exc!r:.200})"
                logger.warning("CUDA checksum kernel failed, checksumming through host copies: %r", exc)
        return checksum_bytes(np.frombuffer(self.read(0, offset, nbytes), dtype=np.uint8))

    def read(self, space: int, offset: int, nbytes: int) -> bytes:
        """Copy bytes out to the host."""
        if not self._dev(space, offset, nbytes):
            return self.host.read(0, offset, nbytes)
        out = np.empty(nbytes, dtype=np.uint8)
        _check(driver().cuMemcpyDtoH(out.ctypes.data, self.ptr + offset, nbytes), "cuMemcpyDtoH")
        return out.tobytes()

    def write(self, space: int, offset: int, data: bytes | memoryview) -> None:
        """Copy bytes in from the host."""
        if not self._dev(space, offset, len(data)):
            self.host.write(0, offset, data)
            return
        src = np.frombuffer(data, dtype=np.uint8)
        _check(driver().cuMemcpyHtoD(self.ptr + offset, src.ctypes.data, len(data)), "cuMemcpyHtoD")

    def map_peer(self, fds: list[int], spaces: list[SpaceInfo]) -> PeerMapping:
        """Import and map a same-node peer's device memory; map its host space read-only."""
        if len(fds) != 2 or [s.kind for s in spaces] != ["cuda", "host"]:
            msg = f"peer exports {[s.kind for s in spaces]} spaces; a cuda arena pulls from a cuda arena"
            raise ConfigError(msg)
        drv = driver()
        handle = _check(drv.cuMemImportFromShareableHandle(fds[0], _fd_type()), "cuMemImportFromShareableHandle")
        try:
            ptr = _map(handle, spaces[0].capacity, self.device)
        finally:
            drv.cuMemRelease(handle)  # the mapping keeps the memory alive
        return CudaPeerMapping(ptr, spaces[0].capacity, HostPeerMapping(fds[1], spaces[1].capacity))

    def copy_from_peer(self, peer: PeerMapping, space: int, src_offset: int, dst_offset: int, nbytes: int) -> None:
        """Device-to-device copy (queued; see :meth:`synchronize`), or memcpy for the host space."""
        assert isinstance(peer, CudaPeerMapping)
        if self._dev(space, dst_offset, nbytes):
            _check(driver().cuMemcpyDtoDAsync(self.ptr + dst_offset, peer.ptr + src_offset, nbytes, 0),
                   "cuMemcpyDtoDAsync")
        else:
            assert peer.host is not None
            self.host.copy_from_peer(peer.host, 0, src_offset, dst_offset, nbytes)

    def synchronize(self) -> None:
        """Wait for queued copies."""
        _check(driver().cuCtxSynchronize(), "cuCtxSynchronize")

    def close(self) -> None:
        """Unmap and release the device memory (trainers that still map it keep it alive)."""
        drv = driver()
        _unmap(self.ptr, self.capacity)
        drv.cuMemRelease(self.handle)
        self.host.close()


class _CudaMemory:
    """Exposes a device range to torch through ``__cuda_array_interface__`` (no copy)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def map_cuda_space(space: Any, fd: int) -> Any:
    """Trainer side: import the proxy's device memory and map it at ``space.base_hint`` when free.

    Only the driver is used here (the primary context, which torch shares); the torch view
    of the memory is made on first use.
    """
    from mnemosyne.proxy.holder import MappedSpace

    device = int(space.device)
    _set_context(device)
    drv = driver()
    try:
        handle = _check(drv.cuMemImportFromShareableHandle(fd, _fd_type()), "cuMemImportFromShareableHandle")
    finally:
        os.close(fd)
    try:
        ptr = _map(handle, int(space.capacity), device, int(space.base_hint))
    finally:
        drv.cuMemRelease(handle)

    def make_base() -> Any:
        import torch

        torch.cuda.set_device(device)
        base = torch.as_tensor(_CudaMemory(ptr, int(space.capacity)), device=f"cuda:{device}")
        if base.data_ptr() != ptr:
            msg = f"torch did not wrap the arena in place ({base.data_ptr():#x} != {ptr:#x})"
            raise ProxyError(msg)
        return base

    return MappedSpace(space, ptr, make_base, lambda: _unmap(ptr, int(space.capacity)))
