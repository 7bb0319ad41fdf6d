"""A torch ``DeviceMesh`` whose dimension groups are repairable :class:`FlexProcessGroup` s.

FSDP2 (``fully_shard``) and HSDP keep the ProcessGroups they were given at
``fully_shard()`` time, and a rank's shard is fixed by its rank in the shard group. A
repair must therefore keep the same group objects, ranks and sizes and change only the
communicator underneath: :meth:`FlexMesh.repair` rebuilds exactly the groups that
contain a dead rank (a fresh epoch of that group's own communicator family) and
:meth:`FlexProcessGroup.swap` s it in; every other group keeps its communicator.
(``torch.distributed.shrink_group`` renumbers ranks, which FSDP2 cannot survive.)

Every group is its own communicator family, tagged ``mesh.<dim>.<index>`` (store keys
under ``ccl/mesh.<dim>.<index>/e<epoch>``), built with the backend's ``create(...,
tag=, ranks=)`` over the group's global ranks. The groups are registered with
``torch.distributed`` under their global ranks (``get_process_group_ranks`` and
``DeviceMesh.from_group`` read that). When no default group exists a rank-only one is
installed, because ``DeviceMesh`` and FSDP2 ask ``dist.get_rank()``; it carries no
transport, so a stray ``dist.all_reduce()`` without a group fails instead of reaching a
group that no repair knows about.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from mnemosyne.ccl._base import FlexBackend
from mnemosyne.ccl.pg import FlexProcessGroup
from mnemosyne.core.errors import CommAborted, ConfigError
from mnemosyne.core.store import Store

__all__ = ["FlexMesh", "mesh_groups", "reset_fsdp"]

logger = logging.getLogger(__name__)


def mesh_groups(shape: Sequence[int], rank: int) -> list[tuple[int, tuple[int, ...]]]:
    """For each mesh dimension, ``(group index, global ranks)`` of the group holding ``rank``.

    Ranks are laid out row-major (``torch.arange(world).reshape(shape)``, as
    ``init_device_mesh``): along dimension ``d`` a group is the ranks that differ only in
    their ``d``-th coordinate; its index numbers the groups of that dimension.

    Raises:
        ConfigError: An empty or non-positive shape, or ``rank`` outside it.
    """
    dims = [int(n) for n in shape]
    if not dims or any(n < 1 for n in dims):
        msg = f"mesh shape {list(shape)}: expected one or more positive sizes"
        raise ConfigError(msg)
    world = math.prod(dims)
    if not 0 <= rank < world:
        msg = f"rank {rank} is outside a mesh of shape {dims} ({world} ranks)"
        raise ConfigError(msg)
    grid = torch.arange(world).reshape(dims)
    coords = [int(c) for c in torch.nonzero(grid == rank)[0]]
    out = []
    for d in range(len(dims)):
        index = tuple(slice(None) if i == d else c for i, c in enumerate(coords))
        ranks = tuple(int(r) for r in grid[index].reshape(-1))
        others = [n for i, n in enumerate(dims) if i != d]
        rest = [c for i, c in enumerate(coords) if i != d]
        gid = 0
        for n, c in zip(others, rest, strict=True):
            gid = gid * n + c
        out.append((gid, ranks))
    return out


class FlexMesh:
    """A ``DeviceMesh`` over one repairable communicator per (dimension, group).

    Every rank of the mesh builds it (collective, like ``init_device_mesh``); a
    replacement that takes over a dead rank builds it at the repair's epoch while the
    survivors call :meth:`repair` with that epoch.

    Args:
        backend: A mnemosyne-ccl backend (``mnemosyne.ccl.backend("gloo")``).
        store: The job's store.
        rank: This process's global rank (row-major position in the mesh).
        shape: Mesh shape, e.g. ``(4,)`` for FSDP, ``(2, 2)`` for HSDP.
        dim_names: One name per dimension, e.g. ``("replicate", "shard")``.
        epoch: Epoch at which this process's groups are created.
        timeout: Seconds a build or a collective may take.
        device_type: ``"cpu"`` (Gloo) or ``"cuda"``.
        build: False: build no communicator now (no collective, nothing waits): every
            group starts *unbuilt* (its collectives fail; :meth:`report` says ``cut``)
            until :meth:`rebuild` builds it, e.g. inside a recovery that every member runs.

    Raises:
        ConfigError: Shape, names or rank do not fit together, or a default process
            group exists whose rank or size differ from the mesh's.
    """

    def __init__(self, backend: FlexBackend, store: Store, rank: int, shape: Sequence[int],
                 dim_names: Sequence[str], *, epoch: int = 0, timeout: float = 30.0,
                 device_type: str = "cpu", build: bool = True) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.dim_names = tuple(dim_names)
        if len(self.dim_names) != len(self.shape) or len(set(self.dim_names)) != len(self.dim_names):
            msg = f"mesh dim_names {list(dim_names)}: expected {len(self.shape)} distinct names for shape {list(shape)}"
            raise ConfigError(msg)
        self._backend = backend
        self._store = store
        self.rank = rank
        self.timeout = timeout
        self.world = math.prod(self.shape)
        self._layout = mesh_groups(self.shape, rank)
        _ensure_default_group(rank, self.world)
        self.groups: dict[str, FlexProcessGroup] = {}
        for name, (_, ranks) in zip(self.dim_names, self._layout, strict=True):
            comm: Any = (backend.create(store, rank, len(ranks), epoch=epoch, timeout=timeout,  # type: ignore[call-arg]
                                        tag=self.tag(name), ranks=ranks)
                         if build else _Unbuilt(ranks, rank, backend.name, timeout))
            pg = FlexProcessGroup(comm)
            pg._set_group_name(f"mnemosyne.{self.tag(name)}")
            c10d._register_pg_in_world(pg, backend_name=pg.getBackendName(), store=None,  # type: ignore[arg-type]
                                       group_name=f"mnemosyne.{self.tag(name)}",  # type: ignore[arg-type]
                                       backend_config="",
                                       rank_mapping={g: i for i, g in enumerate(ranks)})
            self.groups[name] = pg
        from torch.distributed.device_mesh import DeviceMesh

        grid = torch.arange(self.world, dtype=torch.int).reshape(self.shape)
        pgs = [self.groups[n] for n in self.dim_names]
        self.mesh: Any = DeviceMesh.from_group(pgs if len(pgs) > 1 else pgs[0],  # type: ignore[arg-type]
                                               device_type, mesh=grid,
                                               mesh_dim_names=self.dim_names)

    def tag(self, dim: str) -> str:
        """Communicator family of this rank's group along ``dim``."""
        return f"mesh.{dim}.{self._layout[self.dim_names.index(dim)][0]}"

    def ranks(self, dim: str) -> tuple[int, ...]:
        """Global ranks of this rank's group along ``dim``, in group-rank order."""
        return self._layout[self.dim_names.index(dim)][1]

    def fail(self, reason: str) -> None:
        """Fail every group of this rank (publishing the abort), so that peers blocked in them wake up.

        A rank that saw a peer failure in one group calls it: its peers in the other
        groups would otherwise wait for it in a collective it will never join. The
        failure spreads group by group over the mesh.
        """
        for pg in self.groups.values():
            if not pg.comm.aborted:
                pg.comm.fail(reason)

    def repair(self, dead: Iterable[int], epoch: int) -> dict[str, list[str]]:
        """Rebuild, at ``epoch``, this rank's groups that hold a dead rank or were interrupted.

        Called by every survivor, while the replacements build a fresh
        :class:`FlexMesh` at ``epoch``. A group that holds a rank of ``dead`` is rebuilt
        with the replacement; a group whose communicator was aborted (a collective in it
        was cut off halfway, so its transport is out of step) is rebuilt over the same
        members; a group neither dead nor interrupted keeps its communicator. The group
        objects (which FSDP2 and the ``DeviceMesh`` hold) stay; each gets the new
        communicator through :meth:`FlexProcessGroup.swap` and its old one is closed.
        Every member of a group decides alike provided every survivor has called
        :meth:`fail` before any calls ``repair`` (the abort key of a group is what its
        members read): the caller orders the two, e.g. by the recovery epoch.

        Returns:
            ``{"dead": tags rebuilt for a dead member, "interrupted": tags rebuilt for an
            aborted collective, "kept": tags left as they were}``.
        """
        gone = {int(r) for r in dead}
        if self.rank in gone:
            msg = f"repair: rank {self.rank} is listed as dead (a replacement builds a new FlexMesh instead)"
            raise ConfigError(msg)
        out: dict[str, list[str]] = {"dead": [], "interrupted": [], "kept": []}
        for name, (_, ranks) in zip(self.dim_names, self._layout, strict=True):
            pg = self.groups[name]
            old = pg.comm
            cut = old.aborted or old._remote_abort() is not None
            why = "dead" if gone.intersection(ranks) else "interrupted" if cut else "kept"
            out[why].append(self.tag(name))
            if why != "kept":
                self.rebuild(name, epoch)
        logger.info("mesh repair to epoch %d (dead %s): %s", epoch, sorted(gone), out)
        return out

    def rebuild(self, dim: str, epoch: int) -> None:
        """Build this rank's ``dim`` group afresh at ``epoch`` (collective over the group) and swap it in.

        Every member of the group calls it with the same ``epoch``; a replacement builds
        the group as part of a new :class:`FlexMesh` at that epoch instead.
        """
        pg, ranks = self.groups[dim], self.ranks(dim)
        old = pg.comm
        old.abort(f"repair of {self.tag(dim)} to epoch {epoch}")
        comm = self._backend.create(self._store, self.rank, len(ranks), epoch=epoch,  # type: ignore[call-arg]
                                    timeout=self.timeout, tag=self.tag(dim), ranks=ranks)
        pg.swap(comm)  # type: ignore[arg-type]
        old.close()

    def fence(self, reason: str) -> None:
        """Fence every group (:meth:`FlexProcessGroup.fence`): in-flight collectives fail, none starts."""
        for pg in self.groups.values():
            pg.fence(reason)

    def report(self, dim: str) -> dict[str, Any]:
        """What the members of this rank's ``dim`` group compare to decide if it is intact.

        ``epoch`` of its communicator, collectives ``issued`` on it, and ``cut``: a
        collective was cut off by a fence, or the communicator was aborted or saw a
        peer's failure. The group is intact when every member reports the same epoch and
        count and none is cut.
        """
        pg = self.groups[dim]
        comm = pg.comm
        cut = pg.cut or comm.aborted or comm._remote_abort() is not None
        return {"epoch": comm.epoch, "issued": pg.issued, "cut": bool(cut)}

    def close(self) -> None:
        """Close every group's communicator."""
        for pg in self.groups.values():
            pg.comm.close()


