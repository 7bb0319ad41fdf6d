"""One trainer's recovery, as a flat sequence of phases (called by :class:`~mnemosyne.jit.runtime.Job`).

An attempt recovers one membership epoch: adopt the newest epoch, check this process is
still a member, follow a "checkpoint and exit" order, then

1. ``repair``: the backend makes the epoch's communicator (rebuild, shrink, grow, join
   or create, :meth:`~mnemosyne.core.comm.CommBackend.repair`);
2. ``agree``: every member publishes its last committed step (the donors hold the top);
3. ``transfer``: donors send their state to the receivers;
4. ``resume``: a barrier, then everyone continues at the agreed step.

Whatever interrupts an attempt (a newer epoch, a member that died before the agent told
us) starts the next attempt at a newer epoch; any other error is raised. What one
attempt's waits and exchanges need travels as one :class:`RecoveryContext`.

Also here, the job's other ways in and out of training: :func:`resume_from` (a
checkpoint, before the first step), :func:`checkpoint_and_exit` (the agent's order) and
:func:`finish` (every member reached the last step).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from mnemosyne.core.comm import Communicator
from mnemosyne.core.errors import CommError, ConfigError, RecoveryError, StateLostError
from mnemosyne.core.events import EventKind, phase
from mnemosyne.jit import _keys
from mnemosyne.jit._gradsync import GradSync
from mnemosyne.jit._protocol import EXIT_CKPT, EXIT_CKPT_FAILED, EXIT_REPLACED, read_record
from mnemosyne.jit._recovery import NO_STATE, Agreement, Rendezvous, agree, joins, transfer, wait_key
from mnemosyne.jit.data import assign_data_ranks
from mnemosyne.jit.inject import InjectedFault

if TYPE_CHECKING:
    from mnemosyne.jit.runtime import Job

__all__ = ["RecoveryContext", "checkpoint_and_exit", "finish", "recover", "resume_from"]


@dataclass(frozen=True)
class RecoveryContext:
    """One recovery attempt: the epoch it recovers and what every wait in it needs (``rv``)."""

    rv: Rendezvous

    @property
    def epoch(self) -> int:
        """The membership epoch this attempt recovers."""
        return self.rv.epoch


def _rendezvous(job: Job, epoch: int, timeout: float | None = None) -> Rendezvous:
    return Rendezvous(job.store, epoch, job.rank, job._interrupt, job.timeout if timeout is None else timeout)


def recover(job: Job, first: bool) -> None:
    """Recover ``job`` (``first``: the process's start) up to the newest epoch."""
    t0 = time.perf_counter()
    notice = job._watch.notice
    if not first:
        job.recoveries += 1
        abort_s = t0 - notice if notice is not None else 0.0
        job.log.emit(EventKind.PHASE, "abort", abort_s, ok=True, step=job._st.started)
    if job._gradsync is not None:
        job._gradsync.close()
    job._gradsync = None
    min_epoch = job.epoch if first else job.epoch + 1
    while True:
        ctx = RecoveryContext(_rendezvous(job, job._adopt(min_epoch)))
        ranks = _membership(job, ctx)
        try:
            plan = _attempt(job, ctx, ranks, first)
        except StateLostError as exc:  # every member sees it: the agent stops the job
            job._die_of_exception(job._st.started, exc)
        except Exception as exc:
            # A recovery that another failure interrupts must start over at the next epoch,
            # whatever the symptom (a peer's socket, a store wait, torch's RuntimeError):
            # seen when a replacement's first transfer lost its donor before the agent had
            # published the next epoch.
            if job._watch.newer(ctx.rv.store, ctx.epoch):
                job.logger.info("recovery of epoch %d interrupted: %s", ctx.epoch, exc)
            elif not isinstance(exc, CommError):  # CommError: a member died before the agent told us
                raise
            min_epoch = ctx.epoch + 1
            continue
        _resumed(job, plan, ranks, first, t0)
        return


def _membership(job: Job, ctx: RecoveryContext) -> list[int]:
    """The epoch's record (read once): exit if replaced, follow a checkpoint order; the members."""
    if job._record.epoch != ctx.epoch:
        job._record = read_record(ctx.rv.store, ctx.epoch, ctx.rv.timeout)
    members = job._record.membership
    if members.members.get(ctx.rv.rank) != job._member:
        job.logger.warning("replaced in epoch %d (holder now %s); exiting", ctx.epoch,
                           members.members.get(ctx.rv.rank))
        job._exit(EXIT_REPLACED)
    job._set_pos(job.next_step, "recovery", coll=True)
    order = job._record.ckpt
    if order is not None:
        checkpoint_and_exit(job, ctx.epoch, {"dir": order.dir, "ranks": list(order.ranks),
                                             "failed": list(order.failed)})
    return list(members.ranks)


def _attempt(job: Job, ctx: RecoveryContext, ranks: list[int], first: bool) -> Agreement:
    with phase(job.log, "repair", first=first, backend=job.backend_name) as t:
        comm, how = _repair(job, ctx, ranks, first)
        t.fields.update(how=how, comm_epoch=comm.epoch)
        if job._watch.install(comm, ctx.epoch):
            comm.abort("a newer epoch appeared while building")
    committed = NO_STATE if job._st.torn else job.committed
    with phase(job.log, "agree") as t:
        plan = agree(ctx.rv, ranks, committed, job._st.started, reattached=job._st.reattached,
                     snaps=job._snap.report(committed))
        t.fields.update(top=plan.top, donors=plan.donors, receivers=plan.receivers, partial=plan.partial,
                        source=plan.source)
    job._snap.after_agree(plan)  # source "snapshot": every member loads its own generation of plan.top
    try:
        job.injector.maybe_fire(plan.resume_step, "recovery")
    except InjectedFault as exc:
        job._die_of_exception(job._st.started, exc)
    with phase(job.log, "transfer", first=first) as t:
        info: dict[str, Any] = {}
        xcomm, xplan, xrv = comm, plan, ctx.rv
        if job._mesh is not None:  # a shard's state moves inside its replicate group only
            xcomm, xplan, tag = job._mesh.replica_plan(plan)
            xrv = job._mesh.scoped(ctx.rv, tag)
            t.fields.update(group=tag)
        received, nbytes = transfer(xcomm, xrv, xplan, job.device, job._state,
                                    local=job._local_state if job.proxy is not None else None, report=info)
        t.fields.update(bytes=nbytes, donors=len(xplan.donors), receivers=len(xplan.receivers),
                        role=info["role"] if info["role"] != "none" else "donor")
        if job.proxy is not None:
            t.fields.update(kept_bytes=info["kept_bytes"], heavy_bytes=info["heavy_bytes"])
    if received is not None:
        if job.proxy is not None:
            # Loading replaces the optimizer's state tensors: put the received
            # state back into the arena, committed as the agreed step.
            job.proxy.store(plan.top, functools.partial(job._load, received))
        else:
            job._load(received)
    with phase(job.log, "resume", first=first):
        comm.barrier()
    return plan


def _repair(job: Job, ctx: RecoveryContext, ranks: list[int], first: bool) -> tuple[Communicator, str]:
    """The epoch's communicator, from the current one where the backend can; and how it was made.

    With mnemosyne-ccl the record names the epoch of ccl's communicator family to build
    (the agent's choice); the fallback builds a group per membership epoch.
    """
    old, job._comm = job._comm, None
    target = job._record.comm_epoch if job._ccl else ctx.epoch
    if target is None:
        msg = f"epoch record {ctx.epoch} names no mnemosyne-ccl communicator epoch (a torch-only agent published it?)"
        raise RecoveryError(msg)
    rv = ctx.rv
    if job._mesh is not None:  # FSDP2/HSDP: repair only the groups that need it (mnemosyne.jit._mesh)
        mcomm, groups = job._mesh.repair(rv, dict(job._record.membership.members))
        job.log.emit(EventKind.INFO, "mesh_repair", None, **groups)
        return mcomm, "mesh"  # type: ignore[return-value]
    # Every rank lost at once: no member holds a communicator to join (ccl's join would wait forever).
    joining = joins(rv, ranks, first and rv.epoch > 0) if job._ccl else first and rv.epoch > 0
    comm = job._backend.repair(old, rv.store, rv.rank, ranks, epoch=target, joining=joining,
                               timeout=rv.timeout, interrupt=rv.interrupt)
    return comm, job._backend.last_repair


def _resumed(job: Job, plan: Agreement, ranks: list[int], first: bool, t0: float) -> None:
    """The job continues at the agreed step, with a fresh gradient layout over the new communicator."""
    job.committed = plan.top
    job.next_step = plan.resume_step
    job._st = job._st.recovered()
    # Divide by the data-parallel world, not by the members present: while shrunk,
    # hosts' gradients hold several ranks' micro-batches (identical to comm.size otherwise).
    if job._mesh is None:  # FSDP2 reduces its own gradients
        job._gradsync = GradSync(list(job.model.parameters()), job.bucket_bytes, world_size=job.world_size,
                                 comm=job._comm, on_launch=job._on_launch)
    job.data_ranks = assign_data_ranks(job.world_size, ranks)[job.rank]
    job.members = list(ranks)
    job._set_pos(job.next_step, "boundary")
    started = job._st.started
    redone = max(0, started - plan.resume_step + 1) if started >= 0 else 0
    job.log.emit(EventKind.RECOVERED, "start" if first else "recovered", time.perf_counter() - t0,
                 resume_step=plan.resume_step, started=started, steps_redone=redone, source=plan.source,
                 members=ranks, data_ranks=job.data_ranks,
                 role="receiver" if job.rank in plan.receivers else "donor",
                 max_started=max(plan.started.values(), default=-1))
    job._st = job._st.idle()


def resume_from(job: Job, path: str) -> None:
    """Load the checkpoint ``path`` (verified first) and continue after its step.

    Every rank loads it, so the first agreement finds every rank at the same step
    and no state is transferred. A replacement process (start epoch > 0) does not
    load it: it receives the current state from donors as usual.
    """
    from mnemosyne.jit import ckpt

    with phase(job.log, "resume_load", path=path) as t:
        state, manifest = ckpt.load(path, template=job._state())
        if int(manifest["world_size"]) != job.world_size:
            msg = (f"checkpoint {path} was taken by a job of {manifest['world_size']} ranks; this job has "
                   f"{job.world_size} (resume with --nproc-per-node {manifest['world_size']})")
            raise ConfigError(msg)
        if job.proxy is not None:
            job.proxy.store(int(manifest["step"]), lambda: job._load(state))
        else:
            job._load(state)
        job.committed = int(manifest["step"])
        job.next_step = job.committed + 1
        t.fields.update(step=job.committed)
    job.logger.info("resumed from %s at step %d", path, job.next_step)


def checkpoint_and_exit(job: Job, epoch: int, order: dict[str, Any]) -> NoReturn:
    """The agent ordered a just-in-time checkpoint: agree, let the donors write it, exit.

    Only the store is used (no communicator: a member is gone). The donors (ranks
    holding the highest committed step) share the writing; the others just exit.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    from mnemosyne.jit import ckpt

    ranks = [int(r) for r in order["ranks"]]
    committed = NO_STATE if job._st.torn else job.committed
    code = EXIT_CKPT
    path = Path(order["dir"])
    try:
        with phase(job.log, "agree", ckpt=True) as t:
            plan = agree(_rendezvous(job, epoch), ranks, committed, job._st.started, reattached=job._st.reattached)
            t.fields.update(top=plan.top, donors=plan.donors, receivers=plan.receivers)
        if plan.top >= 0 and job.rank in plan.donors:
            path = Path(order["dir"]) / ckpt.checkpoint_name(plan.top)
            job.injector.maybe_fire(plan.top, "checkpoint")
            with phase(job.log, "ckpt", step=plan.top, path=str(path), writers=plan.donors) as t:
                ckpt.write(path, job._state(), step=plan.top, rank=job.rank, world_size=job.world_size,
                           store=job.store.prefixed(_keys.jit_ckpt(epoch)), writer_ranks=plan.donors,
                           meta={"seed": job.seed, "epoch": epoch, "job": job.job_id},
                           timeout=job.timeout)
                mine = path / f"shard-{job.rank:05d}"
                t.fields.update(bytes=sum(p.stat().st_size for p in mine.rglob("*") if p.is_file()))
        elif plan.top < 0:
            job.logger.warning("checkpoint ordered but no step was committed: nothing to write")
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        code = EXIT_CKPT_FAILED
        cause = _ckpt_failure_cause(exc, path)
        job.logger.error("just-in-time checkpoint failed: %s", cause)
        job.log.emit(EventKind.INFO, "ckpt_failed", path=str(path), cause=cause)
        # A half-written staging directory would keep the disk full: never taken for good.
        for leftover in path.parent.glob(f"{path.name}{ckpt.STAGING_MARK}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    job.log.emit(EventKind.INFO, "trainer_ckpt_exit", committed=job.committed, code=code)
    job._exit(code)


def finish(job: Job) -> bool:
    """Wait until every member of the current epoch finished; False if a recovery is needed first.

    A shrunk job waits for the members present only; a grow epoch published while
    waiting interrupts the wait, and the recovery hands the final state to the newcomer.
    """
    job._set_pos(job.next_step, "finish", coll=True)
    job.store.set(_keys.done(job.rank), str(job.epoch).encode())
    rv = _rendezvous(job, job.epoch, timeout=24 * 3600.0)
    try:
        for r in job._record.membership.ranks:
            wait_key(rv, _keys.done(r))
    except CommError:
        job._st = job._st.fail(forget_started=True)
        return False
    return True


def _ckpt_failure_cause(exc: BaseException, path: Path) -> str:
    """Name why a checkpoint write failed: ``disk full at PATH`` when it was ENOSPC.

    DCP wraps a writer's error (``CheckpointException.failures``), and torch's zip writer
    reports a full disk as "unexpected pos" rather than ENOSPC: the free space of the
    target's file system decides then.
    """
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 50:
        e = todo.pop()
        if e in seen:
            continue
        seen.append(e)
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        for f in (getattr(e, "failures", None) or {}).values():
            todo += [f[0] if isinstance(f, tuple) else f] if isinstance(f, (tuple, BaseException)) else []
    full = any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in seen)
    if not full:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        with contextlib.suppress(OSError):
            vfs = os.statvfs(probe)
            full = vfs.f_bavail * vfs.f_frsize < (1 << 20)
    if full:
        return f"disk full at {path} (no space left on its file system; the partial checkpoint was removed)"
    return f"{type(exc).__name__}: {exc}"
