"""The full fault matrix, on demand: every trainer fault kind x every phase, one job per cell.

CI runs a covering set (``mnemosyne-jit/tests/test_fault_matrix.py``: every kind and every
phase at least once, several faults per job); this runs the cross product (about 30 s a
cell on 2 cores) and prints a Markdown table: ``healed`` (bit for bit equal to the
fault-free run, healthy ranks kept their processes: :func:`mnemosyne.jit.testing.check_recovered`),
``stopped`` (a fault in a just-in-time checkpoint: the job stopped with an error, no
checkpoint taken for good and no process left), or ``FAIL: why``.

The agent's own death (SIGKILL, SIGTERM, the store host's loss) and a spare killed while
warming have no phase: the test suite runs them.

    python3 tools/fault_matrix.py [--kinds kill,hang] [--phases forward,last] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from mnemosyne.core.events import EventKind
from mnemosyne.jit import ckpt
from mnemosyne.jit.testing import JobRun, alive, check_recovered, launch, started_pids

KINDS = ("kill", "hang", "stall", "segfault", "exception", "exit", "abort", "two-ranks")
PHASES = ("first", "forward", "backward", "allreduce", "optimizer", "checkpoint", "recovery", "last")
STEPS = 8
MID = 4


def plan_for(kind: str, phase: str) -> str:
    """The cell's ``--inject`` plan (``two-ranks``: ranks 1 and 2 fail with SIGKILL at once)."""
    if phase == "checkpoint":  # rank 2 dies under --no-replace; the fault hits the checkpoint of step MID-1
        k = "kill" if kind == "two-ranks" else kind
        extra = ";rank=3,step=3,kind=kill,phase=checkpoint" if kind == "two-ranks" else ""
        return f"rank=2,step={MID},kind=kill,phase=forward;rank=1,step={MID - 1},kind={k},phase=checkpoint{extra}"
    step = {"first": 0, "last": STEPS - 1}.get(phase, MID)
    where = {"first": "forward", "last": "optimizer"}.get(phase, phase)
    if phase == "recovery":  # rank 3 dies; the fault hits the recovery that resumes at MID
        first = f"rank=3,step={MID},kind=kill,phase=forward;"
        if kind == "two-ranks":
            return first + f"rank=1,step={MID},kind=kill,phase=recovery;rank=2,step={MID},kind=kill,phase=recovery"
        return first + f"rank=1,step={MID},kind={kind},phase=recovery"
    if kind == "two-ranks":
        return f"rank=1,step={step},kind=kill,phase={where};rank=2,step={step},kind=kill,phase={where}"
    return f"rank=1,step={step},kind={kind},phase={where}"


def _children(run: JobRun) -> list[int]:
    pids = [int(e.fields["pid"]) for e in run.events if e.name in ("trainer_start", "spare_start")]
    return pids + [p for ps in started_pids(run.out).values() for p in ps]


def run_cell(out: Path, reference: JobRun, kind: str, phase: str) -> str:
    """Run one cell; its result for the table."""
    plan = plan_for(kind, phase)
    try:
        if phase != "checkpoint":
            run = launch(out, steps=STEPS, spares=2, inject=plan, timeout=110)
            check_recovered(run, reference, plan)
            return "healed"
        root = out / "ckpts"
        run = launch(out, steps=STEPS, inject=plan, timeout=110, launch_args=["--no-replace", "--ckpt-dir", str(root)])
    except TimeoutError:
        return "FAIL: hang (no end within 110 s)"
    except AssertionError as exc:
        return f"FAIL: {str(exc).splitlines()[0][:120] if str(exc) else 'assertion'}"
    fired = {str(e.fields["plan"]) for e in run.events if e.kind == EventKind.FAULT}
    if fired != set(plan.split(";")):
        return f"FAIL: fired {sorted(fired)}"
    if run.returncode == 0:
        return "FAIL: exit 0 after a lost rank under --no-replace"
    latest = ckpt.latest(root) if root.exists() else None
    if latest is not None:
        try:
            ckpt.verify(latest)
        except Exception as exc:
            return f"FAIL: corrupt checkpoint taken for good: {exc}"[:140]
    time.sleep(1.0)
    if alive(_children(run)):
        return f"FAIL: processes left: {alive(_children(run))}"
    return f"stopped (exit {run.returncode}, checkpoint {'kept, verified' if latest else 'none'})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--out", type=Path, default=Path("/tmp/mnemosyne-fault-matrix"))
    args = p.parse_args(argv)
    kinds, phases = args.kinds.split(","), args.phases.split(",")
    shutil.rmtree(args.out, ignore_errors=True)
    reference = launch(args.out / "ref", steps=STEPS, timeout=100)
    if reference.returncode != 0:
        print(reference.output[-3000:], file=sys.stderr)
        return 2
    results: dict[tuple[str, str], str] = {}
    for kind in kinds:
        for ph in phases:
            t0 = time.monotonic()
            results[kind, ph] = run_cell(args.out / f"{kind}-{ph}", reference, kind, ph)
            print(f"{kind:10s} {ph:10s} {results[kind, ph]}  ({time.monotonic() - t0:.0f} s)", flush=True)
    print()
    print("| kind | " + " | ".join(phases) + " |")
    print("|---|" + "---|" * len(phases))
    for kind in kinds:
        print(f"| {kind} | " + " | ".join(results[kind, ph] for ph in phases) + " |")
    return 0 if all(not r.startswith("FAIL") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
