"""The snapshot tier: shared-memory generations, background capture, CURVE replication between agents.

Real processes (a trainer, a writer killed mid-snapshot, node agents' replica servers on
loopback), real /dev/shm files and real SIGKILL.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest
import torch

from mnemosyne.core.errors import CorruptStateError, StateError
from mnemosyne.jit import _snapchild, _snapstore
from mnemosyne.jit._replicate import (
    ReplicaServer,
    ReplicationError,
    Replicator,
    curve_keys,
    fetch_first,
    fetch_generation,
    push_generation,
    ring_peers,
)
from mnemosyne.jit._snapshot import Snapshotter, decode, restore

zmq = pytest.importorskip("zmq")

CHILD = [sys.executable, "-m", "mnemosyne.jit._snapchild"]


@pytest.fixture
def shm():
    root = f"/dev/shm/mnemo-snap-test-{uuid.uuid4().hex[:8]}"
    os.makedirs(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _reference(steps):
    model, opt = _snapchild.build()
    for step in range(1, steps + 1):
        _snapchild.train(model, opt, step)
    return _snapchild.state_of(model, opt)


def _assert_bit_equal(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.view(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _assert_bit_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bit_equal(x, y, f"{path}/{i}")
    else:
        assert a == b and type(a) is type(b), path


@pytest.mark.slow
def test_trainer_snapshot_restores_bit_for_bit_after_it_exits(shm):
    """A trainer process snapshots in the background every 3 steps, then exits; its state comes back."""
    base = f"{shm}/rank0"
    res = subprocess.run([*CHILD, "train", base, "7", "3"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [json.loads(line)["step"] for line in res.stdout.splitlines()] == [3, 6]
    step, state = restore(base)
    assert step == 6
    _assert_bit_equal(_reference(6), state)
    # Load it back into a fresh model and optimizer: training on gives the fault-free run's step 7.
    model, opt = _snapchild.build(seed=123)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    _snapchild.train(model, opt, 7)
    _assert_bit_equal(_reference(7), _snapchild.state_of(model, opt))


def test_writer_killed_mid_snapshot_keeps_last_complete_generation(shm):
    base = f"{shm}/rank0"
    proc = subprocess.Popen([*CHILD, "tear", base], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "MID"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    gen = _snapstore.latest(base)
    assert (gen.seq, gen.step, gen.meta) == (1, 1, b'{"n":1}')
    assert gen.data == bytes(range(256)) * 4096
    # The next writer reuses the torn slot, never the complete one.
    new = _snapstore.write_generation(base, 3, b"{}", b"x" * 10)
    assert new.path != gen.path and (new.seq, _snapstore.latest(base).step) == (2, 3)


def test_corrupt_newest_generation_falls_back_and_names_files(shm):
    base = f"{shm}/r"
    _snapstore.write_generation(base, 1, b"{}", b"a" * 100)
    newest = _snapstore.write_generation(base, 2, b"{}", b"b" * 100)
    with open(newest.path, "r+b") as f:  # flip one payload byte in place
        f.seek(-1, os.SEEK_END)
        f.write(b"c")
    assert _snapstore.latest(base).step == 1
    with open(newest.path.with_name("r.0" if newest.path.name == "r.1" else "r.1"), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"c")
    with pytest.raises(CorruptStateError, match="blake2b"):
        _snapstore.latest(base)
    with pytest.raises(StateError, match="no complete generation"):
        _snapstore.latest(f"{shm}/absent")


def test_memory_bounded_over_200_snapshots(shm):
    """200 background captures of a changing state: two slots, never more bytes than two generations."""
    base = f"{shm}/rank0"
    model, opt = _snapchild.build()
    _snapchild.train(model, opt, 1)  # Adam's state exists from here on
    snap = Snapshotter(base)
    sizes = set()
    first = next(model.parameters())
    for step in range(1, 201):
        snap.fence()
        with torch.no_grad():
            first.add_(1.0)  # the update of this step, after the previous copy ended
        snap.capture(_snapchild.state_of(model, opt), step)
        sizes.add(_snapstore.holder_bytes(base))
    snap.close()
    assert sorted(os.listdir(shm)) == ["rank0.0", "rank0.1"]
    gen = _snapstore.latest(base)
    assert gen.step == 200 and gen.seq == 200
    assert max(sizes) <= 2 * (len(gen.data) + len(gen.meta) + 4096)
    _assert_bit_equal(_snapchild.state_of(model, opt), decode(gen)[1])


def test_ring_peers():
    assert ring_peers(0, 4, 1) == [1] and ring_peers(3, 4, 2) == [0, 1] and ring_peers(1, 2, 5) == [0]
    assert ring_peers(0, 1, 1) == []
    with pytest.raises(ValueError, match="node_rank 4 of 4"):
        ring_peers(4, 4, 1)


@pytest.fixture
def agent(shm):
    """A peer node agent's replica server, in its own process."""
    proc = subprocess.Popen([*CHILD, "serve", f"{shm}/peer", "job-token"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip(), f"{shm}/peer"
    finally:
        proc.kill()
        proc.wait()


def test_replicate_to_peer_agent_and_heal_after_local_loss(shm, agent):
    """Node 0 snapshots; its agent pushes to node 1's agent (a process); node 0's memory is lost; node 1 heals it."""
    endpoint, peer_root = agent
    base = f"{shm}/node0/rank0"
    model, opt = _snapchild.build()
    for step in range(1, 5):
        _snapchild.train(model, opt, step)
    snap = Snapshotter(base)
    snap.capture(_snapchild.state_of(model, opt), 4)
    snap.close()
    push_generation(endpoint, "job-token", "node0/rank0", _snapstore.latest(base))
    shutil.rmtree(f"{shm}/node0")  # the whole node is gone, its shared memory with it
    gen = fetch_generation(endpoint, "job-token", "node0/rank0")
    assert gen.step == 4
    from mnemosyne.jit._snapshot import decode

    _assert_bit_equal(_reference(4), decode(gen)[1])
    assert sorted(os.listdir(f"{peer_root}/node0")) == ["rank0.0"]


def _serve(root):
    proc = subprocess.Popen([*CHILD, "serve", root, "job-token"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    return proc, proc.stdout.readline().strip()


@pytest.mark.slow
def test_node_lost_heals_from_next_good_peer(shm):
    """Node 0's agent replicates to two peers (k=2); one peer's copy has a flipped byte; node 0 dies.

    The recovery order (local, then peers) skips the gone local copy and the corrupt peer
    (its copy fails the digest) and heals from the other peer, bit for bit.
    """
    (pa, ea), (pb, eb) = _serve(f"{shm}/a"), _serve(f"{shm}/b")
    try:
        rep = Replicator(f"{shm}/node0", ["rank0"], [ea, eb], "job-token")
        res = subprocess.run([*CHILD, "train", f"{shm}/node0/rank0", "4", "2"], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr[-3000:]
        assert rep.sync() == {}
        top = _snapstore.latest(f"{shm}/node0/rank0")
        assert top.step == 4 and rep.replicated_seq("rank0") == top.seq
        assert rep.sync() == {} and rep.acked == {("rank0", ea): top.seq, ("rank0", eb): top.seq}
        slot = _snapstore.latest(f"{shm}/a/rank0").path
        with open(slot, "r+b") as f:
            f.seek(-7, os.SEEK_END)
            byte = f.read(1)
            f.seek(-7, os.SEEK_END)
            f.write(bytes([byte[0] ^ 1]))
        shutil.rmtree(f"{shm}/node0")  # the node is gone: trainer, agent and its shared memory
        gen, src = fetch_first([f"{shm}/node0", ea, eb], "job-token", "rank0", step=4)
        assert src == eb and gen.step == 4
        _assert_bit_equal(_reference(4), decode(gen)[1])
        with pytest.raises(StateError, match=r"node0.*no complete generation.*fails its blake2b digest"):
            fetch_first([f"{shm}/node0", ea], "job-token", "rank0", step=4)
    finally:
        for p in (pa, pb):
            p.kill()
            p.wait()


def test_flipped_byte_refused_and_previous_replica_kept(shm, agent):
    endpoint, _ = agent
    good = _snapstore.write_generation(f"{shm}/local/r0", 5, b'{"a":1}', os.urandom(1 << 16))
    push_generation(endpoint, "job-token", "n0/r0", good)
    newer = _snapstore.write_generation(f"{shm}/local/r0", 6, b'{"a":1}', os.urandom(1 << 16))
    bad = _snapstore.Generation(newer.seq, newer.step, newer.meta, bytearray(newer.data), newer.digest, newer.path)
    bad.data[12345] ^= 0x10
    with pytest.raises(ReplicationError, match=r"digest .* does not match"):
        push_generation(endpoint, "job-token", "n0/r0", bad)
    kept = fetch_generation(endpoint, "job-token", "n0/r0")
    assert kept.step == 5 and kept.data == good.data
    with pytest.raises(ReplicationError, match="holder name"):
        push_generation(endpoint, "job-token", "../escape", good)


def _gen(step, data, meta=b'{"a":1}'):
    return _snapstore.Generation(0, step, meta, bytearray(data), _snapstore.digest(meta, data), None)


def test_stale_or_replayed_put_refused_and_newer_generation_kept(shm):
    """A put older than the newest generation held (both slots full) is refused and leaves both slots as they were."""
    srv = ReplicaServer(f"{shm}/peer", "job-token")
    srv.start()
    try:
        held, ep = f"{shm}/peer/n1/r3", srv.endpoint
        g20, g40 = _gen(20, os.urandom(1 << 16)), _gen(40, os.urandom(1 << 16))
        assert push_generation(ep, "job-token", "n1/r3", g20) and push_generation(ep, "job-token", "n1/r3", g40)

        def slots():
            return [(g.seq, g.step, g.digest, g.path, bytes(g.data)) for g in _snapstore.generations(held)]

        before = slots()
        assert [s[1] for s in before] == [40, 20]
        for stale in (_gen(30, os.urandom(1 << 16)), g20):  # an older step, and a replay of one
            want = rf"refused n1/r3 \(step {stale.step}\): refused: holder n1/r3 already holds step 40; " \
                   rf"offered step {stale.step} is not newer"
            with pytest.raises(ReplicationError, match=want):
                push_generation(ep, "job-token", "n1/r3", stale)
        with pytest.raises(ReplicationError, match=r"already holds step 40 with digest .*; offered step 40 has digest"):
            push_generation(ep, "job-token", "n1/r3", _gen(40, os.urandom(1 << 16)))
        assert slots() == before
        top = _snapstore.latest(held)
        assert (top.step, top.data) == (40, g40.data)
        assert [(e[0], e[2], (e[3] or "")[:21]) for e in srv.log] == [("put", 20, ""), ("put", 40, "")] + \
            [("put", None, "refused: holder n1/r3")] * 3
        assert [e[1] for e in srv.log] == ["n1/r3"] * 5
        # The same generation again (a retried push): success, nothing written.
        assert push_generation(ep, "job-token", "n1/r3", g40) is False
        assert slots() == before and srv.log[-1] == ("put", "n1/r3", 40, None)
        g50 = _gen(50, os.urandom(1 << 16))
        assert push_generation(ep, "job-token", "n1/r3", g50) is True
        assert [(s[1], s[4]) for s in slots()] == [(50, bytes(g50.data)), (40, bytes(g40.data))]
        assert fetch_generation(ep, "job-token", "n1/r3").data == g50.data
    finally:
        srv.close()


def test_wrong_curve_key_refused(shm, agent):
    endpoint, peer_root = agent
    gen = _snapstore.write_generation(f"{shm}/local/r0", 1, b"{}", b"z" * 1000)
    with pytest.raises(ReplicationError, match="CURVE handshake failed"):
        push_generation(endpoint, "another-job", "n0/r0", gen, timeout=1.0)
    # Knowing the server's public key is not enough: the ZAP handler admits only the job's client key.
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    sock.curve_serverkey = curve_keys("job-token", "server")[0]
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.connect(endpoint)
    sock.send_multipart([json.dumps({"v": 1, "op": "get", "holder": "n0/r0"}).encode()])
    assert sock.poll(1000) == 0
    sock.close()
    ctx.term()
    assert not os.path.exists(f"{peer_root}/n0")
    push_generation(endpoint, "job-token", "n0/r0", gen)  # the right key still works
    assert fetch_generation(endpoint, "job-token", "n0/r0").data == gen.data


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_persisted_snapshot_is_a_verified_checkpoint_with_retention(shm, tmp_path):
    from mnemosyne.jit import ckpt
    from mnemosyne.jit._snappersist import Persister

    base, root = f"{shm}/rank0", tmp_path / "ckpts"
    model, opt = _snapchild.build()
    snap = Snapshotter(base)
    pers = Persister(base, root, keep=2)
    assert pers.persist_once() is None  # nothing to persist yet: not an error
    for step in range(1, 7):
        snap.fence()
        _snapchild.train(model, opt, step)
        if step % 2 == 0:
            snap.capture(_snapchild.state_of(model, opt), step)
            snap.wait()
            assert pers.persist_once() == root / ckpt.checkpoint_name(step)
    assert pers.persist_once() is None  # step 6 is on disk already
    assert [e.step for e in ckpt.list_checkpoints(root) if e.complete] == [4, 6]
    r = subprocess.run([sys.executable, "-m", "mnemosyne.cli", "ckpt", "verify", str(pers.written[-1])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stdout + r.stderr
    state, manifest = ckpt.load(pers.written[-1])
    assert manifest["step"] == 6 and manifest["meta"]["source"] == "snapshot"
    _assert_bit_equal(_snapchild.state_of(model, opt), state)
