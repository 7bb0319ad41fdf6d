"""Checks of the fields of a store request, and the error answer (for :mod:`mnemosyne.ccl.store_server`).

A field of the wrong type is a :class:`~mnemosyne.core.errors.ProtocolError`, answered to the
client; nothing a client sends reaches the server's logic unchecked.
"""

from __future__ import annotations

from typing import Any

from mnemosyne.core.errors import MnemosyneError, ProtocolError

__all__ = ["err", "int_field", "keys_field", "str_field", "timeout_field"]

# A blocking get/wait without a timeout still ends: a client that vanished must not pin
# a waiter forever. Clients always send their own, shorter, timeout.
MAX_WAIT_S = 3600.0


def err(exc: MnemosyneError) -> dict[str, Any]:
    return {"ok": False, "error": type(exc).__name__, "msg": str(exc)}


def str_field(req: dict[str, Any], name: str) -> str:
    value = req.get(name)
    if not isinstance(value, str):
        msg = f"store request {req.get('op')!r}: field {name!r} must be a string, got {type(value).__name__}"
        raise ProtocolError(msg)
    return value


def keys_field(req: dict[str, Any]) -> list[str]:
    keys = req.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        msg = f"store request {req.get('op')!r}: field 'keys' must be a list of strings"
        raise ProtocolError(msg)
    return keys


def timeout_field(req: dict[str, Any]) -> float:
    value = req.get("timeout")
    if value is None:
        return MAX_WAIT_S
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        msg = f"store request {req.get('op')!r}: 'timeout' must be a number >= 0 or null, got {value!r}"
        raise ProtocolError(msg)
    return min(float(value), MAX_WAIT_S)


def int_field(req: dict[str, Any], name: str) -> int:
    value = req.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        msg = f"store request {req.get('op')!r}: field {name!r} must be an integer, got {value!r}"
        raise ProtocolError(msg)
    return value
