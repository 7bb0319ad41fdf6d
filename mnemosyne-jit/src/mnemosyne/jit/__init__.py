"""mnemosyne.jit."""

from mnemosyne.jit.__about__ import __version__

__all__ = ["__version__"]
