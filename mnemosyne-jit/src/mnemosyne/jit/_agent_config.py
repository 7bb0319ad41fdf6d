"""What ``mnemo launch`` was asked to run (:class:`AgentConfig`), checked, and the files it shares.

Kept apart from :mod:`mnemosyne.jit.agent` so that the CLI, the demo and the tests can
build and check a configuration without the supervisor.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mnemosyne.core.env import (
    MNEMOSYNE_HANG_TIMEOUT,
    MNEMOSYNE_INJECT,
    MNEMOSYNE_JOB_ID,
    MNEMOSYNE_TOKEN,
    env_float,
    env_str,
)
from mnemosyne.core.errors import ConfigError
from mnemosyne.core.files import private_dir
from mnemosyne.jit._store import parse_addr

__all__ = ["AgentConfig", "check_config", "check_job_id", "job_info_dir", "read_token_file"]


def job_info_dir() -> Path:
    """Folder where running jobs publish their store address for ``mnemo inject`` (mode 0700).

    The folder holds job tokens. Under a shared ``/tmp`` another user may have created it
    first: one that is not this user's own, mode 0700, is refused (see
    :func:`mnemosyne.core.files.private_dir`).

    Raises:
        ConfigError: The folder exists but belongs to another user or is open to others.
    """
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return private_dir(Path(base) / f"mnemosyne-{os.getuid()}", "job info folder")


def read_token_file(path: str) -> str:
    """Read a job token file, refusing one that other users can read.

    Raises:
        ConfigError: Missing, empty, or readable by group/others (chmod 600 it).
    """
    try:
        st = os.stat(path)
        text = Path(path).read_text().strip()
    except OSError as exc:
        msg = f"--token-file {path}: cannot read it ({exc})"
        raise ConfigError(msg) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode = stat.S_IMODE(st.st_mode)
        msg = f"--token-file {path}: mode {mode:o} lets other users read the job's token; chmod 600 it"
        raise ConfigError(msg)
    if not text:
        msg = f"--token-file {path}: the file is empty (expected the job's shared token)"
        raise ConfigError(msg)
    return text


@dataclass
class AgentConfig:
    """What ``mnemo launch`` was asked to run.

    Attributes:
        command: ``["script.py", args...]`` or ``["-m", "module", args...]``.
        nproc: Ranks on this node (every node runs as many).
        spares: Pre-warmed spare processes to keep on this node.
        hang_timeout: Fixed hang timeout in seconds (None: learned, see module doc).
        hang_floor: Smallest learned progress timeout, seconds.
        liveness_timeout: Seconds without any heartbeat before a process counts as frozen.
        stopped_timeout: Seconds a trainer may stay stopped (``T`` in ``/proc/<pid>/stat``:
            SIGSTOP, a debugger) before it counts as frozen; the agent reads its own node's
            process table, so CPU load cannot fake it (``--stopped-timeout``).
        startup_timeout: Seconds a trainer may take to send its first heartbeat (and an
            agent to connect, for the coordinator).
        max_restarts: Replacements allowed before the job is given up.
        event_log: JSON-lines log path (None: ``./mnemo-events/<job>.jsonl``).
        job_id: Job id (None: ``MNEMOSYNE_JOB_ID``, else generated on a single node).
        host: Interface the store listens on (None: the ``master`` host, or loopback).
        env: Extra environment for every child.
        poll: Supervision period, seconds.
        no_replace: Never replace a failed rank: the healthy ranks write a just-in-time
            checkpoint into ``ckpt_dir`` and the job exits with :data:`EXIT_JOB_CKPT`.
        ckpt_dir: Root of just-in-time checkpoints; when set, running out of
            ``max_restarts`` (or of spare capacity) also checkpoints instead of giving up.
        resume: A verified checkpoint directory every rank loads before its first step.
        shrink: When a rank fails and no warm spare is ready, continue without it (the
            survivors run its batches by gradient accumulation, so the global batch
            stays) while a replacement warms up, then grow back to the full size.
        nnodes: Nodes in the job (one agent each).
        node_rank: This node (0 hosts the store and coordinates).
        master: ``host:port`` of the store on node 0 (required with ``nnodes > 1``).
        token: The job's shared token (None: ``MNEMOSYNE_TOKEN``, else generated on a
            single node).
        node_timeout: Seconds of silence after which an agent's node counts as lost.
        proxy: Start one device proxy (mnemosyne-proxy) per local rank slot before the
            trainers; each trainer keeps its model and optimizer state in its slot's proxy
            (``MNEMOSYNE_PROXY_SOCKET``), so a replacement re-attaches to it.
        proxy_size: Arena size of each proxy (e.g. ``"1G"``).
        snapshot_every: Snapshot every trainer's state into its in-memory holder every
            this many committed steps (0: off; see :mod:`mnemosyne.jit._snapdir`).
    """

    command: list[str]
    nproc: int
    spares: int = 0
    hang_timeout: float | None = None
    hang_floor: float = 5.0
    liveness_timeout: float = 5.0
    stopped_timeout: float = 0.5
    startup_timeout: float = 300.0
    max_restarts: int = 10
    event_log: str | None = None
    job_id: str | None = None
    host: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    poll: float = 0.01
    no_replace: bool = False
    ckpt_dir: str | None = None
    resume: str | None = None
    shrink: bool = False
    nnodes: int = 1
    node_rank: int = 0
    master: str | None = None
    token: str | None = None
    node_timeout: float = 5.0
    proxy: bool = False
    proxy_size: str = "1G"
    snapshot_every: int = 0


def check_config(config: AgentConfig) -> None:
    """Refuse a bad configuration, naming every problem at once.

    Raises:
        ConfigError: What is wrong and what is expected.
    """
    problems = []
    if config.nproc < 1:
        problems.append(f"--nproc-per-node must be >= 1, got {config.nproc}")
    if config.spares < 0:
        problems.append(f"--spares must be >= 0, got {config.spares}")
    if config.snapshot_every < 0:
        problems.append(f"--snapshot-every must be >= 0 steps (0: off), got {config.snapshot_every}")
    if config.nnodes < 1:
        problems.append(f"--nnodes must be >= 1, got {config.nnodes}")
    elif not 0 <= config.node_rank < config.nnodes:
        problems.append(f"--node-rank must be in [0, {config.nnodes}), got {config.node_rank}")
    if not config.command:
        problems.append("no training script given: mnemo launch [options] script.py [args...]")
    problems += _check_values(config)
    if config.master is not None:
        try:
            parse_addr(config.master)
        except ConfigError as exc:
            problems.append(f"--master: {exc}")
    if config.nnodes > 1:
        if config.master is None:
            problems.append("--nnodes > 1 needs --master HOST:PORT (where node 0's agent hosts the store)")
        if not (config.job_id or env_str(MNEMOSYNE_JOB_ID)):
            problems.append("--nnodes > 1 needs the same --job-id (or MNEMOSYNE_JOB_ID) on every node")
        if not (config.token or env_str(MNEMOSYNE_TOKEN)):
            problems.append("--nnodes > 1 needs the job's shared token on every node: --token-file FILE "
                            "(mode 600) or MNEMOSYNE_TOKEN")
    if problems:
        raise ConfigError("; ".join(problems))


# A job id names files (``<job>.json``, ``mnemo-events/<job>.jsonl``), store namespaces and
# socket folders: no separators, no leading dot, nothing a shell or a path would reinterpret.
_JOB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_job_id(job_id: str, where: str = "--job-id") -> None:
    """Refuse a job id that is not a plain file name (``../..``, ``a/b``, empty, too long).

    Raises:
        ConfigError: Naming the id and the characters allowed.
    """
    if not _JOB_ID.fullmatch(job_id):
        msg = (f"{where} {job_id!r}: expected 1-128 characters of letters, digits, '_', '.' and '-', "
               "not starting with '.' or '-' (the id names files and store keys)")
        raise ConfigError(msg)


def _check_values(config: AgentConfig) -> list[str]:
    """Ranges of the numeric options, the job id, the fault plans and ``MNEMOSYNE_HANG_TIMEOUT``."""
    problems = []
    if config.hang_timeout is not None and not config.hang_timeout > 0:
        problems.append(f"--hang-timeout must be > 0 seconds, got {config.hang_timeout:g} "
                        "(every rank would count as hung at once)")
    try:
        env_hang = env_float(MNEMOSYNE_HANG_TIMEOUT)
    except ConfigError as exc:
        problems.append(str(exc))
        env_hang = None
    if config.hang_timeout is None and env_hang is not None and not env_hang > 0:
        problems.append(f"environment variable {MNEMOSYNE_HANG_TIMEOUT}={env_hang:g}: must be > 0 seconds")
    if config.max_restarts < 0:
        problems.append(f"--max-restarts must be >= 0, got {config.max_restarts}")
    if not config.node_timeout > 0:
        problems.append(f"--node-timeout must be > 0 seconds, got {config.node_timeout:g}")
    if not config.stopped_timeout > 0:
        problems.append(f"--stopped-timeout must be > 0 seconds, got {config.stopped_timeout:g}")
    for name in ("hang_floor", "liveness_timeout", "startup_timeout", "poll"):
        value = getattr(config, name)
        if not value > 0:
            problems.append(f"{name} must be > 0 seconds, got {value:g}")
    for job_id, where in ((config.job_id, "--job-id"), (env_str(MNEMOSYNE_JOB_ID), MNEMOSYNE_JOB_ID)):
        if job_id is not None:
            try:
                check_job_id(job_id, where)
            except ConfigError as exc:
                problems.append(str(exc))
            break
    plans = config.env.get(MNEMOSYNE_INJECT)
    if plans:
        from mnemosyne.jit.inject import parse_plans

        world = config.nproc * config.nnodes
        try:
            for plan in parse_plans(plans):
                if plan.rank >= world > 0:
                    problems.append(f"--inject {plan.to_text()!r}: rank {plan.rank} is not in this job "
                                    f"(ranks 0..{world - 1})")
        except ConfigError as exc:
            problems.append(f"--inject: {exc}")
    return problems
