"""The Gloo backend with one thread per rank in one process (fast), over the real store server.

The multi-process, real-SIGKILL cases live in test_faults.py.
"""

import gc
import threading
import time

import pytest
import torch

from mnemosyne.ccl import backend, signal_abort
from mnemosyne.ccl.gloo import GlooBackend
from mnemosyne.ccl.store_client import StoreClient
from mnemosyne.ccl.store_server import StoreServer
from mnemosyne.core.comm import ReduceOp
from mnemosyne.core.errors import CommAborted, ConfigError, PeerFailureError, StaleEpochError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store():
    srv = StoreServer(jobs={"j": "t"}).start()
    yield StoreClient(srv.address, "j", "t", timeout=20)
    srv.stop()


def run_ranks(n, fn, timeout=30):
    """Run fn(rank) on n threads; return results (exceptions are returned, not raised)."""
    out = {}

    def _go(r):
        try:
            out[r] = fn(r)
        except Exception as exc:
            out[r] = exc

    ts = [threading.Thread(target=_go, args=(r,), daemon=True) for r in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    assert not any(t.is_alive() for t in ts), f"ranks still running after {timeout} s: {out}"
    return [out[r] for r in range(n)]


def test_entry_point_and_collectives_exact(store):
    assert isinstance(backend("gloo"), GlooBackend)

    def body(r):
        c = GlooBackend().create(store, r, 4, timeout=10)
        res = {}
        for op, want in ((ReduceOp.SUM, 10.0), (ReduceOp.MAX, 4.0), (ReduceOp.MIN, 1.0), (ReduceOp.PRODUCT, 24.0),
                         (ReduceOp.AVG, 2.5)):
            t = torch.full((5,), float(r + 1))
            c.all_reduce(t, op)
            res[op.value] = bool(torch.all(t == want))
        t = torch.full((3,), float(r))
        c.broadcast(t, root=2)
        res["bcast"] = t.tolist() == [2.0] * 3
        outs = [torch.zeros(2) for _ in range(4)]
        c.all_gather(outs, torch.full((2,), float(r)))
        res["gather"] = [o[0].item() for o in outs] == [0.0, 1.0, 2.0, 3.0]
        o = torch.zeros(2)
        c.reduce_scatter(o, [torch.full((2,), float(10 * r + i)) for i in range(4)])
        res["rs"] = o[0].item() == sum(10 * q + r for q in range(4))
        if r == 0:
            c.send(torch.tensor([7.0]), dst=3)
        if r == 3:
            x = torch.zeros(1)
            c.recv(x, src=0)
            res["p2p"] = x.item() == 7.0
        c.barrier()
        with pytest.raises(ConfigError, match="expected 4 tensors"):
            c.all_gather([torch.zeros(1)], torch.zeros(1))
        c.close()
        return res

    for r, res in enumerate(run_ranks(4, body)):
        assert not isinstance(res, Exception), res
        assert all(res.values()), (r, res)


def test_split_orders_by_key_and_skips_negative_color(store):
    def body(r):
        c = GlooBackend().create(store, r, 4, timeout=10)
        color = -1 if r == 3 else r % 2
        s = c.split(color, key=-r)
        if s is None:
            return None
        t = torch.tensor([float(r)])
        s.all_reduce(t)
        return s.rank, s.size, t.item(), s.epoch

    res = run_ranks(4, body)
    # color 0: ranks {0, 2} ordered by key -r: 2 first; color 1: {1} alone; rank 3 out.
    assert res == [(1, 2, 2.0, 0), (0, 1, 1.0, 0), (0, 2, 2.0, 0), None]


def test_abort_from_another_thread_unblocks_promptly(store):
    def body(r):
        c = GlooBackend().create(store, r, 3, timeout=20)
        c.all_reduce(torch.ones(1))
        if r == 2:
            time.sleep(3)  # never joins the next all_reduce in time
            return "absent"
        threading.Timer(0.5, c.abort, args=("watchdog saw epoch 1",)).start()
        t0 = time.monotonic()
        with pytest.raises(CommAborted, match="watchdog saw epoch 1"):
            c.all_reduce(torch.ones(1))
        took = time.monotonic() - t0
        with pytest.raises(CommAborted):  # later calls fail at once too
            c.barrier()
        return took

    res = run_ranks(3, body)
    assert res[2] == "absent"
    for took in res[:2]:
        assert not isinstance(took, Exception), took
        assert 0.4 < took < 1.5, took


def test_signal_abort_from_outside_reaches_every_member(store):
    def body(r):
        c = GlooBackend().create(store, r, 3, timeout=20)
        if r == 0:
            time.sleep(0.5)
            signal_abort(store, 0, "agent: rank 0 hung")
            time.sleep(2)  # keep the group open: its sockets must not be what wakes the others
            c.close()
            return "agent"
        with pytest.raises(PeerFailureError, match="agent: rank 0 hung"):
            c.all_reduce(torch.ones(1))
        return "raised"

    assert run_ranks(3, body) == ["agent", "raised", "raised"]


def test_an_interrupted_rebuild_releases_the_old_group_off_the_callers_thread(store):
    # Seen in a 4-rank job (two ranks lost at once): the rebuild to epoch 1 was aborted by
    # the next epoch; the old group, left with a collective in flight, was then freed with
    # the exception's traceback, in the trainer's main thread, whose ProcessGroupGloo
    # destructor waited for that collective up to the group's timeout: the job hung.
    done = threading.Event()

    def body(r):
        c = GlooBackend().create(store, r, 2, timeout=30)
        if r == 0:  # alive, its socket open, but never joins rank 1's all_reduce
            done.wait(25)
            c.close()
            return "peer"
        work = c.all_reduce(torch.ones(1), async_op=True)
        threading.Timer(0.5, signal_abort, args=(store, 1, "membership epoch 2 published")).start()
        t0 = time.monotonic()
        try:
            with pytest.raises(CommAborted, match="epoch 2 published"):
                c.rebuild()  # rank 0 never comes: only the abort ends the build
            del c, work  # the last references: nothing may now wait for the stuck all_reduce
            gc.collect()
            return time.monotonic() - t0
        finally:
            done.set()

    res = run_ranks(2, body)
    assert res[0] == "peer"
    assert not isinstance(res[1], Exception), res[1]
    assert 0.4 < res[1] < 5.0, res[1]  # the abort after 0.5 s; the old group's timeout is 30 s


def test_rebuild_and_shrink_grow_keep_logical_ranks(store):
    def body(r):
        c = GlooBackend().create(store, r, 4, timeout=10)
        c = c.rebuild()
        assert c.epoch == 1 and c.ranks == (0, 1, 2, 3)
        if r == 1:
            c.close()
            c = GlooBackend().join(store, 1, epoch=3, timeout=10)
        else:
            c = c.shrink([1])
            assert c.ranks == (0, 2, 3) and c.size == 3 and c.rank == r
            outs = [torch.zeros(1) for _ in range(3)]
            c.all_gather(outs, torch.tensor([float(r)]))
            assert [o.item() for o in outs] == [0.0, 2.0, 3.0]
            t = torch.zeros(1)
            if r == 0:
                t.fill_(5)
            c.broadcast(t, root=0)
            assert t.item() == 5
            c = c.grow([1])
        t = torch.tensor([float(r + 1)])
        c.all_reduce(t)
        return c.epoch, c.rank, c.ranks, t.item(), c.physical_rank

    res = run_ranks(4, body)
    assert res == [(3, r, (0, 1, 2, 3), 10.0, r) for r in range(4)]


def test_wrong_size_fails_fast_on_every_rank(store):
    def body(r):
        t0 = time.monotonic()
        try:
            GlooBackend().create(store, r, 3 if r == 2 else 4, timeout=20)
        except (ConfigError, CommAborted) as exc:
            return type(exc).__name__, str(exc), time.monotonic() - t0
        return "created"

    res = run_ranks(4, body)
    for _name, text, took in res:
        assert "membership disagreement" in text, text
        assert took < 5, took  # never the 20 s timeout


def test_stale_epoch_and_bad_membership_calls(store):
    def body(r):
        c = GlooBackend().create(store, r, 2, timeout=10)
        c2 = c.rebuild()
        return c, c2

    (c0, c0b), (_c1, c1b) = run_ranks(2, body)
    with pytest.raises(StaleEpochError, match="stale"):
        GlooBackend().create(store, 0, 2, epoch=0, timeout=5)
    with pytest.raises(StaleEpochError, match="already at epoch 1"):
        GlooBackend().join(store, 1, epoch=0, timeout=5)
    with pytest.raises(ConfigError, match="not members"):
        c0b.shrink([7])
    with pytest.raises(ConfigError, match="only survivors"):
        c0b.shrink([0])
    with pytest.raises(ConfigError, match="already members"):
        c0b.grow([1])
    with pytest.raises(CommAborted):  # superseded epoch
        c0.all_reduce(torch.ones(1))
    with pytest.raises(ConfigError, match="0 <= rank < size"):
        GlooBackend().create(store, 2, 2, epoch=5)
    for c in (c0b, c1b):
        c.close()


def test_create_over_ranks_with_a_gap_then_grow(store):
    """create(ranks=[0, 1, 3]): a group whose logical ranks skip 2 (a shrunk job), then 2 joins."""
    logical = [0, 1, 3, 2]  # thread i holds logical[i]; the last one is the newcomer

    def body(i):
        r = logical[i]
        if r == 2:
            c = GlooBackend().join(store, 2, epoch=1, timeout=10)
        else:
            c = GlooBackend().create(store, r, 3, epoch=0, timeout=10, ranks=[0, 1, 3])
            assert (c.rank, c.size, c.ranks, c.physical_rank) == (r, 3, (0, 1, 3), [0, 1, 3].index(r))
            t = torch.tensor([float(r)])
            c.all_reduce(t)
            assert t.item() == 4.0
            t = torch.tensor([float(r)])
            c.broadcast(t, root=3)
            assert t.item() == 3.0
            outs = [torch.zeros(1) for _ in range(3)]
            c.all_gather(outs, torch.tensor([float(r)]))
            assert [o.item() for o in outs] == [0.0, 1.0, 3.0]
            if r == 3:
                c.send(torch.tensor([9.0]), dst=0)
            if r == 0:
                x = torch.zeros(1)
                c.recv(x, src=3)
                assert x.item() == 9.0
            c = c.grow([2])
        t = torch.tensor([float(r + 1)])
        c.all_reduce(t)
        return c.epoch, c.rank, c.ranks, t.item()

    res = run_ranks(4, body)
    assert res == [(1, r, (0, 1, 2, 3), 10.0) for r in logical], res


def test_create_ranks_checked(store):
    with pytest.raises(ConfigError, match="not in the member list"):
        GlooBackend().create(store, 2, 3, ranks=[0, 1, 3])
    with pytest.raises(ConfigError, match="name 2 members"):
        GlooBackend().create(store, 0, 3, ranks=[0, 1])
    with pytest.raises(ConfigError, match="duplicate"):
        GlooBackend().create(store, 0, 3, ranks=[0, 0, 1])
