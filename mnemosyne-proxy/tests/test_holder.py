"""The trainer side in-process: StateHolder conformance, adopt, pull through the holder."""

import subprocess
import sys

import pytest
import torch

from mnemosyne.core.errors import StateError
from mnemosyne.core.state import CommitStatus, StateHolder
from mnemosyne.proxy import ProxyStateHolder, adopt
from mnemosyne.proxy.testing import ProxyProcess

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def pair(tmp_path):
    a = ProxyProcess(tmp_path / "a", size="8M", token="t")
    b = ProxyProcess(tmp_path / "b", size="8M", token="t")
    yield a, b
    a.stop()
    b.stop()


def _model():
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 3)
    return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


def test_holder_is_a_state_holder_and_tensors_live_in_the_arena(pair):
    a, _ = pair
    h = ProxyStateHolder(a.socket, token="t", job="job")
    assert isinstance(h, StateHolder)
    res = h.attach()
    assert (res.status, res.step, dict(res.tensors)) == (CommitStatus.EMPTY, -1, {})
    h.begin_update(0)
    t = h.allocate("model/x", "float64", (3, 5))
    t.copy_(torch.arange(15, dtype=torch.float64).view(3, 5))
    h.commit(0)
    base = h.spaces[0].address
    assert base <= t.data_ptr() < base + h.spaces[0].space.capacity
    assert h.tensor("model/x") is t and h.meta("model/x").shape == (3, 5)
    assert h.status() == (CommitStatus.COMMITTED, 0, "")
    with pytest.raises(StateError, match="no tensor named 'nope'"):
        h.tensor("nope")
    h.close()


def test_adopt_fresh_then_reattach_without_copy_and_layout_check(pair):
    a, _ = pair
    m, opt = _model()
    h = ProxyStateHolder(a.socket, token="t", job="job")
    res = adopt(m, opt, h, grads=True)
    assert (res.status, res.step, res.resumed) == (CommitStatus.COMMITTED, 0, False)
    m(torch.ones(2, 8)).sum().backward()
    grad_ptr = m.weight.grad.data_ptr()
    h.begin_update(1)
    opt.step()
    h.commit(1)
    opt.zero_grad()
    assert m.weight.grad is not None and m.weight.grad.data_ptr() == grad_ptr  # kept in the arena
    want = {k: v.clone() for k, v in [("w", m.weight.data), ("mom", opt.state[m.weight]["momentum_buffer"])]}
    h.close()
    # a "restarted trainer": fresh model, re-attached state, no copy
    m2, opt2 = _model()
    h2 = ProxyStateHolder(a.socket, token="t", job="job")
    res = adopt(m2, opt2, h2, grads=True)
    assert (res.status, res.step, res.resumed) == (CommitStatus.COMMITTED, 1, True)
    assert torch.equal(m2.weight.data, want["w"]) and torch.equal(opt2.state[m2.weight]["momentum_buffer"], want["mom"])
    assert m2.weight.data_ptr() == h2.tensor("model/weight").data_ptr()
    h2.close()
    # a model whose shapes changed is refused
    bigger = torch.nn.Linear(8, 4)
    h3 = ProxyStateHolder(a.socket, token="t", job="job")
    with pytest.raises(StateError, match="model/weight"):
        adopt(bigger, None, h3)
    h3.close()


def test_holder_pull_fills_tensors_in_place(pair):
    a, b = pair
    hb = ProxyStateHolder(b.socket, token="t", job="job")
    hb.attach()
    hb.begin_update(3)
    hb.allocate("model/x", "float32", (100,)).copy_(torch.linspace(0, 1, 100))
    hb.allocate("optim/x/step", "float32", ()).fill_(3.0)
    hb.commit(3)
    ha = ProxyStateHolder(a.socket, token="t", job="job")
    ha.attach()
    ha.begin_update(0)
    mine = ha.allocate("model/x", "float32", (100,))
    ha.commit(0)
    reply = ha.pull(b.unix_address)
    assert reply.step == 3 and reply.entries == 2
    assert torch.equal(mine, torch.linspace(0, 1, 100)) and float(ha.tensor("optim/x/step")) == 3.0
    assert ha.status() == (CommitStatus.COMMITTED, 3, "")
    ha.close()
    hb.close()


