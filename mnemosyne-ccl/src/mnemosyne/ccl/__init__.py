"""mnemosyne.ccl: flexible communicators that repair instead of restarting.

Importing this package never imports torch; the backends do, when first used.

* :class:`~mnemosyne.ccl.store_server.StoreServer` -- the persistent bootstrap store
  (``mnemo store``), and :class:`~mnemosyne.ccl.store_client.StoreClient`, its client
  implementing :class:`mnemosyne.core.store.Store`.
* Backends by name: ``mnemosyne.core.plugins.load(BACKENDS_ENTRY_POINT, "gloo")()`` returns
  a :class:`~mnemosyne.core.comm.CommBackend` (``"gloo"``: CPU through torch's
  ProcessGroupGloo; ``"nccl"``: GPUs through nccl4py). See :func:`backend`.
* :func:`signal_abort` -- abort every member of an epoch from outside (the agent).
* :mod:`mnemosyne.ccl.pg` -- a torch ``ProcessGroup`` over a flexible communicator (DDP, FSDP2).
"""

from __future__ import annotations

from mnemosyne.ccl.__about__ import __version__
from mnemosyne.ccl._base import FlexCommunicator
from mnemosyne.ccl._epochs import comm_prefix, newest_epoch, signal_abort
from mnemosyne.ccl.store_client import StoreClient
from mnemosyne.ccl.store_server import StoreServer
from mnemosyne.core.comm import BACKENDS_ENTRY_POINT, CommBackend

__all__ = [
    "BACKENDS_ENTRY_POINT",
    "FlexCommunicator",
    "StoreClient",
    "StoreServer",
    "__version__",
    "backend",
    "comm_prefix",
    "newest_epoch",
    "signal_abort",
]


def backend(name: str) -> CommBackend:
    """Return a new instance of the backend registered as ``name`` (``"gloo"``, ``"nccl"``)."""
    from mnemosyne.core import plugins

    cls = plugins.load(BACKENDS_ENTRY_POINT, name)
    inst: CommBackend = cls()
    return inst
