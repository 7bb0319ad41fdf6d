"""Helpers to run and check recoverable jobs.

Used by this package's tests, the demo and the benchmark; documented so that users can
write the same checks for their own jobs.

* :func:`launch` runs ``mnemo launch`` on the demo training script in a subprocess with a
  hard timeout and returns what it left behind (:class:`JobRun`).
* :func:`compare_final_states` compares two runs' final states bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mnemosyne.core.events import Event, EventKind, read_events

if TYPE_CHECKING:
    from mnemosyne.jit.summary import Incident

__all__ = ["DETECTED_AS", "JobRun", "alive", "check_recovered", "compare_final_states", "flatten_state", "launch",
           "started_pids"]

#: The agent's detect-event name for each injected fault kind.
DETECTED_AS = {"kill": "kill", "hang": "hang", "exception": "exception", "segfault": "segfault", "exit": "exit",
               "abort": "sigabrt", "stall": "hang"}

#: Small demo model used by the tests (a step takes milliseconds on a CPU core).
TINY = ["--layers", "2", "--dim", "32", "--heads", "2", "--block", "16", "--vocab", "64", "--batch", "4",
        "--samples", "256", "--bucket-kb", "16"]


@dataclass
class JobRun:
    """What a finished :func:`launch` left behind."""

    returncode: int
    out: Path
    events: list[Event] = field(default_factory=list)
    output: str = ""

    def pids(self) -> dict[int, list[int]]:
        """Process ids that ever held each rank (from the start markers)."""
        return started_pids(self.out)

    def final(self, rank: int) -> dict[str, Any]:
        """The final state written by ``rank``."""
        return dict(torch.load(self.out / f"final-rank{rank}.pt", weights_only=False))


def started_pids(out: Path) -> dict[int, list[int]]:
    """Per rank, the pids that started as that rank (``out/started/rank<r>.<pid>``)."""
    res: dict[int, list[int]] = {}
    for p in sorted((out / "started").glob("rank*.*")):
        rank, pid = p.name.removeprefix("rank").split(".")
        res.setdefault(int(rank), []).append(int(pid))
    return res


def launch(out: Path, *, nproc: int = 4, spares: int = 1, steps: int = 8, inject: str = "",
           train_args: Sequence[str] = TINY, launch_args: Sequence[str] = (), timeout: float = 100.0,
           env: Mapping[str, str] | None = None, module: str = "mnemosyne.jit.demo.train") -> JobRun:
    """Run ``mnemo launch -m <module>`` (the demo trainer) and wait for it (killed at ``timeout``).

    ``env`` adds to this process's environment for the launcher (and so its children).

    The launcher runs in its own session; on timeout the whole session is killed, and the
    trainers die with their parent (PR_SET_PDEATHSIG), so nothing is left running.
    """
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mnemosyne.cli", "launch", "--nproc-per-node", str(nproc), "--spares", str(spares),
           "--event-log", str(out / "events.jsonl"), *launch_args]
    if inject:
        cmd += ["--inject", inject]
    cmd += ["-m", module, "--steps", str(steps), "--out", str(out), *train_args]
    full_env = {**os.environ, **env} if env else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env=full_env)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        text = output.decode(errors="replace")
        log = out / "events.jsonl"
        tail = [e.to_json() for e in read_events(log, strict=False)[-60:]] if log.exists() else []
        msg = f"job did not finish within {timeout} s; output tail:\n{text[-3000:]}\nlast events:\n" + "\n".join(tail)
        raise TimeoutError(msg) from None
    log = out / "events.jsonl"
    events = read_events(log, strict=False) if log.exists() else []
    return JobRun(proc.returncode, out, events, output.decode(errors="replace"))


def flatten_state(obj: Any, path: str = "") -> dict[str, Any]:
    """Leaves of a nested state, by path."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_state(v, f"{path}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten_state(v, f"{path}/{i}"))
    else:
        out[path] = obj
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        # Compare raw bytes: equal floats that differ in sign of zero or NaN payload count as different.
        raw_a = a.detach().cpu().reshape(-1).view(torch.uint8)
        return torch.equal(raw_a, b.detach().cpu().reshape(-1).view(torch.uint8))
    return type(a) is type(b) and a == b


def compare_final_states(a: Path, b: Path, nproc: int, keys: Sequence[str] = ("model", "optim", "sched"),
                         replica_of: Callable[[int], int] = lambda r: 0) -> list[str]:
    """Differences between two runs' final states (empty: bit-for-bit equal), also across replicas.

    ``replica_of(r)``: the rank whose model rank ``r`` must equal (data parallel: 0; a
    sharded job: the rank holding the same shard, e.g. ``r % shard_size``).
    """
    diffs: list[str] = []
    refs: dict[int, dict[str, Any]] = {}
    for r in range(nproc):
        sa = torch.load(a / f"final-rank{r}.pt", weights_only=False)
        sb = torch.load(b / f"final-rank{r}.pt", weights_only=False)
        for key in keys:
            fa, fb = flatten_state(sa[key]), flatten_state(sb[key])
            if fa.keys() != fb.keys():
                diffs.append(f"rank {r} {key}: keys differ: {sorted(set(fa) ^ set(fb))[:5]}")
                continue
            diffs += [f"rank {r} {key}{p}" for p in fa if not _same(fa[p], fb[p])]
        flat = flatten_state(sb["model"])
        src = replica_of(r)
        ref = refs.setdefault(src, flat)
        if ref is not flat:
            diffs += [f"rank {r} model{p} differs from rank {src}" for p in flat if not _same(flat[p], ref[p])]
    return diffs


def check_recovered(run: JobRun, reference: JobRun, plan_text: str, nproc: int = 4,
                    replica_of: Callable[[int], int] = lambda r: 0) -> list[Incident]:
    """Assert that ``run`` healed every fault of ``plan_text`` in place; return its incidents.

    The job exited 0, its final state equals ``reference``'s bit for bit, every planned
    fault fired exactly once and was detected as its kind, no recovery redid more than one
    step, every faulted rank was replaced and every healthy rank kept its one process.

    Raises:
        AssertionError: What differs.
    """
    from mnemosyne.jit.inject import parse_plans
    from mnemosyne.jit.summary import incidents

    plans = parse_plans(plan_text)
    assert run.returncode == 0, run.output[-4000:]
    diffs = compare_final_states(reference.out, run.out, nproc, replica_of=replica_of)
    assert not diffs, diffs[:10]
    faults = [e for e in run.events if e.kind == EventKind.FAULT]
    assert sorted(e.fields["plan"] for e in faults) == sorted(p.to_text() for p in plans)  # each fired once
    detects = [e for e in run.events if e.kind == EventKind.DETECT and e.rank == -1]
    assert sorted(e.name for e in detects) == sorted(DETECTED_AS[p.kind] for p in plans)
    redone = [e.fields["steps_redone"] for e in run.events if e.kind == EventKind.RECOVERED]
    assert max(redone) <= 1, redone
    pids = run.pids()
    faulted = {p.rank for p in plans}
    for rank in range(nproc):
        if rank in faulted:
            assert len(pids[rank]) >= 2, pids
        else:
            assert len(pids[rank]) == 1, f"healthy rank {rank} was restarted: {pids}"
    for rank in set(range(nproc)) - faulted:
        assert run.final(rank)["pid"] == pids[rank][0]
    return incidents(run.events)


def alive(pids: Sequence[int]) -> list[int]:
    """The ``pids`` still running (a zombie, dead but not yet reaped, does not count)."""
    res = []
    for pid in set(pids):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] != b"Z":
            res.append(pid)
    return sorted(res)
