"""``mnemo launch``, ``mnemo inject``, ``mnemo demo`` and ``mnemo report`` (plugins of ``mnemo``).

Each ``register_*`` is an entry point of the ``mnemosyne.cli.commands`` group: it adds
one sub-parser and sets ``func``. The parser is built at every ``mnemo`` invocation
(``mnemo --help`` too), so this module imports nothing heavy at import time (no torch,
no numpy, nothing of the runtime): each command imports its implementation when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

from mnemosyne.core.env import MNEMOSYNE_INJECT
from mnemosyne.core.errors import AuthError, ConfigError
from mnemosyne.core.events import FaultKind
from mnemosyne.jit.inject import PHASES

__all__ = ["register_demo", "register_inject", "register_launch", "register_report", "store_note"]

logger = logging.getLogger(__name__)


def _launch(args: argparse.Namespace) -> int:
    from mnemosyne.jit.agent import Agent, AgentConfig, read_token_file
    from mnemosyne.jit.inject import parse_plans

    if not args.script:
        msg = "mnemo launch: give the training script (script.py [args]) or -m module [args]"
        raise ConfigError(msg)
    command = ["-m", args.script, *args.script_args] if args.module else [args.script, *args.script_args]
    _check_script(args.script, args.module)
    env: dict[str, str] = {}
    if args.inject:
        parse_plans(args.inject)  # fail now, not in every rank
        env[MNEMOSYNE_INJECT] = args.inject
    world = args.nproc_per_node * args.nnodes
    resume = _resolve_resume(args.resume, world) if args.resume else None
    token = read_token_file(args.token_file) if args.token_file else None
    cfg = AgentConfig(command=command, nproc=args.nproc_per_node, spares=args.spares, hang_timeout=args.hang_timeout,
                      stopped_timeout=args.stopped_timeout,
                      max_restarts=args.max_restarts, event_log=args.event_log, job_id=args.job_id, host=args.host,
                      env=env, no_replace=args.no_replace, ckpt_dir=args.ckpt_dir, resume=resume,
                      shrink=args.shrink, nnodes=args.nnodes, node_rank=args.node_rank, master=args.master,
                      token=token, node_timeout=args.node_timeout, proxy=args.proxy, proxy_size=args.proxy_size,
                      snapshot_every=args.snapshot_every)
    agent = Agent(cfg)
    note = store_note()
    if note:
        print(f"mnemo launch: {note}", flush=True)
    where = f"node {cfg.node_rank} of {cfg.nnodes}, " if cfg.nnodes > 1 else ""
    print(f"mnemo launch: job {agent.job_id}, {where}{cfg.nproc} rank{'' if cfg.nproc == 1 else 's'}, "
          f"{cfg.spares} spare{'' if cfg.spares == 1 else 's'}, events: "
          f"{agent.event_log_path}", flush=True)
    return agent.run()


def _check_script(script: str, module: bool) -> None:
    """Refuse a training script or module that does not exist, before any process starts.

    Raises:
        ConfigError: Naming the script or module.
    """
    import importlib.util

    if not module:
        if not os.path.isfile(script):
            msg = f"mnemo launch: training script {script!r} does not exist (or is not a file)"
            raise ConfigError(msg)
        return
    try:
        found = importlib.util.find_spec(script) is not None
    except ModuleNotFoundError:
        found = False
    except Exception:  # its package fails at import: the trainer reports that itself
        return
    if not found:
        msg = f"mnemo launch -m {script}: no module named {script!r} in this environment"
        raise ConfigError(msg)


def store_note() -> str | None:
    """What ``mnemo launch`` says when the job takes the unauthenticated fallback store, else None."""
    from mnemosyne.core.env import MNEMOSYNE_JIT_BACKEND
    from mnemosyne.jit._select import use_ccl

    if use_ccl():
        return None
    why = (f"{MNEMOSYNE_JIT_BACKEND}=torch" if os.environ.get(MNEMOSYNE_JIT_BACKEND, "").strip().lower() == "torch"
           else "mnemosyne-ccl is not installed")
    return (f"store: torch TCPStore, unauthenticated ({why}); pip install 'mnemosyne-jit[ccl]' for "
            "mnemosyne-ccl's authenticated store and repairable communicators")


def _resolve_resume(given: str, world: int) -> str:
    """The checkpoint ``--resume`` names (itself or the newest in a folder), verified, as an absolute path.

    Raises:
        ConfigError: No checkpoint there, or it was taken by a job of another size.
        CorruptStateError: The checkpoint is truncated or corrupted (names the file).
    """
    from pathlib import Path

    from mnemosyne.core.errors import CorruptStateError
    from mnemosyne.jit import ckpt

    path = Path(given)
    if not (path / ckpt.MANIFEST).exists():
        found = ckpt.latest(path) if path.is_dir() else None
        if found is None and path.is_dir():
            _refuse_corrupt_newest(path)  # only damaged ones there: say what is wrong with the newest
        if found is None:
            msg = (f"mnemo launch --resume {given}: no complete checkpoint there (expected a directory holding "
                   f"{ckpt.MANIFEST}, or a folder of step-* checkpoints)")
            raise ConfigError(msg)
        root: Path | None = path
        newest = max((e for e in ckpt.list_checkpoints(path) if e.step is not None),
                     key=lambda e: (e.step or 0, e.path.name))
        if newest.path != found:  # the newest is damaged (a size is off): say which older one verifies
            _refuse_corrupt_newest(path)
        path = found
    else:
        root = None
    try:
        report = ckpt.verify(path)  # before any process starts: a bad checkpoint fails the launch now
    except CorruptStateError:
        if root is not None:
            _refuse_corrupt_newest(root)
        raise
    if report.world_size != world:
        msg = (f"mnemo launch --resume {path}: the checkpoint was taken by {report.world_size} ranks, "
               f"but this job has {world} (--nproc-per-node x --nnodes); resume with {report.world_size} ranks")
        raise ConfigError(msg)
    print(f"mnemo launch: resuming from {path} (step {report.step}; training continues at step {report.step + 1})",
          flush=True)
    return str(path.resolve())


def _refuse_corrupt_newest(root: Any) -> None:
    """Under a root, the newest checkpoint must verify; else name the newest older one that does.

    Resuming from an older checkpoint silently would redo more steps than the user expects.

    Raises:
        CorruptStateError: The newest checkpoint is damaged (names it, why, and the older one
            that verifies, if any).
    """
    from mnemosyne.core.errors import CorruptStateError
    from mnemosyne.jit import ckpt

    dated = sorted((e for e in ckpt.list_checkpoints(root) if e.step is not None),
                   key=lambda e: (e.step or 0, e.path.name), reverse=True)
    if not dated:
        return
    try:
        ckpt.verify(dated[0].path)
        return
    except CorruptStateError as exc:
        why = str(exc)
    for older in dated[1:]:
        try:
            ckpt.verify(older.path)
        except CorruptStateError:
            continue
        msg = (f"mnemo launch --resume {root}: the newest checkpoint is damaged ({why}); the older checkpoint "
               f"{older.path} (step {older.step}) verifies: resume with --resume {older.path}")
        raise CorruptStateError(msg)
    msg = f"mnemo launch --resume {root}: the newest checkpoint is damaged ({why}) and no older one verifies"
    raise CorruptStateError(msg)


def register_launch(sub: Any) -> None:
    """Add ``mnemo launch``."""
    p = sub.add_parser("launch", help="run a recoverable data-parallel training script (instead of torchrun)",
                       description="Start N ranks of a training script that uses mnemosyne.jit, supervise them, "
                                   "and heal the job in place when a rank dies, hangs or raises.")
    p.add_argument("--nproc-per-node", type=int, required=True, help="ranks to run on this node")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job, one `mnemo launch` each (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this node, 0..nnodes-1; node 0 hosts the store")
    p.add_argument("--master", default=None, metavar="HOST:PORT",
                   help="where node 0 hosts the job's store (required with --nnodes > 1; node 0 listens there)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file (mode 600) holding the job's shared token (multi-node; or set MNEMOSYNE_TOKEN)")
    p.add_argument("--node-timeout", type=float, default=5.0,
                   help="seconds without news from a node's agent before the node counts as lost (default 5)")
    p.add_argument("--spares", type=int, default=1, help="pre-warmed spare processes to keep (default 1)")
    p.add_argument("--hang-timeout", type=float, default=None,
                   help="seconds without progress before a rank counts as hung (default: learned from step times)")
    p.add_argument("--stopped-timeout", type=float, default=0.5,
                   help="seconds a rank may stay stopped (SIGSTOP, state T) before it counts as frozen "
                        "(default 0.5)")
    p.add_argument("--max-restarts", type=int, default=10, help="replacements before the job is given up")
    p.add_argument("--no-replace", action="store_true",
                   help="never replace a failed rank: the healthy ranks write a just-in-time checkpoint and the "
                        "job exits with code 3")
    p.add_argument("--shrink", action="store_true",
                   help="when a rank fails and no warm spare is ready, continue with fewer replicas (the survivors "
                        "run its batches by gradient accumulation) and grow back once a replacement is warm; the "
                        "script must iterate step.micro_batches()")
    p.add_argument("--ckpt-dir", default=None,
                   help="root of just-in-time checkpoints (default ./mnemo-ckpts); when given, running out of "
                        "--max-restarts also checkpoints instead of giving up")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="start from a checkpoint (DIR itself or the newest complete one under DIR)")
    p.add_argument("--proxy", action="store_true",
                   help="keep each rank's model and optimizer state in a device proxy (mnemosyne-proxy, one per "
                        "local rank) that outlives the trainer: a replacement re-attaches to it and receives only "
                        "the light state from the healthy ranks")
    p.add_argument("--proxy-size", default="1G",
                   help="arena size of each device proxy, e.g. 512M, 20G (default 1G; with --proxy)")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                   help="snapshot each rank's state into shared memory every N committed steps (default 0: off); "
                        "when every rank lost its state at once, the job rolls back to the newest snapshot all "
                        "ranks hold (at most N+1 steps redone) instead of restarting at step 0")
    p.add_argument("--event-log", default=None, help="JSON-lines event log (default ./mnemo-events/<job>.jsonl)")
    p.add_argument("--job-id", default=None,
                   help="job id, the same on every node (default: MNEMOSYNE_JOB_ID, else generated on one node)")
    p.add_argument("--host", default=None,
                   help="interface the job's store listens on (default: the --master host, else 127.0.0.1)")
    p.add_argument("--inject", default=None, metavar="PLAN",
                   help="fault plan for testing, e.g. 'rank=1,step=5,kind=kill,phase=forward' (';' separates plans)")
    p.add_argument("-m", "--module", action="store_true", help="the script is a module name (python -m)")
    p.add_argument("script", nargs="?", help="training script (or module with -m)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments of the script")
    p.set_defaults(func=_launch)


def _find_job(job: str | None) -> dict[str, Any]:
    from mnemosyne.jit.agent import job_info_dir

    folder = job_info_dir()
    if job:
        path = folder / f"{job}.json"
        if not path.exists():
            msg = f"no running job {job!r} on this host (looked for {path})"
            raise ConfigError(msg)
        return dict(json.loads(path.read_text()))
    found = sorted(folder.glob("*.json"))
    live = []
    for path in found:
        info = json.loads(path.read_text())
        try:
            os.kill(int(info["pid"]), 0)
            live.append(info)
        except (ProcessLookupError, KeyError, ValueError):
            continue
    if len(live) != 1:
        names = ", ".join(i["job"] for i in live) or "none"
        msg = f"give --job: {len(live)} running jobs on this host ({names})"
        raise ConfigError(msg)
    return dict(live[0])


def _inject(args: argparse.Namespace) -> int:
    from mnemosyne.jit import _keys
    from mnemosyne.jit._store import connect_job_store
    from mnemosyne.jit.inject import FaultPlan

    plan = FaultPlan(args.rank, args.at_step, args.kind, args.phase)
    info = _find_job(args.job)
    # The token comes from the job's info file (readable by its user only) unless given.
    token = args.token if args.token is not None else info.get("token")
    try:
        store = connect_job_store(info["store"], info["job"], token, timeout=10.0, kind=info.get("store_kind"))
    except AuthError as exc:
        msg = f"AuthError: the store of job {info['job']!r} refused this client's token ({exc})"
        raise AuthError(msg) from None
    # Reserve an index first, then publish: trainers read plans 0..n-1 only after n moved.
    index = store.add(f"{_keys.INJECT_COUNT}/reserve", 1) - 1
    store.set(_keys.inject_plan(index), plan.to_text().encode())
    while store.add(_keys.INJECT_COUNT, 0) < index:
        time.sleep(0.01)  # an earlier writer has not published yet
    store.add(_keys.INJECT_COUNT, 1)
    print(f"mnemo inject: job {info['job']}: {plan.to_text()}")
    return 0


def register_inject(sub: Any) -> None:
    """Add ``mnemo inject``."""
    p = sub.add_parser("inject", help="inject a fault into a running job (testing)")
    p.add_argument("--job", default=None, help="job id (default: the only job running on this host)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--at-step", type=int, required=True, help="step index (0-based) at which the fault fires")
    p.add_argument("--kind", choices=list(FaultKind.ALL), required=True)
    p.add_argument("--phase", choices=list(PHASES), default="forward")
    p.add_argument("--token", default=None,
                   help="the job's store token (default: read from the job's info file, owner-only)")
    p.set_defaults(func=_inject)


def _demo(args: argparse.Namespace) -> int:
    from mnemosyne.jit.demo.run import run_demo

    return run_demo(args)


def register_demo(sub: Any) -> None:
    """Add ``mnemo demo``."""
    p = sub.add_parser("demo", help="train a small GPT on 4 ranks, kill one mid-step, heal, verify bit for bit")
    p.add_argument("--nproc", type=int, default=4, help="ranks (default 4)")
    p.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    p.add_argument("--kill-rank", type=int, default=2, help="rank to fault (default 2)")
    p.add_argument("--kill-step", type=int, default=None, help="step of the fault (default: middle)")
    p.add_argument("--kind", choices=list(FaultKind.ALL), default="kill")
    p.add_argument("--phase", choices=[x for x in PHASES if x not in ("recovery", "checkpoint")], default="allreduce")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON to FILE")
    p.add_argument("--workdir", default=None, help="folder for events and final states (default: a temp folder)")
    p.add_argument("--no-verify", action="store_true", help="skip the fault-free reference run")
    p.add_argument("--parallel", choices=("ddp", "hsdp"), default="ddp",
                   help="ddp: data parallel, a small GPT (default); hsdp: FSDP2 over a (nproc/2, 2) mesh, an MLP")
    p.set_defaults(func=_demo)


def _report(args: argparse.Namespace) -> int:
    from mnemosyne.jit.report import load_events, one_line, table, write_html, write_png
    from mnemosyne.jit.summary import incidents

    events = load_events(args.event_log)
    incs = incidents(events)
    names = ", ".join(args.event_log)
    if not incs:
        print(f"no recovery in {names} ({len(events)} events)")
    else:
        print(f"{len(incs)} recover{'y' if len(incs) == 1 else 'ies'} in {names} (seconds):")
        print(table(incs))
        for i, inc in enumerate(incs, 1):
            print(f"{i}: {one_line(inc)}")
    for out in args.out or []:
        suffix = os.path.splitext(out)[1].lower()
        if suffix == ".png":
            write_png(out, events, title=f"mnemo report: {names}")
        elif suffix in (".html", ".htm"):
            write_html(out, events, title=f"mnemo report: {names}")
        else:
            msg = f"mnemo report --out {out}: give a .png or .html file"
            raise ConfigError(msg)
        print(f"timeline written to {out}")
    return 0


def register_report(sub: Any) -> None:
    """Add ``mnemo report``."""
    p = sub.add_parser("report", help="table and timeline of a job's recoveries, from its event log",
                       description="Read a job's JSON-lines event log (several: one per node), print each "
                                   "recovery's phases (fault, detect, abort, replace, repair, transfer, resume, "
                                   "total, steps redone) and optionally draw the timeline.")
    p.add_argument("event_log", nargs="+", metavar="EVENT_LOG", help="the job's event log (mnemo-events/<job>.jsonl)")
    p.add_argument("--out", action="append", metavar="FILE",
                   help="write the timeline: FILE.html (self-contained, inline SVG) or FILE.png (needs matplotlib: "
                        "pip install 'mnemosyne-jit[report]'); may be repeated")
    p.set_defaults(func=_report)
