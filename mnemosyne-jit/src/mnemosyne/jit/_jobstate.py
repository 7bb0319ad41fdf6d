"""What a trainer's state is, for transfer, checkpoints and snapshots: one place for every caller.

``state(job)``: model and optimizer (data parallel: their ``state_dict``; a mesh job:
its local shards, :meth:`mnemosyne.jit._mesh.JobMesh.state`), the scheduler's and each
``extra`` object's ``state_dict``. ``load(job, state)`` puts such a state back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mnemosyne.jit.runtime import Job

__all__ = ["load", "state"]


def state(job: Job) -> dict[str, Any]:
    """The state of ``job`` (references to its tensors, not copies)."""
    out: dict[str, Any] = ({"model": job.model.state_dict(), "optim": job.optimizer.state_dict()}
                           if job._mesh is None else job._mesh.state(job.model, job.optimizer))
    if job.scheduler is not None:
        out["sched"] = job.scheduler.state_dict()
    out["extra"] = {name: obj.state_dict() for name, obj in job.extra.items()}
    return out


def load(job: Job, st: dict[str, Any]) -> None:
    """Load ``st`` (as made by :func:`state`, possibly on another rank) into ``job``."""
    if job._mesh is not None:
        job._mesh.load(job.model, job.optimizer, st)
    else:
        job.model.load_state_dict(st["model"])
        job.optimizer.load_state_dict(st["optim"])
    if job.scheduler is not None:
        job.scheduler.load_state_dict(st["sched"])
    for name, obj in job.extra.items():
        obj.load_state_dict(st["extra"][name])
