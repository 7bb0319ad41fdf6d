"""``mnemo demo``: the main job on an embedded default.

Trains the small GPT of :mod:`mnemosyne.jit.demo.model` on generated tokens with 4 ranks
(Gloo on CPU; NCCL when GPUs are present), faults one rank mid-step (SIGKILL during the
gradient all-reduce by default), lets the job heal in place while a live view shows every
rank, then runs the same training without a fault and checks that the final parameters
and optimizer state are equal bit for bit. The recovery summary (detection, abort,
replace, repair, transfer, resume; steps redone) comes from the job's event log.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mnemosyne.core.env import MNEMOSYNE_INJECT
from mnemosyne.core.errors import ConfigError, MissingDependencyError
from mnemosyne.core.events import EventKind, read_events
from mnemosyne.jit.agent import Agent, AgentConfig
from mnemosyne.jit.inject import FaultPlan
from mnemosyne.jit.summary import summarize
from mnemosyne.jit.testing import compare_final_states, started_pids

__all__ = ["DEMO_MODEL", "run_demo"]

#: Model and data of the demo (small enough for a 2-core CPU box).
DEMO_MODEL = ["--layers", "2", "--dim", "64", "--heads", "4", "--block", "32", "--vocab", "128", "--batch", "8",
              "--samples", "2048", "--log-steps"]

_NOTABLE = {EventKind.FAULT, EventKind.DETECT, EventKind.EPOCH, EventKind.RECOVERED}


class _View:
    """Renders the live view from the agent's state and the event log."""

    def __init__(self, title: str, steps: int, log: Path) -> None:
        self.title = title
        self.steps = steps
        self.log = log
        self.lines: list[str] = []
        self._offset = 0
        self.t0_wall: float | None = None  # time of the log's first event shown (the job's start)

    def _poll_log(self) -> None:
        if not self.log.exists():
            return
        with open(self.log, encoding="utf-8") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev["kind"] not in _NOTABLE or (ev["kind"] == EventKind.RECOVERED and ev["name"] == "start"
                                              and ev["epoch"] == 0):
                continue
            f = ev.get("fields", {})
            who = "agent" if ev["rank"] < 0 else f"rank {ev['rank']}"
            if ev["kind"] == EventKind.FAULT:
                text = f"[red]fault[/red] {ev['name']} injected at step {f.get('step')} ({f.get('phase')})"
            elif ev["kind"] == EventKind.DETECT:
                text = f"[yellow]detected[/yellow] rank {f.get('target_rank')}: {ev['name']}"
            elif ev["kind"] == EventKind.EPOCH:
                text = f"epoch {f.get('epoch_number')}: {f.get('reason')}"
            else:
                text = (f"[green]resumed[/green] at step {f.get('resume_step')} as {f.get('role')} "
                        f"({(ev.get('duration_s') or 0) * 1000:.0f} ms)")
            if self.t0_wall is None:
                self.t0_wall = float(ev["ts"])
            self.lines.append(f"{float(ev['ts']) - self.t0_wall:6.2f}s  {who:>7}  {text}")
        self.lines = self.lines[-10:]

    def render(self, agent: Agent) -> Any:
        from rich.console import Group
        from rich.table import Table

        self._poll_log()
        table = Table(title=self.title, expand=False)
        for col in ("rank", "pid", "step", "phase", "committed", "replaced"):
            table.add_column(col, justify="right" if col != "phase" else "left")
        for st in agent.ranks:
            pid = str(st.proc.pid) if st.proc is not None else "-"
            phase = "[green]done[/green]" if st.finished else st.phase
            last = self.steps - 1 if _finished_ok(st) else None  # heartbeats stop before the last steps
            table.add_row(str(st.rank), pid, str(st.step if last is None else last), phase,
                          str(max(st.committed, -1) if last is None else last),
                          str(st.replacements) if st.replacements else "")
        done = min((self.steps if _finished_ok(st) else st.committed + 1 for st in agent.ranks), default=0)
        bar = int(40 * max(0, done) / max(1, self.steps))
        progress = f"[bold]{'█' * bar}{'·' * (40 - bar)}[/bold] {max(0, done)}/{self.steps} steps"
        return Group(table, progress, *self.lines)


def _finished_ok(st: Any) -> bool:
    """The rank ran every step (its process exited 0 after training)."""
    return bool(st.finished and st.returncode == 0)


def _trainer(parallel: str) -> list[str]:
    """The trainer module and its options for ``--parallel``."""
    if parallel == "hsdp":
        return ["-m", "mnemosyne.jit.demo.train_fsdp", "--parallel", "hsdp"]
    return ["-m", "mnemosyne.jit.demo.train", *DEMO_MODEL]


