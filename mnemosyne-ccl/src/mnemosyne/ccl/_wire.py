"""Framing of the store protocol: a JSON header plus raw bytes, never pickle.

A frame is ``MAGIC | u32 header length | u32 body length | header | body`` (big endian).
The header is a JSON object (the operation and its arguments, or the answer); the body is
the value bytes, opaque to the protocol. Both lengths are bounded so that a foreign or
corrupt peer gets a :class:`~mnemosyne.core.errors.ProtocolError` instead of making the
reader allocate gigabytes or wait for bytes that never come.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from mnemosyne.core.errors import ProtocolError

__all__ = [
    "MAGIC",
    "MAX_BODY",
    "MAX_HEADER",
    "PREFIX_SIZE",
    "PROTOCOL_VERSION",
    "check_prefix",
    "decode_header",
    "encode",
    "recv_frame",
]

#: First bytes of every frame; a peer speaking anything else is rejected at once.
MAGIC = b"MNS1"
PROTOCOL_VERSION = 1
#: Headers carry an operation and a few keys: 1 MiB is generous.
MAX_HEADER = 1 << 20
#: Values are bootstrap blobs (addresses, member lists, NCCL ids): 64 MiB is generous.
MAX_BODY = 64 << 20
_PREFIX = struct.Struct(">4sII")


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    """Return one frame."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, len(head), len(body)) + head + body


def check_prefix(prefix: bytes) -> tuple[int, int]:
    """Validate a frame's fixed prefix; return (header length, body length).

    Raises:
        ProtocolError: Wrong magic or a length over the limits.
    """
    magic, hlen, blen = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        msg = f"not a Mnemosyne store frame: got magic {magic!r}, expected {MAGIC!r}"
        raise ProtocolError(msg)
    if hlen > MAX_HEADER or blen > MAX_BODY:
        msg = f"store frame too large: header {hlen} B (max {MAX_HEADER}), body {blen} B (max {MAX_BODY})"
        raise ProtocolError(msg)
    return hlen, blen


def decode_header(raw: bytes) -> dict[str, Any]:
    """Parse a frame header.

    Raises:
        ProtocolError: The header is not a JSON object.
    """
    try:
        header = json.loads(raw)
    except ValueError as exc:
        msg = f"malformed store frame header (not JSON): {exc}"
        raise ProtocolError(msg) from None
    except RecursionError:
        msg = "malformed store frame header: JSON nested too deeply"
        raise ProtocolError(msg) from None
    if not isinstance(header, dict):
        msg = f"malformed store frame header: expected a JSON object, got {type(header).__name__}"
        raise ProtocolError(msg)
    return header


PREFIX_SIZE = _PREFIX.size


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            msg = "store connection closed by the server"
            raise ConnectionError(msg)
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """Read one frame from a blocking socket (client side)."""
    hlen, blen = check_prefix(_recv_exact(sock, PREFIX_SIZE))
    header = decode_header(_recv_exact(sock, hlen))
    body = _recv_exact(sock, blen) if blen else b""
    return header, body
