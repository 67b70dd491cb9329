"""The import graph: no cycles (counting modules loaded by name), and commands that do not need
the server do not load it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from derper.certs.bundle import ensure_ip_cert

ROOT = Path(__file__).resolve().parent.parent
SERVER_MODULES = ("derper.server", "derper.http.server", "derper.admission.gate",
                  "derper.net.listener")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _by_name(node: ast.AST, known: set[str]) -> set[str]:
    """Modules named in strings: ``importlib.import_module("...")`` anywhere, and module-level
    tables such as COMMANDS (a logger's name, inside a call, is not an import)."""
    found = set()
    for sub in ast.walk(node):
        if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute)
                and sub.func.attr == "import_module" and sub.args
                and isinstance(sub.args[0], ast.Constant)):
            found.add(sub.args[0].value)
    for stmt in node.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            todo = [stmt.value]
            while todo:
                sub = todo.pop()
                if isinstance(sub, ast.Call):
                    continue
                if isinstance(sub, ast.Constant) and sub.value in known:
                    found.add(sub.value)
                todo.extend(ast.iter_child_nodes(sub))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the modules of derper/ and stun/ it imports, at any depth of its code."""
    paths = sorted((ROOT / "derper").rglob("*.py")) + sorted((ROOT / "stun").rglob("*.py"))
    known = {_module_name(p) for p in paths}
    graph = {}
    for path in paths:
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        targets = _by_name(tree, known)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)  # from . import x
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_graph_sees_relative_absolute_and_by_name_imports():
    graph = import_graph()
    assert "derper.server" in graph["derper.cli.serve"]  # from ..server import Server
    assert "derper.cli.derpmap" in graph["derper.cli.main"]  # COMMANDS
    assert "derper.cli.serve" in graph["derper.cli.main"]  # importlib.import_module(SERVE)
    assert "stun.server" in graph["derper.server"]  # absolute
    assert "derper.metrics.varz" in graph["derper.server"]  # from .metrics import ..., varz
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def modules_after(argv: list[str]) -> tuple[str, list[str]]:
    """Run ``derper ARGV`` in a fresh interpreter; its stdout, and the modules it loaded."""
    code = ("import json, sys\n"
            "from derper.cli.main import main\n"
            "try:\n"
            f"    main({argv!r})\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    out, _, last = result.stdout.rstrip("\n").rpartition("\n")
    return out, json.loads(last)


def server_modules(loaded: list[str]) -> list[str]:
    return [m for m in loaded if m in SERVER_MODULES or m.startswith("derper.relay")]


def test_derpmap_loads_neither_the_server_nor_trio(tmp_path):
    ensure_ip_cert(tmp_path, "203.0.113.7")
    out, loaded = modules_after(["derpmap", "-hostname", "203.0.113.7", "-certmode", "manual",
                                 "-certdir", str(tmp_path), "-format", "json"])
    assert json.loads(out)["Regions"]["900"]["Nodes"][0]["CertName"].startswith("sha256-raw:")
    assert server_modules(loaded) == []
    assert "trio" not in loaded


def test_bench_help_loads_no_server_module():
    out, loaded = modules_after(["bench", "-h"])
    assert out.startswith("Usage: derper bench")
    assert server_modules(loaded) == []
