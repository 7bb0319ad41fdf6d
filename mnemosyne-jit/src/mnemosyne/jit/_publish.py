"""Node 0's agent turns the coordinator's decisions into epoch records (no torch).

The record adds what the coordinator does not decide: which epoch of mnemosyne-ccl's
communicator family the members build (ccl numbers its own epochs). Publishing a new one
first aborts the current one through its store key (ccl's ``signal_abort``), which wakes
every member blocked in it, or still building it, within one poll, in addition to the
watchdogs' local aborts. Survivors holding the previous one repair it, the others create
it, a replacement joins it.
"""

from __future__ import annotations

from mnemosyne.core.store import Store
from mnemosyne.jit._coordinator import Publish
from mnemosyne.jit._protocol import EpochRecord, publish_record

__all__ = ["Publisher"]


class Publisher:
    """Writes the epoch records of one job (node 0's agent only).

    Args:
        store: The job's store.
        store_kind: ``ccl`` (records carry a communicator epoch) or ``torch``.
    """

    def __init__(self, store: Store, store_kind: str) -> None:
        self.store = store
        self.store_kind = store_kind
        #: Epoch of ccl's "world" communicator family the current membership epoch builds.
        self.comm_epoch = 0

    def publish(self, decision: Publish) -> EpochRecord:
        """Write the record of ``decision``'s epoch (one store ``set``) and return it."""
        nxt = decision.membership
        comm = self._next_comm_epoch(nxt.epoch, decision.reason) if self.store_kind == "ccl" else None
        record = EpochRecord(nxt, decision.placement, decision.ckpt, comm)
        publish_record(self.store, record)
        return record

    def _next_comm_epoch(self, epoch: int, reason: str) -> int:
        from mnemosyne.ccl import newest_epoch, signal_abort

        if epoch > 0:
            # The newest epoch any member started building (ccl's fence), if past ours.
            newest = max(self.comm_epoch, newest_epoch(self.store) or 0)
            for e in sorted({self.comm_epoch, newest}):
                signal_abort(self.store, e, f"membership epoch {epoch}: {reason}")
            self.comm_epoch = newest + 1
        return self.comm_epoch
