"""Training state as a JSON skeleton plus a flat list of tensors, and its transfer.

State dicts (model, optimizer, scheduler, user objects) are nested dicts/lists/tuples of
tensors and plain scalars. :func:`flatten` turns one into a JSON-able skeleton, where
each tensor is replaced by its index in a tensor list, and :func:`unflatten` inverts it
exactly (tuples stay tuples, integer dict keys stay integers, floats round-trip bit for
bit through ``repr``). The skeleton travels through the store as JSON and the tensors
travel over the communicator as raw bytes: nothing is ever pickled.

Striping: tensor ``i`` is served by one donor, chosen by a deterministic greedy
balance of bytes, so several donors send disjoint parts at once. Receivers land bytes
in fresh staging buffers and apply them only when everything arrived: an aborted
transfer (a donor died) leaves the receiver's own state untouched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mnemosyne.core.errors import StateError

__all__ = ["TensorSpec", "assign_stripes", "flatten", "pack_plan", "unflatten"]

#: Largest message of a transfer; bigger stripes are sent in several messages.
CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class TensorSpec:
    """dtype, shape and device type of one tensor of a skeleton."""

    dtype: str
    shape: tuple[int, ...]
    device: str

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return math.prod(self.shape) * _dtype(self.dtype).itemsize

    def to_json(self) -> list[Any]:
        """Compact JSON form."""
        return [self.dtype, list(self.shape), self.device]

    @classmethod
    def from_json(cls, body: list[Any]) -> TensorSpec:
        """Inverse of :meth:`to_json`."""
        return cls(str(body[0]), tuple(int(x) for x in body[1]), str(body[2]))


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        msg = f"unknown tensor dtype {name!r} in a state skeleton"
        raise StateError(msg)
    return dt


def skeleton(obj: Any, on_tensor: Callable[[torch.Tensor, str], Any], path: str = "",
             use: str = "transferred") -> Any:
    """Return the JSON skeleton of ``obj``: each tensor becomes ``{"T": on_tensor(t, path)}``.

    Paths name nested keys after a "/" each (``/model/layer.weight``); the transfer numbers
    tensors, the checkpoint names them by path (:mod:`mnemosyne.jit.ckpt`).

    Raises:
        StateError: ``obj`` holds a value that is neither a tensor, a container nor a
            JSON scalar; the message names its path.
    """
    if isinstance(obj, torch.Tensor):
        return {"T": on_tensor(obj, path)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                msg = f"state {path or '<root>'}: dict key {k!r} is not a str or int"
                raise StateError(msg)
            items.append([k, skeleton(v, on_tensor, f"{path}/{k}", use)])
        return {"D": items}
    if isinstance(obj, tuple):
        return {"U": [skeleton(v, on_tensor, f"{path}/{i}", use) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [skeleton(v, on_tensor, f"{path}/{i}", use) for i, v in enumerate(obj)]
    msg = (f"state {path or '<root>'}: value of type {type(obj).__name__} cannot be {use}; "
           "expected tensors, dicts, lists, tuples, str, int, float, bool or None")
    raise StateError(msg)


def rebuild(skel: Any, tensor_of: Callable[[Any], torch.Tensor], error: type[Exception] = StateError) -> Any:
    """Rebuild the object that :func:`skeleton` described; ``tensor_of`` resolves a ``"T"`` reference.

    Raises:
        error: A node of ``skel`` is not one :func:`skeleton` writes.
    """
    if isinstance(skel, dict):
        if "T" in skel:
            return tensor_of(skel["T"])
        if "D" in skel:
            return {k: rebuild(v, tensor_of, error) for k, v in skel["D"]}
        if "U" in skel:
            return tuple(rebuild(v, tensor_of, error) for v in skel["U"])
        msg = f"malformed state skeleton node {json.dumps(skel)[:80]}"
        raise error(msg)
    if isinstance(skel, list):
        return [rebuild(v, tensor_of, error) for v in skel]
    return skel


def flatten(obj: Any, tensors: list[torch.Tensor], path: str = "") -> Any:
    """Return the JSON skeleton of ``obj``; append its tensors to ``tensors`` (numbered references)."""

    def number(t: torch.Tensor, _path: str) -> int:
        tensors.append(t)
        return len(tensors) - 1

    return skeleton(obj, number, path)


def unflatten(skel: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """Rebuild the object that :func:`flatten` described."""
    return rebuild(skel, lambda ref: tensors[int(ref)])


def spec_of(t: torch.Tensor) -> TensorSpec:
    """The :class:`TensorSpec` of a tensor."""
    return TensorSpec(str(t.dtype).removeprefix("torch."), tuple(t.shape), t.device.type)


def assign_stripes(specs: Sequence[TensorSpec], donors: Sequence[int]) -> list[int]:
    """Donor rank serving each tensor: greedy balance of bytes, same answer on every rank."""
    load = dict.fromkeys(donors, 0)
    owner = [donors[0]] * len(specs)
    order = sorted(range(len(specs)), key=lambda i: (-specs[i].nbytes, i))
    for i in order:
        d = min(donors, key=lambda r: (load[r], r))
        owner[i] = d
        load[d] += specs[i].nbytes
    return owner


def pack_plan(specs: Sequence[TensorSpec], owner: Sequence[int], donor: int,
              only: Collection[int] | None = None) -> list[list[int]]:
    """Indices of the tensors ``donor`` sends, grouped into messages of at most CHUNK_BYTES.

    ``only``: send just these indices (a receiver that holds the others already).
    """
    chunks: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i, spec in enumerate(specs):
        if owner[i] != donor or (only is not None and i not in only):
            continue
        if cur and size + spec.nbytes > CHUNK_BYTES:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += spec.nbytes
    if cur:
        chunks.append(cur)
    return chunks


def pack(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Concatenate the raw bytes of ``tensors`` into one uint8 buffer on ``device``."""
    parts = [t.detach().reshape(-1).contiguous().view(torch.uint8).to(device) for t in tensors]
    if not parts:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.cat(parts)


def unpack(buf: torch.Tensor, specs: Sequence[TensorSpec], local_device: torch.device) -> list[torch.Tensor]:
    """Split a buffer made by :func:`pack` back into fresh tensors (on their device types)."""
    out: list[torch.Tensor] = []
    off = 0
    for spec in specs:
        n = spec.nbytes
        raw = buf[off:off + n].clone()
        off += n
        t = raw.view(_dtype(spec.dtype)).reshape(spec.shape)
        dev = torch.device("cpu") if spec.device == "cpu" else local_device
        out.append(t.to(dev))
    if off != buf.numel():
        msg = f"state transfer: received {buf.numel()} bytes, layout describes {off}"
        raise StateError(msg)
    return out
