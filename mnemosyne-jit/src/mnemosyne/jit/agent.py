"""The per-node agent behind ``mnemo launch``: store host, supervisor, spare keeper.

It hosts the job's persistent store (so the store outlives every trainer), starts one
trainer per rank through :mod:`mnemosyne.jit._bootstrap`, keeps ``spares`` pre-warmed
processes (torch imported, device initialised, waiting for an assignment), and
supervises:

* process exit (``Popen.poll``, every ``poll`` seconds): a non-zero exit is a failure,
  classified from the trainer's own report (exception) or the signal (kill, segfault);
* hangs, from heartbeats: a process whose watchdog stopped beating for the liveness
  timeout (frozen, e.g. SIGSTOP) or whose main thread made no progress outside a
  collective for the progress timeout (learned from step times, with a floor, or the
  user's ``--hang-timeout``) is killed with SIGKILL, then handled like an exit;
* rebuild requests from trainers that saw a communicator error nobody died for.

On a failure it publishes the next membership epoch (the failed rank held by a new
member), then hands the rank to a spare (or starts a new process) and refills the pool.
Every detection, epoch and replacement is an event in the job's JSON-lines log.
When no replacement is allowed (``no_replace``, or ``max_restarts`` used up with a
``ckpt_dir``), it instead publishes the next epoch with a "checkpoint and exit" order:
the survivors write a just-in-time checkpoint (:mod:`mnemosyne.jit.ckpt`) and exit,
and the agent returns :data:`EXIT_JOB_CKPT`.
SIGINT/SIGTERM stop the whole job: children get SIGTERM, then SIGKILL after a grace
period; children also die with the agent (PR_SET_PDEATHSIG), so nothing is orphaned.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnemosyne.core.env import (
    MNEMOSYNE_EPOCH,
    MNEMOSYNE_EVENT_LOG,
    MNEMOSYNE_HANG_TIMEOUT,
    MNEMOSYNE_JOB_ID,
    MNEMOSYNE_LOCAL_RANK,
    MNEMOSYNE_RANK,
    MNEMOSYNE_SPARE,
    MNEMOSYNE_STORE_ADDR,
    MNEMOSYNE_TOKEN,
    MNEMOSYNE_WORLD_SIZE,
    env_float,
)
from mnemosyne.core.errors import ConfigError, MnemosyneError
from mnemosyne.core.events import EventKind, EventLog
from mnemosyne.core.membership import Membership
from mnemosyne.core.store import Store
from mnemosyne.jit import _keys
from mnemosyne.jit._select import MNEMOSYNE_JIT_BACKEND
from mnemosyne.jit._store import JobStoreHost, host_job_store

__all__ = ["DEFAULT_CKPT_DIR", "EXIT_JOB_CKPT", "MNEMOSYNE_SHRINK", "Agent", "AgentConfig", "RankStatus",
           "job_info_dir"]

logger = logging.getLogger(__name__)

#: Exit code of ``mnemo launch`` when the job stopped after a just-in-time checkpoint.
EXIT_JOB_CKPT = 3
#: Checkpoint root when ``--no-replace`` is given without ``--ckpt-dir``.
DEFAULT_CKPT_DIR = "mnemo-ckpts"
#: Set to ``1`` in every trainer of a job launched with ``--shrink``: the runtime then
#: requires ``step.micro_batches()`` (a survivor may run a missing replica's batch too).
MNEMOSYNE_SHRINK = "MNEMOSYNE_SHRINK"

# Settings every spawned process gets unless the user set them: one intra-op thread per
# rank (as torchrun does), and NCCL kept in a mode where in-process recovery is possible.
_CHILD_ENV_DEFAULTS = {
    "OMP_NUM_THREADS": "1",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def job_info_dir() -> Path:
    """Folder where running jobs publish their store address for ``mnemo inject`` (mode 0700)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"mnemosyne-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the agent dies, so does the child.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class AgentConfig:
    """What ``mnemo launch`` was asked to run.

    Attributes:
        command: ``["script.py", args...]`` or ``["-m", "module", args...]``.
        nproc: Ranks on this node.
        spares: Pre-warmed spare processes to keep.
        hang_timeout: Fixed hang timeout in seconds (None: learned, see module doc).
        hang_floor: Smallest learned progress timeout, seconds.
        liveness_timeout: Seconds without any heartbeat before a process counts as frozen.
        startup_timeout: Seconds a trainer may take to send its first heartbeat.
        max_restarts: Replacements allowed before the job is given up.
        event_log: JSON-lines log path (None: ``./mnemo-events/<job>.jsonl``).
        job_id: Job id (None: generated).
        host: Interface the store listens on.
        env: Extra environment for every child.
        poll: Supervision period, seconds.
        no_replace: Never replace a failed rank: the healthy ranks write a just-in-time
            checkpoint into ``ckpt_dir`` and the job exits with :data:`EXIT_JOB_CKPT`.
        ckpt_dir: Root of just-in-time checkpoints; when set, running out of
            ``max_restarts`` also checkpoints instead of giving up.
        resume: A verified checkpoint directory every rank loads before its first step.
        shrink: When a rank fails and no warm spare is ready, continue without it (the
            survivors run its batches by gradient accumulation, so the global batch
            stays) while a replacement warms up, then grow back to the full size.
    """

    command: list[str]
    nproc: int
    spares: int = 0
    hang_timeout: float | None = None
    hang_floor: float = 5.0
    liveness_timeout: float = 5.0
    startup_timeout: float = 300.0
    max_restarts: int = 10
    event_log: str | None = None
    job_id: str | None = None
    host: str = "127.0.0.1"
    env: dict[str, str] = field(default_factory=dict)
    poll: float = 0.01
    no_replace: bool = False
    ckpt_dir: str | None = None
    resume: str | None = None
    shrink: bool = False


