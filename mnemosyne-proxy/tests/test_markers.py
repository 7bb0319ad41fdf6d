"""The marker page: per-step begin/commit markers in shared memory, recorded by the proxy when it reads them."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from mnemosyne.core.errors import ConfigError, CorruptStateError, StateError
from mnemosyne.core.state import CommitStatus
from mnemosyne.proxy import ProxyClient, ProxyStateHolder
from mnemosyne.proxy._generated.messages import RecBegin, RecCommit
from mnemosyne.proxy.holder import Committer
from mnemosyne.proxy.journal import read_records
from mnemosyne.proxy.markers import MarkerPage, pack, unpack
from mnemosyne.proxy.table import STATUS_CODES
from mnemosyne.proxy.testing import ProxyProcess

pytestmark = pytest.mark.timeout(120)
TORN, COMMITTED = STATUS_CODES[CommitStatus.TORN], STATUS_CODES[CommitStatus.COMMITTED]


def test_marker_words_and_page():
    assert unpack(pack(7, 12)) == (7, 12) and unpack(pack(3, -1)) == (3, -1)
    for bad in (-2, 1 << 32):
        with pytest.raises(ConfigError, match="cannot be marked"):
            pack(1, bad)
    page, fd = MarkerPage.create()
    try:
        other = MarkerPage(fd)  # a second mapping (the trainer's) sees the same words
        w = other.begin(5)
        assert unpack(w) == (1, 5) and page.read() == (w, pack(0, -1))
        other.commit(w)
        assert page.read() == (w, w)
        assert unpack(other.begin(6))[0] == 2  # every begin takes the next ordinal
        other.close()
    finally:
        page.close()
        os.close(fd)
    fd = os.memfd_create("not-a-page")
    os.ftruncate(fd, 4096)
    try:
        with pytest.raises(CorruptStateError, match="does not hold a marker page"):
            MarkerPage(fd)
    finally:
        os.close(fd)


def _markers_in_log(state_dir):
    records, _ = read_records(state_dir / "proxy.log")
    return [(type(r).__name__, r.step) for r in records if isinstance(r, (RecBegin, RecCommit))]


def test_holder_markers_are_recorded_when_the_proxy_reads_the_page(tmp_path):
    p = ProxyProcess(tmp_path / "p", size="8M", token="t")
    try:
        h = ProxyStateHolder(p.socket, token="t", job="job")
        obs = ProxyClient(p.socket, token="t", job="job", role="admin")
        h.attach()
        h.begin_update(0)
        h.allocate("model/x", "float32", (10,)).fill_(1.0)  # inside the update: not torn by itself
        h.commit(0)
        assert (obs.status().status, obs.status().step) == (COMMITTED, 0)
        h.begin_update(1)
        st = obs.status()
        assert (st.status, st.step, st.update_step) == (TORN, 0, 1) and "update of step 1 began" in st.reason
        h.commit(1)
        assert (obs.status().status, obs.status().step) == (COMMITTED, 1)
        with pytest.raises(StateError, match=r"commit\(3\) without a matching begin_update"):
            h.commit(3)
        # begin(k+1) while commit(k) is still pending on the device: conservatively torn
        page = h.markers
        gate = _Gate()
        committer = Committer(page.commit)
        committer.submit(page.begin(2), gate)
        w3 = page.begin(3)
        st = obs.status()
        assert (st.status, st.step, st.update_step) == (TORN, 1, 3)
        gate.open.set()
        committer.wait()
        st = obs.status()  # commit(2) landed, the update of step 3 is still open
        assert (st.status, st.step, st.update_step) == (TORN, 2, 3)
        page.commit(w3)
        assert (obs.status().status, obs.status().step) == (COMMITTED, 3)
        committer.close()
        h.begin_update(4)
        h.commit(4)
        obs.close()
    finally:
        assert p.stop() == 0
    h.close()
    # nobody asked after step 4: the proxy read the page once more when it stopped
    assert _markers_in_log(tmp_path / "p")[-4:] == [("RecCommit", 2), ("RecBegin", 3), ("RecCommit", 3),
                                                     ("RecCommit", 4)]


class _Gate:
    """Stands in for a CUDA event: synchronize() blocks until the test opens the gate."""

    def __init__(self):
        import threading

        self.open = threading.Event()

    def synchronize(self):
        assert self.open.wait(20)


@pytest.mark.slow
@pytest.mark.parametrize(("phase", "want"), [
    ("backward", ("committed", 4, -1, [("RecCommit", 4)])),                # before begin_update(5)
    ("update-end", ("torn", 4, 5, [("RecCommit", 4), ("RecBegin", 5)])),   # between begin and commit
    ("committed", ("committed", 5, -1, [("RecCommit", 5)])),               # right after commit(5)
])
def test_sigkill_in_each_window_is_decided_by_the_marker_page(tmp_path, phase, want):
    status, step, update, records = want
    p = ProxyProcess(tmp_path / "p", size="16M", job="job", token="tok")
    try:
        env = {**os.environ, "MNEMOSYNE_TOKEN": "tok", "MNEMOSYNE_JOB_ID": "job",
               "MNEMOSYNE_INJECT": f"step=5,phase={phase},kind=kill"}
        res = subprocess.run([sys.executable, "-m", "mnemosyne.proxy.testing.trainer", "--steps", "6", "--out",
                              str(tmp_path / "x.pt"), "--socket", p.socket], capture_output=True, text=True,
                             env=env, timeout=90)
        assert res.returncode == -9, res.stderr
        assert json.loads(res.stdout.splitlines()[-1]) == {"event": "fault", "step": 5, "phase": phase, "kind": "kill"}
        # No request is needed: the trainer's death closed its connection and the proxy
        # recorded the page then. Steps 1-4 ran without a single marker on the socket.
        deadline = time.monotonic() + 15
        while _markers_in_log(tmp_path / "p")[-len(records):] != records and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _markers_in_log(tmp_path / "p")[-len(records):] == records
        with ProxyClient(p.socket, token="tok", job="job", role="admin") as c:
            st = c.status()
        assert (st.status, st.step, st.update_step) == (STATUS_CODES[CommitStatus(status)], step, update)
        if status == "torn":
            assert "update of step 5 began" in st.reason
    finally:
        p.stop()


def test_pending_commits_are_marked_at_interpreter_exit(tmp_path):
    code = """
