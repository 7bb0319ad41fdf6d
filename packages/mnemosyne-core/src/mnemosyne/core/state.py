"""Interfaces for training state: what a rank owns and how it survives a failure.

Two shapes:

* :class:`Stateful` -- anything with ``state_dict``/``load_state_dict`` (models,
  optimizers, schedulers, samplers, user objects), as in torch.distributed.checkpoint.
* :class:`StateHolder` -- a place that keeps a rank's tensors alive across a trainer
  crash, with step markers that tell whether what it holds is consistent. The device
  proxy (mnemosyne-proxy) implements it; mnemosyne-jit consumes it.

Call order for a :class:`StateHolder` on one rank (one trainer process at a time):

1. ``attach()`` right after the trainer starts: returns an :class:`AttachResult`.
   ``COMMITTED``: the tensors hold exactly step ``step``'s state; the trainer uses them
   and skips the donor transfer. ``TORN``: a trainer died between ``begin_update`` and
   ``commit``; the tensors must be refilled from a donor. ``EMPTY``: nothing held yet.
2. ``allocate``/``tensor`` to place named tensors in the holder.
3. Every step: ``begin_update(k)`` just before the optimizer mutates state, then
   ``commit(k)`` once step ``k``'s update is complete. These are the only per-step calls
   and must be cheap (no copy of the state).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ARENAS_ENTRY_POINT",
    "AttachResult",
    "CommitStatus",
    "StateHolder",
    "StateSource",
    "Stateful",
    "TensorMeta",
]

#: Entry-point group for state-holder arenas (e.g. "host", "cuda").
ARENAS_ENTRY_POINT = "mnemosyne.proxy.arenas"


@runtime_checkable
class Stateful(Protocol):
    """An object whose state can be saved and restored (torch's convention)."""

    def state_dict(self) -> dict[str, Any]:
        """Return the state to save."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore state produced by :meth:`state_dict`."""
        ...


class CommitStatus(enum.Enum):
    """What a state holder knows about the consistency of what it holds."""

    EMPTY = "empty"
    COMMITTED = "committed"
    TORN = "torn"


@dataclass(frozen=True)
class TensorMeta:
    """Where a named tensor lives in a holder.

    Attributes:
        name: Stable name, e.g. ``"model/layer1.weight"`` or ``"optim/3/exp_avg"``.
        dtype: torch dtype name without the prefix, e.g. ``"float32"``.
        shape: Tensor shape.
        offset: Byte offset in the holder's memory.
        nbytes: Size in bytes.
        handle: Stable handle, equal across re-attach and holder restarts.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    handle: int


@dataclass(frozen=True)
class AttachResult:
    """Answer of :meth:`StateHolder.attach`.

    Attributes:
        status: Whether the held state is usable as is.
        step: Last committed step (-1 when none).
        tensors: Named tensors now mapped into this process.
        meta: Layout of every named tensor.
    """

    status: CommitStatus
    step: int
    tensors: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, TensorMeta] = field(default_factory=dict)


@runtime_checkable
class StateHolder(Protocol):
    """Keeps one rank's tensors alive outside the trainer process."""

    def attach(self) -> AttachResult:
        """Map the held memory into this process and report its commit status."""
        ...

    def allocate(self, name: str, dtype: str, shape: tuple[int, ...]) -> Any:
        """Create (or return the existing) named tensor in held memory."""
        ...

    def tensor(self, name: str) -> Any:
        """Return the named tensor (O(1))."""
        ...

    def begin_update(self, step: int) -> None:
        """Mark that step ``step``'s in-place update of the state starts now."""
        ...

    def commit(self, step: int) -> None:
        """Mark step ``step``'s update complete and the state consistent."""
        ...

    def close(self) -> None:
        """Unmap; the held memory stays with the holder."""
        ...


@runtime_checkable
class StateSource(Protocol):
    """Something a receiver can fill its state from (a donor rank, a peer proxy, a checkpoint)."""

    def committed_step(self) -> int:
        """The step whose state this source serves."""
        ...

    def fetch(self, into: Mapping[str, Any]) -> None:
        """Copy the source's tensors into the same-named tensors of ``into``."""
        ...
