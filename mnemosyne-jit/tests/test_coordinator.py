"""The epoch record and the coordinator as a decision function (no agent, no processes)."""

import pytest

from mnemosyne.core.errors import ProtocolError
from mnemosyne.core.events import EventKind
from mnemosyne.core.membership import Membership
from mnemosyne.core.store import DictStore
from mnemosyne.jit import _keys
from mnemosyne.jit._agent_config import AgentConfig
from mnemosyne.jit._coordinator import Coordinator, Failure, NodeView, Publish, Stop
from mnemosyne.jit._protocol import CkptOrder, EpochRecord, publish_record, read_record


def test_epoch_record_roundtrips_in_one_key():
    m = Membership.initial(4).next(replace=[2], reason="rank 2 kill")
    rec = EpochRecord(m, {2: (0, 2)}, CkptOrder("/x", (0, 1, 3), (2,)), comm_epoch=5)
    store = DictStore()
    publish_record(store, rec)
    assert store.check([_keys.membership(1)])
    assert read_record(store, 1) == rec
    plain = EpochRecord(Membership.initial(2))
    assert EpochRecord.from_json(plain.to_json()) == plain and plain.comm_epoch is None and plain.ckpt is None
    with pytest.raises(ProtocolError, match="epoch record"):
        EpochRecord.from_json(b'{"epoch": 1, "members": {}, "placement": {"0": 3}}')


def _coordinator(**cfg):
    events = []
    config = AgentConfig(command=["x.py"], nproc=2, **cfg)
    return Coordinator(config, 0, DictStore(), lambda *a, **k: events.append((a, k))), events


def test_decisions_are_values_and_follow_the_coordinators_own_membership():
    coord, _ = _coordinator(spares=1)
    start = coord.start()
    assert start.membership.epoch == 0 and start.placement == {0: (0, 0), 1: (0, 1)}
    member = start.membership.members[1]
    d = coord.fail([Failure(1, member, "kill", {}, 0)], NodeView(ready=1, live=1))
    assert isinstance(d, Publish) and d.membership.epoch == 1 and d.placement == {1: (0, 1)} and d.ckpt is None
    # A second report of the same (now replaced) holder is stale: no decision.
    assert coord.fail([Failure(1, member, "kill", {}, 0)], NodeView(ready=0, live=0)) is None
    assert coord.membership == d.membership and coord.restarts == 1


def test_no_replace_orders_a_checkpoint_and_a_usage_error_stops():
    coord, _ = _coordinator(no_replace=True, ckpt_dir="/tmp/ck")
    m = coord.start().membership
    d = coord.fail([Failure(0, m.members[0], "kill", {}, 0)], NodeView(0, 0))
    assert isinstance(d, Publish) and d.ckpt == CkptOrder("/tmp/ck", (1,), (0,))
    assert [n[1] for n in d.notes] == ["ckpt_ordered"] and d.notes[0][0] == EventKind.INFO
    assert coord.fail([Failure(1, m.members[1], "kill", {}, 0)], NodeView(0, 0)) is None  # already ordered
    coord, _ = _coordinator()
    m = coord.start().membership
    d = coord.fail([Failure(0, m.members[0], "exception", {"type": "ConfigError", "error": "bad"}, 0)],
                   NodeView(1, 1))
    assert isinstance(d, Stop) and "usage error" in d.reason
