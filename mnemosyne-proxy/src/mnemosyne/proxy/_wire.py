"""Framed messages over a stream socket, with file descriptors riding along on Unix sockets.

One frame is the generated 16-byte header plus the payload (see the protocol spec). File
descriptors are sent with the frame's first byte (``SCM_RIGHTS``), so they can never be
attached to the wrong message.
"""

from __future__ import annotations

import array
import socket

from mnemosyne.core.errors import ProtocolError
from mnemosyne.proxy._generated.messages import FRAME, Message, decode_payload, encode_frame, parse_header
from mnemosyne.proxy.errors import ProxyUnavailableError

__all__ = ["MAX_FDS", "PeerClosed", "recv_frame", "send_frame"]

#: Most file descriptors one frame may carry.
MAX_FDS = 16


class PeerClosed(ProxyUnavailableError):
    """The other end closed the connection (or vanished) mid-conversation."""


def _recv_exact(sock: socket.socket, n: int, fds: list[int] | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            if fds is not None and not buf:
                data, ancdata, _flags, _addr = sock.recvmsg(n, socket.CMSG_SPACE(MAX_FDS * 4))
                for level, kind, cdata in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        arr = array.array("i")
                        arr.frombytes(cdata[: len(cdata) - (len(cdata) % arr.itemsize)])
                        fds.extend(arr)
            else:
                data = sock.recv(n - len(buf))
        except (ConnectionResetError, BrokenPipeError) as exc:
            msg = f"connection reset by peer ({exc})"
            raise PeerClosed(msg) from None
        if not data:
            msg = f"connection closed by peer after {len(buf)} of {n} bytes"
            raise PeerClosed(msg)
        buf += data
    return bytes(buf)


def send_frame(sock: socket.socket, msg: Message, request_id: int, fds: list[int] | None = None) -> None:
    """Send one message; ``fds`` (Unix sockets only) travel with it."""
    frame = encode_frame(msg, request_id)
    try:
        if fds:
            sent = socket.send_fds(sock, [frame], fds)
            if sent < len(frame):
                sock.sendall(frame[sent:])
        else:
            sock.sendall(frame)
    except (BrokenPipeError, ConnectionResetError) as exc:
        text = f"connection closed by peer while sending {type(msg).__name__} ({exc})"
        raise PeerClosed(text) from None


def recv_frame(sock: socket.socket, want_fds: bool = False) -> tuple[Message, int, list[int]]:
    """Receive one message; return it, its request id and any file descriptors it carried.

    Raises:
        ProtocolError: The bytes are not a valid frame of this protocol.
        PeerClosed: The connection ended.
    """
    fds: list[int] | None = [] if want_fds else None
    header = _recv_exact(sock, FRAME.size, fds)
    try:
        msg_id, request_id, length = parse_header(header)
        payload = _recv_exact(sock, length, None) if length else b""
        return decode_payload(msg_id, payload), request_id, fds or []
    except ProtocolError:
        for fd in fds or []:  # never leak descriptors that came with garbage
            _close_quietly(fd)
        raise


def _close_quietly(fd: int) -> None:
    import contextlib
    import os

    with contextlib.suppress(OSError):
        os.close(fd)
