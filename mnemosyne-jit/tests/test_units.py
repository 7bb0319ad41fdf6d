import math
import threading
import time

import pytest
import torch

from mnemosyne.core.comm import ReduceOp
from mnemosyne.core.errors import CommAborted, ConfigError, StateError
from mnemosyne.jit._comm import TorchBackend
from mnemosyne.jit._gradsync import GradSync
from mnemosyne.jit._state import (
    assign_stripes,
    flatten,
    pack,
    pack_plan,
    spec_of,
    unflatten,
    unpack,
)
from mnemosyne.jit._store import host_store
from mnemosyne.jit.data import DataCursor, ResumableSampler
from mnemosyne.jit.inject import FaultPlan, parse_plans


def test_flatten_roundtrip_keeps_types_and_bits():
    t1 = torch.randn(3, 4)
    t2 = torch.tensor(5.0)
    obj = {"a": (1, 2.5, None), 7: [t1, {"x": t2, "nan": float("nan"), "f": 0.1 + 0.2}], "s": "text", "b": True}
    tensors = []
    skel = flatten(obj, tensors)
    import json

    skel = json.loads(json.dumps(skel))  # what travels through the store
    back = unflatten(skel, tensors)
    assert isinstance(back["a"], tuple) and back["a"] == (1, 2.5, None)
    assert 7 in back and back[7][0] is t1 and back[7][1]["x"] is t2
    assert back[7][1]["f"] == 0.1 + 0.2 and math.isnan(back[7][1]["nan"])
    assert back["s"] == "text" and back["b"] is True


def test_flatten_rejects_unknown_objects_naming_the_path():
    with pytest.raises(StateError, match="/k/0"):
        flatten({"k": [object()]}, [])


def test_stripes_balance_and_pack_roundtrip():
    ts = [torch.randn(100), torch.randn(10, 10), torch.tensor(3.0), torch.tensor([True, False]), torch.arange(7)]
    specs = [spec_of(t) for t in ts]
    owner = assign_stripes(specs, [0, 2])
    assert owner == assign_stripes(specs, [0, 2])  # deterministic
    assert set(owner) == {0, 2}
    for donor in (0, 2):
        for idxs in pack_plan(specs, owner, donor):
            buf = pack([ts[i] for i in idxs], torch.device("cpu"))
            out = unpack(buf, [specs[i] for i in idxs], torch.device("cpu"))
            for i, t in zip(idxs, out, strict=True):
                assert t.dtype == ts[i].dtype and torch.equal(t, ts[i])


def test_fault_plans_parse_and_validate():
    plans = parse_plans("rank=1,step=3,kind=kill,phase=forward; rank=2,step=4,kind=hang")
    assert plans[0] == FaultPlan(1, 3, "kill", "forward", "env0")
    assert plans[1].phase == "forward" and plans[1].plan_id == "env1"
    with pytest.raises(ConfigError, match="kind"):
        parse_plans("rank=1,step=3,kind=explode")
    with pytest.raises(ConfigError, match="missing"):
        parse_plans("rank=1,kind=kill")
    with pytest.raises(ConfigError, match="phase"):
        parse_plans("rank=1,step=2,kind=kill,phase=loss")


def test_resumable_sampler_seek_equals_tail():
    s = ResumableSampler(101, num_replicas=4, rank=1, shuffle=True, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2)
    s.seek(10)
    assert list(s) == full[10:]
    assert len(full) == 26
    s.set_epoch(3)
    assert list(s) != full


def test_data_cursor_repositions_exactly():
    from torch.utils.data import DataLoader

    data = torch.arange(40)
    sampler = ResumableSampler(40, num_replicas=2, rank=0, shuffle=True, seed=1)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    seq = DataCursor(loader)
    want = [seq.batch(k).tolist() for k in range(12)]  # crosses two epoch boundaries
    jump = DataCursor(loader)
    assert jump.batch(7).tolist() == want[7]
    assert jump.batch(7).tolist() == want[7]  # asked again: same batch
    assert jump.batch(8).tolist() == want[8]
    assert jump.batch(5).tolist() == want[5]  # back after a recovery
    assert [jump.batch(k).tolist() for k in range(6, 12)] == want[6:]
    plain = DataCursor([[1], [2], [3]])  # no seekable sampler: replayed
    assert plain.batch(4) == [2]


