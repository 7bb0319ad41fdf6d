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
import logging
import os
from typing import TYPE_CHECKING, Any

from mnemosyne.core.env import MNEMOSYNE_JIT_BACKEND

if TYPE_CHECKING:
    from mnemosyne.core.comm import CommBackend

__all__ = ["backend_label", "comm_backend", "use_ccl"]


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


def comm_backend(device_type: str, logger: logging.Logger | logging.LoggerAdapter[Any]) -> tuple[bool, CommBackend]:
    """Whether the trainer uses mnemosyne-ccl, and its communicator backend, for a model on ``device_type``.

    ccl's ``gloo``/``nccl``, or the fallback ``torch`` backend (its transport is its
    argument), all loaded by name from :data:`~mnemosyne.core.comm.BACKENDS_ENTRY_POINT`.
    """
    from mnemosyne.core import plugins
    from mnemosyne.core.comm import BACKENDS_ENTRY_POINT

    transport = "nccl" if device_type == "cuda" else "gloo"
    ccl = use_ccl()
    if ccl and transport == "nccl" and importlib.util.find_spec("nccl") is None:
        # ccl's NCCL backend needs nccl4py; torch's own NCCL group still works (on
        # ccl's authenticated store), rebuilt by every member per epoch.
        logger.warning("mnemosyne-ccl's NCCL backend needs nccl4py (pip install "
                       "'mnemosyne-ccl[nccl]'); using torch's ProcessGroupNCCL instead")
        ccl = False
    cls = plugins.load(BACKENDS_ENTRY_POINT, transport if ccl else "torch")
    backend: CommBackend = cls() if ccl else cls(transport)
    return ccl, backend
