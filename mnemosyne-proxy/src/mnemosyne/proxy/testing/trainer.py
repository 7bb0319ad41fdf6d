"""A small deterministic trainer (MLP + Adam on generated data) that keeps its state in a proxy.

For the recovery tests. Run as a process::

    python -m mnemosyne.proxy.testing.trainer --socket S --steps 8 --out final.pt [--peer ADDR]

Faults come from ``MNEMOSYNE_INJECT`` (``step=5,phase=forward,kind=kill``): phases are
``forward``, ``backward``, ``update-begin`` (right after ``begin_update``), ``update-end``
(after ``optimizer.step()`` mutated the state, before ``commit``) and ``committed`` (right
after ``commit``); kinds are ``kill``
(SIGKILL itself) and ``hang`` (write ``$MNEMOSYNE_TEST_MARK`` and wait, at most 60 s, for
``$MNEMOSYNE_TEST_MARK.go``). It prints one JSON line per notable event on stdout and writes
its final parameters and optimizer state to ``--out`` (``torch.save`` of plain tensors).

Exit codes: 0 done, 3 the arena is torn and no peer was given, 4 the proxy is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from mnemosyne.core.env import MNEMOSYNE_INJECT, MNEMOSYNE_TEST_MARK, env_str
from mnemosyne.core.state import CommitStatus
from mnemosyne.proxy.errors import ProxyUnavailableError

__all__ = ["build", "main", "parse_inject"]


def parse_inject(text: str | None) -> dict[str, str]:
    """``"step=5,phase=forward,kind=kill"`` -> dict."""
    if not text:
        return {}
    return dict(kv.split("=", 1) for kv in text.split(","))


def build(seed: int = 0) -> tuple[Any, Any]:
    """The model and optimizer, identical on every call with the same seed."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=False)
    return model, opt


def batch(step: int) -> tuple[Any, Any]:
    """The data of a step (a pure function of the step: the data position is the step)."""
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)


def _say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _fault(plan: dict[str, str], step: int, phase: str) -> None:
    if not plan or int(plan.get("step", -1)) != step or plan.get("phase") != phase:
        return
    kind = plan.get("kind", "kill")
    _say(event="fault", step=step, phase=phase, kind=kind)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        mark = Path(os.environ[MNEMOSYNE_TEST_MARK])
        mark.write_text(f"{step} {phase}\n")
        go = mark.with_name(mark.name + ".go")
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)


def _final_state(model: Any, opt: Any) -> dict[str, Any]:
    from mnemosyne.proxy.adopt import state_names

    return {k: v.detach().clone() for k, v in state_names(model, opt).items() if not k.startswith("scratch/")}


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; see the module docstring."""
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--socket", default=None, help="proxy socket; omit with --no-proxy")
    p.add_argument("--no-proxy", action="store_true", help="plain training, state in the process")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--peer", default=None, help="peer proxy to pull from when the arena is torn")
    args = p.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    plan = parse_inject(env_str(MNEMOSYNE_INJECT))
    model, opt = build()
    holder = None
    start = 1
    if not args.no_proxy:
        from mnemosyne.proxy.adopt import adopt
        from mnemosyne.proxy.holder import ProxyStateHolder

        holder = ProxyStateHolder(args.socket)
        res = adopt(model, opt, holder)
        _say(event="attach", status=res.status.value, step=res.step, resumed=res.resumed,
             same_address=res.attach.same_address, reason=res.attach.reason, seconds=res.attach.seconds)
        if res.status is CommitStatus.TORN:
            if not args.peer:
                return 3
            pulled = holder.pull(args.peer)
            _say(event="pulled", step=pulled.step, nbytes=pulled.nbytes, path=pulled.path)
            res_step = pulled.step
        else:
            res_step = res.step
        start = res_step + 1
        opt.zero_grad()
    loss_fn = torch.nn.MSELoss()
    try:
        for step in range(start, args.steps + 1):
            x, y = batch(step)
            _fault(plan, step, "forward")
            loss = loss_fn(model(x), y)
            _fault(plan, step, "backward")
            loss.backward()
            if holder is not None:
                holder.begin_update(step)
            _fault(plan, step, "update-begin")
            opt.step()
            _fault(plan, step, "update-end")
            if holder is not None:
                holder.commit(step)
            _fault(plan, step, "committed")
            opt.zero_grad()
    except ProxyUnavailableError as exc:
        _say(event="proxy-gone", error=str(exc))
        print(f"trainer: {exc}", file=sys.stderr, flush=True)
        return 4
    torch.save(_final_state(model, opt), args.out)
    _say(event="done", start=start, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
