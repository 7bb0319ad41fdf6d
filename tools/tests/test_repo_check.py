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
    problems += mod.check_env_names() + mod.check_import_cycles() + mod.check_module_size() + mod.check_layout()
    assert problems == []


def test_stray_namespace_init_is_flagged(tmp_path):
    mod = _load()
    bad = tmp_path / "pkg/src/mnemosyne"
    bad.mkdir(parents=True)
    (bad / "__init__.py").write_text("")
    problems = mod.check_namespace(tmp_path)
    assert len(problems) == 1 and "PEP 420" in problems[0]


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_env_names_are_defined_in_core_env_only(tmp_path):
    mod = _load()
    _tree(tmp_path, {
        "packages/mnemosyne-core/src/mnemosyne/core/env.py": 'MNEMOSYNE_RANK = "MNEMOSYNE_RANK"\n',
        "mnemosyne-jit/src/mnemosyne/jit/ok.py": "from mnemosyne.core.env import MNEMOSYNE_RANK\n",
        "mnemosyne-jit/src/mnemosyne/jit/bad.py": ('MNEMOSYNE_SHRINK = "1"\n'
                                                  'x = os.environ.get("MNEMOSYNE_RANK")\n'
                                                  '# see MNEMOSYNE_NOWHERE\n'),
    })
    problems = mod.check_env_names(tmp_path)
    assert len(problems) == 4, problems  # MNEMOSYNE_SHRINK is both defined here and unknown to env.py
    assert all(p.startswith("mnemosyne-jit/src/mnemosyne/jit/bad.py:") for p in problems)
    assert any("defines MNEMOSYNE_SHRINK" in p for p in problems)
    assert any("spells 'MNEMOSYNE_RANK'" in p for p in problems)
    assert any("mentions MNEMOSYNE_NOWHERE" in p for p in problems)


def test_import_cycle_is_flagged_but_not_lazy_or_type_checking_imports(tmp_path):
    mod = _load()
    pkg = "mnemosyne-jit/src/mnemosyne/jit"
    _tree(tmp_path, {
        f"{pkg}/__init__.py": "",
        f"{pkg}/a.py": "from mnemosyne.jit import b\n",
        f"{pkg}/b.py": "from mnemosyne.jit.c import X\n",
        f"{pkg}/c.py": "import mnemosyne.jit.a\nX = 1\n",
        f"{pkg}/d.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mnemosyne.jit import e\n"),
        f"{pkg}/e.py": "def f():\n    from mnemosyne.jit import d\n",
        f"{pkg}/f.py": "try:\n    from . import g\nexcept ImportError:\n    pass\n",
        f"{pkg}/g.py": "from .f import thing\n",
    })
    for other in ("packages/mnemosyne-core", "mnemosyne-ccl", "mnemosyne-proxy", "mnemosyne-cli"):
        (tmp_path / other / "src").mkdir(parents=True)
    problems = mod.check_import_cycles(tmp_path)
    assert len(problems) == 2, problems
    assert "mnemosyne.jit.a -> mnemosyne.jit.b -> mnemosyne.jit.c" in problems[0]
    assert "mnemosyne.jit.f -> mnemosyne.jit.g" in problems[1]


def test_long_module_is_flagged_unless_generated(tmp_path):
    mod = _load()
    pkg = "mnemosyne-ccl/src/mnemosyne/ccl"
    _tree(tmp_path, {f"{pkg}/big.py": "x = 1\n" * 501, f"{pkg}/_generated/big.py": "x = 1\n" * 900,
                     f"{pkg}/ok.py": "x = 1\n" * 500})
    assert mod.check_module_size(tmp_path) == [f"{pkg}/big.py: 501 lines (at most 500); split it"]
