"""The NCCL backend on real GPUs (run on the lent GPU machines; skipped on CPU)."""

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from mnemosyne.ccl.nccl import NcclBackend  # noqa: E402
from mnemosyne.core.errors import MissingDependencyError  # noqa: E402

needs_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs a CUDA GPU")


def test_capabilities_without_nccl4py_do_not_raise():
    caps = NcclBackend.capabilities()
    assert set(caps) >= {"shrink", "grow"}


def test_native_switch_is_off_by_default_and_checked(monkeypatch):
    from mnemosyne.ccl.nccl import NATIVE_ENV, _native_children
    from mnemosyne.core.errors import ConfigError

    monkeypatch.delenv(NATIVE_ENV, raising=False)
    assert not _native_children()
    assert not NcclBackend.capabilities()["shrink"]
    monkeypatch.setenv(NATIVE_ENV, "1")
    assert _native_children()
    monkeypatch.setenv(NATIVE_ENV, "yes")
    with pytest.raises(ConfigError, match=NATIVE_ENV):
        _native_children()


def test_missing_nccl4py_names_the_install_line():
    try:
        import nccl.core  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match=r'mnemosyne-ccl\[nccl\]'):
            NcclBackend().library_version()
    else:
        assert NcclBackend().library_version().count(".") == 2


@pytest.mark.gpu
@needs_gpus
@pytest.mark.timeout(600)
@pytest.mark.parametrize("native", ["0", "1"], ids=["fresh-init", "native"])
def test_nccl_bench_shrink_grow_on_gpus(tmp_path, native):
    """The benchmark's rebuild/shrink/grow cycle on real GPUs; ``native``: ncclCommShrink (and
    ncclCommGrow where the loaded NCCL has it) through nccl4py instead of fresh inits."""
    world = min(4, torch.cuda.device_count())
    out = tmp_path / "nccl.json"
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               MNEMOSYNE_NCCL_NATIVE=native)
    proc = subprocess.run([sys.executable, "-m", "mnemosyne.ccl.bench", "--backend", "nccl", "--world", str(world),
                           "--repeats", "3", "--fresh-repeats", "1", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("repair_speedup: ")


needs_one_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_one_gpu
@pytest.mark.timeout(300)
def test_nccl_single_rank_lifecycle(tmp_path):
    """One rank on one GPU: the nccl4py paths (non-blocking init, collectives on torch's current stream,
    rebuild from the cached topology, split, abort) against the real library."""
    from mnemosyne.ccl import StoreClient, StoreServer
    from mnemosyne.core.errors import CommAborted

    srv = StoreServer(jobs={"j": "tok"}).start()
    try:
        store = StoreClient(srv.address, "j", "tok")
        be = NcclBackend(device=0, cache_dir=str(tmp_path / "cache"))
        assert be.library_version().count(".") == 2
        comm = be.create(store, 0, 1)
        assert (comm.rank, comm.size, comm.epoch) == (0, 1, 0)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            t = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
            comm.all_reduce(t)
            comm.broadcast(t, root=0)
            outs = [torch.empty_like(t)]
            comm.all_gather(outs, t)
        torch.cuda.synchronize()
        assert torch.equal(outs[0], torch.arange(1 << 20, dtype=torch.float32, device="cuda"))
        assert any((tmp_path / "cache").rglob("*")), "NCCL topology/graph dumps were not written"
        comm2 = comm.rebuild()
        assert comm2.epoch == 1
        t2 = torch.ones(8, device="cuda")
        comm2.all_reduce(t2)
        assert torch.equal(t2, torch.ones(8, device="cuda"))
        sub = comm2.split(0, 0)
        assert sub is not None and sub.size == 1
        sub.close()
        comm2.abort("test abort")
        with pytest.raises(CommAborted):
            comm2.all_reduce(t2)
        comm2.close()
        store.close()
    finally:
        srv.stop()


@pytest.mark.gpu
@needs_one_gpu
@pytest.mark.timeout(300)
def test_nccl_create_over_a_logical_rank_subset(tmp_path):
    """create(ranks=[3]): one member whose logical rank is 3 (NCCL rank 0), as in a shrunk job."""
    from mnemosyne.ccl import StoreClient, StoreServer

    srv = StoreServer(jobs={"j": "tok"}).start()
    try:
        store = StoreClient(srv.address, "j", "tok")
        comm = NcclBackend(device=0, cache_dir=str(tmp_path / "cache")).create(store, 3, 1, ranks=[3])
        assert (comm.rank, comm.size, tuple(comm.ranks), comm.physical_rank) == (3, 1, (3,), 0)
        t = torch.full((16,), 2.0, device="cuda")
        comm.all_reduce(t)
        comm.broadcast(t, root=3)
        torch.cuda.synchronize()
        assert torch.equal(t, torch.full((16,), 2.0, device="cuda"))
        comm.close()
        store.close()
    finally:
        srv.stop()


@pytest.mark.gpu
@needs_one_gpu
@pytest.mark.timeout(300)
def test_nccl_async_all_reduce_on_a_side_stream(tmp_path):
    """all_reduce(async_op=True): ordered after the caller's queued work, waited once, abort-aware."""
    from mnemosyne.ccl import StoreClient, StoreServer
    from mnemosyne.core.comm import ReduceOp
    from mnemosyne.core.errors import CommAborted

    srv = StoreServer(jobs={"j": "tok"}).start()
    try:
        store = StoreClient(srv.address, "j", "tok")
        comm = NcclBackend(device=0, cache_dir=str(tmp_path / "cache")).create(store, 0, 1)
        t = torch.zeros(1 << 22, device="cuda")
        torch.cuda._sleep(200_000_000)  # ~0.1 s of device time queued before the producer
        t.fill_(3.0)
        work = comm.all_reduce(t, ReduceOp.AVG, async_op=True)  # AVG reads and writes t on the side stream
        assert not work.is_completed()
        work.wait()
        assert work.is_completed()
        assert torch.equal(t, torch.full_like(t, 3.0))  # it ran after fill_, on the caller's order
        works = [comm.all_reduce(x, ReduceOp.SUM, async_op=True) for x in (torch.ones(8, device="cuda"),) * 3]
        for w in reversed(works):
            w.wait()
        torch.cuda._sleep(200_000_000)
        late = comm.all_reduce(torch.ones(8, device="cuda"), ReduceOp.AVG, async_op=True)
        comm.abort("test abort")
        with pytest.raises(CommAborted):
            late.wait()
        comm.close()
        store.close()
    finally:
        srv.stop()
