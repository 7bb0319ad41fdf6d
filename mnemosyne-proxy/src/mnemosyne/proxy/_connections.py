"""The proxy's connection loop: one thread, one non-blocking ``selectors`` loop.

:class:`ConnectionLoop` owns the listening sockets (a 0600 Unix socket, optionally a TCP
port), one :class:`Conn` per client with its own receive buffer (a client that sends a frame
byte by byte never blocks another), and the deadlines: a new connection has
:data:`HELLO_TIMEOUT` seconds to send its first frame, a frame that started arriving has
:data:`FRAME_TIMEOUT` seconds to complete; an overdue, malformed or oversized
(pre-authentication) frame gets one ``Error`` reply and the connection is closed. What a
request means is the subclass's business (:meth:`ConnectionLoop._respond`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from mnemosyne.core.errors import ConfigError, MnemosyneError, ProtocolError
from mnemosyne.proxy._generated.messages import FRAME, Error, Message, decode_payload, parse_header
from mnemosyne.proxy._wire import PeerClosed, send_frame
from mnemosyne.proxy.errors import ProxyError, error_code

__all__ = ["FRAME_TIMEOUT", "HELLO_TIMEOUT", "MAX_PREAUTH_PAYLOAD", "Conn", "ConnectionLoop", "split_listen"]

logger = logging.getLogger("mnemosyne.proxy.server")

#: Seconds one frame may take to arrive once its first byte came (and a reply to leave).
FRAME_TIMEOUT = 10.0
#: Seconds a new connection has to send its Hello.
HELLO_TIMEOUT = 5.0
#: Largest frame payload before the Hello was accepted (a Hello is well under 1 KiB).
MAX_PREAUTH_PAYLOAD = 4096


def split_listen(where: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) of ``--peer-listen``.

    Raises:
        ConfigError: Not ``HOST:PORT`` with a port in 0..65535.
    """
    host, sep, port = where.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        msg = f"--peer-listen {where!r}: expected HOST:PORT with a port in 0..65535 (e.g. 127.0.0.1:0)"
        raise ConfigError(msg)
    return host.strip("[]"), int(port)


@dataclass
class Conn:
    """One client connection and what the loop knows of it."""

    sock: socket.socket
    unix: bool
    authed: bool = False
    role: str = ""
    pid: int = 0
    fds_out: list[int] = field(default_factory=list)
    # Bytes received but not yet a whole frame: the loop reads what is there and moves on,
    # so a client that sends a frame byte by byte never blocks another client.
    buf: bytearray = field(default_factory=bytearray)
    since: float = field(default_factory=time.monotonic)  # accepted, or first byte of the pending frame


