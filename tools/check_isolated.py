"""Prove that one component imports on its own: no torch, no other Mnemosyne component.

Usage: python tools/check_isolated.py mnemosyne.ccl
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

OTHERS = {"mnemosyne.ccl", "mnemosyne.proxy", "mnemosyne.jit", "mnemosyne.cli"}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in OTHERS:
        print(f"usage: check_isolated.py {{{','.join(sorted(OTHERS))}}}", file=sys.stderr)
        return 2
    target = sys.argv[1]
    importlib.import_module(target)
    problems = []
    if "torch" in sys.modules:
        problems.append("importing it imported torch")
    if importlib.util.find_spec("torch") is not None:
        problems.append("torch is installed in this environment (the isolation env must not have it)")
    for other in sorted(OTHERS - {target}):
        if importlib.util.find_spec(other) is not None:
            problems.append(f"{other} is installed here too")
    if problems:
        print(f"{target}: NOT isolated: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"{target}: imports alone (no torch, no other component)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
