"""The demo's recoverable training script: a small GPT on generated tokens.

Run it under the launcher, e.g.::

    mnemo launch --nproc-per-node 4 --spares 1 -m mnemosyne.jit.demo.train --steps 40

With ``--out DIR`` every rank writes ``DIR/started/rank<r>.<pid>`` when its process
starts and ``DIR/final-rank<r>.pt`` (model, optimizer and scheduler state, pid) at the
end: the tests, the demo and the benchmark compare those files bit for bit.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import mnemosyne.jit as mj
from mnemosyne.core.env import MNEMOSYNE_LOCAL_RANK, MNEMOSYNE_RANK, MNEMOSYNE_WORLD_SIZE
from mnemosyne.jit.demo.data import MarkovTokens
from mnemosyne.jit.demo.model import GPT, GPTConfig

__all__ = ["build", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (shared with the baseline script)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="per-rank batch size")
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bucket-kb", type=int, default=25 * 1024, help="gradient bucket size")
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step (slows the demo down)")
    p.add_argument("--log-steps", action="store_true", help="write a step event per step")
    p.add_argument("--out", default=None, help="folder for start markers and final state")
    p.add_argument("--shrunk-step-sleep", type=float, default=0.0,
                   help="extra seconds per step while the job runs without a rank (--shrink; gives the "
                        "replacement time to warm up in tests)")
    p.add_argument("--step-batch", action="store_true",
                   help="read step.batch instead of iterating step.micro_batches() (refused under --shrink)")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none",
                   help="bf16: forward under torch.autocast on CUDA (benchmarks)")
    p.add_argument("--fused-adam", action="store_true", help="AdamW(fused=True) on CUDA (benchmarks)")
    p.add_argument("--sync-steps", action="store_true",
                   help="torch.cuda.synchronize() at the end of every step, so that step events time the "
                        "device's work (benchmarks; the DDP baseline always does)")
    p.add_argument("--init-on-device", action="store_true",
                   help="initialise the weights on the GPU (benchmarks: same on every rank, not the CPU init's values)")
    p.add_argument("--memory-event", action="store_true",
                   help="write a 'memory' event with this rank's peak memory at the end (benchmarks)")
    return p.parse_args(argv)


def uses_gpus(nproc: int) -> bool:
    """Whether ``nproc`` ranks on this node each get a GPU of their own (NCCL needs one per rank)."""
    return torch.cuda.is_available() and torch.cuda.device_count() >= nproc


def pick_device(nproc: int, local_rank: int) -> torch.device:
    """This rank's GPU when every local rank has one, else the CPU (Gloo)."""
    if uses_gpus(nproc):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build(args: argparse.Namespace, device: torch.device, *,
          init_weights: bool = True) -> tuple[GPT, torch.optim.Optimizer, Any, MarkovTokens]:
    """Model, optimizer, LR scheduler and dataset, identical on every rank.

    ``init_weights=False`` (a process whose state is about to be overwritten: a
    replacement, see :func:`mnemosyne.jit.joining`, or a restart that loads a checkpoint)
    allocates the model on ``device`` without initializing it; every tensor of this model
    is in its state_dict (the causal mask is a persistent buffer).
    """
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab=args.vocab, block=args.block, layers=args.layers, heads=args.heads, dim=args.dim)
    if init_weights and getattr(args, "init_on_device", False) and device.type == "cuda":
        with torch.device(device):  # benchmarks: seconds instead of a CPU init of 1e9 weights
            model = GPT(cfg)
    elif init_weights:
        model = GPT(cfg).to(device)
    else:
        with torch.device("meta"):
            model = GPT(cfg)
        model = model.to_empty(device=device)
        model.tie_weights()  # to_empty gives each parameter name its own tensor
    fused = bool(getattr(args, "fused_adam", False)) and device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=True if fused else None)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    data = MarkovTokens(args.samples, args.block, args.vocab, seed=1234)
    return model, opt, sched, data


def autocast(args: argparse.Namespace, device: torch.device) -> Any:
    """The forward's autocast context (``--autocast``), a no-op context by default."""
    import contextlib

    if args.autocast == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory(device: torch.device) -> int:
    """This process's peak memory in bytes: CUDA allocations on a GPU, else the peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def main(argv: list[str] | None = None) -> None:
    """Train; write the final state when ``--out`` is given."""
    args = parse_args(argv)
    rank = int(os.environ.get(MNEMOSYNE_RANK, "0"))
    out = Path(args.out) if args.out else None
    if out is not None:
        (out / "started").mkdir(parents=True, exist_ok=True)
        (out / "started" / f"rank{rank}.{os.getpid()}").touch()
    device = pick_device(int(os.environ.get(MNEMOSYNE_WORLD_SIZE, "1")),
                         int(os.environ.get(MNEMOSYNE_LOCAL_RANK, "0")))
    # A replacement receives its whole state inside mj.init: no need to initialize it.
    model, opt, sched, data = build(args, device, init_weights=not mj.joining())

    job = mj.init(model, opt, scheduler=sched, seed=args.seed, bucket_bytes=args.bucket_kb * 1024,
                  log_steps=args.log_steps)
    sampler = mj.ResumableSampler(data, job.world_size, job.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True)
    for step in job.steps(loader, max_steps=args.steps):
        with step:
            # Normally one batch, this rank's; while a --shrink job runs without a failed
            # rank, also the batches of the missing ranks this rank hosts. (--step-batch:
            # the plain loop, refused by a --shrink job.)
            batches = [step.batch] if args.step_batch else step.micro_batches()
            for batch in batches:
                x, y = (t.to(device) for t in batch)
                with autocast(args, device):
                    loss = model(x, y)
                loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if args.sync_steps and device.type == "cuda":
                torch.cuda.synchronize(device)
            if args.step_sleep:
                time.sleep(args.step_sleep)
            if args.shrunk_step_sleep and len(job.members) < job.world_size:
                time.sleep(args.shrunk_step_sleep)
    if args.memory_event:
        from mnemosyne.core.events import EventKind

        job.log.emit(EventKind.INFO, "memory", peak_bytes=peak_memory(device), device=str(device))
    if out is not None:
        save_final(out, rank, job, model.state_dict(), opt.state_dict(), sched.state_dict())
    job.close()


def save_final(out: Path, rank: int, job: Any, model: Any, optim: Any, sched: Any) -> None:
    """Write ``out/final-rank<rank>.pt`` atomically: the states given, plus pid, committed step, recoveries."""
    final = {"model": model, "optim": optim, "sched": sched, "pid": os.getpid(), "committed": job.committed,
             "recoveries": job.recoveries}
    tmp = out / f"final-rank{rank}.pt.tmp"
    torch.save(final, tmp)
    tmp.rename(out / f"final-rank{rank}.pt")


if __name__ == "__main__":
    main()
