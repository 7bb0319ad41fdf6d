"""The training-side runtime: wrap model and optimizer once, iterate steps, heal in place.

Usage (launched with ``mnemo launch``)::

    job = mnemosyne.jit.init(model, optimizer, scheduler=scheduler)
    for step in job.steps(loader, max_steps=1000):
        with step:
            loss = loss_fn(model(step.batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    job.close()

What happens underneath, per step ``k``: the batch of step ``k`` is fetched, the RNGs are
set to the state derived from (seed, rank, k), the body runs; during backward each
fixed flat bucket of gradients (a deterministic layout, see
:mod:`mnemosyne.jit._gradsync`) is all-reduced asynchronously as soon as its last
gradient is accumulated; ``optimizer.step()`` first waits for them (the average is then
in ``.grad``, a view into its bucket), then updates; leaving the ``with`` block commits
step ``k`` (a counter; the watchdog thread turns it into a heartbeat).

Gradient accumulation: a step that runs several backward passes iterates
``step.micro_batches()`` or wraps every backward but the last in ``with job.no_sync():``
(as with DDP); only the last one launches reductions.

When a peer fails, the agent publishes a new membership epoch; the watchdog aborts the
communicator; the blocked collective raises inside the ``with`` block, which swallows
it, discards the partial step (gradients), and the iterator runs recovery: rebuild the
communicator for the new epoch, agree on committed steps, receive state from donors if
behind, and resume at the agreed step. Healthy processes never exit.

An exception raised by user code inside a step is reported to the agent (store and event
log) and the process exits with :data:`EXIT_EXCEPTION`; the agent replaces the rank.

Shrink to continue (``mnemo launch --shrink``): while a failed rank has no replacement
yet, the membership lacks it; each missing data rank is hosted by a present member
(:func:`~mnemosyne.jit.data.assign_data_ranks`), which runs that rank's batch too, by
gradient accumulation: iterate ``step.micro_batches()`` instead of reading
``step.batch``. Gradients are summed over every micro-batch of every member and divided
by the data-parallel world size, so the global batch and the average stay those of the
full job.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NoReturn

import numpy as np
import torch

from mnemosyne.core.comm import CommBackend, Communicator
from mnemosyne.core.env import (
    MNEMOSYNE_EPOCH,
    MNEMOSYNE_EVENT_LOG,
    MNEMOSYNE_INJECT,
    MNEMOSYNE_JOB_ID,
    MNEMOSYNE_PROXY_SOCKET,
    MNEMOSYNE_RANK,
    MNEMOSYNE_RESUME,
    MNEMOSYNE_SHRINK,
    MNEMOSYNE_STORE_ADDR,
    MNEMOSYNE_TOKEN,
    MNEMOSYNE_WORLD_SIZE,
    env_int,
    env_str,
)
from mnemosyne.core.errors import CommError, ConfigError, MnemosyneError, RecoveryError
from mnemosyne.core.events import EventKind, EventLog
from mnemosyne.core.log import ContextAdapter
from mnemosyne.core.state import Stateful
from mnemosyne.jit import _jobstate, _keys
from mnemosyne.jit._epochs import EpochWatch
from mnemosyne.jit._gradsync import DEFAULT_BUCKET_BYTES, GradSync
from mnemosyne.jit._mesh import job_mesh
from mnemosyne.jit._protocol import EXIT_CKPT, EXIT_EXCEPTION, read_record
from mnemosyne.jit._recover import finish, recover, resume_from
from mnemosyne.jit._recovery import NO_STATE
from mnemosyne.jit._select import backend_label, comm_backend
from mnemosyne.jit._snapjob import SnapJob
from mnemosyne.jit._state import flatten
from mnemosyne.jit._step import Step, _rng_seed
from mnemosyne.jit._stepstate import Position, StepState
from mnemosyne.jit._store import connect_job_store
from mnemosyne.jit._watchdog import Watchdog
from mnemosyne.jit.data import DataFeed
from mnemosyne.jit.inject import Injector, parse_plans

__all__ = ["EXIT_CKPT", "EXIT_EXCEPTION", "Job", "Step", "init", "joining"]

logger = logging.getLogger(__name__)




class Job:
    """One trainer's view of a recoverable data-parallel job (create with :func:`init`).

    Args:
        model: The model (one replica per rank; not wrapped in DDP).
        optimizer: Its optimizer; gradients are averaged when ``step()`` is called.
        scheduler: Optional LR scheduler (its state is recovered).
        seed: Base of the per-step RNG seeds (torch CPU/CUDA, numpy, python); None
            leaves the RNGs alone (they are then not covered by recovery).
        extra: Further state to recover, by name: objects with ``state_dict`` and
            ``load_state_dict`` whose state is identical on every rank.
        bucket_bytes: Gradient bucket size.
        log_steps: Write a ``step`` event per committed step (benchmarks, demo).
        timeout: Bound, in seconds, of every wait during recovery.
        snapshot_every: Snapshot the state in memory every N committed steps, for when every
            rank loses it (:mod:`mnemosyne.jit._snapjob`); None: ``mnemo launch --snapshot-every``.
        mesh: An FSDP2 model's mesh from :func:`mnemosyne.jit.device_mesh` (see :mod:`mnemosyne.jit._mesh`).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, scheduler: Any = None,
                 seed: int | None = 0, extra: Mapping[str, Stateful] | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, log_steps: bool = False, timeout: float = 120.0,
                 mesh: Any = None, snapshot_every: int | None = None) -> None:
        job_id = env_str(MNEMOSYNE_JOB_ID)
        addr = env_str(MNEMOSYNE_STORE_ADDR)
        rank = env_int(MNEMOSYNE_RANK)
        world = env_int(MNEMOSYNE_WORLD_SIZE)
        if not job_id or not addr or rank is None or world is None:
            msg = ("mnemosyne.jit.init: this process was not started by the Mnemosyne launcher "
                   f"({MNEMOSYNE_JOB_ID}, {MNEMOSYNE_STORE_ADDR}, {MNEMOSYNE_RANK}, {MNEMOSYNE_WORLD_SIZE} "
                   "must be set); run it with `mnemo launch --nproc-per-node N script.py`")
            raise ConfigError(msg)
        self.job_id = job_id
        self.rank = rank
        self.world_size = world
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.seed = seed
        self.extra = dict(extra or {})
        self.bucket_bytes = bucket_bytes
        self.log_steps = log_steps
        self.timeout = timeout
        #: The job runs with ``mnemo launch --shrink`` (the step body must use micro_batches()).
        self.shrink = env_str(MNEMOSYNE_SHRINK) == "1"
        #: Data ranks this member runs per step in the current epoch: its own, then the
        #: missing ranks it hosts while the job is shrunk.
        self.data_ranks: list[int] = [rank]
        #: Logical ranks present in the current epoch (fewer than ``world_size`` while shrunk).
        self.members: list[int] = list(range(world))
        start_epoch = env_int(MNEMOSYNE_EPOCH, 0) or 0
        token = env_str(MNEMOSYNE_TOKEN)
        self.store = connect_job_store(addr, job_id, token)
        self.log = EventLog(env_str(MNEMOSYNE_EVENT_LOG), job_id, rank, start_epoch)
        self.logger = ContextAdapter(logger, job_id, rank, start_epoch)
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self._backend: CommBackend
        self._ccl, self._backend = comm_backend(self.device.type, self.logger)
        #: ``ccl-gloo``, ``torch-gloo``, ... (recorded in the events).
        self.backend_name = backend_label(self._ccl, self.device.type)
        self.logger.info("communicator: %s", self.backend_name)
        #: The epoch record of ``self.epoch`` (read once per epoch).
        self._record = read_record(self.store, start_epoch, timeout)
        self._member = self._record.membership.members.get(rank)
        self.epoch = start_epoch
        self.committed = NO_STATE
        self.next_step = 0
        self.recoveries = 0
        self._gradsync: GradSync | None = None
        self._mesh = job_mesh(mesh).attach(model, self._on_launch) if mesh is not None else None  # FSDP2/HSDP
        #: Epochs seen by the watchdog, the current communicator, the recovery interrupt.
        self._watch = EpochWatch(start_epoch, self.logger)
        self._interrupt = self._watch.interrupt
        #: Where the current step stands (one value; see :mod:`mnemosyne.jit._stepstate`).
        self._st = StepState(pos=Position(committed=NO_STATE, epoch=start_epoch))
        self._step_start = 0.0
        self._closed = False
        #: The device proxy holding this rank's model and optimizer state (``mnemo launch
        #: --proxy``), or None. Adopted before the first recovery: a replacement whose
        #: arena is committed at step s re-attaches to it and reports s.
        self.proxy: Any = None
        socket = env_str(MNEMOSYNE_PROXY_SOCKET)
        if socket:
            from mnemosyne.jit._proxy import ProxyLink

            self.proxy = ProxyLink(socket, model, optimizer)
            if self.proxy.step != NO_STATE:
                self.committed = self.proxy.step
                self.next_step = self.committed + 1
                self._st = self._st.reattach()
            self.logger.info("device proxy %s: arena %s at step %d%s", socket, self.proxy.status.value,
                             self.proxy.arena_step, " (re-attached)" if self._st.reattached else "")
        self.injector = Injector(rank, self.store, self.log)
        self.injector.add(parse_plans(env_str(MNEMOSYNE_INJECT, "") or ""))
        self._hooks = [optimizer.register_step_pre_hook(self._pre_step),
                       optimizer.register_step_post_hook(self._post_step)]
        self.watchdog = Watchdog(connect_job_store(addr, job_id, token), rank, start_epoch, self._watch.on_epoch,
                                 self._position, self.injector)
        self.watchdog.start()
        self.log.emit(EventKind.INFO, "trainer_start", member=self._member, start_epoch=start_epoch,
                      backend=self.backend_name, **(self.proxy.describe() if self.proxy is not None else {}))
        self._snap = SnapJob(self, snapshot_every)  # before the first agreement: it may restore
        resume = env_str(MNEMOSYNE_RESUME)
        if resume and start_epoch == 0:
            resume_from(self, resume)
        self._recover(first=True)

    @property
    def _comm(self) -> Communicator | None:
        """The current communicator (None while one is being built)."""
        return self._watch.comm

    @_comm.setter
    def _comm(self, comm: Communicator | None) -> None:
        self._watch.comm = comm

    def _exit(self, code: int) -> NoReturn:
        """The one way a trainer leaves early (exit codes: :mod:`mnemosyne.jit._protocol`).

        ``os._exit``: no interpreter teardown, which could block on a communicator's
        threads or a peer that is gone; the event log and the standard streams are flushed.
        """
        self.log.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    # ----------------------------------------------------------------- steady state
    def _position(self) -> dict[str, Any]:
        return self._st.pos.as_dict()

    def _set_pos(self, step: int, where: str, coll: bool = False) -> None:
        self._st = self._st.at(step, where, coll, self.committed, self.epoch)

    def steps(self, data: Iterable[Any], max_steps: int,
              data_for_rank: Callable[[int], Iterable[Any]] | None = None) -> Iterator[Step]:
        """Yield one :class:`Step` per training step, from the recovered position to ``max_steps``.

        Each step must be used as ``with step:``. After a failure the iterator recovers
        and yields the step to redo (the same index, or the next one when this rank was
        behind the donors). Returns once every member finished ``max_steps`` steps.

        Args:
            data: This rank's loader (sized, re-iterable; see :mod:`mnemosyne.jit.data`).
            max_steps: Number of steps of the whole training.
            data_for_rank: Returns the loader of data rank ``d``; used while the job is
                shrunk to run a missing rank's batches (``mnemo launch --shrink``). Not
                needed when ``data`` is a DataLoader over a
                :class:`~mnemosyne.jit.data.ResumableSampler` (it is derived).

        Raises:
            ConfigError: A step was not entered with ``with``; a step body left
                ``step.micro_batches()`` before its end; or the job runs with ``--shrink``
                and another rank's loader can be neither derived from ``data`` nor
                obtained from ``data_for_rank``.
        """
        feed = DataFeed(self.rank, data, data_for_rank)
        if self.shrink:
            # Fail at the start, not at the first failure, when a shrunk epoch could not run.
            feed.loader((self.rank + 1) % self.world_size)
        while True:
            if self._st.needs_recovery:
                self._recover()
            k = self.next_step
            if k >= max_steps:
                if finish(self):
                    return
                continue
            batch = feed.batch(self.rank, k)
            self._seed_rngs(self.rank, k)
            step = Step(self, k, batch, self.data_ranks, functools.partial(feed.batch, step=k))
            self._step_start = time.perf_counter()
            yield step
            if not step.entered:
                msg = "each step from Job.steps() must be run as `with step: ...` (it marks the step boundary)"
                raise ConfigError(msg)
            if step.failed:
                self._st = self._st.fail()
                continue
            if not step.micro_batches_done:
                msg = (f"step {k}: the step body stopped iterating step.micro_batches() after data ranks "
                       f"{step.ran} of {step.data_ranks}; every micro-batch must run before the step ends")
                raise ConfigError(msg)
            self._commit(k, step.ran)

    def _seed_rngs(self, data_rank: int, k: int) -> None:
        """Set torch (CPU and CUDA), numpy and Python RNGs to data rank ``data_rank``'s state at step ``k``."""
        if self.seed is None:
            return
        s = _rng_seed(self.seed, data_rank, k)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % (2**32))

    def _enter_step(self, k: int) -> None:
        self._snap.step_start()
        self._st = self._st.enter(k, all(p.grad is None for p in self.model.parameters()))
        self._set_pos(k, "forward")
        if self._gradsync is not None:
            self._gradsync.begin()
        try:
            self.injector.maybe_fire(k, "forward")
        except Exception as exc:  # raised in __enter__, so __exit__ would not see it
            self._die_of_exception(k, exc)

    def sync_gradients(self) -> None:
        """Average gradients now (``optimizer.step()`` calls it when it was not called yet).

        Call it yourself between backward and the optimizer when something there needs the
        averaged gradients (gradient clipping, a GradScaler's unscale).
        """
        k = self._st.started
        if self._st.synced == k:
            return
        if (self._gradsync is None and self._mesh is None) or self._comm is None:
            msg = "gradient sync outside a step or before the job is ready"
            raise RecoveryError(msg)
        self._set_pos(k, "allreduce", coll=True)
        # Reductions launched during backward may still be in flight here.
        self.injector.maybe_fire(k, "allreduce")
        # One wait for every bucket (each wait returns once its reduction completed, on
        # the device too, or raises if the communicator was aborted meanwhile).
        self._mesh.consensus() if self._mesh is not None else self._gradsync.sync()  # type: ignore[union-attr]
        if self._comm.aborted:
            msg = f"communicator of epoch {self.epoch} aborted during the gradient reduction"
            raise CommError(msg)
        self._st = self._st.synced_now()
        self._set_pos(k, "optimizer")

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without reducing them (as DDP's ``no_sync``).

        Wrap every backward pass of a step but the last one; the last backward, outside
        this block, launches the reductions of the accumulated gradients. Not needed with
        ``step.micro_batches()``, which does the same.
        """
        gs = self._gradsync
        if gs is not None:
            gs.final = False
        try:
            yield
        finally:
            if gs is not None and self._gradsync is gs:
                gs.final = True

    def _final_backward(self, final: bool) -> None:
        """``step.micro_batches()``: whether the coming backward is the step's last."""
        if self._gradsync is not None:
            self._gradsync.final = final

    def _on_launch(self, i: int, in_backward: bool) -> None:
        """A bucket's all-reduce was launched (from a gradient hook, or at the wait)."""
        if i == 0 and in_backward:
            # The first reduction is in flight and backward goes on.
            self._set_pos(self._st.started, "backward")
            self.injector.maybe_fire(self._st.started, "backward")

    def _pre_step(self, *_: Any) -> None:
        self.sync_gradients()
        if self.proxy is not None:
            # From here until the commit marker, the arena is torn (a crash inside the
            # update leaves a state that is neither step k-1's nor step k's).
            self.proxy.begin(self._st.started)

    def _post_step(self, *_: Any) -> None:
        self._st = self._st.applied_now()
        self.injector.maybe_fire(self._st.started, "optimizer")
        if self.proxy is not None:
            self.proxy.commit(self._st.started)

    def _commit(self, k: int, ran: list[int]) -> None:
        dt = time.perf_counter() - self._step_start
        self.committed = k
        self.next_step = k + 1
        self._set_pos(k + 1, "boundary")
        if self.log_steps:
            self.log.emit(EventKind.STEP, "step", dt, step=k, data_ranks=ran)
        self._snap.committed(k)

    # ----------------------------------------------------------------- failures
    def _is_comm_failure(self, exc: BaseException) -> bool:
        if isinstance(exc, CommError):
            return True
        # Anything raised while the membership is changing is a consequence of it
        # (e.g. a torch error from a transport whose peer vanished).
        return self._interrupt.is_set() or (self._comm is not None and self._comm.aborted)

    def _discard(self, k: int, exc: BaseException) -> None:
        """Drop the partial step ``k`` (its gradients); note a torn update."""
        # The optimizer may have updated this replica in step k but the step did not
        # finish: its state is then neither step k-1's nor a committed step k's (torn).
        self._st = self._st.discard(k)
        if self._gradsync is not None:
            # Reductions of this step may still be in flight: no gradient may stay a view
            # of buffers that abandoned work can write (a new GradSync comes with the repair).
            self._gradsync.close()
        if self._mesh is not None:
            self._mesh.discard(self.model)
        for p in self.model.parameters():
            if p.grad is not None:
                if self._st.grads_were_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        self._set_pos(k, "aborted", coll=True)
        self.logger.info("step %d aborted: %s", k, exc)

    def _die_of_exception(self, k: int, exc: BaseException) -> None:
        """Report an exception of user code to the agent and exit (the agent replaces us)."""
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        sys.stderr.write(text)
        info = {"kind": "exception", "type": type(exc).__name__, "message": str(exc)[:500], "step": k,
                "phase": self._st.pos.phase}
        try:
            self.store.set(_keys.report(self.rank, os.getpid()), json.dumps(info).encode())
            self.log.emit(EventKind.DETECT, "exception", step=k, error=f"{type(exc).__name__}: {exc}"[:500])
        except MnemosyneError:
            pass  # the store is gone: the agent still sees the exit
        self._exit(EXIT_EXCEPTION)

    # ----------------------------------------------------------------- recovery
    def _adopt(self, min_epoch: int) -> int:
        """Wait for an epoch >= ``min_epoch`` and make the newest one current."""
        e = self._watch.adopt(min_epoch, self.store, self.timeout)
        self.epoch = self.log.epoch = self.logger.epoch = e
        return e

    def _state(self) -> dict[str, Any]:
        return _jobstate.state(self)

    def _local_state(self) -> tuple[Any, list[torch.Tensor], list[bool]]:
        """This rank's own state, flattened, and which tensors its device proxy holds."""
        tensors: list[torch.Tensor] = []
        skel = flatten(self._state(), tensors)
        return skel, tensors, self.proxy.backed(tensors)

    def _load(self, state: dict[str, Any]) -> None:
        _jobstate.load(self, state)

    def _recover(self, first: bool = False) -> None:
        recover(self, first)  # the phases: mnemosyne.jit._recover

    def close(self) -> None:
        """Stop the watchdog and close the event log (call once, after the last step)."""
        if self._closed:
            return
        self._closed = True
        self.log.emit(EventKind.INFO, "trainer_done", committed=self.committed, recoveries=self.recoveries)
        self.watchdog.stop()
        self.watchdog.join(timeout=2.0)
        self._set_pos(self.next_step, "closed", coll=True)
        with contextlib.suppress(MnemosyneError):
            self.watchdog.beat()  # last heartbeat: the agent stops watching this rank for hangs
        for h in self._hooks:
            h.remove()
        if self._gradsync is not None:
            self._gradsync.close()
            self._gradsync = None
        if self.proxy is not None:
            self.proxy.close()
        self._snap.close()
        self.log.close()


def joining() -> bool:
    """Whether this process joins a job already running (a replacement or a grow-back newcomer).

    Such a process gets every entry of its model's, optimizer's and scheduler's (and
    ``extra``'s) ``state_dict`` from a healthy replica or its device proxy inside
    :func:`init`, before its first step. It may therefore skip the weight
    initialization, which for a large model is most of a replacement's start-up (1.27e9
    parameters: ~12 s of CPU init, tools/bench/recovery.py on 2x H200): build the model on
    the meta device and ``to_empty`` it onto its device. What is *not* in a
    ``state_dict`` (non-persistent buffers, attributes) must still be computed as usual.
    Can be called before :func:`init`; reads the launcher's environment only.
    """
    return (env_int(MNEMOSYNE_EPOCH, 0) or 0) > 0


def init(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Job:
    """Connect to the job, synchronise this rank's state, and return its :class:`Job`.

    Called once per process, after model, optimizer (and scheduler) are built. A
    replacement process receives the current state from donors inside this call.
    See :class:`Job` for the keyword arguments.
    """
    return Job(model, optimizer, **kwargs)
