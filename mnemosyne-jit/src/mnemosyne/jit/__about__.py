"""Version of the mnemosyne-jit distribution (read by hatchling)."""

__version__ = "0.1.0"
