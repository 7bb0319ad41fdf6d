"""mnemosyne.jit: just-in-time recovery of data-parallel PyTorch training.

Wrap model and optimizer once with :func:`init`, iterate :meth:`Job.steps`, and run each
step body inside ``with step:``; launch with ``mnemo launch``. See the guide
"Make your DDP script recoverable" (docs/jit.md).

The names below load on first use (PEP 562): the launcher side of the package
(``mnemo launch``, ``mnemo --version``, :mod:`mnemosyne.jit.agent`) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mnemosyne.jit.__about__ import __version__

if TYPE_CHECKING:
    from mnemosyne.jit._mesh import device_mesh
    from mnemosyne.jit._protocol import EXIT_EXCEPTION
    from mnemosyne.jit._step import Step
    from mnemosyne.jit.data import ResumableSampler
    from mnemosyne.jit.inject import FaultPlan, InjectedFault, parse_plans
    from mnemosyne.jit.runtime import Job, init, joining

__all__ = [
    "EXIT_EXCEPTION",
    "FaultPlan",
    "InjectedFault",
    "Job",
    "ResumableSampler",
    "Step",
    "__version__",
    "device_mesh",
    "init",
    "joining",
    "parse_plans",
]

# Public name -> module that defines it.
_LAZY = {
    "device_mesh": "mnemosyne.jit._mesh",
    "EXIT_EXCEPTION": "mnemosyne.jit._protocol",
    "FaultPlan": "mnemosyne.jit.inject",
    "InjectedFault": "mnemosyne.jit.inject",
    "Job": "mnemosyne.jit.runtime",
    "ResumableSampler": "mnemosyne.jit.data",
    "Step": "mnemosyne.jit._step",
    "init": "mnemosyne.jit.runtime",
    "joining": "mnemosyne.jit.runtime",
    "parse_plans": "mnemosyne.jit.inject",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'mnemosyne.jit' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
