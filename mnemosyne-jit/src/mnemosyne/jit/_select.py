"""Which store and communicator a job uses: mnemosyne-ccl when installed, else plain torch.

With mnemosyne-ccl importable, the agent embeds ccl's authenticated store server and the
trainers repair ccl's flexible communicators; without it, the agent hosts torch's
TCPStore (unauthenticated, loopback) and every epoch builds a fresh torch ProcessGroup
(:mod:`mnemosyne.jit._comm`). The choice is made once per process, by import, and every
process of a job makes the same one: the agent exports :data:`MNEMOSYNE_JIT_BACKEND` to
its children.
"""

from __future__ import annotations

import importlib.util
import os

from mnemosyne.core.env import MNEMOSYNE_JIT_BACKEND

__all__ = ["backend_label", "use_ccl"]


def use_ccl() -> bool:
    """True when this job uses mnemosyne-ccl's store and communicators.

    Raises:
        ConfigError: :data:`MNEMOSYNE_JIT_BACKEND` has an unknown value, or is ``ccl``
            while mnemosyne-ccl is not installed.
    """
    from mnemosyne.core.errors import ConfigError

    want = os.environ.get(MNEMOSYNE_JIT_BACKEND, "").strip().lower()
    if want not in ("", "ccl", "torch"):
        msg = f"{MNEMOSYNE_JIT_BACKEND}={want!r}: expected 'ccl', 'torch' or unset (auto)"
        raise ConfigError(msg)
    if want == "torch":
        return False
    have = importlib.util.find_spec("mnemosyne.ccl") is not None
    if want == "ccl" and not have:
        msg = f"{MNEMOSYNE_JIT_BACKEND}=ccl but mnemosyne-ccl is not installed: pip install 'mnemosyne-jit[ccl]'"
        raise ConfigError(msg)
    return have


def backend_label(ccl: bool, device_type: str) -> str:
    """Name recorded in events: ``ccl-gloo``, ``ccl-nccl``, ``torch-gloo`` or ``torch-nccl``."""
    transport = "nccl" if device_type == "cuda" else "gloo"
    return f"{'ccl' if ccl else 'torch'}-{transport}"
