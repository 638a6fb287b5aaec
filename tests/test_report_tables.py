"""The results reports' tables are the committed files' numbers (results/<study>/tables.py --check)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "results" / "cifar10" / "tables.py"
REPORT = REPO / "results" / "cifar10" / "REPORT.md"


def check(*args: str, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), "--check", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("study", ["cifar10", "imagenette"])
def test_every_table_of_the_report_is_what_the_committed_files_say(study):
    done = check(script=REPO / "results" / study / "tables.py")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_table_that_differs_from_the_files_is_found(tmp_path):
    text = REPORT.read_text()
    cell = "| MPP seed 1 | "
    assert cell in text
    start = text.index(cell) + len(cell)
    end = text.index(" |", start)
    wrong = f"{float(text[start:end]) + 0.1:.1f}"  # the seed-1 MPP run's 1-shot accuracy, off by 0.1
    copy = tmp_path / "REPORT.md"
    copy.write_text(text[:start] + wrong + text[end:])
    done = check("--report", str(copy))
    assert done.returncode == 1 and "'study3'" in done.stdout, done.stdout + done.stderr
