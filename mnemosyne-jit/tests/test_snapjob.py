"""Snapshots inside real jobs (``mnemo launch --snapshot-every N``, world 2, Gloo on loopback, real SIGKILL).

* Every rank killed at once: no live replica is left, every replacement restores its own
  holder's snapshot and the job resumes after the snapshot step, bit for bit equal to
  the fault-free run (was: a restart at step 0).
* The newest generation of one rank corrupted before the kill: the older common
  generation is used, still bit for bit.
* One rank killed: the live replica heals it as before (snapshots are not used).
"""

import json
import os
import threading
import time
from pathlib import Path

import pytest

from mnemosyne.core.events import EventKind
from mnemosyne.jit import _snapstore
from mnemosyne.jit._snapdir import holder_path, snapshot_root
from mnemosyne.jit.testing import launch

slow = pytest.mark.slow

STEPS = 16
EVERY = 4
WORLD = 2
TINY2 = ["--layers", "1", "--dim", "16", "--heads", "2", "--block", "8", "--vocab", "32", "--batch", "2",
         "--samples", "128", "--bucket-kb", "16"]


@pytest.fixture
def plan():
    from mnemosyne.jit import _keys
    from mnemosyne.jit._recovery import Rendezvous, agree
    from mnemosyne.jit._store import host_store

    store, ev = host_store(), threading.Event()

    def run(epoch, others, mine, snaps):
        for r, (c, sn) in others.items():
            store.set(_keys.committed(epoch, r), json.dumps({"committed": c, "started": -1, "snaps": sn}).encode())
        return agree(Rendezvous(store, epoch, 0, ev, 5), [0, *others], mine, -1, snaps=snaps)

    return run


@pytest.mark.timeout(30)
def test_agreement_takes_the_newest_common_snapshot_only_when_nobody_holds_state(plan):
    from mnemosyne.jit._recovery import NO_STATE

    p = plan(1, {1: (NO_STATE, [3, 7])}, NO_STATE, [7, 11])
    assert (p.top, p.donors, p.receivers, p.source, p.resume_step) == (7, [0, 1], [], "snapshot", 8)
    p = plan(2, {1: (NO_STATE, [3])}, NO_STATE, [7, 11])  # no common step: the old first-start rule
    assert (p.top, p.donors, p.receivers, p.source) == (-1, [0], [1], "initial")
    p = plan(3, {1: (NO_STATE, [])}, NO_STATE, [7, 11])  # one holder empty (or every slot corrupt)
    assert (p.top, p.source) == (-1, "initial")
    p = plan(4, {1: (9, None), 2: (NO_STATE, [7])}, NO_STATE, [7])  # a live replica wins
    assert (p.top, p.donors, p.receivers, p.source) == (9, [1], [0, 2], "replica")


@pytest.mark.timeout(30)
def test_newcomers_create_the_communicator_when_nobody_holds_one():
    from mnemosyne.jit import _keys
    from mnemosyne.jit._recovery import Rendezvous, joins
    from mnemosyne.jit._store import host_store

    store, ev = host_store(), threading.Event()
    store.set(_keys.comm_holder(1, 1), b"1")
    assert joins(Rendezvous(store, 1, 0, ev, 5), [0, 1], newcomer=True)  # a survivor builds, we join
    store.set(_keys.comm_holder(2, 1), b"0")
    assert not joins(Rendezvous(store, 2, 0, ev, 5), [0, 1], newcomer=True)  # every rank new: create
    assert not joins(Rendezvous(store, 3, 0, ev, 5), [0, 1], newcomer=False)  # a holder never waits
    assert store.get(_keys.comm_holder(3, 0)) == b"1"


def test_holder_generations_skip_a_corrupt_slot_and_drop_newer(tmp_path):
    base = tmp_path / "r0"
    _snapstore.write_generation(base, 3, b"{}", b"a" * 100)
    _snapstore.write_generation(base, 7, b"{}", b"b" * 100)
    assert [g.step for g in _snapstore.generations(base)] == [7, 3]
    newest = next(p for p in _snapstore._slot_paths(base) if _snapstore._read_head(p)[2] == 7)
    raw = bytearray(newest.read_bytes())
    raw[-1] ^= 0xFF
    newest.write_bytes(bytes(raw))
    assert [g.step for g in _snapstore.generations(base)] == [3]
    assert _snapstore.drop_newer(base, 3) == [7]
    assert [g.step for g in _snapstore.generations(base)] == [3]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = launch(tmp_path_factory.mktemp("ref"), nproc=WORLD, spares=0, steps=STEPS, train_args=TINY2, timeout=60)
    assert run.returncode == 0, run.output[-3000:]
    return run


def _job_id(tag: str) -> str:
    return f"snapjob-{os.getpid()}-{tag}"


