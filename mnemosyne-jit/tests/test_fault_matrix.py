"""The fault matrix's covering set (real 4-rank Gloo jobs under ``mnemo launch``).

Every fault kind and every phase runs at least once, several faults per job (a plan
with faults at different steps), so the set stays within a few minutes of CI. The full
kind x phase cross product runs on demand: ``python3 tools/fault_matrix.py``.

A trainer fault must heal in place bit for bit (:func:`mnemosyne.jit.testing.check_recovered`);
the agent's own death must stop the job with no trainer or spare left running.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from mnemosyne.core.events import EventKind, read_events
from mnemosyne.jit.testing import TINY, JobRun, alive, check_recovered, launch, started_pids

pytestmark = pytest.mark.slow

STEPS = 14

#: Job name -> plan. Together: every trainer kind, every phase, first and last step,
#: two ranks at once, a fault during a recovery.
JOBS = {
    # first step; backward (reductions in flight); all-reduce wait; optimizer; forward
    "signals": "rank=1,step=0,kind=kill,phase=forward;rank=2,step=3,kind=hang,phase=backward;"
               "rank=3,step=6,kind=segfault,phase=allreduce;rank=0,step=9,kind=abort,phase=optimizer",
    # os._exit; an exception whose recovery is hit by a kill; two ranks at once; the last step
    "exits": "rank=0,step=2,kind=exit,phase=backward;rank=2,step=5,kind=exception,phase=forward;"
             "rank=3,step=5,kind=kill,phase=recovery;rank=1,step=9,kind=kill,phase=allreduce;"
             "rank=2,step=9,kind=segfault,phase=allreduce;rank=3,step=13,kind=exception,phase=optimizer",
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = launch(tmp_path_factory.mktemp("ref"), steps=STEPS, timeout=100)
    assert run.returncode == 0, run.output[-3000:]
    return run


@pytest.mark.timeout(110)
@pytest.mark.parametrize("job", list(JOBS))
def test_several_faults_in_one_job_heal_bit_for_bit(tmp_path, reference, job):
    run = launch(tmp_path, steps=STEPS, spares=2, inject=JOBS[job], timeout=100)
    incs = check_recovered(run, reference, JOBS[job])
    assert all(i.complete for i in incs)


def _start(out, steps, *, inject="", spares=1, sleep=0.2):
    cmd = [sys.executable, "-m", "mnemosyne.cli", "launch", "--nproc-per-node", "4", "--spares", str(spares),
           "--event-log", str(out / "events.jsonl")]
    if inject:
        cmd += ["--inject", inject]
    cmd += ["-m", "mnemosyne.jit.demo.train", "--steps", str(steps), "--out", str(out), "--step-sleep", str(sleep),
            *TINY]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _events(out):
    log = out / "events.jsonl"
    return read_events(log, strict=False) if log.exists() else []


def _wait_for(out, pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = _events(out)
        if pred(ev):
            return ev
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _children(out):
    ev = _events(out)
    pids = [int(e.fields["pid"]) for e in ev if e.name in ("trainer_start", "spare_start")]
    return pids + [p for ps in started_pids(out).values() for p in ps]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_agent_death_leaves_no_trainer_running(tmp_path, sig):
    """SIGKILL of the agent (single node: it hosts the store, so this is also the store host's loss)
    or SIGTERM: every trainer and spare is gone within seconds."""
    proc = _start(tmp_path, 100000)
    try:
        _wait_for(tmp_path, lambda ev: sum(e.kind == EventKind.RECOVERED for e in ev) >= 4, 60, "the job to start")
        pids = _children(tmp_path)
        assert len(alive(pids)) >= 5, pids  # four trainers and the spare
        proc.send_signal(sig)
        t0 = time.monotonic()
        proc.communicate(timeout=30)
        left = alive(pids)
        while left and time.monotonic() - t0 < 10:
            time.sleep(0.1)
            left = alive(pids)
        gone_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not left, f"orphans left {gone_s:.1f} s after the agent's {sig.name}: {left}"
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig)
    if sig == signal.SIGTERM:
        assert [e.fields["signal"] for e in _events(tmp_path) if e.name == "stopped"] == ["SIGTERM"]


@pytest.mark.timeout(110)
def test_spare_killed_while_warming_then_a_rank_fault_heals(tmp_path, reference):
    plan = "rank=2,step=8,kind=kill,phase=forward"
    proc = _start(tmp_path, STEPS, inject=plan, sleep=0.3)
    try:
        ev = _wait_for(tmp_path, lambda ev: any(e.name == "spare_start" for e in ev), 30, "the spare")
        spare = next(int(e.fields["pid"]) for e in ev if e.name == "spare_start")
        os.kill(spare, signal.SIGKILL)  # it is still importing torch
        output, _ = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    run = JobRun(proc.returncode, tmp_path, _events(tmp_path), output.decode(errors="replace"))
    check_recovered(run, reference, plan)
    assert not any(e.name == "spare_ready" and e.fields.get("pid") == spare for e in run.events)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["kill", "hang"])
def test_a_writer_lost_during_the_checkpoint_stops_every_writer_within_seconds(tmp_path, kind):
    """Rank 2 dies under --no-replace; rank 1 dies (or freezes: the agent ends it) while
    writing the just-in-time checkpoint. The agent publishes that writer's death, so every
    other writer fails within seconds naming rank 1 (not after its 120 s store timeout),
    nothing is taken for good and no process is left."""
    from mnemosyne.jit import ckpt

    plan = f"rank=2,step=4,kind=kill,phase=forward;rank=1,step=3,kind={kind},phase=checkpoint"
    root = tmp_path / "ckpts"
    run = launch(tmp_path, steps=8, inject=plan, timeout=80, launch_args=["--no-replace", "--ckpt-dir", str(root)])
    assert run.returncode not in (0, -9), run.output[-3000:]
    fault = next(e for e in run.events if e.kind == EventKind.FAULT and e.fields.get("phase") == "checkpoint")
    failed = [e for e in run.events if e.name == "ckpt_failed"]
    assert {e.rank for e in failed} == {0, 3}, [(e.rank, e.fields) for e in failed]
    for e in failed:
        assert "rank 1" in e.fields["cause"] and "died" in e.fields["cause"], e.fields["cause"]
        assert e.ts - fault.ts < 10.0, f"rank {e.rank} failed {e.ts - fault.ts:.1f} s after the fault"
    assert not [c for c in ckpt.list_checkpoints(root) if c.complete] if root.exists() else True
    gave_up = [e for e in run.events if e.name == "gave_up"]
    assert gave_up and "checkpoint" in gave_up[-1].fields["why"], gave_up
    time.sleep(1.0)
    assert not alive(_children(tmp_path)), "processes left running"
