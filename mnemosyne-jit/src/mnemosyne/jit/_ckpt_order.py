"""The coordinator agent's side of a "checkpoint and exit" order: find, verify, report.

Once every survivor of the order exited, the job's checkpoint is the newest complete one
under the order's root that this job wrote; it is verified (the only place the
supervisor imports torch: DCP's metadata reader, loaded when an order completes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from mnemosyne.core.errors import MnemosyneError
from mnemosyne.core.events import EventKind
from mnemosyne.core.store import Store
from mnemosyne.jit import _keys
from mnemosyne.jit._ckpt_io import publish_exit
from mnemosyne.jit._protocol import EXIT_CKPT, EXIT_JOB_CKPT

__all__ = ["finish_checkpoint", "writer_exited"]

logger = logging.getLogger(__name__)


def writer_exited(store: Store, epoch: int, rank: int, returncode: int) -> None:
    """A survivor of the order of ``epoch`` exited: tell the other writers if it failed.

    An exit other than :data:`EXIT_CKPT` (killed, crashed, or ended frozen by the agent) is
    published at once, so the others stop waiting for its part and each fails naming it.
    """
    if returncode != EXIT_CKPT:
        publish_exit(store.prefixed(_keys.jit_ckpt(epoch)), rank, returncode)


def finish_checkpoint(root: Path, survivors: list[int], t0: float, codes: dict[int, int], job_id: str,
                      emit: Callable[..., object]) -> tuple[int, str]:
    """Every survivor exited after an ordered checkpoint: report it.

    Returns:
        The job's exit code (:data:`EXIT_JOB_CKPT` when the checkpoint is complete and
        verified, else 1) and, on failure, why the job was given up.
    """
    from mnemosyne.jit import ckpt

    codes = {r: c for r, c in codes.items() if r in survivors}
    # This job's checkpoint (the root may hold others' from earlier jobs).
    ours = [e.path for e in (ckpt.list_checkpoints(root) if root.is_dir() else [])
            if e.complete and ckpt.read_manifest(e.path).get("meta", {}).get("job") == job_id]
    path = ours[-1] if ours else None
    ok = path is not None and all(c == EXIT_CKPT for c in codes.values())
    if ok:
        assert path is not None
        try:
            report = ckpt.verify(path)
        except MnemosyneError as exc:
            ok = False
            logger.error("%s", exc)
        else:
            emit(EventKind.PHASE, "ckpt", time.monotonic() - t0, ok=True, path=str(path),
                 step=report.step, bytes=report.bytes)
            logger.error("job stopped: a rank failed and no replacement was allowed; checkpoint of step %d "
                         "written to %s; continue with: mnemo launch --resume %s ...",
                         report.step, path, path)
            return EXIT_JOB_CKPT, ""
    emit(EventKind.PHASE, "ckpt", time.monotonic() - t0, ok=False, codes=codes)
    why = (f"a rank failed and no replacement was allowed, and the just-in-time checkpoint into "
           f"{root} failed (trainer exit codes {codes})")
    emit(EventKind.INFO, "gave_up", why=why)
    logger.error("giving up: %s", why)
    return 1, why
