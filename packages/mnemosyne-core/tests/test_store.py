import threading
import time

import pytest

from mnemosyne.core import ConfigError, DictStore, Store, StoreTimeout


def test_dict_store_is_a_store_and_prefixes_nest():
    s = DictStore()
    assert isinstance(s, Store)
    p = s.prefixed("job").prefixed("e1")
    p.set("k", b"v")
    assert s.get("job/e1/k") == b"v"
    assert p.check(["k"]) and not p.check(["k", "missing"])
    assert p.delete("k") and not p.delete("k")


def test_get_blocks_until_set_and_times_out():
    s = DictStore()
    threading.Timer(0.05, s.set, args=("late", b"x")).start()
    assert s.get("late", timeout=5) == b"x"
    t0 = time.monotonic()
    with pytest.raises(StoreTimeout, match="did not appear"):
        s.get("never", timeout=0.1)
    assert time.monotonic() - t0 < 2


def test_add_and_compare_set_are_atomic():
    s = DictStore()

    def bump():
        for _ in range(500):
            s.add("n", 1)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.add("n", 0) == 2000
    assert s.compare_set("c", b"", b"first") == b"first"
    assert s.compare_set("c", b"", b"second") == b"first"
    assert s.compare_set("c", b"first", b"third") == b"third"


def test_bad_prefix():
    with pytest.raises(ConfigError, match="store prefix"):
        DictStore().prefixed("a/")
