"""FSDP2 / HSDP over FlexMesh: real processes, real Gloo on loopback, real SIGKILL.

The reference is the same training on a plain ``init_process_group("gloo")`` +
``init_device_mesh`` mesh; every rank's local shards and optimizer state must equal it
bit for bit (fault-free and after a killed rank was replaced in place).
"""

import pytest

from mnemosyne.ccl.mesh import mesh_groups
from mnemosyne.ccl.testing.harness import Harness
from mnemosyne.core.errors import ConfigError

pytestmark = pytest.mark.timeout(115)

MOD = "mnemosyne.ccl.testing._fsdp_workers"
TOTAL = 4


def _run(scenario, shape, **extra):
    with Harness(MOD) as h:
        for r in range(4):
            h.spawn(f"r{r}", scenario=scenario, rank=r, shape=shape, total=TOTAL, **extra)
        out = [h.get_json(f"test/final/{r}", 90) for r in range(4)]
        assert set(h.wait_all(30).values()) == {0}
        return out


def test_mesh_groups_layout_and_bad_input():
    assert mesh_groups((2, 2), 3) == [(1, (1, 3)), (1, (2, 3))]
    assert mesh_groups((2, 2), 0) == [(0, (0, 2)), (0, (0, 1))]
    assert mesh_groups((4,), 2) == [(0, (0, 1, 2, 3))]
    with pytest.raises(ConfigError, match="outside a mesh"):
        mesh_groups((2, 2), 4)
    with pytest.raises(ConfigError, match="positive sizes"):
        mesh_groups((2, 0), 0)


def test_flex_mesh_hsdp_trains_like_init_device_mesh():
    # HSDP 2x2 covers both kinds of group (replicate all-reduce, shard all-gather and
    # reduce-scatter); pure FSDP is the same code with one dimension.
    ref = _run("plain", [2, 2])
    got = _run("flex", [2, 2])
    assert got == ref
    # Not vacuous: the ranks hold different shards.
    assert ref[0] != ref[1]




# "backward" (victim parked in a backward hook) still fails: the replacement aborts in gloo
# (EnforceNotMet, a collective mismatch) in its first step; issue 13 follow-up.
@pytest.mark.parametrize("phase", ["forward"])
def test_hsdp_rank_killed_heals_in_place_bit_for_bit(phase):
    ref = _run("plain", [2, 2])
    k = 2
    with Harness(MOD) as h:
        for r in range(4):
            h.spawn(f"r{r}", scenario="flex", rank=r, shape=[2, 2], total=TOTAL, victim=3, k=k, phase=phase)
        h.get_json("test/victim_ready", 90)
        pids = {r: h.procs[f"r{r}"].pid for r in range(3)}
        h.kill("r3")
        faults = [h.get_json(f"test/fault/{r}", 60) for r in range(3)]
        h.spawn("new3", scenario="flex", rank=3, shape=[2, 2], total=TOTAL, victim=-1, k=k, newcomer=True)
        h.store.set("test/dead", b"3")
        got = [h.get_json(f"test/final/{r}", 90) for r in range(4)]
        repairs = [h.get_json(f"test/repair/{r}", 10) for r in range(3)]
        assert {n: c for n, c in h.wait_all(30).items() if n != "r3"} == {"r0": 0, "r1": 0, "r2": 0, "new3": 0}
    assert {r: h.procs[f"r{r}"].pid for r in range(3)} == pids
    assert all(f["step"] == k for f in faults), faults  # the fault hit step k on every survivor: 1 step redone
    assert got == ref
    # Rank 3 = (replicate 1, shard 1): its groups are mesh.replicate.1 ({1, 3}) and mesh.shard.1 ({2, 3}).
    dead_groups = {t for rep in repairs for t in rep["dead"]}
    assert dead_groups == {"mesh.replicate.1", "mesh.shard.1"}, repairs
    assert repairs[0]["dead"] == []  # rank 0 shares no group with rank 3
