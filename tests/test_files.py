"""Atomic writes (keys, certificates, the ACME cache): never half-written, never redirected,
durable once published, and a full disk loses nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from derper.disk import files
from derper.disk.files import write_atomic, write_atomic_group
from derper.disk.keyfile import KeyFileError, load_or_create_key_file


def test_publishes_whole_file_with_mode(tmp_path):
    target = tmp_path / "derper.key"
    write_atomic(target, b"secret", 0o600, replace=False)
    assert target.read_bytes() == b"secret"
    assert target.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["derper.key"]  # no temporary file left behind


def test_link_never_clobbers_and_replace_does(tmp_path):
    target = tmp_path / "cert.pem"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        write_atomic(target, b"new", 0o644, replace=False)
    assert target.read_bytes() == b"old"
    write_atomic(target, b"new", 0o644, replace=True)
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["cert.pem"]


def test_planted_symlink_at_the_temporary_name_is_not_followed(tmp_path, monkeypatch):
    """Even a name an attacker guessed right: O_EXCL | O_NOFOLLOW refuses the planted link."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: "guessed")
    (tmp_path / ".derper.key.guessed.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "derper.key", b"secret", 0o600, replace=False)
    assert victim.read_bytes() == b"untouched"
    assert not (tmp_path / "derper.key").exists()


def test_directory_is_fsynced_after_publishing(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    write_atomic(tmp_path / "derper.key", b"secret", 0o600, replace=False)
    assert synced[-1] == str(tmp_path.resolve())  # the directory, after the file itself
    assert len(synced) == 2


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: a real ENOSPC, not a simulated one."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> None:
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for _ in range(64):  # 64 KiB at most
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_full_disk_keeps_the_old_file(tiny_disk):
    target = tiny_disk / "cert.pem"
    target.write_bytes(b"old certificate")
    _fill(tiny_disk)
    with pytest.raises(OSError):
        write_atomic(target, b"n" * 32768, 0o644, replace=True)
    assert target.read_bytes() == b"old certificate"
    assert sorted(os.listdir(tiny_disk)) == ["cert.pem", "filler"]


def test_full_disk_key_file_is_a_clear_error_and_nothing_half_written(tiny_disk):
    _fill(tiny_disk)
    path = tiny_disk / "state" / "derper.key"
    with pytest.raises(KeyFileError, match="cannot create server key file"):
        load_or_create_key_file(path)
    assert not path.exists()
    if path.parent.exists():
        assert list(path.parent.iterdir()) == []


def test_a_group_is_published_whole_or_not_at_all(tiny_disk):
    """A renewed key and certificate: a full disk midway leaves the old pair, not a mix."""
    key, crt = tiny_disk / "derp.key", tiny_disk / "derp.crt"
    key.write_bytes(b"old key")
    crt.write_bytes(b"old cert")
    _fill(tiny_disk)
    with pytest.raises(OSError):
        write_atomic_group([(key, b"k" * 100, 0o600), (crt, b"c" * 32768, 0o644)], replace=True)
    assert (key.read_bytes(), crt.read_bytes()) == (b"old key", b"old cert")
    assert sorted(os.listdir(tiny_disk)) == ["derp.crt", "derp.key", "filler"]


def test_a_group_publishes_every_file(tmp_path):
    files = [(tmp_path / "a.key", b"a", 0o600), (tmp_path / "a.crt", b"b", 0o644)]
    write_atomic_group(files, replace=False)
    assert [(p.read_bytes(), p.stat().st_mode & 0o777) for p, _, _ in files] == [
        (b"a", 0o600), (b"b", 0o644)]
    with pytest.raises(FileExistsError):
        write_atomic_group(files, replace=False)


RACE = """
import pathlib, sys, time
from derper.certs.bundle import ensure_ip_cert, load_manual
from derper.disk.keyfile import load_or_create_key_file
go, key, certdir = map(pathlib.Path, sys.argv[1:])
deadline = time.monotonic() + 30
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("never started")
    time.sleep(0.001)
pair, _ = load_or_create_key_file(key)
ensure_ip_cert(certdir, "203.0.113.7")
print(pair.public.hex(), load_manual(certdir, "203.0.113.7").pin)
"""


@pytest.mark.parametrize("round", range(3))
def test_processes_starting_together_make_one_key_and_one_certificate(tmp_path, round):
    """Two derpers (or -workers) starting at once: one creates, the others use what it made."""
    go, key, certdir = tmp_path / "go", tmp_path / "state" / "derper.key", tmp_path / "certs"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(go), str(key), str(certdir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    try:
        time.sleep(0.5)  # every one is waiting for the start
        go.touch()
        results = [p.communicate(timeout=30) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0] * 6, [err for _, err in results]
    assert len({out for out, _ in results}) == 1
