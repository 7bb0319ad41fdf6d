import subprocess
import sys


def test_version_matches_metadata():
    from importlib.metadata import version

    import mnemosyne.proxy

    assert mnemosyne.proxy.__version__ == version("mnemosyne-proxy")


def test_namespace_spans_packages():
    code = "import mnemosyne.core, mnemosyne.proxy; import mnemosyne; assert len(list(mnemosyne.__path__)) >= 2"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
