"""The persistent store server and its client, over real TCP on loopback."""

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from mnemosyne.ccl import _wire
from mnemosyne.ccl.store_client import StoreClient, parse_addr
from mnemosyne.ccl.store_server import StoreServer
from mnemosyne.core.errors import AuthError, ConfigError, StaleEpochError, StoreError, StoreTimeout
from mnemosyne.core.store import Store

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def server():
    srv = StoreServer(jobs={"j1": "tok1", "j2": "tok2"}).start()
    yield srv
    srv.stop()


def test_binds_loopback_and_implements_core_store(server):
    assert server.host == "127.0.0.1"
    c = StoreClient(server.address, "j1", "tok1", timeout=5)
    assert isinstance(c, Store)
    c.set("a", b"\x00\xffbytes")
    assert c.get("a") == b"\x00\xffbytes"
    assert c.add("n", 2) == 2 and c.add("n", 40) == 42
    assert c.compare_set("cas", b"", b"first") == b"first"
    assert c.compare_set("cas", b"nope", b"second") == b"first"
    assert c.compare_set("cas", b"first", b"second") == b"second"
    assert c.check(["a", "n"]) and not c.check(["a", "missing"])
    assert c.delete("a") and not c.delete("a")
    p = c.prefixed("ns")
    p.set("k", b"v")
    assert c.get("ns/k") == b"v"


def test_jobs_are_isolated(server):
    a = StoreClient(server.address, "j1", "tok1", timeout=5)
    b = StoreClient(server.address, "j2", "tok2", timeout=5)
    a.set("k", b"from j1")
    assert not b.check(["k"])
    with pytest.raises(StoreTimeout):
        b.get("k", timeout=0.2)


def test_wrong_token_or_job_is_refused(server):
    with pytest.raises(AuthError, match="unknown job or wrong token"):
        StoreClient(server.address, "j1", "tok2")
    with pytest.raises(AuthError):
        StoreClient(server.address, "nope", "tok1")


def test_blocking_get_wakes_on_set_and_times_out(server):
    c = StoreClient(server.address, "j1", "tok1", timeout=5)
    threading.Timer(0.2, lambda: StoreClient(server.address, "j1", "tok1").set("late", b"x")).start()
    t0 = time.monotonic()
    assert c.get("late", timeout=5) == b"x"
    assert time.monotonic() - t0 < 3
    t0 = time.monotonic()
    with pytest.raises(StoreTimeout, match="did not appear"):
        c.wait(["never"], timeout=0.3)
    assert time.monotonic() - t0 < 3
    # A blocked get in one thread does not block another thread's set (connection pool).
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", c.get("pool", 5)))
    t.start()
    time.sleep(0.1)
    c.set("pool", b"ok")
    t.join(5)
    assert out["v"] == b"ok"


def _raw(server, frame: bytes) -> tuple[dict, bytes]:
    host, port = parse_addr(server.address)
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(frame)
        return _wire.recv_frame(s)


def test_malformed_and_foreign_requests_get_clear_errors(server):
    ans, _ = _raw(server, b"GET / HTTP/1.1\r\n\r\n")
    assert ans["error"] == "ProtocolError" and "magic" in ans["msg"]
    ans, _ = _raw(server, struct.pack(">4sII", b"MNS1", 3, 0) + b"{{{")
    assert ans["error"] == "ProtocolError" and "JSON" in ans["msg"]
    ans, _ = _raw(server, struct.pack(">4sII", b"MNS1", 1 << 30, 0))
    assert ans["error"] == "ProtocolError" and "too large" in ans["msg"]
    ans, _ = _raw(server, _wire.encode({"op": "get", "key": "x"}))
    assert ans["error"] == "AuthError" and "before hello" in ans["msg"]
    hello = _wire.encode({"op": "hello", "version": 1, "job": "j1", "token": "tok1"})
    ans, _ = _raw(server, hello + _wire.encode({"op": "get", "key": 5}))
    assert ans["ok"]  # the hello; the bad get is answered on the same connection:
    host, port = parse_addr(server.address)
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(hello + _wire.encode({"op": "get", "key": 5}) + _wire.encode({"op": "frobnicate"}))
        assert _wire.recv_frame(s)[0]["ok"]
        bad = _wire.recv_frame(s)[0]
        assert bad["error"] == "ProtocolError" and "'key' must be a string" in bad["msg"]
    # The server is still healthy for everyone else.
    StoreClient(server.address, "j1", "tok1").set("still", b"fine")


def test_world_size_and_epoch_fencing(server):
    StoreClient(server.address, "j1", "tok1", world_size=4)
    with pytest.raises(ConfigError, match="world size 4"):
        StoreClient(server.address, "j1", "tok1", world_size=3)
    old = StoreClient(server.address, "j1", "tok1", epoch=0)
    old.set("ok", b"1")
    assert StoreClient(server.address, "j1", "tok1").fence(2) == 2
    with pytest.raises(StaleEpochError, match="fenced at epoch 2"):
        old.set("zombie", b"write")
    with pytest.raises(StaleEpochError):
        StoreClient(server.address, "j1", "tok1", epoch=1)
    fresh = StoreClient(server.address, "j1", "tok1", epoch=2)
    fresh.set("ok", b"2")
    old.declare_epoch(2)  # a survivor moving to the new epoch
    old.set("ok", b"3")


def test_dead_server_raises_instead_of_hanging():
    srv = StoreServer(jobs={"j": "t"}).start()
    c = StoreClient(srv.address, "j", "t", timeout=5)
    c.set("a", b"1")
    srv.stop()
    with pytest.raises(StoreError):
        c.get("a", timeout=1)
    with pytest.raises(StoreError, match="cannot connect"):
        StoreClient(srv.address, "j", "t", timeout=2)


def test_bad_addresses_and_jobs():
    with pytest.raises(ConfigError, match="host:port"):
        parse_addr("localhost")
    with pytest.raises(ConfigError):
        StoreServer(jobs={"a/b": "t"})
    with pytest.raises(ConfigError):
        StoreServer(jobs={"a": ""})


def test_standalone_process_serves_and_stops(tmp_path):
    token_file = tmp_path / "token"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnemosyne.ccl.store_server", "--port", "0", "--job", "jx", "--token-file",
         str(token_file)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[0] == "listening", line
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        c = StoreClient(line[1], "jx", token_file.read_text().strip(), timeout=5)
        c.set("k", json.dumps({"x": 1}).encode())
        assert json.loads(c.get("k")) == {"x": 1}
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
