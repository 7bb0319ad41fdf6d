"""End to end on the host arena with real processes: a deterministic trainer keeps its state in
a proxy, is SIGKILLed (or loses its proxy) and must finish with the fault-free run's state, bit
for bit.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from mnemosyne.proxy.testing import ProxyProcess

# Each trainer process imports torch (seconds on a loaded 2-core box); a test runs up to four.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 8
TOKEN = "tok-recovery"


def _run(out, socket=None, inject=None, peer=None, steps=STEPS, env_extra=None, timeout=90):
    env = {**os.environ, "MNEMOSYNE_TOKEN": TOKEN, "MNEMOSYNE_JOB_ID": "job", **(env_extra or {})}
    env.pop("MNEMOSYNE_INJECT", None)
    if inject:
        env["MNEMOSYNE_INJECT"] = inject
    cmd = [sys.executable, "-m", "mnemosyne.proxy.testing.trainer", "--steps", str(steps), "--out", str(out)]
    cmd += ["--socket", str(socket)] if socket else ["--no-proxy"]
    if peer:
        cmd += ["--peer", peer]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return res, {e["event"]: e for e in events}


def _assert_equal(a_path, b_path):
    import torch

    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    assert sorted(a) == sorted(b)
    assert any(k.startswith("optim/") for k in a) and any(k.endswith("/exp_avg_sq") for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], f"tensors differ from the fault-free run: {differ}"


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "plain.pt"
    res, _ = _run(out)
    assert res.returncode == 0, res.stderr
    return out


def _proxy(tmp_path, name, **kw):
    return ProxyProcess(tmp_path / name, size="16M", job="job", token=TOKEN, **kw)


def test_training_in_the_arena_equals_plain_training(tmp_path, fault_free):
    with _proxy(tmp_path, "a") as pa:
        res, ev = _run(tmp_path / "a.pt", pa.socket)
    assert res.returncode == 0, res.stderr
    # a fresh arena: adopt copied the initial model in and committed it as step 0
    assert (ev["attach"]["status"], ev["attach"]["step"], ev["attach"]["resumed"]) == ("committed", 0, False)
    _assert_equal(tmp_path / "a.pt", fault_free)


def test_sigkill_mid_forward_reattaches_to_the_committed_step(tmp_path, fault_free):
    with _proxy(tmp_path, "a") as pa:
        res, ev = _run(tmp_path / "a.pt", pa.socket, inject="step=5,phase=forward,kind=kill")
        assert res.returncode == -9 and ev["fault"]["step"] == 5
        res, ev = _run(tmp_path / "a.pt", pa.socket)
    assert res.returncode == 0, res.stderr
    att = ev["attach"]
    assert (att["status"], att["step"], att["resumed"], att["same_address"]) == ("committed", 4, True, True)
    assert ev["done"]["start"] == 5
    _assert_equal(tmp_path / "a.pt", fault_free)


@pytest.mark.parametrize("path", ["unix", "tcp"])
def test_sigkill_inside_the_update_is_torn_and_recovered_from_a_peer(tmp_path, fault_free, path):
    with _proxy(tmp_path, "a") as pa, _proxy(tmp_path, "b", peer_listen="127.0.0.1:0") as pb:
        # replica B trains to step 5 and waits there as the donor
        res, _ = _run(tmp_path / "b.pt", pb.socket, steps=5)
        assert res.returncode == 0, res.stderr
        # replica A dies after optimizer.step() mutated its state, before commit(5)
        res, ev = _run(tmp_path / "a.pt", pa.socket, inject="step=5,phase=update-end,kind=kill")
        assert res.returncode == -9 and ev["fault"]["phase"] == "update-end"
        if path == "unix":
            # without a peer, the restarted trainer must not trust the torn arena
            res, ev = _run(tmp_path / "a.pt", pa.socket)
            assert res.returncode == 3
            assert ev["attach"]["status"] == "torn" and "update of step 5 began" in ev["attach"]["reason"]
        peer = pb.unix_address if path == "unix" else pb.peer_address
        res, ev = _run(tmp_path / "a.pt", pa.socket, peer=peer)
    assert res.returncode == 0, res.stderr
    assert ev["attach"]["status"] == "torn" and ev["attach"]["step"] == 4
    assert ev["pulled"]["step"] == 5 and ev["pulled"]["nbytes"] > 0
    assert ev["pulled"]["path"].startswith("same-node mapped copy" if path == "unix" else "network")
    assert ev["pulled"]["path"].endswith("checksums: numba njit (host)")
    assert ev["done"]["start"] == 6
    _assert_equal(tmp_path / "a.pt", fault_free)


def test_proxy_killed_under_the_trainer_is_a_clear_error_then_recovered(tmp_path, fault_free):
    mark = tmp_path / "mark"
    with _proxy(tmp_path, "b") as pb:
        res, _ = _run(tmp_path / "b.pt", pb.socket, steps=5)
        assert res.returncode == 0, res.stderr
        pa = _proxy(tmp_path, "a")
        env = {**os.environ, "MNEMOSYNE_TOKEN": TOKEN, "MNEMOSYNE_JOB_ID": "job",
               "MNEMOSYNE_INJECT": "step=3,phase=backward,kind=hang", "MNEMOSYNE_TEST_MARK": str(mark)}
        trainer = subprocess.Popen([sys.executable, "-m", "mnemosyne.proxy.testing.trainer", "--steps", str(STEPS),
                                    "--out", str(tmp_path / "a.pt"), "--socket", pa.socket],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            deadline = time.monotonic() + 60
            while not mark.exists() and time.monotonic() < deadline and trainer.poll() is None:
                time.sleep(0.02)
            assert mark.exists(), trainer.communicate(timeout=5)
            pa.kill()  # the proxy dies while the trainer is inside step 3
            mark.with_name("mark.go").write_text("")
            _, err = trainer.communicate(timeout=60)
        finally:
            if trainer.poll() is None:
                trainer.kill()
                trainer.wait(timeout=10)
        assert trainer.returncode == 4, err
        assert "device proxy" in err and "is gone" in err and "BeginUpdate" in err
        # a restarted proxy knows the layout (same handles) but not the contents: torn, refilled from B
        pa2 = _proxy(tmp_path, "a")
        try:
            res, ev = _run(tmp_path / "a.pt", pa2.socket, peer=pb.unix_address)
        finally:
            pa2.stop()
    assert res.returncode == 0, res.stderr
    assert ev["attach"]["status"] == "torn" and "was lost" in ev["attach"]["reason"]
    assert ev["attach"]["same_address"] is True
    assert ev["pulled"]["step"] == 5 and ev["done"]["start"] == 6
    _assert_equal(tmp_path / "a.pt", fault_free)