def _pair(port_store, size, fn):
    """Run fn(rank, comm) for ranks 0..size-1 in threads of this process over a real Gloo group."""
    backend = TorchBackend("gloo")
    results, errors = {}, {}

    def body(rank):
        try:
            store = port_store.clone().prefixed("t")
            comm = backend.create(store, rank, size, epoch=0, timeout=30)
            results[rank] = fn(rank, comm)
        except BaseException as exc:
            errors[rank] = exc

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    return threads, results, errors


@pytest.mark.timeout(60)
def test_gradsync_averages_with_a_fixed_layout():
    server = host_store()
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    grads = []
    for r, m in enumerate(models):
        for p in m.parameters():
            p.grad = torch.full_like(p, float(r + 1))
        grads.append([p.grad.clone() for p in m.parameters()])

    def fn(rank, comm):
        gs = GradSync(list(models[rank].parameters()), bucket_bytes=64 * 4)
        gs.sync(comm)
        return len(gs.buckets)

    threads, results, errors = _pair(server, 2, fn)
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert results[0] == results[1] >= 2  # several buckets, same layout on both ranks
    for p0, p1 in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p0.grad, p1.grad)
        assert torch.all(p0.grad == 1.5)


@pytest.mark.timeout(60)
def test_abort_wakes_a_blocked_collective_at_once():
    server = host_store()
    released = threading.Event()
    comms = {}

    def fn(rank, comm):
        comms[rank] = comm
        if rank == 1:
            released.wait(20)  # never joins the all-reduce: rank 0 stays blocked
            return "idle"
        t = torch.ones(4)
        start = time.monotonic()
        try:
            comm.all_reduce(t, ReduceOp.SUM)
        except CommAborted:
            return time.monotonic() - start
        return "completed"

    threads, results, errors = _pair(server, 2, fn)
    while 0 not in comms:
        time.sleep(0.01)
    time.sleep(0.3)
    comms[0].abort("test")
    threads[0].join(10)
    released.set()
    threads[1].join(10)
    assert not errors, errors
    assert isinstance(results[0], float) and results[0] < 2.0
    assert comms[0].aborted
    with pytest.raises(CommAborted):
        comms[0].all_reduce(torch.ones(1))


@pytest.mark.timeout(30)
def test_ccl_store_refuses_a_wrong_token_and_serves_the_right_one(monkeypatch):
    from mnemosyne.core.env import MNEMOSYNE_JIT_BACKEND
    from mnemosyne.core.errors import AuthError
    from mnemosyne.jit._store import connect_job_store, host_job_store

    monkeypatch.delenv(MNEMOSYNE_JIT_BACKEND, raising=False)
    host = host_job_store("jobA", "s3cret")
    try:
        assert host.kind == "ccl"
        host.store.set("k", b"v")
        with pytest.raises(AuthError):
            connect_job_store(host.addr, "jobA", "wrong", timeout=5.0)
        with pytest.raises(AuthError):
            connect_job_store(host.addr, "jobB", "s3cret", timeout=5.0)
        with pytest.raises(ConfigError, match="token"):
            connect_job_store(host.addr, "jobA", None, timeout=5.0)
        good = connect_job_store(host.addr, "jobA", "s3cret", timeout=5.0)
        assert good.get("k", 5.0) == b"v"
    finally:
        host.stop()


@pytest.mark.timeout(30)
def test_backend_selection_env(monkeypatch):
    from mnemosyne.core.env import MNEMOSYNE_JIT_BACKEND
    from mnemosyne.jit._select import backend_label, use_ccl
    from mnemosyne.jit._store import host_job_store

    monkeypatch.setenv(MNEMOSYNE_JIT_BACKEND, "torch")
    assert not use_ccl()
    host = host_job_store("jobT", "tok")
    assert host.kind == "torch"
    host.store.set("k", b"v")
    assert host.store.get("k", 5.0) == b"v"
    monkeypatch.setenv(MNEMOSYNE_JIT_BACKEND, "ccl")
    assert use_ccl()  # the test env installs mnemosyne-ccl
    monkeypatch.setenv(MNEMOSYNE_JIT_BACKEND, "mpi")
    with pytest.raises(ConfigError, match="expected"):
        use_ccl()
    assert backend_label(True, "cpu") == "ccl-gloo"
    assert backend_label(False, "cuda") == "torch-nccl"


