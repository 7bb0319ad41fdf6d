import json
import subprocess
import sys

import pytest

from mnemosyne.core import CorruptStateError, EventKind, EventLog, phase, read_events
from mnemosyne.core.events import summarize_phases

WRITER = """
import sys
from mnemosyne.core import EventKind, EventLog
log = EventLog(sys.argv[1], job="j", rank=int(sys.argv[2]))
for i in range(200):
    log.emit(EventKind.INFO, "tick", i=i, pad="x" * 200)
log.close()
"""


def test_many_processes_append_whole_lines(tmp_path):
    path = tmp_path / "ev.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(r)]) for r in range(3)]
    for p in procs:
        assert p.wait(60) == 0
    events = read_events(path)
    assert len(events) == 600
    assert sorted({e.rank for e in events}) == [0, 1, 2]


def test_phase_times_and_records_failures(tmp_path):
    log = EventLog(tmp_path / "ev.jsonl", job="j", rank=1, epoch=3)
    with phase(log, "repair", world=4) as t:
        t.fields["bytes"] = 10
    with pytest.raises(RuntimeError), phase(log, "transfer"):
        raise RuntimeError("boom")
    log.close()
    evs = read_events(tmp_path / "ev.jsonl")
    assert [(e.name, e.fields["ok"]) for e in evs] == [("repair", True), ("transfer", False)]
    assert evs[0].fields["bytes"] == 10 and evs[0].epoch == 3 and evs[0].duration_s == t.duration_s
    assert set(summarize_phases(evs)) == {"repair", "transfer"}


def test_corrupt_line_is_named(tmp_path):
    path = tmp_path / "ev.jsonl"
    EventLog(path).emit(EventKind.INFO, "ok")
    with open(path, "a") as fh:
        fh.write('{"kind": "info", "na\n')
    with pytest.raises(CorruptStateError, match=r"ev.jsonl:2"):
        read_events(path)
    assert len(read_events(path, strict=False)) == 1
    assert json.loads(path.read_text().splitlines()[0])["kind"] == "info"
