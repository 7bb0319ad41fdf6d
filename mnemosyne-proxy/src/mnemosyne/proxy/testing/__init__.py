"""Testing helpers of mnemosyne-proxy (public, documented).

A deterministic trainer that runs as its own process (:mod:`.trainer`) and a helper that
starts a proxy process and waits until it serves (:class:`ProxyProcess`).
"""

from mnemosyne.proxy.testing.procs import ProxyProcess

__all__ = ["ProxyProcess"]
