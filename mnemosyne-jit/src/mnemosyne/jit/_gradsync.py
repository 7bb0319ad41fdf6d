"""Deterministic gradient averaging over fixed flat buckets.

DDP rebuilds its buckets after the first iteration, in an order that depends on when
gradients became ready, and a ring all-reduce sums an element's contributions in an
order that depends on where the element sits in its bucket: a restarted rank would
reduce with another layout than its peers and the result would differ in the last
bits. Here the layout is a pure function of the parameter list (parameters in
registration order, grouped by device and dtype, cut into buckets of at most
``bucket_bytes``), identical on every rank, in every run, before and after recovery.

A :class:`GradSync` holds no state across steps except its buffers, and the runtime
makes a new one after every recovery, so nothing of an aborted reduction survives.

The sum is divided by the data-parallel world size (``world_size``), not by the number
of members: while a job is shrunk, a member's gradients hold the micro-batches of the
missing ranks it hosts too, and the sum over members is still the sum over all data
ranks. With every rank present the two are equal and the arithmetic is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mnemosyne.core.comm import Communicator, ReduceOp

__all__ = ["DEFAULT_BUCKET_BYTES", "GradSync"]

#: DDP's default bucket size.
DEFAULT_BUCKET_BYTES = 25 << 20


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    flat: torch.Tensor


class GradSync:
    """Averages ``.grad`` of ``params`` across a communicator's members.

    Args:
        params: Parameters in a fixed order (those without ``requires_grad`` are skipped).
        bucket_bytes: Largest bucket, in bytes.
        world_size: Divisor of the summed gradients: the number of data ranks (None:
            the communicator's size, i.e. every data rank is a member).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 world_size: int | None = None) -> None:
        self.world_size = world_size
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
        for (device, dtype), runs in groups.items():
            for run in runs:
                n = sum(p.numel() for p in run)
                self.buckets.append(_Bucket(run, torch.empty(n, dtype=dtype, device=device)))

    def sync(self, comm: Communicator, between: Callable[[int], None] | None = None) -> None:
        """All-reduce every bucket and write the average (sum / world size) back into each ``.grad``.

        Args:
            comm: The communicator of the current epoch.
            between: Called with the bucket index before each bucket's all-reduce
                (the runtime uses it for phase tracking and fault injection).
        """
        size = self.world_size if self.world_size is not None else comm.size
        for i, b in enumerate(self.buckets):
            off = 0
            for p in b.params:
                n = p.numel()
                if p.grad is None:
                    b.flat[off:off + n].zero_()
                else:
                    b.flat[off:off + n].copy_(p.grad.reshape(-1))
                off += n
            if between is not None:
                between(i)
            comm.all_reduce(b.flat, ReduceOp.SUM)
            b.flat.div_(size)
            off = 0
            for p in b.params:
                n = p.numel()
                view = b.flat[off:off + n].view_as(p)
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)
                off += n
