"""A real proxy process: authentication, malformed input, roles, restarts, death."""

import contextlib
import os
import socket
import stat
import struct

import pytest

from mnemosyne.core.errors import AuthError, StateError
from mnemosyne.core.state import CommitStatus
from mnemosyne.proxy._generated import messages as m
from mnemosyne.proxy.client import ProxyClient
from mnemosyne.proxy.errors import ProxyUnavailableError
from mnemosyne.proxy.table import STATUS_CODES
from mnemosyne.proxy.testing import ProxyProcess

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def proxy(tmp_path):
    p = ProxyProcess(tmp_path / "p", size="8M", job="job", token="secret", peer_listen="127.0.0.1:0")
    yield p
    p.stop()


def _client(p, **kw):
    kw.setdefault("token", "secret")
    kw.setdefault("job", "job")
    return ProxyClient(p.socket, **kw)


def _raw(p):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(p.socket)
    return s


def _read_reply(s):
    header = b""
    while len(header) < m.FRAME.size:
        chunk = s.recv(m.FRAME.size - len(header))
        if not chunk:
            return None
        header += chunk
    msg_id, _rid, length = m.parse_header(header)
    payload = b""
    while len(payload) < length:
        payload += s.recv(length - len(payload))
    return m.decode_payload(msg_id, payload)


def _assert_closed(s):
    # unread garbage in the proxy's buffer turns its close into a reset: both mean "hung up"
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(1) == b""


def _assert_still_serves(p):
    with _client(p) as c:
        assert c.status().status in STATUS_CODES.values()