def test_agreement_never_takes_a_reattached_rank_as_donor():
    """Re-attached ranks (mnemo launch --proxy) hold heavy state only: partial receivers at the top, else full."""
    import json

    from mnemosyne.core.errors import RecoveryError
    from mnemosyne.jit import _keys
    from mnemosyne.jit._recovery import NO_STATE, Rendezvous, agree

    store = host_store()
    ev = threading.Event()

    def plan(epoch, others, mine, reattached=False):
        for r, (c, att) in others.items():
            body = {"committed": c, "started": -1, "reattached": att}
            store.set(_keys.committed(epoch, r), json.dumps(body).encode())
        return agree(Rendezvous(store, epoch, 0, ev, 5), [0, *others], mine, -1, reattached=reattached)

    p = plan(1, {1: (5, True), 2: (NO_STATE, False), 3: (5, False)}, 5)
    assert (p.top, p.donors, p.receivers, p.partial) == (5, [0, 3], [1, 2], [1])
    # Arena ahead of every full holder (died after its commit marker, peers torn): a full receiver.
    p = plan(2, {1: (6, True), 2: (5, False), 3: (5, False)}, 5)
    assert (p.top, p.donors, p.receivers, p.partial) == (5, [0, 2, 3], [1], [])
    # First rendezvous: the lowest rank that is not re-attached donates.
    p = plan(3, {1: (NO_STATE, False), 2: (NO_STATE, False), 3: (NO_STATE, False)}, 3, reattached=True)
    assert (p.top, p.donors, p.receivers, p.partial) == (-1, [1], [0, 2, 3], [])
    with pytest.raises(RecoveryError, match=r"every member .* re-attached"):
        plan(4, {1: (4, True), 2: (4, True), 3: (4, True)}, 4, reattached=True)


def test_joining_reads_the_start_epoch_and_names_a_bad_value(monkeypatch):
    import mnemosyne.jit as mj
    from mnemosyne.core.env import MNEMOSYNE_EPOCH

    monkeypatch.delenv(MNEMOSYNE_EPOCH, raising=False)
    assert not mj.joining()  # not launched by mnemo: a plain process starts the job
    monkeypatch.setenv(MNEMOSYNE_EPOCH, "0")
    assert not mj.joining()  # an initial rank
    monkeypatch.setenv(MNEMOSYNE_EPOCH, "3")
    assert mj.joining()  # started for epoch 3: a replacement or a grow-back newcomer
    monkeypatch.setenv(MNEMOSYNE_EPOCH, "three")
    with pytest.raises(ConfigError, match=MNEMOSYNE_EPOCH):
        mj.joining()


def test_demo_build_without_init_matches_the_initialised_layout():
    """A replacement's uninitialised demo model has the same parameters, ties and optimizer groups."""
    from mnemosyne.jit.demo.train import build, parse_args

    args = parse_args(["--layers", "2", "--dim", "32", "--heads", "2", "--block", "16", "--vocab", "64"])
    ref, ref_opt, _, _ = build(args, torch.device("cpu"))
    model, opt, _, _ = build(args, torch.device("cpu"), init_weights=False)
    assert model.head.weight is model.tok.weight
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert list(model.state_dict()) == list(ref.state_dict())
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in ref_opt.param_groups]
    model.load_state_dict(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))


def test_step_state_transitions_torn_only_after_an_applied_update():
    from mnemosyne.jit._stepstate import Position, StepState

    s0 = StepState(pos=Position(committed=-1, epoch=2))
    s = s0.enter(5, grads_were_none=False).synced_now()
    assert (s.started, s.synced, s.applied, s.grads_were_none) == (5, 5, -1, False)
    assert not s.discard(5).torn  # aborted before the optimizer ran: the replica still holds step 4
    s = s.applied_now()
    assert s.applied == 5 and s.discard(5).torn and not s.discard(6).torn
    torn = s.discard(5).fail()
    assert torn.needs_recovery and torn.started == 5 and s0.started == -1  # values, not shared flags
    back = torn.reattach().recovered()
    assert (back.synced, back.applied, back.torn, back.needs_recovery, back.reattached) == (-1, -1, False, False, False)
    assert back.started == 5 and back.idle().started == -1 and torn.fail(forget_started=True).started == -1
    moved = back.at(6, "forward", False, 5, 3)
    assert moved.pos.as_dict() == {"step": 6, "phase": "forward", "coll": False, "committed": 5, "epoch": 3}
    assert back.pos == s0.pos == Position(0, "init", True, -1, 2)
