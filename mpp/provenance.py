"""Which code produced a benchmark result: the git commit, marked when the working tree differs."""
from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(repo: Path) -> str:
    """Short hash of `repo`'s HEAD, with "+dirty" when tracked files other than the benchmark results
    differ from it (the figures then come from code no commit holds); "unknown" outside a git checkout."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        # Results files are rewritten by the run itself, so they do not count as a change of code.
        changed = git("diff", "--quiet", "HEAD", "--", ".", ":(exclude)benchmarks/results").returncode != 0
    except OSError:  # no git on this machine
        return "unknown"
    return head.stdout.strip() + ("+dirty" if changed else "")
