import subprocess
import sys

import pytest

from mnemosyne.core import (
    CollectiveTimeout,
    CommError,
    ConfigError,
    MissingDependencyError,
    MnemosyneError,
    MultiRankError,
    StoreTimeout,
)
from mnemosyne.core.env import MNEMOSYNE_RANK, env_float, env_int
from mnemosyne.core.plugins import available, load


def test_hierarchy_keeps_builtins():
    assert issubclass(CollectiveTimeout, CommError) and issubclass(CollectiveTimeout, TimeoutError)
    assert issubclass(StoreTimeout, TimeoutError) and issubclass(ConfigError, ValueError)
    err = MissingDependencyError("nccl4py", "pip install 'mnemosyne-ccl[nccl]'")
    assert isinstance(err, ImportError) and "pip install 'mnemosyne-ccl[nccl]'" in str(err)


def test_multi_rank_error_lists_every_cause():
    err = MultiRankError("recovery failed", {2: "PeerFailureError: x", 0: "CommAborted: y"})
    assert isinstance(err, MnemosyneError)
    assert str(err) == "recovery failed (rank 0: CommAborted: y; rank 2: PeerFailureError: x)"


def test_env_readers_name_the_variable(monkeypatch):
    monkeypatch.setenv(MNEMOSYNE_RANK, "two")
    with pytest.raises(ConfigError, match="MNEMOSYNE_RANK='two': expected an integer"):
        env_int(MNEMOSYNE_RANK)
    monkeypatch.setenv(MNEMOSYNE_RANK, "3")
    assert env_int(MNEMOSYNE_RANK) == 3
    monkeypatch.delenv(MNEMOSYNE_RANK)
    assert env_float(MNEMOSYNE_RANK, 1.5) == 1.5


def test_unknown_plugin_lists_installed():
    with pytest.raises(ConfigError, match=r"no 'mnemosyne\.nothing' plugin named 'x'; installed: none"):
        load("mnemosyne.nothing", "x")
    assert available("mnemosyne.nothing") == []


def test_core_imports_without_torch():
    code = "import sys, mnemosyne.core; assert 'torch' not in sys.modules, 'core imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
