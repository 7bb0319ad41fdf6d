"""GradSync v2: gradients in the buckets, reductions launched from backward, one wait.

Real Gloo groups (mnemosyne-ccl and the torch fallback) between threads of this
process, real autograd hooks; every expected value is computed independently with
plain torch and compared bit for bit.
"""

import threading
import time

import pytest
import torch

from mnemosyne.ccl.gloo import GlooBackend
from mnemosyne.ccl.store_client import StoreClient
from mnemosyne.ccl.store_server import StoreServer
from mnemosyne.core.comm import ReduceOp
from mnemosyne.core.errors import CommAborted, ConfigError, PeerFailureError
from mnemosyne.jit._gradsync import GradSync

WORLD = 2
# The ranks are threads of one process: seeding torch's global RNG and drawing the initial
# weights must not interleave between them.
_INIT = threading.Lock()


def _model(seed=0):
    with _INIT:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32),
                                   torch.nn.GELU(), torch.nn.Linear(32, 4))


def _batch(rank, i, n=8):
    g = torch.Generator().manual_seed(1000 * rank + i)
    return torch.randn(n, 16, generator=g), torch.randn(n, 4, generator=g)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _run(fn, world=WORLD, timeout=30.0):
    """fn(rank, comm) in one thread per rank over a real ccl Gloo group; returns {rank: result}."""
    srv = StoreServer(jobs={"j": "t"}).start()
    out = {}
    try:
        store = StoreClient(srv.address, "j", "t", timeout=20)

        def body(r):
            try:
                comm = GlooBackend().create(store, r, world, timeout=20)
                try:
                    out[r] = fn(r, comm)
                finally:
                    comm.close()
            except BaseException as exc:
                out[r] = exc

        ts = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
        for t in ts:
            t.start()
        deadline = time.monotonic() + timeout
        for t in ts:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in ts), out
    finally:
        srv.stop()
    return out


def _reference_grads(micro, world=WORLD):
    """Average over ranks of each rank's locally accumulated gradients (plain torch, no hooks)."""
    per_rank = []
    for r in range(world):
        m = _model()
        for i in range(micro):
            _loss(m, *_batch(r, i)).backward()
        per_rank.append([p.grad.clone() for p in m.parameters()])
    # Two members: a Gloo sum of two numbers is exact whatever the order; / 2 is exact.
    return [(a + b) / world for a, b in zip(*per_rank, strict=True)]


@pytest.mark.timeout(60)
def test_reductions_launch_during_backward_and_grads_are_bucket_views():
    def fn(rank, comm):
        m = _model()
        launches = []
        gs = GradSync(list(m.parameters()), bucket_bytes=1024 * 4, comm=comm,
                      on_launch=lambda i, in_backward: launches.append(in_backward))
        gs.begin()
        _loss(m, *_batch(rank, 0)).backward()
        in_backward = sum(launches)
        gs.sync()
        views = all(any(p.grad.data_ptr() == v.data_ptr() for b in gs.buckets for v in b.views)
                    for p in m.parameters())
        gs.close()
        assert not any(p.grad.data_ptr() == v.data_ptr() for b in gs.buckets for v in b.views
                       for p in m.parameters())  # detached, values kept
        return [p.grad for p in m.parameters()], in_backward, len(gs.buckets), views

    out = _run(fn)
    want = _reference_grads(1)
    for r in range(WORLD):
        assert not isinstance(out[r], BaseException), out[r]
        grads, in_backward, nbuckets, views = out[r]
        assert nbuckets >= 3
        assert in_backward == nbuckets  # every bucket was launched from a gradient hook
        assert views  # no copy out: .grad were views into the buckets until close()
        for g, w in zip(grads, want, strict=True):
            assert torch.equal(g, w)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["no_sync", "final_flag_per_micro_batch"])
