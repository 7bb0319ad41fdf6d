"""Data position: which batch every step uses, and how to get back to it after recovery.

The position of step ``k`` is a pure function of ``k``: epoch ``k // L`` and batch
``k % L`` of that epoch, with ``L`` batches per epoch. Every rank derives it from the
step counter, which recovery agrees on, so the position itself never needs to travel.

Use :class:`ResumableSampler` (a DistributedSampler that can start mid-epoch) for an
O(1) seek; any other re-iterable loader works too, by replaying the epoch's batches up
to the position (correct, slower). The sampler must not draw from the global RNG
(shuffling uses its own generator seeded by ``seed + epoch``).

Data ranks (shrink to continue): the job's data-parallel world is always
``MNEMOSYNE_WORLD_SIZE`` shards. While a rank is missing (a job launched with
``--shrink`` continues without a failed rank until its replacement is ready), a present
member also runs the missing rank's batch: :func:`assign_data_ranks` says who hosts
whom, and :func:`loader_for_rank` derives a missing rank's loader from a member's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from mnemosyne.core.env import MNEMOSYNE_RANK, MNEMOSYNE_WORLD_SIZE, env_int
from mnemosyne.core.errors import ConfigError

__all__ = ["DataCursor", "DataFeed", "ResumableSampler", "assign_data_ranks", "loader_for_rank"]


class ResumableSampler(Sampler[int]):
    """Shards a dataset across ranks like DistributedSampler, and can start mid-epoch.

    Args:
        data_source: The dataset (only its length is used) or the length itself.
        num_replicas: Number of data-parallel ranks (default: ``MNEMOSYNE_WORLD_SIZE``).
        rank: This rank (default: ``MNEMOSYNE_RANK``).
        shuffle: Shuffle each epoch with a generator seeded by ``seed + epoch``.
        seed: Shuffle seed, equal on every rank.
        drop_last: Drop the tail instead of padding so every rank gets as many samples.
    """

    def __init__(self, data_source: Sized | int, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        self.total = data_source if isinstance(data_source, int) else len(data_source)
        self.num_replicas = num_replicas if num_replicas is not None else (env_int(MNEMOSYNE_WORLD_SIZE, 1) or 1)
        self.rank = rank if rank is not None else (env_int(MNEMOSYNE_RANK, 0) or 0)
        if not 0 <= self.rank < self.num_replicas:
            msg = f"ResumableSampler: rank {self.rank} not in [0, {self.num_replicas})"
            raise ConfigError(msg)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0
        if drop_last:
            self.num_samples = self.total // self.num_replicas
        else:
            self.num_samples = math.ceil(self.total / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shuffle order) of the next iteration."""
        self.epoch = epoch

    def seek(self, start: int) -> None:
        """Make the next iteration skip this rank's first ``start`` samples of the epoch."""
        self.start = start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.total, generator=g).tolist()
        else:
            indices = list(range(self.total))
        want = self.num_samples * self.num_replicas
        if want > len(indices):
            indices += (indices * math.ceil(want / max(len(indices), 1)))[: want - len(indices)]
        indices = indices[:want][self.rank::self.num_replicas]
        start, self.start = self.start, 0
        return iter(indices[start:])

    def __len__(self) -> int:
        return self.num_samples


class DataCursor:
    """Hands out the batch of each step and repositions after recovery.

    Args:
        data: A DataLoader (ideally over a :class:`ResumableSampler`) or any sized,
            re-iterable collection of batches.
    """

    def __init__(self, data: Iterable[Any]) -> None:
        if not isinstance(data, Sized):
            msg = "steps(data=...): the data must have a length (batches per epoch) to be resumable"
            raise ConfigError(msg)
        self.data = data
        self.per_epoch = len(data)
        if self.per_epoch < 1:
            msg = "steps(data=...): the data has no batches"
            raise ConfigError(msg)
        self._it: Iterator[Any] | None = None
        self._next = -1  # step whose batch the iterator yields next
        self._cached: tuple[int, Any] | None = None

    def _sampler(self) -> Any:
        return getattr(self.data, "sampler", None)

    def _open(self, step: int) -> None:
        epoch, offset = divmod(step, self.per_epoch)
        sampler = self._sampler()
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        skip = offset
        if isinstance(sampler, ResumableSampler):
            batch_size = getattr(self.data, "batch_size", None)
            if batch_size:
                sampler.seek(offset * batch_size)
                skip = 0
        self._it = iter(self.data)
        for _ in range(skip):  # no seekable sampler: replay the epoch up to the position
            next(self._it)
        self._next = step

    def batch(self, step: int) -> Any:
        """Return the batch of ``step`` (the same object again if asked twice in a row)."""
        if self._cached is not None and self._cached[0] == step:
            return self._cached[1]
        if self._it is None or self._next != step or step % self.per_epoch == 0:
            self._open(step)
        assert self._it is not None
        b = next(self._it)
        self._next = step + 1
        self._cached = (step, b)
        return b


