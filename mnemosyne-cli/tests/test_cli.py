import argparse
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


# Runs `mnemo ARGS` in a fresh interpreter and prints which heavy modules it imported.
_HEAVY_PROBE = """
import contextlib, io, json, sys
{stub}
from mnemosyne.cli.main import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        rc = main(sys.argv[1:])
    except SystemExit as exc:
        rc = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "numba", "matplotlib"))
print(json.dumps({{"rc": rc, "heavy": heavy, "out": out.getvalue()}}))
"""

# Makes `mnemosyne.jit` an empty package (its __init__ not run), as issue 12's lazy
# __init__ will be: what is left is what the command plugins themselves import.
_STUB_JIT_INIT = """
import importlib.util, types
spec = importlib.util.find_spec("mnemosyne.jit")
if spec is not None:
    pkg = types.ModuleType("mnemosyne.jit")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["mnemosyne.jit"] = pkg
"""


def _probe(*args, stub=""):
    code = _HEAVY_PROBE.format(stub=stub)
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def test_version_loads_no_plugin_and_no_torch():
    got = _probe("--version")
    assert got["rc"] == 0 and "mnemosyne-cli 0.1.0" in got["out"]
    assert got["heavy"] == []


def test_command_plugins_build_their_parsers_without_heavy_imports():
    # Every plugin's register() (launch, inject, demo, report, ckpt, doctor...) is light;
    # only mnemosyne.jit's own __init__ (issue 12) may still pull torch in.
    got = _probe("--help", stub=_STUB_JIT_INIT)
    assert got["rc"] == 0 and "report" in got["out"] and "doctor" in got["out"]
    assert got["heavy"] == []


def test_help_does_not_import_torch():
    got = _probe("--help")
    assert got["rc"] == 0 and "launch" in got["out"]
    assert got["heavy"] == []


def test_a_command_loads_only_its_own_plugin():
    from mnemosyne.cli import main as cli_main

    parser, broken = cli_main.build_parser("doctor")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == ["doctor"] and not broken
    parser, _ = cli_main.build_parser("no-such-command")  # unknown: every plugin, to list them
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"doctor", "launch", "report", "ckpt"} <= set(sub.choices)
