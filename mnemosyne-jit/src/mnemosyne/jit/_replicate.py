"""Replication of snapshot generations between node agents over ZeroMQ with CURVE (no torch).

Each node agent runs a :class:`ReplicaServer`: a REP socket that stores the generations its
ring predecessors push (``put``) as holders of :mod:`mnemosyne.jit._snapstore` under its own
folder, and serves the newest one back (``get``) to a node that lost its own copy. Agents
push each of their ranks' newest generation to the next ``k`` node ranks of the ring
(:func:`ring_peers`, as Transom TCE backs up to the next node).

Security: both key pairs are derived from the job's token (:func:`curve_keys`), so only
processes of this job can talk: the server is a CURVE server whose ZAP handler admits only
the job's client key, and a client that derived its keys from another token fails the
handshake (:class:`ReplicationError` after the timeout; the server stores nothing). CURVE
also encrypts and authenticates every frame.

Integrity: a message is three frames: a JSON header (holder name, step, sizes, blake2b
digest), the generation's metadata and its raw bytes, sent zero-copy. The receiver
recomputes the digest before storing anything and refuses a mismatch; the fetching side
does the same. Nothing received is ever unpickled.

Order: a holder's replica only moves forward. The server refuses a put whose step is older
than the newest verified generation it holds for that holder (a stale or replayed push
would otherwise overwrite the other slot and become the newest, so a recovery could restore
an older state than the job agreed); both slots stay as they were. A put of the step it
already holds with the same digest is an idempotent success that writes nothing (a push
retried after a lost acknowledgement); the same step with another digest is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mnemosyne.core.errors import CorruptStateError, MissingDependencyError, MnemosyneError, StateError
from mnemosyne.jit import _snapstore

__all__ = ["ReplicaServer", "ReplicationError", "Replicator", "curve_keys", "fetch_first", "fetch_generation",
           "push_generation", "ring_peers"]

_HOLDER = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_VERSION = 1


class ReplicationError(MnemosyneError):
    """A peer did not take or could not give a snapshot generation (the message says why)."""


def _zmq() -> Any:
    try:
        import zmq
    except ImportError as e:
        what = "pyzmq (snapshot replication)"
        raise MissingDependencyError(what, "pip install 'mnemosyne-jit[snapshot]'") from e
    return zmq


def ring_peers(node_rank: int, nnodes: int, k: int) -> list[int]:
    """Node ranks that hold replicas of ``node_rank``'s snapshots: the next ``k`` in the ring.

    Raises:
        ValueError: ``node_rank`` outside ``[0, nnodes)`` or ``k`` negative.
    """
    if not 0 <= node_rank < nnodes or k < 0:
        msg = f"ring_peers: node_rank {node_rank} of {nnodes} nodes, k={k}; expected 0 <= node_rank < nnodes, k >= 0"
        raise ValueError(msg)
    return [(node_rank + i) % nnodes for i in range(1, min(k, nnodes - 1) + 1)]


def curve_keys(token: str, role: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 CURVE key pair of ``role`` ("server" or "client"), derived from ``token``."""
    zmq = _zmq()
    from zmq.utils import z85

    raw = hashlib.blake2b(token.encode(), digest_size=32, person=f"mnemo-zmq-{role}".encode()[:16]).digest()
    secret = z85.encode(raw)
    return zmq.curve_public(secret), secret


def _check_holder(name: object) -> str:
    if not isinstance(name, str) or not _HOLDER.match(name) or ".." in name.split("/"):
        msg = f"replication: holder name {name!r} is not a relative path of [A-Za-z0-9_.-] parts"
        raise ReplicationError(msg)
    return name


def _header(holder: str, gen: _snapstore.Generation) -> bytes:
    return json.dumps({"v": _VERSION, "holder": holder, "step": gen.step, "seq": gen.seq,
                       "meta_len": len(gen.meta), "data_len": len(gen.data),
                       "digest": gen.digest.hex()}).encode()


