"""Where a trainer's step stands, as one immutable value (:class:`StepState`).

The :class:`~mnemosyne.jit.runtime.Job` holds one ``StepState`` and replaces it by a
named transition at every boundary: :meth:`StepState.enter` (the body starts),
:meth:`StepState.synced_now` (gradients averaged), :meth:`StepState.applied_now` (the optimizer
updated the replica), :meth:`StepState.discard` (the step was aborted),
:meth:`StepState.fail` (a recovery is due), :meth:`StepState.recovered` (the recovery
ended). The watchdog thread reads :attr:`StepState.pos` for its heartbeat and recovery
reads the whole value: both see one consistent state, never half of a transition.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["Position", "StepState"]


@dataclass(frozen=True)
class Position:
    """What the heartbeat reports: step, phase, whether a collective may be in flight, committed step, epoch."""

    step: int = 0
    phase: str = "init"
    coll: bool = True
    committed: int = -1
    epoch: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The heartbeat's fields."""
        return {"step": self.step, "phase": self.phase, "coll": self.coll, "committed": self.committed,
                "epoch": self.epoch}


@dataclass(frozen=True)
class StepState:
    """One trainer's step state (-1: none).

    Attributes:
        started: The step whose body was entered last.
        synced: The step whose gradients were averaged.
        applied: The step the optimizer updated this replica in.
        torn: An update was applied in a step that did not finish: the replica holds no committed step.
        grads_were_none: Every parameter's ``.grad`` was None when the step started.
        needs_recovery: A step failed (or the final wait was interrupted): recover before the next step.
        reattached: The state came from a device proxy this process re-attached to (not yet agreed on).
        pos: Where the heartbeat says the trainer is.
    """

    started: int = -1
    synced: int = -1
    applied: int = -1
    torn: bool = False
    grads_were_none: bool = True
    needs_recovery: bool = False
    reattached: bool = False
    pos: Position = field(default_factory=Position)

    def at(self, step: int, phase: str, coll: bool, committed: int, epoch: int) -> StepState:
        """Moved to ``phase`` of ``step``."""
        return replace(self, pos=Position(step, phase, coll, committed, epoch))

    def reattach(self) -> StepState:
        """The state came from a device proxy committed at some step (this process re-attached to it)."""
        return replace(self, reattached=True)

    def enter(self, k: int, grads_were_none: bool) -> StepState:
        """The body of step ``k`` starts."""
        return replace(self, started=k, grads_were_none=grads_were_none)

    def synced_now(self) -> StepState:
        """The started step's gradients are averaged."""
        return replace(self, synced=self.started)

    def applied_now(self) -> StepState:
        """The optimizer updated the replica in the started step."""
        return replace(self, applied=self.started)

    def discard(self, k: int) -> StepState:
        """Step ``k`` was aborted: torn if its update was already applied."""
        return replace(self, torn=self.torn or self.applied == k)

    def fail(self, forget_started: bool = False) -> StepState:
        """A recovery is due before the next step (``forget_started``: no step is in progress)."""
        return replace(self, needs_recovery=True, started=-1 if forget_started else self.started)

    def recovered(self) -> StepState:
        """The recovery agreed on a committed step: nothing is synced, applied, torn or pending."""
        return replace(self, synced=-1, applied=-1, torn=False, needs_recovery=False, reattached=False)

    def idle(self) -> StepState:
        """No step is in progress (after the recovery's report)."""
        return replace(self, started=-1)
