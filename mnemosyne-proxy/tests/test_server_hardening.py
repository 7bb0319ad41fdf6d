"""A real proxy process under slow, silent and garbled clients, and a second proxy on its directory.

Issue 17 finding 3 and the "channels" part of issue 16: per-frame deadlines (a client
that dribbles bytes never stalls another), a lock on ``--state-dir``, and bounded fuzzing
of the frame decoder.
"""

import contextlib
import socket
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnemosyne.core.errors import ConfigError
from mnemosyne.proxy._generated import messages as m
from mnemosyne.proxy.client import ProxyClient
from mnemosyne.proxy.server import ProxyServer
from mnemosyne.proxy.testing import ProxyProcess

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    p = ProxyProcess(tmp_path_factory.mktemp("hard") / "p", size="8M", job="job", token="secret",
                     peer_listen="127.0.0.1:0")
    yield p
    p.stop()


def _tcp(p):
    host, _, port = p.peer_address.removeprefix("tcp:").rpartition(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _unix(p):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(p.socket)
    return s


def _read_reply(s):
    data = b""
    while True:
        try:
            chunk = s.recv(1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    if len(data) < m.FRAME.size:
        return None
    msg_id, _rid, length = m.parse_header(data[: m.FRAME.size])
    return m.decode_payload(msg_id, data[m.FRAME.size: m.FRAME.size + length])


def _status_time(p):
    t0 = time.monotonic()
    with ProxyClient(p.socket, token="secret", job="job") as c:
        c.status()
    return time.monotonic() - t0


@pytest.mark.slow
def test_a_byte_dribbling_client_never_stalls_another_and_is_dropped(proxy):
    hello = m.encode_frame(m.Hello("secret", "job", 1, "peer"), 1)
    silent = _tcp(proxy)
    silent.sendall(b"MNP")  # 3 bytes, then nothing
    dribbler = _tcp(proxy)
    t0 = time.monotonic()
    for i in range(6):  # one byte every 0.3 s: each recv returns quickly, the frame never completes
        dribbler.sendall(hello[i:i + 1])
        assert _status_time(proxy) < 1.0
        time.sleep(0.3)
    reply = _read_reply(silent)  # dropped once its Hello is overdue (5 s), with a reason
    assert isinstance(reply, m.Error) and "no Hello within" in reply.message
    assert time.monotonic() - t0 < 9
    assert _status_time(proxy) < 1.0
    silent.close()
    dribbler.close()


def test_a_second_proxy_on_the_same_state_dir_is_refused(proxy):
    log = (proxy.state_dir / "proxy.log").read_bytes()
    with pytest.raises(ConfigError, match=r"another proxy \(pid \d+\) already serves"):
        ProxyServer(proxy.state_dir, capacity=1 << 20, job="job", token="secret")
    assert (proxy.state_dir / "proxy.log").read_bytes() == log  # the live proxy's log is untouched
    assert _status_time(proxy) < 1.0


def test_a_large_frame_before_hello_is_refused_before_it_is_read(proxy):
    s = _unix(proxy)
    s.sendall(struct.pack("<4sHHII", b"MNPX", 1, 1, 7, 60 << 20))  # declares 60 MiB, sends none
    reply = _read_reply(s)
    assert isinstance(reply, m.Error) and "before Hello" in reply.message
    s.close()


_frames = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda v, i, r, n, rest: struct.pack("<4sHHII", b"MNPX", v, i, r, n) + rest,
              st.sampled_from([1, 0, 2]), st.integers(0, 64), st.integers(0, 2**32 - 1),
              st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)), st.binary(max_size=64)),
)


@settings(max_examples=120, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=_frames, authed=st.booleans(), tcp=st.booleans())
def test_fuzzed_frames_get_a_clean_error_and_the_proxy_keeps_serving(proxy, frame, authed, tcp):
    s = _tcp(proxy) if tcp else _unix(proxy)
    with contextlib.closing(s):
        if authed:
            s.sendall(m.encode_frame(m.Hello("secret", "job", 1, "peer"), 1))
            hdr = s.recv(m.FRAME.size)
            _mid, _rid, n = m.parse_header(hdr)
            while n > 0:
                n -= len(s.recv(n))
        s.sendall(frame)
        s.shutdown(socket.SHUT_WR)  # a truncated frame ends here: the proxy must not wait for more
        reply = _read_reply(s)
        assert reply is None or isinstance(reply, m.Message)
    with ProxyClient(proxy.socket, token="secret", job="job") as c:
        c.status()


@pytest.mark.parametrize(("args", "expect"), [
    (["--size", "100T"], "pick a smaller --size"),
    (["--peer-listen", "nonsense"], "--peer-listen 'nonsense': expected HOST:PORT"),
])
def test_bad_proxy_options_are_a_clear_error(tmp_path, args, expect):
    res = subprocess.run([sys.executable, "-m", "mnemosyne.cli", "proxy", "--state-dir", str(tmp_path / "s"), *args],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and expect in res.stderr and "Traceback" not in res.stderr, res.stderr