def test_proxy_daemon_and_package_import_run_without_torch(tmp_path):
    code = f"""
import sys, threading
from mnemosyne.proxy import ProxyClient, ProxyServer
s = ProxyServer({str(tmp_path / 's')!r}, capacity=1 << 20, job="j", token="k")
s.start()
t = threading.Thread(target=s.serve_forever, kwargs={{"install_signals": False}})
t.start()
c = ProxyClient(str(s.socket_path), token="k", job="j")
c.begin_update(0)
e = c.allocate("model/w", 0, "float32", [4], 16).entry
c.commit(0)
c.checksum([e.handle])
c.shutdown()
t.join(10)
assert "torch" not in sys.modules, "the proxy imported torch"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_mnemo_proxy_command_is_registered():
    from mnemosyne.cli.main import build_parser

    parser, broken = build_parser()
    assert "proxy" not in broken
    args = parser.parse_args(["proxy", "--state-dir", "/tmp/x", "--size", "2G"])
    assert args.size == "2G" and callable(args.func)


def test_adopt_leaves_gradients_to_torch_by_default(pair):
    a, _ = pair
    m, opt = _model()
    h = ProxyStateHolder(a.socket, token="t", job="job")
    adopt(m, opt, h)
    assert "scratch/grad/weight" not in h.attach().tensors
    m(torch.ones(2, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    assert m.weight.grad is None  # torch's default set_to_none=True is left alone
    assert m.weight.data_ptr() == h.tensor("model/weight").data_ptr()
    h.close()


def test_store_state_puts_loaded_state_back_into_the_arena_and_commits(pair):
    """After optimizer.load_state_dict (which replaces the state tensors) the arena holds the loaded values."""
    from mnemosyne.proxy import store_state

    a, _ = pair
    m, opt = _model()
    h = ProxyStateHolder(a.socket, token="t", job="job")
    adopt(m, opt, h, init_step=-1)
    # The state to load: another replica's, two steps further.
    src, src_opt = _model()
    for _ in range(2):
        src(torch.ones(2, 8)).sum().backward()
        src_opt.step()
    want_model = {k: v.clone() for k, v in src.state_dict().items()}
    want_buf = src_opt.state[src.weight]["momentum_buffer"].clone()

    def load():
        m.load_state_dict(want_model)  # in place, into the arena
        opt.load_state_dict(src_opt.state_dict())  # new state tensors, outside the arena

    assert opt.state[m.weight]["momentum_buffer"].data_ptr() == h.tensor("optim/weight/momentum_buffer").data_ptr()
    copied = store_state(m, opt, h, 7, load)
    # Only the momentum buffers were copied: load_state_dict wrote the parameters in place.
    assert copied == (m.weight.numel() + m.bias.numel()) * 4
    assert h.status() == (CommitStatus.COMMITTED, 7, "")
    arena_buf = h.tensor("optim/weight/momentum_buffer")
    assert opt.state[m.weight]["momentum_buffer"] is arena_buf and torch.equal(arena_buf, want_buf)
    assert m.weight.data_ptr() == h.tensor("model/weight").data_ptr()
    h.close(unmap=False)
    # A new trainer re-attaches to exactly the loaded state.
    m2, opt2 = _model()
    h2 = ProxyStateHolder(a.socket, token="t", job="job")
    res = adopt(m2, opt2, h2)
    assert (res.status, res.step, res.resumed) == (CommitStatus.COMMITTED, 7, True)
    assert torch.equal(m2.weight, want_model["weight"]) and torch.equal(m2.bias, want_model["bias"])
    assert torch.equal(opt2.state[m2.weight]["momentum_buffer"], want_buf)
    h2.close(unmap=False)
