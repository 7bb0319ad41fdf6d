"""The job's store: mnemosyne-ccl's authenticated server, or torch's TCPStore as fallback.

The launcher hosts the store (:func:`host_job_store`); trainers, spares and ``mnemo
inject`` connect with :func:`connect_job_store`. Both return a view scoped to the job.

* mnemosyne-ccl installed (see :mod:`mnemosyne.jit._select`): ccl's ``StoreServer``
  (loopback, this job only) and its ``StoreClient``; every connection presents the job id
  and the per-job token, a wrong one is refused with ``AuthError``.
* Fallback: torch's TCPStore through :class:`TorchStore`, which gives it the core Store
  semantics. torch's TCPStore has no authentication: keys are namespaced by job id and
  the store listens on loopback unless told otherwise (a documented limit).

A torch store client serialises its requests: a thread blocked in ``wait`` holds the
connection. Each thread therefore uses its own client (:meth:`TorchStore.clone`).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from typing import Any

from mnemosyne.core.errors import ConfigError, StoreError, StoreTimeout
from mnemosyne.core.store import PrefixStore, Store

__all__ = ["JobStoreHost", "TorchStore", "connect_job_store", "connect_store", "host_job_store", "host_store",
           "parse_addr"]

# Long default so that a slow but healthy operation never fails; every caller that may
# block passes its own bounded timeout.
_DEFAULT_TIMEOUT = datetime.timedelta(seconds=600)


def parse_addr(addr: str) -> tuple[str, int]:
    """Split ``host:port``.

    Raises:
        ConfigError: ``addr`` is not ``host:port`` with a port in 0..65535.
    """
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        msg = f"store address {addr!r}: expected host:port"
        raise ConfigError(msg)
    if not 0 <= int(port) <= 65535:
        msg = f"store address {addr!r}: port {int(port)} is outside 0..65535"
        raise ConfigError(msg)
    return host, int(port)


class TorchStore:
    """Core :class:`Store` semantics over a ``torch.distributed.TCPStore``.

    Args:
        torch_store: The TCPStore (server or client side).
    """

    def __init__(self, torch_store: object) -> None:
        self.torch_store = torch_store

    @property
    def addr(self) -> str:
        """``host:port`` of the store server."""
        ts = self.torch_store
        return f"{ts.host}:{ts.port}"  # type: ignore[attr-defined]

    def clone(self) -> TorchStore:
        """Return a new client connection to the same server (one per thread)."""
        return TorchStore(self.torch_store.clone())  # type: ignore[attr-defined]

    def set(self, key: str, value: bytes) -> None:
        """See :meth:`Store.set`."""
        try:
            self.torch_store.set(key, value)  # type: ignore[attr-defined]
        except RuntimeError as exc:
            msg = f"store set {key!r} failed: {exc}"
            raise StoreError(msg) from exc

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """See :meth:`Store.get`."""
        self.wait([key], timeout)
        try:
            return bytes(self.torch_store.get(key))  # type: ignore[attr-defined]
        except RuntimeError as exc:
            msg = f"store get {key!r} failed: {exc}"
            raise StoreError(msg) from exc

    def add(self, key: str, amount: int) -> int:
        """See :meth:`Store.add`."""
        try:
            return int(self.torch_store.add(key, amount))  # type: ignore[attr-defined]
        except RuntimeError as exc:
            msg = f"store add {key!r} failed: {exc}"
            raise StoreError(msg) from exc

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """See :meth:`Store.compare_set`."""
        try:
            return bytes(self.torch_store.compare_set(key, expected, desired))  # type: ignore[attr-defined]
        except RuntimeError as exc:
            msg = f"store compare_set {key!r} failed: {exc}"
            raise StoreError(msg) from exc

    def wait(self, keys: Sequence[str], timeout: float | None = None) -> None:
        """See :meth:`Store.wait`.

        A bounded wait polls :meth:`check` with a short backoff instead of torch's timed
        wait, whose every timeout logs C++ warnings and which cannot be interrupted.
        """
        keys = list(keys)
        if timeout is None:
            try:
                self.torch_store.wait(keys, _DEFAULT_TIMEOUT)  # type: ignore[attr-defined]
            except RuntimeError as exc:
                msg = f"store wait {keys} failed: {exc}"
                raise StoreError(msg) from exc
            return
        deadline = time.monotonic() + timeout
        pause = 0.0005
        while not self.check(keys):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [k for k in keys if not self.check([k])]
                msg = f"store keys {missing} did not appear within {timeout} s"
                raise StoreTimeout(msg)
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.02)

    def check(self, keys: Sequence[str]) -> bool:
        """See :meth:`Store.check`."""
        try:
            return bool(self.torch_store.check(list(keys)))  # type: ignore[attr-defined]
        except RuntimeError as exc:
            msg = f"store check {list(keys)} failed: {exc}"
            raise StoreError(msg) from exc

    def delete(self, key: str) -> bool:
        """See :meth:`Store.delete`."""
        try:
            return bool(self.torch_store.delete_key(key))  # type: ignore[attr-defined]
        except RuntimeError as exc:
            msg = f"store delete {key!r} failed: {exc}"
            raise StoreError(msg) from exc

    def prefixed(self, prefix: str) -> Store:
        """See :meth:`Store.prefixed`."""
        return PrefixStore(prefix, self)


def host_store(host: str = "127.0.0.1", port: int = 0) -> TorchStore:
    """Start a store server in this process (the launcher) and return a client over it."""
    import torch.distributed as dist

    ts = dist.TCPStore(host, port, None, True, _DEFAULT_TIMEOUT, wait_for_workers=False)  # type: ignore[attr-defined]
    return TorchStore(ts)


def connect_store(addr: str, timeout: float = 60.0) -> TorchStore:
    """Connect to the store at ``host:port``.

    Raises:
        StoreError: The server could not be reached within ``timeout`` seconds.
    """
    import torch.distributed as dist

    host, port = parse_addr(addr)
    try:
        td = datetime.timedelta(seconds=timeout)
        ts = dist.TCPStore(host, port, None, False, td, wait_for_workers=False)  # type: ignore[attr-defined]
    except RuntimeError as exc:
        msg = f"cannot connect to the job's store at {addr}: {exc}"
        raise StoreError(msg) from exc
    ts.set_timeout(_DEFAULT_TIMEOUT)
    return TorchStore(ts)


class JobStoreHost:
    """The store server the agent hosts for one job, and the agent's own client of it.

    Attributes:
        addr: ``host:port`` clients connect to.
        store: The agent's job-scoped client.
        kind: ``"ccl"`` or ``"torch"``.
    """

    def __init__(self, addr: str, store: Store, kind: str, server: Any = None) -> None:
        self.addr = addr
        self.store = store
        self.kind = kind
        self._server = server

    def stop(self) -> None:
        """Stop the server (ccl); torch's TCPStore server ends with the process."""
        if self._server is not None:
            self._server.stop()
            self._server = None


