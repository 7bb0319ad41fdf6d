"""The Gloo backend: flexible communicators over torch's ProcessGroupGloo (CPU tensors).

Each epoch is a fresh ``ProcessGroupGloo`` bootstrapped under that epoch's own store
prefix (never a previous epoch's keys). Gloo cannot abort a blocked operation, so every
collective is issued asynchronously and waited for in
:meth:`~mnemosyne.ccl._base.FlexCommunicator.wait_until`, which also watches the local
abort flag and the epoch's abort key: a member that sees a peer's connection drop
publishes the failure, and every other member, neighbour of the dead rank or not,
raises :class:`~mnemosyne.core.errors.PeerFailureError` within about 50 ms. Shrink, grow
and rebuild build the next epoch's group; the old group is released on a background
thread (its destructor may wait for its stuck worker threads), which closes its sockets
and so also ends the old epoch's pending work on every peer.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

from mnemosyne.ccl._base import FlexBackend, FlexCommunicator, FlexWork
from mnemosyne.ccl._epochs import advance_epoch, agree_members, comm_prefix, member_order, read_members
from mnemosyne.core.comm import ReduceOp
from mnemosyne.core.errors import CommAborted, CommError, ConfigError, MissingDependencyError, StaleEpochError
from mnemosyne.core.store import Store

__all__ = ["GlooBackend", "GlooCommunicator"]

logger = logging.getLogger(__name__)


def _torch() -> Any:
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        what, install = "torch (for the gloo backend)", 'pip install "mnemosyne-ccl[torch]"'
        raise MissingDependencyError(what, install) from None
    if not dist.is_available() or not dist.is_gloo_available():
        msg = "this torch build has no Gloo support (torch.distributed.is_gloo_available() is False)"
        raise CommError(msg)
    return torch


def torch_op(op: ReduceOp) -> Any:
    """torch.distributed.ReduceOp for a core ReduceOp."""
    import torch.distributed as dist

    return op.of(dist.ReduceOp)


def _helper_loop(q: queue.SimpleQueue[Any]) -> None:
    while True:
        item = q.get()
        if item is None:
            return
        work, done, box = item
        try:
            work.wait()
            box["ok"] = True
        except RuntimeError as exc:
            box["err"] = str(exc)
        done.set()
        del work, item


def _release(holder: list[Any]) -> None:
    holder.clear()  # the last reference: ProcessGroupGloo's destructor runs here


class GlooCommunicator(FlexCommunicator):
    """One epoch of a Gloo group; see :class:`~mnemosyne.ccl._base.FlexCommunicator`.

    Build it with :class:`GlooBackend`; tensors must be CPU tensors.
    """

    backend_name = "gloo"

    def __init__(self, store: Store, tag: str, epoch: int, order: Sequence[int], rank: int, timeout: float,
                 pg: Any) -> None:
        super().__init__(store, tag, epoch, order, rank, timeout)
        self._pg: Any = pg
        self._helper_q: queue.SimpleQueue[Any] | None = None

    @classmethod
    def connect(cls, store: Store, tag: str, epoch: int, order: Sequence[int], rank: int,
                timeout: float) -> GlooCommunicator:
        """Build the ProcessGroupGloo of ``epoch`` (every member calls it; members agreed)."""
        _torch()
        import torch.distributed as dist

        from mnemosyne.ccl.torch_store import TorchStore

        prefix = comm_prefix(tag, epoch)
        abort_key = f"{prefix}/abort"

        def interrupt() -> str | None:
            if store.check([abort_key]):
                return store.get(abort_key, 1.0).decode(errors="replace")
            return None

        order = tuple(order)
        if rank not in order:
            msg = f"rank {rank} is not a member of {tag!r} epoch {epoch} (members {sorted(order)})"
            raise ConfigError(msg)
        tstore = TorchStore(store.prefixed(f"{prefix}/pg"), timeout, interrupt)
        try:
            pg = dist.ProcessGroupGloo(tstore, order.index(rank), len(order), datetime.timedelta(seconds=timeout))
        except (RuntimeError, CommAborted) as exc:
            reason = interrupt()
            if reason is not None:
                msg = f"building {tag!r} epoch {epoch} was aborted: {reason}"
                raise CommAborted(msg) from None
            msg = f"building {tag!r} epoch {epoch} (ranks {sorted(order)}) failed: {exc}"
            raise CommError(msg) from None
        return cls(store, tag, epoch, order, rank, timeout, pg)

    # -- plumbing ------------------------------------------------------------------

    def _issue(self) -> Any:
        self._raise_if_aborted()
        pg = self._pg
        if pg is None:
            msg = f"{self!r} is closed"
            raise CommAborted(msg)
        return pg

    def _wait(self, work: Any, what: str) -> None:
        self._start(work, what).wait()

    def _start(self, work: Any, what: str) -> FlexWork:
        """Wrap a ProcessGroupGloo work into a :class:`FlexWork` (abort-aware wait)."""
        done = threading.Event()
        try:
            future = work.get_future()
        except RuntimeError:
            future = None
        if future is not None:
            future.add_done_callback(lambda _f: done.set())

            def finish() -> None:
                try:
                    work.wait()
                except RuntimeError as exc:
                    err = self.fail(f"{what} failed: {exc}")
                    raise err from None

            return FlexWork(self, what, done, work.is_completed, finish, signalled=True)
        # Gloo's send/recv/reduce_scatter works have no future and never report
        # is_completed(): one helper thread per communicator waits for them in order.
        box: dict[str, Any] = {}
        self._helper().put((work, done, box))

        def collect() -> None:
            if "err" in box:
                err = self.fail(f"{what} failed: {box['err']}")
                raise err from None

        return FlexWork(self, what, done, lambda: bool(box), collect, signalled=True)

    def _helper(self) -> queue.SimpleQueue[Any]:
        with self._lock:
            if self._helper_q is None:
                self._helper_q = queue.SimpleQueue()
                threading.Thread(target=_helper_loop, args=(self._helper_q,), name="mnemosyne-gloo-wait",
                                 daemon=True).start()
            return self._helper_q

    # -- collectives ---------------------------------------------------------------

    def all_reduce(self, tensor: Any, op: ReduceOp = ReduceOp.SUM, *, async_op: bool = False) -> FlexWork | None:
        """Reduce ``tensor`` in place across all members (``async_op``: return the work at once).

        Gloo has no ``AVG``: it is a sum divided by the member count here.
        """
        import torch.distributed as dist

        opts = dist.AllreduceOptions()
        opts.reduceOp = torch_op(ReduceOp.SUM if op == ReduceOp.AVG else op)
        work = self._start(self._issue().allreduce([tensor], opts), "all_reduce")
        if op == ReduceOp.AVG:
            inner = work._finish
            size = self.size

            def average() -> None:
                if inner is not None:
                    inner()
                tensor.div_(size)

            work._finish = average
        if async_op:
            return work
        work.wait()
        return None

    def broadcast(self, tensor: Any, root: int) -> None:
        """Copy ``tensor`` from logical rank ``root`` to every member."""
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = self.physical(root)
        opts.rootTensor = 0
        self._wait(self._issue().broadcast([tensor], opts), "broadcast")

    def _to_physical(self, per_member: list[Any], what: str) -> list[Any]:
        if len(per_member) != self.size:
            msg = f"{what}: expected {self.size} tensors (one per member), got {len(per_member)}"
            raise ConfigError(msg)
        sorted_index = {r: i for i, r in enumerate(self.ranks)}
        return [per_member[sorted_index[r]] for r in self._order]

    def all_gather(self, outputs: list[Any], tensor: Any) -> None:
        """Gather every member's ``tensor`` into ``outputs`` (sorted logical rank order)."""
        phys = self._to_physical(outputs, "all_gather")
        self._wait(self._issue().allgather([phys], [tensor]), "all_gather")

    def reduce_scatter(self, output: Any, inputs: list[Any], op: ReduceOp = ReduceOp.SUM) -> None:
        """Reduce ``inputs[i]`` across members into ``output`` of the i-th member (sorted order)."""
        import torch.distributed as dist

        phys = self._to_physical(inputs, "reduce_scatter")
        opts = dist.ReduceScatterOptions()
        opts.reduceOp = torch_op(op)
        self._wait(self._issue().reduce_scatter([output], [phys], opts), "reduce_scatter")

    def send(self, tensor: Any, dst: int) -> None:
        """Send ``tensor`` to logical rank ``dst``."""
        self._wait(self._issue().send([tensor], self.physical(dst), 0), f"send to {dst}")

    def recv(self, tensor: Any, src: int) -> None:
        """Receive into ``tensor`` from logical rank ``src``."""
        self._wait(self._issue().recv([tensor], self.physical(src), 0), f"recv from {src}")

    def barrier(self) -> None:
        """Block until every member arrives."""
        import torch.distributed as dist

        self._wait(self._issue().barrier(dist.BarrierOptions()), "barrier")

    @property
    def process_group(self) -> Any:
        """The epoch's ``ProcessGroupGloo`` (for the torch ProcessGroup adapter)."""
        return self._issue()

    # -- membership ----------------------------------------------------------------

    def _make(self, what: str, order: tuple[int, ...], epoch: int, *, dead: tuple[int, ...],
              new: tuple[int, ...]) -> GlooCommunicator:
        return GlooCommunicator.connect(self._store, self.tag, epoch, order, self._rank, self.timeout)

    def _make_split(self, tag: str, order: tuple[int, ...], rank: int, parent_ranks: list[int]) -> GlooCommunicator:
        return GlooCommunicator.connect(self._store, tag, self._epoch, order, rank, self.timeout)

    def _retire(self) -> None:
        if self._helper_q is not None:
            self._helper_q.put(None)
        # The list is the group's only reference: the caller must not keep one (a local
        # variable would be the last one once the thread cleared the list, and the
        # destructor, which waits for the group's pending work up to its timeout, would
        # then run in the caller's thread). Not a daemon: an interpreter that exits while
        # the destructor runs would kill it halfway (std::terminate, SIGABRT).
        holder = [self._pg]
        self._pg = None
        if holder[0] is not None:
            threading.Thread(target=_release, args=(holder,), name="mnemosyne-gloo-release", daemon=False).start()

    def close(self) -> None:
        """Abort and release the group."""
        self.abort("closed")
        self._retire()


