"""How an agent tells a failed or hung trainer from a busy one (no torch).

* :func:`classify_exit`: the cause of a non-zero exit, from the trainer's own report in the
  store (an exception) or the signal (kill, segfault);
* :class:`HangWatch`: a process found stopped in the node's process table (state ``T``:
  SIGSTOP, a debugger) for the stopped timeout (0.5 s by default), a process whose watchdog
  stopped beating for the liveness timeout (frozen in some other way, e.g. its interpreter
  wedged), or whose main thread made no progress outside a collective for the progress
  timeout (learned from step times, with a floor, or the user's ``--hang-timeout``), is
  killed with SIGKILL; its exit is then handled as any exit. The process state is read
  from ``/proc`` (the agent runs on the trainers' node): load slows a process but never
  stops it, so this check has no false alarms and needs no margin for slow heartbeats.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable, Iterable
from typing import Any

from mnemosyne.core.events import EventKind
from mnemosyne.core.store import Store
from mnemosyne.jit import _keys
from mnemosyne.jit._agent_config import AgentConfig
from mnemosyne.jit._exits import EXIT_CLOCK
from mnemosyne.jit._spawn import RankStatus

__all__ = ["HangWatch", "classify_exit", "is_stopped"]


def is_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (``T``/``t`` in ``/proc/<pid>/stat``); False if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False  # gone, or no /proc: the exit or the heartbeat check covers it
    # "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ')'.
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state in (b"T", b"t")


def classify_exit(store: Store, st: RankStatus, rc: int) -> tuple[str, dict[str, Any]]:
    """The cause (``hang``, ``exception``, ``kill``, ``segfault``, ``exit``...) and details of an exit."""
    assert st.proc is not None
    pid = st.proc.pid
    detail: dict[str, Any] = {"pid": pid, "returncode": rc, "exited_at": EXIT_CLOCK.exited_at(pid)}
    if st.hung:
        detail["why"] = st.hung
        return "hang", detail
    key = _keys.report(st.rank, pid)
    if store.check([key]):
        report = json.loads(store.get(key))
        detail.update(step=report.get("step"), phase=report.get("phase"), error=report.get("message"),
                      type=report.get("type"))
        return "exception", detail
    if rc < 0:
        name = signal.Signals(-rc).name
        detail["signal"] = name
        return {"SIGKILL": "kill", "SIGSEGV": "segfault"}.get(name, name.lower()), detail
    hb_key = _keys.heartbeat(st.rank)
    hb = json.loads(store.get(hb_key)) if store.check([hb_key]) else None
    if hb is None or hb.get("pid") != pid:
        # It failed before mnemosyne.jit.init (a missing script or module, an error at
        # import): every replacement would fail the same way. A usage error ends the job.
        detail.update(type="ConfigError", error=f"the trainer exited with code {rc} before it reached "
                      "mnemosyne.jit.init (a missing script or module, or an error at import: see its "
                      "output above); a replacement would fail the same way")
    return "exit", detail


class HangWatch:
    """Reads the heartbeats of one node's trainers and kills the hung ones (see module doc).

    Args:
        config: Timeouts.
        hang_override: Fixed timeout (``--hang-timeout`` or ``MNEMOSYNE_HANG_TIMEOUT``), or None.
        store: The job's store.
        emit: Writes an agent event.
    """

    def __init__(self, config: AgentConfig, hang_override: float | None, store: Store,
                 emit: Callable[..., object]) -> None:
        self.config = config
        self.hang_override = hang_override
        self.store = store
        self.emit = emit
        #: Observed seconds per step (the learned progress timeout's input).
        self.step_times: list[float] = []
        #: pid -> when it was first found stopped (state T), while it stays stopped.
        self.stopped_since: dict[int, float] = {}

    def progress_timeout(self) -> float:
        """Seconds without progress outside a collective before a rank counts as hung."""
        if self.hang_override is not None:
            return self.hang_override
        if not self.step_times:
            return self.config.startup_timeout
        recent = sorted(self.step_times[-50:])
        return max(self.config.hang_floor, 10.0 * recent[-1])

    def check(self, ranks: Iterable[RankStatus], now: float) -> None:
        """Update each rank's position from its heartbeat; kill the ranks found hung."""
        live_timeout = self.hang_override if self.hang_override is not None else self.config.liveness_timeout
        for st in ranks:
            if st.finished or st.proc is None or st.proc.poll() is not None or st.hung:
                continue
            pid = st.proc.pid
            if is_stopped(pid):
                since = self.stopped_since.setdefault(pid, now)
                if now - since > self.config.stopped_timeout:
                    self._kill_hung(st, f"process stopped (state T) for {now - since:.2f} s (frozen)")
                    continue
            else:
                self.stopped_since.pop(pid, None)
            key = _keys.heartbeat(st.rank)
            hb = json.loads(self.store.get(key)) if self.store.check([key]) else None
            if hb is None or hb.get("pid") != st.proc.pid:
                if now - st.started_at > self.config.startup_timeout:
                    self._kill_hung(st, f"no heartbeat {self.config.startup_timeout:.0f} s after start")
                continue
            if hb.get("phase") == "closed":
                st.phase = "closed"
                continue  # training is over for this rank; only its exit is awaited
            if hb["seq"] != st.hb_seq:
                st.hb_seq = hb["seq"]
                st.hb_changed = now
            pos = (hb["step"], hb["phase"], hb["committed"], hb["epoch"])
            if pos != st.position:
                if hb["committed"] > st.committed >= -1 and st.last_commit_at and st.position:
                    self.step_times.append((now - st.last_commit_at) / max(1, hb["committed"] - st.committed))
                if hb["committed"] != st.committed:
                    st.last_commit_at = now
                st.position, st.pos_changed = pos, now
            st.step, st.phase, st.committed = hb["step"], hb["phase"], hb["committed"]
            if now - st.hb_changed > live_timeout:
                self._kill_hung(st, f"no heartbeat for {now - st.hb_changed:.1f} s (frozen)")
            elif not hb["coll"] and now - st.pos_changed > self.progress_timeout():
                self._kill_hung(st, f"no progress in {hb['phase']} of step {hb['step']} for "
                                    f"{now - st.pos_changed:.1f} s")

    def _kill_hung(self, st: RankStatus, why: str) -> None:
        assert st.proc is not None
        st.hung = why
        self.stopped_since.pop(st.proc.pid, None)
        self.emit(EventKind.INFO, "hang_suspected", target_rank=st.rank, pid=st.proc.pid, why=why)
        with contextlib.suppress(ProcessLookupError):
            os.kill(st.proc.pid, signal.SIGKILL)