class _Unbuilt:
    """The communicator of a group that :class:`FlexMesh` has not built yet (``build=False``).

    It has the group's size and this rank's place in it (what torch reads once); every
    collective on it fails at once.
    """

    epoch = -1
    aborted = True

    def __init__(self, ranks: Sequence[int], rank: int, backend_name: str, timeout: float) -> None:
        self.ranks = tuple(ranks)
        self.size = len(self.ranks)
        self.physical_rank = self.ranks.index(rank)
        self.backend_name = backend_name
        self.timeout = timeout

    def _remote_abort(self) -> str | None:
        return None

    def _raise_if_aborted(self) -> None:
        msg = f"mesh group {list(self.ranks)} is not built yet (a recovery builds it)"
        raise CommAborted(msg)

    def abort(self, reason: str) -> None:
        """Nothing to abort."""

    def fail(self, reason: str, publish: bool = True) -> CommAborted:
        """Nothing to fail."""
        return CommAborted(reason)

    def close(self) -> None:
        """Nothing to close."""


def reset_fsdp(model: torch.nn.Module) -> None:
    """Reset FSDP2's per-iteration state after a step that a failure cut off (torch 2.13).

    FSDP2's own ``reset_iter_state`` (on the root) waits for in-flight all-gathers; those
    of the aborted step belong to a communicator that failed, so they are dropped first.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            if group is not None:
                group._all_gather_result = None
                group.comm_ctx.all_gather_state = None
    if isinstance(model, FSDPModule):
        model.reset_iter_state()  # type: ignore[operator]


def _ensure_default_group(rank: int, world: int) -> None:
    if dist.is_initialized():
        have = (dist.get_rank(), dist.get_world_size())
        if have != (rank, world):
            msg = (f"a default process group with rank {have[0]} of {have[1]} exists; this mesh needs rank {rank} "
                   f"of {world}")
            raise ConfigError(msg)
        return
    pg = _RankOnlyGroup(rank, world)  # type: ignore[call-arg]
    c10d._register_pg_in_world(pg, backend_name="mnemosyne-rank-only", store=None,  # type: ignore[arg-type]
                               group_name="mnemosyne.default",  # type: ignore[arg-type]
                               backend_config="",
                               rank_mapping={i: i for i in range(world)})
    c10d._update_default_pg(pg)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world)}


class _RankOnlyGroup(dist.ProcessGroup):  # type: ignore[misc]
    """Default group that answers rank and size only (its collectives have no backend and raise)."""

    @property
    def group_name(self) -> str:  # type: ignore[override]
        return "mnemosyne.default"
