"""The error hierarchy every Mnemosyne package raises from.

One root, :class:`MnemosyneError`; each package subclasses the class closest to its
failure. Timeouts also inherit :class:`TimeoutError` and bad input also inherits
:class:`ValueError`, so callers that only know the built-ins still catch them.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "AuthError",
    "CollectiveTimeout",
    "CommAborted",
    "CommError",
    "ConfigError",
    "CorruptStateError",
    "MissingDependencyError",
    "MnemosyneError",
    "MultiRankError",
    "PeerFailureError",
    "ProtocolError",
    "RecoveryError",
    "StaleEpochError",
    "StateError",
    "StateLostError",
    "StoreError",
    "StoreTimeout",
]


class MnemosyneError(Exception):
    """Root of every error raised by Mnemosyne code."""


class ConfigError(MnemosyneError, ValueError):
    """A configuration value, CLI argument or environment variable is invalid.

    The message names the offending field and what was expected.
    """


class MissingDependencyError(MnemosyneError, ImportError):
    """An optional module needs a package that is not installed.

    The message carries the exact ``pip install`` line that fixes it.
    """

    def __init__(self, what: str, install: str) -> None:
        super().__init__(f"{what} is not installed; run: {install}")
        self.install = install


class StoreError(MnemosyneError):
    """The key-value store failed or answered something unexpected."""


class StoreTimeout(StoreError, TimeoutError):
    """A store wait or get did not complete within its timeout."""


class ProtocolError(MnemosyneError, ValueError):
    """A peer sent a malformed, foreign or out-of-order message."""


class AuthError(ProtocolError):
    """A peer presented the wrong job token or job id."""


class CommError(MnemosyneError):
    """A communicator operation failed."""


class CommAborted(CommError):
    """The communicator was aborted (locally or because membership changed)."""


class PeerFailureError(CommError):
    """A collective failed because a peer rank died or dropped its connection."""


class CollectiveTimeout(CommError, TimeoutError):
    """A collective did not complete within its timeout."""


class StaleEpochError(CommError):
    """An operation named a membership epoch older than the current one."""


class StateError(MnemosyneError):
    """Training state could not be exported, imported or attached."""


class CorruptStateError(StateError, ValueError):
    """Stored state (checkpoint, arena, log) failed an integrity check."""


class RecoveryError(MnemosyneError):
    """In-place recovery could not complete."""


class StateLostError(RecoveryError):
    """State that no live process holds any more (e.g. a shard whose every replica died).

    No replacement can recover it in place: the job stops (resume from a checkpoint).
    """


class MultiRankError(MnemosyneError):
    """A failure seen on several ranks, carrying every rank's cause.

    Args:
        message: What failed overall.
        causes: Cause text per rank, e.g. ``{0: "PeerFailureError: ...", 2: ...}``.
    """

    def __init__(self, message: str, causes: Mapping[int, str]) -> None:
        self.causes = dict(sorted(causes.items()))
        detail = "; ".join(f"rank {r}: {c}" for r, c in self.causes.items())
        super().__init__(f"{message} ({detail})" if detail else message)
