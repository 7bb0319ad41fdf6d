"""The trainer's view of membership epochs, shared by its main thread and its watchdog thread.

The watchdog calls :meth:`EpochWatch.on_epoch` when it sees a newer epoch: the current
communicator, unless it was built for that epoch already, is aborted at once and
:attr:`EpochWatch.interrupt` is set, which ends every interruptible wait of a recovery
in progress. The main thread adopts the newest epoch when it recovers
(:meth:`~EpochWatch.adopt`) and installs the communicator it built for it
(:meth:`~EpochWatch.install`).
"""

from __future__ import annotations

import logging
import threading
import time

from mnemosyne.core.comm import Communicator
from mnemosyne.core.errors import MnemosyneError, RecoveryError
from mnemosyne.core.log import ContextAdapter
from mnemosyne.core.store import Store
from mnemosyne.jit import _keys

__all__ = ["REBUILD_GRACE", "EpochWatch"]

#: How long a rank that saw a communicator error waits for the agent's new epoch before
#: asking for a rebuild of the same members (an error no process death explains).
REBUILD_GRACE = 10.0


class EpochWatch:
    """Epoch state of one trainer (see module doc).

    Args:
        epoch: The epoch the process starts in.
        logger: The trainer's logger.
    """

    def __init__(self, epoch: int, logger: ContextAdapter | logging.Logger) -> None:
        self.lock = threading.Lock()
        self.known = epoch
        #: When the watchdog last saw a newer epoch (``perf_counter``), for the abort phase.
        self.notice: float | None = None
        self.interrupt = threading.Event()
        self.comm: Communicator | None = None
        self.comm_for = -1  # membership epoch the current communicator was built for
        self.logger = logger

    def on_epoch(self, epoch: int) -> None:
        """Watchdog thread: a newer epoch exists; abort the communicator now."""
        with self.lock:
            self.known = epoch
            self.notice = time.perf_counter()
            comm = self.comm
            stale = comm is None or self.comm_for < epoch
            if stale:
                self.interrupt.set()
        if comm is not None and stale:
            comm.abort(f"membership epoch {epoch} published")
        self.logger.info("membership epoch %d seen; communicator aborted", epoch)

    def adopt(self, min_epoch: int, store: Store, timeout: float) -> int:
        """Wait for an epoch >= ``min_epoch`` and return the newest (the interrupt is cleared).

        Past :data:`REBUILD_GRACE` seconds without one, ask the agent for a rebuild of the
        same members (a communicator error that no membership change explains).

        Raises:
            RecoveryError: No epoch came, even after asking.
        """
        asked = False
        deadline = time.monotonic() + REBUILD_GRACE
        while True:
            with self.lock:
                e = self.known
                if e >= min_epoch:
                    self.interrupt.clear()
                    return e
            if time.monotonic() > deadline:
                if asked:
                    msg = f"no membership epoch >= {min_epoch} was published after a communicator failure"
                    raise RecoveryError(msg)
                self.logger.warning("communicator failed with no membership change; asking for a rebuild")
                store.add(_keys.REBUILD_REQUEST, 1)
                asked = True
                deadline = time.monotonic() + max(timeout, REBUILD_GRACE)
            time.sleep(0.002)

    def install(self, comm: Communicator, epoch: int) -> bool:
        """Make ``comm`` (built for ``epoch``) current; True if a newer epoch appeared meanwhile."""
        with self.lock:
            self.comm = comm
            self.comm_for = epoch
            return self.known > epoch

    def newer(self, store: Store, epoch: int, within: float = 5.0) -> bool:
        """Whether an epoch after ``epoch`` is known, or published within ``within`` seconds."""
        if self.interrupt.is_set() or self.known > epoch:
            return True
        try:
            store.wait([_keys.membership(epoch + 1)], within)
        except MnemosyneError:
            return False
        return True
