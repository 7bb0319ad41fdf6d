"""A torch ``ProcessGroup`` over a flexible communicator, so DDP/FSDP2/DeviceMesh run on it.

:class:`FlexProcessGroup` is a Python subclass of ``torch.distributed.ProcessGroup``
(the way torchft wraps its groups). Each collective is issued on the current epoch's
transport group and returned as a :class:`FlexWork` whose future completes when the
transport finishes, or fails at once when the communicator is aborted (locally, or
because a member published a peer failure), so that DDP's backward raises instead of
hanging. After a repair, :meth:`FlexProcessGroup.swap` installs the new communicator
without restarting the process. torch's C++ consumers (DDP's reducer) read the group's
rank and size once: after a repair that changes the size, build a new adapter and a new
DDP wrapper on every rank (DDP keeps cross-step state that an aborted step leaves half
done anyway, see FACTS).

Ranks here are *physical* (dense ``0..size-1``, what torch expects); the communicator
maps them to logical ranks (``comm.order``).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions

from mnemosyne.ccl._base import POLL_S, FlexCommunicator
from mnemosyne.core.errors import CommAborted, ConfigError, PeerFailureError

__all__ = ["FlexProcessGroup", "FlexWork"]

logger = logging.getLogger(__name__)


def _unwrap(fut: torch.futures.Future[Any]) -> Any:
    kind, value = fut.value()
    if kind == "err":
        raise RuntimeError(value)
    return value


def _wait_loop(q: queue.SimpleQueue[Any]) -> None:
    while True:
        item = q.get()
        if item is None:
            return
        work, done = item
        try:
            work.wait()
        except RuntimeError as exc:
            done(f"collective failed: {exc}")
        else:
            done(None)
        del work, done, item


class FlexWork(dist.Work):  # type: ignore[misc]
    """A Work whose future fails as soon as the communicator is aborted."""

    def __init__(self, future: torch.futures.Future[Any], timeout: float) -> None:
        super().__init__()
        self._future = future
        self._timeout = timeout

    def wait(self, timeout: Any = None) -> bool:
        """Block until done; raise the communicator's error if it was aborted."""
        self._future.wait()
        return True

    def is_completed(self) -> bool:
        """Whether the future is done (successfully or not)."""
        return bool(self._future.done())

    def get_future(self) -> torch.futures.Future[Any]:
        """The future (value: the op's output tensors)."""
        return self._future