def test_socket_and_files_are_private(proxy):
    assert stat.S_IMODE(os.stat(proxy.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(proxy.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(proxy.state_dir / "proxy.log").st_mode) == 0o600


def test_wrong_token_job_and_role_are_rejected(proxy):
    with pytest.raises(AuthError, match="wrong job token"):
        _client(proxy, token="nope")
    with pytest.raises(AuthError, match="job 'other' does not match"):
        _client(proxy, job="other")
    with pytest.raises(AuthError, match="unknown role"):
        _client(proxy, role="root")
    with pytest.raises(AuthError, match="only peers may connect over TCP"):
        ProxyClient(proxy.peer_address, token="secret", job="job", role="trainer")
    # a peer that tries to write is refused and hung up on
    peer = ProxyClient(proxy.peer_address, token="secret", job="job", role="peer")
    assert peer.status().status == STATUS_CODES[CommitStatus.EMPTY]
    with pytest.raises(AuthError, match="a peer connection may not send Allocate"):
        peer.allocate("model/x", 0, "float32", [1], 4)
    peer.close()
    peer = ProxyClient(proxy.socket, token="secret", job="job", role="peer")
    with pytest.raises(AuthError, match="may not send BeginUpdate"):
        peer.begin_update(3)
    peer.close()
    _assert_still_serves(proxy)


def test_foreign_and_malformed_messages_are_rejected(proxy):
    cases = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                              # a foreign protocol
        m.FRAME.pack(m.MAGIC, m.VERSION, 999, 1, 0),                       # unknown message
        m.FRAME.pack(m.MAGIC, m.VERSION, m.Hello.MSG_ID, 1, 3) + b"abc",  # truncated fields
        m.FRAME.pack(m.MAGIC, m.VERSION, m.Hello.MSG_ID, 1, 2**31),        # absurd length
        m.encode_frame(m.Allocate("model/w", 0, "float32", [1], 4), 1),    # no Hello first
        m.encode_frame(m.Welcome(1, "job", "host", -1, 1), 1),             # a reply sent as a request
    ]
    for raw in cases:
        s = _raw(proxy)
        s.sendall(raw)
        reply = _read_reply(s)
        assert isinstance(reply, m.Error), raw
        assert reply.code in (1, 2) and reply.message
        _assert_closed(s)
        s.close()
    # garbage after a good Hello: answered, connection closed, state untouched
    s = _raw(proxy)
    s.sendall(m.encode_frame(m.Hello("secret", "job", 1, "trainer"), 1))
    assert isinstance(_read_reply(s), m.Welcome)
    s.sendall(b"\x00" * 16)
    assert isinstance(_read_reply(s), m.Error)
    s.close()
    with _client(proxy) as c:
        assert c.table().entries == []
    assert proxy.proc.poll() is None


def test_requests_are_validated(proxy):
    with _client(proxy) as c:
        c.begin_update(0)
        a = c.allocate("model/w", 0, "float32", [4], 16)
        assert a.created and a.entry.handle == 1
        again = c.allocate("model/w", 0, "float32", [4], 16)
        assert not again.created and again.entry == a.entry
        with pytest.raises(StateError, match="exists as space=0 float32"):
            c.allocate("model/w", 0, "float32", [8], 32)
        with pytest.raises(StateError, match="without a matching begin_update"):
            c.commit(7)
        c.commit(0)
        with pytest.raises(StateError, match="cannot allocate"):
            c.allocate("model/huge", 0, "uint8", [1 << 30], 1 << 30)
        with pytest.raises(StateError, match="is not allocated"):
            c.free(12345)
        with pytest.raises(StateError, match="out of bounds"):
            c.read(a.entry.handle, 0, 17)
        # a state error keeps the connection usable
        assert c.status().status == STATUS_CODES[CommitStatus.COMMITTED]


def test_table_survives_a_proxy_restart_and_reports_the_lost_arena(tmp_path):
    p = ProxyProcess(tmp_path / "p", size="8M", token="secret")
    with ProxyClient(p.socket, token="secret", job="job") as c:
        c.begin_update(0)
        entries = [c.allocate(f"model/p{i}", 0, "float32", [i + 1, 3], (i + 1) * 12).entry for i in range(5)]
        scratch = c.allocate("", 0, "uint8", [100], 100).entry
        c.name(scratch.handle, "scratch/buf")
        c.free(entries[2].handle)
        c.commit(0)
        c.begin_update(1)
        c.commit(1)
        before = c.table()
    p.kill()
    with pytest.raises(ProxyUnavailableError, match="no device proxy answers"):
        ProxyClient(p.socket, token="secret", job="job", connect_timeout=0.3)
    p2 = ProxyProcess(tmp_path / "p", size="8M", token="secret")
    try:
        with ProxyClient(p2.socket, token="secret", job="job") as c:
            after = c.table()
            assert after.entries == before.entries  # same handles, names, offsets
            assert c.welcome.generation == 2
            st = after.status
            assert st.status == STATUS_CODES[CommitStatus.TORN] and st.step == 1
            assert "lost when that proxy stopped" in st.reason
            # handles are never reused
            assert c.allocate("model/new", 0, "float32", [1], 4).entry.handle == scratch.handle + 1
    finally:
        p2.stop()


def test_a_dead_proxy_is_a_clear_error_to_its_client(tmp_path):
    p = ProxyProcess(tmp_path / "p", size="8M", token="secret")
    c = ProxyClient(p.socket, token="secret", job="job")
    c.begin_update(0)
    p.kill()
    with pytest.raises(ProxyUnavailableError, match=r"is gone .* while Commit was outstanding"):
        c.commit(0)
    c.close()


def test_network_read_and_checksum(proxy):
    with _client(proxy) as c:
        c.begin_update(0)
        e = c.allocate("model/w", 0, "uint8", [10], 10).entry
        c.commit(0)
    with ProxyClient(proxy.peer_address, token="secret", job="job", role="peer") as peer:
        assert peer.read(e.handle, 0, 10).data == bytes(10)
        from mnemosyne.proxy.checksum import checksum_reference

        assert peer.checksum([e.handle]).sums == [checksum_reference(bytes(10))]
        with pytest.raises(Exception, match="Unix socket"):
            peer.map_spaces()


def test_frame_header_struct_is_16_bytes():
    assert m.FRAME.size == 16 == struct.calcsize("<4sHHII")


class _Gate:
    """Stands in for a CUDA event: synchronize() blocks until the test opens the gate."""

    def __init__(self):
        import threading

        self.open = threading.Event()

    def synchronize(self):
        assert self.open.wait(20)


def test_committer_logs_a_commit_only_after_the_device_finished(proxy):
    import threading

    from mnemosyne.proxy.holder import Committer

    with _client(proxy) as c:
        committer = Committer(c.commit)
        c.begin_update(1)
        gate = _Gate()
        committer.submit(1, gate)
        with _client(proxy) as observer:
            # the update's kernels are still running: the proxy must not see the commit yet
            assert observer.status().status == STATUS_CODES[CommitStatus.TORN]
            waiter = threading.Thread(target=committer.wait)
            waiter.start()
            waiter.join(0.2)
            assert waiter.is_alive()  # the next begin_update would wait here
            gate.open.set()
            waiter.join(10)
            st = observer.status()
            assert (st.status, st.step) == (STATUS_CODES[CommitStatus.COMMITTED], 1)
        # a failed commit is raised by the next call
        done = _Gate()
        done.open.set()
        committer.submit(5, done)  # no begin_update(5): the proxy refuses
        with pytest.raises(StateError, match="without a matching begin_update"):
            committer.wait()
        committer.close()
