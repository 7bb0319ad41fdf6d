"""``mnemo launch --proxy``: every rank keeps its model and optimizer state in a device proxy.

Real 4-rank jobs (Gloo on loopback, host arenas in real proxy processes, real SIGKILL).
A replacement whose proxy holds a committed step re-attaches to it and receives only the
light state; one whose arena is torn receives everything. Either way the final state is
bit for bit the fault-free run's, which runs without any proxy.
"""

import os
import signal
import threading
import time

import pytest
import torch

from mnemosyne.core.events import EventKind, read_events
from mnemosyne.jit.inject import parse_plans
from mnemosyne.jit.testing import TINY, compare_final_states, launch

pytestmark = pytest.mark.slow

STEPS = 8
PROXY = ["--proxy", "--proxy-size", "64M"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = launch(tmp_path_factory.mktemp("ref"), steps=STEPS, timeout=100)
    assert run.returncode == 0, run.output[-3000:]
    assert not [e for e in run.events if e.name == "proxy_start"]
    return run


def _transfers(run, rank):
    """The replacement's transfer events (after the job's first rendezvous), in order."""
    return [e for e in run.events if e.kind == EventKind.PHASE and e.name == "transfer" and e.rank == rank
            and e.epoch > 0 and e.fields.get("ok")]


def _check(run, reference, plan_text, nproc=4):
    assert run.returncode == 0, run.output[-4000:]
    diffs = compare_final_states(reference.out, run.out, nproc)
    assert not diffs, diffs[:10]
    plans = parse_plans(plan_text)
    faults = [e for e in run.events if e.kind == EventKind.FAULT]
    assert sorted(e.fields["plan"] for e in faults) == sorted(p.to_text() for p in plans)
    assert max(e.fields["steps_redone"] for e in run.events if e.kind == EventKind.RECOVERED) <= 1
    pids = run.pids()
    for rank in range(nproc):
        if rank not in {p.rank for p in plans}:
            assert len(pids[rank]) == 1, f"healthy rank {rank} was restarted: {pids}"
    starts = [e for e in run.events if e.name == "proxy_start"]
    assert sorted(e.fields["local_rank"] for e in starts) == list(range(nproc))  # no proxy died or restarted
    assert not [e for e in run.events if e.name == "proxy_exit"]


def _assert_reattached(ev):
    assert ev.fields["role"] == "reattached", ev.fields
    assert ev.fields["heavy_bytes"] == 0
    # Only the light state came over the wire (a few hundred bytes), the rest was in the arena.
    assert ev.fields["kept_bytes"] > 100 * max(1, ev.fields["bytes"]), ev.fields


@pytest.mark.timeout(120)
def test_proxy_fault_free_equals_plain_run(tmp_path, reference):
    run = launch(tmp_path, steps=STEPS, launch_args=PROXY, timeout=100)
    _check(run, reference, "")
    starts = [e for e in run.events if e.name == "trainer_start"]
    assert len(starts) == 4 and all(e.fields["proxy"] and not e.fields["reattached"] for e in starts)


@pytest.mark.timeout(150)
def test_kill_in_forward_reattaches_to_the_proxy(tmp_path, reference):
    """Rank 1 dies twice in a forward pass: each replacement re-attaches to step k-1 in its arena."""
    plan = "rank=1,step=3,kind=kill,phase=forward;rank=1,step=6,kind=kill,phase=forward"
    run = launch(tmp_path, steps=STEPS, inject=plan, launch_args=PROXY, timeout=130)
    _check(run, reference, plan)
    xfers = _transfers(run, 1)
    assert len(xfers) == 2, [e.fields for e in xfers]
    for ev in xfers:
        _assert_reattached(ev)
    agrees = [e for e in run.events if e.name == "agree" and e.rank == 1 and e.epoch > 0]
    assert [(e.fields["top"], e.fields["partial"]) for e in agrees] == [(2, [1]), (5, [1])]
    starts = [e for e in run.events if e.name == "trainer_start" and e.rank == 1 and e.fields["start_epoch"] > 0]
    assert [(e.fields["arena"], e.fields["arena_step"]) for e in starts] == [("committed", 2), ("committed", 5)]


@pytest.mark.timeout(150)
def test_kill_inside_the_update_receives_everything(tmp_path, reference):
    """A kill inside the optimizer update leaves the arena torn: full transfer from donors.

    The received state is written back into the arena, so when the same rank dies again
    later its next replacement re-attaches.
    """
    plan = "rank=1,step=3,kind=kill,phase=optimizer;rank=1,step=6,kind=kill,phase=forward"
    run = launch(tmp_path, steps=STEPS, inject=plan, launch_args=PROXY, timeout=130)
    _check(run, reference, plan)
    starts = [e for e in run.events if e.name == "trainer_start" and e.rank == 1 and e.fields["start_epoch"] > 0]
    assert [e.fields["arena"] for e in starts] == ["torn", "committed"]
    first, second = _transfers(run, 1)
    assert first.fields["role"] == "receiver" and first.fields["kept_bytes"] == 0
    full = sum(e.fields["bytes"] for e in run.events if e.name == "transfer" and e.epoch == first.epoch
               and e.fields["role"] == "donor")
    assert first.fields["bytes"] == full > 10_000
    _assert_reattached(second)


@pytest.mark.timeout(150)
def test_proxy_death_is_reported_restarted_and_its_trainer_replaced(tmp_path, reference):
    """SIGKILL of local rank 2's proxy: proxy_exit, a new proxy, rank 2 dies at its next marker, full transfer."""
    result = {}
    train = [*TINY, "--step-sleep", "0.3", "--log-steps"]
    job = threading.Thread(target=lambda: result.update(run=launch(tmp_path, steps=STEPS, train_args=train,
                                                                   launch_args=PROXY, timeout=130)))
    job.start()
    log = tmp_path / "events.jsonl"
    killed = None
    deadline = time.monotonic() + 100
    while killed is None and time.monotonic() < deadline and job.is_alive():
        ev = read_events(log, strict=False) if log.exists() else []
        if any(e.name == "step" and e.fields["step"] >= 2 for e in ev):
            (px,) = [e for e in ev if e.name == "proxy_start" and e.fields["local_rank"] == 2]
            os.kill(px.fields["pid"], signal.SIGKILL)
            killed = px.fields["pid"]
        time.sleep(0.05)
    job.join(timeout=140)
    assert killed is not None and "run" in result
    run = result["run"]
    assert run.returncode == 0, run.output[-4000:]
    assert not compare_final_states(reference.out, run.out, 4)
    (gone,) = [e for e in run.events if e.name == "proxy_exit"]
    assert (gone.fields["local_rank"], gone.fields["pid"], gone.fields["returncode"]) == (2, killed, -9)
    assert [e.fields["generation"] for e in run.events if e.name == "proxy_start" and e.fields["local_rank"] == 2] \
        == [1, 2]
    (died,) = [e for e in run.events if e.kind == EventKind.DETECT and e.rank == -1]
    assert died.name == "exception" and died.fields["target_rank"] == 2
    assert "device proxy" in died.fields["error"] and "is gone" in died.fields["error"], died.fields
    (start,) = [e for e in run.events if e.name == "trainer_start" and e.rank == 2 and e.fields["start_epoch"] > 0]
    assert start.fields["arena"] == "torn"
    (xfer,) = _transfers(run, 2)
    assert xfer.fields["role"] == "receiver" and xfer.fields["kept_bytes"] == 0
    pids = run.pids()
    assert all(len(pids[r]) == 1 for r in (0, 1, 3)), pids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs a CUDA GPU (two or more)")
@pytest.mark.timeout(400)
def test_cuda_arena_reattach_bit_for_bit(tmp_path):
    """The kill-in-forward case on GPUs: cuda arenas (CUDA VMM), NCCL, bit-equal to a run without proxy."""
    n = min(4, torch.cuda.device_count())
    ref = launch(tmp_path / "ref", nproc=n, steps=STEPS, timeout=180)
    assert ref.returncode == 0, ref.output[-3000:]
    plan = "rank=1,step=3,kind=kill,phase=forward"
    run = launch(tmp_path / "run", nproc=n, steps=STEPS, inject=plan, launch_args=["--proxy", "--proxy-size", "2G"],
                 timeout=240)
    _check(run, ref, plan, nproc=n)
    assert all(e.fields["device"] == e.fields["local_rank"] for e in run.events if e.name == "proxy_start")
    (xfer,) = _transfers(run, 1)
    _assert_reattached(xfer)
