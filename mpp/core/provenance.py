"""Which code produced a result: the git commit (marked when the working tree differs) and the versions
of the libraries that computed it. Benchmarks record `git_commit`; every run's config.json records
`provenance()`."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

# The libraries whose releases change what a run computes (or how fast): recorded with every run.
PACKAGES = ("torch", "triton", "timm", "accelerate", "datasets")
# Where a copy of the tree without .git (the device machine's) learns its commit: written by the machine
# that sends the tree, before the call (`git rev-parse HEAD > COMMIT`, see scripts/gpu_check.sh).
COMMIT_FILE = "COMMIT"


def git_commit(repo: Path, exclude: tuple[str, ...] = ("benchmarks/results",), short: bool = True) -> str:
    """`repo`'s HEAD (short hash by default), with "+dirty" when tracked files other than `exclude`
    differ from it (the figures then come from code no commit holds); "unknown" outside a git checkout.
    The default excludes the benchmark results, which a benchmark rewrites itself."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)

    try:
        head = git("rev-parse", *(["--short"] if short else []), "HEAD")
        if head.returncode != 0:
            return sent_commit(repo, short)
        # Untracked files (runs/, data/ are git-ignored anyway) are no change of code; staged ones are.
        changed = git("diff", "--quiet", "HEAD", "--", ".", *(f":(exclude){p}" for p in exclude)).returncode != 0
    except OSError:  # no git on this machine
        return sent_commit(repo, short)
    return head.stdout.strip() + ("+dirty" if changed else "")


def sent_commit(repo: Path, short: bool = True) -> str:
    """The commit in `repo`/COMMIT (a hash, as the sender's git wrote it), marked "(sent)" since nothing
    here can check that the tree still matches it; "unknown" without a well-formed file."""
    try:
        text = (Path(repo) / COMMIT_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return "unknown"
    if not (7 <= len(text) <= 40 and all(c in "0123456789abcdef" for c in text.removesuffix("+dirty"))):
        return "unknown"
    head, dirty = text.removesuffix("+dirty"), text.endswith("+dirty")
    return (head[:7] if short else head) + ("+dirty" if dirty else "") + " (sent)"


def package_root() -> Path:
    """The checkout holding the mpp package that is running (the code a run's results come from)."""
    import mpp

    return Path(mpp.__file__).resolve().parents[1]


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Each package's installed version (None: not installed), and Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(repo: Path | None = None) -> dict:
    """{"commit": the full hash of the checkout holding mpp (+dirty when any tracked file differs from
    it; "unknown" outside a git checkout), "versions": `versions()`}: what config.json records."""
    return {"commit": git_commit(repo or package_root(), exclude=(), short=False), "versions": versions()}
