"""Recovery benchmark: Mnemosyne vs the baseline users run today, same model and fault.

Baseline: plain DDP with a torch.distributed.checkpoint every K steps, launched by
torchrun with one allowed restart: the fault kills one rank, torchrun tears every rank
down and starts them all again, they reload the latest checkpoint and redo the steps
since it. Mnemosyne: ``mnemo launch`` with one pre-warmed spare; the job heals in place.

Both runs train the demo GPT (mnemosyne.jit.demo) with the same data, seeds, ranks, and
kill the same rank at the start of the same step. Every figure is read from the runs'
event logs (nothing is timed twice). Lost time = from the fault until the job is back at
the step where the fault hit (for the baseline: restart, reload, and redo; for
Mnemosyne: detect, replace, repair, transfer, resume). Steady-state overhead = median
step time with Mnemosyne / with plain DDP, over the steps before the fault, measured in
this same invocation.

Usage: python tools/bench/recovery.py [--nproc 4] [--steps 60] [--ckpt-every 20]
       [--kill-step 30] [--kill-rank 2] [--kill-phase forward|allreduce|optimizer]
       [--model demo|1b] [--spares 1,0,shrink] [--jit-backend auto|ccl|torch] [--json OUT]
``--spares 1,0,shrink`` runs Mnemosyne with a pre-warmed spare, without (the replacement
then starts cold), and without but with ``--shrink`` (the job continues with fewer
replicas at once and grows back when the cold replacement is ready); the speedup is
taken from the first. ``--model 1b`` is a
1.2-billion-parameter GPT (24 layers, width 2048) for the GPU machines; on GPUs (one per
rank) both runs use NCCL. Last line: ``recovery_speedup: <baseline lost time / Mnemosyne's>``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mnemosyne.core.env import MNEMOSYNE_JIT_BACKEND
from mnemosyne.core.events import EventKind, read_events
from mnemosyne.jit.demo.run import DEMO_MODEL
from mnemosyne.jit.summary import incidents
from mnemosyne.jit.testing import launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Model presets (demo GPT options); ``1b``: 24 x 12 x 2048^2 + embeddings = 1.27e9 parameters.
MODELS = {
    "demo": DEMO_MODEL,
    "1b": ["--layers", "24", "--dim", "2048", "--heads", "16", "--block", "512", "--vocab", "32000",
           "--batch", "4", "--samples", "4096", "--log-steps"],
}


def run_mnemosyne(work: Path, a: argparse.Namespace, case: str) -> dict:
    """One Mnemosyne run: ``case`` is a spare count, or ``shrink`` (no spare, ``--shrink``)."""
    t0 = time.perf_counter()
    shrink = case == "shrink"
    spares = 0 if shrink else int(case)
    plan = f"rank={a.kill_rank},step={a.kill_step},kind=kill,phase={a.kill_phase}"
    env = {MNEMOSYNE_JIT_BACKEND: a.jit_backend} if a.jit_backend != "auto" else None
    run = launch(work / f"mnemosyne-{case}", nproc=a.nproc, spares=spares, steps=a.steps, inject=plan,
                 train_args=MODELS[a.model], timeout=a.timeout, env=env,
                 launch_args=[*(["--shrink"] if shrink else []), *(["--proxy", "--proxy-size", a.proxy_size]
                                                                    if a.proxy else [])])
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        sys.exit(f"mnemosyne run failed ({run.returncode}):\n{run.output[-3000:]}")
    ev = run.events
    fault = min(e.ts for e in ev if e.kind == EventKind.FAULT)
    inc = incidents(ev)[0]
    steps = [e.duration_s for e in ev if e.kind == EventKind.STEP and e.ts < fault and e.fields["step"] >= 2]
    return {"lost_s": inc.total_s, "phases_s": inc.phases_s, "steps_redone": inc.steps_redone,
            "step_median_s": statistics.median(steps), "wall_s": wall,
            "bytes_transferred": inc.bytes_transferred, "donors": inc.donors,
            "backend": ",".join(sorted({str(e.fields.get("backend")) for e in ev if e.name == "trainer_start"})),
            "spares": spares, "shrink": shrink, **_grow_back(ev),
            "reattached": any(e.name == "transfer" and e.fields.get("role") == "reattached" for e in ev)}


def _grow_back(ev: list) -> dict:
    """For a --shrink run: how long the job ran shrunk, and what the grow-back cost (its aborted step)."""
    shrink = [e for e in ev if e.name == "shrink"]
    grow = [e for e in ev if e.name == "grow"]
    if not shrink:
        return {}
    out = {"grew_back": bool(grow)}
    if grow:
        back = [e.ts for e in ev if e.kind == EventKind.RECOVERED and e.epoch == grow[0].epoch]
        out["shrunk_s"] = grow[0].ts - shrink[0].ts
        out["grow_pause_s"] = (max(back) - grow[0].ts) if back else None
    return out


def run_baseline(work: Path, a: argparse.Namespace) -> dict:
    out = work / "baseline"
    out.mkdir(parents=True, exist_ok=True)
    events = out / "events.jsonl"
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc), "--max-restarts", "1",
           "--monitor-interval", "0.1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
           "-m", "mnemosyne.jit.demo.baseline", "--ckpt-dir", str(out / "ckpt"), "--ckpt-every", str(a.ckpt_every),
           "--events", str(events), "--kill-rank", str(a.kill_rank), "--kill-step", str(a.kill_step),
           "--steps", str(a.steps), *[x for x in MODELS[a.model] if x != "--log-steps"]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"baseline run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    ev = read_events(events, strict=False)
    fault = min(e.ts for e in ev if e.kind == EventKind.FAULT)
    after = [e for e in ev if e.epoch >= 1]
    restart_start = min(e.fields["process_start"] for e in after if e.name == "trainer_start")
    ready = {n: max((e.ts for e in after if e.kind == EventKind.PHASE and e.name == n), default=restart_start)
             for n in ("rendezvous", "build", "load")}
    resume_step = min(int(e.fields["resume_step"]) for e in after if e.kind == EventKind.RECOVERED)
    back = [e.ts for e in after if e.kind == EventKind.STEP and e.fields["step"] == a.kill_step - 1]
    t_back = max(back) if back else max(ready.values())
    first_steps = [e.ts - (e.duration_s or 0) for e in after if e.kind == EventKind.STEP
                   and e.fields["step"] == resume_step]
    t_resumed = min(first_steps)
    phases = {
        "detect+teardown+spawn+import torch": restart_start - fault,
        "rendezvous": ready["rendezvous"] - restart_start,
        "build model+DDP": ready["build"] - ready["rendezvous"],
        "load checkpoint": ready["load"] - ready["build"],
        "resume (to first redone step)": max(0.0, t_resumed - ready["load"]),
        "redo steps": t_back - max(t_resumed, ready["load"]),
    }
    steps = [e.duration_s for e in ev if e.kind == EventKind.STEP and e.ts < fault and e.fields["step"] >= 2]
    ckpt = [e.duration_s for e in ev if e.kind == EventKind.PHASE and e.name == "checkpoint"]
    return {"lost_s": t_back - fault, "phases_s": phases, "steps_redone": a.kill_step - resume_step,
            "step_median_s": statistics.median(steps), "checkpoint_s": max(ckpt, default=0.0), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--kill-step", type=int, default=30)
    p.add_argument("--kill-rank", type=int, default=None, help="rank to kill (default: 2, or the last rank)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", default=None)
    p.add_argument("--kill-phase", choices=["forward", "allreduce", "optimizer"], default="forward",
                   help="where in the step the rank dies (the baseline always dies at the step's start)")
    p.add_argument("--model", choices=sorted(MODELS), default="demo")
    p.add_argument("--spares", default="1",
                   help="comma-separated Mnemosyne runs: a spare count each, or 'shrink' (no spare, --shrink); "
                        "e.g. 1,0,shrink")
    p.add_argument("--proxy", action="store_true",
                   help="Mnemosyne runs keep state in device proxies (mnemo launch --proxy); replacements re-attach")
    p.add_argument("--proxy-size", default="4G", help="arena size per proxy with --proxy (default 4G)")
    p.add_argument("--jit-backend", choices=["auto", "ccl", "torch"], default="auto",
                   help="mnemosyne's store/communicator: auto (mnemosyne-ccl when installed) or forced")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mnemo-bench-"))
    import torch

    spare_cases = [x.strip() for x in a.spares.split(",")]
    bad = [x for x in spare_cases if x != "shrink" and not x.isdigit()]
    if bad:
        p.error(f"--spares: {bad} are neither spare counts nor 'shrink'")
    if a.kill_rank is None:
        a.kill_rank = min(2, a.nproc - 1)
    if not 0 <= a.kill_rank < a.nproc:
        p.error(f"--kill-rank {a.kill_rank}: expected a rank in 0..{a.nproc - 1} (--nproc {a.nproc})")
    gpu = "no GPU"
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, NCCL {torch.cuda.nccl.version()}"
    print(f"recovery benchmark: GPT '{a.model}' ({' '.join(MODELS[a.model])}), {a.nproc} ranks, {a.steps} steps, "
          f"kill rank {a.kill_rank} at step {a.kill_step} ({a.kill_phase}); baseline checkpoints every "
          f"{a.ckpt_every} steps. torch {torch.__version__}, {gpu}, {os.cpu_count()} CPUs, work dir {work}",
          flush=True)
    base = run_baseline(work, a)
    runs = [run_mnemosyne(work, a, n) for n in spare_cases]
    mnemo = runs[0]
    print(f"\n{'baseline (torchrun restart + DCP reload)':<44}{'seconds':>10}")
    for k, v in base["phases_s"].items():
        print(f"  {k:<42}{v:>10.3f}")
    print(f"  {'total lost time':<42}{base['lost_s']:>10.3f}   ({base['steps_redone']} steps redone)")
    for run in runs:
        plural = ("s" if run["spares"] != 1 else "") + (", device proxy" if a.proxy else "")
        label = (f"mnemosyne (shrink, no spare, {run['backend']})" if run["shrink"] else
                 f"mnemosyne (in place, {run['spares']} warm spare{plural}, {run['backend']})")
        print(f"\n{label:<44}{'seconds':>10}")
        for k, v in run["phases_s"].items():
            print(f"  {k:<42}{v:>10.3f}")
        print(f"  {'total lost time':<42}{run['lost_s']:>10.3f}   ({run['steps_redone']} step redone, "
              f"{run['bytes_transferred'] / 1e6:.2f} MB from {run['donors']} donors"
              f"{', re-attached to its proxy' if run['reattached'] else ''})")
        if run["shrink"] and not run.get("grew_back"):
            print("  (ran shrunk to the end: the cold replacement was not ready before the last step)")
        if run.get("grew_back"):
            print(f"  {'ran shrunk, then grew back (pause)':<42}{run['shrunk_s']:>10.3f}   "
                  f"({(run['grow_pause_s'] or 0) * 1000:.0f} ms pause at the grow)")
    overhead = mnemo["step_median_s"] / base["step_median_s"]
    speedup = base["lost_s"] / mnemo["lost_s"]
    print(f"\nsteady-state step time: plain DDP {base['step_median_s'] * 1000:.2f} ms, "
          f"mnemosyne {mnemo['step_median_s'] * 1000:.2f} ms, ratio {overhead:.3f}")
    print(f"baseline checkpoint (blocking DCP save) {base['checkpoint_s'] * 1000:.1f} ms every {a.ckpt_every} steps")
    if a.json:
        Path(a.json).write_text(json.dumps({"baseline": base, "mnemosyne": mnemo, "mnemosyne_runs": runs,
                                            "step_time_ratio": overhead, "gpu": gpu,
                                            "recovery_speedup": speedup, "args": vars(a)}, indent=2))
    print(f"recovery_speedup: {speedup:.2f}")


if __name__ == "__main__":
    main()
