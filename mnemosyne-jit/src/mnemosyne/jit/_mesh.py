"""Sharded training (FSDP2 / HSDP) under ``mnemosyne.jit``: a DeviceMesh whose groups the job repairs.

Usage (under ``mnemo launch``)::

    mesh = mnemosyne.jit.device_mesh((2, 2))          # HSDP: ("replicate", "shard")
    with torch.device("meta" if mnemosyne.jit.joining() else "cpu"):
        model = build_model()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if mnemosyne.jit.joining():
        model.to_empty(device="cpu")                  # its shard arrives inside init()
    optimizer = torch.optim.AdamW(model.parameters())
    job = mnemosyne.jit.init(model, optimizer, mesh=mesh)

The mesh is a :class:`mnemosyne.ccl.mesh.FlexMesh`: one repairable process group per
(dimension, group), each its own communicator family. When a rank dies the job's
recovery (in :mod:`mnemosyne.jit._recover`) goes, for mesh jobs:

* **fence** (the watchdog, on the new epoch): every group of every survivor stops
  issuing; collectives in flight fail at once and mark their group *cut*.
* **repair**: a group that holds a replaced rank is rebuilt at the new membership epoch
  (the replacement builds its groups there in :func:`device_mesh`); every other group is
  kept if all its members report the same communicator epoch and collective count and
  none is cut (published in the store, see :meth:`JobMesh.repair`), else rebuilt over the
  same members. The ``mesh_repair`` event lists ``dead``, ``interrupted`` and ``kept``
  groups.
* **transfer**: the agreement is the job's (every rank's committed step); the state of a
  shard moves only inside its replicate group, from the members that hold the top step
  to those that do not. Pure FSDP (no ``replicate`` dimension) has no second copy of a
  shard: a lost shard is reported as lost (a :class:`RecoveryError`), never guessed.
* **step consensus**: before the optimizer applies step ``k``, one 1-element all-reduce
  per mesh dimension (shard group, then replicate group: together every rank) proves
  that every rank finished step ``k``'s reductions, so that a fault before that point
  leaves every survivor at step ``k - 1``.

The state a mesh job transfers is each rank's local shards (``DTensor`` local tensors)
of parameters and optimizer state, plus scheduler and ``extra`` as in data parallel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mnemosyne.core.env import (
    MNEMOSYNE_EPOCH,
    MNEMOSYNE_JOB_ID,
    MNEMOSYNE_RANK,
    MNEMOSYNE_STORE_ADDR,
    MNEMOSYNE_TOKEN,
    MNEMOSYNE_WORLD_SIZE,
    env_int,
    env_str,
)
from mnemosyne.core.errors import ConfigError, MnemosyneError, StateLostError
from mnemosyne.jit import _keys
from mnemosyne.jit._protocol import read_record
from mnemosyne.jit._recovery import Agreement, Rendezvous, wait_key
from mnemosyne.jit._select import comm_backend
from mnemosyne.jit._store import connect_job_store

__all__ = ["JobMesh", "device_mesh", "job_mesh"]

logger = logging.getLogger(__name__)

#: DeviceMesh id -> its JobMesh (a DeviceMesh takes no attributes of ours).
_MESHES: dict[int, JobMesh] = {}

_DEFAULT_NAMES = {1: ("shard",), 2: ("replicate", "shard")}


def device_mesh(shape: Sequence[int], dim_names: Sequence[str] | None = None, *, device_type: str | None = None,
                timeout: float = 120.0) -> Any:
    """A ``DeviceMesh`` for ``fully_shard`` whose groups this job repairs (see module doc).

    Call it in every trainer before sharding the model, then pass it to :func:`init` as
    ``mesh=``. Ranks are laid out row-major as ``init_device_mesh`` does.

    Args:
        shape: ``(world,)`` for FSDP, ``(replicas, shard_size)`` for HSDP; the product is
            the job's world size.
        dim_names: Default ``("shard",)`` for 1-D, ``("replicate", "shard")`` for 2-D.
        device_type: ``"cpu"`` (Gloo) or ``"cuda"`` (NCCL); default: CUDA when available.
        timeout: Bound, in seconds, of building a group and of each collective.

    Raises:
        ConfigError: Not started by ``mnemo launch``, a shape that does not fit the world
            size, or mnemosyne-ccl is not installed (the repairable groups are ccl's).
    """
    from mnemosyne.ccl.mesh import FlexMesh

    job_id, addr = env_str(MNEMOSYNE_JOB_ID), env_str(MNEMOSYNE_STORE_ADDR)
    rank, world = env_int(MNEMOSYNE_RANK), env_int(MNEMOSYNE_WORLD_SIZE)
    if not job_id or not addr or rank is None or world is None:
        msg = "mnemosyne.jit.device_mesh: this process was not started by `mnemo launch`"
        raise ConfigError(msg)
    dims = tuple(int(n) for n in shape)
    if math.prod(dims) != world:
        msg = f"device_mesh shape {list(dims)} holds {math.prod(dims)} ranks; the job has {world}"
        raise ConfigError(msg)
    names = tuple(dim_names) if dim_names is not None else _DEFAULT_NAMES.get(len(dims), ())
    if len(names) != len(dims):
        msg = (f"device_mesh shape {list(dims)}: expected {len(dims)} dim_names (one per dimension), got "
               f"{list(names) if dim_names is not None else 'none (defaults exist for 1-D and 2-D only)'}")
        raise ConfigError(msg)
    dtype = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    ccl, backend = comm_backend(dtype, logger)
    if not ccl:
        msg = "mnemosyne.jit.device_mesh needs mnemosyne-ccl (pip install 'mnemosyne-jit[ccl]'): its groups repair"
        raise ConfigError(msg)
    epoch = env_int(MNEMOSYNE_EPOCH, 0) or 0
    store = connect_job_store(addr, job_id, env_str(MNEMOSYNE_TOKEN))
    members = dict(read_record(store, epoch, timeout).membership.members)
    # Nothing is built here: the groups are built inside init()'s first recovery, where
    # a replacement takes part in the repair like every member (see JobMesh.repair).
    fm = FlexMesh(backend, store, rank, dims, names, epoch=epoch, timeout=timeout,  # type: ignore[arg-type]
                  device_type=dtype, build=False)
    jm = JobMesh(fm, members)
    _MESHES[id(fm.mesh)] = jm
    return fm.mesh


def job_mesh(mesh: Any) -> JobMesh:
    """The :class:`JobMesh` of a mesh made by :func:`device_mesh`.

    Raises:
        ConfigError: ``mesh`` was not made by :func:`device_mesh`.
    """
    jm = _MESHES.get(id(mesh))
    if jm is None:
        msg = ("init(mesh=...): expected the DeviceMesh returned by mnemosyne.jit.device_mesh() (a mesh from "
               "init_device_mesh has groups that no recovery can repair)")
        raise ConfigError(msg)
    return jm


@contextlib.contextmanager
def _abort_on(rv: Rendezvous, tags: list[str]) -> Iterator[None]:
    """While the body builds the groups ``tags`` at ``rv.epoch``: abort those builds on a newer epoch.

    A build waits for every member of its group; one that died meanwhile would keep it
    waiting for the timeout. The abort key of the group's epoch ends the build on every
    member (:class:`CommAborted`), and the recovery moves on to the newer epoch.
    """
    if not tags:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if rv.interrupt.wait(0.05):
                for tag in tags:
                    with contextlib.suppress(MnemosyneError):
                        signal_abort(rv.store, rv.epoch, f"membership epoch after {rv.epoch} published", tag)
                return

    from mnemosyne.ccl import signal_abort

    t = threading.Thread(target=watch, name="mnemosyne-mesh-abort", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def _local(t: Any) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # type: ignore[no-any-return]


class _GroupLink:
    """Point-to-point over a mesh group by logical (global) rank, through its process group.

    Through the group, not its communicator, so that a fence ends a transfer too.
    """

    def __init__(self, pg: Any) -> None:
        self.pg = pg

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.pg.send([tensor], self.pg.comm.physical(dst)).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self.pg.recv([tensor], self.pg.comm.physical(src)).wait()


class MeshComm:
    """What the epoch watch and the recovery hold as "the communicator" of a mesh job.

    ``abort`` fences the mesh (it does not destroy intact groups); ``barrier`` is a
    barrier over every rank (one per dimension, in order).
    """

    def __init__(self, jm: JobMesh, epoch: int) -> None:
        self.jm = jm
        self.epoch = epoch

    @property
    def aborted(self) -> bool:
        """Whether a group is fenced, or its communicator failed (a peer died)."""
        return any(pg.fenced or pg.comm.aborted for pg in self.jm.fm.groups.values())

    def abort(self, reason: str) -> None:
        """Fence every group (the watchdog, on a newer epoch)."""
        self.jm.fm.fence(reason)

    def barrier(self) -> None:
        """Every rank of the mesh arrives (shard groups first, then replicate groups)."""
        for name in reversed(self.jm.fm.dim_names):
            self.jm.fm.groups[name].barrier().wait()


class JobMesh:
    """The job's side of a :class:`~mnemosyne.ccl.mesh.FlexMesh` (see module doc)."""

    def __init__(self, fm: Any, members: dict[int, str]) -> None:
        self.fm = fm
        #: Per dimension, the member ids of the group's ranks when its communicator was built.
        self.ids = {d: {r: members.get(r, "") for r in fm.ranks(d)} for d in fm.dim_names}

    @property
    def mesh(self) -> Any:
        """The ``DeviceMesh``."""
        return self.fm.mesh

    def attach(self, model: torch.nn.Module, on_launch: Any) -> JobMesh:
        """Report the backward phase to the job (its position and fault plans) for ``model``.

        FSDP2 reduces gradients itself, so no bucket launch marks the backward: a backward
        pre-hook on the first child module does (it runs last in backward, once the later
        modules' reduce-scatters were issued).
        """
        first = next(iter(model.children()), None)
        if first is not None:
            first.register_full_backward_pre_hook(lambda *_: on_launch(0, True))
        return self

    # ----------------------------------------------------------------- repair
    def repair(self, rv: Rendezvous, members: dict[int, str]) -> tuple[MeshComm, dict[str, list[str]]]:
        """Repair this rank's groups for epoch ``rv.epoch`` (see module doc); the decision per group.

        Every member publishes :meth:`FlexMesh.report` for each of its groups first. A
        group whose member ids changed since it was built holds a replaced rank: rebuilt
        (``dead``). Otherwise this rank reads the other members' reports: identical and
        uncut -> ``kept`` (unfenced); else rebuilt over the same members (``built`` when
        this rank's group was never built, ``interrupted`` otherwise). Every member of a
        group reads the same reports, so all decide alike; dimensions are handled in the
        mesh's order on every rank, so no build waits for a member busy with another.
        A newer epoch aborts the builds in progress (their abort keys), and the recovery
        starts over.
        """
        fm = self.fm
        out: dict[str, list[str]] = {"built": [], "dead": [], "interrupted": [], "kept": []}
        fm.fence(f"recovery of epoch {rv.epoch}")
        reports = {d: fm.report(d) for d in fm.dim_names}
        for d, rep in reports.items():
            rv.store.set(_keys.mesh_report(rv.epoch, fm.tag(d), rv.rank), json.dumps(rep).encode())
        todo = []
        for d in fm.dim_names:
            changed = [r for r, mid in self.ids[d].items() if members.get(r) != mid]
            why = "dead" if changed else "kept"
            if not changed:
                for r in fm.ranks(d):
                    if r != rv.rank:
                        theirs = json.loads(wait_key(rv, _keys.mesh_report(rv.epoch, fm.tag(d), r)))
                        if theirs != reports[d] or theirs["cut"]:
                            why = "interrupted"
                if reports[d]["cut"]:
                    why = "built" if reports[d]["epoch"] < 0 else "interrupted"
            out[why].append(fm.tag(d))
            if why == "kept":
                fm.groups[d].unfence()
            else:
                todo.append(d)
        with _abort_on(rv, [fm.tag(d) for d in todo]):
            for d in todo:
                fm.rebuild(d, rv.epoch)
                self.ids[d] = {r: members.get(r, "") for r in fm.ranks(d)}
        return MeshComm(self, rv.epoch), out

    # ----------------------------------------------------------------- transfer
    def replica_plan(self, plan: Agreement) -> tuple[Any, Agreement, str]:
        """The transfer inside this rank's replicate group: its communicator, sub-plan and tag.

        Raises:
            StateLostError: Some rank must receive a shard that no member of its
                replicate group holds (pure FSDP, or every replica of the shard lost it);
                every rank raises it, so the job stops as a whole.
        """
        fm = self.fm
        dim = "replicate" if "replicate" in fm.dim_names else None
        if plan.top >= 0:
            for r in plan.receivers:
                self._check_held(plan, r, dim)
        group = fm.ranks(dim) if dim else (fm.rank,)
        if plan.top == -1:  # the very first rendezvous: each shard's lowest replica donates
            donors, receivers = [min(group)], sorted(set(group) - {min(group)})
        else:
            donors = [r for r in plan.donors if r in group]
            receivers = [r for r in plan.receivers if r in group]
        sub = Agreement(plan.top, donors, receivers, plan.started)
        comm = _GroupLink(fm.groups[dim]) if dim else None
        return comm, sub, fm.tag(dim) if dim else "none"

    def _check_held(self, plan: Agreement, rank: int, dim: str | None) -> None:
        from mnemosyne.ccl.mesh import mesh_groups

        group = mesh_groups(self.fm.shape, rank)[self.fm.dim_names.index(dim)][1] if dim else (rank,)
        if not set(group) & set(plan.donors):
            what = (f"the shard of replicate group {list(group)}" if dim else
                    f"rank {rank}'s shard (pure FSDP keeps one copy of each shard)")
            msg = (f"the state of step {plan.top} is lost for {what}: no live member holds it (ranks at that "
                   f"step: {plan.donors}); a shard without a live replica needs a snapshot or a checkpoint "
                   "(mnemo launch --resume)")
            raise StateLostError(msg)

    @staticmethod
    def scoped(rv: Rendezvous, tag: str) -> Rendezvous:
        """``rv`` with its store keys under the group's own namespace (transfers run per group)."""
        return dataclasses.replace(rv, store=rv.store.prefixed(tag))

    # ----------------------------------------------------------------- state
    @staticmethod
    def state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Local shards of parameters and optimizer state (plain tensors, views of the DTensors)."""
        params = {name: _local(p).detach() for name, p in model.named_parameters()}
        sd = optimizer.state_dict()
        optim = {"state": {i: {k: _local(v) for k, v in st.items()} for i, st in sd["state"].items()},
                 "param_groups": sd["param_groups"]}
        return {"params": params, "optim": optim}

    @staticmethod
    def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Copy received local shards into the model, and the optimizer state (as DTensors)."""
        from torch.distributed.tensor import DTensor

        params = list(model.parameters())
        with torch.no_grad():
            for name, p in model.named_parameters():
                _local(p).copy_(state["params"][name])
        sd = state["optim"]
        order = [p for g in optimizer.param_groups for p in g["params"]]
        idx = {id(p): i for i, p in enumerate(order)}
        by_index = {idx[id(p)]: p for p in params}
        st: dict[int, dict[str, Any]] = {}
        for i, entry in sd["state"].items():
            p = by_index[int(i)]
            # The global shape and stride are the parameter's: a shard may be uneven (or empty).
            st[int(i)] = {k: (DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                                 stride=p.stride())
                              if isinstance(p, DTensor) and v.shape == _local(p).shape else v)
                          for k, v in entry.items()}
        optimizer.load_state_dict({"state": st, "param_groups": sd["param_groups"]})

    # ----------------------------------------------------------------- steady state
    def consensus(self) -> None:
        """Every rank finished this step's reductions (one tiny all-reduce per dimension)."""
        flag = torch.ones(1, device="cuda" if self.fm.mesh.device_type == "cuda" else "cpu")
        for name in reversed(self.fm.dim_names):
            self.fm.groups[name].allreduce([flag]).wait()

    @staticmethod
    def discard(model: torch.nn.Module) -> None:
        """Reset FSDP2's per-iteration state after an aborted step (its in-flight all-gathers are dead)."""
        from mnemosyne.ccl.mesh import reset_fsdp

        reset_fsdp(model)

