"""The proxy's append-only log: one checksummed record per state-changing request.

File layout: an 8-byte file magic, then records. A record is ``u32 length | u32 crc32 |
body`` where body is ``u16 message id`` plus the generated codec's payload of a ``Rec*``
message. A record is written with a single ``write`` on an ``O_APPEND`` descriptor, as
part of handling the request that caused it (fused IPC and logging), so after a crash the
file holds every acknowledged request. No fsync: the page cache outlives a killed process,
and the proxy's memory does not outlive the host, so durability across a power loss would
buy nothing.

On replay a torn last record (a crash in the middle of a write) is detected, logged and cut
off; a bad record followed by more data is corruption and is refused.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from mnemosyne.core.errors import CorruptStateError, ProtocolError
from mnemosyne.proxy._generated.messages import Message, decode_payload, encode_payload

__all__ = ["FILE_MAGIC", "Journal", "encode_record", "read_records"]

logger = logging.getLogger(__name__)

FILE_MAGIC = b"MNPXLOG1"
_REC = struct.Struct("<II")
_ID = struct.Struct("<H")


def encode_record(record: Message) -> bytes:
    """Encode one record with its length and crc32."""
    body = _ID.pack(record.MSG_ID) + encode_payload(record)
    return _REC.pack(len(body), zlib.crc32(body)) + body


def read_records(path: Path) -> tuple[list[Message], int]:
    """Read every intact record of a log file.

    Returns:
        The records and the byte length of the intact prefix (shorter than the file when
        the last record was torn).

    Raises:
        CorruptStateError: The file is not a proxy log, or a record in the middle is bad.
    """
    data = path.read_bytes()
    if not data:
        return [], 0
    if not data.startswith(FILE_MAGIC):
        msg = f"{path}: not a proxy log (magic {data[:8]!r}, expected {FILE_MAGIC!r})"
        raise CorruptStateError(msg)
    records: list[Message] = []
    pos = len(FILE_MAGIC)
    while pos < len(data):
        torn_why = _check_record(data, pos)
        if torn_why is not None:
            why, at_end = torn_why
            if not at_end:
                msg = f"{path}: corrupt record at byte {pos}: {why}; the log cannot be trusted"
                raise CorruptStateError(msg)
            logger.warning("%s: torn last record at byte %d (%s), ignored: the request it held was never acknowledged",
                           path, pos, why)
            return records, pos
        length, _crc = _REC.unpack_from(data, pos)
        body = data[pos + _REC.size : pos + _REC.size + length]
        (msg_id,) = _ID.unpack_from(body)
        try:
            rec = decode_payload(msg_id, body[_ID.size :])
        except ProtocolError as exc:
            msg = f"{path}: record at byte {pos} has a valid checksum but does not decode: {exc}"
            raise CorruptStateError(msg) from None
        if rec.KIND != "record":
            msg = f"{path}: record at byte {pos} is a {type(rec).__name__}, not a log record"
            raise CorruptStateError(msg)
        records.append(rec)
        pos += _REC.size + length
    return records, pos


def _check_record(data: bytes, pos: int) -> tuple[str, bool] | None:
    """None when the record at ``pos`` is intact; else (why, whether it is the file's tail)."""
    left = len(data) - pos
    if left < _REC.size:
        return f"only {left} header bytes", True
    length, crc = _REC.unpack_from(data, pos)
    end = pos + _REC.size + length
    if end > len(data):
        return f"record of {length} bytes, {left - _REC.size} present", True
    body = data[pos + _REC.size : end]
    if length < _ID.size or zlib.crc32(body) != crc:
        return "checksum mismatch", end == len(data)
    return None


class Journal:
    """An open proxy log.

    Args:
        path: The log file (created with mode 0600 when missing).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.appended = 0

    def replay(self) -> Iterator[Message]:
        """Yield the intact records and cut a torn tail off the file."""
        if not self.path.exists():
            return iter(())
        records, good = read_records(self.path)
        size = self.path.stat().st_size
        if good and good < size:
            os.truncate(self.path, good)
        return iter(records)

    def open(self) -> None:
        """Open for appending (writing the file magic into a new file)."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if new:
            os.write(self._fd, FILE_MAGIC)

    def append(self, record: Message) -> None:
        """Append one record with one write."""
        if self._fd is None:
            msg = f"journal {self.path} is not open"
            raise CorruptStateError(msg)
        data = encode_record(record)
        written = os.write(self._fd, data)
        if written != len(data):  # a short write on a regular file means the disk is full
            msg = f"journal {self.path}: wrote {written} of {len(data)} bytes"
            raise CorruptStateError(msg)
        self.appended += 1

    def rewrite(self, records: list[Message]) -> None:
        """Atomically replace the file with ``records`` (compaction) and keep appending to it."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, FILE_MAGIC + b"".join(encode_record(r) for r in records))
            os.fsync(fd)  # the rename must not expose an empty file after a host crash
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self.close()
        self.open()
        self.appended = len(records)

    def close(self) -> None:
        """Close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
