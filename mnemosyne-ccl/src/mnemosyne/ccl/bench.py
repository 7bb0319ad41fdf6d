"""Benchmark: full init (fresh processes and warm in-process) vs rebuild vs shrink vs grow.

Run ``python tools/bench/ccl.py --backend gloo --world 4 --json OUT`` (or ``mnemo ccl
bench``). The driver hosts the store server and spawns ``--world`` rank processes; each
phase starts on every rank at once (a store barrier) and ends when the phase's
communicator has finished one all_reduce; a phase's time is the slowest rank's, and each
phase is repeated and reported as the median.

Phases:

``init_fresh``  spawn fresh processes until their first all_reduce (imports included).
``init_warm``   ``create`` of a new communicator in live processes (new tag each time).
``rebuild``     ``comm.rebuild()`` (NCCL: with the cached topology/graph files).
``shrink``      survivors drop the last rank (measured on survivors).
``grow``        survivors take it back while it ``join``s (measured on survivors).

The last line printed is ``repair_speedup: <x>`` with x = init_warm / (shrink + grow).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

from mnemosyne.ccl.store_client import StoreClient
from mnemosyne.core.store import Store

__all__ = ["main", "run"]

PHASES = ("init_warm", "rebuild", "shrink", "grow")


def _barrier(store: Store, name: str, n: int, timeout: float) -> None:
    if store.add(f"bench/bar/{name}", 1) == n:
        store.set(f"bench/bar/{name}/go", b"1")
    store.get(f"bench/bar/{name}/go", timeout)


def _tensor(backend: str, numel: int, device: int) -> Any:
    import torch

    dev = f"cuda:{device}" if backend == "nccl" else "cpu"
    return torch.ones(numel, device=dev)


def _sync(backend: str) -> None:
    if backend == "nccl":
        import torch

        torch.cuda.synchronize()


def worker(cfg: dict[str, Any]) -> None:
    """One rank: run every phase ``repeats`` times, publish durations to the store."""
    from mnemosyne.ccl import backend as get_backend

    rank, world, name, reps = int(cfg["rank"]), int(cfg["world"]), str(cfg["backend"]), int(cfg["repeats"])
    timeout, numel = float(cfg["timeout"]), int(cfg["numel"])
    device = int(cfg.get("device", rank))
    store = StoreClient(cfg["addr"], cfg["job"], cfg["token"], timeout=timeout)
    be: Any = get_backend(name)
    if name == "nccl":
        be.device = device  # type: ignore[attr-defined]
    t = _tensor(name, numel, device)
    if cfg.get("fresh"):
        comm = be.create(store, rank, world, timeout=timeout, tag=str(cfg["tag"]))
        comm.all_reduce(t)
        _sync(name)
        store.set(f"bench/fresh/{cfg['tag']}/{rank}", str(time.time()).encode())
        comm.close()
        return
    out: dict[str, list[float]] = {p: [] for p in PHASES}
    comm = be.create(store, rank, world, timeout=timeout, tag="main")
    comm.all_reduce(t)
    _sync(name)
    victim = world - 1
    for i in range(reps):
        _barrier(store, f"warm{i}", world, timeout)
        t0 = time.perf_counter()
        c = be.create(store, rank, world, timeout=timeout, tag=f"warm{i}")
        c.all_reduce(t)
        _sync(name)
        out["init_warm"].append(time.perf_counter() - t0)
        c.close()

        _barrier(store, f"rebuild{i}", world, timeout)
        t0 = time.perf_counter()
        comm = comm.rebuild()
        comm.all_reduce(t)
        _sync(name)
        out["rebuild"].append(time.perf_counter() - t0)

        _barrier(store, f"shrink{i}", world, timeout)
        if rank == victim:
            grown_epoch = comm.epoch + 2
            comm.close()
            _barrier(store, f"grow{i}", world, timeout)
            comm = be.join(store, rank, epoch=grown_epoch, timeout=timeout, tag="main")
            comm.all_reduce(t)
            _sync(name)
            continue
        t0 = time.perf_counter()
        comm = comm.shrink([victim])
        comm.all_reduce(t)
        _sync(name)
        out["shrink"].append(time.perf_counter() - t0)
        _barrier(store, f"grow{i}", world, timeout)
        t0 = time.perf_counter()
        comm = comm.grow([victim])
        comm.all_reduce(t)
        _sync(name)
        out["grow"].append(time.perf_counter() - t0)
    store.set(f"bench/result/{rank}", json.dumps(out).encode())
    comm.close()


def _spawn(cfg: dict[str, Any]) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        env.setdefault(k, v)
    return subprocess.Popen([sys.executable, "-m", "mnemosyne.ccl.bench", "--worker", json.dumps(cfg)], env=env)


def _reap(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    bad = [p.returncode for p in procs if p.returncode != 0]
    if bad:
        msg = f"benchmark rank processes failed with exit codes {bad}"
        raise RuntimeError(msg)


def _gather(store: StoreClient, keys: list[str], procs: list[subprocess.Popen[bytes]], timeout: float) -> list[bytes]:
    """Values of ``keys`` once all are set; fail at once when a rank process dies first."""
    deadline = time.monotonic() + timeout
    while not store.check(keys):
        dead = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if dead:
            msg = f"benchmark rank processes failed (rank, exit code): {dead}; see their output above"
            raise RuntimeError(msg)
        if time.monotonic() >= deadline:
            msg = f"benchmark ranks did not report {keys} within {timeout:g} s"
            raise RuntimeError(msg)
        time.sleep(0.05)
    return [store.get(k, timeout) for k in keys]


def _library_version(backend: str) -> str | None:
    if backend != "nccl":
        return None
    from mnemosyne.ccl.nccl import nccl_version

    return ".".join(map(str, nccl_version()))


def run(args: argparse.Namespace) -> int:
    """Drive the benchmark; print a table and the ``repair_speedup`` line last."""
    import secrets

    from mnemosyne.ccl.store_server import StoreServer

    job, token = f"bench-{secrets.token_hex(3)}", secrets.token_hex(16)
    server = StoreServer(jobs={job: token}).start()
    store = StoreClient(server.address, job, token, timeout=args.timeout)
    base = {"addr": server.address, "job": job, "token": token, "backend": args.backend, "world": args.world,
            "repeats": args.repeats, "timeout": args.timeout, "numel": args.numel}
    results: dict[str, Any] = {"backend": args.backend, "world": args.world, "repeats": args.repeats,
                               "numel": args.numel, "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
                               "library_version": _library_version(args.backend), "phases": {}}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        fresh: list[float] = []
        for i in range(args.fresh_repeats):
            t0 = time.time()
            procs = [_spawn({**base, "rank": r, "fresh": True, "tag": f"fresh{i}"}) for r in range(args.world)]
            ends = [float(v) for v in _gather(store, [f"bench/fresh/fresh{i}/{r}" for r in range(args.world)],
                                              procs, args.timeout)]
            fresh.append(max(ends) - t0)
            _reap(procs, args.timeout)
        procs = [_spawn({**base, "rank": r}) for r in range(args.world)]
        per_rank = [json.loads(v) for v in _gather(store, [f"bench/result/{r}" for r in range(args.world)], procs,
                                                   args.timeout * (args.repeats + 1))]
        _reap(procs, args.timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        store.close()
        server.stop()
    phases: dict[str, list[float]] = {"init_fresh": fresh}
    for ph in PHASES:
        rows = [r[ph] for r in per_rank if r[ph]]
        phases[ph] = [max(vals) for vals in zip(*rows, strict=True)]  # a phase ends with its slowest rank
    for ph, vals in phases.items():
        results["phases"][ph] = {"median_s": statistics.median(vals) if vals else None, "all_s": vals}
    med = {ph: results["phases"][ph]["median_s"] for ph in phases}
    speedup = med["init_warm"] / (med["shrink"] + med["grow"])
    results["repair_speedup"] = speedup
    # What a repair saves against today's restart (fresh processes), for the docs.
    results["restart_speedup"] = med["init_fresh"] / (med["shrink"] + med["grow"]) if fresh else None
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    print(f"backend {args.backend}, world {args.world}, library {results['library_version']}, "
          f"machine {results['machine']}, median of {args.repeats} (fresh: {args.fresh_repeats})")
    for ph in ("init_fresh", *PHASES):
        print(f"  {ph:<11} {med[ph] * 1000:10.1f} ms" if med[ph] is not None else f"  {ph:<11} (not run)")
    print(f"repair_speedup: {speedup:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mnemosyne.ccl.bench`` (driver), or ``--worker JSON`` (one rank)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker(json.loads(argv[1]))
        return 0
    from mnemosyne.ccl.bench_args import add_arguments

    parser = argparse.ArgumentParser(prog="ccl-bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
