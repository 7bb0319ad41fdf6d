"""Two node agents on loopback (one `mnemo launch` per node, one shared store on node 0).

A rank dying on the non-store node heals the same way as on one node, and losing the
whole non-store node (its agent SIGKILLed: its trainers and spares die with it) is
survived by node 0's spares. Both end bit for bit equal to the fault-free 4-rank run.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from mnemosyne.core.errors import ConfigError
from mnemosyne.core.events import EventKind, read_events
from mnemosyne.jit import ckpt
from mnemosyne.jit.agent import EXIT_JOB_CKPT, Agent, AgentConfig, read_token_file
from mnemosyne.jit.testing import TINY, compare_final_states, flatten_state, launch, started_pids

pytestmark = pytest.mark.slow

STEPS = 8
TOKEN = "multinode-test-token-0123456789ab"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = launch(tmp_path_factory.mktemp("ref"), steps=STEPS, timeout=100)
    assert run.returncode == 0, run.output[-3000:]
    return run


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(out, node, port, job, *, spares, extra=(), train_args=()):
    cmd = [sys.executable, "-m", "mnemosyne.cli", "launch", "--nproc-per-node", "2", "--nnodes", "2",
           "--node-rank", str(node), "--master", f"127.0.0.1:{port}", "--job-id", job, "--spares", str(spares),
           "--node-timeout", "2", "--event-log", str(out / "events.jsonl"), *extra,
           "-m", "mnemosyne.jit.demo.train", "--steps", str(STEPS), "--out", str(out), *TINY, *train_args]
    log = open(out / f"node{node}.log", "wb")  # noqa: SIM115 (closed by _wait)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MNEMOSYNE_TOKEN": TOKEN})
    proc.log = log
    return proc


def _wait(procs, out, timeout):
    deadline = time.monotonic() + timeout
    codes = {}
    try:
        for node, p in procs.items():
            codes[node] = p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            p.log.close()
    logs = "\n".join(f"--- node {n}:\n" + (out / f"node{n}.log").read_text()[-2500:] for n in procs)
    assert len(codes) == len(procs), f"agents did not finish within {timeout} s\n{logs}"
    return codes, logs


@pytest.mark.timeout(150)
def test_rank_death_on_non_store_node_heals_bit_for_bit(tmp_path, reference):
    port = _free_port()
    procs = {0: _start_node(tmp_path, 0, port, "mn-kill", spares=0),
             1: _start_node(tmp_path, 1, port, "mn-kill", spares=1,
                            extra=["--inject", "rank=3,step=4,kind=kill,phase=allreduce"])}
    codes, logs = _wait(procs, tmp_path, 120)
    assert codes == {0: 0, 1: 0}, logs
    assert not compare_final_states(reference.out, tmp_path, 4), logs
    events = read_events(tmp_path / "events.jsonl", strict=False)
    plan = "rank=3,step=4,kind=kill,phase=allreduce"
    assert [e.fields["plan"] for e in events if e.kind == EventKind.FAULT] == [plan]
    detects = [e for e in events if e.kind == EventKind.DETECT and e.rank == -1]
    assert [(e.name, e.fields["target_rank"], e.fields["node"]) for e in detects] == [("kill", 3, 1)]
    epochs = [e for e in events if e.kind == EventKind.EPOCH]
    assert [e.fields["node"] for e in epochs] == [0, 0]  # only the coordinator publishes
    assert epochs[-1].fields["replaced"] == [3]
    assigned = [e for e in events if e.name == "assigned"]
    assert [(e.fields["target_rank"], e.fields["node"]) for e in assigned] == [(3, 1)]  # a spare of node 1
    assert max(e.fields["steps_redone"] for e in events if e.kind == EventKind.RECOVERED) <= 1
    pids = started_pids(tmp_path)
    assert all(len(pids[r]) == 1 for r in (0, 1, 2)) and len(pids[3]) == 2, pids


@pytest.mark.timeout(150)
def test_loss_of_the_non_store_node_is_survived_by_spares(tmp_path, reference):
    port = _free_port()
    slow = ["--step-sleep", "0.3", "--log-steps"]
    procs = {0: _start_node(tmp_path, 0, port, "mn-node", spares=2, train_args=slow),
             1: _start_node(tmp_path, 1, port, "mn-node", spares=0, train_args=slow)}
    log = tmp_path / "events.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # let node 0's spares warm up and training get going
        evs = read_events(log, strict=False) if log.exists() else []
        steps = [e.fields["step"] for e in evs if e.kind == EventKind.STEP and e.rank == 2]
        if steps and max(steps) >= 2:
            break
        time.sleep(0.1)
    else:
        pytest.fail("training did not reach step 2")
    os.kill(procs[1].pid, signal.SIGKILL)  # the whole node: its trainers die with their agent
    codes, logs = _wait(procs, tmp_path, 110)
    assert codes[0] == 0 and codes[1] == -signal.SIGKILL, logs
    assert not compare_final_states(reference.out, tmp_path, 4), logs
    events = read_events(log, strict=False)
    lost = [e for e in events if e.name == "node_lost"]
    assert [e.fields["lost_node"] for e in lost] == [1]
    assert [e.name for e in events if e.kind == EventKind.DETECT and e.rank == -1] == ["node_lost"]
    epochs = [e for e in events if e.kind == EventKind.EPOCH]
    assert epochs[-1].fields["replaced"] == [2, 3]  # one epoch for the whole node
    assigned = sorted((e.fields["target_rank"], e.fields["node"]) for e in events if e.name == "assigned")
    assert assigned == [(2, 0), (3, 0)]  # node 0's spares took the lost node's ranks
    assert max(e.fields["steps_redone"] for e in events if e.kind == EventKind.RECOVERED) <= 1
    pids = started_pids(tmp_path)
    assert len(pids[0]) == 1 and len(pids[1]) == 1, pids


def test_multinode_config_errors_name_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("MNEMOSYNE_TOKEN", raising=False)
    monkeypatch.delenv("MNEMOSYNE_JOB_ID", raising=False)
    with pytest.raises(ConfigError) as err:
        Agent(AgentConfig(command=["x.py"], nproc=2, nnodes=2, node_rank=1))
    text = str(err.value)
    assert "--master HOST:PORT" in text and "--job-id" in text and "token" in text
    with pytest.raises(ConfigError, match=r"--node-rank must be in \[0, 2\), got 2"):
        Agent(AgentConfig(command=["x.py"], nproc=2, nnodes=2, node_rank=2, master="h:1", job_id="j", token="t"))
    with pytest.raises(ConfigError, match="expected host:port"):
        Agent(AgentConfig(command=["x.py"], nproc=2, nnodes=2, master="nohost", job_id="j", token="t"))
    tok = tmp_path / "token"
    tok.write_text("secret\n")
    tok.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token_file(str(tok))
    tok.chmod(0o600)
    assert read_token_file(str(tok)) == "secret"
    (tmp_path / "empty").write_text("")
    (tmp_path / "empty").chmod(0o600)
    with pytest.raises(ConfigError, match="empty"):
        read_token_file(str(tmp_path / "empty"))


@pytest.mark.timeout(170)
def test_loss_of_a_node_without_spares_shrinks_then_grows_back(tmp_path):
    """No spares anywhere, --shrink: the job goes on with node 0's two ranks (each also
    running one lost rank's batches), node 0 warms two spares, and the job grows back."""
    port = _free_port()
    steps = 14
    args = ["--steps", str(steps), "--step-sleep", "0.2", "--shrunk-step-sleep", "0.8", "--log-steps"]
    procs = {n: _start_node(tmp_path, n, port, "mn-shrink", spares=0, extra=["--shrink"], train_args=args)
             for n in (0, 1)}
    log = tmp_path / "events.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        evs = read_events(log, strict=False) if log.exists() else []
        if any(e.kind == EventKind.STEP and e.rank == 3 and e.fields["step"] >= 1 for e in evs):
            break
        time.sleep(0.1)
    else:
        pytest.fail("training did not reach step 1")
    os.kill(procs[1].pid, signal.SIGKILL)
    codes, logs = _wait(procs, tmp_path, 140)
    assert codes[0] == 0, logs
    events = read_events(log, strict=False)
    agent = [(e.name, e.fields.get("target_ranks")) for e in events if e.rank == -1
             and e.name in ("node_lost", "shrink", "grow")]
    assert agent[:2] == [("node_lost", None), ("shrink", [2, 3])], agent
    # Normally one grow (the first ready spare waits up to GROW_WAIT for the other); two
    # when the second spare warmed up more than that later (a loaded machine).
    grows = agent[2:]
    assert all(n == "grow" for n, _ in grows) and sorted(r for _, rs in grows for r in rs) == [2, 3], agent
    shrink = next(e for e in events if e.name == "shrink")
    shrunk = {}
    for e in events:
        if e.kind == EventKind.STEP and e.epoch == shrink.epoch:
            shrunk.setdefault(e.fields["step"], []).append(tuple(e.fields["data_ranks"]))
    complete = [k for k, v in shrunk.items() if len(v) == 2]
    assert complete, "no step completed while shrunk"
    for k in complete:  # the global batch stays 4 micro-batches: each survivor runs a lost rank's too
        assert sorted(shrunk[k]) == [(0, 2), (1, 3)], (k, shrunk[k])
    assigned = sorted((e.fields["target_rank"], e.fields["node"]) for e in events if e.name == "assigned")
    assert assigned == [(2, 0), (3, 0)]  # node 0's freshly warmed spares took them back
    finals = [torch.load(tmp_path / f"final-rank{r}.pt", weights_only=False) for r in range(4)]
    assert {f["committed"] for f in finals} == {steps - 1}
    for r in range(1, 4):  # replicas agree bit for bit after the grow-back transfer
        for key in ("model", "optim"):
            a, b = flatten_state(finals[0][key]), flatten_state(finals[r][key])
            assert all(torch.equal(a[p], b[p]) if isinstance(a[p], torch.Tensor) else a[p] == b[p] for p in a)


