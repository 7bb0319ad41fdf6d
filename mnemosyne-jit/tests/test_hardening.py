"""Security and bad-input hardening of ``mnemo launch`` (issue 17): real processes, files and uids."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mnemosyne.core.errors import ConfigError
from mnemosyne.core.events import EventLog
from mnemosyne.core.files import private_dir, write_private
from mnemosyne.jit._agent_config import job_info_dir

pytestmark = pytest.mark.timeout(90)

_NOBODY = 65534


def _mnemo(*args, cwd, env=None):
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "mnemosyne.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=full)


def _as_nobody(fn):
    """Run ``fn`` in a forked child that dropped to uid/gid 65534 (nobody); return its exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
            fn()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create the attacker's folder as a second uid (nobody)")
def test_takeover_by_another_uid_is_refused_before_the_token_is_written(tmp_path):
    # pytest's tmp_path is 0700: the other uid could not reach it. A 1777 folder under /tmp can.
    shared = Path(tempfile.mkdtemp(prefix="mnemo-shared-", dir="/tmp"))
    os.chmod(shared, 0o1777)  # like /tmp
    try:
        _takeover(tmp_path, shared)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _takeover(tmp_path, shared):
    trap = shared / f"mnemosyne-{os.getuid()}"

    def plant():
        os.mkdir(trap, 0o777)
        os.chmod(trap, 0o777)
        fd = os.open(trap / "victimjob.json", os.O_CREAT | os.O_WRONLY, 0o666)
        os.fchmod(fd, 0o666)
        os.close(fd)

    assert _as_nobody(plant) == 0
    assert os.stat(trap).st_uid == _NOBODY
    script = tmp_path / "train.py"
    script.write_text("print('never runs')\n")
    res = _mnemo("launch", "--nproc-per-node", "1", "--spares", "0", "--job-id", "victimjob", str(script),
                 cwd=tmp_path, env={"XDG_RUNTIME_DIR": str(shared)})
    assert res.returncode == 1, res.stderr
    assert str(trap) in res.stderr and "uid 65534" in res.stderr and "mode 777" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert (trap / "victimjob.json").read_bytes() == b""  # the token never reached the attacker's file
    assert not (tmp_path / "mnemo-events").exists()  # refused before anything was written


def test_runtime_folder_open_to_others_or_a_symlink_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    folder = tmp_path / f"mnemosyne-{os.getuid()}"
    folder.mkdir()
    os.chmod(folder, 0o777)
    with pytest.raises(ConfigError, match=r"mode 777.*must belong to"):
        job_info_dir()
    os.chmod(folder, 0o700)
    assert job_info_dir() == folder
    folder.rename(tmp_path / "elsewhere")
    folder.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="is a symlink"):
        job_info_dir()
    fresh = private_dir(tmp_path / "new" / "dir")
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700


def test_secret_file_never_follows_a_planted_file_or_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    info = tmp_path / "job.json"
    info.symlink_to(victim)
    write_private(info, json.dumps({"token": "s3cret"}).encode())
    assert victim.read_text() == "untouched"
    assert not info.is_symlink() and json.loads(info.read_text()) == {"token": "s3cret"}
    assert stat.S_IMODE(os.stat(info).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.json", "victim.txt"]  # no temp file left


def test_event_log_is_owner_only_and_a_bad_path_is_a_config_error(tmp_path):
    log = EventLog(tmp_path / "events" / "j.jsonl", "j")
    log.emit("info", "x")
    log.close()
    assert stat.S_IMODE(os.stat(tmp_path / "events").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "events" / "j.jsonl").st_mode) == 0o600
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"event log .*cannot create it"):
        EventLog(tmp_path / "file" / "sub" / "j.jsonl", "j")


