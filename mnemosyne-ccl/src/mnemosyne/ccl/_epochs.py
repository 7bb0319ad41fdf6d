"""Where a flexible communicator's epochs live in the store, and how members agree on them (no torch).

Store layout under the store given to ``create`` (normally the job's namespace)::

    ccl/<tag>/epoch            highest epoch any member started building (fence)
    ccl/<tag>/e<E>/members     JSON list of logical ranks in physical order
    ccl/<tag>/e<E>/abort       reason text; any member or the agent may set it
    ccl/<tag>/e<E>/pg/...      transport bootstrap keys (Gloo addresses, NCCL ids)
    ccl/<tag>/e<E>/split<n>/<rank>  color and key of each member for split number n

The job's agent reads the fence (:func:`newest_epoch`) and aborts epochs from outside
(:func:`signal_abort`); nothing outside mnemosyne-ccl spells these keys.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from mnemosyne.core.errors import CommError, ConfigError, ProtocolError, StaleEpochError
from mnemosyne.core.store import Store

__all__ = ["advance_epoch", "agree_members", "comm_prefix", "member_order", "newest_epoch", "read_members",
           "signal_abort"]


def comm_prefix(tag: str, epoch: int) -> str:
    """Store prefix of communicator ``tag`` at ``epoch``."""
    return f"ccl/{tag}/e{epoch}"


def signal_abort(store: Store, epoch: int, reason: str, tag: str = "world") -> None:
    """Abort every member of ``tag`` at ``epoch`` from outside (e.g. from the agent).

    Members blocked in a collective raise :class:`PeerFailureError` within about
    :data:`POLL_S` seconds; members building that epoch stop waiting for peers.
    """
    store.set(f"{comm_prefix(tag, epoch)}/abort", reason.encode() or b"aborted")


def _check_ranks(name: str, ranks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(sorted({int(r) for r in ranks}))
    if len(out) != len(ranks):
        msg = f"{name}: duplicate ranks in {list(ranks)}"
        raise ConfigError(msg)
    if any(r < 0 for r in out):
        msg = f"{name}: ranks must be >= 0, got {list(ranks)}"
        raise ConfigError(msg)
    return out


def member_order(what: str, rank: int, size: int, ranks: Sequence[int] | None) -> tuple[int, ...]:
    """Physical order of a new group: ``ranks`` sorted (default ``range(size)``), checked.

    Raises:
        ConfigError: ``size`` is not the number of distinct ``ranks``, a rank is
            negative, or ``rank`` is not among them.
    """
    if ranks is None:
        if size < 1 or not 0 <= rank < size:
            msg = f"{what}: need 0 <= rank < size, got rank={rank}, size={size}"
            raise ConfigError(msg)
        return tuple(range(size))
    order = _check_ranks(what, ranks)
    if len(order) != size or size < 1:
        msg = f"{what}: size={size} but ranks={list(ranks)} name {len(order)} members (expected one per member)"
        raise ConfigError(msg)
    if rank not in order:
        msg = f"{what}: rank {rank} is not in the member list {list(order)}"
        raise ConfigError(msg)
    return order


def advance_epoch(store: Store, tag: str, epoch: int) -> None:
    """Record that ``epoch`` of ``tag`` is being built; refuse an epoch older than the newest.

    Raises:
        StaleEpochError: A newer epoch of ``tag`` was already started.
    """
    key = f"ccl/{tag}/epoch"
    mine = str(epoch).encode()
    expected = b""
    for _ in range(100):
        stored = store.compare_set(key, expected, mine)
        if stored == mine:
            return
        try:
            current = int(stored)
        except ValueError:
            msg = f"store key {key!r} holds {stored[:40]!r}, expected an epoch number"
            raise ProtocolError(msg) from None
        if current > epoch:
            msg = (f"communicator {tag!r}: epoch {epoch} is stale, epoch {current} was already started "
                   "(a rebuild must name a newer epoch; a newcomer must join the survivors' grown epoch)")
            raise StaleEpochError(msg)
        expected = stored
    msg = f"communicator {tag!r}: could not advance the epoch key to {epoch} (too much contention)"
    raise CommError(msg)


def agree_members(store: Store, tag: str, epoch: int, order: Sequence[int]) -> None:
    """Publish the member list of ``epoch``, or check it against the one already published.

    Raises:
        ConfigError: Another member published a different list (after setting the
            epoch's abort key, so that nobody waits for a group that cannot form).
    """
    prefix = comm_prefix(tag, epoch)
    mine = json.dumps(list(order)).encode()
    stored = store.compare_set(f"{prefix}/members", b"", mine)
    if stored != mine:
        reason = (f"membership disagreement for {tag!r} epoch {epoch}: this member expects ranks "
                  f"{list(order)} (size {len(order)}), another published {stored.decode(errors='replace')}")
        store.set(f"{prefix}/abort", reason.encode())
        raise ConfigError(reason)


def read_members(store: Store, tag: str, epoch: int, timeout: float) -> tuple[int, ...]:
    """Wait for and return the member list the survivors published for ``epoch``."""
    raw = store.get(f"{comm_prefix(tag, epoch)}/members", timeout)
    try:
        order = json.loads(raw)
        if not isinstance(order, list) or not all(isinstance(r, int) for r in order):
            bad = "not a list of ints"
            raise ValueError(bad)
    except ValueError as exc:
        msg = f"member list of {tag!r} epoch {epoch} is malformed: {raw[:80]!r} ({exc})"
        raise ProtocolError(msg) from None
    return tuple(order)


def newest_epoch(store: Store, tag: str = "world") -> int | None:
    """The newest epoch of ``tag`` any member started building (the fence), None before the first."""
    key = f"ccl/{tag}/epoch"
    return int(store.get(key, 5.0)) if store.check([key]) else None
