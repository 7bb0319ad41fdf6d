"""GPU validation (NCCL): the recovery tests of test_recovery.py on CUDA devices.

Run on a machine with 2+ GPUs: ``hatch test mnemosyne-jit/tests/test_gpu.py``.
"""

import pytest
import torch

from mnemosyne.core.events import EventKind
from mnemosyne.jit.testing import compare_final_states, launch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _nproc():
    return min(4, torch.cuda.device_count())


@pytest.mark.timeout(400)
@pytest.mark.parametrize("plan", ["rank=1,step=3,kind=kill,phase=allreduce", "rank=0,step=4,kind=hang,phase=forward"])
def test_nccl_fault_heals_bit_for_bit(tmp_path, plan):
    n = _nproc()
    if n < 2:
        pytest.skip("needs a CUDA GPU (two or more)")
    ref = launch(tmp_path / "ref", nproc=n, steps=8, timeout=180)
    assert ref.returncode == 0, ref.output[-3000:]
    run = launch(tmp_path / "run", nproc=n, steps=8, inject=plan, timeout=180)
    assert run.returncode == 0, run.output[-3000:]
    assert not compare_final_states(ref.out, run.out, n)
    assert max(e.fields["steps_redone"] for e in run.events if e.kind == EventKind.RECOVERED) <= 1
    pids = run.pids()
    assert all(len(pids[r]) == 1 for r in range(n) if r != int(plan.split(",")[0].split("=")[1]))


