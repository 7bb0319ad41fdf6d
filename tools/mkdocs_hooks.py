"""MkDocs hooks of the docs site (``hooks:`` in mkdocs.yml).

The docstrings use Sphinx roles (``:class:`Job```, ``:func:`~mnemosyne.jit.init```) that
mkdocstrings' Google-style parser leaves as text, so an API page would show
``:class:<code>Job</code>``. :func:`on_page_content` turns each role into a cross-reference
(mkdocs-autorefs resolves it to the object's page when the name is a documented object's
full path, and otherwise shows the name as code, without a warning). ``~`` shows the last
part of the name only, as in Sphinx.
"""

from __future__ import annotations

import html
import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]+)</code>")


def _ref(match: re.Match[str]) -> str:
    tilde, target = match.group(1), html.unescape(match.group(2)).strip()
    shown = target.rsplit(".", 1)[-1] if tilde else target
    return (f'<autoref identifier="{html.escape(target.removesuffix("()"))}" optional>'
            f"<code>{html.escape(shown)}</code></autoref>")


def on_page_content(content: str, **_kwargs: Any) -> str:
    """Render the Sphinx roles left in docstrings as (optional) cross-references."""
    return _ROLE.sub(_ref, content)