@pytest.mark.parametrize(("args", "env", "expect"), [
    (["--hang-timeout", "0"], {}, "--hang-timeout must be > 0"),
    ([], {"MNEMOSYNE_HANG_TIMEOUT": "-5"}, "MNEMOSYNE_HANG_TIMEOUT=-5: must be > 0"),
    (["--max-restarts", "-1"], {}, "--max-restarts must be >= 0"),
    (["--node-timeout", "-2"], {}, "--node-timeout must be > 0"),
    (["--stopped-timeout", "0"], {}, "--stopped-timeout must be > 0"),
    (["--inject", "rank=99,step=1,kind=kill"], {}, "rank 99 is not in this job"),
    (["--master", "127.0.0.1:99999"], {}, "port 99999 is outside 0..65535"),
    (["--job-id", "../.."], {}, "--job-id '../..': expected"),
    ([], {"MNEMOSYNE_LOG_LEVEL": "LOUD"}, "MNEMOSYNE_LOG_LEVEL='LOUD': expected one of"),
    (["--event-log", "/proc/self/nope/e.jsonl"], {}, "nope/e.jsonl: cannot create it"),
])
def test_bad_values_are_refused_up_front_without_a_traceback(tmp_path, args, env, expect):
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit('must never run')\n")
    res = _mnemo("launch", "--nproc-per-node", "2", "--spares", "0", *args, str(script), cwd=tmp_path,
                 env={"XDG_RUNTIME_DIR": str(tmp_path / "run"), **env})
    assert res.returncode in (1, 2), res
    assert expect in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "mnemo-events").exists()
    assert not (tmp_path / "run" / f"mnemosyne-{os.getuid()}").exists() or not any(
        (tmp_path / "run" / f"mnemosyne-{os.getuid()}").iterdir())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_jit_checkpoint_on_a_full_disk_names_it_and_leaves_nothing(tmp_path):
    from mnemosyne.jit import ckpt
    from mnemosyne.jit._protocol import EXIT_CKPT_FAILED
    from mnemosyne.jit.testing import launch

    # A real full disk needs a small filesystem: this suite runs as root (CI and the dev machines do), so a
    # machine where it cannot mount one fails here, saying so, instead of silently proving nothing.
    if os.geteuid() != 0:
        pytest.fail("this test needs root to mount a 16 KiB tmpfs (the full disk); run the suite as root")
    root = tmp_path / "small"
    root.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(root)], capture_output=True)
    if mount.returncode != 0:
        pytest.fail(f"mount -t tmpfs (the full disk) is not permitted here: {mount.stderr.decode().strip()}")
    try:
        run = launch(tmp_path / "run", nproc=2, spares=0, steps=6, timeout=100,
                     inject="rank=1,step=3,kind=kill,phase=forward",
                     launch_args=["--no-replace", "--ckpt-dir", str(root / "ckpts")])
        assert run.returncode != 0 and run.returncode != 3, run.output[-3000:]
        failed = [e for e in run.events if e.name == "ckpt_failed"]
        assert failed and "disk full at" in failed[0].fields["cause"], run.output[-3000:]
        exits = [e for e in run.events if e.name == "trainer_ckpt_exit"]
        assert exits and all(e.fields["code"] == EXIT_CKPT_FAILED for e in exits)
        assert "CheckpointException" not in run.output or "disk full at" in run.output
        assert not list((root / "ckpts").glob("*")), list((root / "ckpts").iterdir())  # no staging leftover
        assert ckpt.latest(root / "ckpts") is None
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.mark.slow
def test_a_trainer_that_fails_before_init_ends_the_job_at_once(tmp_path):
    res = _mnemo("launch", "--nproc-per-node", "2", "--spares", "0", str(tmp_path / "missing.py"), cwd=tmp_path)
    assert res.returncode == 1 and "does not exist" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = _mnemo("launch", "--nproc-per-node", "2", "--spares", "0", "-m", "no_such_module_xyz", cwd=tmp_path)
    assert res.returncode == 1 and "no module named 'no_such_module_xyz'" in res.stderr, res.stderr
    script = tmp_path / "broken.py"
    script.write_text("raise ImportError('the trainer cannot import its model code')\n")
    res = _mnemo("launch", "--nproc-per-node", "2", "--spares", "1", "--max-restarts", "5", str(script),
                 cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "usage error" in res.stderr and "before it reached mnemosyne.jit.init" in res.stderr, res.stderr
    events = [json.loads(line) for p in (tmp_path / "mnemo-events").glob("*.jsonl") for line in p.open()]
    assert len([e for e in events if e["name"] == "epoch"]) == 1  # never a replacement epoch
    # Each of the 2 ranks' own traceback at most once (its source line quotes the text too): no replacement's.
    assert res.stderr.count("ImportError: the trainer cannot import its model code") <= 2
