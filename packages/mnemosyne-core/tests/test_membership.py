import pytest

from mnemosyne.core import ConfigError, Membership, ProtocolError, StaleEpochError


def test_replace_keeps_logical_rank_with_new_member():
    m0 = Membership.initial(4)
    m1, change = m0.replace([2], "rank 2 died")
    assert m1.epoch == 1 and m1.ranks == (0, 1, 2, 3)
    assert m1.members[2] != m0.members[2]
    assert {r: m1.members[r] for r in (0, 1, 3)} == {r: m0.members[r] for r in (0, 1, 3)}
    assert change.removed == (2,) and change.replaced == (2,)


def test_remove_then_add_round_trips_ranks():
    m1, _ = Membership.initial(4).remove([1, 3])
    assert m1.ranks == (0, 2) and m1.size == 2
    m2, change = m1.add([1, 3])
    assert m2.ranks == (0, 1, 2, 3) and change.replaced == (1, 3)
    with pytest.raises(ConfigError, match="already present"):
        m2.add([0])


def test_unknown_rank_and_stale_epoch_are_refused():
    m0 = Membership.initial(2)
    with pytest.raises(ConfigError, match=r"ranks \[5\] are not members"):
        m0.replace([5])
    m1, _ = m0.replace([0])
    m1.check_newer(m1.replace([1])[0])
    with pytest.raises(StaleEpochError, match="epoch 0 is not newer than current epoch 1"):
        m1.check_newer(m0)


def test_json_round_trip_and_malformed():
    m = Membership.initial(3).replace([1], "x")[0]
    assert Membership.from_json(m.to_json()) == m
    with pytest.raises(ProtocolError, match="malformed membership"):
        Membership.from_json(b'{"epoch": 1}')
    with pytest.raises(ConfigError):
        Membership(0, {0: "a", 1: "a"})
