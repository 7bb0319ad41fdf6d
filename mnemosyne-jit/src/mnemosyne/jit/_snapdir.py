"""Where a node's snapshot holders live, and their lifetime (shared by the agent and its trainers; no torch).

``mnemo launch --snapshot-every N`` makes every trainer snapshot its state into a holder
of :mod:`mnemosyne.jit._snapstore` every N committed steps. The agent names one folder
per job and node (:func:`snapshot_root`: ``/dev/shm/mnemosyne-<job>.n<node>``, mode
0700) and gives it to every process it starts (``MNEMOSYNE_SNAPSHOT_DIR``); rank ``r``'s
holder is ``<folder>/r<r>`` (:func:`holder_path`), so a replacement of rank ``r`` (a new
process or a spare, which learns its rank later) reads the generations its dead
predecessor left. The folder outlives every trainer and is removed by the agent when
the job ends, normally or not (:func:`remove_root`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from mnemosyne.core.env import MNEMOSYNE_SNAPSHOT_DIR, MNEMOSYNE_SNAPSHOT_EVERY
from mnemosyne.core.errors import ConfigError
from mnemosyne.core.files import check_private_dir, private_dir

__all__ = ["holder_path", "remove_root", "snapshot_env", "snapshot_root"]

logger = logging.getLogger(__name__)


def snapshot_root(job_id: str, node: int) -> Path:
    """The folder of node ``node``'s holders for job ``job_id`` (``/dev/shm`` when it exists).

    One folder per node: several agents of one job on one host (tests) never remove
    each other's holders.
    """
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() else Path(tempfile.gettempdir())
    return base / f"mnemosyne-{job_id}.n{node}"


def holder_path(root: str | os.PathLike[str], rank: int) -> Path:
    """Rank ``rank``'s holder in ``root`` (its slots are ``r<rank>.0`` and ``r<rank>.1``)."""
    return Path(root) / f"r{rank}"


def snapshot_env(job_id: str, node: int, every: int) -> dict[str, str]:
    """Environment for a child of the agent: the holder folder, and ``every`` when snapshots are on.

    The folder is always named (``init(snapshot_every=N)`` may turn snapshots on in the
    script); it is created here (mode 0700) only when ``every`` > 0, else by the first
    trainer that snapshots.

    Raises:
        ConfigError: The folder exists but is not this user's own with mode 0700.
    """
    root = snapshot_root(job_id, node)
    env = {MNEMOSYNE_SNAPSHOT_DIR: str(root)}
    if every > 0:
        private_dir(root, "snapshot folder")
        env[MNEMOSYNE_SNAPSHOT_EVERY] = str(every)
    return env


def remove_root(job_id: str, node: int) -> None:
    """Remove node ``node``'s holder folder of ``job_id`` with every holder in it (the job ended).

    A folder that is not this user's own private one is left alone (and logged).
    """
    root = snapshot_root(job_id, node)
    if not root.exists() and not root.is_symlink():
        return
    try:
        check_private_dir(root, "snapshot folder")
    except ConfigError as exc:
        logger.warning("not removing %s", exc)
        return
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(root)
