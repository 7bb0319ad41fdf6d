"""How an agent joins its job (no torch): the store and the job info file.

Node 0 hosts the store, the other nodes join it. The job info file lets ``mnemo inject``
(run by the same user) find the store and authenticate to it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mnemosyne.core.errors import MnemosyneError
from mnemosyne.core.files import write_private
from mnemosyne.core.store import Store
from mnemosyne.jit import _keys
from mnemosyne.jit._agent_config import AgentConfig, job_info_dir
from mnemosyne.jit._store import JobStoreHost, connect_job_store, host_job_store, parse_addr

__all__ = ["JobStore", "open_store", "write_info"]

logger = logging.getLogger(__name__)


@dataclass
class JobStore:
    """The job's store as one agent holds it."""

    store: Store
    kind: str  # "ccl" or "torch"
    addr: str
    server: JobStoreHost | None = None  # node 0 hosts it


def open_store(cfg: AgentConfig, node: int, job_id: str, token: str, stopping: Callable[[], bool]) -> JobStore:
    """Host the job's store (node 0) or join it, retrying until ``startup_timeout`` or ``stopping()``.

    Raises:
        MnemosyneError: The store could not be joined in time.
    """
    if node == 0:
        host, port = parse_addr(cfg.master) if cfg.master else ("127.0.0.1", 0)
        server = host_job_store(job_id, token, cfg.host or host, port)
        addr = server.addr if not cfg.master else f"{host}:{server.addr.rpartition(':')[2]}"
        logger.info("job %s: store %s at %s", job_id,
                    "mnemosyne-ccl (authenticated)" if server.kind == "ccl" else "torch TCPStore (fallback)", addr)
        return JobStore(server.store, server.kind, addr, server)
    from mnemosyne.jit._select import use_ccl

    assert cfg.master is not None
    kind = "ccl" if use_ccl() else "torch"
    deadline = time.monotonic() + cfg.startup_timeout
    while True:
        try:
            store = connect_job_store(cfg.master, job_id, token, timeout=10.0, kind=kind)
            store.wait([_keys.membership(0)], 10.0)
            return JobStore(store, kind, cfg.master)
        except MnemosyneError as exc:
            if time.monotonic() > deadline:
                msg = (f"node {node}: could not join job {job_id!r} at {cfg.master} within "
                       f"{cfg.startup_timeout:.0f} s: {exc}")
                raise MnemosyneError(msg) from None
            if stopping():
                raise
            time.sleep(0.5)


def write_info(cfg: AgentConfig, job_id: str, token: str, js: JobStore, event_log: str) -> Path:
    """Write the job info file; return its path (removed by the agent as it leaves)."""
    path = job_info_dir() / f"{job_id}.json"
    # The token travels in this file (mode 0600, in a 0700 folder of this user) so that
    # `mnemo inject` run by the same user can authenticate to the store.
    body = {"job": job_id, "store": js.addr, "store_kind": js.kind,
            "token": token, "pid": os.getpid(), "nproc": cfg.nproc, "nnodes": cfg.nnodes,
            "event_log": event_log, "started": time.time()}
    # A fresh O_EXCL|O_NOFOLLOW file renamed into place: never a file planted there.
    write_private(path, json.dumps(body).encode())
    return path
