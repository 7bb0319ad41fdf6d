"""What bit-equal shrink would cost: all-reduce vs all-gather + fixed-order sum of a gradient bucket.

A shrunk job is bit-equal to the full one only if both sum the W data ranks' gradients in
one fixed order, i.e. every rank gathers all W contributions and adds them locally (the
all-reduce's order depends on the transport and the group size). This times both on Gloo
over loopback, in one invocation (W processes, one bucket of ``--mib`` MiB)::

    python tools/bench/shrink_order.py --world 4 --mib 16

Last line: ``gather_sum_ratio: <all-gather + sum / all-reduce>`` (median of ``--iters``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, numel: int, iters: int, port: int, q: mp.SimpleQueue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    out = [torch.empty_like(g) for _ in range(world)]
    times: dict[str, list[float]] = {"all_reduce": [], "all_gather_sum": []}
    for _ in range(iters):
        x = g.clone()
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        times["all_reduce"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_gather(out, g)
        acc = out[0].clone()
        for t in out[1:]:
            acc += t  # data rank 0, 1, ..., W-1: the same order whatever group ran it
        times["all_gather_sum"].append(time.perf_counter() - t0)
    if rank == 0:
        q.put({k: statistics.median(v) for k, v in times.items()})
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--mib", type=float, default=16.0)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--port", type=int, default=29533)
    a = p.parse_args(argv)
    numel = int(a.mib * 2**20) // 4
    q = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(_worker, (a.world, numel, a.iters, a.port, q), nprocs=a.world, join=False,
                             start_method="spawn")
    ctx.join(timeout=600)
    med = q.get()
    print(f"world {a.world}, bucket {a.mib:g} MiB fp32, gloo loopback, median of {a.iters}")
    for k, v in med.items():
        print(f"  {k:15s} {v * 1e3:8.2f} ms")
    print(f"gather_sum_ratio: {med['all_gather_sum'] / med['all_reduce']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