def test_accumulation_over_four_micro_batches_reduces_once(how):
    """4 backward passes, only the last launches: equal to reducing the accumulated gradient once."""
    def fn(rank, comm):
        m = _model()
        launches = []
        gs = GradSync(list(m.parameters()), bucket_bytes=1024 * 4, comm=comm,
                      on_launch=lambda i, in_backward: launches.append(i))
        gs.begin()
        for i in range(4):
            gs.final = i == 3  # what job.no_sync() and step.micro_batches() set
            _loss(m, *_batch(rank, i)).backward()
            if i < 3:
                assert not launches
        gs.sync()
        out = [p.grad.clone() for p in m.parameters()]
        gs.close()
        return out, len(launches), len(gs.buckets)

    out = _run(fn)
    want = _reference_grads(4)
    for r in range(WORLD):
        assert not isinstance(out[r], BaseException), out[r]
        grads, n_launch, nbuckets = out[r]
        assert n_launch == nbuckets  # one reduction per bucket for the four backward passes
        for g, w in zip(grads, want, strict=True):
            assert torch.equal(g, w)
    # And the accumulated average is (up to rounding) the gradient of one big batch.
    big = _model()
    xs, ys = zip(*(_batch(r, i) for r in range(WORLD) for i in range(4)), strict=True)
    (_loss(big, torch.cat(xs), torch.cat(ys)) * 4).backward()
    for g, p in zip(want, big.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.timeout(60)
def test_a_second_backward_into_launched_buckets_is_refused():
    def fn(rank, comm):
        m = _model()
        gs = GradSync(list(m.parameters()), bucket_bytes=1024 * 4, comm=comm)
        gs.begin()
        _loss(m, *_batch(rank, 0)).backward()
        try:
            _loss(m, *_batch(rank, 1)).backward()
        except ConfigError as exc:
            err = str(exc)
        else:
            err = None
        gs.close()
        return err

    out = _run(fn)
    for r in range(WORLD):
        assert isinstance(out[r], str) and "no_sync" in out[r], out[r]


@pytest.mark.timeout(60)
def test_unused_parameter_and_manual_grads_still_reduce_in_fixed_order():
    """A parameter without a gradient holds back its bucket until sync(), which reduces zeros for it."""
    def fn(rank, comm):
        m = _model()
        extra = torch.nn.Parameter(torch.ones(3))  # never used in forward
        params = [extra, *m.parameters()]
        gs = GradSync(params, bucket_bytes=1024 * 4, comm=comm)
        gs.begin()
        _loss(m, *_batch(rank, 0)).backward()
        gs.sync()
        out = extra.grad.clone(), [p.grad.clone() for p in m.parameters()]
        gs.close()
        return out

    out = _run(fn)
    want = _reference_grads(1)
    for r in range(WORLD):
        assert not isinstance(out[r], BaseException), out[r]
        extra, grads = out[r]
        assert torch.equal(extra, torch.zeros(3))
        for g, w in zip(grads, want, strict=True):
            assert torch.equal(g, w)


@pytest.mark.timeout(60)
def test_async_all_reduce_work_honours_abort():
    """An asynchronous all-reduce whose peer never joins: abort from another thread ends wait() at once."""
    comms = {}
    released = threading.Event()

    def fn(rank, comm):
        comms[rank] = comm
        if rank == 1:
            released.wait(20)
            return "idle"
        t = torch.ones(4)
        work = comm.all_reduce(t, ReduceOp.SUM, async_op=True)
        assert not work.is_completed()
        threading.Timer(0.3, comm.abort, args=("test",)).start()
        start = time.monotonic()
        try:
            work.wait()
        except (CommAborted, PeerFailureError):
            return time.monotonic() - start
        finally:
            released.set()
        return "completed"

    out = _run(fn)
    assert isinstance(out[0], float) and out[0] < 2.0, out


@pytest.mark.timeout(60)
def test_async_all_reduce_of_the_torch_fallback():
    import torch.distributed as dist

    from mnemosyne.jit._comm import TorchBackend
    from mnemosyne.jit._store import TorchStore

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = {}

    def body(r):
        try:
            store = TorchStore(dist.TCPStore("127.0.0.1", server.port, is_master=False)).prefixed("t")
            comm = TorchBackend("gloo").create(store, r, 2, epoch=0, timeout=30)
            t = torch.full((5,), float(r + 1))
            works = [comm.all_reduce(t, ReduceOp.SUM, async_op=True)]
            u = torch.full((3,), 10.0 * (r + 1))
            works.append(comm.all_reduce(u, ReduceOp.MAX, async_op=True))
            for w in reversed(works):  # any wait order
                w.wait()
            assert all(w.is_completed() for w in works)
            out[r] = (t.tolist(), u.tolist())
            comm.close()
        except BaseException as exc:
            out[r] = exc

    ts = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert out == {0: ([3.0] * 5, [20.0] * 3), 1: ([3.0] * 5, [20.0] * 3)}, out
