"""mnemosyne.core: the stable interfaces every Mnemosyne package speaks.

No heavy dependency (no torch). See the submodules:

* :mod:`mnemosyne.core.errors` -- the error hierarchy.
* :mod:`mnemosyne.core.env` -- ``MNEMOSYNE_*`` environment variable names.
* :mod:`mnemosyne.core.membership` -- membership epochs.
* :mod:`mnemosyne.core.store` -- the Store protocol and helpers.
* :mod:`mnemosyne.core.comm` -- the Communicator protocol and backend base.
* :mod:`mnemosyne.core.state` -- Stateful, StateHolder, StateSource.
* :mod:`mnemosyne.core.events` -- event log and phase timing.
* :mod:`mnemosyne.core.plugins` -- entry-point plugin loading.
"""

from mnemosyne.core.__about__ import __version__
from mnemosyne.core.comm import CommBackend, Communicator, ReduceOp
from mnemosyne.core.errors import (
    AuthError,
    CollectiveTimeout,
    CommAborted,
    CommError,
    ConfigError,
    CorruptStateError,
    MissingDependencyError,
    MnemosyneError,
    MultiRankError,
    PeerFailureError,
    ProtocolError,
    RecoveryError,
    StaleEpochError,
    StateError,
    StoreError,
    StoreTimeout,
)
from mnemosyne.core.events import Event, EventKind, EventLog, FaultKind, phase, read_events
from mnemosyne.core.membership import Membership, MembershipChange
from mnemosyne.core.state import AttachResult, CommitStatus, Stateful, StateHolder, StateSource, TensorMeta
from mnemosyne.core.store import DictStore, PrefixStore, Store

__all__ = [
    "AttachResult",
    "AuthError",
    "CollectiveTimeout",
    "CommAborted",
    "CommBackend",
    "CommError",
    "CommitStatus",
    "Communicator",
    "ConfigError",
    "CorruptStateError",
    "DictStore",
    "Event",
    "EventKind",
    "EventLog",
    "FaultKind",
    "Membership",
    "MembershipChange",
    "MissingDependencyError",
    "MnemosyneError",
    "MultiRankError",
    "PeerFailureError",
    "PrefixStore",
    "ProtocolError",
    "RecoveryError",
    "ReduceOp",
    "StaleEpochError",
    "StateError",
    "StateHolder",
    "StateSource",
    "Stateful",
    "Store",
    "StoreError",
    "StoreTimeout",
    "TensorMeta",
    "__version__",
    "phase",
    "read_events",
]
