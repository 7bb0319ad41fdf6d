"""Command-line options of the communicator benchmark (no torch imported here)."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options (shared by ``mnemo ccl bench`` and tools/bench/ccl.py)."""
    parser.add_argument("--backend", default="gloo", help="communicator backend: gloo (CPU) or nccl (one GPU per rank)")
    parser.add_argument("--world", type=int, default=4, help="number of ranks (processes)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per phase (the median is reported)")
    parser.add_argument("--fresh-repeats", type=int, default=2,
                        help="repeats of the full init in fresh processes (each spawns --world processes)")
    parser.add_argument("--numel", type=int, default=1 << 20,
                        help="elements of the float32 all_reduce after each phase")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds any phase may take")
    parser.add_argument("--json", metavar="OUT", help="write every measurement as JSON to this file")
