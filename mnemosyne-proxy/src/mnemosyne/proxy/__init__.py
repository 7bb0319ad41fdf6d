"""mnemosyne.proxy."""

from mnemosyne.proxy.__about__ import __version__

__all__ = ["__version__"]
