"""``mnemo proxy`` (and ``python -m mnemosyne.proxy``): run one device proxy in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from mnemosyne.core.env import MNEMOSYNE_JOB_ID, MNEMOSYNE_LOG_LEVEL, MNEMOSYNE_TOKEN, env_str
from mnemosyne.core.errors import ConfigError, MnemosyneError

__all__ = ["add_arguments", "main", "parse_size", "register", "run"]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``"512M"``, ``"20G"``, ``"4096"`` into bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        msg = f"size {text!r}: expected a number with an optional K/M/G/T suffix"
        raise ConfigError(msg) from None
    if value <= 0:
        msg = f"size {text!r} must be positive"
        raise ConfigError(msg)
    return int(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The proxy's options."""
    p.add_argument("--device", type=int, default=-1, help="device index (default -1: host arena)")
    p.add_argument("--arena", default=None, help="arena backend: host or cuda (default: cuda when --device >= 0)")
    p.add_argument("--size", default="1G", help="arena size, e.g. 512M, 20G (default 1G)")
    p.add_argument("--host-size", default="16M", help="host side space of a cuda arena (default 16M)")
    p.add_argument("--state-dir", required=True, help="folder for the socket (proxy.sock), log and token")
    p.add_argument("--job", default=None, help=f"job id (default ${MNEMOSYNE_JOB_ID})")
    p.add_argument("--peer-listen", default=None, metavar="HOST:PORT",
                   help="also serve read-only peer pulls over TCP (port 0 picks one; see STATE_DIR/peer.addr)")


def run(args: argparse.Namespace) -> int:
    """Start and serve until SIGTERM."""
    from mnemosyne.proxy.server import ProxyServer

    arena = args.arena or ("cuda" if args.device >= 0 else "host")
    server = ProxyServer(args.state_dir, arena=arena, capacity=parse_size(args.size), device=args.device,
                         job=args.job if args.job is not None else env_str(MNEMOSYNE_JOB_ID, "") or "",
                         token=env_str(MNEMOSYNE_TOKEN), peer_listen=args.peer_listen,
                         host_capacity=parse_size(args.host_size))
    server.start()
    print(f"proxy ready: {server.socket_path} pid {os.getpid()}", flush=True)
    server.serve_forever()
    return 0


def register(sub: Any) -> None:
    """Add ``mnemo proxy`` (entry point of mnemosyne.cli.commands)."""
    p = sub.add_parser("proxy", help="run a device proxy that keeps training state alive across trainer crashes")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mnemosyne.proxy`` / ``mnemo-proxy``."""
    p = argparse.ArgumentParser(prog="mnemo-proxy", description="Run one Mnemosyne device proxy.")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=(env_str(MNEMOSYNE_LOG_LEVEL) or "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except MnemosyneError as exc:
        print(f"mnemo proxy: error: {exc}", file=sys.stderr)
        return 1
