"""Repository checks run by CI.

* No ``src/mnemosyne/__init__.py`` anywhere: one stray file breaks the PEP 420 namespace
  of every other package.
* Every package has ``__about__.py`` with a version, ``py.typed``, README.md and CHANGELOG.md,
  and reads its version from ``__about__.py``.
* Inter-package dependencies are ranges, never ``==``.
* Generated code is up to date: every ``tools/gen/*.py`` generator is run with ``--check``.
* ``.ci/run`` runs the README's test command.

Usage: python tools/repo_check.py  (exit 1 and one line per problem when something is wrong)
"""

from __future__ import annotations

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


def main() -> int:
    problems = check_namespace()
    for name, folder in PACKAGES.items():
        problems += check_package(name, folder)
    problems += check_generated()
    problems += check_ci_runs_readme_tests()
    for p in problems:
        print(p)
    print(f"repo_check: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
