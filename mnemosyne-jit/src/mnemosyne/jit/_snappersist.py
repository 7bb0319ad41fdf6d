"""Background persistence of snapshots: the newest generation becomes a jit checkpoint directory.

A :class:`Persister` (a thread in any process that may import torch, or this module run as
``python -m mnemosyne.jit._snappersist BASE ROOT``) reads the newest complete generation of
a holder in shared memory and writes it with :func:`mnemosyne.jit.ckpt.write` as
``ROOT/<checkpoint_name(step)>``: the atomic DCP format, so ``mnemo ckpt verify`` and
``mnemo launch --resume`` take it. It never touches the trainer: it reads the holder's
files, which a new snapshot never overwrites while they are the newest (double buffer).
Retention: only the ``keep`` newest complete checkpoints under ``ROOT`` stay.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import threading
from pathlib import Path

from mnemosyne.core.errors import StateError
from mnemosyne.core.store import DictStore
from mnemosyne.jit import _snapstore, ckpt
from mnemosyne.jit._snapshot import decode

__all__ = ["Persister", "persist", "prune"]

logger = logging.getLogger(__name__)


def persist(base: str | os.PathLike[str], root: str | os.PathLike[str], *, keep: int = 2,
            world_size: int = 1) -> Path | None:
    """Write holder ``base``'s newest generation as a checkpoint under ``root``; prune to ``keep``.

    Returns:
        The new checkpoint directory, or None when that step is already persisted.

    Raises:
        StateError: the holder has no complete, verified generation.
    """
    gen = _snapstore.latest(base)
    final = Path(root) / ckpt.checkpoint_name(gen.step)
    if final.exists():
        return None
    step, state = decode(gen)
    ckpt.write(final, state, step=step, rank=0, world_size=world_size, store=DictStore(), writer_ranks=[0],
               meta={"source": "snapshot", "generation": gen.seq, "digest": gen.digest.hex()})
    prune(root, keep)
    return final


def prune(root: str | os.PathLike[str], keep: int) -> list[Path]:
    """Remove all but the ``keep`` highest-step complete checkpoints under ``root``; returns what went.

    Raises:
        ValueError: ``keep`` < 1 (the newest checkpoint is never removed).
    """
    if keep < 1:
        msg = f"snapshot persistence: keep={keep}; expected at least 1"
        raise ValueError(msg)
    done = sorted((e for e in ckpt.list_checkpoints(root) if e.complete and e.step is not None),
                  key=lambda e: (e.step or 0, e.path.name))
    gone = [e.path for e in done[:-keep]]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


class Persister:
    """Persists holder ``base`` to ``root`` every ``interval`` seconds in a daemon thread."""

    def __init__(self, base: str | os.PathLike[str], root: str | os.PathLike[str], *, interval: float = 30.0,
                 keep: int = 2, world_size: int = 1) -> None:
        self.base, self.root, self.interval, self.keep, self.world_size = base, root, interval, keep, world_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mnemosyne-persist", daemon=True)
        #: Checkpoints written, in order.
        self.written: list[Path] = []

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.persist_once()

    def persist_once(self) -> Path | None:
        """One pass (also called by the thread); a holder with no generation yet is not an error."""
        try:
            out = persist(self.base, self.root, keep=self.keep, world_size=self.world_size)
        except StateError as e:
            logger.info("snapshot persistence of %s skipped: %s", self.base, e)
            return None
        if out is not None:
            self.written.append(out)
        return out

    def close(self) -> None:
        """Stop after the pass in progress."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def main(argv: list[str] | None = None) -> None:
    """``python -m mnemosyne.jit._snappersist BASE ROOT [--keep K]``: persist once, print the path."""
    p = argparse.ArgumentParser(description="Persist the newest snapshot generation as a checkpoint.")
    p.add_argument("base")
    p.add_argument("root")
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--world-size", type=int, default=1)
    a = p.parse_args(argv)
    print(persist(a.base, a.root, keep=a.keep, world_size=a.world_size))


if __name__ == "__main__":
    main()
