"""``mnemo store`` / ``python -m mnemosyne.ccl.store_server``: options, token, foreground loop.

The token comes from ``--token-file`` (read as ``mnemo launch`` reads one: a regular,
owner-only, non-empty file; created 0600 if missing), else ``MNEMOSYNE_TOKEN``, else a
fresh one printed once.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import stat
import sys
import threading

from mnemosyne.ccl.store_server import DEFAULT_PORT, StoreServer
from mnemosyne.core.env import MNEMOSYNE_JOB_ID, MNEMOSYNE_TOKEN
from mnemosyne.core.errors import ConfigError, MnemosyneError

__all__ = ["add_arguments", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    """Run a store server in the foreground until SIGINT/SIGTERM (``python -m``)."""
    what = "The persistent bootstrap store: a server that runs outside every trainer."
    parser = argparse.ArgumentParser(prog="mnemosyne.ccl.store_server", description=what)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except MnemosyneError as exc:  # a usage error: one line, no traceback (as `mnemo store`)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the server's options to ``parser`` (shared by ``mnemo store``)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)")
    parser.add_argument("--job", default=os.environ.get(MNEMOSYNE_JOB_ID), help="job id (or MNEMOSYNE_JOB_ID)")
    parser.add_argument("--token-file", help="file holding the job token; created (mode 0600) if missing; "
                        "default: MNEMOSYNE_TOKEN, else a fresh token printed once")


def _read_token_file(path: str) -> str:
    """Read a token file the way ``mnemo launch --token-file`` does: a regular, owner-only file.

    Raises:
        ConfigError: Not a regular file, readable by group/others, unreadable or empty.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        msg = f"--token-file {path}: cannot read it ({exc.strerror or exc})"
        raise ConfigError(msg) from None
    if not stat.S_ISREG(st.st_mode):
        msg = f"--token-file {path}: not a regular file (expected a file holding the job's token)"
        raise ConfigError(msg)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        msg = (f"--token-file {path}: mode {stat.S_IMODE(st.st_mode):o} lets other users read the job's token; "
               "chmod 600 it")
        raise ConfigError(msg)
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"--token-file {path}: cannot read it ({exc})"
        raise ConfigError(msg) from None
    if not token:
        msg = f"--token-file {path}: the file is empty (expected the job's shared token)"
        raise ConfigError(msg)
    return token


def _read_or_make_token(path: str | None) -> tuple[str, bool]:
    if path:
        if os.path.lexists(path):
            return _read_token_file(path), False
        token = secrets.token_hex(16)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        return token, False
    env = os.environ.get(MNEMOSYNE_TOKEN)
    if env:
        return env, False
    return secrets.token_hex(16), True


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; print ``listening <host:port>`` once bound (for launchers)."""
    if not args.job:
        msg = "--job (or MNEMOSYNE_JOB_ID) is required"
        raise ConfigError(msg)
    token, fresh = _read_or_make_token(args.token_file)
    server = StoreServer(args.host, args.port, {args.job: token}).start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"listening {server.address} job {args.job}", flush=True)
    if fresh:
        print(f"token {token}", flush=True)
    try:
        while not done.wait(1.0):
            pass
    finally:
        server.stop()
    print("store stopped", file=sys.stderr, flush=True)
    return 0
