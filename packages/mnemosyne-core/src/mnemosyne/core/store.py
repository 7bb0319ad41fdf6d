"""The key-value store protocol that bootstraps communicators and carries control state.

Every Mnemosyne process talks to one persistent store per job (a TCPStore hosted by the
launcher, never by a trainer, so it outlives any rank). Keys are namespaced by job and
epoch through :meth:`Store.prefixed`; a communicator rebuilt at epoch ``e`` reads only keys
under its own epoch's prefix, never a previous epoch's (see FACTS: torchrun's store reuse).

Semantics every implementation must keep:

* ``get`` blocks until the key exists or the timeout passes (:class:`StoreTimeout`).
* ``add`` creates the key at 0 then adds atomically and returns the new value.
* ``compare_set`` sets ``desired`` only if the current value equals ``expected``
  (``expected == b""`` means "key absent") and returns the value now stored.
* Values are bytes; structured values are JSON, never pickle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from mnemosyne.core.errors import CommAborted, ConfigError, MnemosyneError, StoreTimeout

__all__ = ["DictStore", "PrefixStore", "Store", "wait_key", "wait_until"]


@runtime_checkable
class Store(Protocol):
    """A blocking key-value store shared by every process of one job."""

    def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``, waking waiters."""
        ...

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """Return the value, waiting up to ``timeout`` seconds for the key to appear."""
        ...

    def add(self, key: str, amount: int) -> int:
        """Atomically add ``amount`` to the integer under ``key``; return the result."""
        ...

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """Set ``desired`` if the value equals ``expected``; return the stored value."""
        ...

    def wait(self, keys: Sequence[str], timeout: float | None = None) -> None:
        """Block until every key exists, or raise :class:`StoreTimeout`."""
        ...

    def check(self, keys: Sequence[str]) -> bool:
        """Return whether every key exists, without blocking."""
        ...

    def delete(self, key: str) -> bool:
        """Delete ``key``; return whether it existed."""
        ...

    def prefixed(self, prefix: str) -> Store:
        """Return a view of this store where every key is under ``prefix/``."""
        ...


class PrefixStore:
    """A :class:`Store` view that prepends ``prefix/`` to every key of an inner store.

    Args:
        prefix: Namespace, e.g. ``"job42/epoch3"``. Must be non-empty and not end in "/".
        inner: The store to forward to.
    """

    def __init__(self, prefix: str, inner: Store) -> None:
        if not prefix or prefix.endswith("/"):
            msg = f"store prefix must be non-empty and not end with '/', got {prefix!r}"
            raise ConfigError(msg)
        self.prefix = prefix
        self.inner = inner

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def set(self, key: str, value: bytes) -> None:
        """See :meth:`Store.set`."""
        self.inner.set(self._k(key), value)

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """See :meth:`Store.get`."""
        return self.inner.get(self._k(key), timeout)

    def add(self, key: str, amount: int) -> int:
        """See :meth:`Store.add`."""
        return self.inner.add(self._k(key), amount)

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """See :meth:`Store.compare_set`."""
        return self.inner.compare_set(self._k(key), expected, desired)

    def wait(self, keys: Sequence[str], timeout: float | None = None) -> None:
        """See :meth:`Store.wait`."""
        self.inner.wait([self._k(k) for k in keys], timeout)

    def check(self, keys: Sequence[str]) -> bool:
        """See :meth:`Store.check`."""
        return self.inner.check([self._k(k) for k in keys])

    def delete(self, key: str) -> bool:
        """See :meth:`Store.delete`."""
        return self.inner.delete(self._k(key))

    def prefixed(self, prefix: str) -> Store:
        """See :meth:`Store.prefixed`."""
        return PrefixStore(self._k(prefix), self.inner)


