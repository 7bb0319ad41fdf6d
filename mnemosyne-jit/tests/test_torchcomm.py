"""The torch fallback communicator honours the core contract's shrink, grow and rebuild (real Gloo, real TCPStore)."""

import threading

import pytest
import torch

from mnemosyne.core.errors import CommError
from mnemosyne.jit._comm import TorchBackend
from mnemosyne.jit._store import host_store


def _threads(fns):
    """Run each fn in its own thread; return {rank: result} or raise the first error."""
    results, errors = {}, {}

    def body(rank, fn):
        try:
            results[rank] = fn()
        except BaseException as exc:
            errors[rank] = exc

    threads = [threading.Thread(target=body, args=(r, fn)) for r, fn in fns.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise next(iter(errors.values()))
    return results


def _sum(comm):
    t = torch.tensor([float(comm.rank + 1), 10.0 * (comm.rank + 1)])
    comm.all_reduce(t)
    return t.tolist()


@pytest.mark.timeout(90)
def test_torch_comm_shrinks_grows_and_rebuilds_then_all_reduces():
    server = host_store()
    backend = TorchBackend("gloo")
    stores = {r: server.clone().prefixed("tc") for r in range(3)}
    comms = _threads({r: (lambda r=r: backend.create(stores[r], r, 3, epoch=0, timeout=30)) for r in range(3)})
    assert _threads({r: (lambda c=c: _sum(c)) for r, c in comms.items()}) == {r: [6.0, 60.0] for r in range(3)}

    # Rank 1 is gone: the survivors shrink, keeping their logical ranks (0 and 2).
    comms[1].close()
    small = _threads({r: (lambda r=r: comms[r].shrink([1])) for r in (0, 2)})
    for r, c in small.items():
        assert (c.epoch, tuple(c.ranks), c.size, c.rank) == (1, (0, 2), 2, r)
    assert _threads({r: (lambda c=c: _sum(c)) for r, c in small.items()}) == {0: [4.0, 40.0], 2: [4.0, 40.0]}

    # A newcomer takes rank 1 back: survivors grow while it joins the grown group.
    fns = {r: (lambda r=r: small[r].grow([1])) for r in (0, 2)}
    fns[1] = lambda: backend.join(stores[1], 1, epoch=2, timeout=30)
    big = _threads(fns)
    for r, c in big.items():
        assert (c.epoch, tuple(c.ranks), c.size, c.rank) == (2, (0, 1, 2), 3, r)
    assert _threads({r: (lambda c=c: _sum(c)) for r, c in big.items()}) == {r: [6.0, 60.0] for r in range(3)}

    again = _threads({r: (lambda c=c: c.rebuild()) for r, c in big.items()})
    assert {c.epoch for c in again.values()} == {3}
    assert _threads({r: (lambda c=c: _sum(c)) for r, c in again.items()}) == {r: [6.0, 60.0] for r in range(3)}

    with pytest.raises(CommError, match=r"dead ranks \[7\] must be members"):
        again[0].shrink([7])
    with pytest.raises(CommError, match=r"new ranks \[2\] must be non-empty and not members"):
        again[0].grow([2])
    with pytest.raises(CommError, match="does not split"):
        again[0].split(0, 0)
    for c in [*small.values(), *big.values(), *again.values(), comms[0], comms[2]]:
        c.close()
