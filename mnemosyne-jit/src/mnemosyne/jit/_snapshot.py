"""In-memory snapshots of a rank's training state, taken off the critical path (trainer side).

:class:`Snapshotter` copies a state (model, optimizer, anything :mod:`mnemosyne.jit._state`
can flatten) into a holder of :mod:`mnemosyne.jit._snapstore` in shared memory:

1. :meth:`Snapshotter.capture` (at a step boundary, after the optimizer step) flattens the
   state into a JSON skeleton and a tensor list (references, no copy) and starts a
   background thread that copies every tensor's bytes straight into the holder's free slot
   and commits it with a blake2b digest. It returns at once.
2. :meth:`Snapshotter.fence` waits for that copy (not for the digest and commit, which
   go on in the background); the caller calls it before anything mutates the captured
   tensors in place (the next optimizer step). Forward and backward of the next step
   overlap with the copy; only the part of the copy that outlasts them stalls.

The snapshot is consistent at the step boundary because nothing writes the captured
tensors between ``capture`` and ``fence``. Nothing is pickled: :func:`restore` rebuilds
the state from the skeleton and raw bytes, bit for bit.

On a GPU the copy would go device-to-host on a side stream into pinned memory; this
version copies with ``Tensor.copy_`` from the background thread (CPU tensors, or a
synchronous device-to-host copy).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import torch

from mnemosyne.core.errors import StateError
from mnemosyne.jit import _snapstore
from mnemosyne.jit._state import TensorSpec, _dtype, flatten, spec_of, unflatten

__all__ = ["Snapshotter", "decode", "restore"]

_FORMAT = 1
_ALIGN = 64


def _layout(specs: list[TensorSpec]) -> tuple[list[int], int]:
    offsets, off = [], 0
    for s in specs:
        offsets.append(off)
        off += -(-s.nbytes // _ALIGN) * _ALIGN
    return offsets, off


class Snapshotter:
    """Double-buffered snapshots of one rank's state into holder ``base`` (see module doc).

    Args:
        base: Holder path (its slots are ``base.0`` and ``base.1``), normally under ``/dev/shm``.
        background: Copy in a background thread (True) or inside :meth:`capture` (False,
            for measuring the copy itself).
    """

    def __init__(self, base: str | os.PathLike[str], background: bool = True) -> None:
        self.base = base
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._copied = threading.Event()
        #: Step of the newest generation this snapshotter committed (-1: none yet).
        self.last_step = -1
        #: Seconds the last copy + digest + commit took (in the background).
        self.last_copy_s = 0.0

    def capture(self, state: Any, step: int) -> None:
        """Start a snapshot of ``state`` at ``step``; waits for the previous one first.

        Raises:
            StateError: ``state`` holds a value that cannot be snapshotted (names its path),
                or the previous snapshot failed (its cause chained).
        """
        self.wait()
        tensors: list[torch.Tensor] = []
        skel = flatten(state, tensors)
        specs = [spec_of(t) for t in tensors]
        offsets, total = _layout(specs)
        meta = json.dumps({"format": _FORMAT, "step": step, "skeleton": skel,
                           "specs": [s.to_json() for s in specs], "offsets": offsets},
                          separators=(",", ":")).encode()
        writer = _snapstore.SlotWriter(self.base, step, meta, total)
        self._copied.clear()
        if self.background:
            self._thread = threading.Thread(target=self._copy, args=(writer, tensors, specs, offsets),
                                            name="mnemosyne-snapshot", daemon=True)
            self._thread.start()
        else:
            self._copy(writer, tensors, specs, offsets)
            self._raise()

    def _copy(self, writer: _snapstore.SlotWriter, tensors: list[torch.Tensor],
              specs: list[TensorSpec], offsets: list[int]) -> None:
        t0 = time.perf_counter()
        try:
            if writer.data.nbytes:
                flat = torch.frombuffer(writer.data, dtype=torch.uint8)
                for t, s, off in zip(tensors, specs, offsets, strict=True):
                    n = s.nbytes
                    if n:
                        flat[off:off + n].view(t.dtype).view(t.shape).copy_(t.detach())
                del flat
            self._copied.set()
            writer.commit()
            self.last_step = writer.step
        except BaseException as e:
            self._error = e
            writer.abandon()
        finally:
            self._copied.set()
        self.last_copy_s = time.perf_counter() - t0

    def fence(self) -> float:
        """Wait until the snapshot in flight has copied the tensors; returns the seconds waited.

        After it returns the captured tensors may change: their bytes are in shared memory.
        The digest and commit may still be running (:meth:`wait` waits for those too).

        Raises:
            StateError: the snapshot failed; the previous generation is still the newest.
        """
        t0 = time.perf_counter()
        if self._thread is not None:
            self._copied.wait()
        self._raise()
        return time.perf_counter() - t0

    def wait(self) -> None:
        """Wait until the snapshot in flight is committed (or failed).

        Raises:
            StateError: the snapshot failed; the previous generation is still the newest.
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            msg = f"snapshot into {self.base} failed: {err}; the previous generation is kept"
            raise StateError(msg) from err

    def close(self) -> None:
        """Finish the snapshot in flight (the holder stays: the node agent owns it)."""
        self.wait()


def decode(gen: _snapstore.Generation, device: torch.device | None = None) -> tuple[int, Any]:
    """Step and state object of a generation read from a holder.

    Tensors are views of the generation's private buffer (no second copy); tensors saved
    from a device other than the CPU go to ``device``.

    Raises:
        StateError: the metadata is not a snapshot this version writes (names what differs).
    """
    try:
        meta = json.loads(gen.meta)
    except ValueError as e:
        msg = f"snapshot {gen.path}: metadata is not JSON ({e})"
        raise StateError(msg) from e
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        msg = f"snapshot {gen.path}: format {got!r}, expected {_FORMAT}"
        raise StateError(msg)
    specs = [TensorSpec.from_json(s) for s in meta["specs"]]
    offsets = [int(o) for o in meta["offsets"]]
    if len(offsets) != len(specs):
        msg = f"snapshot {gen.path}: {len(specs)} tensor specs but {len(offsets)} offsets"
        raise StateError(msg)
    end = max((o + s.nbytes for o, s in zip(offsets, specs, strict=True)), default=0)
    if end > len(gen.data):
        msg = f"snapshot {gen.path}: layout needs {end} bytes, the generation holds {len(gen.data)}"
        raise StateError(msg)
    flat = torch.frombuffer(gen.data, dtype=torch.uint8) if len(gen.data) else torch.empty(0, dtype=torch.uint8)
    tensors = []
    for s, off in zip(specs, offsets, strict=True):
        t = flat[off:off + s.nbytes].view(_dtype(s.dtype)).view(s.shape)
        if s.device != "cpu":
            t = t.to(device or torch.device(s.device))
        tensors.append(t)
    return int(meta["step"]), unflatten(meta["skeleton"], tensors)


def restore(base: str | os.PathLike[str], device: torch.device | None = None) -> tuple[int, Any]:
    """Step and state of the newest complete, verified generation of holder ``base``.

    Raises:
        StateError: no complete generation; CorruptStateError (a StateError) when every
            complete one fails its digest.
    """
    return decode(_snapstore.latest(base), device)
