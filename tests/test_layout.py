"""The shape of the code, enforced: ``proto/`` is pure, and the README's layout is the tree."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "derper" / "proto"
# Importing any of these means sockets, TLS, tasks, processes or files: the shell's business.
IO_MODULES = {"trio", "socket", "ssl", "asyncio", "selectors", "select", "os", "io", "pathlib",
              "shutil", "tempfile", "subprocess", "h11", "trio_websocket", "urllib"}
IO_CALLS = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "mkdir", "unlink"}


def _modules() -> list[Path]:
    """Every module; a package's ``__init__.py`` holds only its docstring."""
    paths = sorted((ROOT / "derper").rglob("*.py")) + sorted((ROOT / "stun").glob("*.py"))
    return [p for p in paths if p.name != "__init__.py"]


def _io_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in IO_MODULES]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            if (node.module or "").split(".")[0] in IO_MODULES:
                found.append(node.module)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) \
                else None
            if name in IO_CALLS:
                found.append(f"{name}() at line {node.lineno}")
    return found


@pytest.mark.parametrize("path", sorted(PROTO.glob("*.py")), ids=lambda p: p.name)
def test_proto_does_no_io(path):
    assert _io_uses(path) == [], f"{path.name} is under proto/ but does I/O"


def test_io_check_catches_io():
    """The check above can fail: the modules that are the I/O shell trip it."""
    for name in ("net/listener.py", "disk/keyfile.py", "relay/session.py", "http/server.py"):
        assert _io_uses(ROOT / "derper" / name), name


def test_importing_proto_loads_no_io_library():
    """Nor do proto's dependencies bring trio or ssl in behind its back."""
    code = ("import pkgutil, importlib, sys, derper.proto as p\n"
            "for m in pkgutil.iter_modules(p.__path__):\n"
            "    importlib.import_module('derper.proto.' + m.name)\n"
            "print(' '.join(m for m in ('trio', 'ssl', 'h11', 'trio_websocket') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def _readme_layout() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("\n## Layout"):]


def test_readme_layout_lists_every_module():
    listed = set(re.findall(r"`((?:derper|stun)/[\w/]+\.py)`", _readme_layout()))
    actual = {str(p.relative_to(ROOT)) for p in _modules()}
    assert actual - listed == set(), "modules missing from the README's layout section"
    assert listed - actual == set(), "the README's layout names modules that do not exist"