def host_job_store(job: str, token: str, host: str = "127.0.0.1", port: int = 0) -> JobStoreHost:
    """Start the job's store server in this process (the launcher) on ``host:port`` (0: any free port)."""
    from mnemosyne.jit._select import use_ccl

    if use_ccl():
        from mnemosyne.ccl import StoreClient, StoreServer

        server = StoreServer(host=host, port=port, jobs={job: token}).start()
        return JobStoreHost(server.address, StoreClient(server.address, job, token), "ccl", server)
    ts = host_store(host, port)
    return JobStoreHost(ts.addr, ts.prefixed(job), "torch")


def connect_job_store(addr: str, job: str, token: str | None, timeout: float = 60.0, kind: str | None = None) -> Store:
    """Connect to the job's store and return a view scoped to the job.

    Each call opens a new client (one per thread that may block in the store). ``kind``
    (``"ccl"`` or ``"torch"``, from the job's info file) overrides this process's choice.

    Raises:
        StoreError: The server could not be reached.
        AuthError: (ccl store) wrong job id or token.
    """
    from mnemosyne.jit._select import use_ccl

    if (kind == "ccl") if kind else use_ccl():
        from mnemosyne.ccl import StoreClient

        if not token:
            msg = "the job's store needs the job token (MNEMOSYNE_TOKEN is not set)"
            raise ConfigError(msg)
        return StoreClient(addr, job, token, timeout=timeout)
    return connect_store(addr, timeout).prefixed(job)
