"""The trainer's watchdog thread: epochs in, heartbeats and fault plans.

Every ``poll`` seconds, on its own store connection, it

* looks for a membership epoch newer than the one it knows; on one, it records it and
  aborts the current communicator, so that the main thread's blocked collective raises
  at once instead of waiting for a transport timeout;
* publishes a heartbeat (every ``hb_interval``): a counter that proves the process is
  alive, plus the main thread's position (step, phase, inside a collective or not) that
  lets the agent tell a hung rank from ranks waiting for it;
* picks up fault plans written by ``mnemo inject``.

A SIGSTOPped process stops this thread too: its heartbeat goes stale, which is how the
agent detects a frozen process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from mnemosyne.core.errors import MnemosyneError, StoreTimeout
from mnemosyne.jit import _keys
from mnemosyne.jit.inject import Injector, parse_plans

__all__ = ["Watchdog"]

logger = logging.getLogger(__name__)


class Watchdog(threading.Thread):
    """Background thread of one trainer (see module doc).

    Args:
        store: A store client for this thread alone (job-prefixed view over it).
        rank: Logical rank.
        on_epoch: Called (from this thread) with each newer epoch seen.
        position: Returns the main thread's position dict for the heartbeat.
        injector: Receives plans from ``mnemo inject``.
        poll: Seconds between polls.
        hb_interval: Seconds between heartbeats.
    """

    def __init__(self, store: Any, rank: int, known_epoch: int, on_epoch: Callable[[int], None],
                 position: Callable[[], dict[str, Any]], injector: Injector, poll: float = 0.01,
                 hb_interval: float = 0.1) -> None:
        super().__init__(name=f"mnemosyne-watchdog-r{rank}", daemon=True)
        self.store = store
        self.rank = rank
        self.known_epoch = known_epoch
        self.on_epoch = on_epoch
        self.position = position
        self.injector = injector
        self.poll = poll
        self.hb_interval = hb_interval
        self.stopped = threading.Event()
        self._seq = 0
        self._plans_seen = 0

    def stop(self) -> None:
        """Ask the thread to end (it exits within one poll)."""
        self.stopped.set()

    def _newest_epoch(self) -> int:
        e = self.known_epoch
        while self.store.check([_keys.membership(e + 1)]):
            e += 1
        return e

    def beat(self) -> None:
        """Publish one heartbeat now."""
        self._seq += 1
        body = {"pid": os.getpid(), "seq": self._seq, "t": time.time(), **self.position()}
        self.store.set(_keys.heartbeat(self.rank), json.dumps(body).encode())

    def run(self) -> None:
        """Thread body."""
        next_beat = 0.0
        while not self.stopped.is_set():
            try:
                newest = self._newest_epoch()
                if newest > self.known_epoch:
                    self.known_epoch = newest
                    self.on_epoch(newest)
                now = time.monotonic()
                if now >= next_beat:
                    self.beat()
                    next_beat = now + self.hb_interval
                    n = self.store.add(_keys.INJECT_COUNT, 0)
                    while self._plans_seen < n:
                        text = self.store.get(_keys.inject_plan(self._plans_seen), 5.0).decode()
                        self.injector.add(parse_plans(text, id_prefix=f"cli{self._plans_seen}-"))
                        self._plans_seen += 1
                self._wait_for_epoch(next_beat)
            except MnemosyneError:
                # The store went away: the launcher is gone or stopping; the trainer
                # will notice on its own next store access. Keep trying quietly.
                logger.debug("watchdog store access failed", exc_info=True)
                time.sleep(0.5)

    def _wait_for_epoch(self, next_beat: float) -> None:
        """Block until the next epoch is published or the next heartbeat is due.

        A blocking store wait instead of polling every ``poll`` seconds: polling 100 times a
        second per rank through a Python store client cost ~20% of a 15 ms CPU step (GIL
        and store-server load, measured with tools/bench/recovery.py); the wait returns as
        soon as the agent publishes the epoch, so detection is not slower.
        """
        wait_s = next_beat - time.monotonic()
        if wait_s < self.poll:
            self.stopped.wait(self.poll)
            return
        with contextlib.suppress(StoreTimeout):
            self.store.wait([_keys.membership(self.known_epoch + 1)], wait_s)
