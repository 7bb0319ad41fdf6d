"""Soak: many seeded random faults over one long CPU job under ``mnemo launch``.

Every fault (kind, rank, step, phase drawn from ``--seed``) goes into one ``--inject``
plan, spaced ``--gap`` steps apart, so the job must heal each in place and go on. Then a
fault-free run of the same length is made and the two final states compared bit for bit.

Reports (from the event log, nothing re-measured): faults fired and healed, divergence
(differing state leaves: must be 0), hangs (the job missed its deadline: must be 0), and
the longest fault-to-resume incident. The last line is ``soak_healed: <healed>/<planned>``;
the exit status is 0 only when every fault healed with no divergence and no hang.

    python3 tools/soak.py --faults 100 --seed 1 --out /tmp/soak
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

from mnemosyne.core.events import EventKind
from mnemosyne.jit.inject import FaultPlan
from mnemosyne.jit.summary import incidents
from mnemosyne.jit.testing import compare_final_states, launch

#: Kinds a soak draws from: every trainer fault the injector can fire.
KINDS = ("kill", "hang", "exception", "segfault", "exit", "abort")
#: Phases a soak draws from (``recovery`` needs a recovery at a known step: the matrix covers it).
PHASES = ("forward", "backward", "allreduce", "optimizer")
NPROC = 4


def make_plans(faults: int, seed: int, first: int, gap: int) -> list[FaultPlan]:
    """``faults`` plans, one every ``gap`` steps from step ``first``, drawn from ``seed``."""
    rng = random.Random(seed)
    return [FaultPlan(rng.randrange(NPROC), first + i * gap, rng.choice(KINDS), rng.choice(PHASES))
            for i in range(faults)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gap", type=int, default=3, help="steps between two faults")
    p.add_argument("--step-sleep", type=float, default=0.3, help="extra seconds per step (lets spares warm up)")
    p.add_argument("--spares", type=int, default=2, help="warm spares (a spare takes seconds to warm up again)")
    p.add_argument("--out", type=Path, default=Path("/tmp/mnemosyne-soak"))
    p.add_argument("--timeout", type=float, default=0.0, help="job deadline in s (default: 60 + 20 per fault)")
    args = p.parse_args(argv)

    plans = make_plans(args.faults, args.seed, 2, args.gap)
    steps = 2 + args.faults * args.gap + 2
    timeout = args.timeout or 60.0 + 20.0 * args.faults
    shutil.rmtree(args.out, ignore_errors=True)
    inject = ";".join(pl.to_text() for pl in plans)
    print(f"soak: {args.faults} faults, seed {args.seed}, {steps} steps, deadline {timeout:.0f} s", flush=True)

    t0 = time.monotonic()
    hangs = 0
    try:
        run = launch(args.out / "soak", steps=steps, inject=inject, timeout=timeout, spares=args.spares,
                     launch_args=["--max-restarts", str(args.faults + 1)],
                     train_args=["--layers", "2", "--dim", "32", "--heads", "2", "--block", "16", "--vocab", "64",
                                 "--batch", "4", "--samples", "256", "--bucket-kb", "16",
                                 "--step-sleep", str(args.step_sleep)])
    except TimeoutError as exc:
        print(str(exc)[-4000:], file=sys.stderr)
        hangs, run = 1, None
    soak_s = time.monotonic() - t0

    fired: list[str] = []
    healed = 0
    divergence = -1
    worst = 0.0
    if run is not None:
        fired = [str(e.fields["plan"]) for e in run.events if e.kind == EventKind.FAULT]
        incs = incidents(run.events)
        done = [i for i in incs if i.complete]
        worst = max((i.total_s for i in done), default=0.0)
        # A fault healed when its incident completed (every rank resumed); the exit status
        # also needs the job to finish, equal to the fault-free run.
        healed = sum(len(i.faults) for i in done)
        if run.returncode != 0:
            print(f"soak job exited with {run.returncode}:\n{run.output[-4000:]}", file=sys.stderr)
        else:
            ref = launch(args.out / "ref", steps=steps, timeout=60.0 + steps)
            if ref.returncode != 0:
                print(f"reference run exited with {ref.returncode}:\n{ref.output[-3000:]}", file=sys.stderr)
            else:
                diffs = compare_final_states(ref.out, run.out, NPROC)
                divergence = len(diffs)
                if diffs:
                    print("diverged: " + ", ".join(diffs[:10]), file=sys.stderr)
        per_kind: dict[str, int] = {}
        for text in fired:
            kind = text.split("kind=")[1].split(",")[0]
            per_kind[kind] = per_kind.get(kind, 0) + 1
        print("fired per kind: " + json.dumps(per_kind, sort_keys=True))
        print(f"incidents: {len(incs)} ({len(done)} complete)")
    print(f"soak_s: {soak_s:.1f}")
    print(f"faults_fired: {len(fired)}/{len(plans)}")
    print(f"divergence: {divergence}")
    print(f"hangs: {hangs}")
    print(f"max_fault_to_resume_s: {worst:.2f}")
    print(f"soak_healed: {healed}/{len(plans)}")
    ok = healed == len(plans) == len(fired) and divergence == 0 and hangs == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
