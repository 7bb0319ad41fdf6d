import subprocess
import sys


def test_version_matches_metadata():
    from importlib.metadata import version

    import mnemosyne.ccl

    assert mnemosyne.ccl.__version__ == version("mnemosyne-ccl")


def test_namespace_spans_packages():
    code = "import mnemosyne.core, mnemosyne.ccl; import mnemosyne; assert len(list(mnemosyne.__path__)) >= 2"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