@pytest.mark.timeout(200)
def test_checkpoint_across_nodes_then_resume_is_bit_for_bit(tmp_path, reference):
    """--no-replace on two nodes: rank 3 (node 1) dies, survivors on both nodes write one
    just-in-time checkpoint, both agents exit 3; a one-node --resume equals the fault-free run."""
    port = _free_port()
    root = tmp_path / "ckpts"
    extra = ["--no-replace", "--ckpt-dir", str(root)]
    procs = {0: _start_node(tmp_path, 0, port, "mn-ckpt", spares=0, extra=extra),
             1: _start_node(tmp_path, 1, port, "mn-ckpt", spares=0,
                            extra=[*extra, "--inject", "rank=3,step=4,kind=kill,phase=forward"])}
    codes, logs = _wait(procs, tmp_path, 120)
    assert codes == {0: EXIT_JOB_CKPT, 1: EXIT_JOB_CKPT}, logs
    path = ckpt.latest(root)
    assert path is not None, logs
    report = ckpt.verify(path)
    assert report.step == 3 and report.manifest["writer_ranks"] == [0, 1, 2]  # writers on both nodes
    events = read_events(tmp_path / "events.jsonl", strict=False)
    final = [e for e in events if e.rank == -1 and e.name == "ckpt"]
    assert len(final) == 1 and final[0].fields["ok"] and final[0].fields["node"] == 0
    res = launch(tmp_path / "resumed", steps=STEPS, timeout=100, launch_args=["--resume", str(root)])
    assert res.returncode == 0, res.output[-4000:]
    assert not compare_final_states(reference.out, res.out, 4)


