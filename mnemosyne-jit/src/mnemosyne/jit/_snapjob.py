"""The snapshot tier inside a running :class:`~mnemosyne.jit.runtime.Job` (trainer side).

With ``mnemo launch --snapshot-every N`` (or ``init(..., snapshot_every=N)``) each rank
snapshots its state into its holder (``MNEMOSYNE_SNAPSHOT_DIR/r<rank>``, named by the
agent: :mod:`mnemosyne.jit._snapdir`) every N committed steps:

* **When**: after step ``k`` commits with ``(k + 1) % N == 0`` (steps ``N-1, 2N-1, ...``:
  after every N steps run), :meth:`Snapshotter.capture <mnemosyne.jit._snapshot.Snapshotter.capture>`
  of :meth:`Job._state` at step ``k`` starts the copy in a background thread.
* **Fence**: before anything writes the captured tensors. The optimizer writes
  parameters and its state only inside ``optimizer.step()``: the fence is an optimizer
  pre-step hook, so forward and backward of step ``k+1`` overlap with the copy. A model
  with batch-norm running statistics writes buffers during forward: for such a model
  the fence is at the start of step ``k+1`` instead. (Anything else a forward pass
  writes in place in ``state_dict()`` tensors would need the same; scalars are taken at
  ``capture`` time.)
* **Recovery**: before each agreement the copy in flight is finished; a rank that holds
  no state reports the steps of its holder's verified generations (both slots, digests
  checked), and when the agreement picks a snapshot (:func:`~mnemosyne.jit._recovery.agree`)
  it loads its own generation of that step. After any agreement, generations newer than
  the agreed step are dropped: they belong to a timeline that was rolled back.

A holder whose generations are all unusable just reports nothing (the job falls back to
the old rules). Not combined with ``--proxy`` yet (snapshots are then off, with a warning).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mnemosyne.core.env import MNEMOSYNE_SNAPSHOT_DIR, MNEMOSYNE_SNAPSHOT_EVERY, env_int, env_str
from mnemosyne.core.errors import ConfigError, StateError
from mnemosyne.core.events import EventKind, phase
from mnemosyne.core.files import private_dir
from mnemosyne.jit import _snapstore
from mnemosyne.jit._recovery import NO_STATE, Agreement
from mnemosyne.jit._snapdir import holder_path
from mnemosyne.jit._snapshot import Snapshotter, decode

if TYPE_CHECKING:
    from mnemosyne.jit.runtime import Job

__all__ = ["SnapJob"]


def _writes_buffers_in_forward(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
               for m in model.modules())


class SnapJob:
    """A job's snapshots (see module doc); inert when snapshots are off.

    Args:
        job: The job (its rank, start epoch, state and logs).
        every: Snapshot period in committed steps; None takes ``MNEMOSYNE_SNAPSHOT_EVERY``
            (the launcher's ``--snapshot-every``), 0 turns snapshots off.

    Raises:
        ConfigError: ``every`` is negative, or snapshots are on but the process was not
            given a holder folder.
    """

    def __init__(self, job: Job, every: int | None) -> None:
        self.job = job
        self.every = (env_int(MNEMOSYNE_SNAPSHOT_EVERY, 0) or 0) if every is None else int(every)
        if self.every < 0:
            msg = f"snapshot_every must be >= 0 committed steps (0: off), got {self.every}"
            raise ConfigError(msg)
        self.base: Path | None = None
        self.snapper: Snapshotter | None = None
        self.fence_at = "step" if _writes_buffers_in_forward(job.model) else "optimizer"
        self._gens: dict[int, _snapstore.Generation] = {}
        self._hook: Any = None
        #: Snapshots started; seconds the training thread spent in capture() and in fences.
        self.captures = 0
        self.capture_s = 0.0
        self.fence_s = 0.0
        if self.every == 0:
            return
        if job.proxy is not None:
            job.logger.warning("snapshot_every=%d ignored: snapshots are not combined with --proxy yet", self.every)
            self.every = 0
            return
        root = env_str(MNEMOSYNE_SNAPSHOT_DIR)
        if not root:
            msg = (f"snapshot_every={self.every}: no snapshot folder ({MNEMOSYNE_SNAPSHOT_DIR} unset); "
                   "run under `mnemo launch` (which names it), or pass snapshot_every=0")
            raise ConfigError(msg)
        private_dir(root, "snapshot folder")
        self.base = holder_path(root, job.rank)
        if job.epoch == 0:
            # Nothing of this job can be in memory before its first epoch: a leftover of an
            # earlier job of the same id (its agent killed) must never be restored.
            _snapstore.remove_holder(self.base)
        self.snapper = Snapshotter(self.base)
        if self.fence_at == "optimizer":
            self._hook = job.optimizer.register_step_pre_hook(lambda *_: self.fence())

    def committed(self, k: int) -> None:
        """Step ``k`` committed: start a snapshot when ``k`` ends a period."""
        if self.snapper is None or (k + 1) % self.every:
            return
        t0 = time.perf_counter()
        self.snapper.capture(self.job._state(), k)
        self.capture_s += time.perf_counter() - t0
        self.captures += 1

    def step_start(self) -> None:
        """A step begins (the fence of a model whose forward writes buffers)."""
        if self.fence_at == "step":
            self.fence()

    def fence(self) -> None:
        """Wait until the snapshot in flight copied the tensors (a failed one is logged, not raised)."""
        if self.snapper is None:
            return
        try:
            self.fence_s += self.snapper.fence()
        except StateError as exc:
            self.job.logger.warning("%s", exc)

    def report(self, committed: int) -> list[int] | None:
        """Before an agreement: finish the copy in flight; the verified steps this rank can restore.

        Only a rank that holds no state (``committed`` is NO_STATE) reads its holder; a
        rank with live state reports nothing (it is a donor or receives from one).
        """
        self._gens = {}
        if self.snapper is None or self.base is None:
            return None
        try:
            self.snapper.wait()
        except StateError as exc:
            self.job.logger.warning("%s", exc)
        if committed != NO_STATE:
            return None
        for g in _snapstore.generations(self.base):  # newest first: the newest of a step wins
            self._gens.setdefault(g.step, g)
        return sorted(self._gens)

    def after_agree(self, plan: Agreement) -> None:
        """After the agreement: load the agreed snapshot (``plan.source == "snapshot"``); drop newer ones."""
        gens, self._gens = self._gens, {}
        if self.base is None:
            return
        dropped = _snapstore.drop_newer(self.base, plan.top)
        if dropped:
            self.job.logger.info("snapshots of steps %s dropped (the job continues after step %d)", dropped, plan.top)
        if plan.source != "snapshot":
            return
        gen = gens[plan.top]
        with phase(self.job.log, "snapshot_restore", step=plan.top, path=str(gen.path)) as t:
            step, state = decode(gen, self.job.device)
            if step != plan.top:
                msg = f"snapshot {gen.path}: metadata says step {step}, its header {plan.top}"
                raise StateError(msg)
            self.job._load(state)
            t.fields.update(bytes=len(gen.data))

    def close(self) -> None:
        """Finish the snapshot in flight, remove the hook, and record the totals (one event)."""
        if self.snapper is None:
            return
        try:
            self.snapper.close()
        except StateError as exc:
            self.job.logger.warning("%s", exc)
        if self._hook is not None:
            self._hook.remove()
        self.job.log.emit(EventKind.INFO, "snapshots", every=self.every, captures=self.captures,
                          capture_s=round(self.capture_s, 6), fence_s=round(self.fence_s, 6),
                          fence_at=self.fence_at, last_step=self.snapper.last_step,
                          last_copy_s=round(self.snapper.last_copy_s, 6))
