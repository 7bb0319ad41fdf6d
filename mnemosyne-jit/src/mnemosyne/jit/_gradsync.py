"""Deterministic gradient averaging over fixed flat buckets, overlapped with backward.

Layout. DDP rebuilds its buckets after the first iteration, in an order that depends on
when gradients became ready, and a ring all-reduce sums an element's contributions in
an order that depends on where the element sits in its bucket: a restarted rank would
reduce with another layout than its peers and the result would differ in the last
bits. Here the layout is a pure function of the parameter list (parameters in
registration order, grouped by device and dtype, cut into buckets of at most
``bucket_bytes``), identical on every rank, in every run, before and after recovery.

Gradients live in the buckets. Each parameter's ``.grad`` is a view into its bucket's
flat buffer (as DDP's ``gradient_as_bucket_view``): autograd accumulates into it in
place, the all-reduce runs in place, and nothing is copied back. A gradient that
autograd allocated itself (the first backward after ``zero_grad(set_to_none=True)``) is
moved into its bucket by the post-accumulate hook and ``.grad`` rebound to the view.

Overlap. :meth:`GradSync.begin` arms the hooks for one step. When the last gradient of a
bucket has been accumulated in the final backward of the step, the bucket is ready; the
ready buckets are launched asynchronously in one fixed order (last parameters first,
which is the order backward produces them), so every rank issues the same collectives
in the same order whatever the timing. :meth:`GradSync.sync` launches what is left (a
bucket with an unused parameter), then waits for every bucket once, before the optimizer
update. Backward passes that only accumulate (``step.micro_batches()`` before the last
one, or :meth:`mnemosyne.jit.runtime.Job.no_sync`) launch nothing.

Averaging. The sum is divided by the data-parallel world size (``world_size``), not by
the number of members: while a job is shrunk, a member's gradients hold the
micro-batches of the missing ranks it hosts too, and the sum over members is still the
sum over all data ranks. On CUDA with every rank present the division is fused into the
collective (``ReduceOp.AVG``, NCCL's pre-multiplied sum); otherwise the bucket is summed
and divided once after its wait. A world of one is neither reduced nor divided (both
are the identity).

Faults. A :class:`GradSync` lives for one communicator epoch: after a failure the
runtime calls :meth:`GradSync.close` (hooks removed, ``.grad`` detached from the
buffers that abandoned work may still write) and builds a new one with new buffers, so
nothing of an aborted reduction reaches a later step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mnemosyne.core.comm import Communicator, ReduceOp, Work
from mnemosyne.core.errors import ConfigError, RecoveryError

__all__ = ["DEFAULT_BUCKET_BYTES", "GradSync"]

#: DDP's default bucket size.
DEFAULT_BUCKET_BYTES = 25 << 20


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    flat: torch.Tensor
    views: list[torch.Tensor] = field(default_factory=list)
    ready: int = 0  # gradients accumulated in this step's final backward
    work: Work | None = None
    launched: bool = False
    divide: bool = False  # the sum still needs dividing after the wait


def _aliases(grad: torch.Tensor | None, view: torch.Tensor) -> bool:
    return grad is not None and grad.data_ptr() == view.data_ptr() and grad.shape == view.shape


class GradSync:
    """Averages ``.grad`` of ``params`` across a communicator's members (see module doc).

    Args:
        params: Parameters in a fixed order (those without ``requires_grad`` are skipped).
        bucket_bytes: Largest bucket, in bytes.
        world_size: Divisor of the summed gradients: the number of data ranks (None:
            the communicator's size, i.e. every data rank is a member).
        comm: The communicator of the current epoch; with it, hooks are registered
            and buckets are launched during backward. Without it (tests, manual use)
            :meth:`sync` does everything after backward.
        on_launch: Called with the launch index of each bucket right after its
            all-reduce was launched, and whether backward launched it (True) or
            :meth:`sync` (False); the runtime uses it for phase tracking and fault
            injection while reductions are in flight.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 world_size: int | None = None, comm: Communicator | None = None,
                 on_launch: Callable[[int, bool], None] | None = None) -> None:
        self.world_size = world_size
        self.comm = comm
        self.on_launch = on_launch
        self.buckets: list[_Bucket] = []
        groups: dict[tuple[torch.device, torch.dtype], list[list[torch.nn.Parameter]]] = {}
        for p in params:
            if not p.requires_grad:
                continue
            key = (p.device, p.dtype)
            runs = groups.setdefault(key, [[]])
            cur = runs[-1]
            size = sum(q.numel() for q in cur) * p.element_size()
            if cur and size + p.numel() * p.element_size() > bucket_bytes:
                runs.append([p])
            else:
                cur.append(p)
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket, index in bucket)
        for (device, dtype), runs in groups.items():
            for run in runs:
                if not run:
                    continue
                n = sum(p.numel() for p in run)
                b = _Bucket(run, torch.zeros(n, dtype=dtype, device=device))
                off = 0
                for j, p in enumerate(run):
                    b.views.append(b.flat[off:off + p.numel()].view_as(p))
                    self._where[id(p)] = (len(self.buckets), j)
                    off += p.numel()
                self.buckets.append(b)
        #: Launch order: the last parameters first, as backward produces them.
        self.order = list(reversed(range(len(self.buckets))))
        #: Whether this step's backward is the final one (False: accumulate only).
        self.final = True
        self._armed = False
        self._next = 0  # index into ``order`` of the next bucket to launch
        self._launched = 0
        self._error: BaseException | None = None
        self._hooks: list[Any] = []
        if comm is not None:
            for b in self.buckets:
                for p in b.params:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))

    # ----------------------------------------------------------------- per step
    def begin(self) -> None:
        """Arm the hooks for a new step (every bucket empty of launches)."""
        for b in self.buckets:
            b.ready = 0
            b.work = None
            b.launched = False
            b.divide = False
        self._next = 0
        self._launched = 0
        self._error = None
        self.final = True
        self._armed = True

    def _hook(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        bi, j = self._where[id(p)]
        b = self.buckets[bi]
        if b.launched:
            self._armed = False
            msg = ("a backward pass accumulated into gradients whose all-reduce was already launched in this step: "
                   "when a step runs several backward passes, iterate step.micro_batches() or wrap every backward "
                   "but the last in `with job.no_sync():`")
            raise ConfigError(msg)
        view = b.views[j]
        if not _aliases(p.grad, view):
            if p.grad is not None:
                view.copy_(p.grad)
            p.grad = view
        if not self.final:
            return
        b.ready += 1
        if b.ready == len(b.params):
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.order) and self._is_ready(self.buckets[self.order[self._next]]):
            self._launch(self.order[self._next], True)

    @staticmethod
    def _is_ready(b: _Bucket) -> bool:
        return b.ready == len(b.params)

    def _launch(self, bi: int, in_backward: bool) -> None:
        b = self.buckets[bi]
        comm = self.comm
        if comm is None:
            msg = "GradSync has no communicator"
            raise RecoveryError(msg)
        divisor = self.world_size if self.world_size is not None else comm.size
        b.launched = True
        self._next += 1
        if comm.size > 1:
            fused = b.flat.is_cuda and divisor == comm.size
            b.work = comm.all_reduce(b.flat, ReduceOp.AVG if fused else ReduceOp.SUM, async_op=True)
            b.divide = not fused and divisor != 1
        else:
            b.divide = divisor != 1
        self._launched += 1
        if self.on_launch is not None:
            self.on_launch(self._launched - 1, in_backward)

    def _pack(self, b: _Bucket) -> None:
        """Bind every ``.grad`` of ``b`` to its view (zeros for a parameter without one)."""
        for p, view in zip(b.params, b.views, strict=True):
            if _aliases(p.grad, view):
                continue
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)
            p.grad = view

    def sync(self, comm: Communicator | None = None, between: Callable[[int], None] | None = None) -> None:
        """Launch the buckets not launched yet, wait for all, and leave the average in ``.grad``.

        Args:
            comm: The communicator (default: the one given at construction).
            between: Called with the launch index of each bucket launched here, before
                its launch (tests and manual use).
        """
        if comm is not None:
            self.comm = comm
        if not self._armed:
            self.begin()
        self._armed = False
        try:
            while self._next < len(self.order):
                b = self.buckets[self.order[self._next]]
                self._pack(b)
                if between is not None:
                    between(self._launched)
                self._launch(self.order[self._next], False)
            for bi in self.order:
                b = self.buckets[bi]
                if b.work is not None:
                    b.work.wait()
                if b.divide:
                    assert self.comm is not None
                    b.flat.div_(self.world_size if self.world_size is not None else self.comm.size)
        finally:
            self.final = True

    # ----------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Remove the hooks and detach every ``.grad`` from the buffers (after a failure or at the end).

        A gradient that is a view of this object's buffers becomes a copy of it, or
        zeros when its bucket's reduction is still in flight (abandoned), so that such
        a reduction can never reach a later step.
        """
        self._armed = False
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for b in self.buckets:
            in_flight = b.work is not None and not b.work.is_completed()
            for p, view in zip(b.params, b.views, strict=True):
                if _aliases(p.grad, view):
                    p.grad = torch.zeros_like(p) if in_flight else view.clone()
