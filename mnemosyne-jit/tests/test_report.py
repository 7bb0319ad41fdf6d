"""`mnemo report`, the agent's one-line recovery summary, and the detect time of unannounced deaths."""

import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from mnemosyne.core.events import Event, EventKind
from mnemosyne.jit._exits import ExitClock
from mnemosyne.jit.report import CRITICAL_PATH, load_events, one_line, table
from mnemosyne.jit.summary import incidents
from mnemosyne.jit.testing import launch


@pytest.fixture(scope="module")
def healed(tmp_path_factory):
    """A real job: 2 ranks, rank 1 SIGKILLed in the all-reduce of step 3, healed in place."""
    out = tmp_path_factory.mktemp("healed")
    run = launch(out, nproc=2, steps=6, inject="rank=1,step=3,kind=kill,phase=allreduce", timeout=100)
    assert run.returncode == 0, run.output[-3000:]
    return run


@pytest.mark.slow
def test_agent_prints_one_line_per_recovery(healed):
    lines = [ln for ln in healed.output.splitlines() if ln.startswith("mnemo launch: recovered ")]
    assert len(lines) == 1, healed.output[-3000:]
    assert lines[0].startswith("mnemo launch: recovered rank 1 (kill) in ")
    assert all(f" {name} " in lines[0] for name in CRITICAL_PATH) and lines[0].endswith("1 step redone")
    assert "1 spare," in healed.output  # the banner's plural


@pytest.mark.slow
def test_mnemo_report_table_html_and_png(healed, tmp_path):
    log = healed.out / "events.jsonl"
    html_path, png_path = tmp_path / "t.html", tmp_path / "t.png"
    res = subprocess.run([sys.executable, "-m", "mnemosyne.cli", "report", str(log), "--out", str(html_path),
                          "--out", str(png_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "1 recovery in" in res.stdout and "kill rank 1 @ step 3 (allreduce)" in res.stdout
    assert "1: recovered rank 1 (kill) in" in res.stdout

    # HTML: one self-contained page; per panel, one bar per critical-path phase, in order.
    page = html_path.read_text()
    assert "<script" not in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    svg = page[page.index("<svg"): page.index("</svg>") + 6]
    bars = ET.fromstring(svg).findall("{http://www.w3.org/2000/svg}rect")
    path = [b for b in bars if b.get("data-row") == "critical path"]
    assert [b.get("data-phase") for b in path] == list(CRITICAL_PATH)
    ends = [float(b.get("data-end")) for b in path]
    assert ends == sorted(ends) and ends[-1] > 0
    assert all(float(b.get("width")) >= 1 for b in bars)
    assert {b.get("data-row") for b in bars} >= {"abort", "rank 0", "rank 1"}

    # PNG: decodes, has the expected size, and is not blank (coloured bars drawn).
    from PIL import Image

    with Image.open(png_path) as im:
        assert im.format == "PNG" and im.width == 1000 and im.height > 150
        rgb = im.convert("RGB")
        colours = {rgb.getpixel((x, y)) for x in range(0, im.width, 5) for y in range(0, im.height, 5)}
    assert (0x1F, 0x77, 0xB4) in colours and (0xD6, 0x27, 0x28) in colours  # repair and detect bars


def test_report_without_recovery_and_bad_suffix(tmp_path):
    log = tmp_path / "e.jsonl"
    log.write_text(Event(EventKind.INFO, "launch", job="j").to_json() + "\n")
    cmd = [sys.executable, "-m", "mnemosyne.cli", "report", str(log)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "no recovery in" in res.stdout
    res = subprocess.run([*cmd, "--out", str(tmp_path / "x.jpg")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "give a .png or .html file" in res.stderr
    res = subprocess.run([*cmd[:-1], str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no event log at" in res.stderr


def _external_kill_log(exited_at):
    t = 1000.0
    ev = [Event(EventKind.DETECT, "kill", t + 0.030, rank=-1, fields={"target_rank": 2, "exited_at": exited_at}),
          Event(EventKind.EPOCH, "epoch", t + 0.031, rank=-1, epoch=1,
                fields={"epoch_number": 1, "members": [0, 1, 2]})]
    for r in range(3):
        ev.append(Event(EventKind.PHASE, "repair", t + 0.10, rank=r, epoch=1, duration_s=0.05))
        ev.append(Event(EventKind.RECOVERED, "recovered", t + 0.12, rank=r, epoch=1, fields={"steps_redone": 1}))
    return ev


def test_detect_of_an_external_kill_is_timed_from_the_exit():
    (inc,) = incidents(_external_kill_log(1000.0))
    assert inc.fault_time_from == "exit"
    assert inc.phases_s["detect"] == pytest.approx(0.030) and inc.total_s == pytest.approx(0.12)
    assert one_line(inc).startswith("recovered rank 2 (kill) in 0.12 s: detect 0.03, ")
    assert "kill rank 2" in table([inc])
    (unknown,) = incidents(_external_kill_log(None))
    assert unknown.fault_time_from == "detection" and unknown.phases_s["detect"] == 0.0


def test_exit_clock_times_a_child_exit():
    clock = ExitClock()
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    clock.watch(proc.pid)
    time.sleep(2.0)  # the child is long gone, not reaped yet: the clock times the exit, not the reap
    proc.wait()
    exited = clock.exited_at(proc.pid)
    assert exited is not None and t0 < exited < time.time() - 0.5
    assert clock.exited_at(proc.pid) is None  # forgotten once read


def test_load_events_merges_logs_in_time_order(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(Event(EventKind.INFO, "x", 2.0).to_json() + "\n")
    b.write_text(Event(EventKind.INFO, "y", 1.0).to_json() + "\n" + '{"torn')
    assert [e.name for e in load_events([a, b])] == ["y", "x"]


def test_launch_says_when_it_takes_the_unauthenticated_fallback(monkeypatch):
    from mnemosyne.jit._select import MNEMOSYNE_JIT_BACKEND
    from mnemosyne.jit.cli import store_note

    monkeypatch.setenv(MNEMOSYNE_JIT_BACKEND, "torch")
    note = store_note()
    assert note is not None and "unauthenticated" in note and "mnemosyne-jit[ccl]" in note
    monkeypatch.delenv(MNEMOSYNE_JIT_BACKEND)
    assert store_note() is None  # mnemosyne-ccl is installed in the test environment
