"""The shape of the tree (docs/architecture.md), checked over its source with `ast`.

- Entry points (scripts/*.py, eval/*.py) are imported by nothing outside tests/: what two of them
  share lives in a library module (mpp/, triton_kernels/), and the libraries have no `__main__`.
- No Python module outside tests/ is over 400 lines and no other source or doc file over 500
  (generated results under benchmarks/results/ and results/ are data, not read as code), and no
  function outside tests/ is over 80 lines.
"""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
from helpers.imports import imported_modules

REPO = Path(__file__).resolve().parents[1]
ENTRY_DIRS = ("scripts", "eval")
LIBRARY_DIRS = ("mpp", "triton_kernels")
SOURCE_SUFFIXES = (".py", ".sh", ".md", ".toml", ".yml", ".yaml")
DATA_DIRS = ("benchmarks/results/", "results/")
MAX_MODULE_LINES, MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 500, 80


def tracked(*suffixes: str) -> list[Path]:
    """The files git tracks (plus new ones not ignored), outside tests/."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    return [REPO / name for name in out.stdout.split()
            if name.endswith(suffixes) and not name.startswith("tests/") and (REPO / name).is_file()]


def entry_points() -> dict[str, Path]:
    """Dotted module name → file, for every entry point; also the bare name (`bench_train`), which a
    script could import after putting scripts/ on sys.path."""
    found = {}
    for folder in ENTRY_DIRS:
        for path in (REPO / folder).glob("*.py"):
            if path.name != "__init__.py":
                found[f"{folder}.{path.stem}"] = path
                found[path.stem] = path
    return found


def has_main_guard(tree: ast.AST) -> bool:
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in ast.walk(tree))


def test_no_module_imports_an_entry_point():
    entries = entry_points()
    offenders = []
    for path in tracked(".py"):
        tree = ast.parse(path.read_text(), str(path))
        for name in sorted(imported_modules(tree)):
            if name in entries and entries[name] != path:
                offenders.append(f"{path.relative_to(REPO)} imports {name} ({entries[name].relative_to(REPO)})")
    assert not offenders, ("entry points are imported by nothing (move what they share into mpp/):\n"
                           + "\n".join(offenders))


def test_libraries_are_not_entry_points():
    mains = [str(p.relative_to(REPO)) for p in tracked(".py")
             if p.relative_to(REPO).parts[0] in LIBRARY_DIRS and has_main_guard(ast.parse(p.read_text()))]
    assert not mains, f"library modules run as programs (give them an entry point in scripts/ or eval/): {mains}"


def line_limit(path: Path) -> int:
    return MAX_MODULE_LINES if path.suffix == ".py" else MAX_FILE_LINES


def test_no_file_over_its_line_limit():
    long = {str(p.relative_to(REPO)): n for p in tracked(*SOURCE_SUFFIXES)
            if not str(p.relative_to(REPO)).startswith(DATA_DIRS)
            and (n := len(p.read_text(errors="replace").splitlines())) > line_limit(p)}
    assert not long, (f"Python modules over {MAX_MODULE_LINES} lines or other files over {MAX_FILE_LINES} "
                      f"(split them by job): {long}")


def test_no_function_over_80_lines():
    long = {}
    for path in tracked(".py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(REPO)}:{node.lineno} {node.name}"] = length
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_checks_see_a_violation():
    """The checks above can fail: an entry point imported by a library is found, a main guard too."""
    tree = ast.parse("from eval.fewshot import main\nimport bench_train\nif __name__ == '__main__':\n    main()\n")
    assert {"eval.fewshot", "eval.fewshot.main", "bench_train"} <= imported_modules(tree)
    assert has_main_guard(tree)
    entries = entry_points()
    assert "eval.fewshot" in entries and "bench_train" in entries and "scripts.pretrain_mpp" in entries
    assert line_limit(Path("mpp/x.py")) == MAX_MODULE_LINES and line_limit(Path("README.md")) == MAX_FILE_LINES