class FlexProcessGroup(dist.ProcessGroup):  # type: ignore[misc]
    """torch ProcessGroup adapter over a :class:`~mnemosyne.ccl._base.FlexCommunicator`.

    Args:
        comm: The communicator (currently the Gloo backend's, whose
            ``process_group`` property exposes the epoch's transport group).
    """

    def __init__(self, comm: FlexCommunicator) -> None:
        super().__init__(comm.physical_rank, comm.size)  # type: ignore[call-arg]
        self._comm = comm
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[torch.futures.Future[Any], Any, list[Any]]] = {}
        self._next_id = 0
        self._watcher: threading.Thread | None = None
        self._wake = threading.Event()
        self._waiters: dict[int, tuple[FlexCommunicator, queue.SimpleQueue[Any]]] = {}
        self._group_name = ""
        self._fence: str | None = None
        #: Collectives issued on the current communicator (reset by :meth:`swap`).
        self.issued = 0
        #: Whether a collective on the current communicator was cut off by :meth:`fence`
        #: before it completed (its transport may be out of step with its peers').
        self.cut = False

    # torch's C++ ``group_name`` reads it from a registered C++ backend, which this
    # Python-level group has none of; DeviceMesh.from_group and the c10d registry only
    # need the name, so it lives here.
    @property
    def group_name(self) -> str:  # type: ignore[override]
        """Name under which the group is registered with ``torch.distributed`` (see mesh.py)."""
        if not self._group_name:
            msg = f"{self!r} has no group name: register it (mnemosyne.ccl.mesh) before handing it to a DeviceMesh"
            raise ConfigError(msg)
        return self._group_name

    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    @property
    def comm(self) -> FlexCommunicator:
        """The communicator currently in use."""
        return self._comm

    def swap(self, comm: FlexCommunicator) -> None:
        """Install a repaired communicator (same size and physical rank).

        Raises:
            ConfigError: Size or rank differ (torch consumers cached them: build a new
                adapter instead).
        """
        if comm.size != self._comm.size or comm.physical_rank != self._comm.physical_rank:
            msg = (f"swap: new communicator has size {comm.size}, rank {comm.physical_rank}; this group was built "
                   f"with size {self._comm.size}, rank {self._comm.physical_rank}: build a new FlexProcessGroup")
            raise ConfigError(msg)
        self._fail_pending(CommAborted(f"process group swapped to epoch {comm.epoch}"))
        with self._lock:
            self._comm = comm
            self.issued, self.cut, self._fence = 0, False, None

    def fence(self, reason: str) -> None:
        """Stop using the communicator without aborting it (a recovery is starting).

        Pending collectives fail at once with :class:`CommAborted` (``reason``) and mark
        the group :attr:`cut`; collectives issued later fail before they reach the
        transport, so a group that had nothing in flight stays usable: :meth:`unfence`
        it when every member agrees it is intact, or :meth:`swap` in a rebuilt one.
        """
        with self._lock:
            self._fence = reason
            if self._pending:
                self.cut = True
        self._fail_pending(CommAborted(reason))

    def unfence(self) -> None:
        """Use the current communicator again (see :meth:`fence`)."""
        with self._lock:
            self._fence = None

    @property
    def fenced(self) -> bool:
        """Whether :meth:`fence` was called since the last :meth:`unfence` or :meth:`swap`."""
        return self._fence is not None

    def getBackendName(self) -> str:
        """Backend name reported to torch."""
        return f"mnemosyne-{self._comm.backend_name}"

    # -- completion tracking -----------------------------------------------------------

    def _track(self, work: Any, result: list[Any]) -> FlexWork:
        comm = self._comm
        # ``src`` carries ("ok", tensors) or ("err", text); the future handed to torch is
        # ``src.then(_unwrap)``, so a failure reaches C++ (DDP's reducer) as the plain
        # RuntimeError that torch makes of an exception raised in a ``then`` callback. A
        # Python exception object set directly with ``set_exception`` crashed the process
        # when DDP rethrew it inside backward (torch 2.13).
        fut: torch.futures.Future[Any] = torch.futures.Future()
        with self._lock:
            op_id = self._next_id
            self._next_id += 1
            self._pending[op_id] = (fut, comm, result)
            self.issued += 1
            fenced = self._fence
        if fenced is not None:  # fenced between _pg() and here: this one is cut too
            self.cut = True
            self._fail_pending(CommAborted(fenced))

        def _done(err: str | None) -> None:
            with self._lock:
                entry = self._pending.pop(op_id, None)
            if entry is None or fut.done():
                return
            if err is None:
                fut.set_result(("ok", result))
            else:
                fut.set_result(("err", str(comm.fail(err))))

        # Completion is observed by a Python thread of ours (one per communicator, in
        # issue order), never from a callback on Gloo's thread: completing DDP's future
        # with an error from inside Gloo's callback crashed the process (torch 2.13).
        self._waiter(comm).put((work, _done))
        self._ensure_watcher()
        return FlexWork(fut.then(_unwrap), comm.timeout)

    def _waiter(self, comm: FlexCommunicator) -> queue.SimpleQueue[Any]:
        with self._lock:
            key = id(comm)
            if self._waiters.get(key, (None, None))[0] is not comm:
                q: queue.SimpleQueue[Any] = queue.SimpleQueue()
                threading.Thread(target=_wait_loop, args=(q,), daemon=True, name="mnemosyne-pg-wait").start()
                for _, old_q in self._waiters.values():
                    old_q.put(None)  # a stuck waiter stays stuck, a free one exits
                self._waiters = {key: (comm, q)}
            return self._waiters[key][1]

    def _ensure_watcher(self) -> None:
        with self._lock:
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(target=self._watch, daemon=True, name="mnemosyne-pg-watch")
                self._watcher.start()
        self._wake.set()

    def _watch(self) -> None:
        # While ops are pending, look at the abort flag and the epoch's abort key every
        # POLL_S; fail every pending future of an aborted communicator at once.
        while True:
            with self._lock:
                pending = list(self._pending.values())
            if not pending:
                self._wake.clear()
                if not self._wake.wait(5.0):
                    with self._lock:
                        if not self._pending:
                            self._watcher = None
                            return
                continue
            for comm in {id(c): c for _, c, _ in pending}.values():
                if not comm.aborted:
                    remote = comm._remote_abort()
                    if remote is not None:
                        comm.fail(f"peer failure reported: {remote}", publish=False)
                if comm.aborted:
                    self._fail_pending(None, only=comm)
            self._wake.wait(POLL_S)

    def _fail_pending(self, exc: Exception | None, only: FlexCommunicator | None = None) -> None:
        with self._lock:
            victims = {k: v for k, v in self._pending.items() if only is None or v[1] is only}
            for k in victims:
                del self._pending[k]
        for fut, comm, _ in victims.values():
            if not fut.done():
                err = exc or PeerFailureError(f"{comm!r}: peer failure: {comm._abort_reason}")
                fut.set_result(("err", f"{type(err).__name__}: {err}"))

    def _pg(self) -> Any:
        if self._fence is not None:
            raise CommAborted(self._fence)
        self._comm._raise_if_aborted()
        return self._comm.process_group  # type: ignore[attr-defined]

    # -- collectives (torch's ProcessGroup signatures) -----------------------------------

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> FlexWork:  # type: ignore[override]
        """All-reduce (opts: AllreduceOptions or a ReduceOp)."""
        if opts is None:
            opts = dist.AllreduceOptions()
        elif not isinstance(opts, dist.AllreduceOptions):
            op = opts
            opts = dist.AllreduceOptions()
            opts.reduceOp = op
        return self._track(self._pg().allreduce(tensors, opts), tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> FlexWork:
        """All-reduce several tensors as one operation."""
        opts = opts if opts is not None else dist.AllreduceCoalescedOptions()
        return self._track(self._pg().allreduce_coalesced(tensors, opts), tensors)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> FlexWork:  # type: ignore[override]
        """Broadcast from ``opts.rootRank`` (physical)."""
        opts = opts if opts is not None else dist.BroadcastOptions()
        return self._track(self._pg().broadcast(tensors, opts), tensors)

    def allgather(  # type: ignore[override]
        self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor], opts: Any = None
    ) -> FlexWork:
        """All-gather in physical rank order."""
        opts = opts if opts is not None else AllgatherOptions()
        return self._track(self._pg().allgather(output_tensors, input_tensors, opts), output_tensors)

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> FlexWork:
        """All-gather into one flat tensor (FSDP2, DeviceMesh)."""
        chunks = list(output.chunk(self._comm.size))
        opts = opts if opts is not None else AllgatherOptions()
        return self._track(self._pg().allgather([chunks], [input], opts), [output])

    def reduce_scatter(  # type: ignore[override]
        self, output_tensors: list[torch.Tensor], input_tensors: list[list[torch.Tensor]], opts: Any = None
    ) -> FlexWork:
        """Reduce-scatter in physical rank order."""
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        return self._track(self._pg().reduce_scatter(output_tensors, input_tensors, opts), output_tensors)

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> FlexWork:
        """Reduce-scatter from one flat tensor (FSDP2)."""
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        chunks = list(input.chunk(self._comm.size))
        return self._track(self._pg().reduce_scatter([output], [chunks], opts), [output])

    # torch 2.13's c10d calls these names (dist.all_gather_single / reduce_scatter_single,
    # what FSDP2 issues); older torch calls the underscore names above.
    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> FlexWork:
        """All-gather into one flat tensor (torch >= 2.13 name)."""
        return self._allgather_base(output, input, opts)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> FlexWork:
        """Reduce-scatter from one flat tensor (torch >= 2.13 name)."""
        return self._reduce_scatter_base(output, input, opts)

    def barrier(self, opts: Any = None) -> FlexWork:
        """Barrier."""
        opts = opts if opts is not None else dist.BarrierOptions()
        return self._track(self._pg().barrier(opts), [])

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> FlexWork:
        """Send to physical rank ``dst``."""
        return self._track(self._pg().send(tensors, dst, tag), tensors)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> FlexWork:
        """Receive from physical rank ``src``."""
        return self._track(self._pg().recv(tensors, src, tag), tensors)

    def size(self) -> int:
        """Number of members."""
        return self._comm.size

    def rank(self) -> int:
        """Physical rank."""
        return self._comm.physical_rank
