"""Version of the mnemosyne-proxy distribution (read by hatchling)."""

__version__ = "0.1.0"
