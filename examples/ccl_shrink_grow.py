"""mnemosyne-ccl alone: 4 ranks, one is SIGKILLed, the survivors shrink, a newcomer grows back in.

The README's snippet as a program that runs (``pip install "mnemosyne-ccl[torch]"``, Gloo on
CPU)::

    python examples/ccl_shrink_grow.py

The launcher (this script without arguments) hosts the store, which outlives every rank,
starts 4 rank processes (this script with ``--rank R``) and watches them. Every rank
all-reduces ``rank + 1`` (sum 10); rank 3 then kills itself. The launcher sees the exit
(waitpid) and publishes it; the survivors ``shrink([3])`` (sum 6), then ``grow([3])``
while a new process joins as rank 3 (sum 10 again). Exit code 0 when every sum
is right.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

JOB, TOKEN, WORLD, VICTIM = "example", "example-token", 4, 3


def rank_main(addr: str, rank: int, joining: bool) -> int:
    """One rank: create, all-reduce, (rank 3) die; shrink and grow back; or join as the newcomer."""
    import torch

    from mnemosyne.ccl import StoreClient, backend

    store = StoreClient(addr, JOB, TOKEN)  # in each rank

    def total(comm: object) -> float:
        t = torch.tensor([float(rank + 1)])
        comm.all_reduce(t)  # type: ignore[attr-defined]
        return float(t.item())

    if joining:  # the replacement: joins the group the survivors grow to epoch 2
        comm = backend("gloo").join(store, rank, epoch=2, timeout=60)
        print(f"rank {rank} (new process) joined epoch {comm.epoch}: sum {total(comm)}", flush=True)
        return 0
    comm = backend("gloo").create(store, rank, WORLD, timeout=60)
    print(f"rank {rank}: epoch {comm.epoch}, sum {total(comm)}", flush=True)
    if rank == VICTIM:
        os.kill(os.getpid(), signal.SIGKILL)  # a crash: no goodbye, no cleanup
    dead = int(store.get("example/dead", 60))  # published by the launcher, which saw the exit
    comm = comm.shrink([dead])  # survivors only
    print(f"rank {rank}: shrunk to {list(comm.ranks)}, epoch {comm.epoch}, sum {total(comm)}", flush=True)
    comm = comm.grow([dead])  # while the newcomer calls backend("gloo").join(...)
    print(f"rank {rank}: grew back to {list(comm.ranks)}, epoch {comm.epoch}, sum {total(comm)}", flush=True)
    comm.close()
    return 0


def launcher() -> int:
    """Host the store, run the ranks, replace the dead one; 0 when every sum is right."""
    from mnemosyne.ccl import StoreClient, StoreServer

    srv = StoreServer(jobs={JOB: TOKEN}).start()  # in the launcher: outlives every rank
    store = StoreClient(srv.address, JOB, TOKEN)
    me = [sys.executable, os.path.abspath(__file__), "--store", srv.address]
    try:
        procs = {r: subprocess.Popen([*me, "--rank", str(r)], stdout=subprocess.PIPE, text=True)
                 for r in range(WORLD)}
        procs[VICTIM].wait(timeout=120)
        print(f"launcher: rank {VICTIM} exited with {procs[VICTIM].returncode}", flush=True)
        store.set("example/dead", str(VICTIM).encode())
        new = subprocess.Popen([*me, "--rank", str(VICTIM), "--join"], stdout=subprocess.PIPE, text=True)
        out = {r: p.communicate(timeout=120)[0] for r, p in procs.items()}
        out[VICTIM] += new.communicate(timeout=120)[0]
        codes = [p.returncode for r, p in procs.items() if r != VICTIM] + [new.returncode]
    finally:
        srv.stop()
    text = "".join(out[r] for r in range(WORLD))
    print(text, end="")
    ok = (all(c == 0 for c in codes) and text.count("sum 10.0") == WORLD * 2 and text.count("sum 6.0") == WORLD - 1)
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--join", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.exit(launcher() if a.rank is None else rank_main(a.store, a.rank, a.join))
