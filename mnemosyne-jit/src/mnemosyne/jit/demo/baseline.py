r"""The baseline users run today: DDP, periodic DCP checkpoints, torchrun restarts.

Plain DDP, a torch.distributed.checkpoint every K steps, and torchrun restarting every
rank after a failure (used by tools/bench/recovery.py).

Run under torchrun (with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: torch 2.13's torchrun
otherwise reuses the dead group's store and cannot restart a Gloo job)::

    torchrun --nproc-per-node 4 --max-restarts 1 -m mnemosyne.jit.demo.baseline \\
        --steps 60 --ckpt-dir CK --ckpt-every 20 --events E.jsonl --kill-rank 2 --kill-step 30

Same model, optimizer, scheduler, data and per-step RNG seeding as
:mod:`mnemosyne.jit.demo.train`. It writes the same kinds of events (``step`` per step,
``fault``, ``trainer_start``, phases ``rendezvous``, ``build``, ``load``,
``checkpoint``, and ``recovered`` at the first step after a restart), so that the
benchmark reads both systems the same way.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mnemosyne.core.events import EventKind, EventLog, phase
from mnemosyne.jit._step import _rng_seed
from mnemosyne.jit.data import DataCursor, ResumableSampler
from mnemosyne.jit.demo.train import autocast, build, parse_args, peak_memory

__all__ = ["main"]


def _latest(ckpt_dir: Path) -> tuple[int, Path] | None:
    done = sorted((int(p.name.split("-")[1]), p) for p in ckpt_dir.glob("step-*") if (p / ".done").exists())
    return done[-1] if done else None


def main(argv: list[str] | None = None) -> None:
    """Train with DDP; checkpoint every K steps; fire the planned kill on the first attempt."""
    t_start = time.time()
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--ckpt-dir", required=True)
    extra.add_argument("--ckpt-every", type=int, default=20)
    extra.add_argument("--events", required=True)
    extra.add_argument("--kill-rank", type=int, default=-1)
    extra.add_argument("--kill-step", type=int, default=-1)
    extra.add_argument("--no-ddp", action="store_true",
                       help="each rank trains alone, no gradient communication (the 'plain' bench row)")
    known, rest = extra.parse_known_args(argv)
    args = parse_args(rest)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ["RANK"])
    log = EventLog(known.events, "baseline", rank, restart)
    log.emit(EventKind.INFO, "trainer_start", restart=restart, process_start=t_start)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    with phase(log, "rendezvous"):
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    ckpt_dir = Path(known.ckpt_dir)
    start = 0
    latest = _latest(ckpt_dir)
    with phase(log, "build"):
        # Restarting from a checkpoint: skip the weight init, as Mnemosyne's replacements do.
        model, opt, sched, data = build(args, device, init_weights=latest is None)
        ddp = model if known.no_ddp else DistributedDataParallel(model)
    if latest is not None:
        with phase(log, "load", step=latest[0]):
            msd, osd = get_state_dict(model, opt)
            state: dict[str, Any] = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=str(latest[1]))  # type: ignore[attr-defined]
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            sched.load_state_dict(torch.load(latest[1] / f"sched-{rank}.pt", weights_only=True))
        start = latest[0] + 1
    sampler = ResumableSampler(data, world, rank, shuffle=True, seed=args.seed)
    cursor = DataCursor(DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True))
    first = True
    for k in range(start, args.steps):
        batch = cursor.batch(k)
        s = _rng_seed(args.seed, rank, k)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % (2**32))
        t0 = time.perf_counter()
        if restart == 0 and rank == known.kill_rank and k == known.kill_step:
            log.emit(EventKind.FAULT, "kill", injected=True, step=k, phase="forward")
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = (t.to(device) for t in batch)
        with autocast(args, device):
            loss = ddp(x, y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        log.emit(EventKind.STEP, "step", time.perf_counter() - t0, step=k)
        if first and restart > 0:
            log.emit(EventKind.RECOVERED, "restarted", resume_step=start)
        first = False
        if (k + 1) % known.ckpt_every == 0 and k + 1 < args.steps:
            path = ckpt_dir / f"step-{k}"
            with phase(log, "checkpoint", step=k):
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))  # type: ignore[attr-defined]
                torch.save(sched.state_dict(), path / f"sched-{rank}.pt")
                dist.barrier()
                if rank == 0:
                    (path / ".done").touch()
    dist.barrier()
    if args.memory_event:
        log.emit(EventKind.INFO, "memory", peak_bytes=peak_memory(device), device=str(device))
    log.close()
    # No destroy_process_group(): it hung once in rank 0 on a loaded host after every rank
    # had finished; the process exits and the group goes with it.


if __name__ == "__main__":
    main()
