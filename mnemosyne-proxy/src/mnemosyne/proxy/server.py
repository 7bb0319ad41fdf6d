"""The proxy process: owns an arena, keeps the handle table and its log, serves clients.

One thread, one ``selectors`` loop. Connections arrive on a Unix socket (mode 0600, in a
0700 directory, peers must run as the same user) and optionally on a TCP port that only
serves read-only peer requests. The first message on a connection must be ``Hello`` with
the job's token; anything else, a wrong token, another job, or a malformed frame gets an
``Error`` reply and the connection is closed; the proxy keeps running and its state is
untouched.

Every state-changing request is handled by computing its log record, appending it (one
write) and applying it to the table, then replying (see
:class:`~mnemosyne.proxy._generated.stubs.ServerDispatch`). A trainer's per-step
``begin_update``/``commit`` markers do not come over the socket: the trainer writes them to
the proxy's marker page (:mod:`mnemosyne.proxy.markers`) and the proxy records them into the
log whenever it reads the page (:meth:`ProxyServer.sync_markers`): before answering a status,
table, checksum, pull, allocate, free or name request, when a connection closes (a trainer
that dies closes its connection) and at shutdown.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from mnemosyne.core.errors import AuthError, ConfigError, ProtocolError, StateError
from mnemosyne.proxy._connections import HELLO_TIMEOUT, Conn, ConnectionLoop, split_listen
from mnemosyne.proxy._generated.messages import (
    Allocate,
    AllocateReply,
    BeginUpdate,
    Checksum,
    ChecksumReply,
    Commit,
    Free,
    Hello,
    Map,
    MapReply,
    Markers,
    MarkersReply,
    Message,
    Name,
    Ok,
    Pull,
    PullReply,
    Read,
    ReadReply,
    RecAlloc,
    RecBase,
    RecBegin,
    RecCommit,
    RecFree,
    RecName,
    RecOpen,
    RecRestore,
    SetBase,
    Shutdown,
    Space,
    Status,
    StatusReply,
    Table,
    TableReply,
    Welcome,
)
from mnemosyne.proxy._generated.stubs import ServerDispatch
from mnemosyne.proxy.arena import Arena, load_arena
from mnemosyne.proxy.journal import Journal
from mnemosyne.proxy.markers import PAGE_SIZE, MarkerPage, pack, unpack
from mnemosyne.proxy.table import HandleTable

__all__ = ["COMPACT_EVERY", "HELLO_TIMEOUT", "LOCK_NAME", "ROLES", "ProxyServer"]

logger = logging.getLogger(__name__)

#: Who may connect, and what each role may ask.
ROLES = ("trainer", "peer", "admin")
_PEER_REQUESTS = (Hello, Map, Table, Status, Checksum, Read)
#: Rewrite the log as one snapshot record after this many appended records.
COMPACT_EVERY = 100_000
#: Largest chunk a network peer may read at once.
MAX_READ = 16 * 1024 * 1024
#: Lock file held by the proxy serving a state directory.
LOCK_NAME = "proxy.lock"


class ProxyServer(ServerDispatch, ConnectionLoop):
    """A device proxy.

    Args:
        state_dir: Folder for the socket, log and token (created 0700).
        arena: Arena backend name (``host``, ``cuda``).
        capacity: Bytes of the arena's main space.
        device: Device index (-1 for the host arena).
        job: Job id clients must present.
        token: Job token; read from ``state_dir/token`` or generated there when None.
        peer_listen: ``HOST:PORT`` to serve network peers on (port 0 picks one; the actual
            address is written to ``state_dir/peer.addr``), or None.
        host_capacity: Bytes of the side host space of a cuda arena.
    """

    def __init__(self, state_dir: str | os.PathLike[str], arena: str = "host", capacity: int = 1 << 30,
                 device: int = -1, job: str = "", token: str | None = None, peer_listen: str | None = None,
                 host_capacity: int = 1 << 20) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        owner = os.lstat(self.state_dir).st_uid
        if owner != os.getuid() or self.state_dir.is_symlink():
            msg = (f"proxy state directory {self.state_dir} belongs to uid {owner} (or is a symlink); the proxy "
                   f"runs as uid {os.getuid()} and keeps its token there: use a directory of your own")
            raise ConfigError(msg)
        os.chmod(self.state_dir, 0o700)
        self._lock_fd = self._lock_state_dir()
        self.job = job
        self.token = self._load_token(token)
        self.arena_name = arena
        self.capacity = capacity
        self.device = device
        self.host_capacity = host_capacity
        self.peer_listen = peer_listen
        if peer_listen is not None:
            split_listen(peer_listen)  # refuse a bad address before any file is touched
        self.journal = Journal(self.state_dir / "proxy.log")
        self.table = HandleTable([])
        self.arena: Arena | None = None
        ConnectionLoop.__init__(self, self.state_dir)
        self.markers: MarkerPage | None = None
        self._markers_fd = -1
        self._marks_seen = (0, 0)

    # ---- lifecycle -----------------------------------------------------------------------
    def _lock_state_dir(self) -> int:
        """Hold ``state_dir/proxy.lock`` (flock) for the proxy's life: one proxy per directory.

        Raises:
            ConfigError: Another live proxy holds it (names its pid).
        """
        path = self.state_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            msg = (f"another proxy (pid {holder}) already serves {self.state_dir}; stop it or give this one "
                   "another --state-dir (two proxies would fight over its socket and log)")
            raise ConfigError(msg) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _load_token(self, token: str | None) -> str:
        path = self.state_dir / "token"
        if token:
            return token
        if path.is_file():
            return path.read_text().strip()
        token = secrets.token_hex(16)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        return token

    def start(self) -> None:
        """Replay the log, create the arena, open the log, bind the sockets."""
        t0 = time.perf_counter()
        n = 0
        for rec in self.journal.replay():
            self.table.apply(rec)
            n += 1
        cls = load_arena(self.arena_name)
        try:
            self.arena = cls(self.capacity, self.device, self.host_capacity)
        except (OSError, OverflowError, MemoryError) as exc:
            msg = (f"cannot create a {self.arena_name} arena of {self.capacity} bytes "
                   f"({self.capacity / (1 << 30):.1f} GiB): {exc}; pick a smaller --size")
            raise ConfigError(msg) from None
        spaces = self.arena.spaces
        # Compact: the replayed history becomes one snapshot, then this generation opens.
        self.journal.rewrite([self.table.snapshot()] if self.table.entries or n else [])
        self._log(RecOpen(self.table.generation + 1, self.arena_name, self.device, [s.capacity for s in spaces]))
        self.markers, self._markers_fd = MarkerPage.create()
        self.reset_markers()
        logger.info("proxy generation %d: %s arena, %d space(s) %s, %d log record(s) replayed in %.3f s, status %s",
                    self.table.generation, self.arena_name, len(spaces), [s.capacity for s in spaces], n,
                    time.perf_counter() - t0, self.table.status.value)
        self._bind_unix()
        if self.peer_listen:
            self._bind_tcp(self.peer_listen)

    def close(self) -> None:
        """Record the last markers, close every socket, the log, the marker page and the arena."""
        if self.markers is not None:
            with contextlib.suppress(Exception):  # a corrupt table must not keep the proxy from stopping
                self.sync_markers()
            self.markers.close()
            os.close(self._markers_fd)
            self.markers = None
        ConnectionLoop.close(self)
        self.journal.close()
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # ---- requests ------------------------------------------------------------------------
    def _respond(self, conn: Conn, request: Message) -> Message:
        self._authorize(conn, request)
        return self.dispatch(request, conn)

    def _dropped(self, conn: Conn) -> None:
        if conn.role == "trainer":  # it may have died: record where its markers stand
            self.sync_markers()

    def _authorize(self, conn: Conn, request: Message) -> None:
        if not conn.authed and not isinstance(request, Hello):
            msg = f"first message must be Hello with the job token, got {type(request).__name__}"
            raise AuthError(msg)
        if conn.authed and isinstance(request, Hello):
            msg = "Hello was already accepted on this connection"
            raise ProtocolError(msg)
        if conn.authed and conn.role == "peer" and not isinstance(request, _PEER_REQUESTS):
            msg = f"a peer connection may not send {type(request).__name__} (peers only read)"
            raise AuthError(msg)

    # ---- the log -------------------------------------------------------------------------
    def append_record(self, record: Message) -> None:
        """Append to the log (compacting it now and then)."""
        self.journal.append(record)

    def apply_record(self, record: Message) -> None:
        """Apply to the table; compact the log when it grew long."""
        self.table.apply(record)
        if self.journal.appended >= COMPACT_EVERY:
            self.journal.rewrite([self.table.snapshot()])

    def _log(self, record: Message) -> None:
        self.append_record(record)
        self.apply_record(record)

    # ---- the marker page -----------------------------------------------------------------
    def sync_markers(self) -> None:
        """Record into the log what the trainer marked on the page since the last look.

        A new commit word is logged as ``RecCommit``; a begin word that differs from the
        commit word (an update is open, or the commit is still pending on the device) as
        ``RecBegin``: TORN. ``begin(k+1)`` written while ``commit(k)`` is still pending reads as
        TORN (update ``k+1``): conservative, since the page cannot tell whether step ``k``
        finished.
        """
        if self.markers is None:
            return
        b, c = self.markers.read()
        seen_b, seen_c = self._marks_seen
        if (b, c) == (seen_b, seen_c):
            return
        self._marks_seen = (b, c)
        if c != seen_c:
            self._log(RecCommit(unpack(c)[1]))
        if b != c:
            self._log(RecBegin(unpack(b)[1]))

    def reset_markers(self) -> None:
        """Write the log's status onto the page (only while no trainer writes markers)."""
        if self.markers is None:
            return
        b, c = self.markers.read()
        ordinal = max(unpack(b)[0], unpack(c)[0]) + 1
        st = self.table.status_reply()
        step = st.step if 0 <= st.step < (1 << 32) - 1 else -1
        commit = pack(ordinal, step)
        begin = commit
        if st.update_step >= 0:  # an update is open: the page must read torn too
            begin = pack(ordinal + 1, st.update_step if st.update_step < (1 << 32) - 1 else -1)
        self.markers.set(begin, commit)
        self._marks_seen = (begin, commit)

    def dispatch(self, request: Message, ctx: Any) -> Message:
        """Handle one request; afterwards put the page in line with the log where the log moved on."""
        if not isinstance(request, (BeginUpdate, Commit, Pull)):
            return super().dispatch(request, ctx)
        try:
            return super().dispatch(request, ctx)
        finally:
            # A socket begin/commit or a pull changed the status without the page; the caller
            # is the trainer itself (blocked in this request), so nobody writes the page now.
            self.reset_markers()

    # ---- handlers ------------------------------------------------------------------------
    def _arena(self) -> Arena:
        if self.arena is None:
            msg = "the proxy has no arena (not started or already closed)"
            raise StateError(msg)
        return self.arena

    def handle_hello(self, request: Hello, ctx: Any) -> Welcome:
        """Check the token and job; remember the role."""
        conn: Conn = ctx
        if not hmac.compare_digest(request.token.encode(), self.token.encode()):
            msg = "wrong job token: this proxy serves another job or the token is stale"
            raise AuthError(msg)
        if request.job != self.job:
            msg = f"job {request.job!r} does not match this proxy's job {self.job!r}"
            raise AuthError(msg)
        if request.role not in ROLES:
            msg = f"unknown role {request.role!r}; expected one of {ROLES}"
            raise AuthError(msg)
        if request.role != "peer" and not conn.unix:
            msg = "only peers may connect over TCP; trainers use the Unix socket"
            raise AuthError(msg)
        conn.authed, conn.role, conn.pid = True, request.role, request.pid
        return Welcome(os.getpid(), self.job, self.arena_name, self.device, self.table.generation)

    def handle_map(self, request: Map, ctx: Any) -> MapReply:
        """Send the arena's descriptors (read-only ones to peers)."""
        conn: Conn = ctx
        if not conn.unix:
            msg = "memory descriptors can only be passed over the Unix socket"
            raise ConfigError(msg)
        arena = self._arena()
        conn.fds_out = arena.export_fds(read_only=conn.role == "peer")
        spaces = [Space(i, s.kind, s.device, s.capacity, self.table.bases[i] if i < len(self.table.bases) else 0)
                  for i, s in enumerate(arena.spaces)]
        return MapReply(spaces)

    def handle_markers(self, request: Markers, ctx: Any) -> MarkersReply:
        """Hand out the marker page (a new trainer: record the old one's markers, then reset)."""
        conn: Conn = ctx
        if not conn.unix or self.markers is None:
            msg = "the marker page can only be passed over the Unix socket of a running proxy"
            raise ConfigError(msg)
        self.sync_markers()
        self.reset_markers()
        conn.fds_out = [os.dup(self._markers_fd)]
        return MarkersReply(PAGE_SIZE)

    def handle_set_base(self, request: SetBase, ctx: Any) -> tuple[Ok, RecBase | None]:
        """Remember where a client mapped a space."""
        if not 0 <= request.space < len(self.table.capacities):
            msg = f"memory space {request.space} does not exist"
            raise ConfigError(msg)
        if self.table.bases[request.space] == request.base:
            return Ok(), None
        return Ok(), RecBase(request.space, request.base)

    def handle_allocate(self, request: Allocate, ctx: Any) -> tuple[AllocateReply, RecAlloc | None]:
        """Find the named entry or plan a new one."""
        self.sync_markers()  # whether an update is open decides what a new state tensor means
        if request.name:
            found = self.table.lookup(request.name)
            if found is not None:
                same = (found.space, found.dtype, list(found.shape), found.nbytes) == (
                    request.space, request.dtype, list(request.shape), request.nbytes)
                if not same:
                    msg = (f"tensor {request.name!r} exists as space={found.space} {found.dtype}{list(found.shape)} "
                           f"({found.nbytes} bytes); asked for space={request.space} "
                           f"{request.dtype}{list(request.shape)} ({request.nbytes} bytes)")
                    raise StateError(msg)
                return AllocateReply(found, False), None
        entry = self.table.plan_alloc(request.name, request.space, request.dtype, request.shape, request.nbytes)
        return AllocateReply(entry, True), RecAlloc(entry)

    def handle_free(self, request: Free, ctx: Any) -> tuple[Ok, RecFree | None]:
        """Release an allocation."""
        self.sync_markers()
        if request.handle not in self.table.entries:
            msg = f"handle {request.handle} is not allocated"
            raise StateError(msg)
        return Ok(), RecFree(request.handle)

    def handle_name(self, request: Name, ctx: Any) -> tuple[Ok, RecName | None]:
        """Name an anonymous allocation."""
        self.sync_markers()
        entry = self.table.entries.get(request.handle)
        if entry is None or entry.name or not request.name or request.name in self.table.by_name:
            msg = f"cannot name handle {request.handle} {request.name!r}: unknown handle, already named, or name taken"
            raise StateError(msg)
        return Ok(), RecName(request.handle, request.name)

    def handle_table(self, request: Table, ctx: Any) -> TableReply:
        """The whole table."""
        self.sync_markers()
        return TableReply(self.table.status_reply(), sorted(self.table.entries.values(), key=lambda e: e.handle))

    def handle_begin_update(self, request: BeginUpdate, ctx: Any) -> tuple[Ok, RecBegin | None]:
        """Mark the start of an in-place update."""
        self.sync_markers()
        pack(0, request.step)  # raises for a step the marker page could not hold
        return Ok(), RecBegin(request.step)

    def handle_commit(self, request: Commit, ctx: Any) -> tuple[Ok, RecCommit | None]:
        """Mark a completed update."""
        self.sync_markers()
        pending = self.table.status_reply().update_step
        if pending != request.step:
            msg = f"commit({request.step}) without a matching begin_update (pending update: {pending})"
            raise StateError(msg)
        return Ok(), RecCommit(request.step)

    def handle_status(self, request: Status, ctx: Any) -> StatusReply:
        """The commit status."""
        self.sync_markers()
        return self.table.status_reply()

    def handle_checksum(self, request: Checksum, ctx: Any) -> ChecksumReply:
        """Checksum allocations where they live."""
        self.sync_markers()
        arena = self._arena()
        sums = []
        for h in request.handles:
            e = self.table.entries.get(h)
            if e is None:
                msg = f"handle {h} is not allocated"
                raise StateError(msg)
            sums.append(arena.checksum(e.space, e.offset, e.nbytes))
        st = self.table.status_reply()
        return ChecksumReply(sums, st.step, st.seq)

    def handle_read(self, request: Read, ctx: Any) -> ReadReply:
        """Bytes of one allocation, for a network peer."""
        e = self.table.entries.get(request.handle)
        if e is None or request.offset + request.nbytes > e.nbytes or request.nbytes > MAX_READ:
            msg = (f"read of [{request.offset}, {request.offset + request.nbytes}) from handle {request.handle} "
                   f"is out of bounds (or over {MAX_READ} bytes)")
            raise StateError(msg)
        return ReadReply(self._arena().read(e.space, e.offset + request.offset, request.nbytes))

    def handle_pull(self, request: Pull, ctx: Any) -> tuple[PullReply, RecRestore | None]:
        """Fill the arena from a peer proxy (see :mod:`mnemosyne.proxy.pull`)."""
        from mnemosyne.proxy.pull import pull_from_peer

        self.sync_markers()
        reply = pull_from_peer(self, request.peer, request.token or self.token)
        return reply, RecRestore(reply.step, request.peer)

    def handle_shutdown(self, request: Shutdown, ctx: Any) -> Ok:
        """Stop after replying."""
        self.stop()
        return Ok()
