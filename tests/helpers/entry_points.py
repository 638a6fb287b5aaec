"""An entry point (scripts/*.py, eval/*.py) loaded as a module without running its `main`, for the
tests that read its parser (tests/test_flags.py, tests/test_recipes.py)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_entry_point(path: Path, prefix: str) -> ModuleType:
    """`path` executed as the module `<prefix>_<folder>_<stem>` (registered, since dataclasses look their
    module up while it executes), with its folder on sys.path as a script would have it."""
    spec = importlib.util.spec_from_file_location(f"{prefix}_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(path.parent))  # scripts import their neighbours as a script would
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module
