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
with a placement (rank -> node, local rank), which tells each agent which processes to
start.

The coordinator decides; it does not act. Its inputs are the failures (reported by its
own agent, or read from the store), the other agents' statuses (from the store) and a
:class:`NodeView` of its own node's spares; each decision is a :class:`Publish` (the
next epoch: membership, placement, checkpoint order) or a :class:`Stop` (give the job
up, and why). Its agent turns a :class:`Publish` into an
:class:`~mnemosyne.jit._protocol.EpochRecord` (adding the communicator epoch), writes
it, and applies it like every other agent. The coordinator keeps only its own
bookkeeping (latest membership, where each rank lives, restarts used) and never reads or
writes its agent's attributes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnemosyne.core.events import EventKind
from mnemosyne.core.membership import Membership
from mnemosyne.core.store import Store
from mnemosyne.jit import _keys
from mnemosyne.jit._agent_config import AgentConfig
from mnemosyne.jit._protocol import CkptOrder

__all__ = ["DEFAULT_CKPT_DIR", "GROW_WAIT", "Coordinator", "Decision", "Failure", "NodeView", "Publish", "Stop"]

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


@dataclass(frozen=True)
class NodeView:
    """What the coordinator's own agent tells it about its node: spares ready, and alive (ready or warming)."""

    ready: int
    live: int


@dataclass(frozen=True)
class Publish:
    """Decision: publish the next epoch.

    Attributes:
        membership: The next membership.
        placement: Processes to start: rank -> (node, local rank).
        reason: Why (for the ``epoch`` event).
        ckpt: The "checkpoint and exit" order, if any.
        notes: Events ``(kind, name, fields)`` to write once the epoch is published.
    """

    membership: Membership
    placement: dict[int, tuple[int, int]]
    reason: str
    ckpt: CkptOrder | None = None
    notes: tuple[tuple[str, str, dict[str, Any]], ...] = field(default=())


@dataclass(frozen=True)
class Stop:
    """Decision: give the job up (``reason`` says why and what would have let it continue)."""

    reason: str


