"""Lazy loading of plugins registered through entry points.

Backends (communicators, arenas) and CLI subcommands are chosen by name; nothing is
imported until a name is asked for, so ``import mnemosyne.ccl`` never pulls torch.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from mnemosyne.core.errors import ConfigError

__all__ = ["available", "load"]


def _eps(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def available(group: str) -> list[str]:
    """Names registered under ``group``, sorted."""
    return sorted(_eps(group))


def load(group: str, name: str) -> Any:
    """Import and return the object registered as ``name`` under ``group``.

    Raises:
        ConfigError: No plugin of that name is installed; the message lists the ones
            that are.
    """
    eps = _eps(group)
    if name not in eps:
        names = ", ".join(sorted(eps)) or "none"
        msg = f"no {group!r} plugin named {name!r}; installed: {names}"
        raise ConfigError(msg)
    return eps[name].load()
