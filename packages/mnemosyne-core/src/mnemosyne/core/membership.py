"""Membership epochs: who is in the job, and which process holds each logical rank.

A job's membership changes only by publishing a new :class:`Membership` with a higher
epoch. Logical ranks are what training code sees (data shard, DP replica index); member
ids name the process incarnation that currently holds each logical rank. After a failure
the replacement takes the failed rank's logical rank under a new member id, so user code
never notices the swap.

Call order: the agent (or whoever detected the failure) calls :meth:`Membership.replace`
or :meth:`Membership.remove` and publishes the result to the store; every trainer's
watchdog reads it and compares epochs; only a strictly higher epoch is acted on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mnemosyne.core.errors import ConfigError, ProtocolError, StaleEpochError

__all__ = ["Membership", "MembershipChange"]


@dataclass(frozen=True)
class MembershipChange:
    """The difference between two consecutive epochs.

    Attributes:
        epoch: The new epoch.
        removed: Logical ranks whose holder left (died, hung, raised).
        replaced: Logical ranks now held by a new process (subset of ``removed``).
        reason: Free text for the event log (e.g. ``"rank 2 exited with -9"``).
    """

    epoch: int
    removed: tuple[int, ...]
    replaced: tuple[int, ...]
    reason: str = ""


@dataclass(frozen=True)
class Membership:
    """One epoch of the job's membership.

    Attributes:
        epoch: Monotonic counter, starting at 0 when the job starts.
        members: Member id per logical rank, ``members[r]`` holds rank ``r``. A logical
            rank whose holder died and was not replaced is absent (shrunk job).
        reason: Why this epoch was published.
    """

    epoch: int
    members: Mapping[int, str] = field(default_factory=dict)
    reason: str = ""

    def __post_init__(self) -> None:
        if self.epoch < 0:
            msg = f"membership epoch must be >= 0, got {self.epoch}"
            raise ConfigError(msg)
        if len(set(self.members.values())) != len(self.members):
            msg = f"membership epoch {self.epoch}: a member id holds two ranks: {dict(self.members)}"
            raise ConfigError(msg)

    @classmethod
    def initial(cls, world_size: int, incarnation: str = "g0") -> Membership:
        """Return epoch 0 with ranks ``0..world_size-1`` held by first-generation members."""
        if world_size < 1:
            msg = f"world_size must be >= 1, got {world_size}"
            raise ConfigError(msg)
        return cls(0, {r: f"r{r}.{incarnation}" for r in range(world_size)}, "start")

    @property
    def ranks(self) -> tuple[int, ...]:
        """Logical ranks present in this epoch, sorted."""
        return tuple(sorted(self.members))

    @property
    def size(self) -> int:
        """Number of live members."""
        return len(self.members)

    def next(self, *, replace: Iterable[int] = (), remove: Iterable[int] = (), add: Iterable[int] = (),
             reason: str = "") -> Membership:
        """Return the next epoch with several changes at once (one epoch, one repair).

        ``replace``: present ranks held by new incarnations; ``remove``: present ranks
        dropped (shrink); ``add``: absent ranks held again (grow back).

        Raises:
            ConfigError: A rank to replace or remove is absent, a rank to add is present,
                or a rank appears in two lists.
        """
        rep, rem, new_ranks = (tuple(sorted(set(x))) for x in (replace, remove, add))
        both = (set(rep) & set(rem)) | (set(rep) & set(new_ranks)) | (set(rem) & set(new_ranks))
        if both:
            msg = f"ranks {sorted(both)} appear in more than one of replace/remove/add"
            raise ConfigError(msg)
        self._check_present(rep + rem)
        present = [r for r in new_ranks if r in self.members]
        if present:
            msg = f"cannot add ranks {present}: already present in epoch {self.epoch}"
            raise ConfigError(msg)
        members = {r: m for r, m in self.members.items() if r not in rem}
        for r in rep + new_ranks:
            members[r] = f"r{r}.g{self.epoch + 1}"
        return Membership(self.epoch + 1, members, reason)

    def replace(self, ranks: Iterable[int], reason: str = "") -> tuple[Membership, MembershipChange]:
        """Return the next epoch where each of ``ranks`` is held by a new incarnation."""
        ranks = tuple(sorted(set(ranks)))
        self._check_present(ranks)
        new = dict(self.members)
        for r in ranks:
            new[r] = f"r{r}.g{self.epoch + 1}"
        nxt = Membership(self.epoch + 1, new, reason)
        return nxt, MembershipChange(nxt.epoch, ranks, ranks, reason)

    def remove(self, ranks: Iterable[int], reason: str = "") -> tuple[Membership, MembershipChange]:
        """Return the next epoch without ``ranks`` (shrink; no replacement)."""
        ranks = tuple(sorted(set(ranks)))
        self._check_present(ranks)
        new = {r: m for r, m in self.members.items() if r not in ranks}
        nxt = Membership(self.epoch + 1, new, reason)
        return nxt, MembershipChange(nxt.epoch, ranks, (), reason)

    def add(self, ranks: Iterable[int], reason: str = "") -> tuple[Membership, MembershipChange]:
        """Return the next epoch with absent logical ``ranks`` held again (grow back)."""
        ranks = tuple(sorted(set(ranks)))
        present = [r for r in ranks if r in self.members]
        if present:
            msg = f"cannot add ranks {present}: already present in epoch {self.epoch}"
            raise ConfigError(msg)
        new = dict(self.members)
        for r in ranks:
            new[r] = f"r{r}.g{self.epoch + 1}"
        nxt = Membership(self.epoch + 1, new, reason)
        return nxt, MembershipChange(nxt.epoch, (), ranks, reason)

    def check_newer(self, other: Membership) -> None:
        """Raise :class:`StaleEpochError` unless ``other`` is a strictly later epoch."""
        if other.epoch <= self.epoch:
            msg = f"stale membership: epoch {other.epoch} is not newer than current epoch {self.epoch}"
            raise StaleEpochError(msg)

    def _check_present(self, ranks: tuple[int, ...]) -> None:
        missing = [r for r in ranks if r not in self.members]
        if missing:
            msg = f"ranks {missing} are not members of epoch {self.epoch} (members: {self.ranks})"
            raise ConfigError(msg)

    def to_json(self) -> bytes:
        """Serialize for the store (JSON, never pickle)."""
        body = {"epoch": self.epoch, "members": {str(k): v for k, v in self.members.items()}}
        body["reason"] = self.reason
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Membership:
        """Parse :meth:`to_json` output.

        Raises:
            ProtocolError: ``data`` is not a membership record.
        """
        try:
            body = json.loads(data)
            members = {int(k): str(v) for k, v in body["members"].items()}
            return cls(int(body["epoch"]), members, str(body.get("reason", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            msg = f"malformed membership record {data[:80]!r}: expected JSON with 'epoch' and 'members' ({exc})"
            raise ProtocolError(msg) from None
