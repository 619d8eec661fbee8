"""The house's rules, read from the code itself: imports go one way, the pure core does no I/O, nothing points outside.

`sniffer` (getting packets) <- `analysis` (the pure model and its judging)
<- `kaobs` (the command line, reports, Postgres, the lab). A module under
`analysis/` imports no terminal, socket, process or database library and
opens no file; no two modules import each other, however indirectly; and no
file refers to the team's folder beside the repository, which a user's clone
does not have.
"""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sniffer", "analysis", "kaobs")
LAYER = {"sniffer": 0, "analysis": 1, "kaobs": 2}
IO_MODULES = {"rich", "socket", "subprocess", "tempfile", "psycopg", "docker", "click", "select", "mmap", "shutil"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file (top level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def project_imports() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        graph[name] = {m for m in imports(path) if m in known and m != name}
    return graph


def test_imports_go_one_way_sniffer_analysis_kaobs():
    wrong = [(a, b) for a, targets in project_imports().items() for b in targets
             if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]]]
    assert wrong == []


def test_no_import_circle():
    graph = project_imports()
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_the_pure_core_does_no_io():
    offenders = []
    for name, path in modules().items():
        if not name.startswith("analysis"):
            continue
        for module in imports(path):
            if module.split(".")[0] in IO_MODULES:
                offenders.append(f"{name} imports {module}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("open", "print", "input"):
                offenders.append(f"{name} calls {node.func.id}() at line {node.lineno}")
    assert offenders == []


OUTSIDE = "shared"
"""The team's folder beside the repository (spelt here in pieces, so that this file does not name it itself)."""


def test_nothing_points_outside_the_repository():
    done = subprocess.run(["git", "grep", "-n", "-I", "-e", "../" + OUTSIDE, "-e", OUTSIDE + "/reference", "--", "."],
                          cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if not line.startswith("tests/test_layout.py:")]
    assert lines == []
