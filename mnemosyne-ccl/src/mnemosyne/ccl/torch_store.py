"""A ``torch.distributed.Store`` that forwards to any Mnemosyne :class:`~mnemosyne.core.store.Store`.

torch's ProcessGroupGloo (and torch.distributed in general) bootstraps from a
``torch.distributed.Store``. This adapter lets it bootstrap from the persistent store
server (or any core Store), under the communicator's own epoch prefix. Blocking waits are
cut into short slices so that an ``interrupt`` callback (the communicator's abort flag and
the epoch's abort key) can stop a group construction that will never complete.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence

import torch.distributed as dist

from mnemosyne.core.errors import CommAborted, StoreTimeout
from mnemosyne.core.store import Store

__all__ = ["TorchStore"]

_SLICE_S = 0.2


class TorchStore(dist.Store):  # type: ignore[misc,name-defined]
    """Adapter from a core Store to ``torch.distributed.Store``.

    Args:
        inner: The store (usually already prefixed by the communicator's epoch).
        timeout: Seconds a ``get``/``wait`` may block.
        interrupt: Called between wait slices; returns a reason to give up (raises
            :class:`CommAborted`) or None to keep waiting.
    """

    def __init__(self, inner: Store, timeout: float, interrupt: Callable[[], str | None] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self._timeout_s = timeout
        self._interrupt = interrupt
        self.set_timeout(datetime.timedelta(seconds=timeout))

    def _wait(self, keys: Sequence[str], timeout: float | None) -> None:
        limit = self._timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                self.inner.wait(list(keys), max(0.0, min(_SLICE_S, deadline - time.monotonic())))
                return
            except StoreTimeout:
                if time.monotonic() >= deadline:
                    raise
            if self._interrupt is not None:
                reason = self._interrupt()
                if reason is not None:
                    msg = f"bootstrap wait for {list(keys)} interrupted: {reason}"
                    raise CommAborted(msg)

    def set(self, key: str, value: bytes | str) -> None:
        """Store ``value`` (torch passes str or bytes)."""
        self.inner.set(key, value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key: str) -> bytes:
        """Wait for ``key`` (interruptibly) and return its value."""
        self._wait([key], None)
        return self.inner.get(key, self._timeout_s)

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        """Wait for every key (interruptibly)."""
        self._wait(keys, None if timeout is None else timeout.total_seconds())

    def add(self, key: str, amount: int) -> int:
        """Atomic add."""
        return self.inner.add(key, int(amount))

    def check(self, keys: list[str]) -> bool:
        """Whether every key exists."""
        return self.inner.check(keys)

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        """Compare-and-set (torch semantics match core's)."""
        e = expected.encode() if isinstance(expected, str) else bytes(expected)
        d = desired.encode() if isinstance(desired, str) else bytes(desired)
        return self.inner.compare_set(key, e, d)

    def delete_key(self, key: str) -> bool:
        """Delete ``key``."""
        return self.inner.delete(key)