def assign_data_ranks(world_size: int, present: Sequence[int]) -> dict[int, list[int]]:
    """Which data ranks each present member runs: its own, then the missing ones it hosts.

    The missing ranks, sorted, go round-robin over the present members, sorted:
    ``missing[i]`` is hosted by ``present[i % len(present)]``. Every data rank
    ``0..world_size-1`` is then run by exactly one member.

    Raises:
        ConfigError: No member is present, or a member is not a rank of the world.
    """
    members = sorted(set(present))
    if not members:
        msg = "assign_data_ranks: no member is present"
        raise ConfigError(msg)
    bad = [r for r in members if not 0 <= r < world_size]
    if bad:
        msg = f"assign_data_ranks: members {bad} are not ranks of a world of {world_size}"
        raise ConfigError(msg)
    out = {r: [r] for r in members}
    missing = [r for r in range(world_size) if r not in out]
    for i, d in enumerate(missing):
        out[members[i % len(members)]].append(d)
    return out


# DataLoader arguments that a copy for another data rank keeps as they are (the sampler
# is the only thing that changes). The _WORKER_ARGS are only valid with worker processes.
_LOADER_ARGS = ("batch_size", "num_workers", "collate_fn", "pin_memory", "drop_last", "timeout", "worker_init_fn",
                "generator", "pin_memory_device", "in_order")
_WORKER_ARGS = ("prefetch_factor", "persistent_workers", "multiprocessing_context")


def loader_for_rank(data: Any, rank: int) -> Any:
    """The loader of data rank ``rank``, derived from ``data`` (this member's loader).

    Works for a ``torch.utils.data.DataLoader`` over a :class:`ResumableSampler`: the
    copy has the same dataset and loader settings and a copy of the sampler set to
    ``rank``. Returns None for anything else (pass ``Job.steps(data_for_rank=...)``).
    """
    from torch.utils.data import DataLoader

    if not isinstance(data, DataLoader) or not isinstance(data.sampler, ResumableSampler):
        return None
    sampler = copy.copy(data.sampler)
    if not 0 <= rank < sampler.num_replicas:
        msg = f"loader_for_rank: rank {rank} not in [0, {sampler.num_replicas})"
        raise ConfigError(msg)
    sampler.rank = rank
    sampler.start = 0
    kwargs = {k: getattr(data, k) for k in _LOADER_ARGS if hasattr(data, k)}
    if data.num_workers > 0:
        kwargs.update({k: getattr(data, k) for k in _WORKER_ARGS if hasattr(data, k)})
    return DataLoader(data.dataset, sampler=sampler, **kwargs)


class DataFeed:
    """The batches one member runs: its own rank's, and those of the missing ranks it hosts.

    Args:
        rank: This member's data rank.
        data: Its loader.
        data_for_rank: Returns the loader of data rank ``d`` (else derived from ``data``
            by :func:`loader_for_rank`).
    """

    def __init__(self, rank: int, data: Iterable[Any], data_for_rank: Callable[[int], Iterable[Any]] | None) -> None:
        self.data = data
        self.data_for_rank = data_for_rank
        self.cursors = {rank: DataCursor(data)}
        self.loaders: dict[int, Iterable[Any]] = {}

    def loader(self, d: int) -> Iterable[Any]:
        """The loader of data rank ``d``.

        Raises:
            ConfigError: It can be neither derived from ``data`` nor obtained from ``data_for_rank``.
        """
        if d in self.loaders:
            return self.loaders[d]
        loader = self.data_for_rank(d) if self.data_for_rank is not None else loader_for_rank(self.data, d)
        if loader is None:
            msg = (f"Job.steps(): this member must run data rank {d}'s batches (the job continues without "
                   "that rank), but no loader for it is known: pass a DataLoader over a ResumableSampler, "
                   "or data_for_rank=lambda d: <the loader of data rank d>")
            raise ConfigError(msg)
        self.loaders[d] = loader
        return loader

    def batch(self, d: int, step: int) -> Any:
        """Data rank ``d``'s batch of ``step``."""
        if d not in self.cursors:
            self.cursors[d] = DataCursor(self.loader(d))
        return self.cursors[d].batch(step)
