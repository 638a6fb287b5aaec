"""The modules a Python file's import statements name (tests/test_architecture.py, tests/test_layers.py)."""
from __future__ import annotations

import ast


def imported_modules(tree: ast.AST) -> set[str]:
    """Every module an import statement names, with each `from X import y` also as `X.y` (y may be a
    module); relative imports are left out."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names
