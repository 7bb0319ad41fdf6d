"""FSDP2 / HSDP rank processes over :class:`~mnemosyne.ccl.mesh.FlexMesh` (``python -m``; one JSON arg).

Scenarios:

``plain``: the reference: ``init_process_group("gloo")`` + ``init_device_mesh``, FSDP2
    (or HSDP) training for ``total`` steps; final local shards + optimizer state published.
``flex``: the same training on a :class:`FlexMesh`. With ``victim`` set, the victim parks
    at the start of step ``k`` (phase ``forward``) or inside its first backward
    reduce-scatter of step ``k`` (phase ``backward``) and is SIGKILLed by the test; the
    survivors catch the failure, fail their mesh (so that ranks blocked in other groups
    wake), report, wait for ``test/dead``, repair, re-send their shards to the
    replacement over the replicate group, and redo step ``k``. The replacement
    (``newcomer``) builds the model on meta, shards it, ``to_empty``, receives its shard
    and optimizer state from its replicate peer, and joins at step ``k``.
    Phase ``forward`` heals bit-for-bit (test_mesh.py). Phase ``backward`` does not
    yet: the replacement aborts in gloo (``EnforceNotMet``, a collective mismatch) in
    its first step (issue 13).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from mnemosyne.core.store import Store

TIMEOUT = 60.0


def _put(store: Store, key: str, value: Any) -> None:
    store.set(key, json.dumps(value).encode())


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 4))


def _shard(model: torch.nn.Module, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.children():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def _opt(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    x, y = _batch(rank, step)
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()  # type: ignore[no-untyped-call]
    opt.step()


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, p in model.named_parameters():
        out[name] = _local(p).flatten().tolist()
        for k, v in sorted(opt.state[p].items()):
            t = v.to_local() if hasattr(v, "to_local") else v
            out[f"{name}/{k}"] = t.flatten().tolist()
    return out


def _mesh_args(cfg: dict[str, Any]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    shape = tuple(int(n) for n in cfg["shape"])
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    return shape, names


def plain(cfg: dict[str, Any], store: Store) -> None:
    """See the module docstring."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, total = int(cfg["rank"]), int(cfg["total"])
    shape, names = _mesh_args(cfg)
    world = int(torch.tensor(shape).prod())
    # A real TCPStore (new_group needs more of the Store API than our adapter has).
    if rank == 0:
        tcp = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", 0, world, True, timeout=datetime.timedelta(seconds=TIMEOUT),
                             wait_for_workers=False)
        store.set("test/plain_port", str(tcp.port).encode())
    else:
        port = int(store.get("test/plain_port", TIMEOUT))
        tcp = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", port, world, False, timeout=datetime.timedelta(seconds=TIMEOUT))
    dist.init_process_group("gloo", store=tcp, rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    model = _model()
    _shard(model, mesh)
    opt = _opt(model)
    for step in range(total):
        _step(model, opt, rank, step)
    _put(store, f"test/final/{rank}", _state(model, opt))
    dist.destroy_process_group()


def _local(t: Any) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t  # type: ignore[no-any-return]


def _send_shards(fm: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, dead: set[int]) -> None:
    """Broadcast this replicate group's shard + optimizer state from its lowest live member."""
    from mnemosyne.core.errors import ConfigError

    if "replicate" not in fm.dim_names:
        msg = (f"ranks {sorted(dead)} died and no live replica holds their shards (pure FSDP, no replicate "
               "dimension): that state is lost; an in-memory snapshot tier would be needed to heal it")
        raise ConfigError(msg)
    ranks = fm.ranks("replicate")
    if not dead.intersection(ranks):
        return
    live = [r for r in ranks if r not in dead]
    if not live:
        msg = f"every replica of shard group {fm.tag('shard')} died ({list(ranks)}): its state is lost"
        raise ConfigError(msg)
    src, pg = ranks.index(live[0]), fm.groups["replicate"]
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(_local(p), group_src=src, group=pg)
            for _, v in sorted(opt.state[p].items()):
                dist.broadcast(_local(v), group_src=src, group=pg)


def _empty_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def _park(store: Store, rank: int) -> None:
    store.set("test/victim_ready", str(os.getpid()).encode())
    time.sleep(TIMEOUT * 2)  # the test SIGKILLs this process
    sys.exit(3)


def flex(cfg: dict[str, Any], store: Store) -> None:
    """See the module docstring."""
    from mnemosyne.ccl.gloo import GlooBackend
    from mnemosyne.ccl.mesh import FlexMesh, reset_fsdp

    rank, total = int(cfg["rank"]), int(cfg["total"])
    victim, k, phase = cfg.get("victim"), int(cfg.get("k", 0)), cfg.get("phase", "forward")
    shape, names = _mesh_args(cfg)
    be = GlooBackend()
    start = 0
    if cfg.get("newcomer"):
        fm = FlexMesh(be, store, rank, shape, names, epoch=1, timeout=TIMEOUT)
        with torch.device("meta"):
            model = _model()
        _shard(model, fm.mesh)
        model.to_empty(device="cpu")
        opt = _opt(model)
        if k > 0:
            _empty_state(model, opt)
        _send_shards(fm, model, opt, {rank})
        start = k
    else:
        fm = FlexMesh(be, store, rank, shape, names, epoch=0, timeout=TIMEOUT)
        model = _model()
        _shard(model, fm.mesh)
        opt = _opt(model)
        if rank == victim and phase == "backward":
            list(model.children())[2].register_full_backward_pre_hook(lambda *_: _park(store, rank))
    step = start
    while step < total:
        if rank == victim and step == k and phase == "forward":
            _park(store, rank)
        try:
            _step(model, opt, rank, step)
        except Exception as exc:
            fm.fail(f"rank {rank} saw a failure at step {step}: {type(exc).__name__}")
            _put(store, f"test/fault/{rank}", {"step": step, "error": type(exc).__name__, "msg": str(exc)[:300]})
            dead = {int(store.get("test/dead", TIMEOUT))}
            opt.zero_grad(set_to_none=True)
            reset_fsdp(model)
            repaired = fm.repair(dead, epoch=1)
            _put(store, f"test/repair/{rank}", repaired)
            try:
                _send_shards(fm, model, opt, dead)
            except Exception as lost:
                _put(store, f"test/lost/{rank}", f"{type(lost).__name__}: {lost}")
                raise SystemExit(4) from None
            continue  # redo the step
        step += 1
    _put(store, f"test/final/{rank}", _state(model, opt))
    fm.close()


def main() -> int:
    """Entry point: ``python -m mnemosyne.ccl.testing._fsdp_workers '<json>'``."""
    from mnemosyne.ccl.testing._workers import run

    return run({"plain": plain, "flex": flex})


if __name__ == "__main__":
    sys.exit(main())
