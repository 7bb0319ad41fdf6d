"""Just-in-time checkpoints written by 4 real processes; atomicity under SIGKILL; corruption refused."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from mnemosyne.ccl.store_server import StoreServer
from mnemosyne.core.errors import CorruptStateError, StateError
from mnemosyne.core.store import DictStore
from mnemosyne.jit import ckpt
from mnemosyne.jit.testing.ckpt_worker import demo_state

pytestmark = pytest.mark.slow

WORLD = 4
STEP = 3


def _raw_equal(a, b) -> list[str]:
    """Paths where two nested states differ (tensors compared byte for byte, scalars by type and value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
              and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
        return [] if ok else ["tensor"]
    if isinstance(a, dict) and isinstance(b, dict):  # state_dict() is an OrderedDict, load gives a dict
        if list(a) != list(b):
            return [f"keys {list(a)} != {list(b)}"]
        return [f"{k}/{d}" for k in a for d in _raw_equal(a[k], b[k])]
    if type(a) is not type(b):
        return [f"type {type(a).__name__} != {type(b).__name__}"]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return ["length"]
        return [f"{i}/{d}" for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _raw_equal(x, y)]
    return [] if a == b else [f"{a!r} != {b!r}"]


def _write(root: Path, *, stall: str = "", stall_rank: int = -1, timeout: float = 60.0, fail: str = "",
           fail_rank: int = -1, exited: dict[int, float] | None = None):
    """Run WORLD writer processes against a real TCP store; return (procs, outputs).

    ``exited`` receives each writer's exit time (``time.monotonic()``, within 50 ms).
    """
    job, token = "ck", uuid.uuid4().hex
    srv = StoreServer(jobs={job: token}).start()
    sig = root / "stalled"
    procs = []
    try:
        for r in range(WORLD):
            cmd = [sys.executable, "-m", "mnemosyne.jit.testing.ckpt_worker", "--addr", srv.address, "--job", job,
                   "--token", token, "--rank", str(r), "--world", str(WORLD), "--dir", str(root), "--step",
                   str(STEP), "--timeout", str(timeout)]
            if r == stall_rank:
                cmd += ["--stall", stall, "--signal", str(sig)]
            if r == fail_rank:
                cmd += ["--fail", fail]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        if stall:
            deadline = time.monotonic() + 60
            while not sig.exists():
                assert time.monotonic() < deadline, "the stalled writer never reached its phase"
                assert procs[stall_rank].poll() is None, procs[stall_rank].communicate()[0].decode()[-2000:]
                time.sleep(0.05)
            os.kill(procs[stall_rank].pid, signal.SIGKILL)
        if exited is not None:
            deadline = time.monotonic() + 90
            while len(exited) < WORLD and time.monotonic() < deadline:
                for r, p in enumerate(procs):
                    if r not in exited and p.poll() is not None:
                        exited[r] = time.monotonic()
                time.sleep(0.05)
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=90)[0].decode(errors="replace"))
            except subprocess.TimeoutExpired:
                p.kill()
                outs.append(p.communicate()[0].decode(errors="replace") + "\n<killed: timeout>")
        return procs, outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        srv.stop()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpts")
    procs, outs = _write(root)
    assert [p.returncode for p in procs] == [0] * WORLD, "\n".join(o[-2000:] for o in outs)
    return root / ckpt.checkpoint_name(STEP)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnemosyne.cli", "ckpt", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # the plain dcp.load below
