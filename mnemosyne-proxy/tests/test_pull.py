"""Peer pulls between real proxies: verification end to end, refusals."""

import socket
import threading

import pytest

from mnemosyne.proxy._generated import messages as m
from mnemosyne.proxy.client import ProxyClient
from mnemosyne.proxy.errors import PullError
from mnemosyne.proxy.testing import ProxyProcess

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair(tmp_path):
    a = ProxyProcess(tmp_path / "a", size="8M", token="t")
    b = ProxyProcess(tmp_path / "b", size="8M", token="t", peer_listen="127.0.0.1:0")
    yield a, b
    a.stop()
    b.stop()


def _c(p, role="trainer"):
    return ProxyClient(p.socket, token="t", job="job", role=role)


def _fill_donor(b, step=7, update_pending=False):
    with _c(b) as c:
        c.begin_update(step)
        e = c.allocate("model/w", 0, "uint8", [100_000], 100_000).entry
        if not update_pending:
            c.commit(step)
    return e


class _CorruptingRelay:
    """A TCP relay to the donor's peer port that flips one byte of the first ReadReply's data."""

    def __init__(self, target):
        host, _, port = target[4:].rpartition(":")
        self.target = (host, int(port))
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp:127.0.0.1:{self.lsock.getsockname()[1]}"
        self.flipped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        client, _ = self.lsock.accept()
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        try:
            while True:
                header = self._exact(upstream, m.FRAME.size)
                msg_id, _rid, length = m.parse_header(header)
                payload = bytearray(self._exact(upstream, length))
                if msg_id == m.ReadReply.MSG_ID and not self.flipped and length > 100:
                    payload[50] ^= 0x01
                    self.flipped = True
                client.sendall(header + payload)
        except (OSError, EOFError):
            client.close()

    @staticmethod
    def _exact(s, n):
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    @staticmethod
    def _pump(src, dst):
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass


def test_a_byte_corrupted_in_transit_fails_the_pull(pair):
    a, b = pair
    _fill_donor(b)
    relay = _CorruptingRelay(b.peer_address)
    with _c(a) as c:
        # this arena holds a committed state of the same layout; the pull overwrites it
        c.begin_update(3)
        c.allocate("model/w", 0, "uint8", [100_000], 100_000)
        c.commit(3)
        with pytest.raises(PullError, match=r"checksums differ after pulling .*'model/w'"):
            c.pull(relay.address, "")
        assert relay.flipped
        st = c.status()
        # neither the old committed step nor the corrupt copy is vouched for
        assert st.status == 2 and "a pull of step 7 from tcp:" in st.reason
        # the same pull without the relay succeeds
        reply = c.pull(b.peer_address, "")
        assert (reply.step, reply.nbytes, reply.entries) == (7, 100_000, 1)
        assert c.status().status == 1 and c.status().step == 7


def test_pull_refuses_a_donor_that_is_not_committed(pair):
    a, b = pair
    _fill_donor(b, update_pending=True)
    with _c(a) as c, pytest.raises(PullError, match="holds no committed state"):
        c.pull(b.unix_address, "")


def test_pull_refuses_a_different_layout(pair):
    a, b = pair
    _fill_donor(b)
    with _c(a) as c:
        c.begin_update(0)
        c.allocate("model/w", 0, "uint8", [10], 10)
        c.commit(0)
        with pytest.raises(PullError, match="tensor 'model/w' differs"):
            c.pull(b.unix_address, "")


def test_pull_refuses_when_this_arena_has_state_the_peer_lacks(pair):
    a, b = pair
    _fill_donor(b)
    with _c(a) as c:
        c.begin_update(0)
        c.allocate("model/only_here", 0, "uint8", [10], 10)
        c.commit(0)
        with pytest.raises(PullError, match="the replicas differ"):
            c.pull(b.unix_address, "")
        assert c.status().step == 0  # untouched


def test_pull_from_itself_is_refused(pair):
    a, _ = pair
    with _c(a) as c, pytest.raises(PullError, match="cannot pull from itself"):
        c.pull(a.unix_address, "")


def test_pull_with_a_wrong_peer_token_is_refused(pair):
    a, b = pair
    _fill_donor(b)
    with _c(a) as c, pytest.raises(Exception, match="wrong job token"):
        c.pull(b.unix_address, "not-the-token")
