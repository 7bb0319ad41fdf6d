"""Arena backends: the memory a proxy owns and hands to its trainer.

A backend is a subclass of :class:`Arena` registered under the entry-point group
``mnemosyne.proxy.arenas`` (``host``: memfd shared memory; ``cuda``: CUDA VMM with POSIX
file descriptors) and loaded by name with :func:`load_arena`. An arena has one or more
memory *spaces* (a cuda arena has its device memory and a small host space for CPU-side
scalars such as an optimizer's step counters); offsets in the handle table are per space.

The proxy process calls, in order: the constructor, :meth:`Arena.export_fds` for each
client that maps it, :meth:`Arena.checksum`/:meth:`Arena.read`/:meth:`Arena.write` and the
peer-copy methods while serving, and :meth:`Arena.close` when it stops.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from mnemosyne.core import plugins
from mnemosyne.core.errors import ConfigError
from mnemosyne.core.state import ARENAS_ENTRY_POINT

__all__ = ["BUILTIN", "Arena", "PeerMapping", "SpaceInfo", "load_arena"]


@dataclass(frozen=True)
class SpaceInfo:
    """One memory space: its kind (``host`` or ``cuda``), device (-1 for host) and size."""

    kind: str
    device: int
    capacity: int


class PeerMapping(ABC):
    """A peer proxy's exported memory mapped into this proxy (same-node pull)."""

    @abstractmethod
    def close(self) -> None:
        """Unmap the peer's memory."""


class Arena(ABC):
    """Memory owned by one proxy.

    Args:
        capacity: Bytes of the main space (device memory for ``cuda``).
        device: Device index (-1 for host memory).
        host_capacity: Bytes of the host side space, where a backend has one.
    """

    #: Backend name (the entry-point name).
    kind: str = ""
    #: How :meth:`checksum` computes (reported with pulls), e.g. ``"numba njit (host)"``.
    checksum_path: str = "numba njit (host)"

    def __init__(self, capacity: int, device: int = -1, host_capacity: int = 0) -> None:
        self.capacity = capacity
        self.device = device
        self.host_capacity = host_capacity

    @property
    @abstractmethod
    def spaces(self) -> list[SpaceInfo]:
        """The memory spaces, by space number."""

    @abstractmethod
    def export_fds(self, read_only: bool) -> list[int]:
        """New file descriptors (one per space) for a client; the caller closes them after sending."""

    @abstractmethod
    def checksum(self, space: int, offset: int, nbytes: int) -> int:
        """Checksum of ``nbytes`` at ``offset`` (see :mod:`mnemosyne.proxy.checksum`)."""

    @abstractmethod
    def read(self, space: int, offset: int, nbytes: int) -> bytes:
        """Copy bytes out (network pull, tests)."""

    @abstractmethod
    def write(self, space: int, offset: int, data: bytes | memoryview) -> None:
        """Copy bytes in (network pull)."""

    @abstractmethod
    def map_peer(self, fds: list[int], spaces: list[SpaceInfo]) -> PeerMapping:
        """Map a same-node peer's exported memory (its fds from a Map reply)."""

    @abstractmethod
    def copy_from_peer(self, peer: PeerMapping, space: int, src_offset: int, dst_offset: int, nbytes: int) -> None:
        """Copy from the peer's space into the same space of this arena."""

    def synchronize(self) -> None:  # noqa: B027 - optional hook, a no-op for host memory
        """Wait until queued copies are complete."""

    @abstractmethod
    def close(self) -> None:
        """Release the memory (mapped clients keep their own references)."""


#: The backends this package ships, usable even when it runs from a source tree without
#: installed entry points (e.g. the GPU benchmark run from a checkout).
BUILTIN = {"host": "mnemosyne.proxy.arena.host:HostArena", "cuda": "mnemosyne.proxy.arena.cuda:CudaArena"}


def load_arena(name: str) -> type[Arena]:
    """The arena class registered as ``name`` (``host``, ``cuda``)."""
    try:
        cls: Any = plugins.load(ARENAS_ENTRY_POINT, name)
    except ConfigError:
        if name not in BUILTIN:
            raise
        import importlib

        module, _, attr = BUILTIN[name].partition(":")
        cls = getattr(importlib.import_module(module), attr)
    return cls  # type: ignore[no-any-return]
