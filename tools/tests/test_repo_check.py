import importlib.util
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("repo_check", TOOLS / "repo_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_repo_is_clean():
    mod = _load()
    problems = mod.check_namespace()
    for name, folder in mod.PACKAGES.items():
        problems += mod.check_package(name, folder)
    assert problems == []


def test_stray_namespace_init_is_flagged(tmp_path):
    mod = _load()
    bad = tmp_path / "pkg/src/mnemosyne"
    bad.mkdir(parents=True)
    (bad / "__init__.py").write_text("")
    problems = mod.check_namespace(tmp_path)
    assert len(problems) == 1 and "PEP 420" in problems[0]
