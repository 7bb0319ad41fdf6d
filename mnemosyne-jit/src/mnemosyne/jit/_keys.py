"""Names of every store key the launcher, trainers, spares and tools share.

All keys live under the job's prefix (``<job>/``); keys that belong to one membership
epoch carry it (``e<epoch>/...``) so that a rebuild never reads a previous epoch's keys.
"""

from __future__ import annotations

__all__ = [
    "DONE",
    "FAIL_COUNT",
    "INJECT_COUNT",
    "REBUILD_REQUEST",
    "STOP",
    "agent_exit",
    "agent_lost",
    "agent_status",
    "arrive",
    "comm_prefix",
    "committed",
    "done",
    "fail_report",
    "fired",
    "heartbeat",
    "inject_plan",
    "membership",
    "report",
    "spare_assign",
    "spare_ready",
    "spare_stop",
    "xfer_meta",
]

#: Number of fault plans written by ``mnemo inject``.
INJECT_COUNT = "inject/n"
#: A trainer saw a communicator error that no membership change explains: it asks the
#: agent for a new epoch with the same members (everyone rebuilds).
REBUILD_REQUEST = "rebuild_request"
#: Prefix of ranks that finished training.
DONE = "done"
#: Counter of failure reports that node agents sent to the coordinator (indexes reserved by ``add``).
FAIL_COUNT = "agents/fail/n"
#: Set by the coordinator when the job stops (signal, giving up): every agent stops (value: why).
STOP = "agents/stop"


def agent_status(node: int) -> str:
    """Status of the agent of ``node`` (JSON: seq, ready/live spares), rewritten ~10 times a second."""
    return f"agents/{node}/status"


def agent_exit(node: int) -> str:
    """Set by the agent of ``node`` as it leaves (JSON: its exit code, its trainers' exit codes)."""
    return f"agents/{node}/exit"


def agent_lost(node: int) -> str:
    """Set by the coordinator when it gave ``node`` up (its ranks now live elsewhere or are absent)."""
    return f"agents/{node}/lost"


def fail_report(index: int) -> str:
    """The ``index``-th failure report of a node agent (JSON: rank, member, cause, detail, node)."""
    return f"agents/fail/{index}"


def membership(epoch: int) -> str:
    """The epoch record of ``epoch`` (JSON: :class:`~mnemosyne.jit._protocol.EpochRecord`), set once."""
    return f"membership/{epoch}"


def heartbeat(rank: int) -> str:
    """Latest heartbeat of logical ``rank`` (JSON, written by its watchdog thread)."""
    return f"hb/{rank}"


def report(rank: int, pid: int) -> str:
    """Failure report of the process ``pid`` holding ``rank`` (JSON)."""
    return f"report/{rank}/{pid}"


def done(rank: int) -> str:
    """Set when ``rank`` finished its last step (value: its final epoch)."""
    return f"{DONE}/{rank}"


def comm_prefix(epoch: int) -> str:
    """Store prefix of the communicator of ``epoch`` (fresh per epoch)."""
    return f"comm/e{epoch}"


def jit_ckpt(epoch: int) -> str:
    """Store view of the writers of epoch ``epoch``'s just-in-time checkpoint.

    The agent publishes a writer's death there (:func:`mnemosyne.jit._ckpt_io.publish_exit`).
    """
    return f"jitckpt/e{epoch}"


def arrive(epoch: int) -> str:
    """Counter of members that reached the rendezvous of ``epoch``."""
    return f"e{epoch}/arrive"


def committed(epoch: int, rank: int) -> str:
    """What ``rank`` reports in the agreement of ``epoch`` (JSON)."""
    return f"e{epoch}/agree/{rank}"


def mesh_report(epoch: int, tag: str, rank: int) -> str:
    """What ``rank`` reports about its mesh group ``tag`` in the recovery of ``epoch`` (JSON)."""
    return f"e{epoch}/mesh/{tag}/{rank}"


def comm_holder(epoch: int, rank: int) -> str:
    """Whether ``rank`` builds ``epoch``'s communicator from one it holds ("1") or is new ("0")."""
    return f"e{epoch}/holder/{rank}"


def xfer_meta(epoch: int) -> str:
    """Layout of the state that donors send in ``epoch`` (JSON)."""
    return f"e{epoch}/xfer/meta"


def xfer_need(epoch: int, rank: int) -> str:
    """Tensor indices a re-attached receiver needs in the transfer of ``epoch`` (JSON; null: all)."""
    return f"e{epoch}/xfer/need/{rank}"


def inject_plan(index: int) -> str:
    """The ``index``-th fault plan written by ``mnemo inject``."""
    return f"inject/plan/{index}"


def fired(plan_id: str) -> str:
    """Counter that makes a fault plan fire once across incarnations."""
    return f"inject/fired/{plan_id}"


def spare_ready(spare_id: int) -> str:
    """Set by a spare once torch is imported and the device is initialised."""
    return f"spare/{spare_id}/ready"


def spare_assign(spare_id: int) -> str:
    """Assignment of a spare (JSON: rank, epoch, local_rank, world_size, t)."""
    return f"spare/{spare_id}/assign"


def spare_stop(spare_id: int) -> str:
    """Set by the agent to send a spare home."""
    return f"spare/{spare_id}/stop"
