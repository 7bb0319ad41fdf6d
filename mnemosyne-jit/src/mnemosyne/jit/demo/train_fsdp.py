"""A recoverable FSDP2 / HSDP training script (run it under ``mnemo launch``).

    mnemo launch --nproc-per-node 4 -m mnemosyne.jit.demo.train_fsdp --parallel hsdp --steps 12

The model is a stack of Linear+GELU blocks, each block and the root sharded with
``fully_shard`` over :func:`mnemosyne.jit.device_mesh`: ``--parallel hsdp`` is a
``(world / 2, 2)`` mesh (replicate x shard), ``fsdp`` a ``(world,)`` one. A replacement
(:func:`mnemosyne.jit.joining`) builds the model on the meta device, shards it and
``to_empty``s it: it never materialises the full model; its shard arrives inside
:func:`mnemosyne.jit.init`. ``--out`` receives ``final-rank<r>.pt``: this rank's local
shards and optimizer state (the shards differ across a shard group by design).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

import mnemosyne.jit as mj
from mnemosyne.core.env import MNEMOSYNE_RANK, MNEMOSYNE_WORLD_SIZE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="train_fsdp", description=__doc__.split("\n\n")[0])
    p.add_argument("--parallel", choices=("hsdp", "fsdp"), default="hsdp")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--baseline-events", default="", metavar="FILE",
                   help="run as plain FSDP2 under torchrun (init_device_mesh, no Mnemosyne), writing step "
                        "events to FILE (tools/bench/steptime.py --parallel)")
    return p.parse_args(argv)


def build(dim: int, layers: int) -> torch.nn.Module:
    """The model (deterministic init from the seed set by the caller).

    The head has 3 outputs: its weight and bias shard unevenly over a shard group of 2.
    """
    blocks = [torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU()) for _ in range(layers)]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(dim, 3))


def shard(model: torch.nn.Module, mesh: Any) -> None:
    """``fully_shard`` every block, then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in model.children():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


class Batches:
    """Data rank ``d``'s batch of step ``k``: a pure function of (seed, d, k), re-iterable."""

    def __init__(self, rank: int, dim: int, batch: int, seed: int) -> None:
        self.rank, self.dim, self.batch, self.seed = rank, dim, batch, seed

    def __len__(self) -> int:
        return 1 << 20

    def __iter__(self) -> Any:
        return (self[k] for k in range(len(self)))

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 1000 * k + self.rank)
        return torch.randn(self.batch, self.dim, generator=g), torch.randn(self.batch, 3, generator=g)


def baseline(args: argparse.Namespace) -> None:
    """The same training as plain FSDP2 under torchrun: the step-time baseline."""
    import time

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mnemosyne.core.events import EventKind, EventLog

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    shape = (world // 2, 2) if args.parallel == "hsdp" else (world,)
    names = ("replicate", "shard") if args.parallel == "hsdp" else ("shard",)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(args.seed)
    model = build(args.dim, args.layers)
    shard(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    log = EventLog(args.baseline_events, "baseline", rank, 0)
    data = Batches(rank, args.dim, args.batch, args.seed)
    for k in range(args.steps):
        t0 = time.perf_counter()
        x, y = data[k]
        torch.nn.functional.mse_loss(model(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.emit(EventKind.STEP, "step", time.perf_counter() - t0, step=k)
    log.close()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Train; write this rank's final local state when ``--out`` is given."""
    args = parse_args(argv)
    if args.baseline_events:
        baseline(args)
        return
    rank, world = int(os.environ.get(MNEMOSYNE_RANK, "0")), int(os.environ.get(MNEMOSYNE_WORLD_SIZE, "1"))
    out = Path(args.out) if args.out else None
    if out is not None:
        (out / "started").mkdir(parents=True, exist_ok=True)
        (out / "started" / f"rank{rank}.{os.getpid()}").touch()
    shape = (world // 2, 2) if args.parallel == "hsdp" else (world,)
    mesh = mj.device_mesh(shape, device_type="cpu")
    torch.manual_seed(args.seed)
    with torch.device("meta" if mj.joining() else "cpu"):
        model = build(args.dim, args.layers)
    shard(model, mesh)
    if mj.joining():
        model.to_empty(device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    job = mj.init(model, opt, scheduler=sched, seed=args.seed, mesh=mesh, log_steps=True)
    data = Batches(rank, args.dim, args.batch, args.seed)
    for step in job.steps(data, max_steps=args.steps):
        with step:
            x, y = step.batch
            torch.nn.functional.mse_loss(model(x), y).backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    if out is not None:
        from mnemosyne.jit.demo.train import save_final

        local = job._state()  # this rank's shards (what differs across a shard group)
        save_final(out, rank, job, local["params"], local["optim"], sched.state_dict())
    job.close()


if __name__ == "__main__":
    main()
