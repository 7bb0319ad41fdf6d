"""Repository checks run by CI.

* No ``src/mnemosyne/__init__.py`` anywhere: one stray file breaks the PEP 420 namespace
  of every other package.
* Every package has ``__about__.py`` with a version, ``py.typed``, README.md and CHANGELOG.md,
  and reads its version from ``__about__.py``.
* Inter-package dependencies are ranges, never ``==``.
* Generated code is up to date: every ``tools/gen/*.py`` generator is run with ``--check``.
* ``.ci/run`` runs the README's test command.
* Every ``MNEMOSYNE_*`` environment variable is defined once, in ``mnemosyne.core.env``:
  shipped code (each package's ``src/``) neither assigns a ``MNEMOSYNE_*`` name nor spells
  one as a string literal, and mentions no name that ``core/env.py`` does not define.

Usage: python tools/repo_check.py  (exit 1 and one line per problem when something is wrong)
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "core": ROOT / "packages/mnemosyne-core",
    "ccl": ROOT / "mnemosyne-ccl",
    "proxy": ROOT / "mnemosyne-proxy",
    "jit": ROOT / "mnemosyne-jit",
    "cli": ROOT / "mnemosyne-cli",
}
ENV_MODULE = ROOT / "packages/mnemosyne-core/src/mnemosyne/core/env.py"
_ENV_NAME = re.compile(r"MNEMOSYNE_[A-Z0-9][A-Z0-9_]*")
#: Files allowed to break a rule for now, with why (each entry is a promise to remove it).
PENDING = {
    ("env", "mnemosyne-ccl/src/mnemosyne/ccl/nccl.py"):
        "MNEMOSYNE_NCCL_NATIVE/_CACHE/_LOCAL_RANK as literals: nccl.py is being rewritten for issue 11 (async "
        "collectives); switch it to mnemosyne.core.env once that lands",
}


def _source_files(root: Path = ROOT) -> list[Path]:
    """Every shipped Python file: each package's ``src/`` tree."""
    return sorted(p for folder in PACKAGES.values() for p in (root / folder.relative_to(ROOT) / "src").rglob("*.py"))


def _pending(rule: str, path: Path, root: Path) -> bool:
    return (rule, path.relative_to(root).as_posix()) in PENDING


def check_namespace(root: Path = ROOT) -> list[str]:
    skip = {".git", ".venv", ".hatch", "node_modules", "site"}
    return [
        f"{p.relative_to(root)}: breaks the PEP 420 'mnemosyne' namespace; delete it"
        for p in root.rglob("mnemosyne/__init__.py")
        if not skip.intersection(p.relative_to(root).parts)
    ]


def check_package(name: str, folder: Path) -> list[str]:
    problems = []
    src = folder / "src/mnemosyne" / name
    about = src / "__about__.py"
    if not about.is_file() or not re.search(r'^__version__ = "\d+\.\d+\.\d+[^"]*"$', about.read_text(), re.M):
        problems.append(f"{about.relative_to(ROOT)}: missing or has no __version__ = \"X.Y.Z\"")
    for needed in (src / "py.typed", folder / "README.md", folder / "CHANGELOG.md", folder / "tests"):
        if not needed.exists():
            problems.append(f"{needed.relative_to(ROOT)}: missing")
    meta = tomllib.loads((folder / "pyproject.toml").read_text())
    if meta.get("tool", {}).get("hatch", {}).get("version", {}).get("path") != f"src/mnemosyne/{name}/__about__.py":
        problems.append(f"{folder.relative_to(ROOT)}/pyproject.toml: [tool.hatch.version] must read __about__.py")
    deps = list(meta["project"].get("dependencies", []))
    for extra in meta["project"].get("optional-dependencies", {}).values():
        deps += extra
    for dep in deps:
        if dep.startswith("mnemosyne") and "==" in dep:
            problems.append(f"{folder.relative_to(ROOT)}: pins {dep!r}; use a range (>=0.1,<0.2)")
    return problems


def check_generated() -> list[str]:
    problems = []
    for gen in sorted((ROOT / "tools/gen").glob("*.py")) if (ROOT / "tools/gen").is_dir() else []:
        if gen.name.startswith("_"):
            continue
        res = subprocess.run([sys.executable, str(gen), "--check"], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            problems.append(f"{gen.relative_to(ROOT)} --check: {(res.stdout + res.stderr).strip()[:300]}")
    return problems


def check_ci_runs_readme_tests() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", readme, re.S)
    test_lines = [ln.strip() for b in blocks for ln in b.splitlines() if "hatch test" in ln]
    if not test_lines:
        return ["README.md: no quick-start line runs 'hatch test'"]
    if any(t in ci for t in test_lines):
        return []
    return [f".ci/run does not run the README's test command {test_lines[0]!r}"]


def check_env_names(root: Path = ROOT) -> list[str]:
    """``MNEMOSYNE_*`` names: defined in core/env.py only, imported from there everywhere else."""
    env_module = root / ENV_MODULE.relative_to(ROOT)
    defined = {t.id for node in ast.walk(ast.parse(env_module.read_text())) if isinstance(node, ast.Assign)
               for t in node.targets if isinstance(t, ast.Name) and _ENV_NAME.fullmatch(t.id)}
    problems = []
    for path in _source_files(root):
        if path == env_module or _pending("env", path, root):
            continue
        rel = path.relative_to(root)
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for t in targets:
                if isinstance(t, ast.Name) and _ENV_NAME.fullmatch(t.id):
                    problems.append(f"{rel}:{node.lineno}: defines {t.id}; define it in core/env.py (with a "
                                    "why-comment) and import it")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _ENV_NAME.fullmatch(node.value):
                problems.append(f"{rel}:{node.lineno}: spells {node.value!r} as a string; import the name from "
                                "mnemosyne.core.env")
        for lineno, line in enumerate(text.splitlines(), 1):
            for name in sorted(set(_ENV_NAME.findall(line)) - defined):
                problems.append(f"{rel}:{lineno}: mentions {name}, which core/env.py does not define")
    return problems


def main() -> int:
    problems = check_namespace()
    for name, folder in PACKAGES.items():
        problems += check_package(name, folder)
    problems += check_generated()
    problems += check_ci_runs_readme_tests()
    problems += check_env_names()
    for p in problems:
        print(p)
    print(f"repo_check: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
