"""Version of the mnemosyne-ccl distribution (read by hatchling)."""

__version__ = "0.1.0"
