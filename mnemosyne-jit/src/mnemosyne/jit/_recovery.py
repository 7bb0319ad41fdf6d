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
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mnemosyne.core.errors import CommAborted, RecoveryError, StoreTimeout
from mnemosyne.core.store import Store
from mnemosyne.jit import _keys
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

__all__ = ["NO_STATE", "Agreement", "agree", "transfer", "wait_key"]

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
    """

    top: int
    donors: list[int]
    receivers: list[int]
    started: dict[int, int] = field(default_factory=dict)

    @property
    def resume_step(self) -> int:
        """The step everyone runs next."""
        return self.top + 1


def wait_key(store: Store, key: str, interrupt: threading.Event, timeout: float) -> bytes:
    """Get ``key``, waiting in short slices so that ``interrupt`` ends the wait at once.

    Raises:
        CommAborted: ``interrupt`` was set (a newer epoch exists).
        RecoveryError: The key did not appear within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while not store.check([key]):
        if interrupt.is_set():
            msg = f"waiting for {key!r} interrupted by a newer epoch"
            raise CommAborted(msg)
        if time.monotonic() > deadline:
            msg = f"recovery: store key {key!r} did not appear within {timeout} s"
            raise RecoveryError(msg)
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    try:
        return store.get(key, 5.0)
    except StoreTimeout as exc:  # deleted between check and get: treat as missing
        msg = f"recovery: store key {key!r} vanished"
        raise RecoveryError(msg) from exc


def agree(store: Store, epoch: int, rank: int, ranks: list[int], committed: int, started: int,
          interrupt: threading.Event, timeout: float) -> Agreement:
    """Publish this rank's position and compute donors and receivers from everyone's."""
    me = {"committed": committed, "started": started}
    store.set(_keys.committed(epoch, rank), json.dumps(me).encode())
    got = {r: json.loads(wait_key(store, _keys.committed(epoch, r), interrupt, timeout)) for r in ranks}
    top = max(int(v["committed"]) for v in got.values())
    started_by = {r: int(v["started"]) for r, v in got.items()}
    if top == NO_STATE:
        first = min(ranks)
        return Agreement(-1, [first], [r for r in ranks if r != first], started_by)
    donors = sorted(r for r, v in got.items() if int(v["committed"]) == top)
    receivers = sorted(r for r in ranks if r not in donors)
    return Agreement(top, donors, receivers, started_by)


def transfer(comm: Any, store: Store, epoch: int, rank: int, plan: Agreement, device: torch.device,
             state_fn: Callable[[], dict[str, Any]], interrupt: threading.Event, timeout: float) -> tuple[Any, int]:
    """Run this rank's part of the transfer.

    Returns:
        For a receiver, the received state object (apply it after this returns); for a
        donor, None. Second item: bytes this rank sent or received.
    """
    transport = getattr(comm, "backend_name", None) or getattr(comm, "backend", "gloo")
    comm_device = torch.device("cpu") if transport == "gloo" else device
    # The fallback's torch groups take a message tag; ccl's send/recv have none and keep
    # the order of messages between two members, which is all the stripes need.
    tagged = not hasattr(comm, "backend_name")
    if not plan.receivers:
        return None, 0
    if rank in plan.donors:
        tensors: list[torch.Tensor] = []
        skel = flatten(state_fn(), tensors)
        specs = [spec_of(t) for t in tensors]
        if rank == plan.donors[0]:
            meta = {"skel": skel, "specs": [s.to_json() for s in specs]}
            store.set(_keys.xfer_meta(epoch), json.dumps(meta).encode())
        owner = assign_stripes(specs, plan.donors)
        sent = 0
        for tag, idxs in enumerate(pack_plan(specs, owner, rank)):
            buf = pack([tensors[i] for i in idxs], comm_device)
            for dst in plan.receivers:
                if tagged:
                    comm.send(buf, dst, tag=tag)
                else:
                    comm.send(buf, dst)
                sent += buf.numel()
        return None, sent
    meta = json.loads(wait_key(store, _keys.xfer_meta(epoch), interrupt, timeout))
    specs = [TensorSpec.from_json(s) for s in meta["specs"]]
    owner = assign_stripes(specs, plan.donors)
    staging: list[torch.Tensor | None] = [None] * len(specs)
    got = 0
    for src in plan.donors:
        for tag, idxs in enumerate(pack_plan(specs, owner, src)):
            n = sum(specs[i].nbytes for i in idxs)
            buf = torch.empty(n, dtype=torch.uint8, device=comm_device)
            if tagged:
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
