"""The flexible communicator interface that mnemosyne-ccl implements and mnemosyne-jit uses.

A :class:`Communicator` is one membership epoch of a group of ranks. Membership changes
never mutate it: :meth:`~Communicator.shrink`, :meth:`~Communicator.grow`,
:meth:`~Communicator.rebuild` and :meth:`~Communicator.split` return a *new* communicator
(epoch + 1 for the first three) and leave the old one aborted or untouched, so that a
torch ProcessGroup adapter can swap the new one in without restarting the process.

Call order across ranks after rank ``f`` fails:

1. Any thread on any survivor may call :meth:`~Communicator.abort`; a collective blocked
   on that rank then raises :class:`~mnemosyne.core.errors.CommAborted` (or
   :class:`~mnemosyne.core.errors.PeerFailureError` when the transport saw the peer die).
2. Every survivor calls ``shrink([f])`` (collective over survivors only; the dead rank
   never participates).
3. To replace ``f``: every survivor calls ``grow(...)`` on the shrunk communicator while
   the newcomer calls :meth:`CommBackend.join` with the same arguments; both return the
   grown communicator in which the newcomer holds logical rank ``f``.

Asynchronous collectives (``all_reduce(..., async_op=True)``) return a :class:`Work`:

1. Every member issues the same asynchronous collectives in the same order (the order
   of issue, not of completion, is what must match), possibly from another thread than
   the one that waits (the autograd engine's, for gradient hooks), but never from two
   threads at once on one communicator.
2. The tensor belongs to the operation until :meth:`Work.wait` returned: the caller must
   neither read nor write it before (on a GPU the backend orders the operation after the
   work already queued on the caller's current stream when it was issued).
3. :meth:`Work.wait` blocks the calling thread until the operation completed (for device
   tensors: completed on the device, so any later kernel sees the result), and raises
   like the blocking call would: :class:`~mnemosyne.core.errors.CommAborted` when
   :meth:`Communicator.abort` was called from any thread,
   :class:`~mnemosyne.core.errors.PeerFailureError` when the transport or another member
   saw a peer fail, :class:`~mnemosyne.core.errors.CollectiveTimeout` past the deadline.
   Works may be waited in any order; waiting twice is allowed.
4. After an abort, works of the aborted epoch are abandoned: their tensors may still be
   written by the transport for a while, so the caller never reuses them in a later
   epoch (the runtime allocates new gradient buckets after every recovery).

Repair, after a membership change: every member of the new epoch calls
:meth:`CommBackend.repair` once with the new epoch and member list (a newcomer with
``old=None, joining=True``); the backend picks how: rebuild (same members), shrink,
grow (survivors; the newcomers join), or a fresh group (a backend without flexible
communicators, or a member whose communicator is too old). Nobody outside the backend
knows its store keys.

Tensors are typed ``Any`` so that this module does not import torch; backends document
which tensor types and devices they accept.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from mnemosyne.core.store import Store

__all__ = ["BACKENDS_ENTRY_POINT", "CommBackend", "Communicator", "ReduceOp", "Work"]

#: Entry-point group under which communicator backends register (name -> CommBackend class).
BACKENDS_ENTRY_POINT = "mnemosyne.ccl.backends"


class ReduceOp(enum.Enum):
    """Reduction operators for :meth:`Communicator.all_reduce` and friends."""

    SUM = "sum"
    AVG = "avg"
    PRODUCT = "product"
    MIN = "min"
    MAX = "max"

    def of(self, namespace: Any, **spelled: str) -> Any:
        """This operator in a transport's own enum, found by name: the one mapping every backend uses.

        ``ReduceOp.SUM.of(torch.distributed.ReduceOp)``; where the transport spells a name
        differently, say so: ``op.of(nccl, PRODUCT="PROD")``.

        Raises:
            AttributeError: The transport has no such operator.
        """
        return getattr(namespace, spelled.get(self.name, self.name))


@runtime_checkable
class Work(Protocol):
    """An asynchronous collective in flight (see the module doc for the call order)."""

    def wait(self, timeout: float | None = None) -> None:
        """Block until the operation completed; raise if it failed, was aborted or timed out.

        Args:
            timeout: Seconds to wait at most (None: the communicator's own timeout).
        """
        ...

    def is_completed(self) -> bool:
        """Whether the operation finished (successfully or not); never blocks."""
        ...


@runtime_checkable
class Communicator(Protocol):
    """One epoch of a group of ranks that run collectives together.

    ``rank`` and ``size`` are *logical*: after shrink+grow the replacement holds the
    failed rank's logical rank. Every collective is called by every member in the same
    order (the usual MPI/NCCL rule); point-to-point calls name logical ranks.
    """

    @property
    def rank(self) -> int:
        """This process's logical rank in the group."""
        ...

    @property
    def size(self) -> int:
        """Number of members."""
        ...

    @property
    def epoch(self) -> int:
        """Membership epoch this communicator was built for."""
        ...

    @property
    def ranks(self) -> Sequence[int]:
        """Logical ranks of the members, sorted.

        The transport's physical order may differ (NCCL's native grow appends newcomers);
        implementations translate roots, peers and per-member lists, so callers only ever
        use logical ranks.
        """
        ...

    def all_reduce(self, tensor: Any, op: ReduceOp = ReduceOp.SUM, *, async_op: bool = False) -> Work | None:
        """Reduce ``tensor`` in place across all members.

        With ``async_op=True`` return at once a :class:`Work` to wait on (module doc);
        otherwise block until done and return None.
        """
        ...

    def broadcast(self, tensor: Any, root: int) -> None:
        """Copy ``tensor`` from logical rank ``root`` to every member, in place."""
        ...

    def all_gather(self, outputs: list[Any], tensor: Any) -> None:
        """Gather each member's ``tensor`` into ``outputs`` (one per member, rank order)."""
        ...

    def reduce_scatter(self, output: Any, inputs: list[Any], op: ReduceOp = ReduceOp.SUM) -> None:
        """Reduce ``inputs[i]`` across members into ``output`` on the i-th member."""
        ...

    def send(self, tensor: Any, dst: int) -> None:
        """Send ``tensor`` to logical rank ``dst``."""
        ...

    def recv(self, tensor: Any, src: int) -> None:
        """Receive into ``tensor`` from logical rank ``src``."""
        ...

    def barrier(self) -> None:
        """Block until every member reaches the barrier."""
        ...

    def abort(self, reason: str = "") -> None:
        """Abort from any thread: pending and future operations raise ``CommAborted``.

        Idempotent and non-blocking.
        """
        ...

    @property
    def aborted(self) -> bool:
        """Whether :meth:`abort` was called or the transport failed."""
        ...

    def shrink(self, dead_ranks: Sequence[int]) -> Communicator:
        """Return a communicator of the survivors at epoch + 1 (survivors only call it)."""
        ...

    def grow(self, new_ranks: Sequence[int]) -> Communicator:
        """Return a communicator that also holds ``new_ranks`` (logical), at epoch + 1.

        Survivors call this while each newcomer calls :meth:`CommBackend.join`.
        """
        ...

    def rebuild(self) -> Communicator:
        """Return a fresh communicator with the same members at epoch + 1."""
        ...

    def split(self, color: int, key: int) -> Communicator | None:
        """Partition members by ``color``; order each part by ``key`` then rank.

        Returns None for a negative color (the caller joins no part).
        """
        ...

    def close(self) -> None:
        """Release resources; the communicator is unusable afterwards."""
        ...


class CommBackend(ABC):
    """Plugin base for communicator backends, registered under :data:`BACKENDS_ENTRY_POINT`.

    A backend creates the first communicator of a job and lets newcomers join a
    communicator that survivors are growing.
    """

    #: Name used in configuration and the entry point (e.g. "gloo", "nccl").
    name: str = ""
    #: How the last :meth:`repair` made its communicator (``rebuild``, ``shrink``, ``grow``,
    #: ``join`` or ``create``), for the caller's events.
    last_repair: str = ""

    @abstractmethod
    def create(self, store: Store, rank: int, size: int, *, epoch: int = 0, timeout: float = 30.0,
               ranks: Sequence[int] | None = None) -> Communicator:
        """Create epoch ``epoch`` of a group of ``size`` ranks; called by every rank.

        ``ranks``: the members' logical ranks (default ``range(size)``); physical order
        is sorted, so reductions sum in the same order whoever the members are.
        """

    def repair(self, old: Communicator | None, store: Store, rank: int, ranks: Sequence[int], *, epoch: int,
               joining: bool = False, timeout: float = 30.0,
               interrupt: threading.Event | None = None) -> Communicator:
        """The communicator of ``epoch`` over logical ``ranks``, made from ``old`` where possible.

        Call order: every member of the new epoch, once, with the same ``ranks`` and
        ``epoch``; survivors pass their current communicator (already aborted, or not),
        a process that joins a running job passes ``old=None, joining=True``. A set
        ``interrupt`` (a newer epoch exists) ends the waits of the repair with
        :class:`~mnemosyne.core.errors.CommAborted`. Sets :attr:`last_repair`.

        This default, for a backend without flexible communicators: close ``old``, create
        a fresh group. Flexible backends override it (rebuild, shrink, grow, join).
        """
        if old is not None:
            old.close()
        self.last_repair = "create"
        return self.create(store, rank, len(ranks), epoch=epoch, timeout=timeout, ranks=ranks)

    @abstractmethod
    def join(self, store: Store, rank: int, *, epoch: int, timeout: float = 30.0) -> Communicator:
        """Join, as logical ``rank``, a group that survivors are growing to ``epoch``.

        ``epoch`` is the epoch of the grown communicator (the survivors' current epoch
        + 1); the caller learns it through its own control plane. The member list is
        published in ``store`` by the survivors' :meth:`Communicator.grow`.
        """

    @classmethod
    def capabilities(cls) -> dict[str, bool]:
        """Which flexible operations run natively (vs by rebuild), e.g. ``{"shrink": True}``."""
        return {}