def _recovered(run):
    return [e for e in run.events if e.kind == EventKind.RECOVERED and e.fields.get("resume_step", 0) > 0]


def _check_equal(run, reference):
    from mnemosyne.jit.testing import compare_final_states

    assert run.returncode == 0, run.output[-4000:]
    diffs = compare_final_states(reference.out, run.out, WORLD)
    assert not diffs, diffs[:10]


def _both_killed(step: int) -> str:
    return ";".join(f"rank={r},step={step},kind=kill,phase=forward" for r in range(WORLD))


@slow
@pytest.mark.timeout(90)
def test_every_rank_killed_resumes_from_the_snapshot_bit_for_bit(tmp_path, reference):
    job = _job_id("all")
    run = launch(tmp_path, nproc=WORLD, spares=2, steps=STEPS, inject=_both_killed(10), train_args=TINY2,
                 launch_args=["--snapshot-every", str(EVERY), "--job-id", job], timeout=80)
    _check_equal(run, reference)
    faults = [e for e in run.events if e.kind == EventKind.FAULT]
    assert len(faults) == WORLD
    rec = _recovered(run)
    # Snapshots at steps 3 and 7 (after every 4 committed steps); killed in step 10.
    assert {e.rank for e in rec if e.fields["source"] == "snapshot"} == set(range(WORLD)), rec
    assert all(e.fields["resume_step"] == 8 for e in rec if e.fields["source"] == "snapshot"), rec
    redone = max(f.fields["step"] for f in faults) - 8 + 1
    assert redone <= EVERY + 1, redone
    assert any(e.name == "snapshot_restore" for e in run.events)
    assert not snapshot_root(job, 0).exists(), "the agent must remove the holders with the job"


def _corrupt_newest_when_complete(root: Path, rank: int, step: int, done: threading.Event, stop: threading.Event):
    """Flip one payload byte of ``rank``'s generation of ``step`` as soon as it is complete."""
    base = holder_path(root, rank)
    while not stop.is_set():
        for p in _snapstore._slot_paths(base):
            h = _snapstore._read_head(p)
            if h is not None and h[0] == _snapstore._COMPLETE and h[2] == step:
                off = _snapstore._data_offset(h[3])
                with p.open("r+b") as f:
                    f.seek(off + 5)
                    b = f.read(1)
                    f.seek(off + 5)
                    f.write(bytes([b[0] ^ 0xFF]))
                done.set()
                return
        time.sleep(0.005)


@slow
@pytest.mark.timeout(90)
def test_corrupt_newest_generation_falls_back_to_the_older_one(tmp_path, reference):
    job = _job_id("corrupt")
    root = snapshot_root(job, 0)
    done, stop = threading.Event(), threading.Event()
    # Snapshot of step 11 corrupted on rank 0 as soon as it is committed; both ranks killed in
    # step 13 (slow steps leave the watcher ~0.5 s): rank 0 holds 7 (11 fails its digest),
    # rank 1 holds 7 and 11, so 7 is the newest common step.
    watcher = threading.Thread(target=_corrupt_newest_when_complete, args=(root, 0, 11, done, stop), daemon=True)
    watcher.start()
    try:
        run = launch(tmp_path, nproc=WORLD, spares=2, steps=STEPS, inject=_both_killed(13),
                     train_args=[*TINY2, "--step-sleep", "0.25"],
                     launch_args=["--snapshot-every", str(EVERY), "--job-id", job], timeout=80)
    finally:
        stop.set()
        watcher.join(5)
    assert done.is_set(), "the generation of step 11 never appeared"
    _check_equal(run, reference)
    rec = [e for e in _recovered(run) if e.fields["source"] == "snapshot"]
    assert {e.rank for e in rec} == set(range(WORLD)), _recovered(run)
    assert all(e.fields["resume_step"] == 8 for e in rec), rec
    assert not root.exists()


@slow
@pytest.mark.timeout(90)
def test_one_rank_killed_heals_from_the_live_replica(tmp_path, reference):
    job = _job_id("one")
    plan = "rank=1,step=10,kind=kill,phase=forward"
    run = launch(tmp_path, nproc=WORLD, spares=1, steps=STEPS, inject=plan, train_args=TINY2,
                 launch_args=["--snapshot-every", str(EVERY), "--job-id", job], timeout=80)
    _check_equal(run, reference)
    rec = _recovered(run)
    assert rec and all(e.fields["source"] == "replica" for e in rec), rec
    assert {e.fields["resume_step"] for e in rec} == {10}, rec
    assert not any(e.name == "snapshot_restore" for e in run.events)
    pids = run.pids()
    assert len(pids[0]) == 1 and len(pids[1]) >= 2, pids
    snaps = [e for e in run.events if e.name == "snapshots"]
    assert snaps and all(e.fields["captures"] >= 1 for e in snaps), snaps
