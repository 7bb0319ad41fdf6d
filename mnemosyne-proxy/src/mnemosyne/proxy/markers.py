"""The marker page: per-step ``begin_update``/``commit`` markers in shared memory, off the socket.

The proxy owns one page of ``memfd`` shared memory and hands a descriptor of it to each
trainer (``Markers`` request, ``SCM_RIGHTS``). The trainer writes two 64-bit words:

* ``begin`` (offset 64), by the trainer's main thread in ``begin_update(k)``, before the
  optimizer's kernels are queued;
* ``commit`` (offset 128), by the trainer once step ``k``'s update has finished (on a GPU: by
  the :class:`~mnemosyne.proxy.holder.Committer` thread when the step's CUDA event completed).

A marker word is ``ordinal << 32 | step``: every ``begin`` takes the next ordinal, and a
``commit`` copies the ``begin`` word it completes. So the page says COMMITTED (step of the
commit word) exactly when both words are equal, and TORN (update of the begin word's step)
otherwise, whatever the step numbers do (a trainer may redo a step after a pull).

The page lives in the proxy, so it outlives the trainer: the proxy reads it when it needs the
status (trainer disconnect or death, status and table requests, checksums, pulls, shutdown,
and before allocate/free/name, whose meaning depends on whether an update is open) and records
what changed into its log as ``RecCommit``/``RecBegin``, so the log stays the source of truth
(see :meth:`MarkerPage.read`). Per step, the trainer pays two stores, no system call.

Ordering: the proxy reads ``commit`` first and ``begin`` second. ``begin`` only moves
forward and ``commit`` only ever copies an earlier ``begin``, so an equal pair read in that
order was a true committed state at the time ``commit`` was read; a torn read is conservative.
Aligned 8-byte stores and loads are single instructions (atomic) on x86-64 and aarch64; on
x86-64 stores also become visible in program order. The data an update writes is ordered
before its commit marker by the CUDA event (device) or by program order (host arena, x86-64).
"""

from __future__ import annotations

import mmap
import os
import struct

from mnemosyne.core.errors import ConfigError, CorruptStateError

__all__ = ["MARKER_MAGIC", "PAGE_SIZE", "STEP_LIMIT", "MarkerPage", "pack", "unpack"]

PAGE_SIZE = 4096
#: First word of a marker page (``MNPXMARK`` little-endian).
MARKER_MAGIC = int.from_bytes(b"MNPXMARK", "little")
#: Steps must be below this (they share a 64-bit word with the ordinal).
STEP_LIMIT = 1 << 32
_NO_STEP = STEP_LIMIT - 1  # "no step" (-1) in a marker word
_MAGIC_AT, _BEGIN_AT, _COMMIT_AT = 0, 64, 128  # separate cache lines: two writers
_Q = struct.Struct("<q")


def pack(ordinal: int, step: int) -> int:
    """A marker word (``step`` -1 means none)."""
    if not -1 <= step < _NO_STEP:
        msg = f"step {step} cannot be marked: steps must be in [0, {_NO_STEP})"
        raise ConfigError(msg)
    return (ordinal << 32) | (_NO_STEP if step < 0 else step)


def unpack(word: int) -> tuple[int, int]:
    """(ordinal, step) of a marker word (step -1 when none)."""
    step = word & (STEP_LIMIT - 1)
    return word >> 32, (-1 if step == _NO_STEP else step)


class MarkerPage:
    """One marker page mapped into this process.

    Args:
        fd: The page's memory file (the caller keeps ownership of the descriptor).
    """

    def __init__(self, fd: int) -> None:
        self.mm = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if _Q.unpack_from(self.mm, _MAGIC_AT)[0] != MARKER_MAGIC:
            self.mm.close()
            msg = "the descriptor received as the proxy's marker page does not hold a marker page"
            raise CorruptStateError(msg)
        # memoryview casts give single aligned 8-byte loads and stores
        self._words = memoryview(self.mm).cast("q")

    @classmethod
    def create(cls) -> tuple[MarkerPage, int]:
        """A new page (proxy side): the page and its memory file's descriptor."""
        fd = os.memfd_create("mnemosyne-markers", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, PAGE_SIZE)
            os.pwrite(fd, _Q.pack(MARKER_MAGIC), _MAGIC_AT)
            page = cls(fd)
        except BaseException:
            os.close(fd)
            raise
        page.set(pack(0, -1), pack(0, -1))
        return page, fd

    @property
    def begin_word(self) -> int:
        """The last ``begin`` marker."""
        return int(self._words[_BEGIN_AT // 8])

    @property
    def commit_word(self) -> int:
        """The last ``commit`` marker."""
        return int(self._words[_COMMIT_AT // 8])

    def read(self) -> tuple[int, int]:
        """(begin, commit) words, ``commit`` read first (see the module docstring)."""
        c = int(self._words[_COMMIT_AT // 8])
        b = int(self._words[_BEGIN_AT // 8])
        return b, c

    def begin(self, step: int) -> int:
        """Trainer: mark the start of step ``step``'s update; return the word to commit with."""
        word = pack((self.begin_word >> 32) + 1, step)
        self._words[_BEGIN_AT // 8] = word
        return word

    def commit(self, word: int) -> None:
        """Trainer: mark the update that :meth:`begin` returned ``word`` for as complete."""
        self._words[_COMMIT_AT // 8] = word

    def set(self, begin: int, commit: int) -> None:
        """Proxy: overwrite both words (only while no trainer writes, e.g. at hand-out)."""
        self._words[_COMMIT_AT // 8] = commit
        self._words[_BEGIN_AT // 8] = begin

    def close(self) -> None:
        """Unmap."""
        self._words.release()
        self.mm.close()