def test_four_writers_share_the_work_and_load_is_bit_exact(good: Path) -> None:
    report = ckpt.verify(good)
    man = report.manifest
    assert man["step"] == STEP and man["world_size"] == WORLD and man["meta"] == {"seed": 0}
    owners = {k["owner"] for k in man["keys"].values()}
    assert owners == set(range(WORLD)), "every replica writes a part"
    assert sorted(p.name for p in good.iterdir()) == [".metadata", ckpt.MANIFEST] + [f"shard-{r:05d}"
                                                                                      for r in range(WORLD)]
    assert not list(good.parent.glob(f"*{ckpt.STAGING_MARK}*")), "the staging dir was renamed, not copied"
    state, manifest = ckpt.load(good)
    want = demo_state(steps=STEP)
    assert _raw_equal(want, state) == []
    assert manifest["step"] == STEP
    # Into a template: model tensors are filled in place, and the result restores a real optimizer.
    torch.manual_seed(123)
    fresh = demo_state(steps=1)
    tmpl_w = fresh["model"]["0.weight"]
    state2, _ = ckpt.load(good, {"model": fresh["model"]})
    assert state2["model"]["0.weight"] is tmpl_w
    assert _raw_equal(want, state2) == []
    # It is one plain DCP checkpoint as well: dcp.load reads a key without our reader.
    import torch.distributed.checkpoint as dcp

    t = {"model/0.weight": torch.empty_like(want["model"]["0.weight"])}
    dcp.load(t, checkpoint_id=str(good), no_dist=True)
    assert torch.equal(t["model/0.weight"], want["model"]["0.weight"])


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("victim", "phase"), [(2, "shard"), (0, "manifest")])
def test_writer_killed_mid_write_leaves_no_checkpoint(tmp_path: Path, victim: int, phase: str) -> None:
    procs, outs = _write(tmp_path, stall=phase, stall_rank=victim, timeout=20.0)
    assert procs[victim].returncode == -signal.SIGKILL
    assert all(p.returncode != 0 for p in procs), "no writer may report success without a commit"
    survivors = [outs[r] for r in range(WORLD) if r != victim]
    if victim == 2:  # the coordinator names the missing writer, the others relay its verdict
        assert all("writer ranks [2] did not report" in o or "writers [2] did not report" in o for o in survivors), \
            survivors
    else:
        assert all("committed" in o and "Timeout" in o for o in survivors), survivors
    assert not (tmp_path / ckpt.checkpoint_name(STEP)).exists()
    entries = ckpt.list_checkpoints(tmp_path)
    assert len(entries) == 1 and not entries[0].complete and ckpt.STAGING_MARK in entries[0].path.name
    if phase == "manifest":  # everything but the manifest and the rename was done: still not a checkpoint
        assert (entries[0].path / ".metadata").exists()
        with pytest.raises(CorruptStateError, match="manifest"):
            ckpt.load(entries[0].path)
    r = _cli("ls", str(tmp_path))
    assert r.returncode == 0 and "INCOMPLETE" in r.stdout and "staging" in r.stdout, r.stdout + r.stderr
    assert ckpt.remove_staging(tmp_path) == [entries[0].path]
    assert ckpt.list_checkpoints(tmp_path) == []


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("victim", "phase"), [(2, "shard"), (0, "manifest")])
def test_writer_oserror_stops_every_writer_naming_it(tmp_path: Path, victim: int, phase: str) -> None:
    """A full disk on one writer (before it reports, or the coordinator before its manifest): every
    writer exits within 10 s, not after its 60 s timeout, with a MultiRankError naming rank and error."""
    exited: dict[int, float] = {}
    procs, outs = _write(tmp_path, fail=phase, fail_rank=victim, timeout=60.0, exited=exited)
    assert all(p.returncode not in (0, None) for p in procs), outs
    assert len(exited) == WORLD
    assert max(exited.values()) - exited[victim] < 10.0, exited
    for out in outs:
        assert "MultiRankError" in out and f"rank {victim}: OSError: [Errno {errno.ENOSPC}] No space left on device" \
            in out, out[-3000:]
    assert not (tmp_path / ckpt.checkpoint_name(STEP)).exists()
    entries = ckpt.list_checkpoints(tmp_path)
    assert len(entries) == 1 and not entries[0].complete


