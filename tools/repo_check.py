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
* No import cycle inside any package: module-level imports (imports inside functions and
  under ``if TYPE_CHECKING:`` do not run at import time and are not counted).
* No shipped module over 500 lines (``_generated/`` code excepted).
* The layout rule of docs/development.md: the four components at the root
  (``mnemosyne-<component>/``), the other distributions (core, the umbrella) under ``packages/``.

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
PENDING: dict[tuple[str, str], str] = {}
MAX_LINES = 500
#: Components (at the root) and the other distributions (under packages/): docs/development.md "Layout".
COMPONENTS = ("ccl", "proxy", "jit", "cli")


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


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_imports(body: list[ast.stmt], module: str, is_pkg: bool) -> list[tuple[str, str]]:
    """``(module, name)`` pairs imported when ``body`` runs (``name`` empty for ``import module``).

    Not counted: imports inside functions and under ``if TYPE_CHECKING:``.
    """
    out: list[tuple[str, str]] = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            out += _import_time_imports(node.orelse, module, is_pkg)
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, *([base] if base else [])])
            out += [(base, a.name) for a in node.names]
        stmts: list[ast.stmt] = []
        for field in ("body", "orelse", "finalbody", "handlers"):
            for child in getattr(node, field, None) or []:
                if isinstance(child, ast.ExceptHandler):
                    stmts += child.body
                elif isinstance(child, ast.stmt):
                    stmts.append(child)
        out += _import_time_imports(stmts, module, is_pkg)
    return out


def import_graph(folder: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same distribution it imports at import time.

    ``from pkg import mod`` is an import of ``pkg.mod`` when that is a module, else of
    ``pkg`` (a name defined there); the ``__init__`` of parent packages is not counted.
    """
    src = folder / "src"
    files = {_module_name(p, src): p for p in src.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for base, alias in _import_time_imports(ast.parse(path.read_text()).body, name, path.name == "__init__.py"):
            target = f"{base}.{alias}" if alias and f"{base}.{alias}" in files else base
            if target in files and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check_import_cycles(root: Path = ROOT) -> list[str]:
    """No package imports itself in a circle at import time."""
    problems = []
    for folder in PACKAGES.values():
        graph = import_graph(root / folder.relative_to(ROOT))
        for comp in _cycles(graph):
            problems.append(f"{folder.relative_to(ROOT)}: import cycle {' -> '.join(comp)} (module-level "
                            "imports; move the shared names to a module both import)")
    return problems


def check_module_size(root: Path = ROOT) -> list[str]:
    """No shipped module over :data:`MAX_LINES` lines, generated code excepted."""
    problems = []
    for path in _source_files(root):
        if "_generated" in path.parts or _pending("size", path, root):
            continue
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            problems.append(f"{path.relative_to(root)}: {n} lines (at most {MAX_LINES}); split it")
    return problems


def check_layout(root: Path = ROOT) -> list[str]:
    """Components at the root, every other distribution under packages/ (docs/development.md)."""
    problems = []
    for name, folder in PACKAGES.items():
        want = f"mnemosyne-{name}" if name in COMPONENTS else f"packages/mnemosyne-{name}"
        if folder.relative_to(ROOT).as_posix() != want:
            problems.append(f"{folder.relative_to(ROOT)}: the layout rule puts mnemosyne-{name} at {want}/")
    known = {f.relative_to(ROOT).as_posix() for f in PACKAGES.values()} | {"packages/mnemosyne"}
    skip = {".git", ".venv", ".hatch", "node_modules", "site"}
    for meta in root.glob("**/pyproject.toml"):
        rel = meta.parent.relative_to(root)
        if skip.intersection(rel.parts) or rel.as_posix() in known or rel.as_posix() == ".":
            continue
        if tomllib.loads(meta.read_text()).get("project", {}).get("name", "").startswith("mnemosyne"):
            problems.append(f"{rel}: a distribution outside the layout rule (docs/development.md) and "
                            "repo_check.PACKAGES")
    return problems


def main() -> int:
    problems = check_namespace()
    for name, folder in PACKAGES.items():
        problems += check_package(name, folder)
    problems += check_generated()
    problems += check_ci_runs_readme_tests()
    problems += check_env_names()
    problems += check_import_cycles()
    problems += check_module_size()
    problems += check_layout()
    for p in problems:
        print(p)
    print(f"repo_check: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
