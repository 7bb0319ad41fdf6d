"""mnemosyne.jit: just-in-time recovery of data-parallel PyTorch training.

Wrap model and optimizer once with :func:`init`, iterate :meth:`Job.steps`, and run each
step body inside ``with step:``; launch with ``mnemo launch``. See the guide
"Make your DDP script recoverable" (docs/jit.md).
"""

from mnemosyne.jit.__about__ import __version__
from mnemosyne.jit.data import ResumableSampler
from mnemosyne.jit.inject import FaultPlan, InjectedFault, parse_plans
from mnemosyne.jit.runtime import EXIT_EXCEPTION, Job, Step, init, joining

__all__ = [
    "EXIT_EXCEPTION",
    "FaultPlan",
    "InjectedFault",
    "Job",
    "ResumableSampler",
    "Step",
    "__version__",
    "init",
    "joining",
    "parse_plans",
]
