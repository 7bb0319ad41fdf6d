"""A small multi-process harness: one store server, rank processes, kill, read results.

Used by the tests and the benchmark. Every wait is bounded and :meth:`Harness.close`
kills whatever is still running, so a failing test never leaves processes behind.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Any

from mnemosyne.ccl.store_client import StoreClient
from mnemosyne.ccl.store_server import StoreServer

__all__ = ["Harness"]


class Harness:
    """Runs ``python -m <module> '<json>'`` rank processes against a private store.

    Args:
        module: Module run by each process.
        job: Job id (a fresh one by default).
    """

    def __init__(self, module: str = "mnemosyne.ccl.testing._workers", job: str | None = None) -> None:
        self.module = module
        self.job = job or f"test-{secrets.token_hex(4)}"
        self.token = secrets.token_hex(16)
        self.server = StoreServer(jobs={self.job: self.token}).start()
        self.store = StoreClient(self.server.address, self.job, self.token, timeout=60)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, **cfg: Any) -> subprocess.Popen[bytes]:
        """Start one process; ``cfg`` (plus the store address, job and token) is its argument."""
        full = {"addr": self.server.address, "job": self.job, "token": self.token, **cfg}
        env = dict(os.environ)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("PYTHONFAULTHANDLER", "1")
        proc = subprocess.Popen([sys.executable, "-m", self.module, json.dumps(full)], env=env)
        self.procs[name] = proc
        return proc

    def get_json(self, key: str, timeout: float = 60) -> Any:
        """Wait for a JSON value the workers published; report worker crashes instead of timing out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return json.loads(self.store.get(key, min(1.0, max(0.01, deadline - time.monotonic()))))
            except TimeoutError:
                pass
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() not in (None, 0, -signal.SIGKILL)}
            if dead or time.monotonic() >= deadline:
                crashes = self._crash_reports()
                msg = f"no {key!r} after {timeout} s; exited: {dead}; crash reports: {crashes}"
                raise AssertionError(msg)

    def _crash_reports(self) -> list[str]:
        out = []
        for rank in range(16):
            for p in self.procs.values():
                key = f"test/crash/{rank}/{p.pid}"
                if self.store.check([key]):
                    out.append(self.store.get(key, 1).decode()[-2000:])
        return out

    def kill(self, name: str) -> float:
        """SIGKILL one process, reap it, return the kill time (``time.time()``)."""
        proc = self.procs[name]
        t = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        return t

    def wait_all(self, timeout: float = 60) -> dict[str, int]:
        """Wait for every process; return exit codes."""
        deadline = time.monotonic() + timeout
        codes: dict[str, int] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = -999
        return codes

    def close(self) -> None:
        """Kill leftovers, stop the server."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.store.close()
        self.server.stop()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
