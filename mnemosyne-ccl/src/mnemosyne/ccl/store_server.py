"""The persistent bootstrap store: a server that runs outside every trainer.

One :class:`StoreServer` serves one or more jobs. It is started by the launcher (in a
thread with :meth:`StoreServer.start`, or as its own process with ``mnemo store`` /
``python -m mnemosyne.ccl.store_server``) and outlives every rank, so that survivors and
replacements bootstrap repaired communicators from it without any rank hosting it.

Security and isolation:

* It binds to loopback unless told otherwise.
* Every connection starts with a ``hello`` naming its job and presenting that job's
  token (compared in constant time); a wrong job or token is refused with
  :class:`~mnemosyne.core.errors.AuthError` and the connection is closed. After the
  hello, every key the connection names lives in its job's own namespace.
* Frames are JSON headers plus raw bytes (see ``_wire``); nothing is ever unpickled.
* A malformed or oversized frame gets a :class:`~mnemosyne.core.errors.ProtocolError`
  answer and the connection is closed; a blocking ``get``/``wait`` always has a
  deadline. Nothing a client sends can make the server hang or another client fail.

Fencing: a job carries a monotonic *fence epoch* (advanced by any of its clients with
the ``fence`` operation). A client that declares an epoch in its hello is refused with
:class:`~mnemosyne.core.errors.StaleEpochError` when that epoch is older than the fence,
and its writes are refused once the fence passes it, so a zombie from an old epoch (a
rank that was SIGSTOPped and resumed) cannot write into the repaired job's keys. A job
may also declare its world size at hello; a client naming another size is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from mnemosyne.ccl import _wire
from mnemosyne.ccl._store_fields import err as _err
from mnemosyne.ccl._store_fields import int_field as _int_field
from mnemosyne.ccl._store_fields import keys_field as _keys_field
from mnemosyne.ccl._store_fields import str_field as _str_field
from mnemosyne.ccl._store_fields import timeout_field as _timeout_field
from mnemosyne.core.errors import (
    AuthError,
    ConfigError,
    MnemosyneError,
    ProtocolError,
    StaleEpochError,
    StoreError,
    StoreTimeout,
)

__all__ = ["DEFAULT_PORT", "StoreServer", "main"]

logger = logging.getLogger(__name__)

#: Port used by ``mnemo store`` when none is given (0 asks the OS for a free one).
DEFAULT_PORT = 29700
#: Seconds a new connection has to complete its hello; a silent one is closed after it.
HELLO_TIMEOUT = 3.0
#: Largest header of a frame before the hello was accepted (a hello is ~200 bytes and has
#: no body): nothing large is ever read from an unauthenticated peer.
MAX_PREAUTH_HEADER = 4096
#: Connections served at once; more are closed at accept.
MAX_CONNECTIONS = 1000
#: Connections of one peer address still in their hello; a newer one evicts the oldest,
#: so a flood cannot keep a legitimate client of the same host out.
MAX_PREAUTH_PER_PEER = 64
#: Seconds a connection may stay idle between requests (None: forever), and a frame may
#: take to arrive once its first bytes came.
IDLE_TIMEOUT = 3600.0
FRAME_TIMEOUT = 30.0
# add amounts beyond int64 are refused (as torch's store does); bigger ints would also be
# slow to format.
_MAX_ADD = 1 << 63


@dataclass
class _Job:
    token: str
    data: dict[str, bytes] = field(default_factory=dict)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    fence: int = 0
    world_size: int | None = None

    def changed(self) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_result(None)
        self.waiters.clear()


@dataclass
class _Conn:
    job: _Job | None = None
    job_id: str = ""
    epoch: int | None = None


class StoreServer:
    """An asyncio TCP key-value store for one or more jobs.

    Args:
        host: Address to bind; loopback by default. Bind another address only on a
            trusted network: the token is the only protection.
        port: Port to bind; 0 picks a free one (read :attr:`port` after :meth:`start`).
        jobs: Job id -> token for every job this server accepts. More can be added with
            :meth:`add_job`.
        hello_timeout: Seconds a connection has to complete its hello.
        idle_timeout: Seconds an authenticated connection may wait between requests
            (None: no limit).
        max_connections: Connections served at once (more are closed at accept).
        max_preauth_per_peer: Unauthenticated connections per peer address; a newer one
            evicts the oldest.

    Example:
        >>> srv = StoreServer(jobs={"j": "secret"}).start()
        >>> srv.port > 0
        True
        >>> srv.stop()
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, jobs: dict[str, str] | None = None, *,
                 hello_timeout: float = HELLO_TIMEOUT, idle_timeout: float | None = IDLE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS, max_preauth_per_peer: int = MAX_PREAUTH_PER_PEER) -> None:
        self.host = host
        self.port = port
        self.hello_timeout = hello_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_preauth_per_peer = max_preauth_per_peer
        self._preauth: dict[str, list[asyncio.StreamWriter]] = {}
        self._jobs: dict[str, _Job] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        for job, token in (jobs or {}).items():
            self.add_job(job, token)

    @property
    def address(self) -> str:
        """``host:port`` to give clients (``MNEMOSYNE_STORE_ADDR``)."""
        return f"{self.host}:{self.port}"

    def add_job(self, job: str, token: str) -> None:
        """Accept clients of ``job`` presenting ``token`` (thread-safe before and after start)."""
        if not job or "/" in job:
            msg = f"job id must be non-empty and contain no '/', got {job!r}"
            raise ConfigError(msg)
        if not token:
            msg = f"job {job!r}: token must be non-empty"
            raise ConfigError(msg)

        def _add() -> None:
            if job in self._jobs and self._jobs[job].token != token:
                msg = f"job {job!r} is already served with another token"
                raise ConfigError(msg)
            self._jobs.setdefault(job, _Job(token))

        if self._loop is not None and self._loop.is_running() and threading.current_thread() is not self._thread:
            fut = asyncio.run_coroutine_threadsafe(self._call(_add), self._loop)
            fut.result(timeout=10)
        else:
            _add()

    @staticmethod
    async def _call(fn: Any) -> None:
        fn()

    # -- lifecycle ---------------------------------------------------------------

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def start(self) -> StoreServer:
        """Serve from a daemon thread; return once the port is bound.

        Raises:
            StoreError: The address could not be bound.
        """
        ready = threading.Event()
        failure: list[BaseException] = []

        def _run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except OSError as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            assert self._stopped is not None
            loop.run_until_complete(self._stopped.wait())
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=_run, name="mnemosyne-store", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            msg = "store server did not start within 30 s"
            raise StoreError(msg)
        if failure:
            msg = f"store server could not bind {self.host}:{self.port}: {failure[0]}"
            raise StoreError(msg)
        logger.info("store serving %d job(s) on %s", len(self._jobs), self.address)
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for job in self._jobs.values():
            for fut in job.waiters:
                if not fut.done():
                    fut.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def stop(self) -> None:
        """Stop serving and close every connection (clients then get a StoreError)."""
        loop, stopped = self._loop, self._stopped
        if loop is None or stopped is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(stopped.set)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> StoreServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- protocol ----------------------------------------------------------------

    def _admit(self, writer: asyncio.StreamWriter) -> str | None:
        """Register a new connection; return its peer host, or None when it was refused."""
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if len(self._writers) >= self.max_connections:
            logger.warning("store: refusing a connection from %s: %d connections open (max %d)", host,
                           len(self._writers), self.max_connections)
            writer.close()
            return None
        waiting = self._preauth.setdefault(host, [])
        if len(waiting) >= self.max_preauth_per_peer:
            oldest = waiting.pop(0)  # a flood must not keep a legitimate client out: evict its oldest
            logger.warning("store: %s has %d connections without a hello; closing the oldest", host, len(waiting) + 1)
            oldest.close()
        waiting.append(writer)
        self._writers.add(writer)
        return host

    def _authed(self, host: str, writer: asyncio.StreamWriter) -> None:
        waiting = self._preauth.get(host, [])
        if writer in waiting:
            waiting.remove(writer)
        if not waiting:
            self._preauth.pop(host, None)

    async def _read_frame(self, reader: asyncio.StreamReader, conn: _Conn) -> tuple[dict[str, Any], bytes] | None:
        """One frame, under the connection's deadlines; None when the client closed.

        Before the hello the whole frame must arrive within ``hello_timeout`` and be small;
        after it, the first bytes within ``idle_timeout`` and the rest within FRAME_TIMEOUT.

        Raises:
            ProtocolError: Malformed, too large, or too slow.
        """
        authed = conn.job is not None
        first = None if authed and self.idle_timeout is None else (self.idle_timeout if authed else
                                                                     self.hello_timeout)
        try:
            prefix = await asyncio.wait_for(reader.readexactly(_wire.PREFIX_SIZE), first)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                msg = f"store frame truncated: {len(exc.partial)} of {_wire.PREFIX_SIZE} prefix bytes"
                raise ProtocolError(msg) from None
            return None
        except asyncio.TimeoutError:
            what = "idle" if authed else "silent before its hello"
            msg = f"store connection {what} for {first:g} s; closing it"
            raise ProtocolError(msg) from None
        hlen, blen = _wire.check_prefix(prefix)
        if not authed and (hlen > MAX_PREAUTH_HEADER or blen):
            msg = (f"store frame of {hlen} + {blen} B before hello: an unauthenticated connection may send "
                   f"only a hello (header <= {MAX_PREAUTH_HEADER} B, no body)")
            raise ProtocolError(msg)
        rest = self.hello_timeout if not authed else FRAME_TIMEOUT
        try:
            raw = await asyncio.wait_for(reader.readexactly(hlen + blen), rest)
        except asyncio.IncompleteReadError as exc:
            msg = f"store frame truncated: {len(exc.partial)} of {hlen + blen} bytes"
            raise ProtocolError(msg) from None
        except asyncio.TimeoutError:
            msg = f"store frame of {hlen + blen} B did not arrive within {rest:g} s"
            raise ProtocolError(msg) from None
        return _wire.decode_header(raw[:hlen]), raw[hlen:]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host = self._admit(writer)
        if host is None:
            return
        conn = _Conn()
        try:
            while True:
                try:
                    frame = await self._read_frame(reader, conn)
                    if frame is None:
                        return  # client closed
                    was_authed = conn.job is not None
                    answer, out = await self._dispatch(conn, *frame)
                    if not was_authed and conn.job is not None:
                        self._authed(host, writer)
                except (ProtocolError, StaleEpochError) as exc:
                    # Foreign, malformed, slow or fenced-off peer: answer once, then hang up.
                    writer.write(_wire.encode(_err(exc)))
                    await asyncio.wait_for(writer.drain(), FRAME_TIMEOUT)
                    logger.warning("store: closing connection from %s: %s", host, exc)
                    return
                except MnemosyneError as exc:
                    answer, out = _err(exc), b""
                except (asyncio.CancelledError, ConnectionError):
                    raise
                except Exception as exc:  # a bug or an odd request must never kill the server's handler
                    logger.exception("store: request from %s failed", host)
                    writer.write(_wire.encode(_err(StoreError(f"internal error: {type(exc).__name__}: {exc}"))))
                    await asyncio.wait_for(writer.drain(), FRAME_TIMEOUT)
                    return
                writer.write(_wire.encode(answer, out))
                await asyncio.wait_for(writer.drain(), FRAME_TIMEOUT)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            return
        finally:
            self._authed(host, writer)
            self._writers.discard(writer)
            writer.close()

    async def _dispatch(self, conn: _Conn, req: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        op = req.get("op")
        if op == "hello":
            return self._hello(conn, req), b""
        job = conn.job
        if job is None:
            msg = f"store request {op!r} before hello: a connection must first name its job and token"
            raise AuthError(msg)
        if op in ("set", "add", "cas", "delete") and conn.epoch is not None and conn.epoch < job.fence:
            msg = (f"job {conn.job_id!r}: this client declared epoch {conn.epoch} but the job is fenced at "
                   f"epoch {job.fence}; writes from an older epoch are refused")
            raise StaleEpochError(msg)
        data = job.data
        if op == "set":
            data[_str_field(req, "key")] = body
            job.changed()
            return {"ok": True}, b""
        if op == "get":
            key = _str_field(req, "key")
            await self._wait_keys(job, [key], _timeout_field(req))
            return {"ok": True}, data[key]
        if op == "add":
            key = _str_field(req, "key")
            amount = _int_field(req, "amount")
            if not -_MAX_ADD <= amount < _MAX_ADD:
                msg = f"store add on key {key!r}: an amount of {amount.bit_length()} bits is outside the 64-bit range"
                raise StoreError(msg)
            try:
                value = int(data.get(key, b"0")) + amount
            except ValueError:
                msg = f"store add on key {key!r}: the stored value {data.get(key, b'')[:40]!r} is not an integer"
                raise StoreError(msg) from None
            data[key] = str(value).encode()
            job.changed()
            return {"ok": True, "value": value}, b""
        if op == "cas":
            key = _str_field(req, "key")
            elen = _int_field(req, "elen")
            if not 0 <= elen <= len(body):
                msg = f"store cas: 'elen' {elen} is outside the body (length {len(body)})"
                raise ProtocolError(msg)
            expected, desired = body[:elen], body[elen:]
            current = data.get(key)
            if (current is None and expected == b"") or current == expected:
                data[key] = desired
                job.changed()
                return {"ok": True}, desired
            return {"ok": True}, current if current is not None else b""
        if op == "wait":
            await self._wait_keys(job, _keys_field(req), _timeout_field(req))
            return {"ok": True}, b""
        if op == "check":
            return {"ok": True, "value": all(k in data for k in _keys_field(req))}, b""
        if op == "delete":
            existed = data.pop(_str_field(req, "key"), None) is not None
            return {"ok": True, "value": existed}, b""
        if op == "fence":
            epoch = _int_field(req, "epoch")
            job.fence = max(job.fence, epoch)
            return {"ok": True, "value": job.fence}, b""
        if op == "epoch":
            conn.epoch = _int_field(req, "epoch")
            if conn.epoch < job.fence:
                msg = f"job {conn.job_id!r}: epoch {conn.epoch} is older than the job's fence epoch {job.fence}"
                raise StaleEpochError(msg)
            return {"ok": True, "value": job.fence}, b""
        if op == "ping":
            return {"ok": True, "value": len(data)}, b""
        msg = f"unknown store operation {op!r}"
        raise ProtocolError(msg)

    def _hello(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("version") != _wire.PROTOCOL_VERSION:
            msg = (f"store protocol version {req.get('version')!r} not supported "
                   f"(server speaks {_wire.PROTOCOL_VERSION})")
            raise ProtocolError(msg)
        job_id = _str_field(req, "job")
        token = _str_field(req, "token")
        job = self._jobs.get(job_id)
        # Same answer for unknown job and wrong token: a probe learns nothing about job ids.
        if job is None or not hmac.compare_digest(job.token.encode(), token.encode()):
            msg = f"store refused job {job_id!r}: unknown job or wrong token"
            raise AuthError(msg)
        size = req.get("world_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                msg = f"store hello: 'world_size' must be a positive integer, got {size!r}"
                raise ProtocolError(msg)
            if job.world_size is None:
                job.world_size = size
            elif job.world_size != size:
                msg = f"job {job_id!r} has world size {job.world_size}; this client declared {size}"
                raise ConfigError(msg)
        epoch = req.get("epoch")
        if epoch is not None:
            if not isinstance(epoch, int) or isinstance(epoch, bool):
                msg = f"store hello: 'epoch' must be an integer, got {epoch!r}"
                raise ProtocolError(msg)
            if epoch < job.fence:
                msg = f"job {job_id!r}: epoch {epoch} is older than the job's fence epoch {job.fence}"
                raise StaleEpochError(msg)
        conn.job, conn.job_id, conn.epoch = job, job_id, epoch
        return {"ok": True, "fence": job.fence}

    async def _wait_keys(self, job: _Job, keys: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while not all(k in job.data for k in keys):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [k for k in keys if k not in job.data]
                msg = f"store keys {missing} did not appear within {timeout:g} s"
                raise StoreTimeout(msg)
            fut: asyncio.Future[None] = loop.create_future()
            job.waiters.append(fut)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(fut, left)


def main(argv: list[str] | None = None) -> int:
    """Run a store server in the foreground until SIGINT/SIGTERM (``python -m``; ``mnemo store``'s options)."""
    from mnemosyne.ccl._store_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
