"""A stopped trainer (SIGSTOP) is found frozen from the node's process table in well under a second.

Real processes and a real store: the agent's :class:`~mnemosyne.jit._health.HangWatch` reads
``/proc/<pid>/stat``; a process stopped for less than the stopped timeout and continued is
left alone, one stopped for longer is killed. (The job-level proof, a SIGSTOP healed under
CPU load with detection < 1 s, is in test_recovery.py.)
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from mnemosyne.jit._agent_config import AgentConfig
from mnemosyne.jit._health import HangWatch, is_stopped
from mnemosyne.jit._spawn import RankStatus
from mnemosyne.jit._store import host_store


def _until(cond, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.timeout(30)
def test_is_stopped_reads_the_process_table(sleeper):
    assert not is_stopped(sleeper.pid)
    os.kill(sleeper.pid, signal.SIGSTOP)
    assert _until(lambda: is_stopped(sleeper.pid), 5.0)
    os.kill(sleeper.pid, signal.SIGCONT)
    assert _until(lambda: not is_stopped(sleeper.pid), 5.0)
    assert not is_stopped(2**22 + 12345)  # no such process: unknown is not "stopped"


@pytest.mark.timeout(30)
def test_hang_watch_kills_only_a_process_stopped_past_the_timeout(sleeper):
    store = host_store()
    events: list[dict] = []
    watch = HangWatch(AgentConfig(command=["x.py"], nproc=1), None, store,
                      lambda kind, name, **kw: events.append({"name": name, **kw}))
    st = RankStatus(0, 0, proc=sleeper, started_at=time.monotonic())

    def watch_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not st.hung:
            watch.check([st], time.monotonic())
            time.sleep(0.01)

    # Stopped for less than the 0.5 s default, then continued: not frozen.
    os.kill(sleeper.pid, signal.SIGSTOP)
    assert _until(lambda: is_stopped(sleeper.pid), 5.0)
    watch_for(0.2)
    os.kill(sleeper.pid, signal.SIGCONT)
    assert _until(lambda: not is_stopped(sleeper.pid), 5.0)
    watch_for(0.6)
    assert not st.hung and not events and sleeper.poll() is None
    # Stopped for good: killed within the timeout plus a few polls.
    os.kill(sleeper.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    watch_for(5.0)
    took = time.monotonic() - t0
    assert "state T" in st.hung, st.hung
    assert 0.5 <= took < 1.0, took
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    assert [e["name"] for e in events] == ["hang_suspected"] and events[0]["target_rank"] == 0

