"""FSDP2 / HSDP jobs under ``mnemo launch`` (real processes, Gloo on loopback, real faults).

The trainer is ``mnemosyne.jit.demo.train_fsdp``: ``fully_shard`` over
``mnemosyne.jit.device_mesh``, 4 ranks as a 2x2 HSDP mesh (replicate x shard) or a
4-rank FSDP one. A faulted HSDP run must end with every rank's local shards and optimizer
state bit for bit equal to the fault-free run's (ranks holding the same shard equal each
other), redo at most one step, fire each fault once and keep every healthy process; the
event log must show that only the groups holding the dead rank were rebuilt for it.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from mnemosyne.core.events import EventKind, read_events
from mnemosyne.jit.testing import check_recovered, launch

pytestmark = pytest.mark.slow

STEPS = 8
MODULE = "mnemosyne.jit.demo.train_fsdp"
SHARD = 2  # HSDP 2x2: rank r holds shard r % 2; replicate groups {0, 2} and {1, 3}


def _launch(out, inject="", *, spares=1, parallel="hsdp", timeout=100.0):
    return launch(out, steps=STEPS, spares=spares, inject=inject, train_args=["--parallel", parallel],
                  timeout=timeout, module=MODULE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = _launch(tmp_path_factory.mktemp("ref"), spares=0)
    assert run.returncode == 0, run.output[-3000:]
    return run


def _repairs(run, epoch):
    """Per rank, the mesh_repair event of ``epoch`` (tags per decision)."""
    return {e.rank: e.fields for e in run.events if e.name == "mesh_repair" and e.epoch == epoch}


@pytest.mark.timeout(120)
def test_hsdp_kill_in_forward_repairs_only_the_dead_ranks_groups(tmp_path, reference):
    plan = "rank=3,step=2,kind=kill,phase=forward"
    run = _launch(tmp_path, plan)
    check_recovered(run, reference, plan, replica_of=lambda r: r % SHARD)
    rep = _repairs(run, 1)
    # Rank 3's groups: replicate group 1 ({1, 3}) and shard group 1 ({2, 3}): rebuilt for it.
    assert rep[1]["dead"] == ["mesh.replicate.1"], rep
    assert rep[2]["dead"] == ["mesh.shard.1"], rep
    assert sorted(rep[3]["built"]) == ["mesh.replicate.1", "mesh.shard.1"], rep
    # No group without rank 3 is rebuilt as "dead"; shard group 0 ({0, 1}) was idle and is kept.
    assert not rep[0]["dead"], rep
    assert "mesh.shard.0" in rep[0]["kept"] and "mesh.shard.0" in rep[1]["kept"], rep
    # The replacement got its shard from its replicate peer (rank 1) only.
    xfer = [e for e in run.events if e.name == "transfer" and e.epoch == 1 and e.fields.get("bytes")]
    assert {(e.rank, e.fields["role"], e.fields["group"]) for e in xfer} == {
        (1, "donor", "mesh.replicate.1"), (3, "receiver", "mesh.replicate.1")}


@pytest.mark.timeout(150)
def test_hsdp_several_faults_heal_bit_for_bit(tmp_path, reference):
    # backward (a later block's reduce-scatter issued), the optimizer, an exception, a hang.
    plan = ("rank=0,step=1,kind=kill,phase=backward;rank=1,step=3,kind=kill,phase=optimizer;"
            "rank=2,step=5,kind=exception,phase=forward;rank=3,step=6,kind=hang,phase=forward")
    run = _launch(tmp_path, plan, spares=2, timeout=140)
    incs = check_recovered(run, reference, plan, replica_of=lambda r: r % SHARD)
    assert all(i.complete for i in incs)


@pytest.mark.timeout(120)
def test_pure_fsdp_lost_shard_stops_the_job_with_a_clear_error(tmp_path):
    plan = "rank=3,step=2,kind=kill,phase=forward"
    run = _launch(tmp_path, plan, parallel="fsdp")
    assert run.returncode != 0
    gave_up = [e for e in run.events if e.kind == EventKind.INFO and e.name == "gave_up"]
    assert len(gave_up) == 1, run.output[-3000:]
    why = gave_up[0].fields["why"]
    assert "lost state" in why and "rank 3's shard" in why and "pure FSDP" in why, why
    # It stopped at the first recovery instead of replacing rank 3 again and again.
    assert len(run.pids()[3]) == 2, run.pids()


@pytest.mark.timeout(120)
def test_the_guides_example_heals_a_kill_in_backward(tmp_path):
    script = Path(__file__).resolve().parents[2] / "examples" / "train_fsdp2_recoverable.py"
    cmd = [sys.executable, "-m", "mnemosyne.cli", "launch", "--nproc-per-node", "4", "--spares", "1",
           "--event-log", str(tmp_path / "events.jsonl"), "--inject", "rank=3,step=6,kind=kill,phase=backward",
           str(script), "--steps", "12"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    events = read_events(tmp_path / "events.jsonl")
    assert [e.fields["steps_redone"] for e in events if e.name == "recovered"] == [1, 1, 1]
    assert sum(1 for e in events if e.kind == EventKind.FAULT) == 1
