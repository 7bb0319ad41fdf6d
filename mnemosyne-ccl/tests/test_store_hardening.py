"""The store server under hostile or careless clients (issue 17 finding 2, issue 16 channels).

Real server process or thread, real loopback sockets: unauthenticated floods, silent and
slow connections, deep JSON, bad ``add`` amounts, and bounded fuzzing of the frame decoder.
"""

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnemosyne.ccl import _wire
from mnemosyne.ccl.store_client import StoreClient, parse_addr
from mnemosyne.ccl.store_server import MAX_PREAUTH_HEADER, StoreServer

pytestmark = pytest.mark.timeout(60)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _hello(job="j", token="t"):
    return _wire.encode({"op": "hello", "version": 1, "job": job, "token": token})


@pytest.mark.slow
def test_unauthenticated_flood_keeps_memory_flat_and_serves_a_legitimate_client(tmp_path):
    token_file = tmp_path / "token"
    proc = subprocess.Popen([sys.executable, "-m", "mnemosyne.ccl.store_server", "--port", "0", "--job", "jx",
                             "--token-file", str(token_file)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    socks = []
    try:
        addr = proc.stdout.readline().split()[1]
        token = token_file.read_text().strip()
        StoreClient(addr, "jx", token, timeout=5).set("warm", b"1")
        base = _rss_mib(proc.pid)
        host, port = parse_addr(addr)
        junk = b"\0" * (64 << 10)
        for i in range(300):
            s = socket.create_connection((host, port), timeout=5)
            if i % 2:  # declares the largest frame the protocol allows, then streams junk
                s.sendall(struct.pack(">4sII", b"MNS1", _wire.MAX_HEADER, _wire.MAX_BODY))
                with contextlib.suppress(OSError):  # already refused and closed by the server
                    s.sendall(junk)
            socks.append(s)  # the even ones stay silent
        t0 = time.monotonic()
        c = StoreClient(addr, "jx", token, timeout=5)
        c.set("k", b"v")
        assert c.get("k", timeout=1) == b"v"
        assert time.monotonic() - t0 < 1.0
        assert _rss_mib(proc.pid) - base < 50, (base, _rss_mib(proc.pid))
        # A silent connection is answered and closed after the hello deadline.
        silent = socks[-2]  # the oldest silent ones were evicted by newer ones of this host
        silent.settimeout(10)
        t0 = time.monotonic()
        ans, _ = _wire.recv_frame(silent)
        assert ans["error"] == "ProtocolError" and "before its hello" in ans["msg"]
        assert time.monotonic() - t0 < 6
        assert StoreClient(addr, "jx", token, timeout=5).get("k", timeout=1) == b"v"
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def server():
    srv = StoreServer(jobs={"j": "t"}, hello_timeout=1.0, idle_timeout=2.0, max_preauth_per_peer=8).start()
    yield srv
    srv.stop()


def _conn(server, timeout=5.0):
    host, port = parse_addr(server.address)
    return socket.create_connection((host, port), timeout=timeout)


def test_preauth_frames_must_be_small_and_handler_errors_are_answered(server):
    with _conn(server) as s:
        s.sendall(struct.pack(">4sII", b"MNS1", MAX_PREAUTH_HEADER + 1, 0))
        ans, _ = _wire.recv_frame(s)
        assert ans["error"] == "ProtocolError" and "before hello" in ans["msg"]
    deep = b'{"op":"set","key":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with _conn(server) as s:
        s.sendall(_hello() + struct.pack(">4sII", b"MNS1", len(deep), 0) + deep)
        assert _wire.recv_frame(s)[0]["ok"]
        ans, _ = _wire.recv_frame(s)
        assert ans["error"] == "ProtocolError" and "nested too deeply" in ans["msg"]
    with _conn(server) as s:
        s.sendall(_hello() + _wire.encode({"op": "add", "key": "n", "amount": 2 ** 70}))
        assert _wire.recv_frame(s)[0]["ok"]
        ans, _ = _wire.recv_frame(s)
        assert ans["error"] == "StoreError" and "64-bit" in ans["msg"]
        s.sendall(_wire.encode({"op": "add", "key": "n", "amount": "2"}))
        ans, _ = _wire.recv_frame(s)
        assert ans["error"] == "ProtocolError" and "'amount' must be an integer" in ans["msg"]
    with _conn(server) as s:
        huge = b'{"op":"add","key":"n","amount":' + b"9" * 5000 + b"}"
        s.sendall(_hello() + struct.pack(">4sII", b"MNS1", len(huge), 0) + huge)
        assert _wire.recv_frame(s)[0]["ok"]
        assert _wire.recv_frame(s)[0]["error"] == "ProtocolError"
    with _conn(server) as s:
        s.sendall(_hello())
        assert _wire.recv_frame(s)[0]["ok"]
        s.sendall(_wire.encode({"op": "add", "key": "n", "amount": 2}))  # the connection still serves
        assert _wire.recv_frame(s)[0] == {"ok": True, "value": 2}
    assert StoreClient(server.address, "j", "t", timeout=5).add("n", 1) == 3


def test_slow_and_idle_connections_are_dropped_without_blocking_others(server):
    dribbler = _conn(server)
    frame = _hello()
    dribbler.sendall(frame[:3])  # then nothing: the hello deadline, not each recv, bounds it
    idle = _conn(server)
    idle.sendall(_hello())
    assert _wire.recv_frame(idle)[0]["ok"]
    t0 = time.monotonic()
    c = StoreClient(server.address, "j", "t", timeout=5)
    c.set("x", b"1")
    assert time.monotonic() - t0 < 0.5
    ans, _ = _wire.recv_frame(dribbler)
    assert ans["error"] == "ProtocolError" and "truncated" not in ans["msg"]
    assert time.monotonic() - t0 < 3
    idle.settimeout(5)
    ans, _ = _wire.recv_frame(idle)  # idle past idle_timeout=2 s
    assert ans["error"] == "ProtocolError" and "idle" in ans["msg"]
    dribbler.close()
    idle.close()


def test_a_flood_from_one_host_evicts_its_oldest_unauthenticated_connections(server):
    flood = [_conn(server) for _ in range(20)]
    time.sleep(0.2)
    c = StoreClient(server.address, "j", "t", timeout=5)  # newest: never the one evicted
    c.set("ok", b"1")
    closed = 0
    for s in flood[:12]:
        s.settimeout(2)
        with contextlib.suppress(TimeoutError, OSError):
            closed += s.recv(1) == b""
    assert closed >= 10  # 20 - max_preauth_per_peer(8), oldest first
    for s in flood:
        s.close()
    assert c.get("ok", timeout=1) == b"1"


_frames = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda h, b, rest: struct.pack(">4sII", b"MNS1", h, b) + rest,
              st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=32)),
    st.builds(lambda obj: _wire.encode(obj), st.dictionaries(st.sampled_from(["op", "key", "keys", "amount",
                                                                              "timeout", "elen", "epoch"]),
                                                           st.one_of(st.none(), st.integers(), st.text(max_size=8),
                                                                     st.lists(st.integers(), max_size=3)),
                                                           max_size=5).filter(
        lambda d: d.get("op") not in ("get", "wait"))),  # blocking ops wait for keys by design
)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=_frames, authed=st.booleans(), truncate=st.booleans())
def test_fuzzed_frames_get_a_clean_error_and_the_server_keeps_serving(server, frame, authed, truncate):
    with _conn(server, timeout=3) as s:
        if authed:
            s.sendall(_hello())
            assert _wire.recv_frame(s)[0]["ok"]
        s.sendall(frame[: len(frame) // 2] if truncate else frame)
        s.shutdown(socket.SHUT_WR)  # a truncated frame ends here: the server must not wait for more
        try:
            while True:
                ans, _ = _wire.recv_frame(s)
                assert isinstance(ans, dict) and "ok" in ans
                if not ans["ok"]:
                    assert ans["error"] in ("ProtocolError", "AuthError", "StoreError", "StoreTimeout",
                                            "StaleEpochError", "ConfigError"), ans
        except ConnectionError:
            pass  # closed by the server after its answer, or nothing to answer
    assert json.loads(json.dumps({"alive": StoreClient(server.address, "j", "t", timeout=3).add("alive", 1)}))


def test_mnemo_store_reads_a_token_file_like_launch(tmp_path):
    loose = tmp_path / "loose"
    loose.write_text("tok\n")
    loose.chmod(0o644)
    for path, expect in ((tmp_path, "not a regular file"), (loose, "mode 644 lets other users read")):
        res = subprocess.run([sys.executable, "-m", "mnemosyne.cli", "store", "--port", "0", "--job", "j",
                              "--token-file", str(path)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 1 and expect in res.stderr and "Traceback" not in res.stderr, res.stderr
