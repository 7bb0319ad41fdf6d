"""What the two programs of mnemosyne-jit agree on: exit codes (and, below, the epoch record).

mnemosyne-jit is two programs that talk only through the job's store, the environment
and exit codes:

* the supervisor (``mnemo launch``): :mod:`~mnemosyne.jit.agent`, the coordinator, the
  proxy pool, :mod:`~mnemosyne.jit._bootstrap` and the config; it never imports torch;
* the trainer (:func:`mnemosyne.jit.init`): the job, step, watchdog, gradient sync,
  recovery, state and communicator modules.

Neither imports the other. What they share lives in torch-free modules: this one (exit
codes), :mod:`mnemosyne.jit._keys` (store key names) and :mod:`mnemosyne.core.env`
(environment variable names, defined once there).
"""

from __future__ import annotations

__all__ = [
    "EXIT_CKPT",
    "EXIT_CKPT_FAILED",
    "EXIT_EXCEPTION",
    "EXIT_JOB_CKPT",
    "EXIT_REPLACED",
]

# Trainer exit codes, read by the agent that started the trainer.
#: A trainer died of an exception in a step (after reporting it in the store).
EXIT_EXCEPTION = 17
#: A trainer found itself replaced (no longer a member).
EXIT_REPLACED = 18
#: A healthy trainer took part in a just-in-time checkpoint on the agent's order (whether or
#: not it wrote a part of it).
EXIT_CKPT = 19
#: A trainer whose part of an ordered checkpoint failed.
EXIT_CKPT_FAILED = 20

# The launcher's own exit code.
#: ``mnemo launch`` stopped the job after a just-in-time checkpoint.
EXIT_JOB_CKPT = 3
