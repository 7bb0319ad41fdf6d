"""Just-in-time checkpoint and ``mnemo launch --resume`` (real 4-rank Gloo jobs, real SIGKILL, real files).

A job launched with ``--no-replace`` whose rank dies writes a checkpoint from its healthy
ranks and exits with code 3; ``--resume`` from it must end bit for bit equal to the
fault-free run, losing at most the failed step. A truncated checkpoint is refused before
any trainer starts.
"""

import shutil

import pytest

from mnemosyne.core.events import EventKind
from mnemosyne.jit import ckpt
from mnemosyne.jit.agent import EXIT_JOB_CKPT
from mnemosyne.jit.testing import compare_final_states, launch

pytestmark = pytest.mark.slow

STEPS = 8
KILL_STEP = 4


@pytest.fixture(scope="module")
def jit_ckpt(tmp_path_factory):
    """A fault-free reference run and a --no-replace run killed at KILL_STEP."""
    ref = launch(tmp_path_factory.mktemp("ref"), steps=STEPS, timeout=100)
    assert ref.returncode == 0, ref.output[-3000:]
    out = tmp_path_factory.mktemp("killed")
    root = out / "ckpts"
    run = launch(out, steps=STEPS, inject=f"rank=2,step={KILL_STEP},kind=kill,phase=forward", timeout=100,
                 launch_args=["--no-replace", "--ckpt-dir", str(root)])
    return ref, run, root


@pytest.mark.timeout(240)
def test_jit_checkpoint_then_resume_is_bit_for_bit(tmp_path, jit_ckpt):
    ref, run, root = jit_ckpt
    assert run.returncode == EXIT_JOB_CKPT, run.output[-4000:]
    path = ckpt.latest(root)
    assert path is not None, run.output[-3000:]
    assert str(path) in run.output and "--resume" in run.output
    report = ckpt.verify(path)
    # Rank 2 died in step KILL_STEP's forward: the survivors had committed KILL_STEP - 1.
    assert report.step == KILL_STEP - 1 and report.world_size == 4
    assert report.manifest["writer_ranks"] == [0, 1, 3]
    assert report.manifest["meta"]["job"] and report.manifest["meta"]["seed"] == 0
    assert run.pids()[2][0] and len(run.pids()[2]) == 1  # never replaced
    ckpt_phases = [e for e in run.events if e.kind == EventKind.PHASE and e.name == "ckpt"]
    assert {e.rank for e in ckpt_phases} == {0, 1, 3, -1}
    assert all(e.fields["ok"] for e in ckpt_phases)
    assert all(e.fields["bytes"] > 0 for e in ckpt_phases)

    res = launch(tmp_path, steps=STEPS, timeout=100, launch_args=["--resume", str(root)])
    assert res.returncode == 0, res.output[-4000:]
    diffs = compare_final_states(ref.out, res.out, 4)
    assert not diffs, diffs[:10]
    starts = [e for e in res.events if e.kind == EventKind.RECOVERED and e.name == "start"]
    assert {e.fields["resume_step"] for e in starts} == {KILL_STEP}  # lost: the failed step only
    assert not [e for e in res.events if e.kind == EventKind.DETECT]


@pytest.mark.timeout(60)
def test_resume_refuses_truncated_checkpoint(tmp_path, jit_ckpt):
    _, _, root = jit_ckpt
    src = ckpt.latest(root)
    assert src is not None
    bad = tmp_path / "ckpts" / src.name
    shutil.copytree(src, bad)
    victim = sorted(bad.glob("shard-*/*.distcp"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    res = launch(tmp_path / "run", steps=STEPS, timeout=50, launch_args=["--resume", str(tmp_path / "ckpts")])
    assert res.returncode == 1, res.output[-3000:]
    rel = victim.relative_to(bad).as_posix()
    assert f"file {rel} is {len(data) // 2} bytes, expected {len(data)}" in res.output, res.output[-3000:]
    assert not (tmp_path / "run" / "started").exists()  # no trainer started
    assert not res.events
