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
import importlib.util
import json
import logging
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnemosyne.core import plugins
from mnemosyne.core.comm import BACKENDS_ENTRY_POINT, CommBackend, Communicator
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
from mnemosyne.core.events import EventKind, EventLog, phase
from mnemosyne.core.log import ContextAdapter
from mnemosyne.core.state import Stateful
from mnemosyne.jit import _keys
from mnemosyne.jit._gradsync import DEFAULT_BUCKET_BYTES, GradSync
from mnemosyne.jit._protocol import EXIT_CKPT, EXIT_CKPT_FAILED, EXIT_EXCEPTION, EXIT_REPLACED, read_record
from mnemosyne.jit._recovery import NO_STATE, agree, transfer, wait_key
from mnemosyne.jit._select import backend_label, use_ccl
from mnemosyne.jit._state import flatten
from mnemosyne.jit._step import Step, _rng_seed
from mnemosyne.jit._store import connect_job_store
from mnemosyne.jit._watchdog import Watchdog
from mnemosyne.jit.data import DataCursor, assign_data_ranks, loader_for_rank
from mnemosyne.jit.inject import InjectedFault, Injector, parse_plans

__all__ = ["EXIT_CKPT", "EXIT_EXCEPTION", "Job", "Step", "init", "joining"]

logger = logging.getLogger(__name__)


