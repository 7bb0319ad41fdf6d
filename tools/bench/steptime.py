"""Step-time benchmark: what Mnemosyne costs per step against DDP, same model and data.

One invocation trains the demo GPT (mnemosyne.jit.demo) the same number of steps three
ways and reads every figure from the runs' own step events:

* ``plain``: each rank trains alone, no gradient communication (torchrun, the DDP
  baseline script with ``--no-ddp``): the floor;
* ``ddp``: torch's DistributedDataParallel (default options, 25 MiB buckets), torchrun;
* ``mnemosyne``: the recoverable script under ``mnemo launch`` (no spare, no fault):
  gradient buckets reduced asynchronously during backward (mnemosyne.jit._gradsync).

NCCL when every rank has a GPU (then ``--model 1b`` runs bf16 autocast and fused AdamW in
all three), Gloo otherwise. Every run synchronises the device at the end of each step
(the baseline script always does; the recoverable one gets ``--sync-steps``), so a
step's event times its device work. Step time = median over ranks and steps after
``--warmup``; with ``--rounds R`` the modes run R times in turn (ddp, mnemosyne, plain,
ddp, ...) and the steps of all rounds are pooled (a noisy host then hits every mode).
Peak memory: the largest rank's peak CUDA allocation (GPU) or peak RSS (CPU).

``--parallel fsdp`` / ``hsdp``: the FSDP2 trainer (mnemosyne.jit.demo.train_fsdp, an MLP
of ``--fsdp-dim`` x ``--fsdp-layers``) over a ``(nproc,)`` / ``(nproc/2, 2)`` mesh; the
``ddp`` row is then plain FSDP2 under torchrun (``init_device_mesh``, Gloo) and
``mnemosyne`` the same trainer on ``mnemosyne.jit.device_mesh`` under ``mnemo launch``
(CPU only: the repairable mesh runs on Gloo); no ``plain`` row.

Usage: python tools/bench/steptime.py [--nproc 4] [--model demo|1b] [--steps 40]
       [--warmup 5] [--rounds 1] [--modes plain,ddp,mnemosyne] [--parallel ddp|fsdp|hsdp] [--json OUT]
Last line: ``step_time_ratio: <mnemosyne median / ddp median>`` (the torch baseline's). ``--snapshot-every N`` runs the
``mnemosyne`` mode with in-memory snapshots; their capture runs between steps (after the commit),
so it is reported apart, as training-thread time per step (capture + fence), from the trainers'
``snapshots`` events.
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

from mnemosyne.core.events import EventKind, read_events
from mnemosyne.jit.demo.run import DEMO_MODEL
from mnemosyne.jit.testing import launch

#: Model presets (demo GPT options); ``1b``: 24 x 12 x 2048^2 + embeddings = 1.27e9 parameters.
MODELS = {
    "demo": DEMO_MODEL,
    "1b": ["--layers", "24", "--dim", "2048", "--heads", "16", "--block", "512", "--vocab", "32000",
           "--batch", "4", "--samples", "4096"],
}
MODES = ("plain", "ddp", "mnemosyne")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model_args(a: argparse.Namespace, gpus: bool) -> list[str]:
    args = [x for x in MODELS[a.model] if x != "--log-steps"]
    if gpus and a.model == "1b":
        args += ["--autocast", "bf16", "--fused-adam"]
    if gpus:
        args.append("--init-on-device")
    return [*args, "--memory-event"]


def _read(events: list, warmup: int) -> dict:
    steps = [e.duration_s for e in events if e.kind == EventKind.STEP and int(e.fields["step"]) >= warmup]
    peaks = [int(e.fields["peak_bytes"]) for e in events if e.name == "memory"]
    if not steps:
        sys.exit("a run wrote no step events after the warm-up: raise --steps or lower --warmup")
    return {"steps_s": steps, "peak_bytes": max(peaks, default=0)}


def _fsdp_args(a: argparse.Namespace) -> list[str]:
    return ["--parallel", a.parallel, "--dim", str(a.fsdp_dim), "--layers", str(a.fsdp_layers),
            "--batch", str(a.fsdp_batch)]


def run_torchrun(work: Path, a: argparse.Namespace, mode: str, gpus: bool) -> dict:
    """``plain`` or ``ddp``: the baseline script under torchrun, no checkpoint, no fault (FSDP2: plain FSDP2)."""
    work.mkdir(parents=True, exist_ok=True)
    events = work / "events.jsonl"
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    if a.parallel == "ddp":
        script = ["-m", "mnemosyne.jit.demo.baseline", "--ckpt-dir", str(work / "ckpt"), "--ckpt-every", str(10**9),
                  "--events", str(events), "--steps", str(a.steps), *(["--no-ddp"] if mode == "plain" else []),
                  *_model_args(a, gpus)]
    else:
        script = ["-m", "mnemosyne.jit.demo.train_fsdp", "--baseline-events", str(events), "--steps", str(a.steps),
                  *_fsdp_args(a)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc), "--max-restarts", "0",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout, check=False)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return _read(read_events(events, strict=False), a.warmup)


def run_mnemosyne(work: Path, a: argparse.Namespace, gpus: bool) -> dict:
    """The recoverable script under ``mnemo launch`` (no spare, no fault)."""
    snap = ["--snapshot-every", str(a.snapshot_every)] if a.snapshot_every else []
    if a.parallel == "ddp":
        run = launch(work, nproc=a.nproc, spares=0, steps=a.steps, timeout=a.timeout,
                     train_args=[*_model_args(a, gpus), "--log-steps", "--sync-steps"], launch_args=snap)
    else:
        run = launch(work, nproc=a.nproc, spares=0, steps=a.steps, timeout=a.timeout, train_args=_fsdp_args(a),
                     launch_args=snap, module="mnemosyne.jit.demo.train_fsdp")
    if run.returncode != 0:
        sys.exit(f"mnemosyne run failed ({run.returncode}):\n{run.output[-3000:]}")
    out = _read(run.events, a.warmup)
    out["backend"] = ",".join(sorted({str(e.fields.get("backend")) for e in run.events
                                      if e.name == "trainer_start"}))
    # A snapshot's capture runs after its step's commit (outside the step events): its totals
    # come from each trainer's ``snapshots`` event, as training-thread seconds per step.
    snaps = [e.fields for e in run.events if e.name == "snapshots"]
    if snaps:
        out["snapshot_stall_s_per_step"] = max((f["capture_s"] + f["fence_s"]) / a.steps for f in snaps)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--model", choices=sorted(MODELS), default="demo")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the medians (default 5)")
    p.add_argument("--rounds", type=int, default=1, help="run every mode this many times, in turn (default 1)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of plain,ddp,mnemosyne")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                   help="mnemosyne mode: mnemo launch --snapshot-every N (default 0: off)")
    p.add_argument("--parallel", choices=("ddp", "fsdp", "hsdp"), default="ddp",
                   help="ddp: the demo GPT, DDP baseline (default); fsdp/hsdp: the FSDP2 MLP, plain FSDP2 baseline")
    p.add_argument("--fsdp-dim", type=int, default=256, help="--parallel fsdp/hsdp: MLP width (default 256)")
    p.add_argument("--fsdp-layers", type=int, default=4, help="--parallel fsdp/hsdp: blocks (default 4)")
    p.add_argument("--fsdp-batch", type=int, default=64, help="--parallel fsdp/hsdp: batch per rank (default 64)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.parallel != "ddp" and a.modes == ",".join(MODES):
        a.modes = "ddp,mnemosyne"
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes: {bad or 'nothing'} not in {', '.join(MODES)}")
    if "mnemosyne" in modes and "ddp" not in modes:
        p.error("--modes: the ratio needs both ddp and mnemosyne")
    if a.nproc < 1 or a.steps <= a.warmup or a.rounds < 1:
        p.error("need --nproc >= 1, --steps > --warmup and --rounds >= 1")
    if a.parallel != "ddp" and ("plain" in modes or (a.parallel == "hsdp" and a.nproc % 2)):
        p.error("--parallel fsdp/hsdp: modes ddp,mnemosyne only; hsdp needs an even --nproc")
    import torch

    gpus = a.parallel == "ddp" and torch.cuda.is_available() and torch.cuda.device_count() >= a.nproc
    where = (f"{a.nproc} x {torch.cuda.get_device_name(0)}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"
             if gpus else f"CPU, Gloo, {os.cpu_count()} cores")
    work = Path(tempfile.mkdtemp(prefix="mnemo-steptime-"))
    what = (f"GPT '{a.model}'" if a.parallel == "ddp" else
            f"{a.parallel.upper()} MLP {a.fsdp_layers} x {a.fsdp_dim}, batch {a.fsdp_batch} (ddp row: plain FSDP2)")
    print(f"step-time benchmark: {what}, {a.nproc} ranks, {a.steps} steps (warm-up {a.warmup}), "
          f"{a.rounds} round(s); torch {torch.__version__}, {where}; work dir {work}", flush=True)
    pooled: dict[str, dict] = {m: {"steps_s": [], "peak_bytes": 0} for m in modes}
    order = [m for m in ("ddp", "mnemosyne", "plain") if m in modes]
    for r in range(a.rounds):
        for m in order:
            t0 = time.perf_counter()
            res = (run_mnemosyne(work / f"{m}-{r}", a, gpus) if m == "mnemosyne"
                   else run_torchrun(work / f"{m}-{r}", a, m, gpus))
            pooled[m]["steps_s"] += res["steps_s"]
            pooled[m]["peak_bytes"] = max(pooled[m]["peak_bytes"], res["peak_bytes"])
            pooled[m].setdefault("backend", res.get("backend", "torch DDP" if m == "ddp" else "none"))
            if "snapshot_stall_s_per_step" in res:
                pooled[m].setdefault("snapshot_stall_s_per_step", []).append(res["snapshot_stall_s_per_step"])
            stall = (f", snapshot stall {res['snapshot_stall_s_per_step'] * 1000:.2f} ms/step"
                     if "snapshot_stall_s_per_step" in res else "")
            print(f"  round {r + 1}: {m:<10} median {statistics.median(res['steps_s']) * 1000:9.2f} ms "
                  f"({time.perf_counter() - t0:.1f} s){stall}", flush=True)
    ddp = statistics.median(pooled["ddp"]["steps_s"]) if "ddp" in pooled else None
    print(f"\n{'mode':<11}{'median step (ms)':>18}{'p90 (ms)':>10}{'vs ddp':>8}{'peak memory (MiB)':>19}  backend")
    for m in modes:
        s = sorted(pooled[m]["steps_s"])
        med = statistics.median(s)
        p90 = s[min(len(s) - 1, int(0.9 * len(s)))]
        ratio = f"{med / ddp:.3f}" if ddp else "-"
        pooled[m].update(median_s=med, p90_s=p90)
        print(f"{m:<11}{med * 1000:>18.2f}{p90 * 1000:>10.2f}{ratio:>8}{pooled[m]['peak_bytes'] / 2**20:>19.1f}"
              f"  {pooled[m]['backend']}")
    ratio_v = pooled["mnemosyne"]["median_s"] / ddp if ddp and "mnemosyne" in pooled else None
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "where": where, "torch": torch.__version__,
                                            "modes": {m: {k: v for k, v in d.items() if k != "steps_s"}
                                                      for m, d in pooled.items()},
                                            "step_time_ratio": ratio_v}, indent=2))
    if ratio_v is not None:
        mem = pooled["mnemosyne"]["peak_bytes"] / max(1, pooled["ddp"]["peak_bytes"])
        print(f"peak_memory_ratio: {mem:.3f}")
        print(f"step_time_ratio: {ratio_v:.3f}")


if __name__ == "__main__":
    main()
