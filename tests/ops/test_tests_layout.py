"""The test tree's own rules (issue 16): tests live in room folders beside the code's rooms, and what tests
share is imported from the package tests/support, never from conftest or from another test module (a
test module imported by another is collected under two names and its fixtures run twice)."""

from __future__ import annotations

import ast

from tests.support import REPO

TESTS = REPO / "tests"


def test_every_test_module_lives_in_a_room_folder() -> None:
    assert sorted(p.name for p in TESTS.glob("test_*.py")) == []
    rooms = {p.parent.name for p in TESTS.rglob("test_*.py") if "data" not in p.parts}
    assert rooms and "support" not in rooms


def test_no_test_imports_conftest_or_another_test_module() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        if "data" in path.relative_to(TESTS).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                last = name.rsplit(".", 1)[-1]
                if last == "conftest" or last.startswith("test_"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert offenders == [], "\n".join(offenders)
