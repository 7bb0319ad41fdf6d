"""Snapshot generations in shared memory that outlive the process that wrote them (no torch).

One *holder* (a rank's snapshots, on its own node or replicated on a peer's) is two slot
files in a folder of ``/dev/shm``: ``<name>.0`` and ``<name>.1``. A slot is a 128-byte
header, the generation's metadata (JSON bytes: the state's skeleton and tensor layout, as
:mod:`mnemosyne.jit._snapshot` writes them) and its raw tensor bytes, 64-byte aligned.

Double buffering: a new generation is always written into the slot that does *not* hold
the newest complete one, so a writer killed mid-snapshot (or a torn transfer) leaves the
last complete generation untouched. The header is written last: its state word says
``WRITING`` from the first byte of a new generation until the whole payload and its
blake2b digest are in place, and the header carries its own digest, so a torn header is
refused too. Memory is bounded by construction: the newest complete generation and the one
being written, never more.

Files in ``/dev/shm`` stay when the trainer dies (SIGKILL included); the node agent owns
them and removes them with the job (:func:`remove_holder`).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from mnemosyne.core.errors import CorruptStateError, StateError

__all__ = [
    "HEADER_BYTES",
    "Generation",
    "SlotWriter",
    "digest",
    "drop_newer",
    "generations",
    "holder_bytes",
    "latest",
    "newest_step",
    "remove_holder",
    "write_generation",
]

logger = logging.getLogger(__name__)

_MAGIC = b"MNSNAP01"
#: Header of a slot: magic, state, seq, step, meta length, data length, payload digest,
#: header digest (over everything before it).
_HEAD = struct.Struct("<8sIIQqQQ32s")
HEADER_BYTES = 128
_HEAD_DIGEST = 16
_EMPTY, _WRITING, _COMPLETE = 0, 1, 2
_ALIGN = 64


def digest(*parts: bytes | bytearray | memoryview) -> bytes:
    """blake2b-256 of the concatenated parts (hashlib releases the GIL on large buffers)."""
    h = hashlib.blake2b(digest_size=32, person=b"mnemo-snap")
    for p in parts:
        h.update(p)
    return h.digest()


def _data_offset(meta_len: int) -> int:
    return -(-(HEADER_BYTES + meta_len) // _ALIGN) * _ALIGN


def _pack_head(state: int, seq: int, step: int, meta_len: int, data_len: int, dig: bytes) -> bytes:
    body = _HEAD.pack(_MAGIC, state, 0, seq, step, meta_len, data_len, dig)
    head = body + hashlib.blake2b(body, digest_size=_HEAD_DIGEST).digest()
    return head.ljust(HEADER_BYTES, b"\0")


@dataclass(frozen=True)
class Generation:
    """One complete, verified snapshot generation read from a holder.

    Attributes:
        seq: Generation number (grows by one per snapshot of this holder).
        step: Training step whose committed state it holds.
        meta: The metadata bytes (JSON) the writer stored.
        data: The raw tensor bytes (a private, writable copy).
        digest: blake2b-256 of ``meta + data``.
        path: Slot file it was read from.
    """

    seq: int
    step: int
    meta: bytes
    data: bytearray
    digest: bytes
    path: Path


def _slot_paths(base: Path) -> list[Path]:
    return [base.with_name(f"{base.name}.{i}") for i in (0, 1)]


def _read_head(path: Path) -> tuple[int, int, int, int, int, bytes] | None:
    """(state, seq, step, meta_len, data_len, digest) of a slot, or None if absent/unreadable."""
    try:
        with path.open("rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        return None
    if len(raw) < _HEAD.size + _HEAD_DIGEST:
        return None
    body = raw[:_HEAD.size]
    if hashlib.blake2b(body, digest_size=_HEAD_DIGEST).digest() != raw[_HEAD.size:_HEAD.size + _HEAD_DIGEST]:
        return None
    magic, state, _pad, seq, step, meta_len, data_len, dig = _HEAD.unpack(body)
    if magic != _MAGIC:
        return None
    return state, seq, step, meta_len, data_len, dig


def _complete_seqs(base: Path) -> list[tuple[int, Path]]:
    out = []
    for p in _slot_paths(base):
        h = _read_head(p)
        if h is not None and h[0] == _COMPLETE:
            out.append((h[1], p))
    return sorted(out, reverse=True)


def latest(base: str | os.PathLike[str], verify: bool = True) -> Generation:
    """The newest complete generation of holder ``base`` whose payload matches its digest.

    A slot whose payload fails the digest is skipped (the other slot is tried), so a
    corrupted newest generation falls back to the previous one. A reader racing a writer
    (the slot it read was overwritten two generations later) looks once more.

    Raises:
        StateError: the holder has no complete generation.
        CorruptStateError: every complete slot failed its digest (message names the files).
    """
    base = Path(base)
    for attempt in (0, 1):
        gen, bad = _scan(base, verify)
        if gen is not None:
            return gen
        if not bad or attempt:
            break
    if bad:
        msg = f"snapshot holder {base}: every complete generation fails its blake2b digest: {', '.join(bad)}"
        raise CorruptStateError(msg)
    msg = f"snapshot holder {base}: no complete generation (expected {base}.0 or {base}.1 from a snapshot)"
    raise StateError(msg)


def _scan(base: Path, verify: bool) -> tuple[Generation | None, list[str]]:
    bad = []
    for _seq, path in _complete_seqs(base):
        h = _read_head(path)
        if h is None or h[0] != _COMPLETE:
            continue
        _state, seq, step, meta_len, data_len, dig = h
        off = _data_offset(meta_len)
        with path.open("rb") as f:
            f.seek(HEADER_BYTES)
            meta = f.read(meta_len)
            f.seek(off)
            data = bytearray(data_len)
            got = f.readinto(data)
        if len(meta) != meta_len or got != data_len or (verify and digest(meta, data) != dig):
            bad.append(str(path))
            continue
        return Generation(seq, step, meta, data, dig, path), bad
    return None, bad


def newest_step(base: str | os.PathLike[str]) -> int | None:
    """Highest step among the complete slots of holder ``base``, from their headers only, or None.

    Payloads are not read or verified (cheap); :func:`latest` says which one is usable.
    """
    steps = [h[2] for p in _slot_paths(Path(base)) if (h := _read_head(p)) is not None and h[0] == _COMPLETE]
    return max(steps, default=None)


def generations(base: str | os.PathLike[str]) -> list[Generation]:
    """Every complete generation of holder ``base`` that matches its digest, newest first.

    Unlike :func:`latest` it reads both slots (a recovery needs every step a holder can
    give back); a slot that fails its digest is left out and logged.
    """
    out = []
    for _seq, path in _complete_seqs(Path(base)):
        h = _read_head(path)
        if h is None or h[0] != _COMPLETE:
            continue
        _state, seq, step, meta_len, data_len, dig = h
        with path.open("rb") as f:
            f.seek(HEADER_BYTES)
            meta = f.read(meta_len)
            f.seek(_data_offset(meta_len))
            data = bytearray(data_len)
            got = f.readinto(data)
        if len(meta) != meta_len or got != data_len or digest(meta, data) != dig:
            logger.warning("snapshot %s (step %d): payload fails its blake2b digest; skipped", path, step)
            continue
        out.append(Generation(seq, step, meta, data, dig, path))
    return out


def drop_newer(base: str | os.PathLike[str], step: int) -> list[int]:
    """Remove the generations of holder ``base`` taken after ``step``; return their steps.

    After the job rolled back to ``step`` they belong to a timeline that no longer exists,
    and keeping them would let the next snapshot overwrite the older, still valid slot.
    """
    dropped = []
    for p in _slot_paths(Path(base)):
        h = _read_head(p)
        if h is not None and h[0] == _COMPLETE and h[2] > step:
            p.unlink(missing_ok=True)
            dropped.append(h[2])
    return dropped


class SlotWriter:
    """Writes one new generation of a holder in place; :meth:`commit` makes it the newest.

    ``data`` is a writable memoryview of the payload region in shared memory: the trainer
    copies its tensors straight into it (no staging copy). Until :meth:`commit` the slot's
    header says ``WRITING`` and readers ignore it; the other slot is never touched.
    """

    def __init__(self, base: str | os.PathLike[str], step: int, meta: bytes, data_len: int) -> None:
        base = Path(base)
        base.parent.mkdir(parents=True, exist_ok=True)
        done = _complete_seqs(base)
        newest_seq, newest_path = done[0] if done else (0, None)
        slots = _slot_paths(base)
        self.path = slots[1] if newest_path == slots[0] else slots[0]
        self.seq = newest_seq + 1
        self.step = step
        self._meta = meta
        self._off = _data_offset(len(meta))
        self._data_len = data_len
        size = self._off + max(data_len, 1)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Invalidate first: whatever this slot held is no longer a generation from here on.
            os.pwrite(fd, _pack_head(_WRITING, self.seq, step, len(meta), data_len, bytes(32)), 0)
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._map[HEADER_BYTES:HEADER_BYTES + len(meta)] = meta
        self.data = memoryview(self._map)[self._off:self._off + data_len]

    def commit(self, dig: bytes | None = None) -> bytes:
        """Digest the payload (unless ``dig`` is given) and publish the generation (header last)."""
        dig = digest(self._meta, self.data) if dig is None else dig
        self.data.release()
        self._map[0:HEADER_BYTES] = _pack_head(_COMPLETE, self.seq, self.step, len(self._meta),
                                               self._data_len, dig)
        self._map.close()
        return dig

    def abandon(self) -> None:
        """Drop the mapping without publishing (the slot stays ``WRITING``, ignored by readers)."""
        self.data.release()
        self._map.close()


def write_generation(base: str | os.PathLike[str], step: int, meta: bytes, data: bytes | bytearray | memoryview,
                     expect: bytes | None = None) -> Generation:
    """Store a whole generation received as bytes (a peer's replica); verify it first.

    Raises:
        CorruptStateError: ``expect`` is given and ``meta + data`` does not match it; the
            holder is left as it was.
    """
    dig = digest(meta, data)
    if expect is not None and dig != expect:
        msg = (f"snapshot for {base} (step {step}): blake2b digest {dig.hex()[:16]}... does not match "
               f"the sender's {expect.hex()[:16]}...; refused")
        raise CorruptStateError(msg)
    w = SlotWriter(base, step, meta, len(data))
    w.data[:] = data
    w.commit(dig)
    return Generation(w.seq, step, bytes(meta), bytearray(data), dig, w.path)


def holder_bytes(base: str | os.PathLike[str]) -> int:
    """Bytes of shared memory the holder occupies (both slots)."""
    return sum(p.stat().st_size for p in _slot_paths(Path(base)) if p.exists())


def remove_holder(base: str | os.PathLike[str]) -> None:
    """Remove both slot files of a holder (the job ended, or the holder is no longer needed)."""
    for p in _slot_paths(Path(base)):
        p.unlink(missing_ok=True)

