"""Logging helpers: a LoggerAdapter that stamps job, epoch and rank on every line.

No handler is configured here; only the CLI configures logging.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

__all__ = ["ContextAdapter"]


class ContextAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefix log lines with ``[job e<epoch> r<rank>]``; update attributes as they change.

    Args:
        logger: The module logger.
        job: Job id.
        rank: Logical rank (-1 for agents).
        epoch: Membership epoch.
    """

    def __init__(self, logger: logging.Logger, job: str = "", rank: int = -1, epoch: int = 0) -> None:
        super().__init__(logger, {})
        self.job = job
        self.rank = rank
        self.epoch = epoch

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        """Add the context prefix and the ``job``/``rank``/``epoch`` extra fields."""
        extra = dict(kwargs.get("extra") or {})
        extra.update(job=self.job, rank=self.rank, epoch=self.epoch)
        kwargs["extra"] = extra
        return f"[{self.job} e{self.epoch} r{self.rank}] {msg}", kwargs