class DictStore:
    """A thread-safe in-process :class:`Store` (one process, many threads).

    Useful for single-process use of the jit runtime and for unit tests of store users;
    multi-process jobs use the TCP store from mnemosyne-ccl.
    """

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._cond = threading.Condition()

    def set(self, key: str, value: bytes) -> None:
        """See :meth:`Store.set`."""
        with self._cond:
            self._data[key] = bytes(value)
            self._cond.notify_all()

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """See :meth:`Store.get`."""
        self.wait([key], timeout)
        with self._cond:
            return self._data[key]

    def add(self, key: str, amount: int) -> int:
        """See :meth:`Store.add`."""
        with self._cond:
            value = int(self._data.get(key, b"0")) + amount
            self._data[key] = str(value).encode()
            self._cond.notify_all()
            return value

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """See :meth:`Store.compare_set`."""
        with self._cond:
            current = self._data.get(key)
            if (current is None and expected == b"") or current == expected:
                self._data[key] = bytes(desired)
                self._cond.notify_all()
                return bytes(desired)
            return current if current is not None else b""

    def wait(self, keys: Sequence[str], timeout: float | None = None) -> None:
        """See :meth:`Store.wait`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not all(k in self._data for k in keys):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    missing = [k for k in keys if k not in self._data]
                    msg = f"store keys {missing} did not appear within {timeout} s"
                    raise StoreTimeout(msg)
                self._cond.wait(left)

    def check(self, keys: Sequence[str]) -> bool:
        """See :meth:`Store.check`."""
        with self._cond:
            return all(k in self._data for k in keys)

    def delete(self, key: str) -> bool:
        """See :meth:`Store.delete`."""
        with self._cond:
            return self._data.pop(key, None) is not None

    def prefixed(self, prefix: str) -> Store:
        """See :meth:`Store.prefixed`."""
        return PrefixStore(prefix, self)


def wait_until(done: Callable[[], bool], interrupt: threading.Event | None, timeout: float, what: str, *,
               late: Callable[[], str] | None = None, error: type[MnemosyneError] = StoreTimeout,
               pause: float = 0.0005, max_pause: float = 0.01) -> None:
    """Poll ``done`` until it is true, in short slices so that ``interrupt`` ends the wait at once.

    The one interruptible wait of recovery code: a trainer's waits on its peers (store keys,
    rendezvous counters, a group being built) all go through it, so that a newer
    membership epoch (``interrupt``, set by the watchdog) stops every one of them.

    Args:
        done: The condition.
        interrupt: Ends the wait when set (None: only the timeout does).
        timeout: Seconds.
        what: What is awaited, for the messages.
        late: Says, at the timeout, what is missing (default: "not done within T s").
        error: Class raised at the timeout.
        pause: First pause between polls (0: do not sleep; ``done`` blocks by itself).
        max_pause: Pauses double up to this.

    Raises:
        CommAborted: ``interrupt`` was set (a newer epoch exists).
        MnemosyneError: ``error``, after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not done():
        if interrupt is not None and interrupt.is_set():
            msg = f"{what} interrupted by a newer epoch"
            raise CommAborted(msg)
        if time.monotonic() > deadline:
            msg = f"{what}: {late() if late is not None else f'not done within {timeout} s'}"
            raise error(msg)
        if pause:
            time.sleep(pause)
            pause = min(pause * 2, max_pause)


def wait_key(store: Store, key: str, interrupt: threading.Event | None, timeout: float, *,
             error: type[MnemosyneError] = StoreTimeout) -> bytes:
    """Get ``key`` once it is set, through :func:`wait_until` (interruptible).

    Raises:
        CommAborted: ``interrupt`` was set.
        MnemosyneError: ``error``, when the key did not appear within ``timeout`` seconds
            (or vanished between the check and the read).
    """
    wait_until(lambda: store.check([key]), interrupt, timeout, f"waiting for {key!r}",
               late=lambda: f"store key {key!r} did not appear within {timeout} s", error=error)
    try:
        return store.get(key, 5.0)
    except StoreTimeout as exc:  # deleted between check and get: treat as missing
        msg = f"store key {key!r} vanished"
        raise error(msg) from exc