class GlooBackend(FlexBackend):
    """Creates Gloo communicators (entry point ``gloo`` of ``mnemosyne.ccl.backends``)."""

    name = "gloo"

    def create(self, store: Store, rank: int, size: int, *, epoch: int = 0, timeout: float = 30.0,
               tag: str = "world", ranks: Sequence[int] | None = None) -> GlooCommunicator:
        """Create epoch ``epoch`` of a group of ``size`` ranks; called by every member.

        Args:
            store: The job's store (keys go under ``ccl/<tag>/e<epoch>``).
            rank: This process's logical rank.
            size: Number of members.
            epoch: Epoch of the new communicator.
            timeout: Seconds the build and each later collective may take.
            tag: Name of the communicator family.
            ranks: Logical ranks of the members (default ``range(size)``); a group over
                a subset with gaps, e.g. ``[0, 1, 3]`` while rank 2 is missing. Physical
                order is the sorted list.

        Raises:
            ConfigError: Bad rank/size/ranks, or the members disagree on the member list
                (every member fails fast, none waits for a group that cannot form).
            StaleEpochError: A newer epoch of ``tag`` already exists.
        """
        _torch()
        order = member_order("gloo create", rank, size, ranks)
        advance_epoch(store, tag, epoch)
        agree_members(store, tag, epoch, order)
        return GlooCommunicator.connect(store, tag, epoch, order, rank, timeout)

    def join(self, store: Store, rank: int, *, epoch: int, timeout: float = 30.0,
             tag: str = "world") -> GlooCommunicator:
        """Join, as logical ``rank``, the group that survivors are growing to ``epoch``.

        Raises:
            StaleEpochError: The survivors are already past ``epoch``.
            ConfigError: ``rank`` is not in the member list the survivors published.
        """
        _torch()
        return GlooCommunicator.connect(store, tag, epoch, _joinable(store, tag, rank, epoch, timeout), rank,
                                        timeout)

    @classmethod
    def capabilities(cls) -> dict[str, bool]:
        """Gloo repairs every change by building a fresh group: nothing is native."""
        return {"shrink": False, "grow": False, "abort": True, "split": True}


def _joinable(store: Store, tag: str, rank: int, epoch: int, timeout: float) -> tuple[int, ...]:
    key = f"ccl/{tag}/epoch"
    if store.check([key]):
        current = int(store.get(key, timeout))
        if current > epoch:
            msg = f"join {tag!r} as rank {rank}: epoch {epoch} is stale, the group is already at epoch {current}"
            raise StaleEpochError(msg)
    order = read_members(store, tag, epoch, timeout)
    if rank not in order:
        msg = f"join {tag!r} epoch {epoch} as rank {rank}: the survivors published members {sorted(order)}"
        raise ConfigError(msg)
    advance_epoch(store, tag, epoch)
    return order