Decision = Publish | Stop


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
        config: The launch configuration (the same on every node).
        node: The coordinator's own node (0).
        store: The job's store (failure reports, agent statuses, heartbeats).
        emit: Writes an agent event (``node_lost``, seen as it is detected).
    """

    def __init__(self, config: AgentConfig, node: int, store: Store,
                 emit: Callable[..., object]) -> None:
        self.config = config
        self.node = node
        self.store = store
        self.emit = emit
        self.world_size = config.nproc * config.nnodes
        #: The latest membership this coordinator decided (its agent publishes it at once).
        self.membership = Membership.initial(self.world_size)
        self.ckpt_ordered = False
        self.nodes = {n: _Node(n) for n in range(config.nnodes)}
        self.where = {r: r // config.nproc for r in range(self.world_size)}  # rank -> node hosting it
        self.homes = dict(self.where)
        self.restarts = 0
        self._reports_read = 0
        self._rebuilds_seen = 0
        self._foreign: dict[int, int] = {}  # node -> ranks placed there from other nodes
        self._grow_ready_at: float | None = None  # when a spare first stood ready for an absent rank
        self.started = time.monotonic()

    def start(self) -> Publish:
        """The first epoch: every rank on its home node."""
        place = {r: (r // self.config.nproc, r % self.config.nproc) for r in range(self.world_size)}
        return self._publish(self.membership, place, "start")

    # ------------------------------------------------------------------ inputs
    def poll(self, now: float, view: NodeView) -> list[Decision]:
        """Read failure reports and node statuses; grow back when spares are ready."""
        store = self.store
        out: list[Decision] = []
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
        failures += self.check_nodes(now, view)
        if failures:
            out += self._some(self.fail(failures, view))
        if not self.ckpt_ordered and self.config.shrink:
            out += self._some(self._maybe_grow(now))
        requests = store.add(_keys.REBUILD_REQUEST, 0)
        if requests > self._rebuilds_seen and not self.ckpt_ordered:
            self._rebuilds_seen = requests
            m = self.membership
            out.append(self._publish(m.next(reason="rebuild requested by a trainer"), {},
                                     "rebuild requested by a trainer"))
        return out

    @staticmethod
    def _some(decision: Decision | None) -> list[Decision]:
        return [] if decision is None else [decision]

    def check_nodes(self, now: float, view: NodeView) -> list[Failure]:
        """Update every node's status; the ranks of a node found lost fail together."""
        store = self.store
        cfg = self.config
        lost: list[Failure] = []
        for st in self.nodes.values():
            if st.node == self.node:
                st.ready = view.ready
                st.live = view.live
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
                self.emit(EventKind.DETECT, "node_lost", lost_node=st.node, why=why)
                logger.warning("node %d lost: %s", st.node, why)
                members = self.membership.members
                lost += [Failure(r, members[r], "node_lost", {"why": why}, st.node)
                         for r, n in sorted(self.where.items()) if n == st.node and r in members]
        return lost

    # ---------------------------------------------------------------- decisions
    def fail(self, failures: list[Failure], view: NodeView) -> Decision | None:
        """Decide what happens to the ranks of ``failures`` (stale reports are ignored: None)."""
        members = self.membership.members
        fresh: dict[int, Failure] = {}
        for f in failures:
            if members.get(f.rank) == f.member and f.rank not in fresh:
                fresh[f.rank] = f
        if not fresh or self.ckpt_ordered:
            return None
        names = ", ".join(f"rank {r} {f.cause}" for r, f in sorted(fresh.items()))
        usage = [f for f in fresh.values() if f.detail.get("type") in ("ConfigError", "StateLostError")]
        if usage:
            # A usage error (bad script for the options given) recurs in every replacement;
            # state that no live process holds cannot come back by replacing anyone.
            f = usage[0]
            why = "lost state" if f.detail.get("type") == "StateLostError" else "a usage error"
            return Stop(f"rank {f.rank} stopped on {why}, which a replacement would repeat: "
                        f"{f.detail.get('error')}")
        self.nodes[self.node].ready = view.ready
        self.restarts += len(fresh)
        cfg = self.config
        exhausted = self.restarts > cfg.max_restarts
        if cfg.no_replace or (exhausted and cfg.ckpt_dir):
            return self._order_checkpoint(sorted(fresh), f"{names}: no replacement allowed")
        if exhausted:
            return Stop(f"{names} after {cfg.max_restarts} replacements")
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
                return self._order_checkpoint(sorted(fresh), why)
            return Stop(why)
        nxt = self.membership.next(replace=list(place), remove=shrink, reason=names)
        reason = names if not shrink else f"{names}: no warm spare ready, continue with {nxt.size} replicas"
        notes: tuple[tuple[str, str, dict[str, Any]], ...] = ()
        if shrink:
            notes = ((EventKind.INFO, "shrink", {"target_ranks": shrink, "members": list(nxt.ranks),
                                                 "world_size": self.world_size}),)
            logger.warning("%s: continuing with %d of %d replicas until a replacement is ready", names, nxt.size,
                           self.world_size)
        return self._publish(nxt, place, reason, notes=notes)

    def _ready_node(self, home: int, ready: dict[int, int]) -> int | None:
        if ready.get(home, 0) > 0:
            return home
        return next((n for n in sorted(ready) if ready[n] > 0), None)

    def _local_rank(self, rank: int, node: int) -> int:
        """Device index of ``rank`` on ``node``: its own at home, else the next spare slot there."""
        if self.homes[rank] == node:
            return rank - node * self.config.nproc
        k = self._foreign.get(node, 0)
        self._foreign[node] = k + 1
        return self.config.nproc + k

    def _maybe_grow(self, now: float) -> Decision | None:
        """Give absent ranks back to ready spares, all in one epoch.

        Every membership change aborts the step in progress, so when several ranks are
        absent and more spares are still warming up, the first ready spare waits up to
        :data:`GROW_WAIT` seconds for the others: one grow instead of several.
        """
        absent = [r for r in range(self.world_size) if r not in self.membership.members]
        if not absent:
            self._grow_ready_at = None
            return None
        if self._all_done() or self._finishing():
            return None
        alive = [st for st in self.nodes.values() if st.alive]
        n_ready, n_live = sum(st.ready for st in alive), sum(max(st.live, st.ready) for st in alive)
        if n_ready == 0:
            self._grow_ready_at = None
            return None
        if self._grow_ready_at is None:
            self._grow_ready_at = now
        if n_ready < len(absent) and n_live > n_ready and now - self._grow_ready_at < GROW_WAIT:
            return None
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
            return None
        ranks = sorted(place)
        nxt = self.membership.next(add=ranks, reason=f"grow back {ranks}")
        logger.warning("replacement ready: ranks %s rejoin (%d of %d replicas)", ranks, nxt.size, self.world_size)
        return self._publish(nxt, place, f"replacement ready: grow back to {nxt.size} replicas",
                             notes=((EventKind.INFO, "grow", {"target_ranks": ranks, "members": list(nxt.ranks),
                                                              "world_size": self.world_size}),))

    def _all_done(self) -> bool:
        return self.store.check([_keys.done(r) for r in self.membership.ranks])

    def _finishing(self) -> bool:
        """Whether a member already reached the end of training (growing now could strand the newcomer)."""
        store = self.store
        for r in self.membership.ranks:
            key = _keys.heartbeat(r)
            if store.check([key]) and json.loads(store.get(key, 5.0)).get("phase") in ("finish", "closed"):
                return True
        return False

    def _order_checkpoint(self, failed: list[int], why: str) -> Publish:
        """The "checkpoint and exit" decision: a new epoch whose order lists the survivors."""
        root = Path(self.config.ckpt_dir or DEFAULT_CKPT_DIR).resolve()
        survivors = [r for r in self.membership.ranks if r not in failed]
        nxt = self.membership.next(reason=f"{why}: checkpoint and exit")
        self.ckpt_ordered = True
        logger.warning("%s: healthy ranks %s checkpoint into %s", why, survivors, root)
        return self._publish(nxt, {}, f"{why}: checkpoint and exit",
                             ckpt=CkptOrder(str(root), tuple(survivors), tuple(failed)),
                             notes=((EventKind.INFO, "ckpt_ordered", {"target_ranks": failed, "dir": str(root),
                                                                      "ranks": survivors}),))

    def _publish(self, nxt: Membership, place: dict[int, tuple[int, int]], reason: str, *,
                 ckpt: CkptOrder | None = None, notes: tuple[tuple[str, str, dict[str, Any]], ...] = ()) -> Publish:
        for r, (n, _lr) in place.items():
            self.where[r] = n
        self.membership = nxt
        return Publish(nxt, dict(place), reason, ckpt, notes)

    # ------------------------------------------------------------------ ending
    def others_finished(self) -> bool:
        """Every other node's agent left (or was lost)."""
        return all(st.exited is not None or st.lost for n, st in self.nodes.items() if n != self.node)

    def exit_codes(self) -> dict[int, int]:
        """Trainer exit codes the other agents reported as they left."""
        codes: dict[int, int] = {}
        for st in self.nodes.values():
            if st.exited is not None:
                codes.update({int(r): int(c) for r, c in st.exited.get("codes", {}).items()})
        return codes

    def absent_on_lost_nodes(self) -> int:
        """Absent ranks whose home node is lost (the coordinator's node warms spares for them)."""
        if not any(st.lost for st in self.nodes.values()):
            return 0
        members = self.membership.members
        return sum(1 for r, n in self.homes.items() if r not in members and self.nodes[n].lost)