@pytest.mark.timeout(170)
def test_silent_node_is_fenced_and_stops_when_it_comes_back(tmp_path, reference):
    """Node 1's agent frozen (SIGSTOP) past --node-timeout while its trainers still run: the
    coordinator gives node 1 up and node 0's spares take ranks 2 and 3; the old holders find
    themselves replaced and exit; the agent, continued, stops with a clear message."""
    port = _free_port()
    slow = ["--step-sleep", "1.0", "--log-steps"]  # the job must still run when node 1 comes back
    procs = {0: _start_node(tmp_path, 0, port, "mn-fence", spares=2, train_args=slow),
             1: _start_node(tmp_path, 1, port, "mn-fence", spares=0, train_args=slow)}
    log = tmp_path / "events.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        evs = read_events(log, strict=False) if log.exists() else []
        if any(e.kind == EventKind.STEP and e.rank == 2 and e.fields["step"] >= 2 for e in evs):
            break
        time.sleep(0.1)
    else:
        pytest.fail("training did not reach step 2")
    os.kill(procs[1].pid, signal.SIGSTOP)
    while time.monotonic() < deadline + 30:
        evs = read_events(log, strict=False)
        if any(e.name == "assigned" and e.fields["node"] == 0 for e in evs):
            break
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(procs[1].pid, signal.SIGCONT)
    codes, logs = _wait(procs, tmp_path, 120)
    assert codes == {0: 0, 1: 1}, logs
    assert "gave this node up" in (tmp_path / "node1.log").read_text(), logs
    assert not compare_final_states(reference.out, tmp_path, 4), logs
    events = read_events(log, strict=False)
    assert [e.fields["lost_node"] for e in events if e.name == "node_lost"] == [1]
    assigned = sorted((e.fields["target_rank"], e.fields["node"]) for e in events if e.name == "assigned")
    assert assigned == [(2, 0), (3, 0)]
    pids = started_pids(tmp_path)
    assert len(pids[2]) == 2 and len(pids[3]) == 2 and len(pids[0]) == 1 and len(pids[1]) == 1, pids
    spares0 = {e.fields["pid"] for e in events if e.name == "spare_start" and e.fields["node"] == 0}
    for r in (2, 3):  # the final state was written by the new holders: node 0's spares
        assert torch.load(tmp_path / f"final-rank{r}.pt", weights_only=False)["pid"] in spares0
