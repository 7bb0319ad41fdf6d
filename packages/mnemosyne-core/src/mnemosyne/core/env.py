"""Names of every ``MNEMOSYNE_*`` environment variable, defined once.

The launcher sets most of them for the processes it spawns; users set the rest.
Readers use :func:`env_int`, :func:`env_float` and :func:`env_str` so that a bad value
fails with an error naming the variable and what was expected.
"""

from __future__ import annotations

import os

from mnemosyne.core.errors import ConfigError

__all__ = [
    "MNEMOSYNE_DOCTOR_PROBE_NCCL",
    "MNEMOSYNE_EPOCH",
    "MNEMOSYNE_EVENT_LOG",
    "MNEMOSYNE_HANG_TIMEOUT",
    "MNEMOSYNE_INJECT",
    "MNEMOSYNE_JIT_BACKEND",
    "MNEMOSYNE_JOB_ID",
    "MNEMOSYNE_LOCAL_RANK",
    "MNEMOSYNE_LOG_LEVEL",
    "MNEMOSYNE_NCCL_CACHE",
    "MNEMOSYNE_NCCL_NATIVE",
    "MNEMOSYNE_PROXY_SOCKET",
    "MNEMOSYNE_RANK",
    "MNEMOSYNE_RESUME",
    "MNEMOSYNE_SHRINK",
    "MNEMOSYNE_SNAPSHOT_DIR",
    "MNEMOSYNE_SNAPSHOT_EVERY",
    "MNEMOSYNE_SPARE",
    "MNEMOSYNE_STORE_ADDR",
    "MNEMOSYNE_TEST_MARK",
    "MNEMOSYNE_TOKEN",
    "MNEMOSYNE_WORLD_SIZE",
    "env_float",
    "env_int",
    "env_str",
]

# Identifies one job; every store key and socket name is namespaced by it so that two
# jobs on one host never read each other's keys.
MNEMOSYNE_JOB_ID = "MNEMOSYNE_JOB_ID"
# Per-job secret shared by the launcher with its own processes only; control channels
# (store requests, proxy sockets) reject a peer that does not present it.
MNEMOSYNE_TOKEN = "MNEMOSYNE_TOKEN"
# host:port of the persistent store that outlives every trainer (hosted by the launcher).
MNEMOSYNE_STORE_ADDR = "MNEMOSYNE_STORE_ADDR"
# Logical rank and world size of a trainer; a replacement takes the failed rank's value.
MNEMOSYNE_RANK = "MNEMOSYNE_RANK"
MNEMOSYNE_WORLD_SIZE = "MNEMOSYNE_WORLD_SIZE"
# Rank on this node, used to pick the device and the device proxy.
MNEMOSYNE_LOCAL_RANK = "MNEMOSYNE_LOCAL_RANK"
# Membership epoch a process was started in: a replacement starts at e+1 and must not
# read keys of earlier epochs.
MNEMOSYNE_EPOCH = "MNEMOSYNE_EPOCH"
# Path of the JSON-lines event log every process appends to.
MNEMOSYNE_EVENT_LOG = "MNEMOSYNE_EVENT_LOG"
# Fault injection plan for tests, e.g. "rank=2,step=5,kind=kill,phase=backward".
MNEMOSYNE_INJECT = "MNEMOSYNE_INJECT"
# Unix socket of this device's proxy; unset means no proxy (state lives in the trainer).
MNEMOSYNE_PROXY_SOCKET = "MNEMOSYNE_PROXY_SOCKET"
# User override for the hang-detection timeout in seconds (otherwise learned from steps).
MNEMOSYNE_HANG_TIMEOUT = "MNEMOSYNE_HANG_TIMEOUT"
# Set to "1" in a pre-warmed spare process: it waits for an assignment before training.
MNEMOSYNE_SPARE = "MNEMOSYNE_SPARE"
# Log level for the CLI and spawned processes (DEBUG, INFO, ...).
MNEMOSYNE_LOG_LEVEL = "MNEMOSYNE_LOG_LEVEL"
# Set to "1" in every trainer of a job launched with ``mnemo launch --shrink``: the runtime
# then requires ``step.micro_batches()`` (a survivor may run a missing replica's batch too).
MNEMOSYNE_SHRINK = "MNEMOSYNE_SHRINK"
# Checkpoint directory every rank loads before its first step (``mnemo launch --resume``).
MNEMOSYNE_RESUME = "MNEMOSYNE_RESUME"
# Folder (mode 0700, normally under /dev/shm) of this node's in-memory snapshot holders; rank
# r's holder is ``<folder>/r<r>``. The agent names it per job and node and removes it when the
# job ends, so that a replacement of rank r finds the snapshot its dead predecessor left.
MNEMOSYNE_SNAPSHOT_DIR = "MNEMOSYNE_SNAPSHOT_DIR"
# ``mnemo launch --snapshot-every N``: snapshot each rank's state every N committed steps
# (0 or unset: off); ``mnemosyne.jit.init(snapshot_every=...)`` overrides it.
MNEMOSYNE_SNAPSHOT_EVERY = "MNEMOSYNE_SNAPSHOT_EVERY"
# ``torch`` forces mnemosyne-jit's plain torch.distributed path even when mnemosyne-ccl is
# installed, ``ccl`` requires mnemosyne-ccl, unset picks by import. Exists so that tests
# and benchmarks can run the fallback where every package is installed, and so that a
# launcher's children make the launcher's choice whatever they can import.
MNEMOSYNE_JIT_BACKEND = "MNEMOSYNE_JIT_BACKEND"
# Folder where mnemosyne-ccl keeps NCCL's topology and graph dumps, reused by every rebuild
# on this host (default: a per-user temp folder).
MNEMOSYNE_NCCL_CACHE = "MNEMOSYNE_NCCL_CACHE"
# "1" turns on ncclCommShrink/ncclCommGrow through nccl4py in mnemosyne-ccl (default off:
# nccl4py releases that do not return the child communicator need a fresh init instead).
MNEMOSYNE_NCCL_NATIVE = "MNEMOSYNE_NCCL_NATIVE"
# Set (any value) to make ``mnemo doctor`` load libnccl even on a machine without GPUs.
MNEMOSYNE_DOCTOR_PROBE_NCCL = "MNEMOSYNE_DOCTOR_PROBE_NCCL"
# File through which mnemosyne-proxy's test trainer tells its test that it reached an
# injected hang (a test hook, never set in production).
MNEMOSYNE_TEST_MARK = "MNEMOSYNE_TEST_MARK"


def env_str(name: str, default: str | None = None) -> str | None:
    """Return the variable's value, or ``default`` when it is unset or empty."""
    value = os.environ.get(name)
    return value if value else default


def env_int(name: str, default: int | None = None) -> int | None:
    """Return the variable as an int.

    Raises:
        ConfigError: The variable is set but is not an integer.
    """
    value = env_str(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        msg = f"environment variable {name}={value!r}: expected an integer"
        raise ConfigError(msg) from None


def env_float(name: str, default: float | None = None) -> float | None:
    """Return the variable as a float.

    Raises:
        ConfigError: The variable is set but is not a number.
    """
    value = env_str(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        msg = f"environment variable {name}={value!r}: expected a number"
        raise ConfigError(msg) from None
