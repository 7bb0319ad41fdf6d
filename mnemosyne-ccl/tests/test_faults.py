"""Real processes, real SIGKILL, Gloo over loopback, the real store server.

A rank is killed while the others are inside an all_reduce: every survivor must raise a
peer-failure error within 2 s, shrink to 3 with exact results, and grow back to 4 with a
freshly spawned process holding the dead rank's logical rank. Three faults in a row; then
torch DDP over the ProcessGroup adapter, bit-equal to a fault-free run.
"""

import time

import pytest

from mnemosyne.ccl.testing.harness import Harness

pytestmark = pytest.mark.slow

WORLD = 4


def _wait_inside(h: Harness, i: int, survivors: list[int]) -> None:
    h.get_json(f"test/victim_ready/{i}", 90)
    for r in survivors:
        h.store.get(f"test/in_ar/{i}/{r}", 60)
    time.sleep(0.3)  # they have called all_reduce and are blocked in it


@pytest.mark.timeout(240)
def test_three_kills_shrink_grow_exact():
    plan = [1, 3, 1]  # the third fault kills the replacement of the first
    with Harness() as h:
        for r in range(WORLD):
            h.spawn(f"r{r}.0", scenario="faults", rank=r, size=WORLD, plan=plan)
        for i, victim in enumerate(plan):
            survivors = [r for r in range(WORLD) if r != victim]
            gen = max([int(n.split(".")[1]) for n in h.procs if n.startswith(f"r{victim}.")])
            _wait_inside(h, i, survivors)
            t_kill = h.kill(f"r{victim}.{gen}")
            for r in survivors:
                rec = h.get_json(f"test/fault/{i}/{r}")
                assert rec["error"] == "PeerFailureError", rec
                assert rec["t"] - t_kill < 2.0, f"round {i}: rank {r} raised {rec['t'] - t_kill:.2f} s after the kill"
                shrunk = h.get_json(f"test/shrunk/{i}/{r}")
                assert shrunk["ok"] and shrunk["ranks"] == survivors, shrunk
                assert shrunk["epoch"] == 2 * i + 1
            # A fresh process takes the dead rank's logical rank in the grown epoch.
            h.spawn(f"r{victim}.{gen + 1}", scenario="faults", rank=victim, size=WORLD, plan=plan,
                    start_round=i + 1, epoch=2 * i + 2)
            for r in range(WORLD):
                grown = h.get_json(f"test/grown/{i}/{r}", 90)
                assert grown["ok"] and grown["ranks"] == list(range(WORLD)), grown
                assert grown["epoch"] == 2 * i + 2
        finals = [h.get_json(f"test/final/{r}") for r in range(WORLD)]
        assert all(f["ok"] and f["epoch"] == 2 * len(plan) for f in finals), finals
        codes = h.wait_all()
        killed = {f"r{v}.{g}" for v, g in ((1, 0), (3, 0), (1, 1))}
        assert all(c == 0 for n, c in codes.items() if n not in killed), codes


@pytest.mark.timeout(240)
def test_ddp_over_adapter_survives_a_kill_bit_exact():
    victim, k, total = 2, 3, 6
    with Harness() as h:
        for r in range(WORLD):
            h.spawn(f"r{r}", scenario="ddp", rank=r, size=WORLD, victim=victim, k=k, total=total)
        survivors = [r for r in range(WORLD) if r != victim]
        _wait_inside(h, 0, survivors)
        t_kill = h.kill(f"r{victim}")
        for r in survivors:
            rec = h.get_json(f"test/fault/0/{r}")
            assert rec["error"] is not None, rec
            assert "peer failure" in rec["msg"].lower() or "connection closed" in rec["msg"].lower(), rec
            assert rec["t"] - t_kill < 2.0, f"rank {r} raised {rec['t'] - t_kill:.2f} s after the kill"
        # create (e0), rebuild (e1), shrink (e2), grow (e3): the newcomer joins epoch 3.
        h.spawn("new", scenario="ddp", rank=victim, size=WORLD, victim=victim, k=k, total=total, newcomer=True,
                epoch=3)
        ref = h.get_json("test/ref/0")
        for r in range(1, WORLD):
            assert h.get_json(f"test/ref/{r}") == ref
        for r in range(WORLD):
            assert h.get_json(f"test/final/{r}", 90) == ref, f"rank {r} differs from the fault-free run"
        codes = h.wait_all()
        assert all(c == 0 for n, c in codes.items() if n != f"r{victim}"), codes
