import subprocess
import sys


def test_version_matches_metadata():
    from importlib.metadata import version

    import mnemosyne.jit

    assert mnemosyne.jit.__version__ == version("mnemosyne-jit")


def test_namespace_spans_packages():
    code = "import mnemosyne.core, mnemosyne.jit; import mnemosyne; assert len(list(mnemosyne.__path__)) >= 2"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