import time
from mnemosyne.proxy.holder import Committer

class SlowEvent:
    def synchronize(self):
        time.sleep(0.3)

c = Committer(lambda what: print("marked", what, flush=True))
c.submit(7, SlowEvent())
print("exiting", flush=True)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["exiting", "marked", "7"]


def test_checksum_torch_and_numpy_match_the_definition():
    import numpy as np

    from mnemosyne.proxy import checksum as cs

    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 8, 9, 1000, 4099):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        want = cs.checksum_reference(data.tobytes())
        assert cs.checksum_numpy(data) == want
        assert cs.checksum_torch(torch.from_numpy(data.copy())) == want


@pytest.mark.parametrize(("breakage", "error"), [
    ("None", "ModuleNotFoundError"),                        # numba not importable
    ("types.ModuleType('numba')", "AttributeError"),       # importable but broken (like numba-cuda vs numpy 2.5)
])
def test_checksums_fall_back_to_numpy_when_numba_is_unusable(breakage, error):
    code = f"""
import sys, types
sys.modules["numba"] = {breakage}
import numpy as np
from mnemosyne.proxy.checksum import checksum_bytes, checksum_reference, host_path
data = np.random.default_rng(5).integers(0, 256, 4099, dtype=np.uint8)
assert checksum_bytes(data) == checksum_reference(data.tobytes())
assert checksum_bytes(data[:100]) == checksum_reference(data[:100].tobytes())
print(host_path())
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"numpy (numba njit failed: {error}"), res.stdout


def test_numba_is_an_optional_extra():
    # The host arena needs numpy only; numba (and llvmlite) come with [numba] or [cuda].
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert not [d for d in meta["dependencies"] if d.startswith("numba")]
    extras = meta["optional-dependencies"]
    assert any(d.startswith("numba>") for d in extras["numba"]) and any(d.startswith("numba>") for d in extras["cuda"])
