"""Agreement and state transfer of one recovery (called by the runtime's main thread).

Agreement: every member of the new epoch publishes what it holds (its last committed
step; ``-2`` for a process that holds no synchronised state: a fresh replacement, or a
survivor whose update was torn). Donors are the members with the highest committed
step; everyone below it receives. At the job's very first rendezvous nobody holds
state and the lowest rank donates its freshly built state (as DDP broadcasts rank 0's
parameters), so that every run starts from one state whatever the seeding.

Transfer: the first donor publishes the state's skeleton and tensor layout in the store;
every donor sends its stripe (see :mod:`mnemosyne.jit._state`) to every receiver over
the new communicator.

Device proxy (``mnemo launch --proxy``): a replacement that re-attached to its arena at
step ``s`` publishes ``committed = s`` with ``reattached``: it holds the model and optimizer
state of step ``s`` but not the light state (optimizer hyper-parameters, scheduler,
buffers, ``extra``). It is never a donor. When ``s`` is the top step it is a *partial*
receiver: it lays the donor's skeleton over its own flattened state (the same
deterministic order), publishes the indices of the tensors that are not in its arena,
and donors send it only those. Anything that does not line up makes it ask for
everything (a full receive).

Snapshots (``mnemo launch --snapshot-every N``): a member that holds no state also
publishes the steps of the verified generations in its snapshot holder. When no member
holds state and every member has a generation of some common step, the newest such step
``s`` is agreed with ``source = "snapshot"``: every member restores its own generation of
``s`` (no transfer) and the job resumes at ``s + 1``. A live replica always wins over a
snapshot; without a common step the job starts again from the lowest rank's fresh state.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mnemosyne.core.comm import Communicator
from mnemosyne.core.errors import RecoveryError
from mnemosyne.core.store import Store
from mnemosyne.core.store import wait_key as _wait_key
from mnemosyne.jit import _keys
from mnemosyne.jit._comm import TorchComm
from mnemosyne.jit._state import (
    TensorSpec,
    assign_stripes,
    flatten,
    pack,
    pack_plan,
    spec_of,
    unflatten,
    unpack,
)

__all__ = ["NO_STATE", "Agreement", "Rendezvous", "agree", "joins", "transfer", "wait_key"]

#: Committed step reported by a process that holds no synchronised state.
NO_STATE = -2


@dataclass
class Agreement:
    """Outcome of the agreement of one epoch.

    Attributes:
        top: Highest committed step among members (-1: initial state, no step yet).
        donors: Ranks that hold step ``top``'s state, sorted.
        receivers: Ranks that must receive it, sorted.
        started: Per rank, the step it was running when it was interrupted (-1: none).
        partial: Receivers that re-attached to a device proxy holding step ``top``'s
            model and optimizer state: they receive only what their arena lacks.
        source: Where step ``top``'s state comes from: ``replica`` (live members),
            ``snapshot`` (every member's own snapshot holder) or ``initial`` (the
            lowest rank's freshly built state, step -1).
    """

    top: int
    donors: list[int]
    receivers: list[int]
    started: dict[int, int] = field(default_factory=dict)
    partial: list[int] = field(default_factory=list)
    source: str = "replica"

    @property
    def resume_step(self) -> int:
        """The step everyone runs next."""
        return self.top + 1


@dataclass(frozen=True)
class Rendezvous:
    """What every exchange of one recovery needs: where, which epoch, who, what ends a wait, how long.

    Attributes:
        store: The job's store (positions, layouts and need lists travel there).
        epoch: Membership epoch being recovered (the keys' namespace).
        rank: This rank.
        interrupt: Set when a newer epoch exists (ends every wait).
        timeout: Bound of every wait, seconds.
    """

    store: Store
    epoch: int
    rank: int
    interrupt: threading.Event
    timeout: float


def wait_key(rv: Rendezvous, key: str, timeout: float | None = None) -> bytes:
    """Get ``key`` from ``rv.store``, interruptibly (:func:`mnemosyne.core.store.wait_key`).

    ``timeout`` replaces ``rv.timeout`` for this wait.

    Raises:
        CommAborted: ``rv.interrupt`` was set (a newer epoch exists).
        RecoveryError: The key did not appear within the timeout.
    """
    return _wait_key(rv.store, key, rv.interrupt, rv.timeout if timeout is None else timeout, error=RecoveryError)


def joins(rv: Rendezvous, ranks: list[int], newcomer: bool) -> bool:
    """Whether this newcomer joins a communicator a member builds from its own (False: create one).

    Every member publishes whether it is a newcomer (a process in its first recovery of an
    epoch > 0). A member that is not returns at once: it repairs, grows or creates the
    epoch's communicator and publishes its member list, which newcomers join. When every
    member is a newcomer (every rank was lost at once) nobody would publish that list:
    they all create the communicator instead.

    Raises:
        CommAborted: A newer epoch appeared while waiting (a member died).
    """
    rv.store.set(_keys.comm_holder(rv.epoch, rv.rank), b"0" if newcomer else b"1")
    if not newcomer:
        return False
    return any(wait_key(rv, _keys.comm_holder(rv.epoch, r)) == b"1" for r in ranks if r != rv.rank)


def agree(rv: Rendezvous, ranks: list[int], committed: int, started: int, reattached: bool = False,
          snaps: list[int] | None = None) -> Agreement:
    """Publish this rank's position and compute donors and receivers from everyone's.

    ``reattached``: this rank's ``committed`` step comes from its device proxy's arena
    (model and optimizer state only); such a rank never donates. ``snaps``: steps of the
    verified generations in this rank's snapshot holder (see the module doc).

    Raises:
        RecoveryError: Every member re-attached to a proxy and none holds the light state.
    """
    epoch = rv.epoch
    me = {"committed": committed, "started": started, "reattached": reattached, "snaps": snaps or []}
    rv.store.set(_keys.committed(epoch, rv.rank), json.dumps(me).encode())
    got = {r: json.loads(wait_key(rv, _keys.committed(epoch, r))) for r in ranks}
    started_by = {r: int(v["started"]) for r, v in got.items()}
    full = {r: int(v["committed"]) for r, v in got.items() if not v.get("reattached")}
    attached = {r: int(v["committed"]) for r, v in got.items() if v.get("reattached")}
    if not full:
        msg = (f"epoch {epoch}: every member ({sorted(attached)}) re-attached to its device proxy, so no live "
               "rank holds the light state (optimizer hyper-parameters, scheduler, buffers): resume from a "
               "checkpoint (mnemo launch --resume)")
        raise RecoveryError(msg)
    top = max(full.values())
    if top == NO_STATE:
        common = set.intersection(*(set(v.get("snaps") or []) for v in got.values())) if not attached else set()
        if common:
            return Agreement(max(common), sorted(ranks), [], started_by, source="snapshot")
        first = min(full)
        return Agreement(-1, [first], [r for r in ranks if r != first], started_by, source="initial")
    donors = sorted(r for r, c in full.items() if c == top)
    receivers = sorted(r for r in ranks if r not in donors)
    partial = sorted(r for r, c in attached.items() if c == top)
    return Agreement(top, donors, receivers, started_by, partial)


#: Supplies a partial receiver's own state: (skeleton, tensors, whether each tensor is in the arena).
LocalState = Callable[[], tuple[Any, list[torch.Tensor], list[bool]]]


def _structure(skel: Any) -> Any:
    """A skeleton with its scalars dropped: two states line up when these are equal."""
    if isinstance(skel, dict):
        if "T" in skel:
            return "T"
        if "D" in skel:
            return {"D": [[k, _structure(v)] for k, v in skel["D"]]}
        if "U" in skel:
            return {"U": [_structure(v) for v in skel["U"]]}
    if isinstance(skel, list):
        return [_structure(v) for v in skel]
    return None


def _needed(meta: dict[str, Any], specs: list[TensorSpec], local: LocalState) -> tuple[list[int] | None, list[Any]]:
    """Indices a partial receiver must receive (None: all) and its own tensors to reuse."""
    own_skel, own, backed = local()
    if len(own) != len(specs) or len(backed) != len(own):
        return None, []
    # Round-trip through JSON as the donor's skeleton did (tuples, int keys stay as they are).
    if _structure(json.loads(json.dumps(own_skel))) != _structure(meta["skel"]):
        return None, []
    need = [i for i, (t, spec) in enumerate(zip(own, specs, strict=True)) if not (backed[i] and spec_of(t) == spec)]
    return need, [t if backed[i] else None for i, t in enumerate(own)]


def transfer(comm: Communicator, rv: Rendezvous, plan: Agreement, device: torch.device,
             state_fn: Callable[[], dict[str, Any]], local: LocalState | None = None,
             report: dict[str, Any] | None = None) -> tuple[Any, int]:
    """Run this rank's part of the transfer.

    Args:
        comm: The communicator of ``rv.epoch``.
        rv: The recovery's store, epoch, rank, interrupt and wait bound.
        plan: The agreement of ``rv.epoch``.
        device: Where received tensors of device type ``cuda`` land.
        state_fn: Returns a donor's state object.
        local: For a rank in ``plan.partial``: its own state (see :data:`LocalState`), so
            that only tensors outside its arena are received. Without it, such a rank
            receives everything.
        report: Filled with ``role`` (``donor``, ``receiver``, ``reattached`` or ``none``),
            ``kept_bytes`` (state reused from the arena) and ``heavy_bytes`` (received bytes
            of tensors that the arena holds: 0 for a re-attached rank).

    Returns:
        For a receiver, the received state object (apply it after this returns); for a
        donor, None. Second item: bytes this rank sent or received.
    """
    store, epoch, rank = rv.store, rv.epoch, rv.rank
    info = report if report is not None else {}
    info.update(role="none", kept_bytes=0, heavy_bytes=0)
    # Every transport a trainer uses moves CUDA tensors (NCCL, ccl's or torch's) or CPU ones (Gloo).
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    if not plan.receivers:
        return None, 0
    if rank in plan.donors:
        info["role"] = "donor"
        tensors: list[torch.Tensor] = []
        skel = flatten(state_fn(), tensors)
        specs = [spec_of(t) for t in tensors]
        if rank == plan.donors[0]:
            meta = {"skel": skel, "specs": [s.to_json() for s in specs]}
            store.set(_keys.xfer_meta(epoch), json.dumps(meta).encode())
        owner = assign_stripes(specs, plan.donors)
        # Receivers grouped by what they need (all, or a partial receiver's list), so that
        # each message is packed once per group; every pair keeps one message order.
        groups: dict[tuple[int, ...] | None, list[int]] = {}
        for dst in plan.receivers:
            key: tuple[int, ...] | None = None
            if dst in plan.partial:
                body = json.loads(wait_key(rv, _keys.xfer_need(epoch, dst)))
                key = None if body["need"] is None else tuple(int(i) for i in body["need"])
            groups.setdefault(key, []).append(dst)
        sent = 0
        for key, dsts in groups.items():
            for tag, idxs in enumerate(pack_plan(specs, owner, rank, None if key is None else set(key))):
                buf = pack([tensors[i] for i in idxs], comm_device)
                for dst in dsts:
                    if isinstance(comm, TorchComm):  # the fallback takes a message tag; ccl keeps the order
                        comm.send(buf, dst, tag=tag)
                    else:
                        comm.send(buf, dst)
                    sent += buf.numel()
        return None, sent
    meta = json.loads(wait_key(rv, _keys.xfer_meta(epoch)))
    specs = [TensorSpec.from_json(s) for s in meta["specs"]]
    owner = assign_stripes(specs, plan.donors)
    staging: list[torch.Tensor | None] = [None] * len(specs)
    need: list[int] | None = None
    if rank in plan.partial:
        own: list[Any] = []
        if local is not None:
            need, own = _needed(meta, specs, local)
        store.set(_keys.xfer_need(epoch, rank), json.dumps({"need": need}).encode())
        if need is not None:
            wanted = set(need)
            for i, t in enumerate(own):
                if i not in wanted:
                    staging[i] = t
                    info["kept_bytes"] += specs[i].nbytes
            # Bytes of arena-held tensors that must still come over the wire (0: every
            # arena tensor matched the donor's layout).
            info["heavy_bytes"] = sum(specs[i].nbytes for i in need if own[i] is not None)
    info["role"] = "receiver" if need is None else "reattached"
    got = 0
    for src in plan.donors:
        for tag, idxs in enumerate(pack_plan(specs, owner, src, None if need is None else set(need))):
            n = sum(specs[i].nbytes for i in idxs)
            buf = torch.empty(n, dtype=torch.uint8, device=comm_device)
            if isinstance(comm, TorchComm):
                comm.recv(buf, src, tag=tag)
            else:
                comm.recv(buf, src)
            got += n
            for i, t in zip(idxs, unpack(buf, [specs[i] for i in idxs], device), strict=True):
                staging[i] = t
    missing = [i for i, t in enumerate(staging) if t is None]
    if missing:
        msg = f"state transfer of epoch {epoch}: tensors {missing[:5]} were assigned to no donor"
        raise RecoveryError(msg)
    return unflatten(meta["skel"], [t for t in staging if t is not None]), got
