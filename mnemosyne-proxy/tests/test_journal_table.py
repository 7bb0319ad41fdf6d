"""The append-only log and the handle table, without a proxy process."""

import logging

import pytest

from mnemosyne.core.errors import CorruptStateError
from mnemosyne.core.state import CommitStatus
from mnemosyne.proxy._generated.messages import RecAlloc, RecBegin, RecCommit, RecFree, RecName, RecOpen
from mnemosyne.proxy.errors import ArenaFullError
from mnemosyne.proxy.journal import Journal, read_records
from mnemosyne.proxy.table import ALIGN, FreeList, HandleTable


def _build(table, journal):
    def log(rec):
        journal.append(rec)
        table.apply(rec)

    log(RecOpen(1, "host", -1, [1 << 20]))
    log(RecBegin(0))
    e1 = table.plan_alloc("model/w", 0, "float32", [10, 10], 400)
    log(RecAlloc(e1))
    e2 = table.plan_alloc("", 0, "uint8", [3000], 3000)
    log(RecAlloc(e2))
    log(RecName(e2.handle, "optim/w/exp_avg"))
    e3 = table.plan_alloc("scratch/tmp", 0, "uint8", [10], 10)
    log(RecAlloc(e3))
    log(RecFree(e3.handle))
    log(RecCommit(0))
    log(RecBegin(1))
    log(RecCommit(1))
    return e1, e2


def _replay(path):
    t = HandleTable([])
    j = Journal(path)
    for rec in j.replay():
        t.apply(rec)
    return t


def test_replay_rebuilds_the_same_table(tmp_path):
    j = Journal(tmp_path / "log")
    j.open()
    t = HandleTable([])
    _, e2 = _build(t, j)
    j.close()
    r = _replay(tmp_path / "log")
    assert r.entries == t.entries and r.by_name == t.by_name
    assert (r.status, r.step, r.next_handle) == (CommitStatus.COMMITTED, 1, 4)
    assert r.lookup("optim/w/exp_avg").offset == e2.offset == ALIGN
    # the freed block is reused by the next allocation in both tables alike
    assert r.plan_alloc("x", 0, "uint8", [1], 1) == t.plan_alloc("x", 0, "uint8", [1], 1)


def test_torn_update_and_lost_arena_are_reported(tmp_path):
    j = Journal(tmp_path / "log")
    j.open()
    t = HandleTable([])
    _build(t, j)
    j.append(RecBegin(2))
    j.close()
    r = _replay(tmp_path / "log")
    assert (r.status, r.step, r.status_reply().update_step) == (CommitStatus.TORN, 1, 2)
    assert "update of step 2 began" in r.status_reply().reason
    r.apply(RecOpen(2, "host", -1, [1 << 20]))  # a new proxy generation: memory gone
    assert r.status is CommitStatus.TORN and "was lost" in r.status_reply().reason
    with pytest.raises(CorruptStateError, match="same size"):
        r.apply(RecOpen(3, "host", -1, [1 << 21]))


def test_torn_last_record_is_cut_off_with_a_log_line(tmp_path, caplog):
    j = Journal(tmp_path / "log")
    j.open()
    t = HandleTable([])
    _build(t, j)
    j.append(RecBegin(2))
    j.close()
    path = tmp_path / "log"
    full = path.read_bytes()
    path.write_bytes(full[:-3])  # the last record (RecBegin(2)) was half written
    with caplog.at_level(logging.WARNING, logger="mnemosyne.proxy.journal"):
        r = _replay(path)
    assert "torn last record" in caplog.text
    assert (r.status, r.step) == (CommitStatus.COMMITTED, 1)
    assert path.stat().st_size < len(full) - 3  # cut back to the last good record
    # a crc mismatch in the very last record is torn too
    data = bytearray(full)
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    records, good = read_records(path)
    assert len(records) == 10 and good < len(data)


def test_corrupt_record_in_the_middle_is_refused(tmp_path):
    j = Journal(tmp_path / "log")
    j.open()
    _build(HandleTable([]), j)
    j.close()
    path = tmp_path / "log"
    data = bytearray(path.read_bytes())
    data[30] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStateError, match="corrupt record at byte"):
        read_records(path)
    path.write_bytes(b"NOTALOG!" + bytes(data[8:]))
    with pytest.raises(CorruptStateError, match="not a proxy log"):
        read_records(path)


def test_snapshot_compaction_keeps_the_table(tmp_path):
    j = Journal(tmp_path / "log")
    j.open()
    t = HandleTable([])
    _build(t, j)
    j.rewrite([t.snapshot()])
    j.close()
    r = _replay(tmp_path / "log")
    assert r.entries == t.entries and r.status_reply() == t.status_reply() and r.next_handle == t.next_handle


def test_free_list_first_fit_and_coalescing():
    fl = FreeList(10 * ALIGN)
    fl.take(0, 2 * ALIGN)
    fl.take(2 * ALIGN, 3 * ALIGN)
    fl.take(5 * ALIGN, ALIGN)
    fl.give(2 * ALIGN, 3 * ALIGN)
    assert fl.find(3 * ALIGN) == 2 * ALIGN
    assert fl.find(5 * ALIGN) is None
    fl.give(0, 2 * ALIGN)
    fl.give(5 * ALIGN, ALIGN)
    assert fl.find(10 * ALIGN) == 0 and fl.free_bytes == 10 * ALIGN
    with pytest.raises(CorruptStateError):
        fl.take(9 * ALIGN, 2 * ALIGN)


def test_full_arena_is_a_clear_error():
    t = HandleTable([])
    t.apply(RecOpen(1, "host", -1, [4 * ALIGN]))
    with pytest.raises(ArenaFullError, match="cannot allocate 99999 bytes for 'big'"):
        t.plan_alloc("big", 0, "uint8", [99999], 99999)


def test_state_appearing_outside_an_update_is_not_vouched_for():
    t = HandleTable([])
    t.apply(RecOpen(1, "host", -1, [1 << 20]))
    t.apply(RecBegin(0))
    t.apply(RecCommit(0))
    scratch = t.plan_alloc("scratch/grad/w", 0, "float32", [4], 16)
    t.apply(RecAlloc(scratch))
    assert t.status is CommitStatus.COMMITTED  # scratch holds no state
    anon = t.plan_alloc("", 0, "float32", [4], 16)
    t.apply(RecAlloc(anon))
    assert t.status is CommitStatus.COMMITTED
    t.apply(RecName(anon.handle, "model/w"))
    assert t.status is CommitStatus.TORN and "named outside an update" in t.status_reply().reason
