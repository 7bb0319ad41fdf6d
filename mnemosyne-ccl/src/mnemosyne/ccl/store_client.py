"""A client of the persistent store that implements :class:`mnemosyne.core.store.Store`.

Thread-safe: each request borrows an idle connection from a small pool (opening one when
none is idle), so a ``get`` blocked in one thread never delays another thread's ``set``.
Every request has a deadline; a dead or unreachable server raises
:class:`~mnemosyne.core.errors.StoreError` instead of hanging.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from mnemosyne.ccl import _wire
from mnemosyne.core import errors
from mnemosyne.core.env import MNEMOSYNE_JOB_ID, MNEMOSYNE_STORE_ADDR, MNEMOSYNE_TOKEN, env_str
from mnemosyne.core.errors import ConfigError, StoreError
from mnemosyne.core.store import PrefixStore, Store

__all__ = ["StoreClient", "parse_addr"]

# Error names the server may answer with; anything else is reported as a StoreError.
_ERRORS: dict[str, type[errors.MnemosyneError]] = {
    name: getattr(errors, name)
    for name in ("AuthError", "ConfigError", "ProtocolError", "StaleEpochError", "StoreError", "StoreTimeout")
}
# Slack added to a request's own timeout before the socket gives up on the server.
_SLACK_S = 10.0


def parse_addr(addr: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` allowed).

    Raises:
        ConfigError: ``addr`` is not ``host:port`` with a valid port.
    """
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        msg = f"store address {addr!r}: expected host:port (e.g. 127.0.0.1:29700)"
        raise ConfigError(msg)
    return host.strip("[]"), int(port)