class ReplicaServer:
    """The agent's end of replication: stores pushed generations under ``root``, serves them back.

    Args:
        root: Folder (normally in ``/dev/shm``) of the replicas this node holds.
        token: The job's token (keys are derived from it).
        bind: ZeroMQ endpoint; port 0 picks a free one (see :attr:`endpoint`).
    """

    def __init__(self, root: str | Path, token: str, bind: str = "tcp://127.0.0.1:0") -> None:
        zmq = _zmq()
        from zmq.auth.thread import ThreadAuthenticator

        self.root = Path(root)
        self._zmq = zmq
        self._ctx = zmq.Context()
        spub, ssec = curve_keys(token, "server")
        cpub, _ = curve_keys(token, "client")
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()

        class _Allow:
            def callback(self, domain: str, key: bytes) -> bool:
                return key == cpub

        self._auth.configure_curve_callback("*", credentials_provider=_Allow())
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.curve_server = True
        self._sock.curve_publickey, self._sock.curve_secretkey = spub, ssec
        self._sock.linger = 0
        host = bind.rsplit(":", 1)[0]
        if bind.endswith(":0"):
            port = self._sock.bind_to_random_port(host)
            self.endpoint = f"{host}:{port}"
        else:
            self._sock.bind(bind)
            self.endpoint = bind
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: What each request did: ("put"|"get", holder, step or None, error or None).
        self.log: list[tuple[str, str, int | None, str | None]] = []

    def serve_once(self, timeout_ms: int = 100) -> bool:
        """Answer one request if one arrives within ``timeout_ms``; returns whether one did."""
        if not self._sock.poll(timeout_ms):
            return False
        frames = self._sock.recv_multipart(copy=False)
        head: Any = None
        try:
            head = json.loads(frames[0].bytes)
            if not isinstance(head, dict) or head.get("v") != _VERSION:
                msg = f"replication: header {bytes(frames[0].bytes)[:80]!r} is not version {_VERSION} JSON"
                raise ReplicationError(msg)
            holder = _check_holder(head.get("holder"))
            op = head.get("op", "put")
            if op == "get":
                gen = _snapstore.latest(self.root / holder)
                self._sock.send_multipart([_header(holder, gen), gen.meta, gen.data], copy=False)
                self.log.append(("get", holder, gen.step, None))
                return True
            if len(frames) != 3 or frames[1].buffer.nbytes != head.get("meta_len") \
                    or frames[2].buffer.nbytes != head.get("data_len"):
                msg = f"replication: put of {holder}: frame sizes do not match the header"
                raise ReplicationError(msg)
            step, expect = int(head["step"]), bytes.fromhex(str(head.get("digest")))
            stored = self._is_newer(holder, step, expect)
            if stored:
                _snapstore.write_generation(self.root / holder, step, frames[1].bytes, frames[2].buffer,
                                            expect=expect)
            self._sock.send(json.dumps({"ok": True, "stored": stored}).encode())
            self.log.append(("put", holder, step, None))
        except (ReplicationError, StateError, ValueError, KeyError, TypeError) as e:
            self._sock.send(json.dumps({"ok": False, "error": str(e)}).encode())
            self.log.append((str(head.get("op", "put")) if isinstance(head, dict) else "?",
                             str(head.get("holder")) if isinstance(head, dict) else "?", None, str(e)))
        return True

    def _is_newer(self, holder: str, step: int, expect: bytes) -> bool:
        """Whether a put of ``holder`` at ``step`` is to be stored (False: that very generation is held).

        Raises:
            ReplicationError: the newest verified generation held is at a later step, or at the
                same step with another digest.
        """
        base = self.root / holder
        top = _snapstore.newest_step(base)
        if top is None or step > top:  # the common case: decided from the headers, no payload read
            return True
        try:
            held = _snapstore.latest(base)
        except StateError:  # no slot passes its digest: nothing good to keep
            return True
        if step > held.step:
            return True
        if step == held.step and held.digest == expect:  # held and verified already: the frames are not needed
            return False
        if step == held.step:
            msg = (f"refused: holder {holder} already holds step {step} with digest {held.digest.hex()[:16]}...; "
                   f"offered step {step} has digest {expect.hex()[:16]}...")
        else:
            msg = f"refused: holder {holder} already holds step {held.step}; offered step {step} is not newer"
        raise ReplicationError(msg)

    def start(self) -> None:
        """Serve in a background thread until :meth:`close`."""

        def loop() -> None:
            while not self._stop.is_set():
                self.serve_once(50)

        self._thread = threading.Thread(target=loop, name="mnemosyne-replica-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the sockets (the stored replicas stay)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sock.close()
        self._auth.stop()
        self._ctx.term()


def _request(endpoint: str, token: str, frames: Sequence[Any], timeout: float) -> list[Any]:
    zmq = _zmq()
    spub, _ = curve_keys(token, "server")
    cpub, csec = curve_keys(token, "client")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    try:
        sock.linger = 0
        sock.curve_serverkey = spub
        sock.curve_publickey, sock.curve_secretkey = cpub, csec
        sock.connect(endpoint)
        sock.send_multipart(list(frames), copy=False)
        if not sock.poll(int(timeout * 1000)):
            msg = (f"replication peer {endpoint} did not answer within {timeout:g} s: it is down, or the "
                   "CURVE handshake failed (keys derived from a different job token)")
            raise ReplicationError(msg)
        return list(sock.recv_multipart(copy=False))
    finally:
        sock.close()


def push_generation(endpoint: str, token: str, holder: str, gen: _snapstore.Generation,
                    timeout: float = 10.0) -> bool:
    """Send ``gen`` to the peer at ``endpoint`` as its holder ``holder``; returns once stored.

    Returns:
        True when the peer stored it, False when it already held this generation (same step
        and digest; nothing written).

    Raises:
        ReplicationError: no answer in ``timeout`` (peer down, or a wrong key), or the peer
            refused (its reason is in the message: a digest mismatch, or a step that is not
            newer than the one it holds for ``holder``).
    """
    _check_holder(holder)
    reply = _request(endpoint, token, [_header(holder, gen), gen.meta, memoryview(gen.data)], timeout)
    ans = json.loads(reply[0].bytes)
    if not (isinstance(ans, dict) and ans.get("ok") is True):
        err = ans.get("error") if isinstance(ans, dict) else ans
        msg = f"replication peer {endpoint} refused {holder} (step {gen.step}): {err}"
        raise ReplicationError(msg)
    return ans.get("stored", True) is not False


def fetch_generation(endpoint: str, token: str, holder: str, timeout: float = 10.0) -> _snapstore.Generation:
    """The newest complete generation the peer at ``endpoint`` holds for ``holder``, verified.

    Raises:
        ReplicationError: no answer, or the peer has none (its reason in the message).
        CorruptStateError: the bytes received do not match the digest in the header.
    """
    _check_holder(holder)
    head = json.dumps({"v": _VERSION, "op": "get", "holder": holder}).encode()
    reply = _request(endpoint, token, [head], timeout)
    ans = json.loads(reply[0].bytes)
    if not isinstance(ans, dict) or "ok" in ans or len(reply) != 3:
        err = ans.get("error") if isinstance(ans, dict) else ans
        msg = f"replication peer {endpoint} has no generation of {holder}: {err}"
        raise ReplicationError(msg)
    meta, data = bytes(reply[1].bytes), bytearray(reply[2].buffer)
    dig = _snapstore.digest(meta, data)
    if dig.hex() != ans.get("digest"):
        msg = f"replica of {holder} from {endpoint}: blake2b digest mismatch; refused"
        raise CorruptStateError(msg)
    return _snapstore.Generation(int(ans["seq"]), int(ans["step"]), meta, data, dig,
                                 Path(f"{endpoint}/{holder}"))


def fetch_first(sources: Sequence[str | Path], token: str, holder: str, step: int | None = None,
                timeout: float = 10.0) -> tuple[_snapstore.Generation, str]:
    """The first verified generation of ``holder`` among ``sources``, in order, and where it came from.

    Recovery order for a holder: the local agent's copy (a folder path: ``<path>/<holder>``),
    then peers (``tcp://`` endpoints). A source that fails (absent, a digest mismatch, no
    answer, or a generation other than ``step`` when one is required) is skipped and the next
    one tried.

    Raises:
        StateError: no source gave one; the message names every source and its cause.
    """
    causes = []
    for src in sources:
        where = str(src)
        try:
            if where.startswith("tcp://"):
                gen = fetch_generation(where, token, holder, timeout)
            else:
                gen = _snapstore.latest(Path(src) / holder)
            if step is not None and gen.step != step:
                causes.append(f"{where}: holds step {gen.step}, expected step {step}")
                continue
            return gen, where
        except (ReplicationError, StateError) as e:
            causes.append(f"{where}: {e}")
    msg = f"no source has a usable snapshot of {holder}: " + "; ".join(causes)
    raise StateError(msg)


class Replicator:
    """The agent's sender: pushes each local holder's newest generation to its ring peers.

    Args:
        root: Folder of this node's holders (``<root>/<holder>.0|1``).
        holders: Holder names (relative to ``root``) of this node's ranks.
        peers: Endpoints of the ``k`` ring peers' :class:`ReplicaServer`.
        token: The job's token.
    """

    def __init__(self, root: str | Path, holders: Sequence[str], peers: Sequence[str], token: str) -> None:
        self.root = Path(root)
        self.holders = [_check_holder(h) for h in holders]
        self.peers = list(peers)
        self.token = token
        #: (holder, peer) -> seq of the newest generation that peer acknowledged.
        self.acked: dict[tuple[str, str], int] = {}

    def sync(self, timeout: float = 10.0) -> dict[str, str]:
        """Push what is new; returns ``{"holder@peer": error}`` for every push that failed.

        A holder's generation counts as replicated only once every peer acknowledged it
        (stored and verified); the peer keeps its previous complete one until then.
        """
        errors: dict[str, str] = {}
        for h in self.holders:
            try:
                gen = _snapstore.latest(self.root / h)
            except StateError:
                continue
            for p in self.peers:
                if self.acked.get((h, p), 0) >= gen.seq:
                    continue
                try:
                    push_generation(p, self.token, h, gen, timeout)
                    self.acked[(h, p)] = gen.seq
                except ReplicationError as e:
                    errors[f"{h}@{p}"] = str(e)
        return errors

    def replicated_seq(self, holder: str) -> int | None:
        """Generation number of ``holder`` that every peer acknowledged, if any."""
        if not self.peers:
            return None
        seqs = [self.acked.get((holder, p), 0) for p in self.peers]
        return min(seqs) or None
