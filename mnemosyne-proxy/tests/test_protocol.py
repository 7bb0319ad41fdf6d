"""Generated codecs, frames and the generator itself."""

import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mnemosyne.core.errors import ProtocolError
from mnemosyne.proxy._generated import messages as m
from mnemosyne.proxy._generated.stubs import RECORDS, REQUESTS

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "tools/gen/proxy_protocol.py"


def _value(t, rnd):
    if t in (int,):
        return rnd.randrange(0, 200)
    return None


def _sample(cls, rnd):
    """A message with every field set to a random value of its type."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls, vars(m))
    kwargs = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if t is int:
            kwargs[f.name] = rnd.randrange(0, 255)
        elif t is float:
            kwargs[f.name] = rnd.random()
        elif t is bool:
            kwargs[f.name] = rnd.random() < 0.5
        elif t is str:
            kwargs[f.name] = "näme/" + str(rnd.randrange(10**6))
        elif t is bytes:
            kwargs[f.name] = rnd.randbytes(rnd.randrange(0, 40))
        elif typing.get_origin(t) is list:
            (inner,) = typing.get_args(t)
            kwargs[f.name] = [rnd.randrange(0, 2**40) if inner is int else _sample(inner, rnd)
                              for _ in range(rnd.randrange(0, 4))]
        else:
            kwargs[f.name] = _sample(t, rnd)
    return cls(**kwargs)


@pytest.mark.parametrize("cls", list(m.MESSAGES.values()), ids=lambda c: c.__name__)
def test_every_message_round_trips(cls):
    rnd = random.Random(cls.MSG_ID)
    for _ in range(5):
        msg = _sample(cls, rnd)
        frame = m.encode_frame(msg, 77)
        msg_id, rid, length = m.parse_header(frame[: m.FRAME.size])
        assert (msg_id, rid, length) == (cls.MSG_ID, 77, len(frame) - m.FRAME.size)
        assert m.decode_payload(msg_id, frame[m.FRAME.size :]) == msg


def test_every_request_has_a_reply_and_state_changes_are_logged():
    assert {c.__name__ for c in REQUESTS.values()} >= {"Hello", "Allocate", "BeginUpdate", "Commit", "Pull"}
    logged = {REQUESTS[i].__name__: r.__name__ for i, r in RECORDS.items()}
    assert logged == {"SetBase": "RecBase", "Allocate": "RecAlloc", "Free": "RecFree", "Name": "RecName",
                      "BeginUpdate": "RecBegin", "Commit": "RecCommit", "Pull": "RecRestore"}


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b"XXXX" + bytes(12), "not a Mnemosyne proxy message"),
        (m.FRAME.pack(m.MAGIC, 99, 20, 1, 0), "protocol version 99"),
        (m.FRAME.pack(m.MAGIC, m.VERSION, 999, 1, 0), "unknown proxy message id 999"),
        (m.FRAME.pack(m.MAGIC, m.VERSION, 20, 1, m.MAX_PAYLOAD + 1), "exceeds the limit"),
        (b"MNPX", "truncated frame header"),
    ],
)
def test_bad_headers_are_rejected(header, match):
    with pytest.raises(ProtocolError, match=match):
        m.parse_header(header)


def test_malformed_payloads_are_rejected():
    good = m.encode_payload(m.Allocate("model/w", 0, "float32", [2, 3], 24))
    with pytest.raises(ProtocolError, match="malformed Allocate"):
        m.decode_payload(m.Allocate.MSG_ID, good[:-3])
    with pytest.raises(ProtocolError, match="trailing bytes"):
        m.decode_payload(m.Allocate.MSG_ID, good + b"\0")
    # a string that claims to be longer than the payload
    with pytest.raises(ProtocolError, match="bytes announced"):
        m.decode_payload(m.Hello.MSG_ID, struct.pack("<I", 10**6) + b"abc")
    # a list that claims a billion items
    with pytest.raises(ProtocolError, match="announced"):
        m.decode_payload(m.Checksum.MSG_ID, struct.pack("<I", 10**9))
    with pytest.raises(ProtocolError, match="malformed Hello"):
        m.decode_payload(m.Hello.MSG_ID, struct.pack("<I", 2) + b"\xff\xfe" + bytes(12))


def test_encoding_out_of_range_values_fails_clearly():
    with pytest.raises(ProtocolError, match="cannot encode Free"):
        m.encode_payload(m.Free(-1))


@pytest.mark.timeout(60)
def test_generated_code_is_up_to_date():
    res = subprocess.run([sys.executable, str(GEN), "--check"], capture_output=True, text=True, timeout=50)
    assert res.returncode == 0, res.stderr


@pytest.mark.timeout(60)
def test_generator_check_fails_on_a_stale_file(tmp_path):
    out = tmp_path / "gen"
    shutil.copytree(ROOT / "mnemosyne-proxy/src/mnemosyne/proxy/_generated", out)
    res = subprocess.run([sys.executable, str(GEN), "--check", "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    spec = tmp_path / "protocol.toml"
    text = (ROOT / "mnemosyne-proxy/spec/protocol.toml").read_text()
    spec.write_text(text.replace('["pid", "u32"]', '["pid", "u64"]'))
    res = subprocess.run([sys.executable, str(GEN), "--check", "--spec", str(spec), "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert "out of date (messages.py" in res.stderr and "run: python" in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\nmagic = "MNPX"\n[messages.A]\nid = 1\nkind = "reply"\nfields = [["x", "u7"]]\n')
    res = subprocess.run([sys.executable, str(GEN), "--check", "--spec", str(bad), "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "unknown type 'u7'" in res.stderr
