"""The runtime's link to its device proxy (``mnemo launch --proxy``; mnemosyne-proxy).

With ``MNEMOSYNE_PROXY_SOCKET`` set, :class:`ProxyLink` puts the model's parameters and the
optimizer's per-parameter state into the proxy's arena (:func:`mnemosyne.proxy.adopt`)
before the first recovery. The arena outlives the trainer: a replacement on the same slot
re-attaches to it and, when the arena is COMMITTED at step ``s``, holds that step's heavy
state already; it then receives only the light state (optimizer hyper-parameters,
scheduler, model buffers, ``extra``) from the donors.

Steps in the arena are the runtime's committed steps. A fresh adopt commits step -1, and
-1 is never trusted on re-attach: the initial state is synchronised from rank 0 at the
first rendezvous, so an arena that says -1 may hold this process's own, unsynchronised,
initial values. Only a step ``s >= 0`` counts (each such commit follows an update made
with averaged gradients from a synchronised state, or a write of received state).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from mnemosyne.core.errors import MissingDependencyError
from mnemosyne.core.state import CommitStatus
from mnemosyne.jit._recovery import NO_STATE

__all__ = ["ProxyLink"]

logger = logging.getLogger(__name__)

# Step committed by a fresh adopt: "initial values, not synchronised" (never trusted).
_FRESH_STEP = -1


class ProxyLink:
    """This trainer's arena in a device proxy.

    Args:
        socket: The proxy's Unix socket.
        model: The model (its parameters move into the arena).
        optimizer: Its optimizer (its per-parameter state moves into the arena).

    Raises:
        MissingDependencyError: mnemosyne-proxy is not installed.
    """

    def __init__(self, socket: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        try:
            from mnemosyne.proxy.adopt import adopt, state_names, store_state
            from mnemosyne.proxy.holder import ProxyStateHolder
        except ImportError as exc:
            what = f"mnemosyne-proxy (MNEMOSYNE_PROXY_SOCKET is set: the job runs with `mnemo launch --proxy`; {exc})"
            raise MissingDependencyError(what, "pip install mnemosyne-proxy") from exc
        self._state_names = state_names
        self._store_state = store_state
        self.model = model
        self.optimizer = optimizer
        self.socket = socket
        self.holder = ProxyStateHolder(socket)
        res = adopt(model, optimizer, self.holder, init_step=_FRESH_STEP, on_torn="return")
        #: What the arena held at attach (``committed``, ``torn``, ``empty``) and its step.
        self.status: CommitStatus = res.status
        self.arena_step = res.step
        self.resumed = res.resumed
        self.reason = res.attach.reason
        #: The committed step whose model and optimizer state this process now holds from
        #: the arena, or NO_STATE (fresh, torn, or only the untrusted initial values).
        self.step = res.step if res.resumed and res.status is CommitStatus.COMMITTED and res.step >= 0 \
            else NO_STATE

    def begin(self, step: int) -> None:
        """Mark the start of step ``step``'s optimizer update."""
        self.holder.begin_update(step)

    def commit(self, step: int) -> None:
        """Mark step ``step``'s optimizer update complete."""
        self.holder.commit(step)

    def store(self, step: int, load: Callable[[], None] | None = None) -> int:
        """Run ``load`` and write the resulting state into the arena as committed step ``step``."""
        return self._store_state(self.model, self.optimizer, self.holder, step, load)

    def backed(self, tensors: list[torch.Tensor]) -> list[bool]:
        """For each tensor, whether it is one of the arena's state tensors (same memory, dtype, shape)."""
        arena = {(t.data_ptr(), t.dtype, tuple(t.shape))
                 for t in self._state_names(self.model, self.optimizer).values()}
        return [t.numel() > 0 and (t.data_ptr(), t.dtype, tuple(t.shape)) in arena for t in tensors]

    def close(self) -> None:
        """Mark pending commits and disconnect; the arena stays mapped (the model still uses it)."""
        try:
            self.holder.close(unmap=False)
        except Exception as exc:  # the proxy may be gone: the job is over anyway
            logger.warning("closing the device proxy link failed: %s", exc)

    def describe(self) -> dict[str, Any]:
        """Fields for the ``trainer_start`` event."""
        return {"proxy": self.socket, "arena": self.status.value, "arena_step": self.arena_step,
                "reattached": self.step != NO_STATE}