def _run_job(out: Path, nproc: int, steps: int, inject: str, title: str, console: Any,
             parallel: str = "ddp") -> tuple[int, float]:
    from rich.live import Live

    out.mkdir(parents=True, exist_ok=True)
    log = out / "events.jsonl"
    env = {MNEMOSYNE_INJECT: inject} if inject else {}
    cfg = AgentConfig(command=[*_trainer(parallel), "--steps", str(steps), "--out", str(out)], nproc=nproc,
                      spares=1, event_log=str(log), env=env)
    view = _View(title, steps, log)
    t0 = time.perf_counter()
    if not console.is_terminal:  # a pipe or a file: no live redraws, the final view once
        agent = Agent(cfg)
        rc = agent.run()
        console.print(view.render(agent))
        return rc, time.perf_counter() - t0
    with Live(console=console, refresh_per_second=8, transient=False) as live:
        agent = Agent(cfg, on_tick=lambda a: live.update(view.render(a)))
        rc = agent.run()
        live.update(view.render(agent))
    console.print()
    return rc, time.perf_counter() - t0


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; return 0 when the faulted run healed and matches the reference bit for bit."""
    try:
        from rich.console import Console
    except ImportError as exc:
        what = "rich (for the demo's view)"
        raise MissingDependencyError(what, "pip install mnemosyne-cli") from exc

    console = Console()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mnemo-demo-"))
    try:
        return _demo(args, console, work)
    finally:
        if not args.workdir:  # a folder of our own: nothing of it is left behind
            shutil.rmtree(work, ignore_errors=True)


def _demo(args: argparse.Namespace, console: Any, work: Path) -> int:
    from rich.table import Table

    kill_step = args.kill_step if args.kill_step is not None else args.steps // 2
    plan = FaultPlan(args.kill_rank, kill_step, args.kind, args.phase)
    from mnemosyne.jit.demo.train import uses_gpus

    parallel = getattr(args, "parallel", "ddp")
    if parallel == "hsdp" and (args.nproc < 2 or args.nproc % 2):
        msg = f"mnemo demo --parallel hsdp: --nproc {args.nproc}: expected an even number >= 2 (a (nproc/2, 2) mesh)"
        raise ConfigError(msg)
    backend = "NCCL" if uses_gpus(args.nproc) and parallel == "ddp" else "Gloo, CPU"
    what = "small GPT" if parallel == "ddp" else f"small MLP, FSDP2 over a ({args.nproc // 2}, 2) HSDP mesh"
    console.print(f"[bold]mnemo demo[/bold]: {what}, {args.nproc} ranks ({backend}), {args.steps} steps; "
                  f"fault: {plan.kind} rank {plan.rank} at step {plan.step} ({plan.phase}). Work dir: {work}"
                  + ("" if args.workdir else " (temporary; --workdir DIR keeps it, e.g. for mnemo report)"))
    faulted, reference = work / "faulted", work / "reference"
    rc, t_faulted = _run_job(faulted, args.nproc, args.steps, plan.to_text(), "faulted run (heals in place)",
                             console, parallel)
    events = read_events(faulted / "events.jsonl", strict=False)
    summary = summarize(events)
    pids = started_pids(faulted)
    healthy_same = all(len(p) == 1 for r, p in pids.items() if r != plan.rank)
    result: dict[str, Any] = {"ranks": args.nproc, "steps": args.steps, "backend": backend, "parallel": parallel,
                              "fault": plan.to_text(),
                              "faulted_returncode": rc, "faulted_run_s": t_faulted,
                              "healthy_pids_unchanged": healthy_same, **summary}
    fired = [e for e in events if e.kind == EventKind.FAULT]
    result["faults_fired"] = len(fired)
    # Which store/communicator the job used (mnemosyne-ccl or the plain torch fallback).
    result["comm_backend"] = ",".join(sorted({str(e.fields.get("backend")) for e in events
                                              if e.name == "trainer_start"}))
    result["store_kind"] = ",".join(sorted({str(e.fields.get("store_kind")) for e in events if e.name == "launch"}))
    bitwise = None
    if not args.no_verify:
        console.print("[bold]reference run[/bold]: the same training without a fault")
        rc_ref, t_ref = _run_job(reference, args.nproc, args.steps, "", "fault-free reference run", console,
                                 parallel)
        result["reference_returncode"] = rc_ref
        result["reference_run_s"] = t_ref
        if rc == 0 and rc_ref == 0:
            # HSDP: ranks r and r + 2k hold the same shard (shard groups of 2).
            diffs = compare_final_states(reference, faulted, args.nproc,
                                         replica_of=(lambda r: r % 2) if parallel == "hsdp" else (lambda r: 0))
            bitwise = not diffs
            result["differences"] = diffs[:20]
        else:
            bitwise = False
    result["bitwise_equal"] = bitwise
    inc = summary["incidents"][0] if summary["incidents"] else None
    table = Table(title="recovery summary (from the event log)")
    table.add_column("what")
    table.add_column("value", justify="right")
    if inc is not None:
        for name, secs in inc["phases_s"].items():
            table.add_row(name, f"{secs * 1000:.1f} ms")
        table.add_row("[bold]fault to resumed training[/bold]", f"[bold]{inc['total_s'] * 1000:.1f} ms[/bold]")
        table.add_row("state transferred", f"{inc['bytes_transferred'] / 1e6:.2f} MB from {inc['donors']} "
                      f"donor{'' if inc['donors'] == 1 else 's'}")
        table.add_row("resumed at step", str(inc["resume_step"]))
    table.add_row("steps redone", str(summary["steps_redone"]))
    table.add_row("communicator / store", f"{result['comm_backend']} / {result['store_kind']}")
    if summary["median_step_s"]:
        table.add_row("median step time", f"{summary['median_step_s'] * 1000:.1f} ms")
    table.add_row("healthy ranks kept their processes", str(healthy_same))
    table.add_row("final state equal to fault-free run, bit for bit",
                  "skipped" if bitwise is None else ("[green]yes[/green]" if bitwise else "[red]NO[/red]"))
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        console.print(f"summary written to {args.json}")
    ok = (rc == 0 and inc is not None and summary["steps_redone"] <= 1 and healthy_same
          and (bitwise is None or bitwise))
    return 0 if ok else 1
