"""mnemosyne.ccl."""

from mnemosyne.ccl.__about__ import __version__

__all__ = ["__version__"]
