"""``mnemo ckpt ls|inspect|verify``: look at just-in-time checkpoints and check them.

:func:`register` imports nothing heavy (no torch): the ``mnemo`` parser is built at every
invocation of every subcommand. The work is imported when a ``ckpt`` command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register"]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _ls(args: argparse.Namespace) -> int:
    from mnemosyne.jit.ckpt import list_checkpoints

    entries = list_checkpoints(args.dir)
    if args.json:
        print(json.dumps([{"path": str(e.path), "complete": e.complete, "step": e.step, "world_size": e.world_size,
                           "bytes": e.bytes, "note": e.note} for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no checkpoints under {args.dir}")
        return 0
    print(f"{'checkpoint':40} {'step':>8} {'world':>5} {'size':>10}  status")
    for e in entries:
        status = "complete" if e.complete else f"INCOMPLETE ({e.note})"
        step = "-" if e.step is None else str(e.step)
        world = "-" if e.world_size is None else str(e.world_size)
        print(f"{e.path.name:40} {step:>8} {world:>5} {_size(e.bytes):>10}  {status}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from mnemosyne.jit.ckpt import read_manifest

    m: dict[str, Any] = read_manifest(args.ckpt)  # a CorruptStateError exits 1 with its message
    if args.json:
        print(json.dumps({k: v for k, v in m.items() if k != "skeleton"}, indent=2))
        return 0
    total = sum(int(f["size"]) for f in m["files"].values())
    print(f"checkpoint   {args.ckpt}")
    print(f"step         {m['step']} (resume at {m['step'] + 1})")
    print(f"world size   {m['world_size']}; writers {m['writer_ranks']}")
    print(f"written by   mnemosyne-jit {m.get('mnemosyne_version')}, torch {m.get('torch_version')}")
    print(f"files        {len(m['files'])}, {_size(total)}")
    if m.get("meta"):
        print(f"meta         {json.dumps(m['meta'])}")
    print(f"{'key':48} {'dtype':10} {'shape':16} owner")
    for name, k in m["keys"].items():
        print(f"{name:48} {k['dtype']:10} {'x'.join(map(str, k['shape'])) or 'scalar':16} {k['owner']}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from mnemosyne.core.errors import CorruptStateError
    from mnemosyne.jit.ckpt import verify

    try:
        r = verify(args.ckpt)
    except CorruptStateError as exc:
        print(f"mnemo ckpt verify: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {r.path}: step {r.step}, world size {r.world_size}, {r.keys} tensors in {r.files} files "
          f"({_size(r.bytes)}), sizes and sha256 match")
    return 0


def register(sub: Any) -> None:
    """Add ``mnemo ckpt`` to the ``mnemo`` parser (entry point of mnemosyne.cli.commands)."""
    p = sub.add_parser("ckpt", help="list, inspect and verify just-in-time checkpoints")
    cmds = p.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    ls = cmds.add_parser("ls", help="checkpoints under DIR: step, world size, size, complete or not")
    ls.add_argument("dir", metavar="DIR")
    ls.add_argument("--json", action="store_true", help="print as JSON")
    ls.set_defaults(func=_ls)
    ins = cmds.add_parser("inspect", help="manifest summary and per-key dtype, shape and writer")
    ins.add_argument("ckpt", metavar="CKPT")
    ins.add_argument("--json", action="store_true", help="print the manifest (without skeleton) as JSON")
    ins.set_defaults(func=_inspect)
    ver = cmds.add_parser("verify", help="check every file's size and sha256 and the DCP metadata; exit 1 if bad")
    ver.add_argument("ckpt", metavar="CKPT")
    ver.set_defaults(func=_verify)
