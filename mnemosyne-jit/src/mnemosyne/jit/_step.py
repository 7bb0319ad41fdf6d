"""One training step as the user sees it: ``with step:`` and ``step.micro_batches()``.

The :class:`Step` object only marks boundaries and hands out batches; everything it
does is a call back into its :class:`~mnemosyne.jit.runtime.Job`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from mnemosyne.core.errors import ConfigError

if TYPE_CHECKING:
    from mnemosyne.jit.runtime import Job

__all__ = ["Step"]


def _rng_seed(seed: int, rank: int, step: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Step:
    """One training step: a context manager around the step body (see :meth:`Job.steps`).

    Attributes:
        index: Step index (0-based).
        data_ranks: The data ranks whose batches this member runs in this step: its own
            rank first, then the missing ranks it hosts while the job is shrunk.
    """

    def __init__(self, job: Job, index: int, batch: Any, data_ranks: list[int],
                 batch_of: Callable[[int], Any]) -> None:
        self.job = job
        self.index = index
        self._batch = batch
        self.data_ranks = list(data_ranks)
        self._batch_of = batch_of
        #: Data ranks whose batch this step handed out (``step.batch`` or micro_batches()).
        self.ran: list[int] = []
        self._micro = False
        self.entered = False
        self.failed = False

    @property
    def batch(self) -> Any:
        """This rank's batch of this step (a job launched with ``--shrink`` must use :meth:`micro_batches`).

        Raises:
            ConfigError: The job runs with ``mnemo launch --shrink``.
        """
        if self.job.shrink:
            msg = ("this job runs with `mnemo launch --shrink`: a member may have to run a missing rank's batch "
                   "too, so the step body must iterate `for batch in step.micro_batches(): ...` (forward and "
                   "backward per batch, then optimizer.step() once) instead of reading `step.batch`")
            raise ConfigError(msg)
        if not self.ran:
            self.ran = [self.job.rank]
        return self._batch

    def micro_batches(self) -> Iterator[Any]:
        """Yield the batch of each data rank this member runs in this step.

        Normally one item, this rank's batch. While the job is shrunk, also the batch of
        each missing rank this member hosts; before each of those the RNGs are set to
        the state that rank would have had (seed, rank, step), so dropout and the like
        match the full run. Run forward and backward on each (gradients accumulate), then
        ``optimizer.step()`` once after the loop: the runtime divides the summed
        gradients by the data-parallel world size.
        """
        self._micro = True
        last = len(self.data_ranks) - 1
        try:
            for i, d in enumerate(self.data_ranks):
                if i == 0:
                    batch = self._batch  # the RNGs already hold this rank's state for the step
                else:
                    batch = self._batch_of(d)
                    self.job._seed_rngs(d, self.index)
                self.ran.append(d)
                # Only the last micro-batch's backward launches the gradient reductions.
                self.job._final_backward(i == last)
                yield batch
        finally:
            self.job._final_backward(True)

    @property
    def micro_batches_done(self) -> bool:
        """Whether :meth:`micro_batches` was not used, or used to the end."""
        return not self._micro or self.ran == self.data_ranks

    def __enter__(self) -> Step:
        self.entered = True
        self.job._enter_step(self.index)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: Any) -> bool:
        if ev is None:
            return False
        if isinstance(ev, (KeyboardInterrupt, SystemExit)):
            return False
        if self.job._is_comm_failure(ev):
            self.job._discard(self.index, ev)
            self.failed = True
            return True
        self.job._die_of_exception(self.index, ev)
        return False  # not reached
