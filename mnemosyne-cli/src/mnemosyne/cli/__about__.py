"""Version of the mnemosyne-cli distribution (read by hatchling)."""

__version__ = "0.1.0"