class StoreClient:
    """Talks to a :class:`~mnemosyne.ccl.store_server.StoreServer` for one job.

    Args:
        addr: ``host:port`` of the server.
        job: Job id; every key lives in this job's namespace on the server.
        token: The job's token.
        timeout: Default timeout in seconds for ``get``/``wait`` called without one, and
            for connecting.
        world_size: If given, the server refuses this client when the job declared
            another size.
        epoch: If given, the server refuses this client (and later its writes) once the
            job's fence epoch is newer (see the server's docs).

    Raises:
        StoreError: The server is unreachable.
        AuthError: Wrong job or token.
    """

    def __init__(
        self,
        addr: str,
        job: str,
        token: str,
        *,
        timeout: float = 60.0,
        world_size: int | None = None,
        epoch: int | None = None,
    ) -> None:
        self.addr = addr
        self.host, self.port = parse_addr(addr)
        self.job = job
        self._token = token
        self.timeout = timeout
        self._world_size = world_size
        self._epoch = epoch
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        with self._conn():  # fail now, not at first use, if the address or token is wrong
            pass

    @classmethod
    def from_env(cls, **kwargs: Any) -> StoreClient:
        """Build from ``MNEMOSYNE_STORE_ADDR``, ``MNEMOSYNE_JOB_ID`` and ``MNEMOSYNE_TOKEN``."""
        addr, job, token = env_str(MNEMOSYNE_STORE_ADDR), env_str(MNEMOSYNE_JOB_ID), env_str(MNEMOSYNE_TOKEN)
        missing = [n for n, v in ((MNEMOSYNE_STORE_ADDR, addr), (MNEMOSYNE_JOB_ID, job), (MNEMOSYNE_TOKEN, token))
                   if not v]
        if missing:
            msg = f"cannot reach the job's store: environment variables {missing} are not set"
            raise ConfigError(msg)
        assert addr is not None and job is not None and token is not None
        return cls(addr, job, token, **kwargs)

    # -- connections -------------------------------------------------------------

    def _open(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            msg = f"cannot connect to the store at {self.addr}: {exc}"
            raise StoreError(msg) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello: dict[str, Any] = {"op": "hello", "version": _wire.PROTOCOL_VERSION, "job": self.job,
                                 "token": self._token}
        if self._world_size is not None:
            hello["world_size"] = self._world_size
        if self._epoch is not None:
            hello["epoch"] = self._epoch
        try:
            self._roundtrip(sock, hello, b"", self.timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    @contextlib.contextmanager
    def _conn(self) -> Iterator[socket.socket]:
        if self._closed:
            msg = f"store client for {self.addr} is closed"
            raise StoreError(msg)
        with self._lock:
            sock = self._idle.pop() if self._idle else None
        if sock is None:
            sock = self._open()
        ok = False
        try:
            yield sock
            ok = True
        finally:
            if ok and not self._closed:
                with self._lock:
                    self._idle.append(sock)
            else:
                sock.close()

    def _roundtrip(self, sock: socket.socket, header: dict[str, Any], body: bytes,
                   wait_s: float) -> tuple[dict[str, Any], bytes]:
        sock.settimeout(wait_s + _SLACK_S)
        try:
            sock.sendall(_wire.encode(header, body))
            answer, out = _wire.recv_frame(sock)
        except (OSError, ConnectionError) as exc:
            msg = f"store at {self.addr} failed during {header.get('op')!r}: {exc}"
            raise StoreError(msg) from None
        if not answer.get("ok"):
            cls = _ERRORS.get(str(answer.get("error")), StoreError)
            raise cls(str(answer.get("msg", "store error")))
        return answer, out

    def _request(self, header: dict[str, Any], body: bytes = b"", wait_s: float = 0.0) -> tuple[dict[str, Any], bytes]:
        with self._conn() as sock:
            return self._roundtrip(sock, header, body, wait_s)

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else float(timeout)

    # -- Store protocol ----------------------------------------------------------

    def set(self, key: str, value: bytes) -> None:
        """See :meth:`mnemosyne.core.store.Store.set`."""
        self._request({"op": "set", "key": key}, bytes(value))

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """See :meth:`mnemosyne.core.store.Store.get` (``None``: the client's default timeout)."""
        t = self._timeout(timeout)
        return self._request({"op": "get", "key": key, "timeout": t}, b"", t)[1]

    def add(self, key: str, amount: int) -> int:
        """See :meth:`mnemosyne.core.store.Store.add`."""
        return int(self._request({"op": "add", "key": key, "amount": int(amount)})[0]["value"])

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """See :meth:`mnemosyne.core.store.Store.compare_set`."""
        expected = bytes(expected)
        return self._request({"op": "cas", "key": key, "elen": len(expected)}, expected + bytes(desired))[1]

    def wait(self, keys: Sequence[str], timeout: float | None = None) -> None:
        """See :meth:`mnemosyne.core.store.Store.wait`."""
        t = self._timeout(timeout)
        self._request({"op": "wait", "keys": list(keys), "timeout": t}, b"", t)

    def check(self, keys: Sequence[str]) -> bool:
        """See :meth:`mnemosyne.core.store.Store.check`."""
        return bool(self._request({"op": "check", "keys": list(keys)})[0]["value"])

    def delete(self, key: str) -> bool:
        """See :meth:`mnemosyne.core.store.Store.delete`."""
        return bool(self._request({"op": "delete", "key": key})[0]["value"])

    def prefixed(self, prefix: str) -> Store:
        """See :meth:`mnemosyne.core.store.Store.prefixed`."""
        return PrefixStore(prefix, self)

    # -- extras ------------------------------------------------------------------

    def fence(self, epoch: int) -> int:
        """Advance the job's fence epoch to at least ``epoch``; return the fence now."""
        return int(self._request({"op": "fence", "epoch": int(epoch)})[0]["value"])

    def declare_epoch(self, epoch: int) -> None:
        """Declare this client's epoch on every pooled connection and new ones.

        Raises:
            StaleEpochError: ``epoch`` is older than the job's fence.
        """
        self._epoch = int(epoch)
        with self._lock:
            socks, self._idle = self._idle, []
        for s in socks:
            s.close()
        self._request({"op": "epoch", "epoch": self._epoch})

    def ping(self) -> int:
        """Round trip to the server; return how many keys the job holds."""
        return int(self._request({"op": "ping"})[0]["value"])

    def close(self) -> None:
        """Close every pooled connection."""
        self._closed = True
        with self._lock:
            socks, self._idle = self._idle, []
        for s in socks:
            s.close()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StoreClient({self.addr!r}, job={self.job!r})"

