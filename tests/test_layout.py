"""The house's shape: core, serving and training, arrows only down into the core, no cycles, and the
app loads no training code. Above them, the command line (``mura_demo.cli``) dispatches to both."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "mura_demo"


def imports_of(path) -> set[str]:
    """The package modules ``path`` imports (at any depth of its code), as dotted names."""
    here = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(here[: len(here) - node.level + 1] + ((node.module,) if node.module else ()))
            found |= {base} if node.module else {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mura_demo"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mura_demo")}
    return found


def graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules} for name, path in modules.items()}


def test_arrows_point_only_down_into_the_core():
    for module, imported in graph().items():
        layer = module.split(".")[1] if module.count(".") > 1 else None
        for target in imported:
            target_layer = target.split(".")[1] if target.count(".") > 1 else None
            if layer == "core":
                assert target_layer == "core", f"{module} imports {target}"
            if layer == "training":
                assert target_layer in ("core", "training"), f"{module} imports {target}"
            if layer == "serving":
                assert target_layer in ("core", "serving"), f"{module} imports {target}"


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            assert state.get(nxt) != 1, " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])


def test_the_app_and_the_command_line_load_no_training_code():
    """Only `train` and `evaluate` import training code; the parser needs its settings (plain dataclasses)."""
    code = (
        "import sys, app, mura_demo.cli as cli; cli.build_parser();"
        "print(sorted(m for m in sys.modules if m.startswith('mura_demo.training')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['mura_demo.training', 'mura_demo.training.settings']"
