"""Node key text forms (spec §3.5) and the derper key file (``-c``)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from derper.disk.keyfile import KeyFileError, load_or_create_key_file
from derper.proto import keys
from derper.proto.keys import KeyFormatError, KeyPair

PRIV_HEX = "40ab1b58e9076c7a4d9d07291f5edf9d1aa017eb949624ba683317f48a640369"
PUB_HEX = "50d20b455ecf12bc453f83c2cfdb2a24925d06cf2598dcaa54e91af82ce9f765"
PRIV_TEXT = "privkey:" + PRIV_HEX
PUB_TEXT = "nodekey:" + PUB_HEX
EMBEDDED_SPACE = "ab" * 15 + "  " + "ab" * 16  # 64 characters; bytes.fromhex would accept it


# ---- text forms -----------------------------------------------------------------------------

def test_privkey_nodekey_vector():
    pair = KeyPair(keys.parse_private(PRIV_TEXT))
    assert pair.public == bytes.fromhex(PUB_HEX)
    assert keys.public_text(pair.public) == PUB_TEXT
    assert pair.private_text() == PRIV_TEXT
    assert keys.parse_public(PUB_TEXT) == bytes.fromhex(PUB_HEX)


@pytest.mark.parametrize("text", [PUB_TEXT.upper(), "nodekey:" + PUB_HEX.upper(),
                                  f"  {PUB_TEXT}\n"])
def test_parse_public_accepts_case_and_surrounding_whitespace(text):
    assert keys.parse_public(text) == bytes.fromhex(PUB_HEX)


@pytest.mark.parametrize("parse, text", [
    (keys.parse_public, PUB_HEX),  # untyped
    (keys.parse_public, PRIV_TEXT),  # wrong prefix
    (keys.parse_public, PUB_TEXT[:-1]),
    (keys.parse_public, PUB_TEXT + "0"),
    (keys.parse_public, "nodekey:" + "g" * 64),
    (keys.parse_public, ""),
    (keys.parse_private, PUB_TEXT),
    (keys.parse_private, PRIV_HEX),
    (keys.parse_private, PRIV_TEXT[:-2]),
    (keys.parse_private, "privkey:" + "0x" + PRIV_HEX[2:]),
    (keys.parse_public, "nodekey:" + EMBEDDED_SPACE),
    (keys.parse_private, "privkey:" + EMBEDDED_SPACE),
])
def test_malformed_key_text(parse, text):
    with pytest.raises(KeyFormatError):
        parse(text)


def test_generated_keys_are_clamped_and_distinct():
    a, b = KeyPair.generate(), KeyPair.generate()
    assert a.private != b.private and a.public != b.public
    for pair in (a, b):
        assert len(pair.private) == 32 and len(pair.public) == 32
        assert pair.private[0] & 7 == 0
        assert pair.private[31] & 0xC0 == 0x40


def test_repr_hides_private_key():
    pair = KeyPair(keys.parse_private(PRIV_TEXT))
    assert repr(pair) == f"KeyPair(public={PUB_TEXT})"
    assert PRIV_HEX not in repr(pair) and PRIV_HEX not in str(pair)


@pytest.mark.parametrize("text", ["00" * 32, "AbCd" * 16, " " + "ff" * 32 + "\n", "\t" + "01" * 32])
def test_parse_mesh_key(text):
    assert keys.parse_mesh_key(text) == bytes.fromhex(text.strip())


@pytest.mark.parametrize("text", [
    "0" * 63, "0" * 66, "", "z" * 64, "privkey:" + "00" * 32, EMBEDDED_SPACE, "+" + "0" * 63,
])
def test_parse_mesh_key_rejects(text):
    with pytest.raises(KeyFormatError):
        keys.parse_mesh_key(text)


# ---- key file -------------------------------------------------------------------------------

def test_creates_key_file_like_go(tmp_path):
    path = tmp_path / "nested" / "dir" / "derper.key"
    pair, created = load_or_create_key_file(path)
    assert created is True
    assert path.parent.is_dir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == (
        '{\n\t"PrivateKey": "' + pair.private_text() + '"\n}').encode()
    assert sorted(p.name for p in path.parent.iterdir()) == ["derper.key"]  # no temp file left
    again, created = load_or_create_key_file(path)
    assert created is False
    assert again.private == pair.private


@pytest.mark.parametrize("body", [
    '{"PrivateKey": "%s"}' % PRIV_TEXT,
    '{\n\t"PrivateKey": "%s"\n}\n' % PRIV_TEXT,
    '{"privatekey": "%s"}' % PRIV_TEXT,
    '{"PRIVATEKEY": "%s", "Other": 1}' % PRIV_TEXT.upper(),
])
def test_loads_existing_key_file(tmp_path, body):
    path = tmp_path / "derper.key"
    path.write_text(body)
    pair, created = load_or_create_key_file(path)
    assert created is False
    assert pair.public == bytes.fromhex(PUB_HEX)


def test_duplicate_private_key_fields_last_wins(tmp_path):
    other = KeyPair.generate()
    path = tmp_path / "derper.key"
    path.write_text(json.dumps({"PrivateKey": PRIV_TEXT, "privatekey": other.private_text()}))
    assert load_or_create_key_file(path)[0].private == other.private


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    return {p.name: (p.read_bytes() if p.is_file() else b"<dir>", p.stat().st_mtime_ns,
                     p.stat().st_mode) for p in directory.iterdir()}


@pytest.mark.parametrize("body", [
    b"",
    b"not json",
    b"\xff\xfe\x00",
    b"[]",
    b'"privkey:' + PRIV_HEX.encode() + b'"',
    b"{}",
    b'{"PrivateKey": null}',
    b'{"PrivateKey": 5}',
    b'{"PrivateKey": "nodekey:' + PUB_HEX.encode() + b'"}',
    b'{"PrivateKey": "privkey:' + PRIV_HEX[:-1].encode() + b'"}',
    b'{"PrivateKey": "' + PRIV_HEX.encode() + b'"}',
    b'{"PrivateKey": "privkey:' + PRIV_HEX.encode() + b'"',  # truncated
    b'{"PrivateKey": "privkey:' + EMBEDDED_SPACE.encode() + b'"}',
], ids=["empty", "text", "binary", "array", "string", "no-field", "null", "number", "nodekey",
        "63hex", "untyped", "truncated", "embedded-space"])
def test_corrupt_key_file_is_error_and_untouched(tmp_path, body):
    path = tmp_path / "derper.key"
    path.write_bytes(body)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(tmp_path)
    with pytest.raises(KeyFileError, match=str(path)):
        load_or_create_key_file(path)
    assert snapshot(tmp_path) == before


def test_unreadable_key_file_is_error_and_untouched(tmp_path):
    # Tests may run as root, where permission bits do not stop reads; a directory always fails.
    path = tmp_path / "derper.key"
    path.mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_or_create_key_file(path)
    assert snapshot(tmp_path) == before
    assert list(path.iterdir()) == []


def test_uncreatable_key_file_is_error(tmp_path):
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "missing")  # reading says ENOENT, mkdir cannot proceed
    with pytest.raises(KeyFileError, match="cannot create"):
        load_or_create_key_file(dangling / "derper.key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling"]
