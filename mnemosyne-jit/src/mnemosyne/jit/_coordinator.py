"""The job's decisions, taken by one agent (the coordinator: node 0, the store's host).

Every agent supervises the ranks of its own node and reports their failures; only the
coordinator turns failures into membership epochs, so two agents never publish
conflicting ones. It decides, for each failed rank, in this order:

1. a ready (pre-warmed) spare on the rank's own node, else on any other live node;
2. with ``--shrink``: no replacement now, the survivors continue without the rank and
   a spare warms up (the job grows back when it is ready);
3. a new process (or a spare still warming up) on the rank's own node, when that node
   is alive;
4. otherwise, or when no replacement is allowed (``--no-replace``, ``--max-restarts``
   used up with a checkpoint folder): a just-in-time checkpoint by the survivors;
   without a checkpoint folder the job is given up with a message saying what would
   have let it continue.

A node whose agent stopped writing its status for ``node_timeout`` seconds is lost:
its ranks fail together ("node_lost") and are decided in one epoch. Every epoch comes
with a placement (rank -> node, local rank), set in the store before the epoch, which
tells each agent which processes to start.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnemosyne.core.events import EventKind
from mnemosyne.core.membership import Membership
from mnemosyne.jit import _keys

if TYPE_CHECKING:
    from mnemosyne.jit.agent import Agent

__all__ = ["DEFAULT_CKPT_DIR", "GROW_WAIT", "Coordinator", "Failure"]

logger = logging.getLogger(__name__)

#: Checkpoint root when ``--no-replace`` is given without ``--ckpt-dir``.
DEFAULT_CKPT_DIR = "mnemo-ckpts"
#: Seconds a ready spare waits for other warming spares so that several absent ranks grow back in one epoch.
GROW_WAIT = 3.0


@dataclass
class Failure:
    """One failed holder of a rank, as an agent reported it."""

    rank: int
    member: str
    cause: str
    detail: dict[str, Any]
    node: int


@dataclass
class _Node:
    node: int
    seq: int = -1
    changed: float = 0.0
    ready: int = 0
    live: int = 0  # spares alive, ready or still warming up
    seen: bool = False
    lost: bool = False
    exited: dict[str, Any] | None = None

    @property
    def alive(self) -> bool:
        return not self.lost and self.exited is None


class Coordinator:
    """Decides membership epochs for the whole job (see module doc).

    Args:
        agent: The agent of node 0, whose store and event log it uses.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        cfg = agent.config
        self.nodes = {n: _Node(n) for n in range(cfg.nnodes)}
        self.where = {r: r // cfg.nproc for r in range(agent.world_size)}  # rank -> node hosting it
        self.homes = dict(self.where)
        self.restarts = 0
        self._reports_read = 0
        self._rebuilds_seen = 0
        self._foreign: dict[int, int] = {}  # node -> ranks placed there from other nodes
        self._grow_ready_at: float | None = None  # when a spare first stood ready for an absent rank
        self.started = time.monotonic()

    # ------------------------------------------------------------------ inputs
    def poll(self, now: float) -> None:
        """Read failure reports and node statuses; grow back when spares are ready."""
        store = self.agent.store
        assert store is not None
        failures: list[Failure] = []
        reserved = store.add(_keys.FAIL_COUNT, 0)
        while self._reports_read < reserved:
            key = _keys.fail_report(self._reports_read)
            if not store.check([key]):
                break  # reserved but not written yet: next poll
            body = json.loads(store.get(key, 5.0))
            failures.append(Failure(int(body["rank"]), str(body["member"]), str(body["cause"]),
                                    dict(body.get("detail", {})), int(body["node"])))
            self._reports_read += 1
        failures += self._check_nodes(now)
        if failures:
            self.fail(failures)
        if self.agent.ckpt_order is None and self.agent.config.shrink:
            self._maybe_grow(now)
        requests = store.add(_keys.REBUILD_REQUEST, 0)
        if requests > self._rebuilds_seen and self.agent.ckpt_order is None:
            self._rebuilds_seen = requests
            m = self.agent.membership
            self._publish(m.next(reason="rebuild requested by a trainer"), {}, "rebuild requested by a trainer")

    def _check_nodes(self, now: float) -> list[Failure]:
        store = self.agent.store
        assert store is not None
        cfg = self.agent.config
        lost: list[Failure] = []
        for st in self.nodes.values():
            if st.node == self.agent.node:
                st.ready = len(self.agent.ready_spares())
                st.live = len([s for s in self.agent.spares if s.proc.poll() is None])
                st.seen = True
                continue
            if st.lost or st.exited is not None:
                continue
            if store.check([_keys.agent_exit(st.node)]):
                st.exited = json.loads(store.get(_keys.agent_exit(st.node), 5.0))
                continue
            if store.check([_keys.agent_status(st.node)]):
                body = json.loads(store.get(_keys.agent_status(st.node), 5.0))
                if int(body["seq"]) != st.seq:
                    st.seq, st.changed, st.seen = int(body["seq"]), now, True
                    st.ready, st.live = int(body["ready"]), int(body.get("live", body["ready"]))
            limit = cfg.node_timeout if st.seen else cfg.startup_timeout
            since = st.changed if st.seen else self.started
            if now - since > limit:
                why = (f"agent silent for {now - since:.1f} s" if st.seen
                       else f"agent never connected in {cfg.startup_timeout:.0f} s")
                st.lost = True
                store.set(_keys.agent_lost(st.node), why.encode())
                self.agent.emit(EventKind.DETECT, "node_lost", lost_node=st.node, why=why)
                logger.warning("node %d lost: %s", st.node, why)
                members = self.agent.membership.members
                lost += [Failure(r, members[r], "node_lost", {"why": why}, st.node)
                         for r, n in sorted(self.where.items()) if n == st.node and r in members]
        return lost

    # ---------------------------------------------------------------- decisions
    def fail(self, failures: list[Failure]) -> None:
        """Decide what happens to the ranks of ``failures`` (stale reports are ignored)."""
        a = self.agent
        members = a.membership.members
        fresh: dict[int, Failure] = {}
        for f in failures:
            if members.get(f.rank) == f.member and f.rank not in fresh:
                fresh[f.rank] = f
        if not fresh or a.ckpt_order is not None:
            return
        names = ", ".join(f"rank {r} {f.cause}" for r, f in sorted(fresh.items()))
        usage = [f for f in fresh.values() if f.detail.get("type") == "ConfigError"]
        if usage:
            # A usage error (bad script for the options given) recurs in every replacement.
            f = usage[0]
            a.failed_reason = (f"rank {f.rank} stopped on a usage error, which a replacement would repeat: "
                               f"{f.detail.get('error')}")
            return
        self.nodes[a.node].ready = len(a.ready_spares())
        self.restarts += len(fresh)
        cfg = a.config
        exhausted = self.restarts > cfg.max_restarts
        if cfg.no_replace or (exhausted and cfg.ckpt_dir):
            self._order_checkpoint(sorted(fresh), f"{names}: no replacement allowed")
            return
        if exhausted:
            a.failed_reason = f"{names} after {cfg.max_restarts} replacements"
            return
        place: dict[int, tuple[int, int]] = {}
        shrink: list[int] = []
        stuck: list[int] = []
        ready = {n: st.ready for n, st in self.nodes.items() if st.alive}
        for r in sorted(fresh):
            home = self.where[r]
            node = self._ready_node(home, ready)
            if node is not None:
                ready[node] -= 1
                place[r] = (node, self._local_rank(r, node))
            elif cfg.shrink:
                shrink.append(r)
            elif home in ready:
                place[r] = (home, self._local_rank(r, home))  # a new process (or a warming spare) at home
            else:
                stuck.append(r)
        if shrink and len(shrink) >= len(members):
            stuck += shrink  # nobody would be left to continue
            shrink = []
        if stuck:
            why = (f"{names}: no spare capacity for ranks {stuck} on a live node (use --spares, --shrink or "
                   f"--ckpt-dir)")
            if cfg.ckpt_dir:
                self._order_checkpoint(sorted(fresh), why)
            else:
                a.failed_reason = why
            return
        nxt = a.membership.next(replace=list(place), remove=shrink, reason=names)
        reason = names if not shrink else f"{names}: no warm spare ready, continue with {nxt.size} replicas"
        self._publish(nxt, place, reason)
        if shrink:
            a.emit(EventKind.INFO, "shrink", target_ranks=shrink, members=list(nxt.ranks),
                   world_size=a.world_size)
            logger.warning("%s: continuing with %d of %d replicas until a replacement is ready", names, nxt.size,
                           a.world_size)

    def _ready_node(self, home: int, ready: dict[int, int]) -> int | None:
        if ready.get(home, 0) > 0:
            return home
        return next((n for n in sorted(ready) if ready[n] > 0), None)

    def _local_rank(self, rank: int, node: int) -> int:
        """Device index of ``rank`` on ``node``: its own at home, else the next spare slot there."""
        if self.homes[rank] == node:
            return rank - node * self.agent.config.nproc
        k = self._foreign.get(node, 0)
        self._foreign[node] = k + 1
        return self.agent.config.nproc + k

    def _maybe_grow(self, now: float) -> None:
        """Give absent ranks back to ready spares, all in one epoch.

        Every membership change aborts the step in progress, so when several ranks are
        absent and more spares are still warming up, the first ready spare waits up to
        :data:`GROW_WAIT` seconds for the others: one grow instead of several.
        """
        a = self.agent
        absent = [r for r in range(a.world_size) if r not in a.membership.members]
        if not absent:
            self._grow_ready_at = None
            return
        if a.all_done() or self._finishing():
            return
        alive = [st for st in self.nodes.values() if st.alive]
        n_ready, n_live = sum(st.ready for st in alive), sum(max(st.live, st.ready) for st in alive)
        if n_ready == 0:
            self._grow_ready_at = None
            return
        if self._grow_ready_at is None:
            self._grow_ready_at = now
        if n_ready < len(absent) and n_live > n_ready and now - self._grow_ready_at < GROW_WAIT:
            return
        self._grow_ready_at = None
        ready = {n: st.ready for n, st in self.nodes.items() if st.alive}
        place: dict[int, tuple[int, int]] = {}
        for r in absent:
            node = self._ready_node(self.where[r], ready)
            if node is None:
                break
            ready[node] -= 1
            place[r] = (node, self._local_rank(r, node))
        if not place:
            return
        ranks = sorted(place)
        nxt = a.membership.next(add=ranks, reason=f"grow back {ranks}")
        self._publish(nxt, place, f"replacement ready: grow back to {nxt.size} replicas")
        a.emit(EventKind.INFO, "grow", target_ranks=ranks, members=list(nxt.ranks), world_size=a.world_size)
        logger.warning("replacement ready: ranks %s rejoin (%d of %d replicas)", ranks, nxt.size, a.world_size)

    def _finishing(self) -> bool:
        """Whether a member already reached the end of training (growing now could strand the newcomer)."""
        store = self.agent.store
        assert store is not None
        for r in self.agent.membership.ranks:
            key = _keys.heartbeat(r)
            if store.check([key]) and json.loads(store.get(key, 5.0)).get("phase") in ("finish", "closed"):
                return True
        return False

    def _order_checkpoint(self, failed: list[int], why: str) -> None:
        """Publish the "checkpoint and exit" decision: a new epoch whose order key lists the survivors."""
        a = self.agent
        store = a.store
        assert store is not None
        root = Path(a.config.ckpt_dir or DEFAULT_CKPT_DIR).resolve()
        survivors = [r for r in a.membership.ranks if r not in failed]
        nxt = a.membership.next(reason=f"{why}: checkpoint and exit")
        order = {"dir": str(root), "ranks": survivors, "failed": failed}
        # Set before the epoch: a survivor that adopts the epoch finds the order with it.
        store.set(_keys.ckpt_order(nxt.epoch), json.dumps(order).encode())
        self._publish(nxt, {}, f"{why}: checkpoint and exit")
        a.emit(EventKind.INFO, "ckpt_ordered", target_ranks=failed, dir=str(root), ranks=survivors)
        logger.warning("%s: healthy ranks %s checkpoint into %s", why, survivors, root)

    def _publish(self, nxt: Membership, place: dict[int, tuple[int, int]], reason: str) -> None:
        store = self.agent.store
        assert store is not None
        body = {str(r): [n, lr] for r, (n, lr) in place.items()}
        store.set(_keys.placement(nxt.epoch), json.dumps(body).encode())  # before the epoch itself
        for r, (n, _lr) in place.items():
            self.where[r] = n
        self.agent.publish(nxt, sorted(place), reason)

    # ------------------------------------------------------------------ ending
    def others_finished(self) -> bool:
        """Every other node's agent left (or was lost)."""
        return all(st.exited is not None or st.lost for n, st in self.nodes.items() if n != self.agent.node)

    def exit_codes(self) -> dict[int, int]:
        """Trainer exit codes the other agents reported as they left."""
        codes: dict[int, int] = {}
        for st in self.nodes.values():
            if st.exited is not None:
                codes.update({int(r): int(c) for r, c in st.exited.get("codes", {}).items()})
        return codes
