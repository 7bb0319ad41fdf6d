"""mnemosyne.cli: the ``mnemo`` command.

Subcommands are discovered through the ``mnemosyne.cli.commands`` entry-point group: each
entry point names a ``register(subparsers)`` function, so every package can ship its own
``mnemo <x>``. See :mod:`mnemosyne.cli.main`.
"""

from mnemosyne.cli.__about__ import __version__

__all__ = ["__version__"]