# How long a rank that saw a communicator error waits for the agent's new epoch before
# asking for a rebuild of the same members (an error no process death explains).
_REBUILD_GRACE = 10.0


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
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, scheduler: Any = None,
                 seed: int | None = 0, extra: Mapping[str, Stateful] | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, log_steps: bool = False, timeout: float = 120.0) -> None:
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
        transport = "nccl" if self.device.type == "cuda" else "gloo"
        self._ccl = use_ccl()
        if self._ccl and transport == "nccl" and importlib.util.find_spec("nccl") is None:
            # ccl's NCCL backend needs nccl4py; torch's own NCCL group still works (on
            # ccl's authenticated store), rebuilt by every member per epoch.
            self.logger.warning("mnemosyne-ccl's NCCL backend needs nccl4py (pip install "
                                "'mnemosyne-ccl[nccl]'); using torch's ProcessGroupNCCL instead")
            self._ccl = False
        # ccl's "gloo"/"nccl", or the fallback "torch" (whose transport is its argument).
        cls = plugins.load(BACKENDS_ENTRY_POINT, transport if self._ccl else "torch")
        self._backend: CommBackend = cls() if self._ccl else cls(transport)
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
        self._comm: Communicator | None = None
        self._comm_for = -1  # membership epoch the current communicator was built for
        self._gradsync: GradSync | None = None
        self._elock = threading.Lock()
        self._known_epoch = start_epoch
        self._notice: float | None = None
        self._interrupt = threading.Event()
        self._pos: dict[str, Any] = {"step": 0, "phase": "init", "coll": True, "committed": NO_STATE,
                                     "epoch": start_epoch}
        self._synced = -1
        self._applied = -1
        self._torn = False
        self._step_start = 0.0
        self._grads_were_none = True
        self._started = -1
        self._needs_recovery = False
        self._closed = False
        #: The device proxy holding this rank's model and optimizer state (``mnemo launch
        #: --proxy``), or None. Adopted before the first recovery: a replacement whose
        #: arena is committed at step s re-attaches to it and reports s.
        self.proxy: Any = None
        self._reattached = False
        socket = env_str(MNEMOSYNE_PROXY_SOCKET)
        if socket:
            from mnemosyne.jit._proxy import ProxyLink

            self.proxy = ProxyLink(socket, model, optimizer)
            if self.proxy.step != NO_STATE:
                self.committed = self.proxy.step
                self.next_step = self.committed + 1
                self._reattached = True
            self.logger.info("device proxy %s: arena %s at step %d%s", socket, self.proxy.status.value,
                             self.proxy.arena_step, " (re-attached)" if self._reattached else "")
        self.injector = Injector(rank, self.store, self.log)
        self.injector.add(parse_plans(env_str(MNEMOSYNE_INJECT, "") or ""))
        self._hooks = [optimizer.register_step_pre_hook(self._pre_step),
                       optimizer.register_step_post_hook(self._post_step)]
        self.watchdog = Watchdog(connect_job_store(addr, job_id, token), rank, start_epoch, self._on_epoch,
                                 self._position, self.injector)
        self.watchdog.start()
        self.log.emit(EventKind.INFO, "trainer_start", member=self._member, start_epoch=start_epoch,
                      backend=self.backend_name, **(self.proxy.describe() if self.proxy is not None else {}))
        resume = env_str(MNEMOSYNE_RESUME)
        if resume and start_epoch == 0:
            self._resume(resume)
        self._recover(first=True)

    # ----------------------------------------------------------------- steady state
    def _position(self) -> dict[str, Any]:
        return dict(self._pos)

    def _set_pos(self, step: int, where: str, coll: bool = False) -> None:
        self._pos = {"step": step, "phase": where, "coll": coll, "committed": self.committed, "epoch": self.epoch}

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
        cursors = {self.rank: DataCursor(data)}
        loaders: dict[int, Iterable[Any]] = {}

        def loader_of(d: int) -> Iterable[Any]:
            if d in loaders:
                return loaders[d]
            loader = data_for_rank(d) if data_for_rank is not None else loader_for_rank(data, d)
            if loader is None:
                msg = (f"Job.steps(): this member must run data rank {d}'s batches (the job continues without "
                       "that rank), but no loader for it is known: pass a DataLoader over a ResumableSampler, "
                       "or data_for_rank=lambda d: <the loader of data rank d>")
                raise ConfigError(msg)
            loaders[d] = loader
            return loader

        def batch_of(k: int) -> Callable[[int], Any]:
            def get(d: int) -> Any:
                if d not in cursors:
                    cursors[d] = DataCursor(loader_of(d))
                return cursors[d].batch(k)
            return get

        if self.shrink:
            # Fail at the start, not at the first failure, when a shrunk epoch could not run.
            loader_of((self.rank + 1) % self.world_size)
        while True:
            if self._needs_recovery:
                self._recover()
            k = self.next_step
            if k >= max_steps:
                if self._finish():
                    return
                continue
            batch = cursors[self.rank].batch(k)
            self._seed_rngs(self.rank, k)
            step = Step(self, k, batch, self.data_ranks, batch_of(k))
            self._step_start = time.perf_counter()
            yield step
            if not step.entered:
                msg = "each step from Job.steps() must be run as `with step: ...` (it marks the step boundary)"
                raise ConfigError(msg)
            if step.failed:
                self._needs_recovery = True
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
        self._started = k
        self._grads_were_none = all(p.grad is None for p in self.model.parameters())
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
        k = self._started
        if self._synced == k:
            return
        if self._gradsync is None or self._comm is None:
            msg = "gradient sync outside a step or before the job is ready"
            raise RecoveryError(msg)
        self._set_pos(k, "allreduce", coll=True)
        # Reductions launched during backward may still be in flight here.
        self.injector.maybe_fire(k, "allreduce")
        # One wait for every bucket (each wait returns once its reduction completed, on
        # the device too, or raises if the communicator was aborted meanwhile).
        self._gradsync.sync()
        if self._comm.aborted:
            msg = f"communicator of epoch {self.epoch} aborted during the gradient reduction"
            raise CommError(msg)
        self._synced = k
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
            self._set_pos(self._started, "backward")
            self.injector.maybe_fire(self._started, "backward")

    def _pre_step(self, *_: Any) -> None:
        self.sync_gradients()
        if self.proxy is not None:
            # From here until the commit marker, the arena is torn (a crash inside the
            # update leaves a state that is neither step k-1's nor step k's).
            self.proxy.begin(self._started)

    def _post_step(self, *_: Any) -> None:
        self._applied = self._started
        self.injector.maybe_fire(self._started, "optimizer")
        if self.proxy is not None:
            self.proxy.commit(self._started)

    def _commit(self, k: int, ran: list[int]) -> None:
        dt = time.perf_counter() - self._step_start
        self.committed = k
        self.next_step = k + 1
        self._set_pos(k + 1, "boundary")
        if self.log_steps:
            self.log.emit(EventKind.STEP, "step", dt, step=k, data_ranks=ran)

    # ----------------------------------------------------------------- failures
    def _on_epoch(self, epoch: int) -> None:
        """Watchdog thread: a newer epoch exists; abort the communicator now."""
        with self._elock:
            self._known_epoch = epoch
            self._notice = time.perf_counter()
            comm = self._comm
            stale = comm is None or self._comm_for < epoch
            if stale:
                self._interrupt.set()
        if comm is not None and stale:
            comm.abort(f"membership epoch {epoch} published")
        self.logger.info("membership epoch %d seen; communicator aborted", epoch)

    def _is_comm_failure(self, exc: BaseException) -> bool:
        if isinstance(exc, CommError):
            return True
        # Anything raised while the membership is changing is a consequence of it
        # (e.g. a torch error from a transport whose peer vanished).
        return self._interrupt.is_set() or (self._comm is not None and self._comm.aborted)

    def _discard(self, k: int, exc: BaseException) -> None:
        """Drop the partial step ``k`` (its gradients); note a torn update."""
        if self._applied == k:
            # The optimizer already updated this replica in step k but the step did not
            # finish: its state is neither step k-1's nor a committed step k's.
            self._torn = True
        if self._gradsync is not None:
            # Reductions of this step may still be in flight: no gradient may stay a view
            # of buffers that abandoned work can write (a new GradSync comes with the repair).
            self._gradsync.close()
        for p in self.model.parameters():
            if p.grad is not None:
                if self._grads_were_none:
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
                "phase": self._pos.get("phase")}
        try:
            self.store.set(_keys.report(self.rank, os.getpid()), json.dumps(info).encode())
            self.log.emit(EventKind.DETECT, "exception", step=k, error=f"{type(exc).__name__}: {exc}"[:500])
        except MnemosyneError:
            pass  # the store is gone: the agent still sees the exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_EXCEPTION)

    # ----------------------------------------------------------------- recovery
    def _adopt(self, min_epoch: int) -> int:
        """Wait for an epoch >= ``min_epoch`` and make the newest one current."""
        asked = False
        deadline = time.monotonic() + _REBUILD_GRACE
        while True:
            with self._elock:
                e = self._known_epoch
                if e >= min_epoch:
                    self.epoch = e
                    self.log.epoch = e
                    self.logger.epoch = e
                    self._interrupt.clear()
                    return e
            if time.monotonic() > deadline:
                if asked:
                    msg = f"no membership epoch >= {min_epoch} was published after a communicator failure"
                    raise RecoveryError(msg)
                self.logger.warning("communicator failed with no membership change; asking for a rebuild")
                self.store.add(_keys.REBUILD_REQUEST, 1)
                asked = True
                deadline = time.monotonic() + max(self.timeout, _REBUILD_GRACE)
            time.sleep(0.002)

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}
        if self.scheduler is not None:
            state["sched"] = self.scheduler.state_dict()
        state["extra"] = {name: obj.state_dict() for name, obj in self.extra.items()}
        return state

    def _local_state(self) -> tuple[Any, list[torch.Tensor], list[bool]]:
        """This rank's own state, flattened, and which tensors its device proxy holds."""
        tensors: list[torch.Tensor] = []
        skel = flatten(self._state(), tensors)
        return skel, tensors, self.proxy.backed(tensors)

    def _resume(self, path: str) -> None:
        """Load the checkpoint ``path`` (verified first) and continue after its step.

        Every rank loads it, so the first agreement finds every rank at the same step
        and no state is transferred. A replacement process (start epoch > 0) does not
        load it: it receives the current state from donors as usual.
        """
        from mnemosyne.jit import ckpt

        with phase(self.log, "resume_load", path=path) as t:
            state, manifest = ckpt.load(path, template=self._state())
            if int(manifest["world_size"]) != self.world_size:
                msg = (f"checkpoint {path} was taken by a job of {manifest['world_size']} ranks; this job has "
                       f"{self.world_size} (resume with --nproc-per-node {manifest['world_size']})")
                raise ConfigError(msg)
            if self.proxy is not None:
                self.proxy.store(int(manifest["step"]), lambda: self._load(state))
            else:
                self._load(state)
            self.committed = int(manifest["step"])
            self.next_step = self.committed + 1
            t.fields.update(step=self.committed)
        self.logger.info("resumed from %s at step %d", path, self.next_step)

    def _checkpoint_and_exit(self, epoch: int, order: dict[str, Any]) -> None:
        """The agent ordered a just-in-time checkpoint: agree, let the donors write it, exit.

        Only the store is used (no communicator: a member is gone). The donors (ranks
        holding the highest committed step) share the writing; the others just exit.
        """
        from mnemosyne.jit import ckpt

        ranks = [int(r) for r in order["ranks"]]
        committed = NO_STATE if self._torn else self.committed
        code = EXIT_CKPT
        try:
            with phase(self.log, "agree", ckpt=True) as t:
                plan = agree(self.store, epoch, self.rank, ranks, committed, self._started, self._interrupt,
                             self.timeout, reattached=self._reattached)
                t.fields.update(top=plan.top, donors=plan.donors, receivers=plan.receivers)
            if plan.top >= 0 and self.rank in plan.donors:
                path = Path(order["dir"]) / ckpt.checkpoint_name(plan.top)
                with phase(self.log, "ckpt", step=plan.top, path=str(path), writers=plan.donors) as t:
                    ckpt.write(path, self._state(), step=plan.top, rank=self.rank, world_size=self.world_size,
                               store=self.store.prefixed(f"jitckpt/e{epoch}"), writer_ranks=plan.donors,
                               meta={"seed": self.seed, "epoch": epoch, "job": self.job_id},
                               timeout=self.timeout)
                    mine = path / f"shard-{self.rank:05d}"
                    t.fields.update(bytes=sum(p.stat().st_size for p in mine.rglob("*") if p.is_file()))
            elif plan.top < 0:
                self.logger.warning("checkpoint ordered but no step was committed: nothing to write")
        except Exception as exc:
            self.logger.exception("just-in-time checkpoint failed: %s", exc)
            code = EXIT_CKPT_FAILED
        self.log.emit(EventKind.INFO, "trainer_ckpt_exit", committed=self.committed, code=code)
        self.log.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["sched"])
        for name, obj in self.extra.items():
            obj.load_state_dict(state["extra"][name])

    def _connect(self, epoch: int, ranks: list[int], first: bool) -> tuple[Communicator, str]:
        """Repair the communicator for membership ``epoch`` over logical ``ranks``; return it and how.

        The backend decides how (:meth:`~mnemosyne.core.comm.CommBackend.repair`). With
        mnemosyne-ccl the record names the epoch of ccl's communicator family to build
        (the agent's choice); the fallback builds a group per membership epoch.
        """
        old, self._comm = self._comm, None
        target = self._record.comm_epoch if self._ccl else epoch
        if target is None:
            msg = f"epoch record {epoch} names no mnemosyne-ccl communicator epoch (a torch-only agent published it?)"
            raise RecoveryError(msg)
        comm = self._backend.repair(old, self.store, self.rank, ranks, epoch=target, joining=first and epoch > 0,
                                    timeout=self.timeout, interrupt=self._interrupt)
        return comm, self._backend.last_repair

    def _recover(self, first: bool = False) -> None:
        t0 = time.perf_counter()
        notice = self._notice
        if not first:
            self.recoveries += 1
            abort_s = t0 - notice if notice is not None else 0.0
            self.log.emit(EventKind.PHASE, "abort", abort_s, ok=True, step=self._started)
        if self._gradsync is not None:
            self._gradsync.close()
        self._gradsync = None
        min_epoch = self.epoch if first else self.epoch + 1
        while True:
            epoch = self._adopt(min_epoch)
            if self._record.epoch != epoch:
                self._record = read_record(self.store, epoch, self.timeout)
            members = self._record.membership
            if members.members.get(self.rank) != self._member:
                self.logger.warning("replaced in epoch %d (holder now %s); exiting", epoch,
                                    members.members.get(self.rank))
                os._exit(EXIT_REPLACED)
            ranks = list(members.ranks)
            self._set_pos(self.next_step, "recovery", coll=True)
            order = self._record.ckpt
            if order is not None:
                self._checkpoint_and_exit(epoch, {"dir": order.dir, "ranks": list(order.ranks),
                                                  "failed": list(order.failed)})
            try:
                with phase(self.log, "repair", first=first, backend=self.backend_name) as t:
                    comm, how = self._connect(epoch, ranks, first)
                    t.fields.update(how=how, comm_epoch=comm.epoch)
                    with self._elock:
                        self._comm = comm
                        self._comm_for = epoch
                        stale = self._known_epoch > epoch
                    if stale:
                        comm.abort("a newer epoch appeared while building")
                committed = NO_STATE if self._torn else self.committed
                with phase(self.log, "agree") as t:
                    plan = agree(self.store, epoch, self.rank, ranks, committed, self._started,
                                 self._interrupt, self.timeout, reattached=self._reattached)
                    t.fields.update(top=plan.top, donors=plan.donors, receivers=plan.receivers,
                                    partial=plan.partial)
                try:
                    self.injector.maybe_fire(plan.resume_step, "recovery")
                except InjectedFault as exc:
                    self._die_of_exception(self._started, exc)
                with phase(self.log, "transfer", first=first) as t:
                    info: dict[str, Any] = {}
                    received, nbytes = transfer(self._comm, self.store, epoch, self.rank, plan, self.device,
                                                self._state, self._interrupt, self.timeout,
                                                local=self._local_state if self.proxy is not None else None,
                                                report=info)
                    t.fields.update(bytes=nbytes, donors=len(plan.donors), receivers=len(plan.receivers),
                                    role=info["role"] if info["role"] != "none" else "donor")
                    if self.proxy is not None:
                        t.fields.update(kept_bytes=info["kept_bytes"], heavy_bytes=info["heavy_bytes"])
                if received is not None:
                    if self.proxy is not None:
                        # Loading replaces the optimizer's state tensors: put the received
                        # state back into the arena, committed as the agreed step.
                        self.proxy.store(plan.top, functools.partial(self._load, received))
                    else:
                        self._load(received)
                with phase(self.log, "resume", first=first):
                    self._comm.barrier()
            except Exception as exc:
                # A recovery that another failure interrupts must start over at the next epoch,
                # whatever the symptom (a peer's socket, a store wait, torch's RuntimeError):
                # seen when a replacement's first transfer lost its donor before the agent had
                # published the next epoch.
                if self._interrupt.is_set() or self._known_epoch > epoch or self._newer_epoch(epoch):
                    self.logger.info("recovery of epoch %d interrupted: %s", epoch, exc)
                    min_epoch = epoch + 1
                    continue
                if isinstance(exc, CommError):
                    min_epoch = epoch + 1  # a member died before the agent told us
                    continue
                raise
            break
        self.committed = plan.top
        self.next_step = plan.resume_step
        self._torn = False
        self._reattached = False
        self._synced = -1
        self._applied = -1
        self._needs_recovery = False
        # Divide by the data-parallel world, not by the members present: while shrunk,
        # hosts' gradients hold several ranks' micro-batches (identical to comm.size otherwise).
        self._gradsync = GradSync(list(self.model.parameters()), self.bucket_bytes, world_size=self.world_size,
                                  comm=self._comm, on_launch=self._on_launch)
        self.data_ranks = assign_data_ranks(self.world_size, ranks)[self.rank]
        self.members = list(ranks)
        self._set_pos(self.next_step, "boundary")
        redone = max(0, self._started - plan.resume_step + 1) if self._started >= 0 else 0
        self.log.emit(EventKind.RECOVERED, "start" if first else "recovered", time.perf_counter() - t0,
                      resume_step=plan.resume_step, started=self._started, steps_redone=redone,
                      members=ranks, data_ranks=self.data_ranks,
                      role="receiver" if self.rank in plan.receivers else "donor",
                      max_started=max(plan.started.values(), default=-1))
        self._started = -1

    def _newer_epoch(self, epoch: int, within: float = 5.0) -> bool:
        """Whether the agent publishes an epoch after ``epoch`` within ``within`` seconds."""
        try:
            self.store.wait([_keys.membership(epoch + 1)], within)
        except MnemosyneError:
            return False
        return True

    def _finish(self) -> bool:
        """Wait until every member of the current epoch finished; False if a recovery is needed first.

        A shrunk job waits for the members present only; a grow epoch published while
        waiting interrupts the wait, and the recovery hands the final state to the newcomer.
        """
        self._set_pos(self.next_step, "finish", coll=True)
        self.store.set(_keys.done(self.rank), str(self.epoch).encode())
        try:
            for r in self._record.membership.ranks:
                wait_key(self.store, _keys.done(r), self._interrupt, 24 * 3600.0)
        except CommError:
            self._needs_recovery = True
            self._started = -1
            return False
        return True

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
