"""Snapshot-tier benchmark: what an in-memory snapshot costs the training loop, against DCP async_save.

One invocation, one process (plus one replica-server process), CPU, the same model, optimizer
and data in every mode:

* ``none``: training steps only (the step-time floor);
* ``snapshot``: every ``--every`` steps a :class:`mnemosyne.jit._snapshot.Snapshotter`
  capture into /dev/shm after the optimizer step; the copy runs in the background during
  the next forward/backward and the loop fences before the next optimizer step;
* ``dcp``: every ``--every`` steps ``torch.distributed.checkpoint.async_save`` of the same
  state dict into a temporary folder (the previous save is awaited before the next, as the
  DCP docs advise).

The *stall* of a mode is the time the training thread spends inside the snapshot calls
(capture + fence, or async_save + waiting on the previous future), per snapshot. Also
measured: restoring the state into the model and optimizer from memory (newest generation
in /dev/shm) vs ``dcp.load`` from the folder DCP wrote; pushing and fetching one generation
to/from a peer agent's replica server (pyzmq, CURVE) on loopback.

Usage: python tools/bench/snapshot.py [--params-m 8] [--steps 60] [--every 10] [--rounds 2]
Writes JSON to $OUT/snapshot.json (or .bench/snapshot.json). Last line:
``snapshot_stall_ratio: <ours per snapshot / dcp async_save per snapshot>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from mnemosyne.jit import _snapstore
from mnemosyne.jit._replicate import fetch_generation, push_generation
from mnemosyne.jit._snapshot import Snapshotter, restore


def _model(params_m: float, width: int = 1024) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers = max(1, round(params_m * 1e6 / (width * width + width)))
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*mods)
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def _run(mode: str, a: argparse.Namespace, shm: str, disk: str) -> dict[str, Any]:
    model, opt = _model(a.params_m)
    x = torch.randn(a.batch, 1024)
    snap = Snapshotter(f"{shm}/rank0")
    fut: Any = None
    steps, stalls = [], []
    for step in range(1, a.steps + 1):
        t0 = time.perf_counter()
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        stall = 0.0
        if mode == "snapshot":
            t = time.perf_counter()
            snap.fence()  # the background copy of the last snapshot must end before the update
            stall += time.perf_counter() - t
        opt.step()
        if step % a.every == 0:
            t = time.perf_counter()
            if mode == "snapshot":
                snap.capture(_state(model, opt), step)
            elif mode == "dcp":
                if fut is not None:
                    fut.result()
                fut = dcp.async_save(_state(model, opt), checkpoint_id=f"{disk}/step{step}")
            stall += time.perf_counter() - t
            stalls.append(stall)
        elif stalls:  # the fence waits on the snapshot taken last: its stall
            stalls[-1] += stall
        steps.append(time.perf_counter() - t0)
    snap.close()
    if fut is not None:
        fut.result()
    warm = steps[a.every:]  # the first interval pays first-touch page faults in every mode
    return {"mode": mode, "step_s": statistics.median(warm), "mean_step_s": statistics.fmean(warm),
            "stalls_s": stalls[1:], "stall_s": statistics.median(stalls[1:]) if len(stalls) > 1 else 0.0,
            "last_step": a.steps - a.steps % a.every}


def _restore(a: argparse.Namespace, shm: str, disk: str, step: int) -> dict[str, float]:
    model, opt = _model(a.params_m)
    t = time.perf_counter()
    got, state = restore(f"{shm}/rank0")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    mem = time.perf_counter() - t
    assert got == step, (got, step)
    model2, opt2 = _model(a.params_m)
    # DCP loads in place: the optimizer needs its state tensors first (one step).
    model2(torch.randn(1, 1024)).sum().backward()
    opt2.step()
    sd = _state(model2, opt2)
    t = time.perf_counter()
    dcp.load(sd, checkpoint_id=f"{disk}/step{step}")
    model2.load_state_dict(sd["model"])
    opt2.load_state_dict(sd["optim"])
    disk_s = time.perf_counter() - t
    equal = all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters(), strict=True))
    return {"memory_s": mem, "dcp_disk_s": disk_s, "equal": float(equal)}


def _peer(shm: str) -> dict[str, float]:
    proc = subprocess.Popen([sys.executable, "-m", "mnemosyne.jit._snapchild", "serve", f"{shm}/peer", "bench"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip() if proc.stdout else ""
        gen = _snapstore.latest(f"{shm}/rank0")
        nbytes = len(gen.data) + len(gen.meta)
        push, fetch = [], []
        for i in range(4):  # the first two pushes fill the peer's two fresh slots (first-touch page faults)
            t = time.perf_counter()
            # A later step each time: the peer takes only newer generations (the same one again writes nothing).
            push_generation(endpoint, "bench", "node0/rank0", dataclasses.replace(gen, step=gen.step + i), timeout=120)
            push.append(time.perf_counter() - t)
            t = time.perf_counter()
            back = fetch_generation(endpoint, "bench", "node0/rank0", timeout=120)
            fetch.append(time.perf_counter() - t)
            assert back.step == gen.step + i and back.data == gen.data
        push_s, fetch_s = statistics.median(push[2:]), statistics.median(fetch[2:])
    finally:
        proc.kill()
        proc.wait()
    return {"bytes": nbytes, "push_gbps": nbytes / push_s / 1e9, "fetch_gbps": nbytes / fetch_s / 1e9}


def main() -> None:
    """Run every mode, print a table, write JSON; the last line is the stall ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params-m", type=float, default=8.0, help="model parameters in millions (Adam: x3 state)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="modes run in turn this many times, figures pooled")
    a = p.parse_args()
    shm = f"/dev/shm/mnemo-bench-snap-{uuid.uuid4().hex[:8]}"
    disk = tempfile.mkdtemp(prefix="mnemo-bench-dcp-")
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "snapshot": [], "dcp": []}
    try:
        for _ in range(a.rounds):
            for mode in runs:
                runs[mode].append(_run(mode, a, shm, disk))
        last = runs["dcp"][-1]["last_step"]
        rest = _restore(a, shm, disk, last)
        peer = _peer(shm)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)

    def pooled(mode: str, key: str) -> float:
        if key == "stall_s":
            return statistics.median([s for r in runs[mode] for s in r["stalls_s"]] or [0.0])
        return statistics.median([r[key] for r in runs[mode]])

    state_mb = peer["bytes"] / 1e6
    res = {
        "machine": f"{os.cpu_count()} CPU cores", "torch": torch.__version__, "state_mb": state_mb,
        "steps": a.steps, "every": a.every, "rounds": a.rounds, "runs": runs, "restore": rest, "peer": peer,
        "step_s": {m: pooled(m, "step_s") for m in runs},
        "stall_s": {m: pooled(m, "stall_s") for m in ("snapshot", "dcp")},
    }
    ratio = res["stall_s"]["snapshot"] / res["stall_s"]["dcp"]
    step_ratio = pooled("snapshot", "mean_step_s") / pooled("none", "mean_step_s")
    res["snapshot_stall_ratio"], res["step_time_ratio"] = ratio, step_ratio
    out = Path(os.environ.get("OUT", ".bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "snapshot.json").write_text(json.dumps(res, indent=1))
    print(f"state {state_mb:.1f} MB (model + Adam), snapshot every {a.every} steps, {a.rounds} rounds, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"{'':28}{'ours (shm)':>14}{'DCP async_save':>16}")
    print(f"{'stall per snapshot (ms)':28}{res['stall_s']['snapshot'] * 1e3:14.1f}{res['stall_s']['dcp'] * 1e3:16.1f}")
    print(f"{'restore (ms)':28}{rest['memory_s'] * 1e3:14.1f}{rest['dcp_disk_s'] * 1e3:16.1f}")
    print(f"step time median (ms): none {res['step_s']['none'] * 1e3:.1f}, snapshot "
          f"{res['step_s']['snapshot'] * 1e3:.1f}, dcp {res['step_s']['dcp'] * 1e3:.1f}")
    print(f"peer (loopback, CURVE): push {peer['push_gbps']:.2f} GB/s, fetch {peer['fetch_gbps']:.2f} GB/s")
    print(f"step_time_ratio (mean step, snapshot every {a.every} / none): {step_ratio:.4f}")
    print(f"snapshot_stall_ratio: {ratio:.4f}")


if __name__ == "__main__":
    main()
