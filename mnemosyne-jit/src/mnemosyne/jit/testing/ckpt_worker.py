"""A plain process that writes a just-in-time checkpoint (test and demo helper).

Run as ``python -m mnemosyne.jit.testing.ckpt_worker --addr A --job J --token T --rank R
--world W --dir D``: it rebuilds the deterministic :func:`demo_state` (every rank the same,
as data-parallel replicas are) and calls :func:`mnemosyne.jit.ckpt.write` through a
mnemosyne-ccl store client. ``--stall PHASE`` makes it touch ``--signal FILE`` and sleep
when :func:`~mnemosyne.jit.ckpt.write` reports that phase, so a test can SIGKILL it there;
``--fail PHASE`` makes it raise ``OSError(ENOSPC)`` there instead (a full disk).
"""

from __future__ import annotations

import argparse
import errno
import time
from pathlib import Path
from typing import Any

import torch

from mnemosyne.jit import ckpt

__all__ = ["demo_state", "main"]


def demo_state(seed: int = 0, steps: int = 3) -> dict[str, Any]:
    """Model, optimizer and scheduler state after ``steps`` deterministic training steps."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                torch.nn.Tanh(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(steps):
        model(torch.randn(4, 16, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
            "extra": {"data": {"epoch": 0, "consumed": steps * 4}}}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 once the checkpoint is committed."""
    from mnemosyne.ccl.store_client import StoreClient

    p = argparse.ArgumentParser(prog="ckpt_worker")
    p.add_argument("--addr", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--step", type=int, default=3)
    p.add_argument("--stall", default="")
    p.add_argument("--signal", default="")
    p.add_argument("--fail", default="")
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    store = StoreClient(args.addr, args.job, args.token, timeout=args.timeout)

    def progress(phase: str) -> None:
        if phase == args.stall:
            Path(args.signal).touch()
            time.sleep(3600)  # the test kills us here
        if phase == args.fail:
            raise OSError(errno.ENOSPC, f"No space left on device (injected at {phase})")

    state = demo_state(steps=args.step)
    ckpt.write(Path(args.dir) / ckpt.checkpoint_name(args.step), state, step=args.step, rank=args.rank,
               world_size=args.world, store=store.prefixed("ckpt"), meta={"seed": 0}, timeout=args.timeout,
               progress=progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
