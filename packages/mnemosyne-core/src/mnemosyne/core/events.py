"""Structured events: every fault, recovery phase and timing is one JSON line.

Writers (agents, trainers, benchmarks) append :class:`Event` records to one log file per
job with :class:`EventLog`; ``mnemo report`` and the benchmarks read them back with
:func:`read_events`, so nothing is measured twice. Phases are timed by :func:`phase`.

Several processes append to the same file: each record is written with one ``write`` on
a file opened with ``O_APPEND``, so lines never interleave.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnemosyne.core.errors import ConfigError, CorruptStateError

__all__ = [
    "Event",
    "EventKind",
    "EventLog",
    "FaultKind",
    "PhaseTimer",
    "phase",
    "read_events",
]


class EventKind:
    """Names of event kinds (plain strings, so readers need not import this module)."""

    FAULT = "fault"          # a fault was injected or observed
    DETECT = "detect"        # the agent or a trainer noticed a failure
    EPOCH = "epoch"          # a new membership epoch was published
    PHASE = "phase"          # a timed phase ended (detect, abort, replace, repair, ...)
    STEP = "step"            # a training step committed (only when step logging is on)
    RECOVERED = "recovered"  # training resumed after a failure
    INFO = "info"            # anything else worth a line


class FaultKind:
    """Fault kinds understood by injection and reported in fault events."""

    KILL = "kill"
    HANG = "hang"
    EXCEPTION = "exception"
    SEGFAULT = "segfault"
    #: ``os._exit(3)``: the process leaves at once, with no exception and no cleanup.
    EXIT = "exit"
    #: ``abort()`` (SIGABRT): what a CUDA sticky error or a failed C++ assertion ends in.
    ABORT = "abort"
    #: The main thread stops making progress while its heartbeat thread goes on (a deadlock
    #: in user code, a stuck data loader): found by the progress timeout, not as frozen.
    STALL = "stall"
    ALL = (KILL, HANG, EXCEPTION, SEGFAULT, EXIT, ABORT, STALL)


@dataclass
class Event:
    """One record of the event log.

    Attributes:
        kind: One of :class:`EventKind`'s names.
        name: What happened, e.g. the phase name ``"repair"``.
        ts: Wall-clock time (``time.time()``) when the event ended.
        job: Job id.
        rank: Logical rank of the writer (-1 for the agent).
        epoch: Membership epoch the writer was in.
        duration_s: Duration, for phase events.
        fields: Extra JSON-serializable details.
    """

    kind: str
    name: str
    ts: float = field(default_factory=time.time)
    job: str = ""
    rank: int = -1
    epoch: int = 0
    duration_s: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Return the record as one JSON line (no trailing newline)."""
        body: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "ts": self.ts,
            "job": self.job,
            "rank": self.rank,
            "epoch": self.epoch,
        }
        if self.duration_s is not None:
            body["duration_s"] = self.duration_s
        if self.fields:
            body["fields"] = self.fields
        return json.dumps(body, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, line: str) -> Event:
        """Parse one line written by :meth:`to_json`.

        Raises:
            CorruptStateError: The line is not an event record.
        """
        try:
            body = json.loads(line)
            return cls(
                kind=str(body["kind"]),
                name=str(body["name"]),
                ts=float(body["ts"]),
                job=str(body.get("job", "")),
                rank=int(body.get("rank", -1)),
                epoch=int(body.get("epoch", 0)),
                duration_s=None if body.get("duration_s") is None else float(body["duration_s"]),
                fields=dict(body.get("fields", {})),
            )
        except (ValueError, KeyError, TypeError) as exc:
            msg = f"not an event record: {line[:120]!r} ({exc})"
            raise CorruptStateError(msg) from None


class EventLog:
    """Appends events to a JSON-lines file shared by the processes of a job.

    Args:
        path: File to append to (created with its parent folders). ``None`` keeps the
            events in memory only (``events`` attribute), for callers without a log.
        job: Job id stamped on every event.
        rank: Writer's logical rank (-1 for agents and tools).
        epoch: Writer's current membership epoch; update the attribute as it changes.

    Raises:
        ConfigError: The file cannot be created (names the path and why).
    """

    def __init__(self, path: str | os.PathLike[str] | None, job: str = "", rank: int = -1, epoch: int = 0) -> None:
        self.path = None if path is None else Path(path)
        self.job = job
        self.rank = rank
        self.epoch = epoch
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._fd: int | None = None
        if self.path is not None:
            # Events name the store address and the model's layout: owner-only (0600, new
            # folders 0700), like every other file of a job.
            try:
                if not self.path.parent.is_dir():
                    self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                msg = f"event log {self.path}: cannot create it ({exc.strerror or exc})"
                raise ConfigError(msg) from None

    def emit(self, kind: str, name: str, duration_s: float | None = None, **fields: Any) -> Event:
        """Write one event and return it."""
        fields.setdefault("host", socket.gethostname())
        fields.setdefault("pid", os.getpid())
        event = Event(kind, name, time.time(), self.job, self.rank, self.epoch, duration_s, fields)
        line = (event.to_json() + "\n").encode()
        with self._lock:
            self.events.append(event)
            if self._fd is not None:
                os.write(self._fd, line)
        return event

    def close(self) -> None:
        """Close the file; later emits keep events in memory only."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str | os.PathLike[str], *, strict: bool = True) -> list[Event]:
    """Read every event of a log file, in file order.

    Args:
        path: The JSON-lines file.
        strict: Raise on a malformed line (naming file and line number) instead of
            skipping it. A crash can leave a torn last line; pass False to tolerate it.

    Raises:
        CorruptStateError: A line is not an event and ``strict`` is set.
    """
    events: list[Event] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                events.append(Event.from_json(line))
            except CorruptStateError as exc:
                if strict:
                    msg = f"{path}:{lineno}: {exc}"
                    raise CorruptStateError(msg) from None
    return events


@dataclass
class PhaseTimer:
    """Result of :func:`phase`: the duration is set when the block exits."""

    name: str
    start: float = 0.0
    duration_s: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def phase(log: EventLog | None, name: str, **fields: Any) -> Iterator[PhaseTimer]:
    """Time a block and emit a ``phase`` event when it ends (also when it raises).

    The yielded :class:`PhaseTimer` can take extra fields while the block runs
    (``t.fields["bytes"] = n``); they go into the event.

    Example:
        >>> with phase(None, "repair") as t:
        ...     pass
        >>> t.duration_s >= 0
        True
    """
    timer = PhaseTimer(name, time.perf_counter(), 0.0, dict(fields))
    ok = False
    try:
        yield timer
        ok = True
    finally:
        timer.duration_s = time.perf_counter() - timer.start
        if log is not None:
            log.emit(EventKind.PHASE, name, timer.duration_s, ok=ok, **timer.fields)


def summarize_phases(events: list[Event]) -> Mapping[str, float]:
    """Sum phase durations by name (helper for reports and benchmarks)."""
    out: dict[str, float] = {}
    for ev in events:
        if ev.kind == EventKind.PHASE and ev.duration_s is not None:
            out[ev.name] = out.get(ev.name, 0.0) + ev.duration_s
    return out


__all__ += ["summarize_phases"]
