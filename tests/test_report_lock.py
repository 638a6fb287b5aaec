"""One probe at a time per report: a second eval/fewshot.py, eval/linear_probe.py or eval/knn.py
writing a report another probe is computing is refused in one line (it used to replace the other's
report without a word), the first's report is written whole, and the lock of a dead probe is taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from helpers.runs import ENV, REPO, run_script

from eval import fewshot, linear_probe
from mpp.core.runlock import ReportLock

# A random-init Micro/4 on a few hundred digits: seconds, without a run directory.
QUICK = ["--model", "Micro/4", "--random-init", "--no-references", "--max-test", "50"]


def refused_in_process(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_second_probe_on_a_report_in_the_writing_is_refused_and_the_first_report_is_whole(tmp_path, capsys):
    report = tmp_path / "out" / "report.json"
    marker, release = tmp_path / "embedding", tmp_path / "release"
    argv = [*QUICK, "--max-train", "200", "--k", "5", "--output", str(report)]
    first = subprocess.Popen([sys.executable, "tests/helpers/probe_faults.py", "slow", "knn", *argv], cwd=REPO,
                             env={**ENV, "FAULT_MARKER": str(marker), "FAULT_RELEASE": str(release)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), first.communicate()[1][-2000:]  # the first is embedding, its report claimed

        second = run_script("eval/knn.py", *argv, timeout=120)  # as a user would start it
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert lines[0].startswith(f"error: report '{report}' is being written by process {first.pid} on "
                                   f"{socket.gethostname()} (since ")
        assert lines[0].endswith(": wait for that probe to end, stop it, or pass another --output")
        for main, extra in ((fewshot.main, ["--shots", "1"]), (linear_probe.main, [])):  # they claim it alike
            assert "is being written by process" in refused_in_process(capsys, main, [*QUICK, *extra, "--output",
                                                                                     str(report)])
        assert not report.exists()  # none of them wrote it
    finally:
        release.touch()
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    written = json.loads(report.read_text())  # whole: the first probe's own report
    assert written["dataset"]["train_used"] == 200 and list(written["results"]) == ["5"]
    assert (tmp_path / "out" / "report.json.lock").read_text() == ""  # a clean end leaves it free
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.json", "report.json.lock", "tensorboard"]


def test_the_lock_of_a_dead_probe_is_taken_over_with_a_note(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # gone: what a probe killed by SIGKILL leaves is its line, and no lock
    report = tmp_path / "knn.json"
    (tmp_path / "knn.json.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}) + "\n")
    with ReportLock(report) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"note: taking over the lock of process {pid}" in err and "no longer running" in err
    assert lock.path.read_text() == ""

