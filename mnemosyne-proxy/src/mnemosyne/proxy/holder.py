"""The trainer side: :class:`ProxyStateHolder`, a StateHolder over a device proxy.

It implements :class:`~mnemosyne.core.state.StateHolder` and imports torch when used, not
when :mod:`mnemosyne.proxy` is imported.

``attach()`` maps the proxy's memory (host: the memory file at the address the previous
trainer used; cuda: the VMM allocation at the reserved virtual address) and returns every
named tensor as a view into it, with the commit status the proxy derived from its log.
``tensor(name)`` is a dict lookup. ``begin_update``/``commit`` are one round trip each on the
Unix socket, logged by the proxy; nothing is copied.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from mnemosyne.core.errors import ConfigError, StateError
from mnemosyne.core.state import AttachResult, CommitStatus, TensorMeta
from mnemosyne.proxy._generated.messages import Entry, PullReply, Space
from mnemosyne.proxy.client import ProxyClient
from mnemosyne.proxy.table import STATUS_CODES

__all__ = ["Committer", "MappedSpace", "ProxyAttachResult", "ProxyStateHolder", "torch_dtype"]

logger = logging.getLogger(__name__)
_STATUS = {v: k for k, v in STATUS_CODES.items()}


def torch_dtype(name: str) -> Any:
    """``"float32"`` -> ``torch.float32``."""
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        msg = f"unknown torch dtype {name!r}"
        raise ConfigError(msg)
    return dt


@dataclass(frozen=True)
class ProxyAttachResult(AttachResult):
    """:class:`AttachResult` plus what the proxy knows.

    Attributes:
        reason: Why the status is not COMMITTED (empty when it is).
        same_address: Every space was mapped where the previous trainer had it.
        seconds: Time attach took (map + tensor views).
        generation: The proxy's generation (increments when a proxy restarts).
    """

    reason: str = ""
    same_address: bool = True
    seconds: float = 0.0
    generation: int = 0


@dataclass
class MappedSpace:
    """One arena space mapped into this process: its address, and a byte tensor over it.

    The tensor is made on first use: mapping must not initialise torch's CUDA state, so that
    :func:`~mnemosyne.proxy.allocator.install_arena_allocator` can still swap the allocator.
    """

    space: Space
    address: int
    make_base: Any
    unmap: Any
    _base: Any = None

    @property
    def base(self) -> Any:
        """A uint8 tensor over the whole space."""
        if self._base is None:
            self._base = self.make_base()
        return self._base

    def release(self) -> None:
        """Drop the tensor and unmap."""
        self._base = None
        self.unmap()


class Committer:
    """Sends ``commit(step)`` once the device has finished the step's update.

    On a GPU, ``optimizer.step()`` returns when its kernels are queued, not done; logging the
    commit then would let a crash leave a half-applied update marked as committed. The
    committer records an event after the update and a thread sends the commit when the event
    completes, so the trainer never waits for the GPU. ``begin_update`` of the next step first
    waits for that commit (by then the GPU has usually long finished). A failure (a dead proxy)
    is re-raised by the next call.

    Args:
        send: Sends the commit of one step (``ProxyClient.commit``).
    """

    def __init__(self, send: Any) -> None:
        self._send = send
        self._queue: queue.Queue[tuple[int, Any] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mnemosyne-proxy-committer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                step, event = item
                if self._error is None:
                    event.synchronize()  # releases the GIL while the device finishes the update
                    self._send(step)
            except BaseException as exc:  # kept for the trainer's thread to raise
                self._error = exc
            finally:
                self._queue.task_done()

    def submit(self, step: int, event: Any) -> None:
        """Commit ``step`` once ``event`` (anything with ``synchronize()``) has completed."""
        self.raise_error()
        self._queue.put((step, event))

    def wait(self) -> None:
        """Block until every submitted commit is sent; raise a failure it met."""
        self._queue.join()
        self.raise_error()

    def raise_error(self) -> None:
        """Raise the failure of an earlier commit, once."""
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        """Stop the thread after pending commits."""
        self._queue.put(None)
        self._thread.join(timeout=60)


class ProxyStateHolder:
    """Keeps this rank's tensors in a device proxy's arena.

    Args:
        socket: The proxy's Unix socket (default ``$MNEMOSYNE_PROXY_SOCKET``).
        token: Job token (default ``$MNEMOSYNE_TOKEN`` or the token file next to the socket).
        job: Job id (default ``$MNEMOSYNE_JOB_ID``).
        timeout: Seconds each request may take.
    """

    def __init__(self, socket: str | None = None, token: str | None = None, job: str | None = None,
                 timeout: float = 60.0) -> None:
        self.client = ProxyClient(socket, token=token, job=job, role="trainer", timeout=timeout)
        self._token = token
        self.spaces: list[MappedSpace] = []
        self._tensors: dict[str, Any] = {}
        self._meta: dict[str, TensorMeta] = {}
        self._handles: dict[str, int] = {}
        self._committer: Committer | None = None

    # ---- StateHolder ---------------------------------------------------------------------
    def attach(self) -> ProxyAttachResult:
        """Map the arena and return the named tensors and the commit status."""
        t0 = time.perf_counter()
        if not self.spaces:
            self._map_all()
        same = all(m.address == m.space.base_hint or m.space.base_hint == 0 for m in self.spaces)
        for m in self.spaces:
            if m.address != m.space.base_hint:
                if m.space.base_hint:
                    logger.warning("arena space %d mapped at %#x, not at %#x where the previous trainer had it",
                                   m.space.space, m.address, m.space.base_hint)
                self.client.set_base(m.space.space, m.address)
        table = self.client.table()
        for e in table.entries:
            if e.name:
                self._add(e)
        st = table.status
        return ProxyAttachResult(_STATUS[st.status], st.step, dict(self._tensors), dict(self._meta), st.reason, same,
                                 time.perf_counter() - t0, st.generation)

    def allocate(self, name: str, dtype: str, shape: tuple[int, ...], device: Any = None) -> Any:
        """Create (or return the existing) named tensor on ``device`` (default: the arena's main space)."""
        if not self.spaces:
            msg = "attach() before allocate()"
            raise StateError(msg)
        dt = torch_dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        space = self._space_for(device)
        reply = self.client.allocate(name, space, dtype, list(shape), nbytes)
        return self._add(reply.entry)

    def tensor(self, name: str) -> Any:
        """The named tensor (a dict lookup)."""
        try:
            return self._tensors[name]
        except KeyError:
            msg = f"no tensor named {name!r} in the arena"
            raise StateError(msg) from None

    def meta(self, name: str) -> TensorMeta:
        """Where the named tensor lives."""
        return self._meta[name]

    def begin_update(self, step: int) -> None:
        """Mark the start of step ``step``'s in-place update (one logged round trip)."""
        self.flush()
        self.client.begin_update(step)

    def commit(self, step: int) -> None:
        """Mark step ``step``'s update complete (one logged round trip).

        On a cuda arena the commit is sent by a thread once the device has finished the work
        queued so far on the current stream (see :class:`Committer`); :meth:`flush` waits for it.
        """
        if self._committer is None:
            self.client.commit(step)
            return
        import torch

        event = torch.cuda.Event()
        event.record()
        self._committer.submit(step, event)

    def flush(self) -> None:
        """Wait until every commit is logged by the proxy."""
        if self._committer is not None:
            self._committer.wait()

    def status(self) -> tuple[CommitStatus, int, str]:
        """(status, last committed step, reason)."""
        self.flush()
        st = self.client.status()
        return _STATUS[st.status], st.step, st.reason

    def pull(self, peer: str, token: str | None = None, timeout: float = 600.0) -> PullReply:
        """Have the proxy fill the arena from ``peer`` (``unix:PATH`` or ``tcp:HOST:PORT``), verified.

        The tensors this holder returned are filled in place; tensors the peer has and this
        arena lacked are added.
        """
        self.flush()
        with self.client.call_with_timeout(timeout):
            reply = self.client.pull(peer, token or "")
        for e in self.client.table().entries:
            if e.name and e.name not in self._tensors:
                self._add(e)
        return reply

    def close(self) -> None:
        """Unmap and disconnect; the proxy keeps the memory. Tensors from this holder must not be used after."""
        if self._committer is not None:
            self.flush()
            self._committer.close()
            self._committer = None
        self._tensors.clear()
        for m in self.spaces:
            m.release()
        self.spaces.clear()
        self.client.close()

    # ---- helpers -------------------------------------------------------------------------
    def map(self) -> list[MappedSpace]:
        """Map the arena's spaces without touching torch (attach does it when needed)."""
        if not self.spaces:
            self._map_all()
        return self.spaces

    def _map_all(self) -> None:
        for space, fd in self.client.map_spaces():
            if space.kind == "host":
                self.spaces.append(_map_host(space, fd))
            elif space.kind == "cuda":
                from mnemosyne.proxy.arena.cuda import map_cuda_space

                self.spaces.append(map_cuda_space(space, fd))
            else:
                msg = f"unknown memory space kind {space.kind!r}"
                raise ConfigError(msg)
        if any(m.space.kind == "cuda" for m in self.spaces):
            self._committer = Committer(self.client.commit)

    def _space_for(self, device: Any) -> int:
        import torch

        kind = "host"
        index = -1
        if device is not None:
            dev = torch.device(device)
            if dev.type == "cuda":
                kind, index = "cuda", (dev.index if dev.index is not None else torch.cuda.current_device())
        elif self.spaces:
            return 0
        for m in self.spaces:
            if m.space.kind == kind and (kind == "host" or m.space.device == index):
                return m.space.space
        msg = f"this arena has no {kind} space for device {device}; spaces: {[m.space.kind for m in self.spaces]}"
        raise ConfigError(msg)

    def _add(self, e: Entry) -> Any:
        t = self._tensors.get(e.name)
        if t is not None and self._handles.get(e.name) == e.handle:
            return t
        base = self.spaces[e.space].base
        t = base[e.offset : e.offset + e.nbytes].view(torch_dtype(e.dtype)).view(tuple(e.shape))
        if e.name:
            self._tensors[e.name] = t
            self._handles[e.name] = e.handle
            self._meta[e.name] = TensorMeta(e.name, e.dtype, tuple(e.shape), e.offset, e.nbytes, e.handle)
        return t


def _map_host(space: Space, fd: int) -> MappedSpace:
    import ctypes
    import os

    import torch

    from mnemosyne.proxy._hostmap import map_shared, unmap

    try:
        addr = map_shared(fd, space.capacity, space.base_hint)
    finally:
        os.close(fd)
    def make_base() -> Any:
        buf = (ctypes.c_uint8 * space.capacity).from_address(addr)
        return torch.frombuffer(buf, dtype=torch.uint8)

    return MappedSpace(space, addr, make_base, lambda: unmap(addr, space.capacity))
