"""The coordinator's two halves stay apart, and benchmarks never import the tests.

``coordinator.model`` (models, SGP, ODA, tiers) never imports ``coordinator.run`` or the
wiring above it; ``coordinator.run`` (rounds, server, checkpoints) never imports
``coordinator.model``: it reaches the model side through ``coordinator.run.model_side``.
Checked on the source (every import statement, top level or inside a function).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in sorted(_imports(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("coordinator/model", ("coordinator.run", "coordinator.launch", "coordinator.cli", "coordinator.simulate")),
        ("coordinator/run", ("coordinator.model", "coordinator.launch", "coordinator.cli", "coordinator.simulate")),
        ("benchmarks", ("tests",)),
        ("shared", ("coordinator", "edge_client", "hardware_profiles")),
        ("hardware_profiles", ("coordinator", "edge_client")),
        ("edge_client", ("coordinator",)),
    ],
)
def test_no_import_crosses_a_wall(folder, forbidden):
    assert _offenders(folder, forbidden) == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from coordinator.run import rounds\n    import coordinator.model.sgp\n")
    assert {"coordinator.run", "coordinator.run.rounds", "coordinator.model.sgp"} <= _imports(source)
