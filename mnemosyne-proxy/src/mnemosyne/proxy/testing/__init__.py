"""Testing helpers of mnemosyne-proxy (public, documented): a deterministic trainer that runs
as its own process and a helper that starts a proxy process and waits until it serves.
"""

from mnemosyne.proxy.testing.procs import ProxyProcess

__all__ = ["ProxyProcess"]