@dataclass
class RankStatus:
    """What the agent knows about one rank (also what the demo's live view shows)."""

    rank: int
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


@dataclass
class _Spare:
    spare_id: int
    proc: subprocess.Popen[bytes]


class Agent:
    """Supervises one node's ranks (see module doc). Call :meth:`run` from the main thread.

    Args:
        config: What to run.
        on_tick: Called from the supervision loop about 10 times a second (live views).
    """

    def __init__(self, config: AgentConfig, on_tick: Callable[[Agent], None] | None = None) -> None:
        if config.nproc < 1:
            msg = f"--nproc-per-node must be >= 1, got {config.nproc}"
            raise ConfigError(msg)
        if config.spares < 0:
            msg = f"--spares must be >= 0, got {config.spares}"
            raise ConfigError(msg)
        if not config.command:
            msg = "no training script given: mnemo launch [options] script.py [args...]"
            raise ConfigError(msg)
        self.config = config
        self.on_tick = on_tick
        self.job_id = config.job_id or f"job-{secrets.token_hex(4)}"
        self.token = secrets.token_hex(16)
        log_path = config.event_log or str(Path("mnemo-events") / f"{self.job_id}.jsonl")
        self.event_log_path = str(Path(log_path).resolve())
        self.log = EventLog(self.event_log_path, self.job_id, -1, 0)
        override = config.hang_timeout if config.hang_timeout is not None else env_float(MNEMOSYNE_HANG_TIMEOUT)
        self.hang_override = override
        self.ranks = [RankStatus(r) for r in range(config.nproc)]
        self.spares: list[_Spare] = []
        self._next_spare = 0
        self.restarts = 0
        self.step_times: list[float] = []
        self.membership = Membership.initial(config.nproc)
        self._stop_signal: int | None = None
        self._rebuilds_seen = 0
        self._info_file: Path | None = None
        self.server: JobStoreHost | None = None
        # Epoch of mnemosyne-ccl's "world" communicator family that the members build for
        # the current membership epoch (ccl numbers its own epochs; see _publish).
        self.comm_epoch = 0
        self.store: Store | None = None
        self.failed_reason = ""
        #: Set once the agent ordered a just-in-time checkpoint: (epoch, root, survivors, t0).
        self.ckpt_order: tuple[int, Path, list[int], float] | None = None

    # ---------------------------------------------------------------- processes
    def _child_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        for k, v in _CHILD_ENV_DEFAULTS.items():
            env.setdefault(k, v)
        if env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3") == "3":
            env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"  # 3 tears the process down on a NCCL error
        env.update(self.config.env)
        assert self.server is not None
        env.update({
            MNEMOSYNE_JOB_ID: self.job_id,
            MNEMOSYNE_TOKEN: self.token,
            MNEMOSYNE_STORE_ADDR: self.server.addr,
            MNEMOSYNE_WORLD_SIZE: str(self.config.nproc),
            MNEMOSYNE_EVENT_LOG: self.event_log_path,
            # Children make the agent's store/communicator choice, whatever they can import.
            MNEMOSYNE_JIT_BACKEND: self.server.kind,
        })
        if self.config.shrink:
            env[MNEMOSYNE_SHRINK] = "1"
        if self.config.resume:
            from mnemosyne.jit.runtime import MNEMOSYNE_RESUME

            env[MNEMOSYNE_RESUME] = self.config.resume
        env.update(extra)
        return env

    def _popen(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "mnemosyne.jit._bootstrap", *args, "--", *self.config.command]
        return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)

    def _start_trainer(self, rank: int, epoch: int) -> subprocess.Popen[bytes]:
        env = self._child_env({MNEMOSYNE_RANK: str(rank), MNEMOSYNE_LOCAL_RANK: str(rank),
                               MNEMOSYNE_EPOCH: str(epoch)})
        env.pop(MNEMOSYNE_SPARE, None)
        return self._popen([], env)

    def _start_spare(self) -> None:
        sid = self._next_spare
        self._next_spare += 1
        proc = self._popen(["--spare-id", str(sid)], self._child_env({MNEMOSYNE_SPARE: "1"}))
        self.spares.append(_Spare(sid, proc))
        self.log.emit(EventKind.INFO, "spare_start", spare=sid, pid=proc.pid)

    def _ready_spares(self) -> list[_Spare]:
        assert self.store is not None
        return [s for s in self.spares if s.proc.poll() is None and self.store.check([_keys.spare_ready(s.spare_id)])]

    def _assign(self, rank: int, epoch: int) -> subprocess.Popen[bytes]:
        """Give ``rank`` to a spare (a ready one first) or to a new process."""
        assert self.store is not None
        live = [s for s in self.spares if s.proc.poll() is None]
        ready = self._ready_spares()
        pick = (ready or live)[0] if (ready or live) else None
        if pick is None:
            proc = self._start_trainer(rank, epoch)
            how = "new process"
        else:
            self.spares.remove(pick)
            body = {"rank": rank, "local_rank": rank, "epoch": epoch, "world_size": self.config.nproc,
                    "t": time.time()}
            self.store.set(_keys.spare_assign(pick.spare_id), json.dumps(body).encode())
            proc = pick.proc
            how = f"spare {pick.spare_id}" + ("" if pick in ready else " (still warming up)")
        self.log.emit(EventKind.INFO, "assigned", target_rank=rank, how=how, pid=proc.pid)
        if self.config.spares and len(self.spares) < self.config.spares:
            self._start_spare()
        return proc

    # ---------------------------------------------------------------- failures
    def _publish(self, nxt: Membership, replaced: Sequence[int], reason: str) -> None:
        assert self.store is not None and self.server is not None
        if self.server.kind == "ccl":
            self._next_comm_epoch(nxt.epoch, reason)
        self.store.set(_keys.membership(nxt.epoch), nxt.to_json())
        self.store.set(_keys.EPOCH, str(nxt.epoch).encode())
        self.membership = nxt
        self.log.epoch = nxt.epoch
        self.log.emit(EventKind.EPOCH, "epoch", epoch_number=nxt.epoch, replaced=list(replaced), reason=reason)

    def _next_comm_epoch(self, epoch: int, reason: str) -> None:
        """Pick the ccl epoch the members build for membership ``epoch``, abort the current one.

        Members learn it from the store before the membership itself appears. Survivors
        holding the previous one rebuild from it, the others create it, a replacement
        joins it. Aborting the previous one through its store key (ccl's
        ``signal_abort``) wakes every member blocked in it, or still building it, within
        one poll, in addition to the watchdogs' local aborts.
        """
        from mnemosyne.ccl import signal_abort

        assert self.store is not None
        if epoch > 0:
            newest = self.comm_epoch
            key = "ccl/world/epoch"  # newest epoch any member started (ccl's store layout)
            if self.store.check([key]):
                newest = max(newest, int(self.store.get(key, 5.0)))
            for e in sorted({self.comm_epoch, newest}):
                signal_abort(self.store, e, f"membership epoch {epoch}: {reason}")
            self.comm_epoch = newest + 1
        self.store.set(_keys.comm_epoch(epoch), str(self.comm_epoch).encode())

    def _fail(self, rank: int, cause: str, detail: dict[str, Any]) -> None:
        st = self.ranks[rank]
        self.log.emit(EventKind.DETECT, cause, target_rank=rank, **detail)
        logger.warning("rank %d failed (%s): %s", rank, cause, detail)
        if self.ckpt_order is not None:
            # Already checkpointing: a second failure (rank gone before or while writing).
            st.finished = True
            st.phase = "failed"
            return
        self.restarts += 1
        exhausted = self.restarts > self.config.max_restarts
        if self.config.no_replace or (exhausted and self.config.ckpt_dir):
            self._order_checkpoint(rank, cause)
            return
        if exhausted:
            self.failed_reason = f"rank {rank} failed ({cause}) after {self.config.max_restarts} replacements"
            return
        if self.config.shrink and not self._ready_spares() and self.membership.size > 1:
            self._shrink(rank, cause)
            return
        nxt, _change = self.membership.replace([rank], f"rank {rank} {cause}")
        self._publish(nxt, [rank], f"rank {rank} {cause}")
        self._hand_over(st, nxt)

    def _hand_over(self, st: RankStatus, nxt: Membership) -> None:
        """Start the new holder of ``st.rank`` in epoch ``nxt`` (a spare, or a new process)."""
        st.proc = self._assign(st.rank, nxt.epoch)
        st.member = nxt.members[st.rank]
        st.started_at = time.monotonic()
        st.hung = ""
        st.hb_seq = -1
        st.position = ()
        st.phase = "replacing"
        st.replacements += 1
        st.absent = False

    def _shrink(self, rank: int, cause: str) -> None:
        """Continue without ``rank`` (no warm spare is ready) and warm up its replacement."""
        st = self.ranks[rank]
        nxt, _ = self.membership.remove([rank], f"rank {rank} {cause}: shrink")
        self._publish(nxt, [], f"rank {rank} {cause}: no warm spare ready, continue with {nxt.size} replicas")
        st.proc = None
        st.absent = True
        st.phase = "absent"
        self.log.emit(EventKind.INFO, "shrink", target_rank=rank, members=list(nxt.ranks),
                      world_size=self.config.nproc)
        logger.warning("rank %d failed (%s): continuing with %d of %d replicas until a replacement is ready",
                       rank, cause, nxt.size, self.config.nproc)
        absent = sum(1 for s in self.ranks if s.absent)
        if len([s for s in self.spares if s.proc.poll() is None]) < absent:
            self._start_spare()

    def _maybe_grow(self) -> None:
        """Give absent ranks back to ready spares: one new epoch for all of them."""
        absent = [st for st in self.ranks if st.absent]
        if not absent or self._all_done():
            return
        ready = self._ready_spares()
        grow = absent[: len(ready)]
        if not grow:
            return
        ranks = [st.rank for st in grow]
        nxt, _ = self.membership.add(ranks, f"grow back {ranks}")
        self._publish(nxt, [], f"replacement ready: grow back to {nxt.size} replicas")
        self.log.emit(EventKind.INFO, "grow", target_ranks=ranks, members=list(nxt.ranks),
                      world_size=self.config.nproc)
        logger.warning("replacement ready: ranks %s rejoin (%d of %d replicas)", ranks, nxt.size, self.config.nproc)
        for st in grow:
            self._hand_over(st, nxt)

    def _order_checkpoint(self, rank: int, cause: str) -> None:
        """Publish the "checkpoint and exit" decision: a new epoch whose order key lists the survivors."""
        assert self.store is not None
        self.ranks[rank].finished = True
        self.ranks[rank].phase = "failed"
        root = Path(self.config.ckpt_dir or DEFAULT_CKPT_DIR).resolve()
        survivors = [st.rank for st in self.ranks if st.rank != rank and not st.finished and not st.absent]
        nxt, _ = self.membership.replace([], f"rank {rank} {cause}: checkpoint and exit")
        order = {"dir": str(root), "ranks": survivors, "failed": rank}
        # Set before the epoch: a survivor that adopts the epoch finds the order with it.
        self.store.set(_keys.ckpt_order(nxt.epoch), json.dumps(order).encode())
        self._publish(nxt, [], f"rank {rank} {cause}: no replacement allowed, checkpoint and exit")
        self.ckpt_order = (nxt.epoch, root, survivors, time.monotonic())
        self.log.emit(EventKind.INFO, "ckpt_ordered", target_rank=rank, dir=str(root), ranks=survivors)
        logger.warning("rank %d failed (%s), no replacement allowed: healthy ranks %s checkpoint into %s",
                       rank, cause, survivors, root)

    def _finish_checkpoint(self) -> int:
        """Every survivor exited after an ordered checkpoint: report it and return the job's exit code."""
        from mnemosyne.jit import ckpt
        from mnemosyne.jit.runtime import EXIT_CKPT

        assert self.ckpt_order is not None
        _epoch, root, survivors, t0 = self.ckpt_order
        codes = {r: p.returncode for r in survivors if (p := self.ranks[r].proc) is not None}
        # This job's checkpoint (the root may hold others' from earlier jobs).
        ours = [e.path for e in (ckpt.list_checkpoints(root) if root.is_dir() else [])
                if e.complete and ckpt.read_manifest(e.path).get("meta", {}).get("job") == self.job_id]
        path = ours[-1] if ours else None
        ok = path is not None and all(c == EXIT_CKPT for c in codes.values())
        if ok:
            assert path is not None
            try:
                report = ckpt.verify(path)
            except MnemosyneError as exc:
                ok = False
                logger.error("%s", exc)
            else:
                self.log.emit(EventKind.PHASE, "ckpt", time.monotonic() - t0, ok=True, path=str(path),
                              step=report.step, bytes=report.bytes)
                logger.error("job stopped: a rank failed and no replacement was allowed; checkpoint of step %d "
                             "written to %s; continue with: mnemo launch --resume %s ...",
                             report.step, path, path)
                return EXIT_JOB_CKPT
        self.log.emit(EventKind.PHASE, "ckpt", time.monotonic() - t0, ok=False, codes=codes)
        self.failed_reason = (f"a rank failed and no replacement was allowed, and the just-in-time checkpoint into "
                              f"{root} failed (trainer exit codes {codes})")
        self.log.emit(EventKind.INFO, "gave_up", why=self.failed_reason)
        logger.error("giving up: %s", self.failed_reason)
        return 1

    def _classify_exit(self, st: RankStatus, rc: int) -> tuple[str, dict[str, Any]]:
        assert self.store is not None and st.proc is not None
        pid = st.proc.pid
        detail: dict[str, Any] = {"pid": pid, "returncode": rc}
        if st.hung:
            detail["why"] = st.hung
            return "hang", detail
        key = _keys.report(st.rank, pid)
        if self.store.check([key]):
            report = json.loads(self.store.get(key))
            detail.update(step=report.get("step"), phase=report.get("phase"), error=report.get("message"))
            return "exception", detail
        if rc < 0:
            name = signal.Signals(-rc).name
            detail["signal"] = name
            return {"SIGKILL": "kill", "SIGSEGV": "segfault"}.get(name, name.lower()), detail
        return "exit", detail

    def _all_done(self) -> bool:
        """Every present member reported the end of training (absent ranks are not waited for)."""
        assert self.store is not None
        return self.store.check([_keys.done(r) for r in self.membership.ranks])

    def _progress_timeout(self) -> float:
        if self.hang_override is not None:
            return self.hang_override
        if not self.step_times:
            return self.config.startup_timeout
        recent = sorted(self.step_times[-50:])
        return max(self.config.hang_floor, 10.0 * recent[-1])

    def _check_heartbeats(self, now: float) -> None:
        assert self.store is not None
        live_timeout = self.hang_override if self.hang_override is not None else self.config.liveness_timeout
        for st in self.ranks:
            if st.finished or st.proc is None or st.proc.poll() is not None or st.hung:
                continue
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
            elif not hb["coll"] and now - st.pos_changed > self._progress_timeout():
                self._kill_hung(st, f"no progress in {hb['phase']} of step {hb['step']} for "
                                    f"{now - st.pos_changed:.1f} s")

    def _kill_hung(self, st: RankStatus, why: str) -> None:
        assert st.proc is not None
        st.hung = why
        self.log.emit(EventKind.INFO, "hang_suspected", target_rank=st.rank, pid=st.proc.pid, why=why)
        with contextlib.suppress(ProcessLookupError):
            os.kill(st.proc.pid, signal.SIGKILL)

    # ---------------------------------------------------------------- main loop
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _write_info(self) -> None:
        assert self.server is not None
        path = job_info_dir() / f"{self.job_id}.json"
        # The token travels in this file (mode 0600, in a 0700 folder of this user) so that
        # `mnemo inject` run by the same user can authenticate to the store.
        body = {"job": self.job_id, "store": self.server.addr, "store_kind": self.server.kind,
                "token": self.token, "pid": os.getpid(), "nproc": self.config.nproc,
                "event_log": self.event_log_path, "started": time.time()}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)
        self._info_file = path

    def run(self) -> int:
        """Run the job to completion; return the exit code (0: every rank finished)."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        finally:
            self._shutdown()
            for s, h in old.items():
                signal.signal(s, h)

    def _run(self) -> int:
        self.server = host_job_store(self.job_id, self.token, self.config.host)
        self.store = self.server.store
        logger.info("job %s: store %s at %s", self.job_id,
                    "mnemosyne-ccl (authenticated)" if self.server.kind == "ccl" else "torch TCPStore (fallback)",
                    self.server.addr)
        self._write_info()
        self._publish(self.membership, [], "start")
        self.log.emit(EventKind.INFO, "launch", nproc=self.config.nproc, spares=self.config.spares,
                      command=self.config.command, store=self.server.addr, store_kind=self.server.kind)
        now = time.monotonic()
        for st in self.ranks:
            st.proc = self._start_trainer(st.rank, 0)
            st.member = self.membership.members[st.rank]
            st.started_at = now
        for _ in range(self.config.spares):
            self._start_spare()
        next_hb = 0.0
        next_tick = 0.0
        while True:
            if self._stop_signal is not None:
                name = signal.Signals(self._stop_signal).name
                self.log.emit(EventKind.INFO, "stopped", signal=name)
                return 128 + self._stop_signal
            if self.failed_reason:
                self.log.emit(EventKind.INFO, "gave_up", why=self.failed_reason)
                logger.error("giving up: %s", self.failed_reason)
                return 1
            now = time.monotonic()
            for st in self.ranks:
                if st.finished or st.proc is None:
                    continue
                rc = st.proc.poll()
                if rc is None:
                    continue
                if self.ckpt_order is not None and st.rank in self.ckpt_order[2]:
                    st.finished = True  # a survivor done with the ordered checkpoint (or failed at it)
                    st.phase = "ckpt"
                    continue
                if rc == 0 or self._all_done():
                    # A rank that dies after every rank reported done is not replaced:
                    # nobody needs its state any more.
                    st.finished = True
                    st.phase = "done"
                    continue
                cause, detail = self._classify_exit(st, rc)
                self._fail(st.rank, cause, detail)
            for sp in list(self.spares):
                if sp.proc.poll() is not None:
                    self.spares.remove(sp)
                    self.log.emit(EventKind.INFO, "spare_exit", spare=sp.spare_id, returncode=sp.proc.returncode)
                    absent = sum(1 for st in self.ranks if st.absent)
                    if absent > len(self.spares) and self._stop_signal is None:
                        self._start_spare()  # the replacement an absent rank waits for died: warm another
            if all(st.finished or st.absent for st in self.ranks) and self.ckpt_order is not None:
                return self._finish_checkpoint()
            if all(st.finished or st.absent for st in self.ranks):
                self.log.emit(EventKind.INFO, "job_done", restarts=self.restarts)
                return 0
            if now >= next_hb:
                next_hb = now + 0.05
                self._check_heartbeats(now)
                if self.ckpt_order is None:
                    self._maybe_grow()
                requests = self.store.add(_keys.REBUILD_REQUEST, 0)
                if requests > self._rebuilds_seen:
                    self._rebuilds_seen = requests
                    nxt, _ = self.membership.replace([], "rebuild requested by a trainer")
                    self._publish(nxt, [], "rebuild requested by a trainer")
            if self.on_tick is not None and now >= next_tick:
                next_tick = now + 0.1
                self.on_tick(self)
            time.sleep(self.config.poll)

    def _shutdown(self) -> None:
        procs = [st.proc for st in self.ranks if st.proc is not None] + [s.proc for s in self.spares]
        if self.store is not None:
            for sp in self.spares:
                with contextlib.suppress(MnemosyneError):
                    self.store.set(_keys.spare_stop(sp.spare_id), b"1")
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                    p.send_signal(signal.SIGCONT)  # a stopped process only sees SIGTERM once continued
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5.0
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._info_file is not None:
            self._info_file.unlink(missing_ok=True)
        if self.server is not None:
            self.server.stop()
        self.log.close()
