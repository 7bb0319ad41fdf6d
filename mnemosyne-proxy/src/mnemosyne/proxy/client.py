"""The client side of the proxy protocol (no torch): connect, authenticate, call.

:class:`ProxyClient` gets one typed method per request from the generated
:class:`~mnemosyne.proxy._generated.stubs.ClientStub`. A dead proxy surfaces as
:class:`~mnemosyne.proxy.errors.ProxyUnavailableError` naming the socket and the request
that was outstanding, never as a silent wrong answer.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from pathlib import Path
from typing import TypeVar

from mnemosyne.core.env import MNEMOSYNE_JOB_ID, MNEMOSYNE_PROXY_SOCKET, MNEMOSYNE_TOKEN, env_str
from mnemosyne.core.errors import ConfigError, ProtocolError
from mnemosyne.proxy._generated.messages import Error, Map, MapReply, Message, Space, Welcome
from mnemosyne.proxy._generated.stubs import ClientStub
from mnemosyne.proxy._wire import PeerClosed, recv_frame, send_frame
from mnemosyne.proxy.errors import ProxyUnavailableError, error_from_code

__all__ = ["DEFAULT_TIMEOUT", "ProxyClient", "read_token", "resolve_socket"]

_R = TypeVar("_R")

#: Seconds a request may wait for its reply (a pull gets its own, longer limit).
DEFAULT_TIMEOUT = 60.0


def resolve_socket(path: str | os.PathLike[str] | None) -> str:
    """The proxy socket: ``path``, else ``$MNEMOSYNE_PROXY_SOCKET``.

    Raises:
        ConfigError: Neither is set.
    """
    found = str(path) if path else env_str(MNEMOSYNE_PROXY_SOCKET)
    if not found:
        msg = f"no proxy socket given and {MNEMOSYNE_PROXY_SOCKET} is not set"
        raise ConfigError(msg)
    return found


def read_token(token: str | None, socket_path: str | None = None) -> str:
    """The job token: ``token``, else ``$MNEMOSYNE_TOKEN``, else the ``token`` file next to the socket."""
    if token:
        return token
    found = env_str(MNEMOSYNE_TOKEN)
    if found:
        return found
    if socket_path and not socket_path.startswith("tcp:"):
        f = Path(socket_path).with_name("token")
        if f.is_file():
            return f.read_text().strip()
    msg = f"no job token: pass one, set {MNEMOSYNE_TOKEN}, or keep the proxy's token file next to its socket"
    raise ConfigError(msg)


class ProxyClient(ClientStub):
    """One authenticated connection to a proxy.

    Args:
        address: Unix socket path (``unix:`` prefix optional) or ``tcp:HOST:PORT`` (peers only).
        token: Job token (see :func:`read_token`).
        job: Job id; defaults to ``$MNEMOSYNE_JOB_ID`` or ``""``.
        role: ``trainer``, ``peer`` (read-only) or ``admin``.
        connect_timeout: Seconds to keep retrying while the proxy starts.
        timeout: Seconds each reply may take.
    """

    def __init__(self, address: str | os.PathLike[str] | None = None, token: str | None = None, job: str | None = None,
                 role: str = "trainer", connect_timeout: float = 10.0, timeout: float = DEFAULT_TIMEOUT) -> None:
        addr = resolve_socket(address)
        self.address = addr[5:] if addr.startswith("unix:") else addr
        self.is_unix = not self.address.startswith("tcp:")
        self.timeout = timeout
        self._lock = threading.Lock()
        self._next_id = 1
        self._fds: list[int] = []
        self.sock = self._connect(connect_timeout)
        try:
            job = job if job is not None else env_str(MNEMOSYNE_JOB_ID, "") or ""
            self.welcome: Welcome = self.hello(read_token(token, self.address), job, os.getpid(), role)
        except BaseException:
            self.sock.close()
            raise

    def _connect(self, connect_timeout: float) -> socket.socket:
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                if self.is_unix:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    target: str | tuple[str, int] = self.address
                else:
                    host, _, port = self.address[4:].rpartition(":")
                    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    target = (host.strip("[]"), int(port))
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(target)
                sock.settimeout(self.timeout)
                return sock
            except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    msg = f"no device proxy answers at {self.address} after {connect_timeout:.1f} s ({exc})"
                    raise ProxyUnavailableError(msg) from None
                time.sleep(0.02)
            except OSError as exc:
                sock.close()
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT) and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                msg = f"cannot connect to the device proxy at {self.address}: {exc}"
                raise ProxyUnavailableError(msg) from None

    def _call(self, request: Message, reply_type: type[_R]) -> _R:
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            what = type(request).__name__
            try:
                send_frame(self.sock, request, rid)
                reply, got_id, fds = recv_frame(self.sock, want_fds=self.is_unix and isinstance(request, Map))
            except PeerClosed as exc:
                msg = (f"the device proxy at {self.address} is gone ({exc}) while {what} was outstanding; "
                       "the state it held is lost unless a restarted proxy pulls it from a peer")
                raise ProxyUnavailableError(msg) from None
            except TimeoutError:
                msg = f"the device proxy at {self.address} did not answer {what} within {self.sock.gettimeout()} s"
                raise ProxyUnavailableError(msg) from None
            self._fds = fds
        if got_id != rid:
            msg = f"proxy answered request {got_id}, expected {rid} ({what})"
            raise ProtocolError(msg)
        if isinstance(reply, Error):
            raise error_from_code(reply.code, reply.message)
        if not isinstance(reply, reply_type):
            msg = f"proxy answered {what} with {type(reply).__name__}, expected {reply_type.__name__}"
            raise ProtocolError(msg)
        return reply

    def map_spaces(self) -> list[tuple[Space, int]]:
        """Ask for the arena's memory: each space with its file descriptor (the caller owns them)."""
        if not self.is_unix:
            msg = "memory can only be mapped over the proxy's Unix socket, not over TCP"
            raise ConfigError(msg)
        reply: MapReply = self.map()
        fds, self._fds = self._fds, []
        if len(fds) != len(reply.spaces):
            for fd in fds:
                os.close(fd)
            msg = f"proxy sent {len(fds)} descriptors for {len(reply.spaces)} memory spaces"
            raise ProtocolError(msg)
        return list(zip(reply.spaces, fds, strict=True))

    def call_with_timeout(self, timeout: float) -> _TimeoutScope:
        """Context manager that sets a longer reply timeout (e.g. around a pull)."""
        return _TimeoutScope(self, timeout)

    def close(self) -> None:
        """Close the connection (the proxy keeps the memory)."""
        self.sock.close()

    def __enter__(self) -> ProxyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TimeoutScope:
    def __init__(self, client: ProxyClient, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self.old = client.sock.gettimeout()

    def __enter__(self) -> None:
        self.client.sock.settimeout(self.timeout)

    def __exit__(self, *exc: object) -> None:
        self.client.sock.settimeout(self.old)

