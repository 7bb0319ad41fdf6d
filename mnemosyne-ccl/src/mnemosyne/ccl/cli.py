"""``mnemo store`` and ``mnemo ccl`` (entry points of ``mnemosyne.cli.commands``).

``register_*`` only build parsers: nothing here imports torch until a command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register_ccl", "register_store"]


def _run_store(args: argparse.Namespace) -> int:
    from mnemosyne.ccl._store_cli import run

    return run(args)


def register_store(sub: Any) -> None:
    """Add ``mnemo store``: run the persistent bootstrap store in the foreground."""
    from mnemosyne.ccl._store_cli import add_arguments

    p = sub.add_parser("store", help="run the persistent bootstrap store (outlives every rank)")
    add_arguments(p)
    p.set_defaults(func=_run_store)


def _run_bench(args: argparse.Namespace) -> int:
    from mnemosyne.ccl.bench import run

    return int(run(args))


def _run_info(args: argparse.Namespace) -> int:
    import json

    from mnemosyne.ccl import backend
    from mnemosyne.core import plugins
    from mnemosyne.core.comm import BACKENDS_ENTRY_POINT

    out: dict[str, Any] = {}
    for name in plugins.available(BACKENDS_ENTRY_POINT):
        try:
            be = backend(name)
            out[name] = {"capabilities": type(be).capabilities(), **_version_of(be)}
        except Exception as exc:  # report, do not crash: that is the point of the command
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def _version_of(be: Any) -> dict[str, Any]:
    fn = getattr(be, "library_version", None)
    if fn is None:
        return {}
    try:
        return {"library_version": fn()}
    except Exception as exc:
        return {"library_version": None, "why": str(exc)}


def register_ccl(sub: Any) -> None:
    """Add ``mnemo ccl {bench,info}``."""
    p = sub.add_parser("ccl", help="flexible communicators: benchmark repair vs re-init, backend info")
    ccl_sub = p.add_subparsers(dest="ccl_command", metavar="SUBCOMMAND", required=True)
    info = ccl_sub.add_parser("info", help="installed backends, their native capabilities and library versions")
    info.set_defaults(func=_run_info)
    bench = ccl_sub.add_parser("bench", help="time full init vs rebuild vs shrink vs grow (same as tools/bench/ccl.py)")
    from mnemosyne.ccl.bench_args import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=_run_bench)
