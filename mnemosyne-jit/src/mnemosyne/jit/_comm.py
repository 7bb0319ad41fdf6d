"""The plain torch.distributed communicator: the fallback when mnemosyne-ccl is absent.

Every membership epoch gets a brand-new torch ProcessGroup (Gloo on CPU, NCCL on GPU)
built under a fresh store prefix; nothing of a previous epoch is reused ("everyone
rebuilds": slower than ccl's shrink/grow, but correct). The core ``Communicator``
contract's shrink, grow and rebuild are honoured the same way: each builds a fresh group
through the comm's :class:`TorchBackend`, in the same store, at epoch + 1 (shrink: over the
survivors; grow: over the union, while each newcomer calls :meth:`TorchBackend.join`;
rebuild: the same members). Split is not supported. :class:`TorchBackend` registers
as the ``torch`` backend under :data:`~mnemosyne.core.comm.BACKENDS_ENTRY_POINT`, next to
ccl's ``gloo`` and ``nccl``; its transport is the constructor's argument. The members are logical ranks,
possibly with gaps (a shrunk job: ``[0, 1, 3]``); the group's own (physical) rank of a
member is its index in the sorted member list, and every call that names a peer
translates.

Abort: Gloo's ``ProcessGroup.abort`` does not wake an operation blocked on a peer, and
destroying a group with a pending operation blocks until torch's timeout. So every
blocking call here waits on an event that either the operation's future or
:meth:`TorchComm.abort` sets; an aborted group is parked in :data:`GRAVEYARD` (never
destroyed while the process runs) and its tensors are never reused by the caller.
NCCL groups are also aborted natively (``ncclCommAbort``), which ends kernels stuck on a
dead peer.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from mnemosyne.core.comm import CommBackend, Communicator, ReduceOp
from mnemosyne.core.errors import CommAborted, CommError, PeerFailureError
from mnemosyne.core.store import PrefixStore, Store, wait_until
from mnemosyne.jit import _keys
from mnemosyne.jit._store import TorchStore

__all__ = ["GRAVEYARD", "TorchBackend", "TorchComm", "TorchWork", "torch_store_of"]

logger = logging.getLogger(__name__)

#: Aborted process groups, kept alive for the life of the process (see module doc).
GRAVEYARD: list[Any] = []

# torch's own timeout for an operation; never the way we detect failures (the agent and
# the watchdog are), so it is long enough for any healthy step.
_OP_TIMEOUT = datetime.timedelta(minutes=30)


def torch_store_of(store: Store) -> tuple[TorchStore | None, str]:
    """Return the TorchStore under a chain of PrefixStores and the full prefix.

    None (and an empty prefix) when the store is not torch's (mnemosyne-ccl's store).
    """
    parts: list[str] = []
    cur: Any = store
    while isinstance(cur, PrefixStore):
        parts.append(cur.prefix)
        cur = cur.inner
    if not isinstance(cur, TorchStore):
        return None, ""
    return cur, "/".join(reversed(parts))


class TorchComm:
    """One epoch of a torch ProcessGroup, with abort from any thread (a core Communicator).

    Args:
        pg: The process group (physical ranks ``0..size-1``).
        rank: This process's logical rank.
        size: Group size.
        epoch: Membership epoch.
        backend: ``"gloo"`` or ``"nccl"``.
        ranks: Logical ranks of the members (default ``range(size)``); physical rank
            ``i`` holds ``sorted(ranks)[i]``.
        maker: The backend that built it, with the store, the wait bound and the interrupt
            of its rendezvous: shrink, grow and rebuild build the next group there (None:
            they raise).
    """

    def __init__(self, pg: Any, rank: int, size: int, epoch: int, backend: str,
                 ranks: Sequence[int] | None = None,
                 maker: tuple[TorchBackend, Store, float, threading.Event | None] | None = None) -> None:
        self._pg = pg
        self._rank = rank
        self._size = size
        self._ranks = tuple(sorted(ranks)) if ranks is not None else tuple(range(size))
        if len(self._ranks) != size or rank not in self._ranks:
            msg = f"torch group of epoch {epoch}: rank {rank}, size {size} and members {list(self._ranks)} disagree"
            raise CommError(msg)
        self._phys = {r: i for i, r in enumerate(self._ranks)}
        self._epoch = epoch
        self.backend = backend
        self._abort = threading.Event()
        self._failed = False
        self._reason = ""
        self._lock = threading.Lock()
        self._waiters: set[threading.Event] = set()
        self._maker = maker

    @property
    def rank(self) -> int:
        """See :class:`Communicator`."""
        return self._rank

    @property
    def size(self) -> int:
        """See :class:`Communicator`."""
        return self._size

    @property
    def epoch(self) -> int:
        """See :class:`Communicator`."""
        return self._epoch

    @property
    def ranks(self) -> Sequence[int]:
        """See :class:`Communicator`."""
        return self._ranks

    def physical(self, logical: int) -> int:
        """The torch group's rank of logical rank ``logical``.

        Raises:
            CommError: ``logical`` is not a member.
        """
        try:
            return self._phys[logical]
        except KeyError:
            msg = f"rank {logical} is not a member of the group of epoch {self._epoch} (members {list(self._ranks)})"
            raise CommError(msg) from None

    @property
    def aborted(self) -> bool:
        """See :class:`Communicator`."""
        return self._abort.is_set() or self._failed

    def _check(self) -> None:
        if self._abort.is_set():
            msg = f"communicator of epoch {self._epoch} aborted: {self._reason}"
            raise CommAborted(msg)
        if self._failed:
            msg = f"communicator of epoch {self._epoch} failed earlier: {self._reason}"
            raise PeerFailureError(msg)

    def _launch(self, what: str, launch: Callable[[], Any]) -> Any:
        self._check()
        try:
            return launch()
        except RuntimeError as exc:
            self._fail(what, exc)

    def _run(self, what: str, launch: Callable[[], Any]) -> None:
        """Launch an operation and wait for it, or for an abort, whichever comes first."""
        self._await(what, self._launch(what, launch))

    def _await(self, what: str, work: Any) -> None:
        """Wait for a launched torch work, or for an abort, whichever comes first."""
        done = threading.Event()
        with self._lock:
            self._waiters.add(done)
        try:
            try:
                fut = work.get_future()
            except RuntimeError:  # Gloo's send/recv works have no future: poll them
                fut = None
            if fut is not None:
                fut.add_done_callback(lambda _f: done.set())
                done.wait()
            else:
                # Gloo's send/recv works have no future and report completion only
                # once waited on: wait in a helper thread (abandoned on abort).
                box: dict[str, BaseException] = {}
                finished = threading.Event()

                def waiter() -> None:
                    try:
                        work.wait()
                    except BaseException as exc:  # handed to the caller below
                        box["err"] = exc
                    finally:
                        finished.set()
                        done.set()

                threading.Thread(target=waiter, name="mnemosyne-p2p-wait", daemon=True).start()
                done.wait()
                if finished.is_set():
                    if "err" in box:
                        self._fail(what, box["err"])
                    self._check()
                    return
                self._park()
                self._check()
        finally:
            with self._lock:
                self._waiters.discard(done)
        if self._abort.is_set() and not work.is_completed():
            self._park()
            self._check()
        try:
            work.wait()
        except RuntimeError as exc:
            self._fail(what, exc)
        self._check()

    def _fail(self, what: str, exc: BaseException) -> None:
        self._failed = True
        self._reason = self._reason or f"{what}: {exc}"
        self._park()
        msg = f"{what} on epoch {self._epoch} failed (a peer died or dropped out): {exc}"
        raise PeerFailureError(msg) from exc

    def _park(self) -> None:
        if self._pg is not None and all(g is not self._pg for g in GRAVEYARD):
            GRAVEYARD.append(self._pg)
            # One reference that nothing ever drops: the group is then never destroyed,
            # not even at interpreter exit, where its destructor would wait for the
            # abandoned operation until torch's timeout.
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(self._pg))

    def all_reduce(self, tensor: Any, op: ReduceOp = ReduceOp.SUM, *, async_op: bool = False) -> TorchWork | None:
        """See :class:`Communicator` (``async_op``: return a :class:`TorchWork` at once)."""
        import torch.distributed as dist

        opts = dist.AllreduceOptions()
        opts.reduceOp = op.of(dist.ReduceOp)
        work = TorchWork(self, "all_reduce", self._launch("all_reduce", lambda: self._pg.allreduce([tensor], opts)))
        if async_op:
            return work
        work.wait()
        return None

    def broadcast(self, tensor: Any, root: int) -> None:
        """See :class:`Communicator`."""
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = self.physical(root)
        opts.rootTensor = 0
        self._run("broadcast", lambda: self._pg.broadcast([tensor], opts))

    def all_gather(self, outputs: list[Any], tensor: Any) -> None:
        """See :class:`Communicator`."""
        self._run("all_gather", lambda: self._pg.allgather([outputs], [tensor]))

    def reduce_scatter(self, output: Any, inputs: list[Any], op: ReduceOp = ReduceOp.SUM) -> None:
        """See :class:`Communicator`."""
        import torch.distributed as dist

        opts = dist.ReduceScatterOptions()
        opts.reduceOp = op.of(dist.ReduceOp)
        self._run("reduce_scatter", lambda: self._pg.reduce_scatter([output], [inputs], opts))

    def send(self, tensor: Any, dst: int, tag: int = 0) -> None:
        """See :class:`Communicator` (``tag`` tells apart messages to one peer)."""
        peer = self.physical(dst)
        self._run("send", lambda: self._pg.send([tensor], peer, tag))

    def recv(self, tensor: Any, src: int, tag: int = 0) -> None:
        """See :class:`Communicator` (``tag`` must match the sender's)."""
        peer = self.physical(src)
        self._run("recv", lambda: self._pg.recv([tensor], peer, tag))

    def barrier(self) -> None:
        """See :class:`Communicator`."""
        import torch

        device = "cuda" if self.backend == "nccl" else "cpu"
        self.all_reduce(torch.zeros(1, device=device))

    def abort(self, reason: str = "") -> None:
        """See :class:`Communicator`: wakes every waiter; for NCCL also aborts the communicator."""
        if self._abort.is_set():
            return
        self._reason = reason or "aborted"
        self._abort.set()
        with self._lock:
            waiters = list(self._waiters)
        for ev in waiters:
            ev.set()
        if self.backend == "nccl" and self._pg is not None:
            try:
                self._pg.abort()
            except Exception:  # abort must never raise; the group is parked either way
                logger.debug("native abort of the NCCL group failed", exc_info=True)
        self._park()

    def _next(self, what: str, members: Sequence[int]) -> TorchComm:
        """A fresh group over ``members`` at epoch + 1, built by the backend that built this one."""
        if self._maker is None:
            msg = (f"{what}: this torch group of epoch {self._epoch} was not built by a TorchBackend, so it has no "
                   "store to rendezvous in; build it with TorchBackend.create")
            raise CommError(msg)
        backend, store, timeout, interrupt = self._maker
        return backend.create(store, self._rank, len(members), epoch=self._epoch + 1, timeout=timeout,
                              interrupt=interrupt, ranks=members)

    def shrink(self, dead_ranks: Sequence[int]) -> TorchComm:
        """See :class:`Communicator`: a fresh group of the survivors at epoch + 1 (survivors only call it).

        Raises:
            CommError: ``dead_ranks`` names a non-member or this rank, or leaves nobody.
        """
        dead = {int(r) for r in dead_ranks}
        if not dead <= set(self._ranks) or self._rank in dead:
            msg = (f"shrink of epoch {self._epoch}: dead ranks {sorted(dead)} must be members of "
                   f"{list(self._ranks)} other than this rank {self._rank}")
            raise CommError(msg)
        return self._next("shrink", [r for r in self._ranks if r not in dead])

    def grow(self, new_ranks: Sequence[int]) -> TorchComm:
        """See :class:`Communicator`: a fresh group of members and ``new_ranks`` at epoch + 1.

        Each newcomer calls ``TorchBackend.join(store, rank, epoch=epoch + 1)`` meanwhile.

        Raises:
            CommError: ``new_ranks`` is empty or names a member.
        """
        new = {int(r) for r in new_ranks}
        if not new or new & set(self._ranks):
            msg = (f"grow of epoch {self._epoch}: new ranks {sorted(new)} must be non-empty and not members "
                   f"already ({list(self._ranks)})")
            raise CommError(msg)
        return self._next("grow", sorted(set(self._ranks) | new))

    def rebuild(self) -> TorchComm:
        """See :class:`Communicator`: a fresh group of the same members at epoch + 1."""
        return self._next("rebuild", self._ranks)

    def split(self, color: int, key: int) -> Communicator | None:
        """Not supported by the fallback backend."""
        msg = "the plain torch.distributed backend does not split"
        raise CommError(msg)

    def close(self) -> None:
        """Release the group (parked, see module doc: never destroyed while pending work may exist)."""
        self._park()
        self._pg = None


class TorchWork:
    """An asynchronous operation of a :class:`TorchComm` (a core ``Work``): abort-aware waits.

    For NCCL, :meth:`wait` also waits until the operation completed on the device
    (torch's own ``wait`` only orders the caller's stream after it).
    """

    def __init__(self, comm: TorchComm, what: str, work: Any) -> None:
        self._comm = comm
        self._what = what
        self._work = work
        self._finished = False

    def is_completed(self) -> bool:
        """Whether the operation finished (successfully or not); never blocks."""
        return self._finished or bool(self._work.is_completed())

    def wait(self, timeout: float | None = None) -> None:
        """Block until done (raise ``CommAborted``/``PeerFailureError`` as the blocking call would).

        ``timeout`` is not used: torch's own operation timeout and the job's watchdog
        bound the wait (the agent aborts the communicator of a hung peer).
        """
        if self._finished:
            return
        self._comm._await(self._what, self._work)
        if self._comm.backend == "nccl":
            while not self._work.is_completed():
                self._comm._check()
                time.sleep(5e-5)
        self._finished = True


class TorchBackend(CommBackend):
    """Creates :class:`TorchComm` groups; ``join`` is ``create`` (every member rebuilds).

    Args:
        backend: ``"gloo"`` or ``"nccl"``.
    """

    name = "torch"

    def __init__(self, backend: str = "gloo") -> None:
        self.backend = backend

    def create(
        self,
        store: Store,
        rank: int,
        size: int,
        *,
        epoch: int = 0,
        timeout: float = 60.0,
        interrupt: threading.Event | None = None,
        ranks: Sequence[int] | None = None,
    ) -> TorchComm:
        """Rendezvous every member in ``store``, then build the group of ``epoch``.

        ``rank`` is logical; ``ranks`` lists the members' logical ranks (default
        ``range(size)``), and the torch group's rank of each is its index in the
        sorted list.

        The rendezvous is a store counter waited on in short slices, so ``interrupt``
        (set by the watchdog when a newer epoch appears) ends it at once. The group is
        then built in a helper thread, abandoned as well if ``interrupt`` fires.

        Raises:
            CommAborted: ``interrupt`` was set.
            CommError: The members did not all arrive, or the group failed to build,
                within ``timeout`` seconds.
        """
        import torch.distributed as dist

        members = tuple(sorted(ranks)) if ranks is not None else tuple(range(size))
        if len(set(members)) != size or rank not in members:
            msg = f"torch group of epoch {epoch}: rank {rank} and size {size} do not fit the members {list(members)}"
            raise CommError(msg)
        phys = members.index(rank)
        ts, prefix = torch_store_of(store)
        key = _keys.arrive(epoch)
        store.set(f"{key}/size", str(size).encode())
        store.set(f"{key}/ranks", json.dumps(list(members)).encode())
        store.add(key, 1)
        deadline = time.monotonic() + timeout
        wait_until(lambda: store.add(key, 0) >= size, interrupt, timeout, f"rendezvous of epoch {epoch}",
                   late=lambda: f"only {store.add(key, 0)} of {size} members arrived in {timeout} s",
                   error=CommError, pause=0.002, max_pause=0.002)
        pg_store: Any
        if ts is None:
            # A GPU job on mnemosyne-ccl's store without nccl4py: torch bootstraps from
            # ccl's adapter of the core store.
            from mnemosyne.ccl.torch_store import TorchStore as CclTorchStore

            pg_store = CclTorchStore(store.prefixed(_keys.comm_prefix(epoch)), timeout)
        else:
            pg_prefix = f"{prefix}/{_keys.comm_prefix(epoch)}" if prefix else _keys.comm_prefix(epoch)
            pg_store = dist.PrefixStore(pg_prefix, ts.clone().torch_store)  # type: ignore[attr-defined,arg-type]
        box: dict[str, Any] = {}
        built = threading.Event()

        def build() -> None:
            try:
                if self.backend == "nccl":
                    box["pg"] = dist.ProcessGroupNCCL(pg_store, phys, size, dist.ProcessGroupNCCL.Options())
                else:
                    box["pg"] = dist.ProcessGroupGloo(pg_store, phys, size, _OP_TIMEOUT)
            except Exception as exc:  # reported to the caller below
                box["err"] = exc
            finally:
                built.set()

        threading.Thread(target=build, name=f"mnemosyne-pg-e{epoch}", daemon=True).start()
        wait_until(lambda: built.wait(0.005), interrupt, deadline - time.monotonic(),
                   f"building the group of epoch {epoch}", late=lambda: f"took longer than {timeout} s",
                   error=CommError, pause=0.0)
        if "err" in box:
            msg = f"building the {self.backend} group of epoch {epoch} failed: {box['err']}"
            raise CommError(msg) from box["err"]
        return TorchComm(box["pg"], rank, size, epoch, self.backend, members, maker=(self, store, timeout, interrupt))

    def repair(self, old: Communicator | None, store: Store, rank: int, ranks: Sequence[int], *, epoch: int,
               joining: bool = False, timeout: float = 60.0,
               interrupt: threading.Event | None = None) -> TorchComm:
        """Every member builds a fresh group over ``ranks`` (see module doc); ``epoch`` is the membership's."""
        if old is not None:
            old.close()
        self.last_repair = "create"
        return self.create(store, rank, len(ranks), epoch=epoch, timeout=timeout, interrupt=interrupt, ranks=ranks)

    def join(self, store: Store, rank: int, *, epoch: int, timeout: float = 60.0) -> TorchComm:
        """Same as :meth:`create`: in the fallback every member rebuilds."""
        members = json.loads(store.get(f"{_keys.arrive(epoch)}/ranks", timeout))
        return self.create(store, rank, len(members), epoch=epoch, timeout=timeout, ranks=members)

    @classmethod
    def capabilities(cls) -> dict[str, bool]:
        """Nothing is native: shrink, grow and rebuild each build a fresh group (:meth:`TorchComm.shrink`)."""
        return {"shrink": False, "grow": False, "rebuild": False, "abort": True}


