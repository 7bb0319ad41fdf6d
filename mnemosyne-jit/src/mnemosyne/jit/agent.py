"""The per-node agent behind ``mnemo launch``: supervisor, spare keeper, and (node 0) store host.

One agent runs per node. The agent of node 0 hosts the job's persistent store (so the
store outlives every trainer) and is the coordinator (:mod:`mnemosyne.jit._coordinator`):
the only one that publishes membership epochs. Every agent starts its node's trainers
through :mod:`mnemosyne.jit._bootstrap`, keeps ``spares`` pre-warmed processes (torch
imported, device initialised, waiting for an assignment), and supervises its own ranks:

* process exit (``Popen.poll``, every ``poll`` seconds): a non-zero exit is a failure,
  classified from the trainer's own report (exception) or the signal (kill, segfault);
* hangs, from heartbeats: a process whose watchdog stopped beating for the liveness
  timeout (frozen, e.g. SIGSTOP) or whose main thread made no progress outside a
  collective for the progress timeout (learned from step times, with a floor, or the
  user's ``--hang-timeout``) is killed with SIGKILL, then handled like an exit;
* rebuild requests from trainers that saw a communicator error nobody died for.

A failure goes to the coordinator (directly on node 0, through a store report
elsewhere), which publishes the next epoch with a placement; each agent then starts the
processes placed on its node (a spare first). Agents write a status ~10 times a second:
a node whose agent falls silent for ``node_timeout`` is lost and its ranks are decided
together. When no replacement is possible or allowed, the epoch carries a "checkpoint and
exit" order: the survivors write a just-in-time checkpoint (:mod:`mnemosyne.jit.ckpt`) and
exit, and ``mnemo launch`` returns :data:`EXIT_JOB_CKPT`. Every detection, epoch and
replacement is an event in the JSON-lines log (agent events carry ``node``).

SIGINT/SIGTERM stop the whole job (node 0 tells every agent through the store):
children get SIGTERM, then SIGKILL after a grace period; children also die with their
agent (PR_SET_PDEATHSIG), so nothing is orphaned. Losing node 0 loses the store, and the
other agents stop their trainers: the store host is the job's single point of failure,
as torchrun's is.
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnemosyne.core.env import (
    MNEMOSYNE_EPOCH,
    MNEMOSYNE_EVENT_LOG,
    MNEMOSYNE_HANG_TIMEOUT,
    MNEMOSYNE_JOB_ID,
    MNEMOSYNE_LOCAL_RANK,
    MNEMOSYNE_PROXY_SOCKET,
    MNEMOSYNE_RANK,
    MNEMOSYNE_SPARE,
    MNEMOSYNE_STORE_ADDR,
    MNEMOSYNE_TOKEN,
    MNEMOSYNE_WORLD_SIZE,
    env_float,
    env_str,
)
from mnemosyne.core.errors import MnemosyneError
from mnemosyne.core.events import Event, EventKind, EventLog
from mnemosyne.core.membership import Membership
from mnemosyne.core.store import Store
from mnemosyne.jit import _keys, _recap
from mnemosyne.jit._agent_config import AgentConfig, check_config, job_info_dir, read_token_file
from mnemosyne.jit._coordinator import DEFAULT_CKPT_DIR, Coordinator, Failure
from mnemosyne.jit._exits import EXIT_CLOCK
from mnemosyne.jit._proxies import ProxyPool
from mnemosyne.jit._select import MNEMOSYNE_JIT_BACKEND
from mnemosyne.jit._store import JobStoreHost, connect_job_store, host_job_store, parse_addr

__all__ = ["DEFAULT_CKPT_DIR", "EXIT_JOB_CKPT", "MNEMOSYNE_SHRINK", "Agent", "AgentConfig", "RankStatus",
           "job_info_dir", "read_token_file"]

logger = logging.getLogger(__name__)

#: Exit code of ``mnemo launch`` when the job stopped after a just-in-time checkpoint.
EXIT_JOB_CKPT = 3
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
# How often an agent rewrites its status (the coordinator's liveness signal).
_STATUS_PERIOD = 0.1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the agent dies, so does the child.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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
        check_config(config)
        self.config = config
        self.on_tick = on_tick
        self.node = config.node_rank
        self.coordinator_node = self.node == 0
        self.world_size = config.nproc * config.nnodes
        self.job_id = config.job_id or env_str(MNEMOSYNE_JOB_ID) or f"job-{secrets.token_hex(4)}"
        self.token = config.token or env_str(MNEMOSYNE_TOKEN) or secrets.token_hex(16)
        log_path = config.event_log or str(Path("mnemo-events") / f"{self.job_id}.jsonl")
        self.event_log_path = str(Path(log_path).resolve())
        self.log = EventLog(self.event_log_path, self.job_id, -1, 0)
        override = config.hang_timeout if config.hang_timeout is not None else env_float(MNEMOSYNE_HANG_TIMEOUT)
        self.hang_override = override
        base = self.node * config.nproc
        self.local: dict[int, RankStatus] = {base + i: RankStatus(base + i, i) for i in range(config.nproc)}
        self.spares: list[_Spare] = []
        self._next_spare = 0
        self.step_times: list[float] = []
        self.membership = Membership.initial(self.world_size)
        self.applied = -1  # newest membership epoch this agent acted on
        self._stop_signal: int | None = None
        self._info_file: Path | None = None
        self.server: JobStoreHost | None = None
        self.store_addr = ""
        self.store_kind = ""
        # Epoch of mnemosyne-ccl's "world" communicator family that the members build for
        # the current membership epoch (ccl numbers its own epochs; see publish).
        self.comm_epoch = 0
        self.store: Store | None = None
        self.failed_reason = ""
        #: Set once a just-in-time checkpoint was ordered: (epoch, root, survivors, t0).
        self.ckpt_order: tuple[int, Path, list[int], float] | None = None
        self.coord: Coordinator | None = None
        self._status_seq = 0
        #: Device proxies by local rank slot (``--proxy``).
        self.proxies: ProxyPool | None = None

    @property
    def ranks(self) -> list[RankStatus]:
        """The ranks this agent hosts, by rank."""
        return [self.local[r] for r in sorted(self.local)]

    def emit(self, kind: str, name: str, duration_s: float | None = None, **fields: Any) -> Event:
        """Write an agent event (tagged with this node)."""
        return self.log.emit(kind, name, duration_s, node=self.node, **fields)

    # ---------------------------------------------------------------- processes
    def _child_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        for k, v in _CHILD_ENV_DEFAULTS.items():
            env.setdefault(k, v)
        if env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3") == "3":
            env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"  # 3 tears the process down on a NCCL error
        env.update(self.config.env)
        env.update({
            MNEMOSYNE_JOB_ID: self.job_id,
            MNEMOSYNE_TOKEN: self.token,
            MNEMOSYNE_STORE_ADDR: self.store_addr,
            MNEMOSYNE_WORLD_SIZE: str(self.world_size),
            MNEMOSYNE_EVENT_LOG: self.event_log_path,
            # Children make the agent's store/communicator choice, whatever they can import.
            MNEMOSYNE_JIT_BACKEND: self.store_kind,
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
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        EXIT_CLOCK.watch(proc.pid)  # times its exit: the detect phase of a death nobody announced
        return proc

    def _start_trainer(self, st: RankStatus, epoch: int) -> subprocess.Popen[bytes]:
        extra = {MNEMOSYNE_RANK: str(st.rank), MNEMOSYNE_LOCAL_RANK: str(st.local_rank), MNEMOSYNE_EPOCH: str(epoch)}
        if self.config.proxy:
            assert self.proxies is not None
            extra[MNEMOSYNE_PROXY_SOCKET] = self.proxies.socket_for(st.local_rank)
        env = self._child_env(extra)
        env.pop(MNEMOSYNE_SPARE, None)
        return self._popen([], env)

    def _start_spare(self) -> None:
        # Spare ids are unique across nodes (their store keys are job-wide).
        sid = self.node * 1_000_000 + self._next_spare
        self._next_spare += 1
        proc = self._popen(["--spare-id", str(sid)], self._child_env({MNEMOSYNE_SPARE: "1"}))
        self.spares.append(_Spare(sid, proc))
        self.emit(EventKind.INFO, "spare_start", spare=sid, pid=proc.pid)

    def ready_spares(self) -> list[_Spare]:
        """Live spares that finished warming up."""
        assert self.store is not None
        return [s for s in self.spares if s.proc.poll() is None and self.store.check([_keys.spare_ready(s.spare_id)])]

    def _assign(self, st: RankStatus, epoch: int) -> subprocess.Popen[bytes]:
        """Give ``st.rank`` to a spare (a ready one first) or to a new process."""
        assert self.store is not None
        live = [s for s in self.spares if s.proc.poll() is None]
        ready = self.ready_spares()
        pick = (ready or live)[0] if (ready or live) else None
        if pick is None:
            proc = self._start_trainer(st, epoch)
            how = "new process"
        else:
            self.spares.remove(pick)
            body: dict[str, Any] = {"rank": st.rank, "local_rank": st.local_rank, "epoch": epoch,
                                    "world_size": self.world_size, "t": time.time()}
            if self.config.proxy:
                assert self.proxies is not None
                body["proxy_socket"] = self.proxies.socket_for(st.local_rank)
            self.store.set(_keys.spare_assign(pick.spare_id), json.dumps(body).encode())
            proc = pick.proc
            how = f"spare {pick.spare_id}" + ("" if pick in ready else " (still warming up)")
        self.emit(EventKind.INFO, "assigned", target_rank=st.rank, how=how, pid=proc.pid)
        self._refill_spares()
        return proc

    def _spare_target(self) -> int:
        """Spares this node keeps: the configured pool, or one per absent rank it warms for."""
        if not self.config.shrink:
            return self.config.spares
        lost_home = self.coord is not None and any(st.lost for st in self.coord.nodes.values())
        mine = sum(1 for st in self.local.values() if st.absent)
        if lost_home and self.coord is not None:
            members = self.membership.members
            mine += sum(1 for r, n in self.coord.homes.items()
                        if r not in members and self.coord.nodes[n].lost)
        return max(self.config.spares, mine)

    def _refill_spares(self) -> None:
        if self._stop_signal is not None or self.ckpt_order is not None:
            return
        # A spare that keeps dying (a broken environment) is not restarted forever.
        cap = self.config.spares + self.config.max_restarts + self.config.nproc
        while len([s for s in self.spares if s.proc.poll() is None]) < self._spare_target() and self._next_spare < cap:
            self._start_spare()

    # ---------------------------------------------------------------- epochs
    def publish(self, nxt: Membership, replaced: Sequence[int], reason: str) -> None:
        """Coordinator: make ``nxt`` the job's membership (placement and orders already set)."""
        assert self.store is not None
        if self.store_kind == "ccl":
            self._next_comm_epoch(nxt.epoch, reason)
        self.store.set(_keys.membership(nxt.epoch), nxt.to_json())
        self.store.set(_keys.EPOCH, str(nxt.epoch).encode())
        self.log.epoch = nxt.epoch
        self.emit(EventKind.EPOCH, "epoch", epoch_number=nxt.epoch, replaced=list(replaced), reason=reason,
                  members=list(nxt.ranks))
        self._apply(nxt.epoch)

    def _next_comm_epoch(self, epoch: int, reason: str) -> None:
        """Pick the ccl epoch the members build for membership ``epoch``, abort the current one.

        Members learn it from the store before the membership itself appears. Survivors
        holding the previous one repair it, the others create it, a replacement joins
        it. Aborting the previous one through its store key (ccl's ``signal_abort``)
        wakes every member blocked in it, or still building it, within one poll, in
        addition to the watchdogs' local aborts.
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

    def _poll_epochs(self) -> None:
        """Act on every membership epoch published since the last one this agent applied."""
        assert self.store is not None
        while self.store.check([_keys.membership(self.applied + 1)]):
            self._apply(self.applied + 1)

    def _apply(self, epoch: int) -> None:
        """Start the processes ``epoch`` places on this node; drop ranks that left it."""
        assert self.store is not None
        if epoch <= self.applied:
            return
        m = Membership.from_json(self.store.get(_keys.membership(epoch), 10.0))
        key = _keys.placement(epoch)
        place = {int(r): (int(v[0]), int(v[1])) for r, v in json.loads(self.store.get(key, 10.0)).items()} \
            if self.store.check([key]) else {}
        self.membership = m
        self.applied = epoch
        self.log.epoch = epoch
        if self.store.check([_keys.ckpt_order(epoch)]):
            order = json.loads(self.store.get(_keys.ckpt_order(epoch), 10.0))
            self.ckpt_order = (epoch, Path(order["dir"]), [int(r) for r in order["ranks"]], time.monotonic())
        for r, (node, lr) in sorted(place.items()):
            if node != self.node:
                continue
            st = self.local.setdefault(r, RankStatus(r, lr))
            st.local_rank = lr
            if epoch == 0:
                st.proc = self._start_trainer(st, 0)
                st.started_at = time.monotonic()
                st.member = m.members[r]
                continue
            self._stop_proc(st)  # normally already gone (it failed)
            st.proc = self._assign(st, epoch)
            st.member = m.members[r]
            st.started_at = time.monotonic()
            st.hung = ""
            st.hb_seq = -1
            st.position = ()
            st.phase = "replacing"
            st.replacements += 1
            st.absent = False
            st.finished = False
        for r, st in list(self.local.items()):
            if r in place and place[r][0] == self.node:
                continue
            if self.ckpt_order is not None and r not in self.ckpt_order[2] and st.proc is None:
                st.finished = True  # the failed rank of a checkpoint order: nothing to wait for
                continue
            if r not in m.members:
                if not st.absent and not st.finished:
                    self._stop_proc(st)
                    st.absent = True
                    st.phase = "absent"
            elif m.members[r] != st.member and st.member:
                self._stop_proc(st)  # the rank lives on another node now
                del self.local[r]
        self._refill_spares()

    def _stop_proc(self, st: RankStatus) -> None:
        if st.proc is not None and st.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                st.proc.kill()
            st.proc.wait()
        st.proc = None

    # ---------------------------------------------------------------- failures
    def _report(self, st: RankStatus, cause: str, detail: dict[str, Any]) -> None:
        """A rank of this node failed: tell the coordinator (directly on node 0)."""
        assert self.store is not None
        self.emit(EventKind.DETECT, cause, target_rank=st.rank, **detail)
        logger.warning("rank %d failed (%s): %s", st.rank, cause, detail)
        st.returncode = st.proc.returncode if st.proc is not None else None
        st.proc = None
        st.phase = "failed"
        if self.ckpt_order is not None:
            st.finished = True  # already checkpointing: a rank gone before or while writing
            return
        failure = Failure(st.rank, st.member, cause, detail, self.node)
        if self.coord is not None:
            self.coord.fail([failure])
            return
        index = self.store.add(_keys.FAIL_COUNT, 1) - 1
        body = {"rank": st.rank, "member": st.member, "cause": cause, "detail": detail, "node": self.node}
        self.store.set(_keys.fail_report(index), json.dumps(body).encode())

    def _finish_checkpoint(self, codes: dict[int, int]) -> int:
        """Every survivor exited after an ordered checkpoint: report it and return the job's exit code."""
        from mnemosyne.jit import ckpt
        from mnemosyne.jit.runtime import EXIT_CKPT

        assert self.ckpt_order is not None
        _epoch, root, survivors, t0 = self.ckpt_order
        codes = {r: c for r, c in codes.items() if r in survivors}
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
                self.emit(EventKind.PHASE, "ckpt", time.monotonic() - t0, ok=True, path=str(path),
                          step=report.step, bytes=report.bytes)
                logger.error("job stopped: a rank failed and no replacement was allowed; checkpoint of step %d "
                             "written to %s; continue with: mnemo launch --resume %s ...",
                             report.step, path, path)
                return EXIT_JOB_CKPT
        self.emit(EventKind.PHASE, "ckpt", time.monotonic() - t0, ok=False, codes=codes)
        self.failed_reason = (f"a rank failed and no replacement was allowed, and the just-in-time checkpoint into "
                              f"{root} failed (trainer exit codes {codes})")
        self.emit(EventKind.INFO, "gave_up", why=self.failed_reason)
        logger.error("giving up: %s", self.failed_reason)
        return 1

    def _classify_exit(self, st: RankStatus, rc: int) -> tuple[str, dict[str, Any]]:
        assert self.store is not None and st.proc is not None
        pid = st.proc.pid
        detail: dict[str, Any] = {"pid": pid, "returncode": rc, "exited_at": EXIT_CLOCK.exited_at(pid)}
        if st.hung:
            detail["why"] = st.hung
            return "hang", detail
        key = _keys.report(st.rank, pid)
        if self.store.check([key]):
            report = json.loads(self.store.get(key))
            detail.update(step=report.get("step"), phase=report.get("phase"), error=report.get("message"),
                          type=report.get("type"))
            return "exception", detail
        if rc < 0:
            name = signal.Signals(-rc).name
            detail["signal"] = name
            return {"SIGKILL": "kill", "SIGSEGV": "segfault"}.get(name, name.lower()), detail
        return "exit", detail

    def all_done(self) -> bool:
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
        self.emit(EventKind.INFO, "hang_suspected", target_rank=st.rank, pid=st.proc.pid, why=why)
        with contextlib.suppress(ProcessLookupError):
            os.kill(st.proc.pid, signal.SIGKILL)

    # ---------------------------------------------------------------- main loop
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _write_info(self) -> None:
        path = job_info_dir() / f"{self.job_id}.json"
        # The token travels in this file (mode 0600, in a 0700 folder of this user) so that
        # `mnemo inject` run by the same user can authenticate to the store.
        body = {"job": self.job_id, "store": self.store_addr, "store_kind": self.store_kind,
                "token": self.token, "pid": os.getpid(), "nproc": self.config.nproc, "nnodes": self.config.nnodes,
                "event_log": self.event_log_path, "started": time.time()}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)
        self._info_file = path

    def run(self) -> int:
        """Run this node's part of the job to completion; return the exit code (0: every rank finished)."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        code = 1
        try:
            code = self._run()
            return code
        finally:
            self._shutdown(code)
            for s, h in old.items():
                signal.signal(s, h)

    def _open_store(self) -> None:
        cfg = self.config
        if self.coordinator_node:
            host, port = parse_addr(cfg.master) if cfg.master else ("127.0.0.1", 0)
            self.server = host_job_store(self.job_id, self.token, cfg.host or host, port)
            self.store = self.server.store
            self.store_kind = self.server.kind
            self.store_addr = self.server.addr if not cfg.master else f"{host}:{self.server.addr.rpartition(':')[2]}"
            logger.info("job %s: store %s at %s", self.job_id,
                        "mnemosyne-ccl (authenticated)" if self.store_kind == "ccl" else "torch TCPStore (fallback)",
                        self.store_addr)
            return
        from mnemosyne.jit._select import use_ccl

        assert cfg.master is not None
        self.store_addr = cfg.master
        self.store_kind = "ccl" if use_ccl() else "torch"
        deadline = time.monotonic() + cfg.startup_timeout
        while True:
            try:
                self.store = connect_job_store(cfg.master, self.job_id, self.token, timeout=10.0,
                                               kind=self.store_kind)
                self.store.wait([_keys.membership(0)], 10.0)
                return
            except MnemosyneError as exc:
                if time.monotonic() > deadline:
                    msg = (f"node {self.node}: could not join job {self.job_id!r} at {cfg.master} within "
                           f"{cfg.startup_timeout:.0f} s: {exc}")
                    raise MnemosyneError(msg) from None
                if self._stop_signal is not None:
                    raise
                time.sleep(0.5)

    def _run(self) -> int:
        self._open_store()
        assert self.store is not None
        self.emit(EventKind.INFO, "launch", nproc=self.config.nproc, nnodes=self.config.nnodes,
                  spares=self.config.spares, command=self.config.command, store=self.store_addr,
                  store_kind=self.store_kind)
        if self.config.proxy:
            self.proxies = ProxyPool(self.config.nproc, self.job_id, self.config.proxy_size,
                                     lambda: self._child_env({}), self.emit, _die_with_parent)
            self.proxies.start()
        if self.coordinator_node:
            self._write_info()
            self.coord = Coordinator(self)
            place = {r: (r // self.config.nproc, r % self.config.nproc) for r in range(self.world_size)}
            self.coord._publish(self.membership, place, "start")
        else:
            self._poll_epochs()
        next_hb = next_status = next_tick = 0.0
        store_ok = time.monotonic()
        while True:
            if self._stop_signal is not None:
                name = signal.Signals(self._stop_signal).name
                self.emit(EventKind.INFO, "stopped", signal=name)
                return 128 + self._stop_signal
            if self.failed_reason:
                self.emit(EventKind.INFO, "gave_up", why=self.failed_reason)
                logger.error("giving up: %s", self.failed_reason)
                return 1
            now = time.monotonic()
            try:
                code = self._tick(now, now >= next_hb, now >= next_status)
                store_ok = now
            except MnemosyneError as exc:
                if self.coordinator_node or now - store_ok < self.config.node_timeout:
                    if self.coordinator_node:
                        raise
                    time.sleep(0.05)
                    continue
                self.failed_reason = f"lost the job's store at {self.store_addr} (node 0 gone?): {exc}"
                continue
            if next_hb <= now:
                next_hb = now + 0.05
            if next_status <= now:
                next_status = now + _STATUS_PERIOD
            if code is not None:
                return code
            if self.on_tick is not None and now >= next_tick:
                next_tick = now + 0.1
                self.on_tick(self)
            time.sleep(self.config.poll)

    def _tick(self, now: float, heartbeats: bool, status: bool) -> int | None:
        """One supervision round; returns this agent's exit code once its part of the job is over."""
        assert self.store is not None
        if not self.coordinator_node:
            self._poll_epochs()
        for st in self.ranks:
            if st.finished or st.proc is None:
                continue
            rc = st.proc.poll()
            if rc is None:
                continue
            if self.ckpt_order is not None and st.rank in self.ckpt_order[2]:
                st.finished = True  # a survivor done with the ordered checkpoint (or failed at it)
                st.phase = "ckpt"
                st.returncode = rc
                continue
            if rc == 0 or self.all_done():
                # A rank that dies after every rank reported done is not replaced:
                # nobody needs its state any more.
                st.finished = True
                st.phase = "done"
                st.returncode = rc
                continue
            cause, detail = self._classify_exit(st, rc)
            self._report(st, cause, detail)
        if self.proxies is not None:
            self.proxies.check()
        for sp in list(self.spares):
            if sp.proc.poll() is not None:
                self.spares.remove(sp)
                self.emit(EventKind.INFO, "spare_exit", spare=sp.spare_id, returncode=sp.proc.returncode)
                self._refill_spares()
        if heartbeats:
            self._check_heartbeats(now)
        if status:
            self._write_status()
            _recap.poll(self)  # one line per completed recovery, from the event log
            if self.coord is not None:
                self.coord.poll(now)
            else:
                if self.store.check([_keys.STOP]):
                    self.failed_reason = f"the job was stopped: {self.store.get(_keys.STOP, 5.0).decode()}"
                    return None
                if self.store.check([_keys.agent_lost(self.node)]):
                    why = self.store.get(_keys.agent_lost(self.node), 5.0).decode()
                    self.failed_reason = f"the coordinator gave this node up ({why}); its ranks live elsewhere"
                    return None
        return self._finished()

    def _write_status(self) -> None:
        assert self.store is not None
        self._status_seq += 1
        if self.coordinator_node:
            return  # the coordinator reads its own node directly
        body = {"seq": self._status_seq, "ready": len(self.ready_spares()), "t": time.time(),
                "live": len([s for s in self.spares if s.proc.poll() is None]),
                "ranks": sorted(self.local)}
        self.store.set(_keys.agent_status(self.node), json.dumps(body).encode())

    def _finished(self) -> int | None:
        """This agent's exit code when its part of the job is over, else None."""
        over = self.ckpt_order is not None or self.all_done()
        if not all(st.finished or (st.absent and over) for st in self.local.values()):
            return None
        if not self.local and not over:
            return None
        codes = {st.rank: st.returncode for st in self.local.values() if st.returncode is not None}
        if self.coord is not None:
            if not self.coord.others_finished():
                return None
            if self.ckpt_order is not None:
                return self._finish_checkpoint({**self.coord.exit_codes(), **codes})
            self.emit(EventKind.INFO, "job_done", restarts=self.coord.restarts)
            return 0
        from mnemosyne.jit.runtime import EXIT_CKPT

        assert self.store is not None
        if self.ckpt_order is not None:
            code = EXIT_JOB_CKPT if all(c == EXIT_CKPT for r, c in codes.items() if r in self.ckpt_order[2]) else 1
        else:
            code = 0
        self.store.set(_keys.agent_exit(self.node), json.dumps({"code": code, "codes": codes}).encode())
        self.emit(EventKind.INFO, "node_done", code=code)
        return code

    def _shutdown(self, code: int) -> None:
        if self.coord is not None and self.store is not None and self.config.nnodes > 1:
            # Tell the other agents (they stop their trainers), give them a moment to leave.
            with contextlib.suppress(MnemosyneError):
                if code != 0 and not self.coord.others_finished():
                    why = self.failed_reason or (f"signal {signal.Signals(self._stop_signal).name} on node 0"
                                                 if self._stop_signal else f"node 0 exits with {code}")
                    self.store.set(_keys.STOP, why.encode())
                    deadline = time.monotonic() + 3.0
                    while time.monotonic() < deadline and not self.coord.others_finished():
                        self.coord._check_nodes(time.monotonic())
                        time.sleep(0.1)
        procs = [st.proc for st in self.local.values() if st.proc is not None] + [s.proc for s in self.spares]
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
        if not self.coordinator_node and self.store is not None and code != 0:
            with contextlib.suppress(MnemosyneError):
                if not self.store.check([_keys.agent_exit(self.node)]):
                    self.store.set(_keys.agent_exit(self.node), json.dumps({"code": code, "codes": {}}).encode())
        # After the trainers: a trainer still running must not lose its arena under it.
        if self.proxies is not None:
            self.proxies.stop()
        if self._info_file is not None:
            self._info_file.unlink(missing_ok=True)
        if self.server is not None:
            self.server.stop()
        self.log.close()
