"""Transport-independent half of a flexible communicator (no torch here).

It owns what every backend shares: the logical-to-physical rank map, the store layout
(one prefix per tag and epoch, never reused), agreement on the member list, epoch
fencing, the abort flag and the wait loop that turns a blocked collective into a prompt
:class:`~mnemosyne.core.errors.CommAborted` / :class:`~mnemosyne.core.errors.PeerFailureError`.

The store layout is :mod:`mnemosyne.ccl._epochs`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from mnemosyne.ccl._epochs import _check_ranks, advance_epoch, agree_members, comm_prefix
from mnemosyne.core.comm import CommBackend, Communicator, ReduceOp
from mnemosyne.core.errors import (
    CollectiveTimeout,
    CommAborted,
    ConfigError,
    PeerFailureError,
)
from mnemosyne.core.store import Store, wait_key

__all__ = ["FlexBackend", "FlexCommunicator", "FlexWork"]

logger = logging.getLogger(__name__)

#: How often a blocked collective looks at the store's abort key (seconds).
POLL_S = 0.05


class FlexWork:
    """An asynchronous operation of a :class:`FlexCommunicator` (a core ``Work``).

    Args:
        comm: The communicator that issued it (its abort flag, abort key and timeout
            govern :meth:`wait`).
        what: Name of the operation, for error messages.
        done: Set by the transport when the operation completes (and by ``abort``).
        is_complete: Whether the operation completed; may raise the transport's error.
        finish: Run once after completion, in the waiting thread (e.g. to collect the
            transport's result or error).
        signalled: Completion always sets ``done`` (see ``wait_until``).
    """

    def __init__(self, comm: FlexCommunicator, what: str, done: threading.Event, is_complete: Callable[[], bool],
                 finish: Callable[[], None] | None = None, *, signalled: bool = False) -> None:
        self._comm = comm
        self._what = what
        self._done = done
        self._is_complete = is_complete
        self._finish = finish
        self._signalled = signalled
        self._finished = False

    def is_completed(self) -> bool:
        """Whether the operation finished (successfully or not); never blocks."""
        if self._finished:
            return True
        try:
            return bool(self._is_complete())
        except Exception:  # a failed operation is finished too; wait() raises its error
            return True

    def wait(self, timeout: float | None = None) -> None:
        """Block until done; raise ``CommAborted``/``PeerFailureError``/``CollectiveTimeout`` as a blocking call."""
        if self._finished:
            return
        self._comm.wait_until(self._done, self._is_complete, self._what, timeout, signalled=self._signalled)
        if self._finish is not None:
            self._finish()
        self._finished = True


class FlexCommunicator(ABC):
    """Base of the backends' communicators; implements :class:`~mnemosyne.core.comm.Communicator`.

    Args:
        store: The store given to ``create`` (the job's namespace); keys go under
            ``ccl/<tag>/e<epoch>``.
        tag: Name of this communicator family (``"world"``; splits get derived tags).
        epoch: Membership epoch.
        order: Logical ranks in physical order (physical index ``i`` holds ``order[i]``).
        rank: This process's logical rank.
        timeout: Seconds a collective or a rebuild may take before it fails.
    """

    backend_name = ""
    #: Longest sleep between two completion checks of an operation whose completion
    #: sets no event (``wait_until`` without ``signalled``): bounds how late a waiter
    #: sees a completed GPU collective.
    poll_cap_s = POLL_S

    def __init__(self, store: Store, tag: str, epoch: int, order: Sequence[int], rank: int, timeout: float) -> None:
        self._store = store
        self.tag = tag
        self._epoch = epoch
        self._order = tuple(order)
        self._rank = rank
        self.timeout = timeout
        self._phys = {r: i for i, r in enumerate(self._order)}
        if rank not in self._phys:
            msg = f"rank {rank} is not a member of {tag!r} epoch {epoch} (members {sorted(self._order)})"
            raise ConfigError(msg)
        self._abort_reason: str | None = None
        self._peer_failed = False
        self._lock = threading.Lock()
        self._wakeups: set[threading.Event] = set()
        self._splits = 0
        self._prefix = comm_prefix(tag, epoch)

    # -- identity ----------------------------------------------------------------

    @property
    def rank(self) -> int:
        """This process's logical rank."""
        return self._rank

    @property
    def size(self) -> int:
        """Number of members."""
        return len(self._order)

    @property
    def epoch(self) -> int:
        """Membership epoch of this communicator."""
        return self._epoch

    @property
    def ranks(self) -> tuple[int, ...]:
        """Logical ranks of the members, sorted."""
        return tuple(sorted(self._order))

    @property
    def order(self) -> tuple[int, ...]:
        """Logical ranks in physical (transport) order."""
        return self._order

    @property
    def physical_rank(self) -> int:
        """This process's index in the transport's group (what torch calls its rank)."""
        return self._phys[self._rank]

    def physical(self, logical: int) -> int:
        """Transport index of logical rank ``logical``.

        Raises:
            ConfigError: ``logical`` is not a member.
        """
        try:
            return self._phys[logical]
        except KeyError:
            msg = f"rank {logical} is not a member of {self.tag!r} epoch {self._epoch} (members {self.ranks})"
            raise ConfigError(msg) from None

    @property
    def store(self) -> Store:
        """The store this communicator bootstraps from."""
        return self._store

    def __repr__(self) -> str:
        state = f", aborted={self._abort_reason!r}" if self._abort_reason is not None else ""
        return (f"{type(self).__name__}(tag={self.tag!r}, epoch={self._epoch}, rank={self._rank}, "
                f"ranks={list(self.ranks)}{state})")

    # -- abort -------------------------------------------------------------------

    def abort(self, reason: str = "") -> None:
        """Abort from any thread; blocked and later operations raise at once. Idempotent."""
        with self._lock:
            if self._abort_reason is None:
                self._abort_reason = reason or "aborted"
            wakeups = list(self._wakeups)
        for ev in wakeups:
            ev.set()
        self._on_abort()

    @property
    def aborted(self) -> bool:
        """Whether :meth:`abort` was called or a peer failure was seen."""
        return self._abort_reason is not None

    def _on_abort(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """Backend hook run after the flag is set (must not block)."""

    def _raise_if_aborted(self) -> None:
        reason = self._abort_reason
        if reason is not None:
            cls = PeerFailureError if self._peer_failed else CommAborted
            msg = f"{self!r}: {reason}"
            raise cls(msg)

    def _remote_abort(self) -> str | None:
        key = f"{self._prefix}/abort"
        try:
            if self._store.check([key]):
                return self._store.get(key, 1.0).decode(errors="replace")
        except Exception as exc:  # a store hiccup must not hide the collective's own outcome
            logger.debug("abort-key poll failed: %s", exc)
        return None

    def fail(self, reason: str, *, publish: bool = True) -> PeerFailureError:
        """Mark a peer failure, tell the other members through the store, return the error."""
        with self._lock:
            self._peer_failed = True
        text = f"rank {self._rank} (epoch {self._epoch}): {reason}"
        if publish:
            try:
                self._store.compare_set(f"{self._prefix}/abort", b"", text.encode())
            except Exception as exc:
                logger.warning("could not publish the peer failure to the store: %s", exc)
        self.abort(text)
        return PeerFailureError(f"{self!r}: peer failure: {reason}")

    def wait_until(self, done: threading.Event, is_complete: Callable[[], bool], what: str,
                   timeout: float | None = None, *, signalled: bool = False) -> None:
        """Block until ``done`` is set and ``is_complete()``; raise on abort, peer failure or timeout.

        ``done`` is set by the transport's completion callback; :meth:`abort` sets it too
        so that a blocked caller wakes up at once. ``signalled=True`` promises that
        completion always sets ``done`` (Gloo's callbacks and helper thread): then the
        caller sleeps on ``done`` in POLL_S slices instead of short busy slices, whose GIL
        wake-ups cost ~25% of a 15 ms CPU step (tools/bench/recovery.py, 16-core host).
        Without it (NCCL: completion is an event query) short slices keep latency low.
        """
        self._raise_if_aborted()
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._lock:
            self._wakeups.add(done)
        # Short slices first (an op that completes without a callback, e.g. Gloo send,
        # is seen quickly), then POLL_S slices; the store is read at most every POLL_S.
        slice_s = POLL_S if signalled else 1e-4
        next_poll = time.monotonic() + POLL_S
        try:
            while True:
                if done.wait(slice_s) and is_complete():
                    return
                if is_complete():
                    return
                slice_s = min(POLL_S if signalled else self.poll_cap_s, slice_s * 2)
                self._raise_if_aborted()
                if time.monotonic() < next_poll:
                    continue
                next_poll = time.monotonic() + POLL_S
                remote = self._remote_abort()
                if remote is not None:
                    with self._lock:
                        self._peer_failed = True
                    self.abort(f"{what} interrupted: {remote}")
                    self._raise_if_aborted()
                if time.monotonic() >= deadline:
                    text = f"{what} did not complete within {limit:g} s"
                    self.fail(text)
                    msg = f"{self!r}: {text}"
                    raise CollectiveTimeout(msg)
        finally:
            with self._lock:
                self._wakeups.discard(done)

    # -- membership changes --------------------------------------------------------

    def shrink(self, dead_ranks: Sequence[int]) -> FlexCommunicator:
        """Return the survivors' communicator at epoch + 1 (called by every survivor only)."""
        dead = _check_ranks("shrink", dead_ranks)
        missing = [r for r in dead if r not in self._phys]
        if missing:
            msg = f"shrink: ranks {missing} are not members of {self!r}"
            raise ConfigError(msg)
        if self._rank in dead:
            msg = f"shrink: rank {self._rank} is listed as dead but is calling shrink (only survivors call it)"
            raise ConfigError(msg)
        if len(dead) == len(self._order):
            msg = "shrink: cannot remove every member"
            raise ConfigError(msg)
        order = tuple(r for r in self._order if r not in dead)
        return self._transition("shrink", order, dead=dead)

    def grow(self, new_ranks: Sequence[int]) -> FlexCommunicator:
        """Return the communicator with ``new_ranks`` added, at epoch + 1.

        Survivors call it while each newcomer calls ``backend.join(store, rank,
        epoch=self.epoch + 1)``; the newcomer holds the logical rank it joins as.
        """
        new = _check_ranks("grow", new_ranks)
        present = [r for r in new if r in self._phys]
        if present:
            msg = f"grow: ranks {present} are already members of {self!r}"
            raise ConfigError(msg)
        if not new:
            msg = "grow: no ranks to add"
            raise ConfigError(msg)
        return self._transition("grow", self._grown_order(new), new=new)

    def rebuild(self) -> FlexCommunicator:
        """Return a fresh communicator with the same members at epoch + 1."""
        return self._transition("rebuild", self._order)

    def _grown_order(self, new: tuple[int, ...]) -> tuple[int, ...]:
        """Physical order after adding ``new`` (Gloo: sorted; NCCL Grow appends)."""
        return tuple(sorted(self._order + new))

    def _transition(self, what: str, order: tuple[int, ...], *, dead: tuple[int, ...] = (),
                    new: tuple[int, ...] = ()) -> FlexCommunicator:
        epoch = self._epoch + 1
        # The old group is finished either way: aborting wakes any thread still blocked in
        # it, and the members of the old epoch that are still waiting see the abort key.
        self.abort(f"superseded by {what} to epoch {epoch}")
        if dead:
            # The old epoch is broken: wake every member still blocked in it. Not for
            # rebuild/grow, where the old epoch is healthy and a slower member may still
            # be finishing its last collective in it.
            try:
                self._store.compare_set(f"{self._prefix}/abort", b"",
                                        f"ranks {list(dead)} failed; survivors shrink to epoch {epoch}".encode())
            except Exception as exc:  # best effort: the agent's epoch also reaches them
                logger.warning("could not publish the end of epoch %d: %s", self._epoch, exc)
        advance_epoch(self._store, self.tag, epoch)
        agree_members(self._store, self.tag, epoch, order)
        started = time.perf_counter()
        try:
            comm = self._make(what, order, epoch, dead=dead, new=new)
        finally:
            # Released whether the build succeeded or not: a build that a newer epoch
            # interrupted leaves this group just as finished, and if it were released
            # with the last reference instead (the exception's traceback, dropped by the
            # caller), its destructor would wait for stuck work in the caller's thread.
            self._retire()
        logger.info("%s: %s to epoch %d (ranks %s) in %.3f s", self.tag, what, epoch, list(comm.ranks),
                    time.perf_counter() - started)
        return comm

    @abstractmethod
    def _make(self, what: str, order: tuple[int, ...], epoch: int, *, dead: tuple[int, ...],
              new: tuple[int, ...]) -> FlexCommunicator:
        """Build the next epoch's communicator (members already agreed)."""

    @abstractmethod
    def _retire(self) -> None:
        """Release this epoch's transport without blocking the caller."""

    # -- split ---------------------------------------------------------------------

    def split(self, color: int, key: int) -> FlexCommunicator | None:
        """Partition members by ``color`` (collective); order each part by ``key`` then rank.

        Ranks of a part are dense (``0..k-1``). Returns None for a negative color.
        """
        self._raise_if_aborted()
        n = self._splits
        self._splits += 1
        base = f"{self._prefix}/split{n}"
        self._store.set(f"{base}/{self._rank}", json.dumps([int(color), int(key)]).encode())
        keys = [f"{base}/{r}" for r in self._order]
        self.wait_store(keys, f"split #{n}")
        entries: list[tuple[int, int, int]] = []
        for r in self._order:
            c, k = json.loads(self._store.get(f"{base}/{r}", self.timeout))
            entries.append((int(c), int(k), r))
        if color < 0:
            return None
        part = sorted((k, r) for c, k, r in entries if c == color)
        new_rank = [r for _, r in part].index(self._rank)
        tag = f"{self.tag}.s{n}c{color}"
        order = tuple(range(len(part)))
        advance_epoch(self._store, tag, self._epoch)
        agree_members(self._store, tag, self._epoch, order)
        return self._make_split(tag, order, new_rank, [r for _, r in part])

    @abstractmethod
    def _make_split(self, tag: str, order: tuple[int, ...], rank: int, parent_ranks: list[int]) -> FlexCommunicator:
        """Build the sub-communicator of one color (members agreed; ``parent_ranks`` in new order)."""

    def wait_store(self, keys: list[str], what: str) -> None:
        """Wait for store keys in short slices, so that an abort interrupts the wait."""
        deadline = time.monotonic() + self.timeout
        while not self._store.check(keys):
            self._raise_if_aborted()
            remote = self._remote_abort()
            if remote is not None:
                self.abort(f"{what} interrupted: {remote}")
                self._raise_if_aborted()
            if time.monotonic() >= deadline:
                msg = f"{self!r}: {what}: members did not arrive within {self.timeout:g} s"
                raise CollectiveTimeout(msg)
            with contextlib.suppress(TimeoutError):
                self._store.wait(keys, POLL_S * 4)

    # -- collectives (backends) ----------------------------------------------------

    @abstractmethod
    def all_reduce(self, tensor: Any, op: ReduceOp = ReduceOp.SUM, *, async_op: bool = False) -> FlexWork | None:
        """Reduce ``tensor`` in place across all members (``async_op``: return a work to wait on)."""

    @abstractmethod
    def broadcast(self, tensor: Any, root: int) -> None:
        """Copy ``tensor`` from logical rank ``root`` to every member."""

    @abstractmethod
    def all_gather(self, outputs: list[Any], tensor: Any) -> None:
        """Gather every member's ``tensor`` into ``outputs`` (sorted logical rank order)."""

    @abstractmethod
    def reduce_scatter(self, output: Any, inputs: list[Any], op: ReduceOp = ReduceOp.SUM) -> None:
        """Reduce ``inputs[i]`` across members into ``output`` of the i-th member (sorted order)."""

    @abstractmethod
    def send(self, tensor: Any, dst: int) -> None:
        """Send ``tensor`` to logical rank ``dst``."""

    @abstractmethod
    def recv(self, tensor: Any, src: int) -> None:
        """Receive into ``tensor`` from logical rank ``src``."""

    @abstractmethod
    def barrier(self) -> None:
        """Block until every member arrives."""

    @abstractmethod
    def close(self) -> None:
        """Release resources; the communicator is unusable afterwards."""


class FlexBackend(CommBackend):
    """What every mnemosyne-ccl backend shares: :meth:`repair` by rebuild, shrink, grow or join."""

    def repair(self, old: Communicator | None, store: Store, rank: int, ranks: Sequence[int], *, epoch: int,
               joining: bool = False, timeout: float = 30.0,
               interrupt: threading.Event | None = None) -> Communicator:
        """See :meth:`CommBackend.repair`; ``epoch`` is the "world" family's epoch to build.

        A member whose communicator is at ``epoch - 1`` repairs it in one step: with the
        same logical ranks by ``rebuild()`` (Gloo's physical order stays sorted, so
        reductions sum in the same order as before), with fewer by ``shrink(dead)``, with
        more by ``grow(added)`` (the newcomers ``join``). A newcomer joins ``epoch`` once a
        survivor published the member list (waiting interruptibly); a member whose
        communicator is older (it missed an epoch while recovering), or whose members
        changed both ways, creates ``epoch`` over ``ranks``, which agrees on the same
        member list. The agent's ``signal_abort`` of ``epoch`` ends any of these builds.
        """
        if old is not None and old.epoch == epoch - 1:
            have, want = set(old.ranks), set(ranks)
            if have == want:
                self.last_repair = "rebuild"
                return old.rebuild()
            if want < have:
                self.last_repair = "shrink"
                return old.shrink(sorted(have - want))
            if have < want:
                self.last_repair = "grow"
                return old.grow(sorted(want - have))
        if old is not None:
            old.close()
        if old is None and joining and len(ranks) > 1:
            wait_key(store, f"{comm_prefix('world', epoch)}/members", interrupt, timeout)
            self.last_repair = "join"
            return self.join(store, rank, epoch=epoch, timeout=timeout)
        self.last_repair = "create"
        return self.create(store, rank, len(ranks), epoch=epoch, timeout=timeout, ranks=ranks)


def _typecheck(c: FlexCommunicator) -> Communicator:
    return c  # mypy proves that FlexCommunicator satisfies the core protocol
