"""The NCCL backend on real GPUs (run on the lent GPU machines; skipped on CPU)."""

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from mnemosyne.ccl.nccl import NcclBackend  # noqa: E402
from mnemosyne.core.errors import MissingDependencyError  # noqa: E402

needs_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs a CUDA GPU")


def test_capabilities_without_nccl4py_do_not_raise():
    caps = NcclBackend.capabilities()
    assert set(caps) >= {"shrink", "grow"}


def test_missing_nccl4py_names_the_install_line():
    try:
        import nccl.core  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match=r'mnemosyne-ccl\[nccl\]'):
            NcclBackend().library_version()
    else:
        assert NcclBackend().library_version().count(".") == 2


@pytest.mark.gpu
@needs_gpus
@pytest.mark.timeout(600)
def test_nccl_bench_shrink_grow_on_gpus(tmp_path):
    world = min(4, torch.cuda.device_count())
    out = tmp_path / "nccl.json"
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    proc = subprocess.run([sys.executable, "-m", "mnemosyne.ccl.bench", "--backend", "nccl", "--world", str(world),
                           "--repeats", "3", "--fresh-repeats", "1", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("repair_speedup: ")
