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

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from mnemosyne.ccl import _wire
from mnemosyne.core.env import MNEMOSYNE_JOB_ID, MNEMOSYNE_TOKEN
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
# A blocking get/wait without a timeout still ends: a client that vanished must not pin
# a waiter forever. Clients always send their own, shorter, timeout.
_MAX_WAIT_S = 3600.0


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


def _err(exc: MnemosyneError) -> dict[str, Any]:
    return {"ok": False, "error": type(exc).__name__, "msg": str(exc)}


def _str_field(req: dict[str, Any], name: str) -> str:
    value = req.get(name)
    if not isinstance(value, str):
        msg = f"store request {req.get('op')!r}: field {name!r} must be a string, got {type(value).__name__}"
        raise ProtocolError(msg)
    return value


def _keys_field(req: dict[str, Any]) -> list[str]:
    keys = req.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        msg = f"store request {req.get('op')!r}: field 'keys' must be a list of strings"
        raise ProtocolError(msg)
    return keys


def _timeout_field(req: dict[str, Any]) -> float:
    value = req.get("timeout")
    if value is None:
        return _MAX_WAIT_S
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        msg = f"store request {req.get('op')!r}: 'timeout' must be a number >= 0 or null, got {value!r}"
        raise ProtocolError(msg)
    return min(float(value), _MAX_WAIT_S)


def _int_field(req: dict[str, Any], name: str) -> int:
    value = req.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        msg = f"store request {req.get('op')!r}: field {name!r} must be an integer, got {value!r}"
        raise ProtocolError(msg)
    return value


class StoreServer:
    """An asyncio TCP key-value store for one or more jobs.

    Args:
        host: Address to bind; loopback by default. Bind another address only on a
            trusted network: the token is the only protection.
        port: Port to bind; 0 picks a free one (read :attr:`port` after :meth:`start`).
        jobs: Job id -> token for every job this server accepts. More can be added with
            :meth:`add_job`.

    Example:
        >>> srv = StoreServer(jobs={"j": "secret"}).start()
        >>> srv.port > 0
        True
        >>> srv.stop()
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, jobs: dict[str, str] | None = None) -> None:
        self.host = host
        self.port = port
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

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        conn = _Conn()
        try:
            while True:
                try:
                    prefix = await reader.readexactly(_wire.PREFIX_SIZE)
                except asyncio.IncompleteReadError:
                    return  # client closed
                try:
                    hlen, blen = _wire.check_prefix(prefix)
                    header = _wire.decode_header(await reader.readexactly(hlen))
                    body = await reader.readexactly(blen) if blen else b""
                    answer, out = await self._dispatch(conn, header, body)
                except (ProtocolError, StaleEpochError) as exc:
                    # Foreign, malformed or fenced-off peer: answer once, then hang up.
                    writer.write(_wire.encode(_err(exc)))
                    await writer.drain()
                    logger.warning("store: closing connection from %s: %s", writer.get_extra_info("peername"), exc)
                    return
                except MnemosyneError as exc:
                    answer, out = _err(exc), b""
                writer.write(_wire.encode(answer, out))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
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
            try:
                value = int(data.get(key, b"0")) + _int_field(req, "amount")
            except ValueError:
                msg = f"store add on key {key!r}: the stored value {data[key][:40]!r} is not an integer"
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
    """Run a store server in the foreground until SIGINT/SIGTERM (``python -m``)."""
    parser = argparse.ArgumentParser(prog="mnemosyne.ccl.store_server", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the server's options to ``parser`` (shared by ``mnemo store``)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)")
    parser.add_argument("--job", default=os.environ.get(MNEMOSYNE_JOB_ID), help="job id (or MNEMOSYNE_JOB_ID)")
    parser.add_argument("--token-file", help="file holding the job token; created (mode 0600) if missing; "
                        "default: MNEMOSYNE_TOKEN, else a fresh token printed once")


def _read_or_make_token(path: str | None) -> tuple[str, bool]:
    if path:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                token = fh.read().strip()
            if not token:
                msg = f"token file {path} is empty"
                raise ConfigError(msg)
            return token, False
        token = secrets.token_hex(16)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        return token, False
    env = os.environ.get(MNEMOSYNE_TOKEN)
    if env:
        return env, False
    return secrets.token_hex(16), True


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; print ``listening <host:port>`` once bound (for launchers)."""
    if not args.job:
        msg = "--job (or MNEMOSYNE_JOB_ID) is required"
        raise ConfigError(msg)
    token, fresh = _read_or_make_token(args.token_file)
    server = StoreServer(args.host, args.port, {args.job: token}).start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"listening {server.address} job {args.job}", flush=True)
    if fresh:
        print(f"token {token}", flush=True)
    try:
        while not done.wait(1.0):
            pass
    finally:
        server.stop()
    print("store stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
