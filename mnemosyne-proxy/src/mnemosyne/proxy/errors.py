"""Errors raised by the device proxy and its clients.

Every class subclasses the closest :mod:`mnemosyne.core.errors` class, so callers that
only know the core hierarchy still catch them. Errors travel over the wire as a numeric
code plus a message (see :data:`ERROR_CODES`); the client raises the same class again.
"""

from __future__ import annotations

from mnemosyne.core.errors import (
    AuthError,
    ConfigError,
    CorruptStateError,
    MnemosyneError,
    ProtocolError,
    StateError,
)

__all__ = [
    "ERROR_CODES",
    "ArenaFullError",
    "ProxyError",
    "ProxyUnavailableError",
    "PullError",
    "error_code",
    "error_from_code",
]


class ProxyError(StateError):
    """The device proxy refused or failed a request."""


class ProxyUnavailableError(ProxyError, ConnectionError):
    """The proxy is not running, or died while a request was outstanding."""


class ArenaFullError(ProxyError, MemoryError):
    """An allocation does not fit in the arena's free space."""


class PullError(ProxyError):
    """Filling an arena from a peer proxy failed (peer not committed, moved on, or checksums differ)."""


#: Wire code of each error class (0 is never sent).
ERROR_CODES: dict[int, type[MnemosyneError]] = {
    1: ProtocolError,
    2: AuthError,
    3: ProxyError,
    4: ConfigError,
    5: CorruptStateError,
    6: ArenaFullError,
    7: PullError,
    8: StateError,
}


def error_code(exc: BaseException) -> int:
    """The wire code for ``exc``: its most specific registered class, else 3 (ProxyError)."""
    for cls in type(exc).__mro__:
        for code, known in ERROR_CODES.items():
            if cls is known:
                return code
    return 3


def error_from_code(code: int, message: str) -> MnemosyneError:
    """Rebuild the exception a proxy reported."""
    cls = ERROR_CODES.get(code, ProxyError)
    return cls(message)
