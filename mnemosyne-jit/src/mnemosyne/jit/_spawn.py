"""What an agent knows of the processes it starts: ranks, spares, and how they are spawned (no torch).

Every process an agent starts is ``python -m mnemosyne.jit._bootstrap`` in its own session,
killed with its agent (``PR_SET_PDEATHSIG``). A trainer holds one rank
(:class:`RankStatus`); a spare (:class:`SparePool`) imports torch and initialises its
device ahead of time, then waits in the store for an assignment.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mnemosyne.core.env import MNEMOSYNE_JOB_ID, MNEMOSYNE_RESUME, MNEMOSYNE_SHRINK
from mnemosyne.core.events import EventKind
from mnemosyne.core.store import Store
from mnemosyne.jit import _keys, _snapdir
from mnemosyne.jit._agent_config import AgentConfig
from mnemosyne.jit._exits import EXIT_CLOCK

__all__ = [
    "CHILD_ENV_DEFAULTS", "RankStatus", "Spare", "SparePool", "child_env", "die_with_parent", "popen", "terminate",
]

# Settings every spawned process gets unless the user set them: one intra-op thread per
# rank (as torchrun does), and NCCL kept in a mode where in-process recovery is possible.
CHILD_ENV_DEFAULTS = {
    "OMP_NUM_THREADS": "1",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def die_with_parent() -> None:
    """Runs in the child between fork and exec: if the agent dies, so does the child."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def child_env(config: AgentConfig, job: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """Environment of a spawned process: ours, the defaults, the user's ``env``, the job's, then ``extra``."""
    env = dict(os.environ)
    for k, v in CHILD_ENV_DEFAULTS.items():
        env.setdefault(k, v)
    if env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3") == "3":
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"  # 3 tears the process down on a NCCL error
    env.update(config.env)
    env.update(job)
    if config.shrink:
        env[MNEMOSYNE_SHRINK] = "1"
    if config.resume:
        env[MNEMOSYNE_RESUME] = config.resume
    # The node's snapshot holders (named even with snapshots off: init() may turn them on).
    env.update(_snapdir.snapshot_env(job[MNEMOSYNE_JOB_ID], config.node_rank, config.snapshot_every))
    env.update(extra)
    return env


def popen(args: list[str], command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``mnemosyne.jit._bootstrap`` with ``args``, running the user's ``command``."""
    cmd = [sys.executable, "-m", "mnemosyne.jit._bootstrap", *args, "--", *command]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    EXIT_CLOCK.watch(proc.pid)  # times its exit: the detect phase of a death nobody announced
    return proc


@dataclass
class RankStatus:
    """What an agent knows about one rank it hosts (also what the demo's live view shows)."""

    rank: int
    local_rank: int = 0
    proc: subprocess.Popen[bytes] | None = None
    member: str = ""
    started_at: float = 0.0
    finished: bool = False
    hung: str = ""
    hb_seq: int = -1
    hb_changed: float = 0.0
    position: tuple[Any, ...] = ()
    pos_changed: float = 0.0
    step: int = 0
    phase: str = "starting"
    committed: int = -2
    last_commit_at: float = 0.0
    replacements: int = 0
    absent: bool = False  # shrunk out: no process holds the rank until the job grows back
    returncode: int | None = None


@dataclass
class Spare:
    """One pre-warmed process."""

    spare_id: int
    proc: subprocess.Popen[bytes]


class SparePool:
    """The spares of one node.

    Args:
        node: The node (spare ids are unique across nodes: their store keys are job-wide).
        store: The job's store.
        spawn: Starts a spare process given its id.
        emit: Writes an agent event.
    """

    def __init__(self, node: int, store: Store, spawn: Callable[[int], subprocess.Popen[bytes]],
                 emit: Callable[..., object]) -> None:
        self.node = node
        self.store = store
        self.spawn = spawn
        self.emit = emit
        self.spares: list[Spare] = []
        self.started = 0

    def start(self) -> None:
        """Start one more spare."""
        sid = self.node * 1_000_000 + self.started
        self.started += 1
        proc = self.spawn(sid)
        self.spares.append(Spare(sid, proc))
        self.emit(EventKind.INFO, "spare_start", spare=sid, pid=proc.pid)

    def live(self) -> list[Spare]:
        """Spares still running (ready or warming up)."""
        return [s for s in self.spares if s.proc.poll() is None]

    def ready(self) -> list[Spare]:
        """Live spares that finished warming up."""
        return [s for s in self.live() if self.store.check([_keys.spare_ready(s.spare_id)])]

    def assign(self, body: dict[str, Any]) -> tuple[subprocess.Popen[bytes], str] | None:
        """Hand ``body`` (rank, epoch...) to a spare, a ready one first; None when there is none."""
        live, ready = self.live(), self.ready()
        pick = (ready or live)[0] if (ready or live) else None
        if pick is None:
            return None
        self.spares.remove(pick)
        self.store.set(_keys.spare_assign(pick.spare_id), json.dumps({**body, "t": time.time()}).encode())
        return pick.proc, f"spare {pick.spare_id}" + ("" if pick in ready else " (still warming up)")

    def reap(self) -> list[Spare]:
        """Forget the spares that exited; return them."""
        gone = [s for s in self.spares if s.proc.poll() is not None]
        for s in gone:
            self.spares.remove(s)
        return gone


def terminate(procs: list[subprocess.Popen[bytes]], grace: float = 5.0) -> None:
    """SIGTERM every process (continuing stopped ones), SIGKILL those still alive after ``grace`` s."""
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.send_signal(signal.SIGCONT)  # a stopped process only sees SIGTERM once continued
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
