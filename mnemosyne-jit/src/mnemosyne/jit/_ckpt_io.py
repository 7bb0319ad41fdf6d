"""File and store plumbing of :func:`mnemosyne.jit.ckpt.write` (no torch).

Files: sha256 and fsync helpers. Writers: every writer of one checkpoint shares a store
view private to it. A writer that fails (an ``OSError`` from DCP's save or an ``fsync``, a full
disk, DCP's ``finish``) publishes its cause under ``fail/<rank>`` and bumps ``failed``
before it raises; every wait of every writer checks ``failed`` between polls, so the
others stop within one poll instead of waiting out their timeout, and each raises
:class:`~mnemosyne.core.errors.MultiRankError` naming every failed rank's cause.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mnemosyne.core.errors import MnemosyneError, MultiRankError, StoreTimeout
from mnemosyne.core.store import Store

__all__ = ["POLL", "causes", "describe_files", "fsync_path", "publish_exit", "publish_failure", "published", "sha256",
           "size_mismatch", "wait_keys"]

#: Seconds between two looks at the store while waiting for another writer.
POLL = 0.05
_FAILED = "failed"
_HASH_CHUNK = 1 << 20


def sha256(path: Path) -> str:
    """Hex sha256 of the file ``path``."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_files(root: Path, sub: str) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``root / sub``, by path relative to ``root``."""
    out = {}
    for p in sorted((root / sub).rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": sha256(p)}
    return out


def _fail_key(rank: int) -> str:
    return f"fail/{rank}"


def publish_failure(store: Store, rank: int, exc: BaseException) -> None:
    """Tell every writer that ``rank`` failed with ``exc`` (best effort: the store may be gone)."""
    try:
        store.set(_fail_key(rank), f"{type(exc).__name__}: {exc}"[:800].encode())
        store.add(_FAILED, 1)
    except MnemosyneError:
        pass


def publish_exit(store: Store, rank: int, returncode: int) -> None:
    """The agent's report of a writer that exited before the checkpoint was committed.

    Without it the other writers would wait for that writer's part until their timeout.
    """
    how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
    publish_failure(store, rank, ChildProcessError(f"the trainer died ({how}) while writing the checkpoint"))


def causes(store: Store, writers: Sequence[int]) -> dict[int, str]:
    """Cause published by each writer that failed so far."""
    out = {}
    for r in writers:
        if store.check([_fail_key(r)]):
            out[r] = store.get(_fail_key(r), 5.0).decode(errors="replace")
    return out


@contextlib.contextmanager
def published(store: Store, rank: int, writers: Sequence[int], what: str) -> Iterator[None]:
    """Run this writer's own work: an exception in it is published, then raised as MultiRankError.

    Raises:
        MultiRankError: The block raised; its causes name this rank's error and any other
            writer's published so far (chained to the original exception).
    """
    try:
        yield
    except (MultiRankError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise  # another writer's failure, already published; or not a failure of the work
    except BaseException as exc:  # also DCP's CheckpointException, a BaseException (e.g. its files removed
        publish_failure(store, rank, exc)  # by a writer that gave up on a dead one: its cause is named too)
        found = {**causes(store, writers), rank: f"{type(exc).__name__}: {exc}"}
        msg = f"{what}: not committed"
        raise MultiRankError(msg, found) from exc


def wait_keys(store: Store, keys: Sequence[str], writers: Sequence[int], timeout: float, what: str,
              fails: Store | None = None) -> None:
    """Wait until every key of ``keys`` is set.

    ``fails`` is the view failures are published in (default ``store``).

    Raises:
        MultiRankError: A writer published a failure meanwhile (checked every :data:`POLL` s).
        StoreTimeout: ``timeout`` seconds passed.
    """
    fails = store if fails is None else fails
    deadline = time.monotonic() + timeout
    while True:
        if fails.check([_FAILED]):
            msg = f"{what}: a writer failed; not committed"
            raise MultiRankError(msg, causes(fails, writers))
        if store.check(list(keys)):
            return
        if time.monotonic() >= deadline:
            msg = f"{what}: keys {list(keys)} not set within {timeout} s"
            raise StoreTimeout(msg)
        time.sleep(POLL)


def size_mismatch(root: Path, files: dict[str, Any]) -> str:
    """What is wrong with the listed files' presence and sizes (cheap: no hashing), or ``""``."""
    for rel, info in files.items():
        want = info.get("size") if isinstance(info, dict) else None
        try:
            got = (root / rel).stat().st_size
        except OSError:
            return f"file {rel} is missing"
        if got != want:
            return f"file {rel} is {got} bytes, expected {want} (truncated or overwritten)"
    return ""
