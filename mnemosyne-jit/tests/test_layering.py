"""The supervisor side of mnemosyne-jit (``mnemo launch``) imports and runs its CLI without torch."""

import subprocess
import sys

#: Every module of the supervisor program and the protocol it shares with the trainer.
SUPERVISOR = [
    "mnemosyne.jit",
    "mnemosyne.jit.agent",
    "mnemosyne.jit._agent_config",
    "mnemosyne.jit._agent_setup",
    "mnemosyne.jit._bootstrap",
    "mnemosyne.jit._ckpt_io",
    "mnemosyne.jit._ckpt_order",
    "mnemosyne.jit._coordinator",
    "mnemosyne.jit._health",
    "mnemosyne.jit._keys",
    "mnemosyne.jit._protocol",
    "mnemosyne.jit._proxies",
    "mnemosyne.jit._publish",
    "mnemosyne.jit._replicate",
    "mnemosyne.jit._select",
    "mnemosyne.jit._snapdir",
    "mnemosyne.jit._snapstore",
    "mnemosyne.jit._spawn",
    "mnemosyne.jit._store",
    "mnemosyne.jit.cli",
    "mnemosyne.jit.ckpt_cli",
]

# A None entry in sys.modules makes every later ``import torch`` raise ImportError.
_BLOCK = "import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK + code], capture_output=True, text=True, timeout=60)


def test_supervisor_modules_import_without_torch():
    code = f"import importlib\nfor m in {SUPERVISOR!r}:\n    importlib.import_module(m)\nprint('ok')"
    res = _run(code)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_mnemo_version_and_parser_load_no_torch():
    code = ("from mnemosyne.cli.main import build_parser\n"
            "parser, broken = build_parser()\n"
            "assert not broken, broken\n"
            "assert 'launch' in parser.format_help()\n"
            "print('ok')")
    res = _run(code)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
    res = _run("import sys; from mnemosyne.cli.main import main; sys.argv = ['mnemo', '--version']; main()")
    assert res.returncode == 0 and "mnemosyne-jit" in res.stdout, res.stderr[-3000:]


def test_public_names_still_resolve():
    import mnemosyne.jit as mj

    assert mj.init is mj.runtime.init and mj.Job.__name__ == "Job" and mj.EXIT_EXCEPTION == 17
    assert set(mj.__all__) <= set(dir(mj))
