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

Tensors are typed ``Any`` so that this module does not import torch; backends document
which tensor types and devices they accept.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from mnemosyne.core.store import Store

__all__ = ["BACKENDS_ENTRY_POINT", "CommBackend", "Communicator", "ReduceOp"]

#: Entry-point group under which communicator backends register (name -> CommBackend class).
BACKENDS_ENTRY_POINT = "mnemosyne.ccl.backends"


class ReduceOp(enum.Enum):
    """Reduction operators for :meth:`Communicator.all_reduce` and friends."""

    SUM = "sum"
    AVG = "avg"
    PRODUCT = "product"
    MIN = "min"
    MAX = "max"


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

    def all_reduce(self, tensor: Any, op: ReduceOp = ReduceOp.SUM) -> None:
        """Reduce ``tensor`` in place across all members."""
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

    @abstractmethod
    def create(self, store: Store, rank: int, size: int, *, epoch: int = 0, timeout: float = 30.0) -> Communicator:
        """Create epoch ``epoch`` of a group of ``size`` ranks; called by every rank."""

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
