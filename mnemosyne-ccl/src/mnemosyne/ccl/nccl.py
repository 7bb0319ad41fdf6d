"""The NCCL backend: flexible communicators on NVIDIA GPUs through nccl4py (>= 0.6).

* Non-blocking communicators (``NCCLConfig(blocking=False)``): init, shrink and grow
  return at once and are polled with ``get_async_error`` in a loop that also watches the
  abort flag, the epoch's abort key and the timeout, so a rebuild that cannot complete
  is aborted instead of hanging.
* Asynchronous collectives (``async_op=True``) run on one side stream per communicator,
  ordered after the work already queued on the caller's current stream (an event), and
  return a :class:`~mnemosyne.ccl._base.FlexWork` whose wait watches a CUDA event: no
  host synchronisation at launch, one wait where the caller needs the result.
* Blocking collectives run on torch's *current* CUDA stream (never stream 0). Each call polls
  ``get_async_error`` until NCCL has launched it (a non-blocking communicator may launch
  from its own thread after answering ncclInProgress), then records a CUDA event and
  waits for it while watching the abort flag; :meth:`~mnemosyne.ccl._base.FlexCommunicator.abort`
  from any thread wakes a blocked caller, and the repair ends the NCCL communicator.
* Shrink uses ``ncclCommShrink`` with the abort flag when the loaded NCCL is 2.27.3 or
  newer and ``MNEMOSYNE_NCCL_NATIVE=1`` (see :func:`_native_children`; the dead rank need
  not take part, pending work is cancelled); otherwise the survivors abort the old
  communicator and build a fresh one under the new epoch's prefix.
* Grow uses ``ncclCommGrow`` when the loaded NCCL is 2.29.2 or newer (same nccl4py
  switch; survivors keep their ranks, newcomers are appended, so the logical-to-physical
  map matters); otherwise every member (survivors and newcomers) builds a fresh communicator.
* Topology and graph search run once: the first build dumps them (``NCCL_TOPO_DUMP_FILE``,
  ``NCCL_GRAPH_DUMP_FILE``, written by global rank 0), and every later build on that host
  feeds them back (``NCCL_TOPO_FILE``, and ``NCCL_GRAPH_FILE`` when a graph of the same
  member set was dumped). NCCL reads these variables at each init, so setting them in
  the process before the call is enough. A graph file encodes one set of ranks and
  devices, hence one file per member set.

Import is lazy: a missing nccl4py raises
:class:`~mnemosyne.core.errors.MissingDependencyError` with the install line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mnemosyne.ccl._base import FlexBackend, FlexCommunicator, FlexWork
from mnemosyne.ccl._epochs import advance_epoch, agree_members, comm_prefix, member_order
from mnemosyne.core.comm import ReduceOp
from mnemosyne.core.env import MNEMOSYNE_LOCAL_RANK, MNEMOSYNE_NCCL_CACHE, MNEMOSYNE_NCCL_NATIVE, env_int
from mnemosyne.core.errors import CommAborted, CommError, ConfigError, MissingDependencyError
from mnemosyne.core.files import private_dir
from mnemosyne.core.store import Store

__all__ = ["NATIVE_ENV", "NCCL_GROW_MIN", "NCCL_SHRINK_MIN", "NcclBackend", "NcclCommunicator", "nccl_version"]

logger = logging.getLogger(__name__)

#: First NCCL releases with ncclCommShrink (abort flag) and ncclCommGrow.
NCCL_SHRINK_MIN = (2, 27, 3)
NCCL_GROW_MIN = (2, 29, 2)
#: Variable that turns on ncclCommShrink/ncclCommGrow through nccl4py ("1"; default off).
NATIVE_ENV = MNEMOSYNE_NCCL_NATIVE


def _native_children() -> bool:
    """Whether shrink/grow use NCCL's own calls (see :data:`NATIVE_ENV`).

    Off by default: nccl4py 0.6 wraps a non-blocking child before NCCL publishes its
    handle, at the end of the asynchronous init (the parent is non-blocking, so the shrink
    is too, whatever the child's config says); our first GPU run called the null wrapper
    ("Communicator not initialized", 2x H200). :meth:`NcclCommunicator._poll_ready` now
    waits for the handle (a probe on 2x H200 saw it valid after 30 ms and the shrunk
    communicator all-reduced correctly), but the whole path has not yet run end to end
    on GPUs. Until it has, shrink and grow build a fresh communicator (2x H200, world 2:
    shrink 25 ms, grow 189 ms, vs 4.5 s for a restart's init).
    """
    return bool(env_int(NATIVE_ENV, 0))


def _nccl() -> Any:
    try:
        import nccl.core as nccl
    except ImportError:
        what, install = "nccl4py (for the nccl backend)", 'pip install "mnemosyne-ccl[nccl]"'
        raise MissingDependencyError(what, install) from None
    return nccl


def nccl_version() -> tuple[int, int, int]:
    """Version of the libnccl that nccl4py actually loaded.

    Raises:
        CommError: nccl4py found no libnccl.
    """
    info = _nccl().get_version()
    if info.libnccl is None:
        msg = "nccl4py could not load libnccl (install nvidia-nccl-cu12/cu13 or set LD_LIBRARY_PATH)"
        raise CommError(msg)
    rel = info.libnccl.version.release
    return int(rel[0]), int(rel[1]), int(rel[2] if len(rel) > 2 else 0)


def _in_progress(exc: BaseException) -> bool:
    # A non-blocking communicator may answer ncclInProgress (7 in nccl.h); whether the
    # bindings raise it or return it, it means "poll get_async_error", not failure.
    return getattr(exc, "status", None) == 7 or "InProgress" in str(exc)


class _TopoCache:
    """Where this host keeps NCCL's topology and graph dumps."""

    def __init__(self, root: str | None) -> None:
        base = root or os.environ.get(MNEMOSYNE_NCCL_CACHE) or os.path.join(
            tempfile.gettempdir(), f"mnemosyne-nccl-{os.getuid()}")
        # NCCL reads its topology back from here: a folder planted by another user under a
        # shared /tmp could feed it a forged one, so only our own 0700 folder is used.
        self.root = private_dir(base, "NCCL topology cache")

    def topo(self) -> Path:
        return self.root / "topo.xml"

    def graph(self, devices: Sequence[str]) -> Path:
        digest = hashlib.sha1(json.dumps(list(devices)).encode()).hexdigest()[:16]
        return self.root / f"graph-{len(devices)}-{digest}.xml"

    @staticmethod
    def complete(path: Path, closing: str) -> bool:
        # A rank killed while NCCL wrote the dump leaves a torn file: never feed one back.
        try:
            return path.stat().st_size > 0 and path.read_text(errors="replace").rstrip().endswith(closing)
        except OSError:
            return False

    def apply(self, devices: Sequence[str]) -> dict[str, str | None]:
        """Set the NCCL variables for one init; return the previous values to restore."""
        saved = {k: os.environ.get(k) for k in ("NCCL_TOPO_FILE", "NCCL_TOPO_DUMP_FILE", "NCCL_GRAPH_FILE",
                                                 "NCCL_GRAPH_DUMP_FILE")}
        topo, graph = self.topo(), self.graph(devices)
        if self.complete(topo, "</system>"):
            os.environ["NCCL_TOPO_FILE"] = str(topo)
            os.environ.pop("NCCL_TOPO_DUMP_FILE", None)
        else:
            os.environ["NCCL_TOPO_DUMP_FILE"] = str(topo)
        if self.complete(graph, "</graphs>"):
            os.environ["NCCL_GRAPH_FILE"] = str(graph)
            os.environ.pop("NCCL_GRAPH_DUMP_FILE", None)
        else:
            os.environ.pop("NCCL_GRAPH_FILE", None)
            os.environ["NCCL_GRAPH_DUMP_FILE"] = str(graph)
        return saved

    @staticmethod
    def restore(saved: dict[str, str | None]) -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class NcclCommunicator(FlexCommunicator):
    """One epoch of an NCCL communicator; tensors must be CUDA tensors on :attr:`device`."""

    backend_name = "nccl"
    # A GPU collective's completion is an event query: poll it often enough that a
    # waiter before the optimizer update starts it within 0.1 ms of the reduction.
    poll_cap_s = 1e-4

    def __init__(self, store: Store, tag: str, epoch: int, order: Sequence[int], rank: int, timeout: float,
                 comm: Any, device: int, cache: _TopoCache) -> None:
        super().__init__(store, tag, epoch, order, rank, timeout)
        self._comm: Any = comm
        self.device = device
        self._cache = cache
        self._version = nccl_version()
        self._side: Any = None  # torch.cuda.Stream of the asynchronous collectives

    # -- building ------------------------------------------------------------------

    def _poll_ready(self, comm: Any, what: str) -> None:
        """Wait for a non-blocking init/shrink/grow; abort it on abort/timeout.

        A shrink/grow child's handle appears only when NCCL's async init publishes it
        (nccl4py 0.6 wraps it before): wait for it too.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            valid = bool(comm.is_valid)
            state = comm.get_async_error() if valid else 7
            if int(state) == 0:
                return
            if int(state) != 7:
                comm.abort()
                msg = f"{what} failed: NCCL error {state}: {comm.get_last_error()}"
                raise CommError(msg)
            reason = self._abort_reason or self._remote_abort()
            if reason is not None or time.monotonic() >= deadline:
                if valid:
                    comm.abort()
                msg = f"{what} aborted: {reason or f'not ready within {self.timeout:g} s'}"
                raise CommAborted(msg)
            time.sleep(0.001)

    @classmethod
    def connect(cls, store: Store, tag: str, epoch: int, order: Sequence[int], rank: int, timeout: float,
                device: int, cache: _TopoCache) -> NcclCommunicator:
        """Fresh ``ncclCommInitRank`` of ``epoch`` (members agreed), with cached topology/graph."""
        nccl = _nccl()
        import torch

        order = tuple(order)
        phys = order.index(rank)
        prefix = comm_prefix(tag, epoch)
        uid_key = f"{prefix}/pg/uid"
        torch.cuda.set_device(device)
        if phys == 0:
            uid = nccl.get_unique_id()
            store.set(uid_key, bytes(uid))
        shell = cls(store, tag, epoch, order, rank, timeout, None, device, cache)
        if phys != 0:
            shell.wait_store([uid_key], "waiting for the NCCL unique id")
            uid = nccl.UniqueId.from_bytes(store.get(uid_key, timeout))
        devices = _published_devices(store, prefix, order, rank, device, shell)
        saved = cache.apply(devices)
        try:
            comm = nccl.Communicator()
            try:
                comm.initialize(len(order), phys, uid, nccl.NCCLConfig(blocking=False))
            except Exception as exc:
                if not _in_progress(exc):
                    raise
            shell._poll_ready(comm, f"NCCL init of {tag!r} epoch {epoch}")
        finally:
            cache.restore(saved)
        shell._comm = comm
        return shell

    # -- collectives ---------------------------------------------------------------

    def _side_stream(self) -> Any:
        import torch

        if self._side is None:
            self._side = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        return self._side

    def _run(self, what: str, fn: Any, *, async_op: bool = False, tensors: Sequence[Any] = ()) -> FlexWork | None:
        import torch

        self._raise_if_aborted()
        comm = self._comm
        if comm is None:
            msg = f"{self!r} is closed"
            raise CommAborted(msg)
        stream = torch.cuda.current_stream(self.device)
        if async_op:
            caller, stream = stream, self._side_stream()
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record(caller)
            stream.wait_event(ready)
            for t in tensors:
                # Freed by the caller (an abandoned epoch), the memory must not be reused on
                # another stream while this stream may still write it.
                t.record_stream(stream)
        try:
            fn(comm, int(stream.cuda_stream))
        except Exception as exc:
            if not _in_progress(exc):
                err = self.fail(f"{what} failed to launch: {exc}")
                raise err from None
        # A non-blocking communicator may launch the kernel from NCCL's own thread after the
        # call returned ncclInProgress: until get_async_error says ncclSuccess the kernel may
        # not be on the stream yet (an event recorded then completes at once) and the
        # communicator accepts no other call (ncclCommShrink answers ncclInvalidArgument).
        # So: poll until launched, then record the event that marks completion.
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        launched = False
        done = threading.Event()

        def complete() -> bool:
            nonlocal launched
            state = int(comm.get_async_error())
            if state not in (0, 7):
                err = self.fail(f"{what}: NCCL async error {state}: {comm.get_last_error()}")
                raise err
            if not launched:
                if state == 7:
                    return False
                event.record(stream)
                launched = True
            return bool(event.query())  # type: ignore[no-untyped-call]

        work = FlexWork(self, what, done, complete)
        if not async_op:
            work.wait()
            return None
        # Record the completion event right behind this operation (later operations on
        # the side stream must not delay its wait): poll until NCCL launched it.
        if int(comm.get_async_error()) == 7:
            self.wait_until(done, lambda: int(comm.get_async_error()) != 7, f"{what} launch")
        complete()
        return work

    def all_reduce(self, tensor: Any, op: ReduceOp = ReduceOp.SUM, *, async_op: bool = False) -> FlexWork | None:
        """Reduce ``tensor`` in place across all members (``async_op``: on the side stream, return the work)."""
        red = op.of(_nccl(), PRODUCT="PROD")
        return self._run("all_reduce", lambda c, s: c.allreduce(tensor, tensor, red, stream=s), async_op=async_op,
                         tensors=(tensor,))

    def broadcast(self, tensor: Any, root: int) -> None:
        """Copy ``tensor`` from logical rank ``root`` to every member."""
        phys = self.physical(root)
        self._run("broadcast", lambda c, s: c.broadcast(tensor, tensor, phys, stream=s))

    def _sorted_to_physical(self, per_member: list[Any], what: str) -> list[Any]:
        if len(per_member) != self.size:
            msg = f"{what}: expected {self.size} tensors (one per member), got {len(per_member)}"
            raise ConfigError(msg)
        index = {r: i for i, r in enumerate(self.ranks)}
        return [per_member[index[r]] for r in self._order]

    def all_gather(self, outputs: list[Any], tensor: Any) -> None:
        """Gather every member's ``tensor`` into ``outputs`` (sorted logical rank order)."""
        import torch

        flat = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        self._run("all_gather", lambda c, s: c.allgather(tensor, flat, stream=s))
        for out, chunk in zip(self._sorted_to_physical(outputs, "all_gather"), flat, strict=True):
            out.copy_(chunk)

    def reduce_scatter(self, output: Any, inputs: list[Any], op: ReduceOp = ReduceOp.SUM) -> None:
        """Reduce ``inputs[i]`` across members into ``output`` of the i-th member (sorted order)."""
        import torch

        flat = torch.stack(self._sorted_to_physical(inputs, "reduce_scatter"))
        red = op.of(_nccl(), PRODUCT="PROD")
        self._run("reduce_scatter", lambda c, s: c.reduce_scatter(flat, output, red, stream=s))

    def send(self, tensor: Any, dst: int) -> None:
        """Send ``tensor`` to logical rank ``dst``."""
        peer = self.physical(dst)
        self._run(f"send to {dst}", lambda c, s: c.send(tensor, peer, stream=s))

    def recv(self, tensor: Any, src: int) -> None:
        """Receive into ``tensor`` from logical rank ``src``."""
        peer = self.physical(src)
        self._run(f"recv from {src}", lambda c, s: c.recv(tensor, peer, stream=s))

    def barrier(self) -> None:
        """All-reduce of one element: NCCL has no barrier."""
        import torch

        self.all_reduce(torch.zeros(1, device=f"cuda:{self.device}"))

    # abort() only sets the flag (the wait loop of a blocked collective then raises at
    # once). The NCCL communicator itself is ended where the repair needs it: by
    # ncclCommShrink with the abort flag, or by ncclCommAbort before a fresh init, since
    # a kernel of the failed communicator would otherwise block the stream forever.

    # -- membership ----------------------------------------------------------------

    def _grown_order(self, new: tuple[int, ...]) -> tuple[int, ...]:
        if self._version >= NCCL_GROW_MIN and _native_children():
            return self._order + new  # ncclCommGrow appends newcomers after the survivors
        return tuple(sorted(self._order + new))

    def _make(self, what: str, order: tuple[int, ...], epoch: int, *, dead: tuple[int, ...],
              new: tuple[int, ...]) -> NcclCommunicator:
        nccl = _nccl()
        prefix = comm_prefix(self.tag, epoch)
        if what == "shrink" and self._version >= NCCL_SHRINK_MIN and self._comm is not None and _native_children():
            child = self._comm.shrink([self.physical(r) for r in dead], nccl.NCCLConfig(blocking=False),
                                      nccl.CommShrinkFlag.ABORT)
            out = NcclCommunicator(self._store, self.tag, epoch, order, self._rank, self.timeout, child,
                                   self.device, self._cache)
            out._poll_ready(child, f"NCCL shrink to epoch {epoch}")
            return out
        if what == "grow" and self._version >= NCCL_GROW_MIN and self._comm is not None and _native_children():
            self._store.set(f"{prefix}/mode", b"grow")
            uid_key = f"{prefix}/pg/grow_uid"
            out = NcclCommunicator(self._store, self.tag, epoch, order, self._rank, self.timeout, None,
                                   self.device, self._cache)
            if self.physical_rank == 0:
                uid = self._comm.get_unique_id()
                self._store.set(uid_key, bytes(uid))
                child = self._comm.grow(len(order), uid, config=nccl.NCCLConfig(blocking=False))
            else:
                child = self._comm.grow(len(order), config=nccl.NCCLConfig(blocking=False))
            out._poll_ready(child, f"NCCL grow to epoch {epoch}")
            out._comm = child
            return out
        self._store.set(f"{prefix}/mode", b"init")
        if self._peer_failed and self._comm is not None:
            comm, self._comm = self._comm, None
            _abort_quietly(comm)  # its stuck kernels must leave the stream first
        return NcclCommunicator.connect(self._store, self.tag, epoch, order, self._rank, self.timeout, self.device,
                                        self._cache)

    def _make_split(self, tag: str, order: tuple[int, ...], rank: int, parent_ranks: list[int]) -> NcclCommunicator:
        return NcclCommunicator.connect(self._store, tag, self._epoch, order, rank, self.timeout, self.device,
                                        self._cache)

    def _retire(self) -> None:
        comm, self._comm = self._comm, None
        if comm is not None:
            threading.Thread(target=_abort_quietly, args=(comm,), daemon=True, name="mnemosyne-nccl-retire").start()

    def close(self) -> None:
        """Abort the NCCL communicator and release it."""
        self.abort("closed")
        self._retire()


def _abort_quietly(comm: Any) -> None:
    try:
        comm.abort()
    except Exception as exc:  # already aborted or destroyed: nothing left to release
        logger.debug("ncclCommAbort: %s", exc)


def _published_devices(store: Store, prefix: str, order: tuple[int, ...], rank: int, device: int,
                       comm: FlexCommunicator) -> list[str]:
    import socket

    store.set(f"{prefix}/dev/{rank}", f"{socket.gethostname()}:{device}".encode())
    keys = [f"{prefix}/dev/{r}" for r in order]
    comm.wait_store(keys, "waiting for the members' devices")
    return [store.get(k, comm.timeout).decode() for k in keys]


class NcclBackend(FlexBackend):
    """Creates NCCL communicators (entry point ``nccl`` of ``mnemosyne.ccl.backends``).

    Args:
        device: CUDA device index; default: ``MNEMOSYNE_LOCAL_RANK`` or ``LOCAL_RANK``, else 0.
        cache_dir: Where topology/graph dumps live (default ``MNEMOSYNE_NCCL_CACHE`` or a
            per-user temp folder).
    """

    name = "nccl"

    def __init__(self, device: int | None = None, cache_dir: str | None = None) -> None:
        if device is None:
            device = int(os.environ.get(MNEMOSYNE_LOCAL_RANK) or os.environ.get("LOCAL_RANK") or 0)
        self.device = device
        self._cache_dir = cache_dir

    def library_version(self) -> str:
        """The loaded libnccl's version, e.g. ``"2.29.2"``."""
        return ".".join(map(str, nccl_version()))

    def create(self, store: Store, rank: int, size: int, *, epoch: int = 0, timeout: float = 60.0,
               tag: str = "world", ranks: Sequence[int] | None = None) -> NcclCommunicator:
        """Create epoch ``epoch`` of ``size`` members; called by every member (see GlooBackend.create).

        ``ranks`` lists the members' logical ranks (default ``range(size)``); the NCCL
        ranks are the indices in the sorted list.
        """
        _nccl()
        order = member_order("nccl create", rank, size, ranks)
        advance_epoch(store, tag, epoch)
        agree_members(store, tag, epoch, order)
        return NcclCommunicator.connect(store, tag, epoch, order, rank, timeout, self.device,
                                        _TopoCache(self._cache_dir))

    def join(self, store: Store, rank: int, *, epoch: int, timeout: float = 60.0,
             tag: str = "world") -> NcclCommunicator:
        """Join the group that survivors are growing to ``epoch`` (native Grow or a fresh init)."""
        from mnemosyne.ccl.gloo import _joinable

        nccl = _nccl()
        import torch

        order = _joinable(store, tag, rank, epoch, timeout)
        prefix = comm_prefix(tag, epoch)
        cache = _TopoCache(self._cache_dir)
        mode = store.get(f"{prefix}/mode", timeout).decode()
        if mode != "grow":
            return NcclCommunicator.connect(store, tag, epoch, order, rank, timeout, self.device, cache)
        torch.cuda.set_device(self.device)
        out = NcclCommunicator(store, tag, epoch, order, rank, timeout, None, self.device, cache)
        out.wait_store([f"{prefix}/pg/grow_uid"], "waiting for the grow unique id")
        uid = nccl.UniqueId.from_bytes(store.get(f"{prefix}/pg/grow_uid", timeout))
        child = nccl.Communicator().grow(len(order), uid, rank=order.index(rank),
                                         config=nccl.NCCLConfig(blocking=False))
        out._poll_ready(child, f"NCCL grow (newcomer) to epoch {epoch}")
        out._comm = child
        return out

    @classmethod
    def capabilities(cls) -> dict[str, bool]:
        """Native shrink/grow of the loaded NCCL and nccl4py (False when either is missing or too old)."""
        try:
            ver = nccl_version()
        except (MissingDependencyError, CommError):
            return {"shrink": False, "grow": False, "abort": True, "split": True}
        native = _native_children()
        return {"shrink": native and ver >= NCCL_SHRINK_MIN, "grow": native and ver >= NCCL_GROW_MIN,
                "abort": True, "split": True}
