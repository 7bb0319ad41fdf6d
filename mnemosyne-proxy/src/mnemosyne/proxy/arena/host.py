"""The ``host`` arena: memfd shared memory, for CPU training (and the tests).

The proxy creates an anonymous memory file, sizes it (pages are only allocated when
touched) and maps it; a trainer receives a descriptor of the same file over the Unix
socket and maps it too, so both see the same bytes. A peer gets a read-only descriptor
(reopened through ``/proc/self/fd``), so a pulling proxy cannot write into its donor.
The memory lives as long as some process holds the file: when the proxy dies, a trainer's
mapping keeps its own view alive but a restarted proxy starts with a new, empty file.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from mnemosyne.core.errors import ConfigError
from mnemosyne.proxy.arena import Arena, PeerMapping, SpaceInfo
from mnemosyne.proxy.checksum import checksum_bytes

__all__ = ["HostArena", "HostPeerMapping"]


class HostPeerMapping(PeerMapping):
    """A peer's host arena, mapped read-only."""

    def __init__(self, fd: int, size: int) -> None:
        self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self.view = np.frombuffer(self.mm, dtype=np.uint8)

    def close(self) -> None:
        """Unmap."""
        del self.view
        self.mm.close()


class HostArena(Arena):
    """memfd shared memory (one space).

    Args:
        capacity: Bytes.
        device: Ignored (-1): host memory.
        host_capacity: Ignored: the whole arena is host memory.
    """

    kind = "host"

    def __init__(self, capacity: int, device: int = -1, host_capacity: int = 0) -> None:
        if capacity <= 0:
            msg = f"host arena capacity must be > 0 bytes, got {capacity}"
            raise ConfigError(msg)
        super().__init__(capacity, -1, 0)
        self.fd = os.memfd_create("mnemosyne-arena", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, capacity)
        self.mm = mmap.mmap(self.fd, capacity, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = np.frombuffer(self.mm, dtype=np.uint8)

    @property
    def spaces(self) -> list[SpaceInfo]:
        """One host space."""
        return [SpaceInfo("host", -1, self.capacity)]

    def export_fds(self, read_only: bool) -> list[int]:
        """A new descriptor of the memory file (read-only for peers)."""
        if read_only:
            return [os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)]
        return [os.dup(self.fd)]

    def _check(self, space: int, offset: int, nbytes: int) -> None:
        if space != 0 or offset < 0 or nbytes < 0 or offset + nbytes > self.capacity:
            msg = f"range space={space} [{offset}, {offset + nbytes}) is outside the host arena ({self.capacity} bytes)"
            raise ConfigError(msg)

    def checksum(self, space: int, offset: int, nbytes: int) -> int:
        """Checksum with numba njit."""
        self._check(space, offset, nbytes)
        return checksum_bytes(self.view[offset : offset + nbytes])

    def read(self, space: int, offset: int, nbytes: int) -> bytes:
        """Copy bytes out."""
        self._check(space, offset, nbytes)
        return self.view[offset : offset + nbytes].tobytes()

    def write(self, space: int, offset: int, data: bytes | memoryview) -> None:
        """Copy bytes in."""
        self._check(space, offset, len(data))
        self.view[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def map_peer(self, fds: list[int], spaces: list[SpaceInfo]) -> PeerMapping:
        """Map a peer's host arena read-only."""
        if len(fds) != 1 or len(spaces) != 1 or spaces[0].kind != "host":
            msg = f"peer exports {[s.kind for s in spaces]} spaces; a host arena can only pull from a host arena"
            raise ConfigError(msg)
        return HostPeerMapping(fds[0], spaces[0].capacity)

    def copy_from_peer(self, peer: PeerMapping, space: int, src_offset: int, dst_offset: int, nbytes: int) -> None:
        """Memcpy from the peer's mapping."""
        assert isinstance(peer, HostPeerMapping)
        self._check(space, dst_offset, nbytes)
        self.view[dst_offset : dst_offset + nbytes] = peer.view[src_offset : src_offset + nbytes]

    def close(self) -> None:
        """Unmap and close the file (clients keep their mappings)."""
        del self.view
        self.mm.close()
        os.close(self.fd)
