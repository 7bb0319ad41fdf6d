"""Filling a proxy's arena from a peer proxy that holds the same training state.

Same node (``unix:PATH``): the donor passes its memory's descriptors (read-only for a host
arena), the puller maps them and copies each tensor directly (a memcpy on the host arena, a
device-to-device copy on the cuda arena). Across nodes (``tcp:HOST:PORT``): the puller reads
each tensor in chunks over the donor's peer port.

Either way the result is verified end to end: the donor checksums its tensors in place, the
puller checksums its copies in place (same definition, numba on host memory, a CUDA kernel
on device memory), and every pair must match. The donor must be committed before and after
the copy with the same state counter; if its trainer started an update in between, the
pull fails (and may be retried) rather than keep a mix of two steps.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from mnemosyne.core.state import CommitStatus
from mnemosyne.proxy._generated.messages import Entry, PullReply, RecAlloc, RecPullStart
from mnemosyne.proxy.client import ProxyClient
from mnemosyne.proxy.errors import PullError
from mnemosyne.proxy.table import STATUS_CODES, is_state

if TYPE_CHECKING:
    from mnemosyne.proxy.server import ProxyServer

__all__ = ["CHUNK", "pull_from_peer"]

logger = logging.getLogger(__name__)

#: Bytes per network read.
CHUNK = 8 * 1024 * 1024
_COMMITTED = STATUS_CODES[CommitStatus.COMMITTED]


def _match_layout(server: ProxyServer, donor: list[Entry]) -> list[tuple[Entry, Entry]]:
    """Pair each donor state tensor with the local one of the same name, creating missing ones."""
    table = server.table
    wanted = {e.name for e in donor}
    extra = sorted(e.name for e in table.entries.values() if is_state(e) and e.name not in wanted)
    if extra:
        msg = f"this arena holds state tensors the peer does not have ({extra[:5]}...); the replicas differ"
        raise PullError(msg)
    pairs = []
    for d in donor:
        local = table.lookup(d.name)
        if local is None:
            local = table.plan_alloc(d.name, d.space, d.dtype, d.shape, d.nbytes)
            server._log(RecAlloc(local))
        elif (local.space, local.dtype, list(local.shape), local.nbytes) != (d.space, d.dtype, list(d.shape), d.nbytes):
            msg = (f"tensor {d.name!r} differs: peer has space={d.space} {d.dtype}{list(d.shape)}, this arena "
                   f"space={local.space} {local.dtype}{list(local.shape)}")
            raise PullError(msg)
        pairs.append((d, local))
    return pairs


def pull_from_peer(server: ProxyServer, peer: str, token: str) -> PullReply:
    """Copy the peer's committed state into ``server``'s arena and verify it.

    Raises:
        PullError: The peer is not committed, changed during the copy, has another layout,
            or a checksum differs.
        ProxyUnavailableError: The peer is unreachable.
    """
    arena = server._arena()
    target = peer.removeprefix("unix:")
    if target in (str(server.socket_path), server.peer_address):
        # The proxy serves one request at a time: pulling from itself would wait on itself.
        msg = f"a proxy cannot pull from itself ({peer})"
        raise PullError(msg)
    t0 = time.perf_counter()
    with ProxyClient(peer, token=token, job=server.job, role="peer") as conn:
        before = conn.table()
        st = before.status
        if st.status != _COMMITTED:
            msg = f"peer {peer} holds no committed state (status code {st.status}: {st.reason or 'empty'})"
            raise PullError(msg)
        donor = [e for e in before.entries if is_state(e)]
        pairs = _match_layout(server, donor)
        total = sum(d.nbytes for d in donor)
        # From the first byte written until verified, this arena holds no consistent state.
        server._log(RecPullStart(st.step, peer))
        if conn.is_unix:
            path = "same-node mapped copy"
            spaces_fds = conn.map_spaces()
            fds = [fd for _, fd in spaces_fds]
            from mnemosyne.proxy.arena import SpaceInfo

            try:
                mapping = arena.map_peer(fds, [SpaceInfo(s.kind, s.device, s.capacity) for s, _ in spaces_fds])
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                for d, local in pairs:
                    arena.copy_from_peer(mapping, d.space, d.offset, local.offset, d.nbytes)
                arena.synchronize()
            finally:
                mapping.close()
        else:
            path = "network"
            for d, local in pairs:
                for off in range(0, d.nbytes, CHUNK):
                    n = min(CHUNK, d.nbytes - off)
                    data = conn.read(d.handle, off, n).data
                    if len(data) != n:
                        msg = f"peer sent {len(data)} of {n} bytes of {d.name!r}"
                        raise PullError(msg)
                    arena.write(local.space, local.offset + off, data)
        copied = time.perf_counter() - t0
        theirs = conn.checksum([d.handle for d, _ in pairs])
        ours = [arena.checksum(local.space, local.offset, local.nbytes) for _, local in pairs]
        bad = [d.name for (d, _), a, b in zip(pairs, theirs.sums, ours, strict=True) if a != b]
        if bad:
            msg = f"checksums differ after pulling from {peer}: {bad[:5]} ({len(bad)} of {len(pairs)} tensors)"
            raise PullError(msg)
        after = conn.status()
        if after.seq != st.seq or after.status != _COMMITTED or theirs.seq != st.seq:
            msg = (f"peer {peer} changed while being pulled (step {st.step} -> {after.step}, state counter "
                   f"{st.seq} -> {after.seq}); retry the pull")
            raise PullError(msg)
    seconds = time.perf_counter() - t0
    logger.info("pulled step %d from %s: %d tensors, %d bytes, copy %.3f s, verified in %.3f s (%s)",
                st.step, peer, len(pairs), total, copied, seconds - copied, path)
    path += f"; checksums: {arena.checksum_path}"
    return PullReply(st.step, total, len(pairs), seconds, copied, path)