class ConnectionLoop:
    """Listening sockets, per-connection buffers and deadlines; requests go to :meth:`_respond`.

    Args:
        state_dir: Folder that holds the Unix socket (and ``peer.addr`` once a TCP port is bound).
    """

    def __init__(self, state_dir: Path) -> None:
        self.socket_path = state_dir / "proxy.sock"
        self.peer_address: str | None = None
        self._peer_addr_file = state_dir / "peer.addr"
        self._sel = selectors.DefaultSelector()
        self._listeners: list[socket.socket] = []
        self._stop = False

    # ---- hooks ---------------------------------------------------------------------------
    def _respond(self, conn: Conn, request: Message) -> Message:
        """The reply to one request (raise a :class:`MnemosyneError` to answer ``Error``)."""
        raise NotImplementedError

    def _dropped(self, conn: Conn) -> None:
        """Called once a connection was closed."""

    def close(self) -> None:
        """Close every socket and remove the Unix socket file."""
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()
        if self.socket_path.exists():
            self.socket_path.unlink()

    # ---- listening -----------------------------------------------------------------------
    def _bind_unix(self) -> None:
        path = str(self.socket_path)
        if len(path.encode()) >= 104:
            msg = f"proxy socket path {path!r} is too long for a Unix socket (keep it under 104 bytes)"
            raise ConfigError(msg)
        if self.socket_path.exists():
            self.socket_path.unlink()  # a previous generation's socket: nobody is listening on it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is born 0600: no window where others can connect
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self._listeners.append(sock)
        self._sel.register(sock, selectors.EVENT_READ, ("listen", True))

    def _bind_tcp(self, where: str) -> None:
        host, port = split_listen(where)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            msg = f"--peer-listen {where}: cannot listen there ({exc.strerror or exc})"
            raise ConfigError(msg) from None
        sock.listen(16)
        sock.setblocking(False)
        bound = sock.getsockname()
        self.peer_address = f"tcp:{bound[0]}:{bound[1]}"
        self._peer_addr_file.write_text(self.peer_address + "\n")
        self._listeners.append(sock)
        self._sel.register(sock, selectors.EVENT_READ, ("listen", False))

    def serve_forever(self, install_signals: bool = True) -> None:
        """Serve until SIGTERM/SIGINT or a Shutdown request, then release everything."""
        if install_signals:
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
        try:
            while not self._stop:
                for key, _ in self._sel.select(timeout=0.2):
                    kind, data = key.data
                    if kind == "listen":
                        self._accept(key.fileobj, data)  # type: ignore[arg-type]
                    else:
                        self._serve_one(data)
                self._expire(time.monotonic())
        finally:
            self.close()

    def stop(self) -> None:
        """Ask the loop to end."""
        self._stop = True

    # ---- connections ---------------------------------------------------------------------
    def _accept(self, lsock: socket.socket, unix: bool) -> None:
        try:
            sock, _ = lsock.accept()
        except BlockingIOError:
            return
        if unix:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.getuid():
                logger.warning("refused a connection from uid %d (proxy runs as uid %d)", uid, os.getuid())
                sock.close()
                return
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(True)
        sock.settimeout(FRAME_TIMEOUT)
        self._sel.register(sock, selectors.EVENT_READ, ("conn", Conn(sock, unix)))

    def _drop(self, conn: Conn) -> None:
        if conn.sock.fileno() < 0:
            return  # already dropped
        self._sel.unregister(conn.sock)
        conn.sock.close()
        self._dropped(conn)

    def _expire(self, now: float) -> None:
        """Drop connections whose Hello or pending frame is overdue (slow or silent peers)."""
        for key in list(self._sel.get_map().values()):
            kind, conn = key.data
            if kind != "conn":
                continue
            if not conn.authed and now - conn.since > HELLO_TIMEOUT:
                why = f"no Hello within {HELLO_TIMEOUT:g} s"
            elif conn.buf and now - conn.since > FRAME_TIMEOUT:
                why = f"a frame took more than {FRAME_TIMEOUT:g} s ({len(conn.buf)} bytes so far)"
            else:
                continue
            logger.warning("dropping a %s connection: %s", "unix" if conn.unix else "tcp", why)
            self._reply_error(conn, 0, ProtocolError(why))
            self._drop(conn)

    def _reject(self, conn: Conn, exc: ProtocolError) -> None:
        # A foreign or garbled stream cannot be resynchronised: answer once, hang up.
        logger.warning("rejected a malformed message from %s: %s", "unix" if conn.unix else "tcp", exc)
        self._reply_error(conn, 0, exc)
        self._drop(conn)

    def _serve_one(self, conn: Conn) -> None:
        """Read what the socket holds; handle every whole frame it completes."""
        try:
            data = conn.sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            if conn.buf:
                self._reject(conn, ProtocolError(f"connection closed mid-frame ({len(conn.buf)} bytes)"))
            else:
                self._drop(conn)
            return
        if not conn.buf:
            conn.since = time.monotonic() if conn.authed else conn.since
        conn.buf += data
        while len(conn.buf) >= FRAME.size and conn.sock.fileno() >= 0:
            try:
                msg_id, rid, length = parse_header(bytes(conn.buf[:FRAME.size]))
                if not conn.authed and length > MAX_PREAUTH_PAYLOAD:
                    msg = (f"a {length}-byte message before Hello: an unauthenticated connection may only send "
                           f"Hello (at most {MAX_PREAUTH_PAYLOAD} bytes)")
                    raise ProtocolError(msg)
                if len(conn.buf) < FRAME.size + length:
                    return  # the rest comes later (under the frame deadline)
                payload = bytes(conn.buf[FRAME.size:FRAME.size + length])
                del conn.buf[:FRAME.size + length]
                request = decode_payload(msg_id, payload)
            except ProtocolError as exc:
                self._reject(conn, exc)
                return
            conn.since = time.monotonic()
            self._handle_request(conn, request, rid)

    def _handle_request(self, conn: Conn, request: Message, rid: int) -> None:
        try:
            reply = self._respond(conn, request)
        except MnemosyneError as exc:
            self._reply_error(conn, rid, exc)
            if not conn.authed or isinstance(exc, ProtocolError):
                self._drop(conn)
            return
        except Exception as exc:  # a bug must not take the state down with it
            logger.exception("proxy failed to handle %s", type(request).__name__)
            self._reply_error(conn, rid, ProxyError(f"internal error handling {type(request).__name__}: {exc!r}"))
            return
        fds, conn.fds_out = conn.fds_out, []
        try:
            send_frame(conn.sock, reply, rid, fds)
        except (PeerClosed, OSError):
            self._drop(conn)
        finally:
            for fd in fds:
                os.close(fd)

    def _reply_error(self, conn: Conn, rid: int, exc: BaseException) -> None:
        with contextlib.suppress(PeerClosed, OSError):
            send_frame(conn.sock, Error(error_code(exc), str(exc)), rid)

