"""Processes the snapshot tests and benchmark start (``python -m mnemosyne.jit._snapchild MODE ...``).

Modes:

- ``train BASE STEPS EVERY``: a deterministic model and Adam optimizer (:func:`build`) trained
  ``STEPS`` steps, snapshotting every ``EVERY`` steps into holder ``BASE``; prints one JSON
  line per committed snapshot.
- ``tear BASE``: commits a generation at step 1, then starts generation 2, writes half its
  bytes, prints ``MID`` and waits to be killed (a writer dying mid-snapshot).
- ``serve ROOT TOKEN``: a node agent's :class:`~mnemosyne.jit._replicate.ReplicaServer`;
  prints its endpoint and serves until stdin closes.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

__all__ = ["build", "main", "train"]


def build(seed: int = 0, width: int = 64) -> tuple[Any, Any]:
    """The deterministic model and optimizer every test process builds identically."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 4))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train(model: Any, opt: Any, step: int, width: int = 64) -> None:
    """One deterministic training step (its batch depends on ``step`` only)."""
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, width, generator=g)
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def state_of(model: Any, opt: Any) -> dict[str, Any]:
    """What a rank snapshots."""
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def _train(base: str, steps: int, every: int) -> None:
    from mnemosyne.jit._snapshot import Snapshotter

    model, opt = build()
    snap = Snapshotter(base)
    for step in range(1, steps + 1):
        snap.fence()  # the copy of the previous snapshot must end before the update writes the tensors
        train(model, opt, step)
        if step % every == 0:
            snap.capture(state_of(model, opt), step)
            snap.wait()
            print(json.dumps({"step": step, "copy_s": snap.last_copy_s}), flush=True)
    snap.close()


def _tear(base: str) -> None:
    from mnemosyne.jit import _snapstore

    _snapstore.write_generation(base, 1, b'{"n":1}', bytes(range(256)) * 4096)
    w = _snapstore.SlotWriter(base, 2, b'{"n":2}', 256 * 4096)
    w.data[: 128 * 4096] = b"\xff" * (128 * 4096)
    print("MID", flush=True)
    time.sleep(60)


def _serve(root: str, token: str) -> None:
    from mnemosyne.jit._replicate import ReplicaServer

    srv = ReplicaServer(root, token)
    srv.start()
    print(srv.endpoint, flush=True)
    sys.stdin.read()
    srv.close()


def main(argv: list[str]) -> None:
    """Entry point (see module doc)."""
    mode, args = argv[0], argv[1:]
    if mode == "train":
        _train(args[0], int(args[1]), int(args[2]))
    elif mode == "tear":
        _tear(args[0])
    elif mode == "serve":
        _serve(args[0], args[1])
    else:
        msg = f"unknown mode {mode!r}; expected train, tear or serve"
        raise SystemExit(msg)


if __name__ == "__main__":
    main(sys.argv[1:])
