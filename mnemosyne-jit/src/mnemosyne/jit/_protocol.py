"""What the two programs of mnemosyne-jit agree on: exit codes and the epoch record.

mnemosyne-jit is two programs that talk only through the job's store, the environment
and exit codes:

* the supervisor (``mnemo launch``): :mod:`~mnemosyne.jit.agent`, the coordinator, the
  proxy pool, :mod:`~mnemosyne.jit._bootstrap` and the config; it never imports torch;
* the trainer (:func:`mnemosyne.jit.init`): the job, step, watchdog, gradient sync,
  recovery, state and communicator modules.

Neither imports the other. What they share lives in torch-free modules: this one (exit
codes, the epoch record), :mod:`mnemosyne.jit._keys` (store key names) and
:mod:`mnemosyne.core.env` (environment variable names, defined once there).

The epoch record: everything one membership epoch decides (who is a member, which node
starts which replacement, whether the survivors checkpoint and exit, which epoch of
mnemosyne-ccl's communicator family the members build) is one immutable
:class:`EpochRecord`, written by the coordinator's agent in one store ``set`` under
``_keys.membership(epoch)`` and read once per epoch by each party (each agent, each
trainer; the watchdog only waits for the key to appear). Nothing about an epoch is
published anywhere else, so no reader can see half an epoch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mnemosyne.core.errors import ProtocolError
from mnemosyne.core.membership import Membership
from mnemosyne.core.store import Store
from mnemosyne.jit import _keys

__all__ = [
    "EXIT_CKPT",
    "EXIT_CKPT_FAILED",
    "EXIT_EXCEPTION",
    "EXIT_JOB_CKPT",
    "EXIT_REPLACED",
    "CkptOrder",
    "EpochRecord",
    "publish_record",
    "read_record",
]

# Trainer exit codes, read by the agent that started the trainer.
#: A trainer died of an exception in a step (after reporting it in the store).
EXIT_EXCEPTION = 17
#: A trainer found itself replaced (no longer a member).
EXIT_REPLACED = 18
#: A healthy trainer took part in a just-in-time checkpoint on the agent's order (whether or
#: not it wrote a part of it).
EXIT_CKPT = 19
#: A trainer whose part of an ordered checkpoint failed.
EXIT_CKPT_FAILED = 20

# The launcher's own exit code.
#: ``mnemo launch`` stopped the job after a just-in-time checkpoint.
EXIT_JOB_CKPT = 3


@dataclass(frozen=True)
class CkptOrder:
    """The coordinator's "checkpoint and exit" decision.

    Attributes:
        dir: Checkpoint root (absolute).
        ranks: Survivors that take part (agree, the donors write, every one exits).
        failed: The ranks whose failure led to the order.
    """

    dir: str
    ranks: tuple[int, ...]
    failed: tuple[int, ...] = ()


@dataclass(frozen=True)
class EpochRecord:
    """One membership epoch, as published (see module doc).

    Attributes:
        membership: Members of the epoch (its ``epoch`` is the record's).
        placement: Processes to start in this epoch: rank -> (node, local rank).
        ckpt: The "checkpoint and exit" order, when the job cannot continue.
        comm_epoch: Epoch of mnemosyne-ccl's communicator family the members build;
            None with the plain torch.distributed fallback (a fresh group per epoch).
    """

    membership: Membership
    placement: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    ckpt: CkptOrder | None = None
    comm_epoch: int | None = None

    @property
    def epoch(self) -> int:
        """The membership epoch."""
        return self.membership.epoch

    def to_json(self) -> bytes:
        """Serialize for the store (JSON)."""
        body: dict[str, Any] = json.loads(self.membership.to_json())
        body["placement"] = {str(r): [n, lr] for r, (n, lr) in sorted(self.placement.items())}
        body["ckpt"] = None if self.ckpt is None else {"dir": self.ckpt.dir, "ranks": list(self.ckpt.ranks),
                                                       "failed": list(self.ckpt.failed)}
        body["comm_epoch"] = self.comm_epoch
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> EpochRecord:
        """Parse :meth:`to_json` output.

        Raises:
            ProtocolError: ``data`` is not an epoch record.
        """
        membership = Membership.from_json(data)
        try:
            body = json.loads(data)
            place = {int(r): (int(v[0]), int(v[1])) for r, v in body.get("placement", {}).items()}
            order = body.get("ckpt")
            ckpt = None if order is None else CkptOrder(str(order["dir"]), tuple(int(r) for r in order["ranks"]),
                                                        tuple(int(r) for r in order.get("failed", ())))
            comm = body.get("comm_epoch")
            return cls(membership, place, ckpt, None if comm is None else int(comm))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            msg = f"malformed epoch record {data[:80]!r}: expected placement, ckpt and comm_epoch ({exc})"
            raise ProtocolError(msg) from None


def publish_record(store: Store, record: EpochRecord) -> None:
    """Publish ``record`` (one ``set``: the epoch exists for everyone from then on, whole)."""
    store.set(_keys.membership(record.epoch), record.to_json())


def read_record(store: Store, epoch: int, timeout: float | None = None) -> EpochRecord:
    """Read the record of ``epoch``, waiting up to ``timeout`` seconds for it to be published."""
    return EpochRecord.from_json(store.get(_keys.membership(epoch), timeout))
