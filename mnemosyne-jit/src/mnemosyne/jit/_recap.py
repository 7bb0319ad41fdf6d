"""The agent's one-line summary after each recovery (``mnemo launch`` prints it).

The agent does not time phases itself: the trainers write them to the job's event log.
:func:`poll` reads what was appended since its last call and, once every rank of a
recovery's epoch logged that it resumed training, prints the recovery's line (see
:func:`mnemosyne.jit.report.one_line`), e.g.::

    mnemo launch: recovered rank 2 (kill) in 0.23 s: detect 0.05, replace 0.13, repair 0.03, transfer 0.01,
    resume 0.01; 1 step redone

Only a single-node job's agent prints: on several nodes each agent's log holds its own
ranks only; ``mnemo report LOG0 LOG1 ...`` merges them afterwards.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mnemosyne.core.events import Event, EventKind
from mnemosyne.jit.report import one_line
from mnemosyne.jit.summary import incidents

if TYPE_CHECKING:
    from mnemosyne.jit.agent import Agent

__all__ = ["poll"]

logger = logging.getLogger(__name__)


@dataclass
class _Tail:
    offset: int = 0
    events: list[Event] = field(default_factory=list)
    members: dict[int, set[int]] = field(default_factory=dict)   # epoch -> its members
    resumed: dict[int, set[int]] = field(default_factory=dict)   # epoch -> ranks that resumed
    printed: set[int] = field(default_factory=set)               # epochs already summarized


_TAILS: weakref.WeakKeyDictionary[Agent, _Tail] = weakref.WeakKeyDictionary()


def _read_new(path: str, tail: _Tail) -> list[Event]:
    try:
        with open(path, "rb") as fh:
            fh.seek(tail.offset)
            chunk = fh.read()
    except OSError:
        return []
    complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
    tail.offset += len(complete)
    new = []
    for line in complete.decode("utf-8", errors="replace").splitlines():
        try:
            new.append(Event.from_json(line))
        except Exception:  # a torn or foreign line: not this summary's business
            continue
    return new


def poll(agent: Agent) -> None:
    """Print the line of every recovery that completed since the last call."""
    if agent.config.nnodes != 1 or not agent.coordinator_node:
        return
    tail = _TAILS.setdefault(agent, _Tail())
    new = _read_new(agent.event_log_path, tail)
    if not new:
        return
    tail.events += new
    done: list[int] = []
    for e in new:
        if e.kind == EventKind.EPOCH and e.rank < 0:
            tail.members[int(e.fields.get("epoch_number", e.epoch))] = {int(r) for r in e.fields.get("members", [])}
        elif e.kind == EventKind.RECOVERED:
            tail.resumed.setdefault(e.epoch, set()).add(e.rank)
        else:
            continue
        epoch = e.epoch if e.kind == EventKind.RECOVERED else -1
        members = tail.members.get(epoch)
        if epoch > 0 and epoch not in tail.printed and members and members <= tail.resumed.get(epoch, set()):
            tail.printed.add(epoch)
            done.append(epoch)
    if not done:
        return
    try:
        for inc in incidents(tail.events):
            if inc.epochs and inc.epochs[-1] in done:
                print(f"mnemo launch: {one_line(inc)}", flush=True)
    except Exception as exc:  # a summary must never take the agent down
        logger.debug("recovery summary failed: %s", exc)

