"""tools/soak.py on a short job: three seeded random faults heal, no divergence, no hang."""

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(115)
def test_soak_three_faults_heal(tmp_path):
    out = subprocess.run([sys.executable, str(TOOLS / "soak.py"), "--faults", "3", "--seed", "3", "--gap", "2",
                          "--step-sleep", "0.1", "--spares", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=110)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert lines[-1] == "soak_healed: 3/3"
    assert "divergence: 0" in lines and "hangs: 0" in lines and "faults_fired: 3/3" in lines
