"""`mnemo demo` on a pipe (complete progress, whole lines, nothing left in /tmp); process names of ranks."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_on_a_pipe_reaches_the_last_step_and_cleans_up(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "mnemosyne.cli", "demo", "--nproc", "2", "--steps", "6", "--kill-rank", "1",
           "--no-verify"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=110, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "6/6 steps" in out and "5/6 steps" not in out, out
    lines = out.splitlines()
    # Each block starts on its own line (no view line glued to the next table's title).
    assert any(ln.strip().startswith("recovery summary (from the event log)") for ln in lines), out
    assert any(ln.startswith("mnemo launch: recovered rank 1 (kill) in ") for ln in lines), out
    assert "MB from 1 donor " in out  # singular
    assert "\x1b[" not in out  # no cursor movement or colour codes on a pipe
    assert not list(tmp_path.glob("mnemo-demo-*"))  # the temporary work dir is removed


def test_trainer_process_is_named_after_its_rank(tmp_path):
    # What `ps -o comm`, top and pgrep show: mnemo-r<rank> (the command line is unchanged).
    script = tmp_path / "show.py"
    script.write_text("print(open('/proc/self/comm').read().strip())\n")
    env = {**os.environ, "MNEMOSYNE_RANK": "3"}
    res = subprocess.run([sys.executable, "-m", "mnemosyne.jit._bootstrap", "--", str(script)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "mnemo-r3"
