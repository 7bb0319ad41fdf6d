"""The device proxies an agent keeps for ``mnemo launch --proxy``: one per local rank slot.

Each proxy (``python -m mnemosyne.proxy``) owns the training state of the trainer in its
slot and outlives that trainer, so that a replacement in the same slot re-attaches to
it. Proxies live under one 0700 folder of the job's runtime directory, get the job token
through ``MNEMOSYNE_TOKEN`` (never on a command line), and die with the agent
(PR_SET_PDEATHSIG). A proxy that dies is reported and started again at once: the state
it held is lost, its trainer dies at its next marker and is replaced like any failed rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnemosyne.core.env import MNEMOSYNE_LOG_LEVEL
from mnemosyne.core.errors import MnemosyneError
from mnemosyne.core.events import EventKind

__all__ = ["ProxyPool", "visible_gpus"]

logger = logging.getLogger(__name__)


def visible_gpus() -> int:
    """GPUs this process could use, without importing torch (CUDA_VISIBLE_DEVICES, else /dev/nvidiaN)."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        ids = [v for v in vis.split(",") if v.strip()]
        return 0 if not ids or ids[0].strip() == "-1" else len(ids)
    return len([p for p in Path("/dev").glob("nvidia[0-9]*") if p.name.removeprefix("nvidia").isdigit()])


@dataclass
class _Proxy:
    local_rank: int
    state_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def socket(self) -> str:
        return str(self.state_dir / "proxy.sock")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ProxyPool:
    """One device proxy per local rank slot of a node (see module doc).

    Args:
        nproc: Local rank slots started up front.
        job_id: The job (proxies accept only its token).
        size: Arena size of each proxy (e.g. ``"1G"``).
        child_env: Environment of a child process of the agent (holds the token).
        emit: The agent's event writer.
        preexec: Run in each child before exec (the agent's die-with-parent hook).
        base: Folder for the proxies' 0700 state folder.
    """

    def __init__(self, nproc: int, job_id: str, size: str, child_env: Callable[[], dict[str, str]],
                 emit: Callable[..., Any], preexec: Callable[[], None], base: Path | None = None) -> None:
        self.nproc = nproc
        self.job_id = job_id
        self.size = size
        self._env = child_env
        self._emit = emit
        self._preexec = preexec
        self._base = base
        self.proxies: dict[int, _Proxy] = {}
        self.root: Path | None = None

    def device(self, local_rank: int) -> int:
        """Device of a slot's proxy: its GPU when every local rank has one (as the trainers decide), else -1."""
        gpus = visible_gpus()
        return local_rank if gpus >= self.nproc and local_rank < gpus else -1

    def start(self) -> None:
        """Start one proxy per local rank slot and wait until each listens."""
        from mnemosyne.jit._agent_config import job_info_dir

        # Short names: the socket path must stay under ~104 bytes.
        base = self._base or job_info_dir()
        self.root = Path(tempfile.mkdtemp(prefix=f"px-{self.job_id[:24]}-", dir=base))  # mode 0700
        for lr in range(self.nproc):
            px = self.proxies[lr] = _Proxy(lr, self.root / f"lr{lr}")
            self._spawn(px)
        self._wait(list(self.proxies.values()))

    def socket_for(self, local_rank: int) -> str:
        """The socket of ``local_rank``'s proxy, (re)started first if it is missing or dead."""
        px = self.proxies.get(local_rank)
        if px is None:
            assert self.root is not None
            px = self.proxies[local_rank] = _Proxy(local_rank, self.root / f"lr{local_rank}")
        if not px.alive:
            self._spawn(px)
            self._wait([px])
        return px.socket

    def check(self) -> None:
        """Report a dead proxy and start it again; its trainer dies at its next marker and is replaced."""
        for px in self.proxies.values():
            if px.proc is None or px.proc.poll() is None:
                continue
            rc = px.proc.returncode
            self._emit(EventKind.INFO, "proxy_exit", local_rank=px.local_rank, pid=px.proc.pid, returncode=rc)
            logger.warning("the device proxy of local rank %d exited with %s; starting it again (the state it held "
                           "is lost: its trainer is replaced and receives the state from donors)", px.local_rank, rc)
            px.proc = None
            self._spawn(px)
            self._wait([px])

    def stop(self) -> None:
        """Stop every proxy (SIGTERM, then SIGKILL after 5 s) and remove their folder."""
        for px in self.proxies.values():
            if px.alive:
                assert px.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    px.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for px in self.proxies.values():
            if px.proc is None:
                continue
            try:
                px.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                px.proc.kill()
                px.proc.wait()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def _spawn(self, px: _Proxy) -> None:
        sock = Path(px.socket)
        if sock.exists():
            sock.unlink()  # a dead proxy's socket: readiness below means the new one listens
        env = self._env()
        env.setdefault(MNEMOSYNE_LOG_LEVEL, "WARNING")
        cmd = [sys.executable, "-m", "mnemosyne.proxy", "--device", str(self.device(px.local_rank)),
               "--state-dir", str(px.state_dir), "--job", self.job_id, "--size", self.size]
        # The token travels in MNEMOSYNE_TOKEN (set by the agent's child env), never on the command line.
        px.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, start_new_session=True,
                                   preexec_fn=self._preexec)
        px.starts += 1
        self._emit(EventKind.INFO, "proxy_start", local_rank=px.local_rank, pid=px.proc.pid, socket=px.socket,
                   device=self.device(px.local_rank), generation=px.starts)

    def _wait(self, pxs: list[_Proxy], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for px in pxs:
            assert px.proc is not None
            while not Path(px.socket).exists():
                if px.proc.poll() is not None:
                    msg = (f"the device proxy of local rank {px.local_rank} exited with {px.proc.returncode} while "
                           "starting (see its messages above)")
                    raise MnemosyneError(msg)
                if time.monotonic() > deadline:
                    msg = f"the device proxy of local rank {px.local_rank} did not listen within {timeout:.0f} s"
                    raise MnemosyneError(msg)
                time.sleep(0.01)
