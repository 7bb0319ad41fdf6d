"""mnemosyne.proxy: a per-device proxy process that owns training state and outlives the trainer.

* :class:`ProxyServer` -- the proxy (``mnemo proxy`` / ``python -m mnemosyne.proxy``).
* :class:`ProxyClient` -- the generated protocol's client (no torch).
* :class:`ProxyStateHolder` -- a :class:`~mnemosyne.core.state.StateHolder` over a proxy
  (the hook mnemosyne-jit consumes); :func:`adopt` puts a model and optimizer into it.

Importing this package does not import torch; the torch-using parts import it when called.
"""

from mnemosyne.proxy.__about__ import __version__
from mnemosyne.proxy.adopt import AdoptResult, adopt, store_state
from mnemosyne.proxy.client import ProxyClient
from mnemosyne.proxy.errors import ArenaFullError, ProxyError, ProxyUnavailableError, PullError
from mnemosyne.proxy.holder import ProxyAttachResult, ProxyStateHolder
from mnemosyne.proxy.server import ProxyServer
from mnemosyne.proxy.table import SCRATCH_PREFIX

__all__ = [
    "SCRATCH_PREFIX",
    "AdoptResult",
    "ArenaFullError",
    "ProxyAttachResult",
    "ProxyClient",
    "ProxyError",
    "ProxyServer",
    "ProxyStateHolder",
    "ProxyUnavailableError",
    "PullError",
    "__version__",
    "adopt",
    "store_state",
]
