"""The docs site works offline: vendored Mermaid, .html links, Sphinx roles rendered."""

import importlib.util
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent
ROOT = TOOLS.parent


def _hooks():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", TOOLS / "mkdocs_hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sphinx_roles_become_optional_cross_references():
    out = _hooks().on_page_content("see :class:<code>~mnemosyne.jit.Job</code> and :func:<code>init()</code>.")
    assert out == ('see <autoref identifier="mnemosyne.jit.Job" optional><code>Job</code></autoref> and '
                   '<autoref identifier="init" optional><code>init()</code></autoref>.')


def test_site_config_needs_no_network():
    cfg = (ROOT / "mkdocs.yml").read_text()
    assert "use_directory_urls: false" in cfg and "font: false" in cfg
    assert "assets/javascripts/mermaid.min.js" in cfg
    js = ROOT / "docs" / "assets" / "javascripts" / "mermaid.min.js"
    head = js.read_bytes()[:200].decode()
    assert head.startswith("/* mermaid 11.") and js.stat().st_size > 1_000_000
    assert b'globalThis["mermaid"] = ' in js.read_bytes()[-300:]  # defines the global mkdocs-material looks for
