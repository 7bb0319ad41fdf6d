"""The README's snippet, as examples/ccl_shrink_grow.py, runs: kill, shrink, grow back."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ccl_shrink_grow.py"


@pytest.mark.slow
def test_readme_example_shrinks_and_grows_back():
    res = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=110)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1] == "ok"
    assert "rank 3 (new process) joined epoch 2: sum 10.0" in res.stdout
    assert res.stdout.count("shrunk to [0, 1, 2], epoch 1, sum 6.0") == 3