def _truncate(p: Path) -> str:
    f = p / "shard-00001" / "__0_0.distcp"
    os.truncate(f, f.stat().st_size // 2)
    return "shard-00001/__0_0.distcp is .* bytes, expected"


def _flip(p: Path) -> str:
    f = p / "shard-00002" / "__0_0.distcp"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    f.write_bytes(bytes(raw))
    return "shard-00002/__0_0.distcp has sha256 .* expected"


def _flip_metadata(p: Path) -> str:
    f = p / ".metadata"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x01
    f.write_bytes(bytes(raw))
    return r"\.metadata has sha256"


def _no_manifest(p: Path) -> str:
    (p / ckpt.MANIFEST).unlink()
    return "manifest mnemosyne-ckpt.json is missing"


def _bad_manifest(p: Path) -> str:
    f = p / ckpt.MANIFEST
    f.write_text(f.read_text()[:-40])
    return "manifest mnemosyne-ckpt.json is not valid JSON"


def _missing_file(p: Path) -> str:
    (p / "shard-00003" / "__0_0.distcp").unlink()
    return "shard-00003/__0_0.distcp is missing"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("damage", [_truncate, _flip, _flip_metadata, _no_manifest, _bad_manifest, _missing_file])
def test_damaged_checkpoint_is_refused(good: Path, tmp_path: Path, damage) -> None:
    bad = tmp_path / good.name
    shutil.copytree(good, bad)
    ckpt.verify(bad)  # the copy is fine before the damage
    pattern = damage(bad)
    with pytest.raises(CorruptStateError, match=pattern):
        ckpt.verify(bad)
    tmpl = demo_state(steps=1)
    before = tmpl["model"]["0.weight"].clone()
    with pytest.raises(CorruptStateError, match=pattern):
        ckpt.load(bad, tmpl)
    assert torch.equal(tmpl["model"]["0.weight"], before), "a refused load must not touch the template"


@pytest.mark.timeout(240)
def test_cli_ls_inspect_verify(good: Path, tmp_path: Path) -> None:
    r = _cli("ls", str(good.parent))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if good.name in ln)
    assert f" {STEP} " in line and f" {WORLD} " in line and "complete" in line and "INCOMPLETE" not in line
    r = _cli("inspect", str(good))
    assert r.returncode == 0, r.stderr
    assert "optim/state/0/exp_avg" in r.stdout and "float32" in r.stdout and "64x16" in r.stdout
    assert f"step         {STEP}" in r.stdout
    r = _cli("verify", str(good))
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stdout + r.stderr
    bad = tmp_path / good.name
    shutil.copytree(good, bad)
    _truncate(bad)
    r = _cli("verify", str(bad))
    assert r.returncode == 1 and "shard-00001/__0_0.distcp" in r.stderr and "expected" in r.stderr, r.stderr
    (bad / ckpt.MANIFEST).unlink()
    r = _cli("inspect", str(bad))
    assert r.returncode == 1 and "manifest mnemosyne-ckpt.json is missing" in r.stderr, r.stderr


@pytest.mark.timeout(60)
def test_threads_and_refusals(tmp_path: Path) -> None:
    """DictStore with threads works too; an existing target and a non-writer rank are refused."""
    import threading

    state = demo_state(steps=2)
    store = DictStore()
    errors: list[BaseException] = []

    def run(r: int) -> None:
        try:
            ckpt.write(tmp_path / "c", state, step=2, rank=r, world_size=3, store=store, writer_ranks=[0, 2])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert {k["owner"] for k in ckpt.read_manifest(tmp_path / "c")["keys"].values()} == {0, 2}
    assert _raw_equal(state, ckpt.load(tmp_path / "c")[0]) == []
    assert ckpt.latest(tmp_path) == tmp_path / "c"
    (tmp_path / "c.tmp-deadbeef").mkdir()  # a leftover of a newer, interrupted write is never picked
    assert ckpt.latest(tmp_path) == tmp_path / "c"
    with pytest.raises(StateError, match="already exists"):
        ckpt.write(tmp_path / "c", state, step=2, rank=0, world_size=3, store=DictStore())
    with pytest.raises(StateError, match="not among the writer ranks"):
        ckpt.write(tmp_path / "d", state, step=2, rank=1, world_size=3, store=DictStore(), writer_ranks=[0, 2])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_ls_checks_sizes_and_resume_names_the_older_checkpoint_that_verifies(good: Path, tmp_path: Path,
                                                                              damage) -> None:
    from mnemosyne.jit.cli import _resolve_resume

    root = tmp_path / "ckpts"
    older = root / good.name
    shutil.copytree(good, older)
    newer = root / ckpt.checkpoint_name(STEP + 5)
    shutil.copytree(good, newer)
    manifest = json.loads((newer / ckpt.MANIFEST).read_text())
    manifest["step"] = STEP + 5
    (newer / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert _resolve_resume(str(root), WORLD) == str(newer.resolve())  # both fine: the newest
    damage(newer)
    entries = {e.path.name: e for e in ckpt.list_checkpoints(root)}
    if damage is _truncate:  # a size off: ls no longer calls it complete
        assert not entries[newer.name].complete and "expected" in entries[newer.name].note
        r = _cli("ls", str(root))
        assert "INCOMPLETE" in next(ln for ln in r.stdout.splitlines() if newer.name in ln), r.stdout
    with pytest.raises(CorruptStateError, match=rf"the older checkpoint {older}.*verifies: resume with --resume"):
        _resolve_resume(str(root), WORLD)
