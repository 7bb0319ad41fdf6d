"""Rank processes for the multi-process tests (run as ``python -m``; args are one JSON object).

Every worker talks to the test through the job's store: it publishes where it is
(``test/...`` keys) and what it saw (JSON results), and the test kills, spawns and checks.
Every wait is bounded, so a worker that is never answered exits with an error.

Scenarios:

``faults``: rounds of (exact all_reduce; the round's victim parks itself and is
    SIGKILLed by the test while the others are inside an all_reduce; survivors record the
    error they raised and when; shrink; exact all_reduce on the survivors; grow back, with
    a fresh process joining as the victim's logical rank; exact all_reduce on all).
``ddp``: torch DDP over :class:`~mnemosyne.ccl.pg.FlexProcessGroup`: a fault-free
    reference run, then the same training with a rank killed mid-backward, repaired by
    shrink+grow, and finished with a fresh DDP; final parameters are reported.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from mnemosyne.ccl._base import FlexCommunicator
from mnemosyne.ccl.gloo import GlooBackend
from mnemosyne.ccl.store_client import StoreClient
from mnemosyne.core.errors import CommError
from mnemosyne.core.store import Store

TIMEOUT = 60.0


def _put(store: Store, key: str, value: Any) -> None:
    store.set(key, json.dumps(value).encode())


def _exact_all_reduce(comm: FlexCommunicator, salt: int) -> dict[str, Any]:
    # Integer-valued floats: the sum is exact whatever the reduction order.
    t = torch.full((4096,), float(comm.rank * 7 + salt + 1))
    comm.all_reduce(t)
    expected = float(sum(r * 7 + salt + 1 for r in comm.ranks))
    ok = bool(torch.all(t == expected))
    return {"epoch": comm.epoch, "ranks": list(comm.ranks), "got": float(t[0]), "expected": expected, "ok": ok}


def _park(store: Store, key: str) -> None:
    store.set(key, str(os.getpid()).encode())
    time.sleep(TIMEOUT * 2)  # the test SIGKILLs this process
    sys.exit(3)


def faults(cfg: dict[str, Any], store: Store) -> None:
    """See the module docstring."""
    rank, plan = int(cfg["rank"]), [int(v) for v in cfg["plan"]]
    start = int(cfg.get("start_round", 0))
    be = GlooBackend()
    comm: FlexCommunicator
    if start == 0:
        comm = be.create(store, rank, int(cfg["size"]), timeout=TIMEOUT)
    else:
        comm = be.join(store, rank, epoch=int(cfg["epoch"]), timeout=TIMEOUT)
        _put(store, f"test/grown/{start - 1}/{rank}", _exact_all_reduce(comm, 1000 + start - 1))
    for i in range(start, len(plan)):
        victim = plan[i]
        _put(store, f"test/before/{i}/{rank}", _exact_all_reduce(comm, i))
        if rank == victim:
            _park(store, f"test/victim_ready/{i}")
        store.set(f"test/in_ar/{i}/{rank}", b"1")
        t = torch.ones(1 << 16)
        record: dict[str, Any] = {}
        try:
            comm.all_reduce(t)
            record = {"error": None}
        except CommError as exc:
            record = {"error": type(exc).__name__, "msg": str(exc), "t": time.time()}
        _put(store, f"test/fault/{i}/{rank}", record)
        comm = comm.shrink([victim])
        _put(store, f"test/shrunk/{i}/{rank}", _exact_all_reduce(comm, 500 + i))
        comm = comm.grow([victim])
        _put(store, f"test/grown/{i}/{rank}", _exact_all_reduce(comm, 1000 + i))
    _put(store, f"test/final/{rank}", _exact_all_reduce(comm, 9999))
    comm.close()


def _model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank * 1000 + step)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def _train(ddp: Any, opt: torch.optim.Optimizer, rank: int, steps: range) -> None:
    for step in steps:
        x, y = _batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()


def _params(model: torch.nn.Module) -> list[list[float]]:
    return [p.detach().flatten().tolist() for p in model.parameters()]


def ddp(cfg: dict[str, Any], store: Store) -> None:
    """See the module docstring."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mnemosyne.ccl.pg import FlexProcessGroup

    rank, size, victim, k, total = (int(cfg[n]) for n in ("rank", "size", "victim", "k", "total"))
    be = GlooBackend()
    newcomer = bool(cfg.get("newcomer"))
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    comm: FlexCommunicator
    if not newcomer:
        comm = be.create(store, rank, size, timeout=TIMEOUT)
        # Reference: no fault; DDP rebuilt at step k exactly as the faulted run does.
        pg = FlexProcessGroup(comm)
        _train(DDP(model, process_group=pg), opt, rank, range(k))
        _train(DDP(model, process_group=FlexProcessGroup(comm)), opt, rank, range(k, total))
        _put(store, f"test/ref/{rank}", _params(model))
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        comm = comm.rebuild()
        first = DDP(model, process_group=FlexProcessGroup(comm))
        _train(first, opt, rank, range(k))
        if rank == victim:
            _park(store, "test/victim_ready/0")
        store.set(f"test/in_ar/0/{rank}", b"1")
        record: dict[str, Any] = {"error": None}
        try:
            _train(first, opt, rank, range(k, k + 1))  # the victim is gone: its all_reduce never completes
        except Exception as exc:  # DDP wraps the adapter's PeerFailureError in a RuntimeError
            record = {"error": type(exc).__name__, "msg": str(exc)[:500], "t": time.time()}
        _put(store, f"test/fault/0/{rank}", record)
        del first
        # Discard the aborted step: restore nothing (SGD applied no update), drop grads.
        opt.zero_grad(set_to_none=True)
        comm = comm.shrink([victim]).grow([victim])
    else:
        comm = be.join(store, rank, epoch=int(cfg["epoch"]), timeout=TIMEOUT)
    # Fresh DDP on every rank: its constructor broadcasts rank 0's parameters to the newcomer.
    _train(DDP(model, process_group=FlexProcessGroup(comm)), opt, rank, range(k, total))
    _put(store, f"test/final/{rank}", _params(model))
    comm.close()


def run(scenarios: dict[str, Callable[[dict[str, Any], Store], None]]) -> int:
    """Run the scenario named by the JSON config in ``sys.argv[1]``; a crash's traceback goes to the store."""
    cfg = json.loads(sys.argv[1])
    store = StoreClient(cfg["addr"], cfg["job"], cfg["token"], timeout=TIMEOUT)
    try:
        scenarios[cfg["scenario"]](cfg, store)
    except BaseException:
        _put(store, f"test/crash/{cfg['rank']}/{os.getpid()}", traceback.format_exc())
        raise
    return 0


def main() -> int:
    """Entry point: ``python -m mnemosyne.ccl.testing._workers '<json>'``."""
    return run({"faults": faults, "ddp": ddp})


if __name__ == "__main__":
    sys.exit(main())
