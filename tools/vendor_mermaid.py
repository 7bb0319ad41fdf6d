"""Vendor Mermaid for the docs: ``docs/assets/javascripts/mermaid.min.js``.

mkdocs-material fetches Mermaid from a CDN when a page has a diagram, unless a ``mermaid``
global already exists. ``mkdocs.yml`` lists the vendored file in ``extra_javascript``, so
the built site renders its diagrams with no network, also opened from disk (``file://``).

The file comes from the npm registry's ``mermaid`` package through the ``npm`` client
(``npm pack``, which checks the tarball against the registry's integrity hash); its
licence is copied beside it. Usage::

    python3 tools/vendor_mermaid.py            # DEFAULT_VERSION
    python3 tools/vendor_mermaid.py 11.16.0    # another release (mkdocs-material 9 expects Mermaid 11)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "docs" / "assets" / "javascripts"
#: The release vendored now (the newest 11.x when it was vendored).
DEFAULT_VERSION = "11.17.2"


def vendor(version: str, dest: Path = DEST) -> Path:
    """Fetch ``mermaid@version`` with npm and write its ``dist/mermaid.min.js`` (and LICENSE) to ``dest``."""
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(["npm", "pack", f"mermaid@{version}", "--json", "--pack-destination", tmp],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            sys.exit(f"npm pack mermaid@{version} failed:\n{res.stderr[-2000:]}")
        info = json.loads(res.stdout)[0]
        with tarfile.open(Path(tmp) / info["filename"]) as tar:
            js = tar.extractfile("package/dist/mermaid.min.js")
            lic = tar.extractfile("package/LICENSE")
            if js is None or lic is None:
                sys.exit(f"mermaid@{version}: no dist/mermaid.min.js or LICENSE in the package")
            body, licence = js.read(), lic.read()
    dest.mkdir(parents=True, exist_ok=True)
    header = (f"/* mermaid {info['version']} (MIT, see mermaid.LICENSE), npm package {info['integrity']}; "
              f"vendored by tools/vendor_mermaid.py */\n").encode()
    out = dest / "mermaid.min.js"
    out.write_bytes(header + body)
    (dest / "mermaid.LICENSE").write_bytes(licence)
    return out


def main() -> int:
    """Command line: vendor the given (or default) release."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("version", nargs="?", default=DEFAULT_VERSION, help=f"mermaid release (default {DEFAULT_VERSION})")
    out = vendor(ap.parse_args().version)
    print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
