"""The handle table: every allocation and named tensor of an arena, and its commit status.

The table changes only by :meth:`HandleTable.apply` of a log record, both while the proxy
serves requests and when it replays its log after a restart, so a replayed table is the
live table exactly (same handles, names, offsets). Lookups by handle and by name are dict
lookups (O(1)); handles are never reused.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from mnemosyne.core.errors import CorruptStateError
from mnemosyne.core.state import CommitStatus
from mnemosyne.proxy._generated.messages import (
    Entry,
    Message,
    RecAlloc,
    RecBase,
    RecBegin,
    RecCommit,
    RecFree,
    RecName,
    RecOpen,
    RecPullStart,
    RecRestore,
    RecSnapshot,
    StatusReply,
)
from mnemosyne.proxy.errors import ArenaFullError

__all__ = ["ALIGN", "SCRATCH_PREFIX", "STATUS_CODES", "FreeList", "HandleTable", "aligned_size", "is_state"]

#: Every allocation starts on this boundary (enough for any dtype and for CUDA kernels).
ALIGN = 512

#: Names under this prefix hold no training state (gradients, buffers rebuilt every step):
#: commits do not vouch for them, peers do not pull them, checksums skip them.
SCRATCH_PREFIX = "scratch/"

#: Wire code of each commit status.
STATUS_CODES: dict[CommitStatus, int] = {CommitStatus.EMPTY: 0, CommitStatus.COMMITTED: 1, CommitStatus.TORN: 2}
_STATUS_BY_CODE = {v: k for k, v in STATUS_CODES.items()}


def is_state(entry: Entry) -> bool:
    """Whether an entry is named training state (not anonymous, not scratch)."""
    return bool(entry.name) and not entry.name.startswith(SCRATCH_PREFIX)


def aligned_size(nbytes: int) -> int:
    """Bytes an allocation of ``nbytes`` occupies (at least one alignment unit)."""
    return max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)


class FreeList:
    """First-fit allocator over ``[0, capacity)``: sorted, coalesced free ranges."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._starts: list[int] = [0] if capacity else []
        self._sizes: list[int] = [capacity] if capacity else []

    @property
    def free_bytes(self) -> int:
        """Total free bytes."""
        return sum(self._sizes)

    def find(self, size: int) -> int | None:
        """Offset of the first free range that fits ``size`` bytes, or None."""
        for start, avail in zip(self._starts, self._sizes, strict=True):
            if avail >= size:
                return start
        return None

    def take(self, offset: int, size: int) -> None:
        """Mark ``[offset, offset+size)`` used; it must lie inside one free range."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0 or offset + size > self._starts[i] + self._sizes[i]:
            msg = f"range [{offset}, {offset + size}) is not free"
            raise CorruptStateError(msg)
        start, avail = self._starts[i], self._sizes[i]
        del self._starts[i], self._sizes[i]
        tail = start + avail - (offset + size)
        if tail:
            self._starts.insert(i, offset + size)
            self._sizes.insert(i, tail)
        if offset > start:
            self._starts.insert(i, start)
            self._sizes.insert(i, offset - start)

    def give(self, offset: int, size: int) -> None:
        """Return ``[offset, offset+size)`` to the free ranges, coalescing neighbours."""
        i = bisect.bisect_left(self._starts, offset)
        self._starts.insert(i, offset)
        self._sizes.insert(i, size)
        if i + 1 < len(self._starts) and offset + size == self._starts[i + 1]:
            self._sizes[i] += self._sizes.pop(i + 1)
            self._starts.pop(i + 1)
        if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == offset:
            self._sizes[i - 1] += self._sizes.pop(i)
            self._starts.pop(i)


@dataclass
class _Status:
    status: CommitStatus = CommitStatus.EMPTY
    step: int = -1
    update_step: int = -1
    reason: str = ""


class HandleTable:
    """Allocations, names, per-space base addresses and commit status of one arena.

    Args:
        capacities: Bytes of each memory space (index = space number).
    """

    def __init__(self, capacities: list[int]) -> None:
        self.capacities = list(capacities)
        self.entries: dict[int, Entry] = {}
        self.by_name: dict[str, int] = {}
        self.bases: list[int] = [0] * len(capacities)
        self.next_handle = 1
        self.seq = 0
        self.generation = 0
        self._st = _Status()
        self._free = [FreeList(c) for c in capacities]

    # ---- reads -------------------------------------------------------------------------
    @property
    def status(self) -> CommitStatus:
        """Commit status of what the arena holds."""
        return self._st.status

    @property
    def step(self) -> int:
        """Last committed step (-1 when none)."""
        return self._st.step

    def status_reply(self) -> StatusReply:
        """The status as its wire message."""
        st = self._st
        return StatusReply(STATUS_CODES[st.status], st.step, st.update_step, self.seq, self.generation, st.reason)

    def lookup(self, name: str) -> Entry | None:
        """The named entry, or None."""
        handle = self.by_name.get(name)
        return None if handle is None else self.entries[handle]

    def plan_alloc(self, name: str, space: int, dtype: str, shape: list[int], nbytes: int) -> Entry:
        """Choose where a new allocation goes, without changing the table.

        Raises:
            ArenaFullError: No free range fits.
        """
        if not 0 <= space < len(self._free):
            msg = f"memory space {space} does not exist (this arena has {len(self._free)})"
            raise ArenaFullError(msg)
        size = aligned_size(nbytes)
        offset = self._free[space].find(size)
        if offset is None:
            msg = (f"cannot allocate {nbytes} bytes for {name or 'an anonymous block'!r} in space {space}: "
                   f"{self._free[space].free_bytes} of {self.capacities[space]} bytes free, no range large enough")
            raise ArenaFullError(msg)
        return Entry(self.next_handle, name, space, dtype, list(shape), offset, nbytes)

    # ---- the only way the table changes ---------------------------------------------------
    def apply(self, rec: Message) -> None:
        """Apply one log record.

        Raises:
            CorruptStateError: The record contradicts the table (a corrupt or foreign log).
        """
        self.seq += 1
        st = self._st
        if isinstance(rec, RecAlloc):
            e = rec.entry
            if e.handle in self.entries or (e.name and e.name in self.by_name):
                msg = f"log allocates handle {e.handle} / name {e.name!r} twice"
                raise CorruptStateError(msg)
            if not 0 <= e.space < len(self._free):
                msg = f"log allocates in space {e.space}, the arena has {len(self._free)}"
                raise CorruptStateError(msg)
            self._free[e.space].take(e.offset, aligned_size(e.nbytes))
            self.entries[e.handle] = e
            if e.name:
                self.by_name[e.name] = e.handle
            if is_state(e) and st.update_step < 0 and st.status is not CommitStatus.TORN:
                # New named contents appeared outside an update: nothing vouches for them.
                st.status = CommitStatus.TORN
                st.reason = f"tensor {e.name!r} was allocated outside an update and never committed"
            self.next_handle = max(self.next_handle, e.handle + 1)
        elif isinstance(rec, RecFree):
            e = self._pop(rec.handle)
            self._free[e.space].give(e.offset, aligned_size(e.nbytes))
        elif isinstance(rec, RecName):
            e = self._get(rec.handle)
            if e.name:
                msg = f"log names handle {rec.handle} {rec.name!r}, it is already {e.name!r}"
                raise CorruptStateError(msg)
            e.name = rec.name
            self.by_name[rec.name] = rec.handle
            if is_state(e) and st.update_step < 0 and st.status is not CommitStatus.TORN:
                st.status = CommitStatus.TORN
                st.reason = f"tensor {e.name!r} was named outside an update and never committed"
        elif isinstance(rec, RecBegin):
            st.status, st.update_step = CommitStatus.TORN, rec.step
            st.reason = f"the update of step {rec.step} began and was never committed"
        elif isinstance(rec, RecPullStart):
            st.status, st.update_step = CommitStatus.TORN, -1
            st.reason = f"a pull of step {rec.step} from {rec.peer} began and did not complete"
        elif isinstance(rec, (RecCommit, RecRestore)):
            st.status, st.step, st.update_step, st.reason = CommitStatus.COMMITTED, rec.step, -1, ""
        elif isinstance(rec, RecBase):
            self.bases[rec.space] = rec.base
        elif isinstance(rec, RecOpen):
            self._open(rec)
        elif isinstance(rec, RecSnapshot):
            self._restore_snapshot(rec)
        else:
            msg = f"{type(rec).__name__} is not a log record"
            raise CorruptStateError(msg)

    def snapshot(self) -> RecSnapshot:
        """The whole table as one record (first record of a compacted log)."""
        return RecSnapshot(self.status_reply(), self.next_handle, list(self.capacities), list(self.bases),
                           sorted(self.entries.values(), key=lambda e: e.handle))

    # ---- helpers -------------------------------------------------------------------------
    def _get(self, handle: int) -> Entry:
        e = self.entries.get(handle)
        if e is None:
            msg = f"log names handle {handle}, which is not allocated"
            raise CorruptStateError(msg)
        return e

    def _pop(self, handle: int) -> Entry:
        e = self._get(handle)
        del self.entries[handle]
        if e.name:
            del self.by_name[e.name]
        return e

    def _open(self, rec: RecOpen) -> None:
        if self.entries and list(rec.capacities) != self.capacities:
            msg = (f"the log describes an arena of {self.capacities} bytes per space, this proxy opened "
                   f"{list(rec.capacities)}; start it with the same size or a fresh state dir")
            raise CorruptStateError(msg)
        if not self.entries:
            self.capacities = list(rec.capacities)
            self._free = [FreeList(c) for c in self.capacities]
            self.bases = (self.bases + [0] * len(self.capacities))[: len(self.capacities)]
        self.generation = rec.generation
        st = self._st
        if self.entries:
            # Earlier records describe memory that died with the previous proxy.
            st.status, st.update_step = CommitStatus.TORN, -1
            st.reason = (f"the arena held by proxy generation {rec.generation - 1} was lost when that proxy "
                         f"stopped (step {st.step} was committed); refill it from a peer")
        else:
            st.status, st.update_step, st.reason = CommitStatus.EMPTY, -1, ""

    def _restore_snapshot(self, rec: RecSnapshot) -> None:
        if self.entries:
            msg = "a snapshot record must be the first record of a log"
            raise CorruptStateError(msg)
        s = rec.status
        if s.status not in _STATUS_BY_CODE:
            msg = f"snapshot has unknown status code {s.status}"
            raise CorruptStateError(msg)
        self._st = _Status(_STATUS_BY_CODE[s.status], s.step, s.update_step, s.reason)
        self.generation = s.generation
        self.seq = s.seq
        if len(rec.bases) != len(rec.capacities):
            msg = f"snapshot has {len(rec.capacities)} capacities but {len(rec.bases)} base addresses"
            raise CorruptStateError(msg)
        self.capacities = list(rec.capacities)
        self.bases = list(rec.bases)
        self._free = [FreeList(c) for c in self.capacities]
        for e in rec.entries:
            if not 0 <= e.space < len(self._free):
                msg = f"snapshot entry {e.handle} is in space {e.space}, the arena has {len(self._free)}"
                raise CorruptStateError(msg)
            self._free[e.space].take(e.offset, aligned_size(e.nbytes))
            self.entries[e.handle] = e
            if e.name:
                self.by_name[e.name] = e.handle
        self.next_handle = rec.next_handle
