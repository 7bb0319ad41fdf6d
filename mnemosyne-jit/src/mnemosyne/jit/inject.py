"""Fault injection: fire a planned fault in one rank at a chosen (step, phase).

Plans come from the ``MNEMOSYNE_INJECT`` environment variable (inherited by every
trainer the launcher starts) or from ``mnemo inject`` (written to the job's store and
picked up by each trainer's watchdog). Format, several plans separated by ``;``::

    rank=2,step=5,kind=kill,phase=forward

Kinds: ``kill`` (SIGKILL self), ``hang`` (SIGSTOP self), ``exception`` (raise
:class:`InjectedFault`), ``segfault`` (read address 0), ``exit`` (``os._exit(3)``: no exception, no cleanup), ``abort``
(``abort()``, SIGABRT: how a CUDA sticky error or a failed C++ check ends a process), ``stall`` (the main thread
sleeps for ever while the heartbeat goes on: a deadlock in user code). Phases: ``forward`` (start of
the step body), ``backward`` (inside backward, right after the first gradient bucket's
all-reduce was launched: reductions are in flight), ``allreduce`` (at the wait for the
gradient reductions, before the optimizer update), ``optimizer`` (right
after the optimizer update, before the commit), ``recovery`` (inside a recovery that
resumes at ``step``, when the state transfer starts), ``checkpoint`` (in a just-in-time checkpoint
of committed step ``step``, right before this rank writes its part).

A plan fires exactly once per job: the first process to reach it claims it with an
atomic store counter, so the replacement of a killed rank does not fire it again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from mnemosyne.core.errors import ConfigError, MnemosyneError
from mnemosyne.core.events import EventKind, EventLog, FaultKind
from mnemosyne.core.store import Store
from mnemosyne.jit import _keys

__all__ = ["PHASES", "FaultPlan", "InjectedFault", "Injector", "parse_plans"]

logger = logging.getLogger(__name__)

#: Where a fault can fire.
PHASES = ("forward", "backward", "allreduce", "optimizer", "recovery", "checkpoint")


class InjectedFault(MnemosyneError, RuntimeError):
    """The exception raised by an injected ``exception`` fault."""


@dataclass(frozen=True)
class FaultPlan:
    """One planned fault.

    Attributes:
        rank: Logical rank that fires it.
        step: Step index (0-based) at which it fires.
        kind: One of :data:`mnemosyne.core.events.FaultKind.ALL`.
        phase: One of :data:`PHASES`.
        plan_id: Identity used to fire it once across incarnations.
    """

    rank: int
    step: int
    kind: str
    phase: str = "forward"
    plan_id: str = ""

    def __post_init__(self) -> None:
        if self.kind not in FaultKind.ALL:
            msg = f"fault kind {self.kind!r}: expected one of {', '.join(FaultKind.ALL)}"
            raise ConfigError(msg)
        if self.phase not in PHASES:
            msg = f"fault phase {self.phase!r}: expected one of {', '.join(PHASES)}"
            raise ConfigError(msg)
        if self.rank < 0 or self.step < 0:
            msg = f"fault plan rank={self.rank} step={self.step}: both must be >= 0"
            raise ConfigError(msg)

    def to_text(self) -> str:
        """The plan in the ``MNEMOSYNE_INJECT`` format."""
        return f"rank={self.rank},step={self.step},kind={self.kind},phase={self.phase}"


def parse_plans(text: str, id_prefix: str = "env") -> list[FaultPlan]:
    """Parse ``MNEMOSYNE_INJECT`` text into plans.

    Raises:
        ConfigError: A plan is malformed; the message names the plan and the field.
    """
    plans: list[FaultPlan] = []
    for i, part in enumerate(p.strip() for p in text.split(";")):
        if not part:
            continue
        fields: dict[str, str] = {}
        for item in part.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                msg = f"fault plan {part!r}: {item!r} is not key=value"
                raise ConfigError(msg)
            fields[key.strip()] = value.strip()
        unknown = set(fields) - {"rank", "step", "kind", "phase", "id"}
        missing = {"rank", "step", "kind"} - set(fields)
        if unknown or missing:
            msg = f"fault plan {part!r}: unknown fields {sorted(unknown)}, missing {sorted(missing)}"
            raise ConfigError(msg)
        try:
            rank, step = int(fields["rank"]), int(fields["step"])
        except ValueError:
            msg = f"fault plan {part!r}: rank and step must be integers"
            raise ConfigError(msg) from None
        plans.append(FaultPlan(rank, step, fields["kind"], fields.get("phase", "forward"),
                               fields.get("id", f"{id_prefix}{i}")))
    return plans


class Injector:
    """Fires the plans that target this rank.

    Args:
        rank: This trainer's logical rank.
        store: The job's store (claims plans).
        log: Event log (a ``fault`` event is written before the fault fires).
    """

    def __init__(self, rank: int, store: Store | None, log: EventLog | None) -> None:
        self.rank = rank
        self.store = store
        self.log = log
        self._plans: list[FaultPlan] = []
        self._lock = threading.Lock()

    def add(self, plans: list[FaultPlan]) -> None:
        """Add plans (any thread); plans for other ranks are ignored."""
        with self._lock:
            self._plans.extend(p for p in plans if p.rank == self.rank)

    def pending(self) -> list[FaultPlan]:
        """Plans not fired by this process yet."""
        with self._lock:
            return list(self._plans)

    def maybe_fire(self, step: int, phase: str) -> None:
        """Fire the plan for (``step``, ``phase``), if any and not fired yet by anyone."""
        if not self._plans:
            return
        with self._lock:
            hits = [p for p in self._plans if p.step == step and p.phase == phase]
            for p in hits:
                self._plans.remove(p)
        for plan in hits:
            if self.store is not None and self.store.add(_keys.fired(plan.plan_id), 1) != 1:
                continue  # an earlier incarnation of this rank fired it already
            self.fire(plan)

    def fire(self, plan: FaultPlan) -> None:
        """Fire ``plan`` now (the event is written first: a killed process writes nothing after)."""
        if self.log is not None:
            self.log.emit(EventKind.FAULT, plan.kind, injected=True, step=plan.step, phase=plan.phase,
                          plan=plan.to_text())
        logger.warning("injecting %s at step %d, phase %s", plan.kind, plan.step, plan.phase)
        sys.stdout.flush()
        sys.stderr.flush()
        if plan.kind == FaultKind.KILL:
            os.kill(os.getpid(), signal.SIGKILL)
        elif plan.kind == FaultKind.HANG:
            os.kill(os.getpid(), signal.SIGSTOP)
        elif plan.kind == FaultKind.SEGFAULT:
            ctypes.string_at(0)
        elif plan.kind == FaultKind.EXIT:
            os._exit(3)
        elif plan.kind == FaultKind.ABORT:
            os.abort()
        elif plan.kind == FaultKind.STALL:
            while True:  # the watchdog thread keeps heartbeating; the agent's progress timeout ends this
                time.sleep(3600)
        else:
            msg = f"injected exception at step {plan.step}, phase {plan.phase}"
            raise InjectedFault(msg)
