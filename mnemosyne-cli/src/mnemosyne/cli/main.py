"""Entry point of the ``mnemo`` command.

Each subcommand is a plugin: an entry point in the ``mnemosyne.cli.commands`` group whose
object is ``register(subparsers) -> None``. ``register`` adds one sub-parser and sets its
``func`` default to a callable ``func(args) -> int`` (the exit code). A plugin whose
package is broken is reported, not fatal: the other commands keep working.

Plugins load lazily, so that ``mnemo --help`` and ``mnemo --version`` stay fast (no
torch):

* the module an entry point names must import nothing heavy at import time: ``register``
  only builds the sub-parser, and ``func`` imports the implementation when the command
  runs (see ``mnemosyne.jit.cli``);
* ``mnemo --version`` loads no plugin at all;
* ``mnemo COMMAND ...`` loads only the plugin whose entry-point name is ``COMMAND`` (name
  entry points after the command they add); ``mnemo --help`` and unknown commands load
  every plugin, to list them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, entry_points, version

from mnemosyne.core.env import MNEMOSYNE_LOG_LEVEL
from mnemosyne.core.errors import ConfigError, MnemosyneError

__all__ = ["COMMANDS_ENTRY_POINT", "COMPONENTS", "build_parser", "installed_components", "main"]

#: Entry-point group of ``mnemo`` subcommands.
COMMANDS_ENTRY_POINT = "mnemosyne.cli.commands"

#: Every distribution of the project, in dependency order.
COMPONENTS = ("mnemosyne-core", "mnemosyne-ccl", "mnemosyne-proxy", "mnemosyne-jit", "mnemosyne-cli", "mnemosyne")

logger = logging.getLogger(__name__)


def installed_components() -> dict[str, str | None]:
    """Version of each Mnemosyne distribution, None when not installed."""
    out: dict[str, str | None] = {}
    for dist in COMPONENTS:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print every installed component and its version")

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        for dist, ver in installed_components().items():
            if ver is not None:
                print(f"{dist} {ver}")
        parser.exit(0)


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """Build the parser from the installed command plugins.

    Args:
        only: Load only the plugin of this entry-point name, when there is one (the
            command about to run); otherwise every plugin.

    Returns:
        The parser and, per plugin that failed to load, the reason.
    """
    parser = argparse.ArgumentParser(
        prog="mnemo", description="Mnemosyne: just-in-time failure recovery for distributed PyTorch training."
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    broken: dict[str, str] = {}
    plugins = sorted(entry_points(group=COMMANDS_ENTRY_POINT), key=lambda e: e.name)
    if only is not None and [ep for ep in plugins if ep.name == only]:
        plugins = [ep for ep in plugins if ep.name == only]
    for ep in plugins:
        try:
            register = ep.load()
            register(sub)
        except Exception as exc:  # a broken plugin must not take the whole CLI down
            broken[ep.name] = f"{type(exc).__name__}: {exc}"
    return parser, broken


_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def _configure_logging(verbose: int) -> None:
    """Configure the root logger.

    Raises:
        ConfigError: ``MNEMOSYNE_LOG_LEVEL`` names no logging level.
    """
    level = os.environ.get(MNEMOSYNE_LOG_LEVEL) or ("DEBUG" if verbose > 1 else "INFO" if verbose else "WARNING")
    if level.upper() not in _LEVELS:
        msg = f"environment variable {MNEMOSYNE_LOG_LEVEL}={level!r}: expected one of {', '.join(_LEVELS)}"
        raise ConfigError(msg)
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _split(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """The global options before the subcommand, and the subcommand (None when absent)."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return list(argv[:i]), arg
    return list(argv), None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mnemo``; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options, command = _split(argv)
    if "--version" in options:  # without loading any plugin
        for dist, ver in installed_components().items():
            if ver is not None:
                print(f"{dist} {ver}")
        return 0
    wants_help = "-h" in options or "--help" in options
    parser, broken = build_parser(None if wants_help else command)
    args = parser.parse_args(argv)
    try:
        _configure_logging(args.verbose)
    except ConfigError as exc:
        print(f"mnemo: error: {exc}", file=sys.stderr)
        return 2
    for name, why in broken.items():
        logger.warning("command plugin %r could not be loaded: %s", name, why)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except MnemosyneError as exc:
        print(f"mnemo {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
