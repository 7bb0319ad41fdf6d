"""The per-node agent behind ``mnemo launch``: supervisor, spare keeper, and (node 0) store host.

One agent runs per node. The agent of node 0 hosts the job's persistent store (so the
store outlives every trainer) and is the coordinator (:mod:`mnemosyne.jit._coordinator`):
the only one that publishes membership epochs. Every agent starts its node's trainers
through :mod:`mnemosyne.jit._bootstrap`, keeps ``spares`` pre-warmed processes (torch
imported, device initialised, waiting for an assignment), and supervises its own ranks:

* process exit (``Popen.poll``, every ``poll`` seconds): a non-zero exit is a failure,
  classified by :func:`~mnemosyne.jit._health.classify_exit`;
* hangs, from heartbeats (:class:`~mnemosyne.jit._health.HangWatch`): a hung process is
  killed with SIGKILL, then handled like an exit;
* rebuild requests from trainers that saw a communicator error nobody died for.

A failure goes to the coordinator (directly on node 0, through a store report
elsewhere), which decides the next epoch with a placement; node 0's agent publishes it as
one :class:`~mnemosyne.jit._protocol.EpochRecord`, and each agent then starts the
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
import json
import logging
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnemosyne.core.env import (
    MNEMOSYNE_EPOCH,
    MNEMOSYNE_EVENT_LOG,
    MNEMOSYNE_HANG_TIMEOUT,
    MNEMOSYNE_JIT_BACKEND,
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
from mnemosyne.jit import _keys, _recap, _snapdir
from mnemosyne.jit._agent_config import AgentConfig, check_config, job_info_dir, read_token_file
from mnemosyne.jit._agent_setup import open_store, write_info
from mnemosyne.jit._ckpt_order import finish_checkpoint, writer_exited
from mnemosyne.jit._coordinator import DEFAULT_CKPT_DIR, Coordinator, Decision, Failure, NodeView, Stop
from mnemosyne.jit._health import HangWatch, classify_exit
from mnemosyne.jit._protocol import EXIT_CKPT, EXIT_JOB_CKPT, EpochRecord, read_record
from mnemosyne.jit._proxies import ProxyPool
from mnemosyne.jit._publish import Publisher
from mnemosyne.jit._spawn import RankStatus, Spare, SparePool, child_env, die_with_parent, popen, terminate
from mnemosyne.jit._store import JobStoreHost

__all__ = ["DEFAULT_CKPT_DIR", "EXIT_JOB_CKPT", "Agent", "AgentConfig", "RankStatus", "job_info_dir", "read_token_file"]

logger = logging.getLogger(__name__)

# How often an agent rewrites its status (the coordinator's liveness signal).
_STATUS_PERIOD = 0.1


class Agent:
    """Supervises one node's ranks (see module doc). Call :meth:`run` from the main thread.

    Args:
        config: What to run.
        on_tick: Called from the supervision loop about 10 times a second (live views).
    """

    def __init__(self, config: AgentConfig, on_tick: Callable[[Agent], None] | None = None) -> None:
        check_config(config)
        if config.node_rank == 0:
            job_info_dir()  # a folder taken over by another user is refused before anything starts
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
        self.pool: SparePool | None = None
        self.health: HangWatch | None = None
        self.membership = Membership.initial(self.world_size)
        self.applied = -1  # newest membership epoch this agent acted on
        self._stop_signal: int | None = None
        self._info_file: Path | None = None
        self.server: JobStoreHost | None = None
        self.store_addr = ""
        self.store_kind = ""
        self.store: Store | None = None
        self.failed_reason = ""
        #: Set once a just-in-time checkpoint was ordered: (epoch, root, survivors, t0).
        self.ckpt_order: tuple[int, Path, list[int], float] | None = None
        self.coord: Coordinator | None = None
        self.publisher: Publisher | None = None
        self._status_seq = 0
        #: Device proxies by local rank slot (``--proxy``).
        self.proxies: ProxyPool | None = None

    @property
    def ranks(self) -> list[RankStatus]:
        """The ranks this agent hosts, by rank."""
        return [self.local[r] for r in sorted(self.local)]

    @property
    def spares(self) -> list[Spare]:
        """This node's spare processes (ready or warming up)."""
        return self.pool.spares if self.pool is not None else []

    def emit(self, kind: str, name: str, duration_s: float | None = None, **fields: Any) -> Event:
        """Write an agent event (tagged with this node)."""
        return self.log.emit(kind, name, duration_s, node=self.node, **fields)

    # ---------------------------------------------------------------- processes
    def _child_env(self, extra: dict[str, str]) -> dict[str, str]:
        return child_env(self.config, {
            MNEMOSYNE_JOB_ID: self.job_id,
            MNEMOSYNE_TOKEN: self.token,
            MNEMOSYNE_STORE_ADDR: self.store_addr,
            MNEMOSYNE_WORLD_SIZE: str(self.world_size),
            MNEMOSYNE_EVENT_LOG: self.event_log_path,
            # Children make the agent's store/communicator choice, whatever they can import.
            MNEMOSYNE_JIT_BACKEND: self.store_kind,
        }, extra)

    def _popen(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return popen(args, self.config.command, env)

    def _start_trainer(self, st: RankStatus, epoch: int) -> subprocess.Popen[bytes]:
        extra = {MNEMOSYNE_RANK: str(st.rank), MNEMOSYNE_LOCAL_RANK: str(st.local_rank), MNEMOSYNE_EPOCH: str(epoch)}
        if self.config.proxy:
            assert self.proxies is not None
            extra[MNEMOSYNE_PROXY_SOCKET] = self.proxies.socket_for(st.local_rank)
        env = self._child_env(extra)
        env.pop(MNEMOSYNE_SPARE, None)
        return self._popen([], env)

    def _spawn_spare(self, sid: int) -> subprocess.Popen[bytes]:
        return self._popen(["--spare-id", str(sid)], self._child_env({MNEMOSYNE_SPARE: "1"}))

    def _view(self) -> NodeView:
        """This node's spares (ready, alive), as the coordinator sees them."""
        assert self.pool is not None
        return NodeView(len(self.pool.ready()), len(self.pool.live()))

    def _assign(self, st: RankStatus, epoch: int) -> subprocess.Popen[bytes]:
        """Give ``st.rank`` to a spare (a ready one first) or to a new process."""
        assert self.pool is not None
        body: dict[str, Any] = {"rank": st.rank, "local_rank": st.local_rank, "epoch": epoch,
                                "world_size": self.world_size}
        if self.config.proxy:
            assert self.proxies is not None
            body["proxy_socket"] = self.proxies.socket_for(st.local_rank)
        got = self.pool.assign(body)
        if got is None:
            proc = self._start_trainer(st, epoch)
            how = "new process"
        else:
            proc, how = got
        self.emit(EventKind.INFO, "assigned", target_rank=st.rank, how=how, pid=proc.pid)
        self._refill_spares()
        return proc

    def _spare_target(self) -> int:
        """Spares this node keeps: the configured pool, or one per absent rank it warms for."""
        if not self.config.shrink:
            return self.config.spares
        mine = sum(1 for st in self.local.values() if st.absent)
        if self.coord is not None:
            mine += self.coord.absent_on_lost_nodes()
        return max(self.config.spares, mine)

    def _refill_spares(self) -> None:
        if self._stop_signal is not None or self.ckpt_order is not None or self.pool is None:
            return
        # A spare that keeps dying (a broken environment) is not restarted forever.
        cap = self.config.spares + self.config.max_restarts + self.config.nproc
        while len(self.pool.live()) < self._spare_target() and self.pool.started < cap:
            self.pool.start()

    # ---------------------------------------------------------------- epochs
    def _execute(self, decision: Decision | None) -> None:
        """Coordinator: carry out a decision (publish the epoch record, or give the job up)."""
        if decision is None:
            return
        if isinstance(decision, Stop):
            self.failed_reason = decision.reason
            return
        assert self.publisher is not None
        record = self.publisher.publish(decision)
        nxt = record.membership
        self.log.epoch = nxt.epoch
        self.emit(EventKind.EPOCH, "epoch", epoch_number=nxt.epoch, replaced=sorted(decision.placement),
                  reason=decision.reason, members=list(nxt.ranks))
        self._apply(record)
        for kind, name, fields in decision.notes:
            self.emit(kind, name, **fields)

    def _poll_epochs(self) -> None:
        """Act on every membership epoch published since the last one this agent applied."""
        assert self.store is not None
        while self.store.check([_keys.membership(self.applied + 1)]):
            self._apply(read_record(self.store, self.applied + 1, 10.0))

    def _apply(self, record: EpochRecord) -> None:
        """Start the processes ``record`` places on this node; drop ranks that left it."""
        epoch = record.epoch
        if epoch <= self.applied:
            return
        m = record.membership
        place = record.placement
        self.membership = m
        self.applied = epoch
        self.log.epoch = epoch
        if record.ckpt is not None:
            self.ckpt_order = (epoch, Path(record.ckpt.dir), list(record.ckpt.ranks), time.monotonic())
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
            self._execute(self.coord.fail([failure], self._view()))
            return
        index = self.store.add(_keys.FAIL_COUNT, 1) - 1
        body = {"rank": st.rank, "member": st.member, "cause": cause, "detail": detail, "node": self.node}
        self.store.set(_keys.fail_report(index), json.dumps(body).encode())

    def all_done(self) -> bool:
        """Every present member reported the end of training (absent ranks are not waited for)."""
        assert self.store is not None
        return self.store.check([_keys.done(r) for r in self.membership.ranks])

    # ---------------------------------------------------------------- main loop
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

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

    def _run(self) -> int:
        js = open_store(self.config, self.node, self.job_id, self.token, lambda: self._stop_signal is not None)
        self.store, self.store_kind, self.store_addr, self.server = js.store, js.kind, js.addr, js.server
        self.pool = SparePool(self.node, self.store, self._spawn_spare, self.emit)
        self.health = HangWatch(self.config, self.hang_override, self.store, self.emit)
        self.emit(EventKind.INFO, "launch", nproc=self.config.nproc, nnodes=self.config.nnodes,
                  spares=self.config.spares, command=self.config.command, store=self.store_addr,
                  store_kind=self.store_kind)
        if self.config.proxy:
            self.proxies = ProxyPool(self.config.nproc, self.job_id, self.config.proxy_size,
                                     lambda: self._child_env({}), self.emit, die_with_parent)
            self.proxies.start()
        if self.coordinator_node:
            self._info_file = write_info(self.config, self.job_id, self.token, js, self.event_log_path)
            self.coord = Coordinator(self.config, self.node, self.store, self.emit)
            self.publisher = Publisher(self.store, self.store_kind)
            self._execute(self.coord.start())
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
        assert self.store is not None and self.pool is not None and self.health is not None
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
                st.phase, st.returncode = "ckpt", rc
                writer_exited(self.store, self.ckpt_order[0], st.rank, rc)
                continue
            if rc == 0 or self.all_done():
                # A rank that dies after every rank reported done is not replaced:
                # nobody needs its state any more.
                st.finished = True
                st.phase = "done"
                st.returncode = rc
                continue
            cause, detail = classify_exit(self.store, st, rc)
            self._report(st, cause, detail)
        if self.proxies is not None:
            self.proxies.check()
        for sp in self.pool.reap():
            self.emit(EventKind.INFO, "spare_exit", spare=sp.spare_id, returncode=sp.proc.returncode)
            self._refill_spares()
        if heartbeats:
            self.health.check(self.ranks, now)
        if status:
            self._write_status()
            _recap.poll(self)  # one line per completed recovery, from the event log
            if self.coord is not None:
                for decision in self.coord.poll(now, self._view()):
                    self._execute(decision)
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
        view = self._view()
        body = {"seq": self._status_seq, "ready": view.ready, "t": time.time(), "live": view.live,
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
                _epoch, root, survivors, t0 = self.ckpt_order
                code, self.failed_reason = finish_checkpoint(root, survivors, t0, {**self.coord.exit_codes(), **codes},
                                                             self.job_id, self.emit)
                return code
            self.emit(EventKind.INFO, "job_done", restarts=self.coord.restarts)
            return 0
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
                        self.coord.check_nodes(time.monotonic(), self._view())
                        time.sleep(0.1)
        procs = [st.proc for st in self.local.values() if st.proc is not None] + [s.proc for s in self.spares]
        if self.store is not None:
            for sp in self.spares:
                with contextlib.suppress(MnemosyneError):
                    self.store.set(_keys.spare_stop(sp.spare_id), b"1")
        terminate(procs)
        if not self.coordinator_node and self.store is not None and code != 0:
            with contextlib.suppress(MnemosyneError):
                if not self.store.check([_keys.agent_exit(self.node)]):
                    self.store.set(_keys.agent_exit(self.node), json.dumps({"code": code, "codes": {}}).encode())
        # After the trainers: a trainer still running must not lose its arena under it.
        if self.proxies is not None:
            self.proxies.stop()
        _snapdir.remove_root(self.job_id, self.node)  # after the trainers: they write there
        if self._info_file is not None:
            self._info_file.unlink(missing_ok=True)
        if self.server is not None:
            self.server.stop()
        self.log.close()
