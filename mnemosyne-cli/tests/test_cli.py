import json
import subprocess
import sys

from mnemosyne.cli.doctor import _decode_nccl_code, nccl_capabilities
from mnemosyne.cli.main import main


def _mnemo(*args):
    return subprocess.run([sys.executable, "-m", "mnemosyne.cli", *args], capture_output=True, text=True, timeout=90)


def test_version_lists_every_installed_component():
    res = _mnemo("--version")
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    assert lines["mnemosyne-core"] == "0.1.0" and lines["mnemosyne-cli"] == "0.1.0"


def test_doctor_json_on_cpu():
    res = _mnemo("doctor", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    import torch

    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["gloo"] is True
    if not torch.cuda.is_available():
        assert report["nccl"] is None and report["gpus"] == [] and report["cuda_vmm"] is None
    assert report["components"]["mnemosyne-core"] == "0.1.0"


def test_doctor_table_renders():
    res = _mnemo("doctor")
    assert res.returncode == 0, res.stderr
    assert "mnemo doctor" in res.stdout and "torch" in res.stdout


def test_no_command_and_bad_command(capsys):
    assert main([]) == 2
    res = _mnemo("no-such-command")
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_nccl_version_decoding_and_capabilities():
    assert _decode_nccl_code(22809) == (2, 28, 9)
    assert _decode_nccl_code(2804) == (2, 8, 4)
    assert nccl_capabilities((2, 28, 9)) == {"shrink": True, "grow": False}
    assert nccl_capabilities((2, 29, 2)) == {"shrink": True, "grow": True}
    assert nccl_capabilities((2, 27, 2)) == {"shrink": False, "grow": False}
