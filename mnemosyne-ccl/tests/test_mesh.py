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


