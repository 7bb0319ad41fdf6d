"""Start and stop real proxy processes (for tests, benchmarks and the launcher's examples)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mnemosyne.core.env import MNEMOSYNE_TOKEN
from mnemosyne.proxy.errors import ProxyUnavailableError

__all__ = ["ProxyProcess"]


class ProxyProcess:
    """A ``python -m mnemosyne.proxy`` child process.

    Args:
        state_dir: The proxy's state dir.
        size: Arena size (e.g. ``"64M"``).
        job: Job id.
        token: Job token (passed through ``MNEMOSYNE_TOKEN``).
        arena: Backend name.
        device: Device index.
        peer_listen: ``HOST:PORT`` for network peers, or None.
        ready_timeout: Seconds to wait for the socket to appear.
    """

    def __init__(self, state_dir: str | os.PathLike[str], size: str = "64M", job: str = "job", token: str = "tok",
                 arena: str = "host", device: int = -1, peer_listen: str | None = None,
                 ready_timeout: float = 30.0, extra_env: dict[str, str] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.socket = str(self.state_dir / "proxy.sock")
        self.token = token
        self.job = job
        cmd = [sys.executable, "-m", "mnemosyne.proxy", "--state-dir", str(self.state_dir), "--size", size,
               "--job", job, "--arena", arena, "--device", str(device)]
        if peer_listen:
            cmd += ["--peer-listen", peer_listen]
            addr_file = self.state_dir / "peer.addr"
            if addr_file.exists():
                addr_file.unlink()
        env = {**os.environ, MNEMOSYNE_TOKEN: token, **(extra_env or {})}
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}.proxy.out"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(ready_timeout, peer_listen is not None)

    def _wait_ready(self, timeout: float, want_peer: bool) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"proxy exited with {self.proc.returncode} while starting: {self.output()[-2000:]}"
                raise ProxyUnavailableError(msg)
            if Path(self.socket).exists() and (not want_peer or (self.state_dir / "peer.addr").exists()):
                return
            time.sleep(0.02)
        self.kill()
        msg = f"proxy did not start within {timeout} s: {self.output()[-2000:]}"
        raise ProxyUnavailableError(msg)

    @property
    def peer_address(self) -> str:
        """``tcp:HOST:PORT`` of the peer port."""
        return (self.state_dir / "peer.addr").read_text().strip()

    @property
    def unix_address(self) -> str:
        """``unix:PATH`` of the socket."""
        return f"unix:{self.socket}"

    def output(self) -> str:
        """What the proxy printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL (the arena dies with it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=timeout)
        self._log.close()
        return rc

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
