"""``derper`` serves on glibc's malloc: the real command re-runs itself, under the same pid,
with PYTHONMALLOC=malloc, and leaves an allocator the operator chose alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.process import derper

ARGS = ["-dev", "-a", "127.0.0.1:0", "-http-port", "-1", "-stun=false"]
SHOW = ("from derper.cli.allocator import exec_with_malloc; import os, sys; "
        "exec_with_malloc(os.environ); print(os.environ.get('PYTHONMALLOC'), *sys.argv[1:])")


def environment(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode() for k, v in pairs}


@pytest.mark.skipif("PYTHONMALLOC" in os.environ, reason="the test runner set an allocator")
async def test_the_server_runs_on_glibc_malloc(tmp_path):
    async with derper(ARGS, tmp_path) as proc:
        assert environment(proc.proc.pid).get("PYTHONMALLOC") == "malloc"


async def test_an_allocator_the_operator_chose_is_kept(tmp_path):
    async with derper(ARGS, tmp_path, env={"PYTHONMALLOC": "pymalloc"}) as proc:
        assert environment(proc.proc.pid).get("PYTHONMALLOC") == "pymalloc"


def test_the_re_run_is_the_same_command():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    out = subprocess.run([sys.executable, "-c", SHOW, "a", "b c"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out == "malloc a b c\n"
