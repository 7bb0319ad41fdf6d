"""Recovery summaries computed from a job's event log (the demo and the benchmark use it).

Nothing is re-measured: every number comes from events that the agent and the trainers
wrote while it happened. Faults close together (a second failure during a recovery)
form one *incident*, from the first fault to the moment every rank resumed training.

Per incident, the critical path is cut into consecutive phases:

* ``detect`` -- fault to the agent's detection. The fault's moment is the fault event
  (an injected fault, a trainer's own report) or, for a death nobody announced (an
  external ``kill -9``, the OOM killer), the process's exit as timed by the agent
  (``exited_at`` of the detect event);
* ``replace`` -- new epoch published to the replacement process being ready (its
  runtime started: for a pre-warmed spare, only the user's model construction);
* ``repair`` -- from then to the last rank's new communicator;
* ``transfer`` -- to the last rank done sending or receiving state;
* ``resume`` -- to the last rank back in training (after a barrier).

``abort`` (epoch published to the survivors' blocked collectives raising) runs in
parallel with ``replace`` and is reported on its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mnemosyne.core.events import Event, EventKind

__all__ = ["Incident", "incidents", "summarize"]


@dataclass
class Incident:
    """One recovery, possibly covering several faults."""

    faults: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    phases_s: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0
    steps_redone: int = 0
    resume_step: int = -1
    bytes_transferred: int = 0
    donors: int = 0
    #: Wall-clock time of the first fault (``time.time()``); the phases follow it back to back.
    start_ts: float = 0.0
    #: How the fault's moment is known: ``"fault event"`` (injected, or a trainer's own
    #: report), ``"exit"`` (the process's exit, timed by the agent), or ``"detection"``
    #: (unknown: the detect phase then reads 0).
    fault_time_from: str = "detection"
    #: False while (or when) not every rank logged that it resumed: the log ends mid-recovery.
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def incidents(events: list[Event]) -> list[Incident]:
    """Group the log's failures into incidents and time their phases."""
    evs = sorted(events, key=lambda e: e.ts)
    detects = [e for e in evs if e.kind == EventKind.DETECT and e.rank == -1]
    out: list[Incident] = []
    i = 0
    after = float("-inf")  # the previous incident's last detection: its faults are not this one's
    while i < len(detects):
        first = detects[i]
        epoch_evs = [e for e in evs if e.kind == EventKind.EPOCH and e.ts >= first.ts]
        if not epoch_evs:
            break
        # Extend the incident while further detections happen before everyone resumed.
        group = [first]
        last_epoch = epoch_evs[0]
        while True:
            done_ts = _resumed_ts(evs, last_epoch.epoch)
            nxt = detects[i + len(group)] if i + len(group) < len(detects) else None
            if nxt is not None and (done_ts is None or nxt.ts < done_ts):
                group.append(nxt)
                later = [e for e in evs if e.kind == EventKind.EPOCH and e.ts >= nxt.ts]
                if not later:
                    break
                last_epoch = later[0]
                continue
            break
        i += len(group)
        out.append(_incident(evs, group, last_epoch, after))
        after = group[-1].ts
    return out


def _resumed_ts(evs: list[Event], epoch: int) -> float | None:
    rec = [e for e in evs if e.kind == EventKind.RECOVERED and e.epoch == epoch]
    return max(e.ts for e in rec) if rec else None


def _incident(evs: list[Event], group: list[Event], last_epoch: Event, after: float) -> Incident:
    inc = Incident()
    t_detect0 = group[0].ts
    faults = [e for e in evs if e.kind == EventKind.FAULT and max(after, t_detect0 - 60) < e.ts <= group[-1].ts]
    # A death nobody announced (an external kill, an OOM kill) has no fault event: its
    # moment is the process's exit, which the agent times apart from noticing it.
    exits = [float(e.fields["exited_at"]) for e in group if e.fields.get("exited_at") is not None]
    t_fault = min([e.ts for e in faults] + exits + [t_detect0])
    inc.start_ts = t_fault
    inc.fault_time_from = ("fault event" if faults and t_fault == min(e.ts for e in faults)
                           else "exit" if exits else "detection")
    inc.faults = [{"rank": e.rank, "kind": e.name, "step": e.fields.get("step"), "phase": e.fields.get("phase")}
                  for e in faults]
    inc.detections = [{"rank": e.fields.get("target_rank"), "cause": e.name, "after_s": round(e.ts - t_fault, 4)}
                      for e in group]
    epoch_numbers = sorted({e.epoch for e in evs if e.kind == EventKind.EPOCH and group[0].ts <= e.ts
                            and e.epoch <= last_epoch.epoch})
    inc.epochs = epoch_numbers
    e_last = last_epoch.epoch
    in_last = [e for e in evs if e.epoch == e_last and e.ts >= last_epoch.ts]
    t_resumed = _resumed_ts(evs, e_last) or last_epoch.ts
    inc.complete = _resumed_ts(evs, e_last) is not None
    starts = [e.ts for e in in_last if e.kind == EventKind.INFO and e.name == "trainer_start"]
    t_ready = max(starts) if starts else last_epoch.ts
    ends = {name: max((e.ts for e in in_last if e.kind == EventKind.PHASE and e.name == name), default=None)
            for name in ("repair", "transfer", "resume")}
    t_repaired = ends["repair"] or t_ready
    t_transferred = ends["transfer"] or t_repaired
    aborts = [e.duration_s or 0.0 for e in evs if e.kind == EventKind.PHASE and e.name == "abort"
              and t_fault <= e.ts <= t_resumed]
    inc.phases_s = {
        "detect": max(0.0, group[0].ts - t_fault),
        "abort": max(aborts, default=0.0),
        "replace": max(0.0, t_ready - group[0].ts),
        "repair": max(0.0, t_repaired - t_ready),
        "transfer": max(0.0, t_transferred - t_repaired),
        "resume": max(0.0, t_resumed - t_transferred),
    }
    inc.total_s = max(0.0, t_resumed - t_fault)
    rec = [e for e in evs if e.kind == EventKind.RECOVERED and e.epoch == e_last]
    inc.steps_redone = max((int(e.fields.get("steps_redone", 0)) for e in rec), default=0)
    inc.resume_step = max((int(e.fields.get("resume_step", -1)) for e in rec), default=-1)
    xfer = [e for e in in_last if e.kind == EventKind.PHASE and e.name == "transfer"
            and e.fields.get("role") in ("receiver", "reattached")]
    inc.bytes_transferred = sum(int(e.fields.get("bytes", 0)) for e in xfer)
    inc.donors = max((int(e.fields.get("donors", 0)) for e in xfer), default=0)
    return inc


def summarize(events: list[Event]) -> dict[str, Any]:
    """Job-level summary: incidents, step times, and totals."""
    incs = incidents(events)
    steps = [e.duration_s for e in events if e.kind == EventKind.STEP and e.duration_s is not None]
    steps_sorted = sorted(steps)
    return {
        "incidents": [i.to_dict() for i in incs],
        "faults": sum(len(i.faults) for i in incs),
        "recoveries": len(incs),
        "steps_redone": max((i.steps_redone for i in incs), default=0),
        "recovery_total_s": sum(i.total_s for i in incs),
        "median_step_s": steps_sorted[len(steps_sorted) // 2] if steps_sorted else None,
    }
